"""Expectation suites: one generated from the attribute spec, plus user-editable JSON suites.

The spec suite checks what the spec promises about the annotation table: labels inside the
declared sets, confidences in [0, 1], few errors, captions of a sane length, semantic IDs
present for nearly every item, unique item ids, and label shares close to a stored reference.
User suites are plain Great Expectations 1.x suite JSON files, `<suites_dir>/<feature
view>.json`, applied on top.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import great_expectations as gx
import pandas as pd
from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

from expectations.thresholds import Thresholds
from udfs import schema as S
from udfs.spec import Spec

# GE pins some module loggers at INFO when imported ("Created temporary directory ..." per
# context): let them inherit the "great_expectations" level the CLIs and the engine set.
for _name in list(logging.root.manager.loggerDict):
    if _name.startswith("great_expectations."):
        logging.getLogger(_name).setLevel(logging.NOTSET)

E = gx.expectations
SHIPPED_SUITES = Path(__file__).parent / "suites"
CAPTION_TOKEN_COUNT = "caption_token_count"


class SuiteError(ValueError):
    """A suite, reference or threshold that cannot be used; the message names the file."""


def with_derived_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Columns the suites check that the table stores only implicitly."""
    if S.CAPTION_TOKENS not in df.columns:
        return df
    counts = df[S.CAPTION_TOKENS].map(lambda toks: None if toks is None else len(toks))
    return df.assign(**{CAPTION_TOKEN_COUNT: counts.astype("Int64")})


def spec_suite(spec: Spec, thresholds: Thresholds, reference: dict | None, n_rows: int,
               key: str = "item_id") -> tuple[gx.ExpectationSuite, list[str]]:
    """The suite the spec implies, and notes on checks it had to leave out.

    `reference` is a stored label distribution (expectations.reference); None leaves out
    the drift check. Column names come from udfs.schema.
    """
    mostly = 1.0 - thresholds.max_error_share
    expectations: list = [
        E.ExpectColumnValuesToNotBeNull(column=key),
        E.ExpectColumnValuesToBeUnique(column=key),
        # an error row is one the engine could not annotate; a few are tolerated
        E.ExpectColumnValuesToBeNull(column=S.ERROR, mostly=mostly),
    ]
    for name, attr in spec.attributes.items():
        expectations += [
            E.ExpectColumnValuesToBeInSet(column=S.label(name), value_set=list(attr.labels)),
            E.ExpectColumnValuesToNotBeNull(column=S.label(name), mostly=mostly),
            E.ExpectColumnValuesToBeBetween(column=S.confidence(name),
                                            min_value=0.0, max_value=1.0),
        ]
    if spec.caption is not None:
        expectations.append(E.ExpectColumnValuesToBeBetween(
            column=CAPTION_TOKEN_COUNT, min_value=thresholds.caption_min_tokens,
            max_value=thresholds.caption_max_tokens or 2 * spec.caption.max_tokens))
    if spec.semantic_id is not None:
        # a code path and its prefix tokens for every item the engine could embed
        expectations += [
            E.ExpectColumnValuesToNotBeNull(column=S.SEMANTIC_ID, mostly=mostly),
            E.ExpectColumnValuesToNotBeNull(column=S.SEMANTIC_ID_TOKENS, mostly=mostly),
        ]
    drift, notes = _drift_expectations(spec, thresholds, reference, n_rows)
    suite = gx.ExpectationSuite(name=f"spec:{spec.name}@{spec.version}",
                                expectations=expectations + drift)
    return suite, notes


def _drift_expectations(spec: Spec, thresholds: Thresholds, reference: dict | None,
                        n_rows: int) -> tuple[list, list[str]]:
    if reference is None:
        return [], []
    if n_rows < thresholds.min_rows_for_drift:
        return [], [f"label drift not checked: {n_rows} rows is fewer than "
                    f"min_rows_for_drift={thresholds.min_rows_for_drift}"]
    expectations, notes = [], []
    for name, attr in spec.attributes.items():
        ref = reference["attributes"].get(name)
        if ref is None or ref.get("attribute_version") != attr.version:
            notes.append(f"label drift of {name!r} not checked: the reference predates the "
                         f"current definition of {name!r}; write a new reference")
            continue
        expectations.append(E.ExpectColumnKLDivergenceToBeLessThan(
            column=S.label(name),
            partition_object={"values": ref["values"], "weights": ref["weights"]},
            threshold=thresholds.max_kl_divergence))
    return expectations, notes


def share_suite(spec: Spec, columns) -> gx.ExpectationSuite | None:
    """Per-label user shares (the ranker's user_stats columns named by the spec's labels)
    lie in [0, 1]; None when the frame holds no such column."""
    names = S.share_columns(spec)
    present = [n for n in names if n in set(columns)]
    if not present:
        return None
    return gx.ExpectationSuite(name=f"shares:{spec.name}", expectations=[
        E.ExpectColumnValuesToBeBetween(column=n, min_value=0.0, max_value=1.0)
        for n in present])


def user_suites(suites_dir: Path | None, view: str) -> list[gx.ExpectationSuite]:
    """The user suite for a feature view, if `<suites_dir>/<view>.json` exists."""
    path = (suites_dir or SHIPPED_SUITES) / f"{view}.json"
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        # built one by one: ExpectationSuite() only logs and drops an invalid expectation
        expectations = [ExpectationConfiguration(**e).to_domain_obj()
                        for e in data["expectations"]]
        return [gx.ExpectationSuite(name=data.get("name") or view,
                                    expectations=expectations, meta=data.get("meta"))]
    except Exception as exc:  # GE raises many types for a malformed suite; all mean "fix the file"
        raise SuiteError(f"{path}: not a valid Great Expectations suite ({exc!r})") from None
