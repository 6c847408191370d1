"""Expectation suites: one generated from the attribute spec, plus user-editable JSON suites.

The spec suite checks what the spec promises about the annotation table: labels inside the
declared sets, confidences in [0, 1], few errors, captions of a sane length, semantic IDs
present for nearly every item, unique item ids, and label shares close to a stored reference.
Multi-label attributes: every chosen label in the set, as many labels as the spec allows, one
score in [0, 1] per declared label; ordinal ones: the expected value within the labels' numbers.
User suites are plain Great Expectations 1.x suite JSON files, `<suites_dir>/<feature
view>.json`, applied on top.

Great Expectations has no expectation on the elements of a list column, so the list columns
are checked through *derived* columns, computed before validation by `with_derived_columns`
here (pandas) and by its twin in expectations.spark_checks (Spark), with the same values:

    caption_token_count     len(caption_tokens)
    <A>_label_count         len(<A>_labels): the size of the chosen set
    <A>_each_label          the first of the row's labels outside the spec's set (a null entry
                            as ''), repeated ('<label> (repeated)') or out of the spec's order
                            ('<label> (out of spec order)'), else its first label: in the set
                            exactly when the list is a set of the spec's labels in its order
    <A>_score_count         the scores that are numbers (null and NaN entries do not count)
    <A>_each_score          the first score outside [0, 1], else the first score
    <A>_has_<label>         1.0 when the row carries the label, else 0.0: its mean is the
                            label's share, which the drift check compares with the reference

Each is null where the list is null (an annotation error), so the checks skip those rows as
they skip a null label.
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


def label_count(attribute: str) -> str:
    return f"{attribute}_label_count"


def each_label(attribute: str) -> str:
    return f"{attribute}_each_label"


def score_count(attribute: str) -> str:
    return f"{attribute}_score_count"


def each_score(attribute: str) -> str:
    return f"{attribute}_each_score"


def has_label(attribute: str, label: str) -> str:
    return f"{attribute}_has_{label}"


def derived_columns(spec: Spec | None) -> list[str]:
    """The names `with_derived_columns` may add for this spec."""
    names = [CAPTION_TOKEN_COUNT]
    for name, attr in (spec.attributes.items() if spec is not None else ()):
        if attr.multi:
            names += [label_count(name), each_label(name), score_count(name), each_score(name),
                      *[has_label(name, lab) for lab in attr.labels]]
    return names


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


REPEATED, OUT_OF_ORDER = " (repeated)", " (out of spec order)"


def _first_misplaced(labels, order: dict):
    """The value of <A>_each_label (module docstring); `order` maps each label to its index."""
    if _missing(labels) or len(labels) == 0:
        return None
    seen, prev = set(), -1
    for lab in labels:
        if lab is None or lab not in order:
            return "" if lab is None else lab
        if lab in seen:
            return lab + REPEATED
        if order[lab] < prev:
            return lab + OUT_OF_ORDER
        seen.add(lab)
        prev = order[lab]
    return labels[0]


def _numbers(scores) -> list[float]:
    return [float(s) for s in scores if not _missing(s)]


def _first_outside_unit(scores):
    if _missing(scores):
        return None
    numbers = _numbers(scores)
    for s in numbers:
        if s < 0.0 or s > 1.0:
            return s
    return numbers[0] if numbers else None


def with_derived_columns(df: pd.DataFrame, spec: Spec | None = None) -> pd.DataFrame:
    """Columns the suites check that the table stores only implicitly (module docstring);
    the multi-label ones need the spec."""
    extra = {}
    if S.CAPTION_TOKENS in df.columns:
        counts = df[S.CAPTION_TOKENS].map(lambda toks: None if toks is None else len(toks))
        extra[CAPTION_TOKEN_COUNT] = counts.astype("Int64")
    for name, attr in (spec.attributes.items() if spec is not None else ()):
        if not attr.multi:
            continue
        if S.labels(name) in df.columns:
            labels, order = df[S.labels(name)], {lab: i for i, lab in enumerate(attr.labels)}
            extra[label_count(name)] = labels.map(
                lambda v: None if _missing(v) else len(v)).astype("Int64")
            extra[each_label(name)] = labels.map(lambda v: _first_misplaced(v, order))
            for lab in attr.labels:
                extra[has_label(name, lab)] = labels.map(
                    lambda v, lab=lab: float("nan") if _missing(v) else float(lab in list(v))
                ).astype("float64")
        if S.scores(name) in df.columns:
            scores = df[S.scores(name)]
            extra[score_count(name)] = scores.map(
                lambda v: None if _missing(v) else len(_numbers(v))).astype("Int64")
            extra[each_score(name)] = scores.map(_first_outside_unit).astype("float64")
    clash = sorted((set(extra) - {CAPTION_TOKEN_COUNT}) & set(df.columns))
    if clash:
        raise SuiteError(f"the table has columns {clash}, which the gate derives itself; "
                         "rename them")
    return df.assign(**extra) if extra else df


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
        expectations += _attribute_expectations(name, attr, mostly)
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


def _attribute_expectations(name: str, attr, mostly: float) -> list:
    """What the spec promises about one attribute's columns, by its kind."""
    labels = list(attr.labels)
    if attr.multi:
        return [
            E.ExpectColumnValuesToNotBeNull(column=S.labels(name), mostly=mostly),
            E.ExpectColumnValuesToBeInSet(column=each_label(name), value_set=labels),
            E.ExpectColumnValuesToBeBetween(
                column=label_count(name), min_value=attr.min_labels,
                max_value=len(labels) if attr.max_labels is None else attr.max_labels),
            E.ExpectColumnValuesToNotBeNull(column=S.scores(name), mostly=mostly),
            E.ExpectColumnValuesToBeBetween(column=each_score(name), min_value=0.0,
                                            max_value=1.0),
            # one probability per declared label, aligned with the spec's labels
            E.ExpectColumnValuesToBeBetween(column=score_count(name), min_value=len(labels),
                                            max_value=len(labels)),
        ]
    expectations = [
        E.ExpectColumnValuesToBeInSet(column=S.label(name), value_set=labels),
        E.ExpectColumnValuesToNotBeNull(column=S.label(name), mostly=mostly),
        E.ExpectColumnValuesToBeBetween(column=S.confidence(name),
                                        min_value=0.0, max_value=1.0),
    ]
    if attr.ordinal:  # an expected value of the labels' numbers lies within them
        expectations.append(E.ExpectColumnValuesToBeBetween(
            column=S.value(name), min_value=float(min(attr.values)),
            max_value=float(max(attr.values))))
    return expectations


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
        if (ref is None or ref.get("attribute_version") != attr.version
                or ("shares" if attr.multi else "weights") not in ref):
            notes.append(f"label drift of {name!r} not checked: the reference predates the "
                         f"current definition of {name!r}; write a new reference")
            continue
        if attr.multi:  # each label's share of the labelled items, within a band
            shift = thresholds.max_label_share_shift
            expectations += [E.ExpectColumnMeanToBeBetween(
                column=has_label(name, lab), min_value=round(max(0.0, share - shift), 6),
                max_value=round(min(1.0, share + shift), 6))
                for lab, share in zip(ref["values"], ref["shares"])]
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
