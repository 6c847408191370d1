"""Suites derived from the spec, the reference file, user suites and thresholds (no data run)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from pydantic import ValidationError

from expectations.reference import label_distribution, read_reference, write_reference
from expectations.suites import (SHIPPED_SUITES, SuiteError, spec_suite, user_suites,
                                 with_derived_columns)
from expectations.thresholds import Thresholds
from tests.test_gate import SPEC, annotation_frame
from udfs.spec import parse_spec


def by_target(suite) -> dict:
    return {(e.expectation_type, e.column): e for e in suite.expectations}


def test_spec_suite_follows_the_spec():
    suite, notes = spec_suite(SPEC, Thresholds(), reference=None, n_rows=500)
    exps = by_target(suite)
    for name, attr in SPEC.attributes.items():
        assert exps[("expect_column_values_to_be_in_set", f"{name}_label")].value_set \
            == list(attr.labels)
        assert exps[("expect_column_values_to_not_be_null", f"{name}_label")].mostly == 0.95
        conf = exps[("expect_column_values_to_be_between", f"{name}_confidence")]
        assert (conf.min_value, conf.max_value) == (0, 1)
    assert exps[("expect_column_values_to_be_null", "error")].mostly == 0.95
    caption = exps[("expect_column_values_to_be_between", "caption_token_count")]
    assert (caption.min_value, caption.max_value) == (1, 2 * SPEC.caption.max_tokens)
    assert ("expect_column_values_to_be_unique", "item_id") in exps
    assert not any(t == "expect_column_kl_divergence_to_be_less_than" for t, _ in exps)
    assert notes == []


def test_a_new_attribute_or_threshold_changes_the_suite():
    spec = parse_spec({"attributes": {"pace": {"labels": {"slow": "calm", "fast": "busy"}}}})
    suite, _ = spec_suite(spec, Thresholds(max_error_share=0.2, caption_max_tokens=5), None, 10)
    exps = by_target(suite)
    assert exps[("expect_column_values_to_be_in_set", "pace_label")].value_set == ["slow", "fast"]
    assert exps[("expect_column_values_to_be_null", "error")].mostly == pytest.approx(0.8)
    assert ("expect_column_values_to_be_between", "caption_token_count") not in exps  # no caption
    suite, _ = spec_suite(SPEC, Thresholds(caption_max_tokens=5), None, 10)
    assert by_target(suite)[("expect_column_values_to_be_between", "caption_token_count")
                            ].max_value == 5


def test_drift_expectations_come_from_the_reference(tmp_path):
    ref = read_reference(write_reference(tmp_path / "r.json", annotation_frame(), SPEC))
    suite, notes = spec_suite(SPEC, Thresholds(max_kl_divergence=0.3), ref, n_rows=500)
    kl = {e.column: e for e in suite.expectations
          if e.expectation_type == "expect_column_kl_divergence_to_be_less_than"}
    assert set(kl) == {"vibe_label", "audience_label"} and notes == []
    assert kl["vibe_label"].partition_object["values"] == list(SPEC.attributes["vibe"].labels)
    assert kl["vibe_label"].threshold == 0.3

    _, notes = spec_suite(SPEC, Thresholds(), ref, n_rows=10)
    assert notes and "min_rows_for_drift=50" in notes[0]


def test_reference_is_smoothed_over_every_declared_label():
    df = annotation_frame()
    df["vibe_label"] = ["dark"] * 150 + ["romantic"] * 50
    dist = label_distribution(df, SPEC)["vibe"]
    assert dist["values"] == list(SPEC.attributes["vibe"].labels)
    weights = dict(zip(dist["values"], dist["weights"]))
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["dark"] > weights["romantic"] > weights["thrilling"] > 0  # absent, not zero
    assert dist["attribute_version"] == SPEC.attributes["vibe"].version


def test_reference_files(tmp_path):
    assert read_reference(tmp_path / "missing.json") is None
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SuiteError, match="broken.json"):
        read_reference(broken)


def test_shipped_user_suites_load():
    for view in ("item_stats", "user_stats"):
        [suite] = user_suites(None, view)
        assert suite.name == view and suite.expectations
        assert (SHIPPED_SUITES / f"{view}.json").exists()
    assert user_suites(None, "no_such_view") == []


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"name": "x"}),
    json.dumps({"expectations": [{"type": "expect_no_such_thing", "kwargs": {}}]}),
    json.dumps({"expectations": [{"type": "expect_column_values_to_be_between",
                                  "kwargs": {"column": "a", "min_valu": 0}}]}),
])
def test_malformed_user_suite_names_the_file(tmp_path, content):
    (tmp_path / "item_stats.json").write_text(content)
    with pytest.raises(SuiteError, match="item_stats.json"):
        user_suites(tmp_path, "item_stats")


def test_caption_token_count_is_derived():
    df = pd.DataFrame({"caption_tokens": [[1, 2, 3], [], None]})
    assert with_derived_columns(df)["caption_token_count"].tolist() == [3, 0, pd.NA]
    assert "caption_token_count" not in with_derived_columns(pd.DataFrame({"x": [1]}))


def test_thresholds_are_checked():
    with pytest.raises(ValidationError):
        Thresholds(max_error_share=1.5)
    with pytest.raises(ValidationError):
        Thresholds(max_eror_share=0.1)  # a typo is an error, not a silent default
