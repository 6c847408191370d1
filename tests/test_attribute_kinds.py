"""Multi-label and ordinal attributes: the spec refuses what cannot work, the annotator and the
SQL functions give each kind its columns (real embedding engine, real Spark)."""
import copy

import numpy as np
import pandas as pd
import pytest

import udfs
from udfs import annotator
from udfs.engines.base import Engine, Labels
from udfs.functions import annotate_all_frame
from udfs.schema import AnnotationSchema
from udfs.spec import SpecError, parse_spec

from tests.conftest import ROOT

BASE = {"attributes": {
    "genres": {"kind": "multi", "min_labels": 1, "max_labels": 2, "threshold": 0.6,
               "labels": {"Comedy": "funny", "Drama": "serious", "Horror": "scary"},
               "examples": [{"text": "Scream", "labels": ["Horror", "Comedy"]}]},
    "stars": {"kind": "ordinal", "labels": {"1": "bad", "2": "fine", "3": "great"}},
    "tone": {"kind": "ordinal", "values": [0, 0.5, 1],
             "labels": {"calm": "quiet", "mixed": "both", "tense": "gripping"}},
}}
TEXTS = pd.Series(["Heat (1995) | tags: heist, crime, Al Pacino",
                   "Airplane! (1980) | tags: spoof, slapstick", None,
                   "Heat (1995) | tags: heist, crime, Al Pacino", "Ω ☃ → ümlauts"])


def spec_with(**changes):
    data = copy.deepcopy(BASE)
    for path, value in changes.items():
        attr, key = path.split("__")
        if value is None:
            data["attributes"][attr].pop(key)
        else:
            data["attributes"][attr][key] = value
    return data


@pytest.mark.parametrize("changes, where", [
    ({"genres__examples": [{"text": "x", "labels": ["Western"]}]}, "attributes.genres.examples[0].labels"),
    ({"genres__examples": [{"text": "x", "label": "Comedy"}]}, "attributes.genres.examples[0]"),
    ({"genres__min_labels": 3, "genres__max_labels": 2}, "attributes.genres.min_labels"),
    ({"genres__max_labels": 4}, "attributes.genres.max_labels"),
    ({"genres__threshold": 1.0}, "attributes.genres.threshold"),
    ({"genres__threshold": 0}, "attributes.genres.threshold"),
    ({"genres__threshold": "high"}, "attributes.genres.threshold"),
    ({"genres__prompt": "Item: {text}. Does it fit? Answer:"}, "attributes.genres.prompt"),
    ({"genres__kind": "several"}, "attributes.genres.kind"),
    ({"stars__labels": {"low": "a", "high": "b"}}, "attributes.stars.labels"),
    ({"stars__labels": {"3": "a", "1": "b"}}, "attributes.stars.labels"),
    ({"tone__values": [0, 1]}, "attributes.tone.values"),
    ({"tone__values": [1, 0.5, 0]}, "attributes.tone.values"),
    ({"stars__threshold": 0.5}, "attributes.stars.threshold"),
    ({"stars__examples": [{"text": "x", "label": "4"}]}, "attributes.stars.examples[0].label"),
])
def test_bad_kinds_are_refused_on_load_with_one_line(changes, where):
    with pytest.raises(SpecError) as err:
        parse_spec(spec_with(**changes))
    message = str(err.value)
    assert message.startswith(where + ":") and "\n" not in message, message


def test_the_kind_and_its_settings_are_part_of_the_version():
    spec = parse_spec(BASE)
    genres = spec.attributes["genres"]
    single = parse_spec(spec_with(genres__kind=None, genres__min_labels=None,
                                  genres__max_labels=None, genres__threshold=None,
                                  genres__examples=None,
                                  genres__prompt="{text} {labels}")).attributes["genres"]
    assert single.kind == "single" and single.version != genres.version
    for key, value in (("threshold", 0.7), ("max_labels", 3), ("min_labels", 0)):
        assert parse_spec(spec_with(**{f"genres__{key}": value})).attributes["genres"].version \
            != genres.version
    assert parse_spec(spec_with(tone__values=[0, 0.6, 1])).attributes["tone"].version \
        != spec.attributes["tone"].version
    assert spec.attributes["stars"].values == (1.0, 2.0, 3.0)


def test_the_chosen_set_keeps_threshold_min_and_max_in_spec_order():
    genres = parse_spec(BASE).attributes["genres"]  # threshold 0.6, 1..2 labels
    assert genres.choose([0.9, 0.2, 0.7]) == ["Comedy", "Horror"]
    assert genres.choose([0.1, 0.3, 0.2]) == ["Drama"]             # min_labels: the top one
    assert genres.choose([0.9, 0.8, 0.95]) == ["Comedy", "Horror"]  # max_labels: the top two
    assert genres.choose([0.6, 0.0, 0.0]) == ["Comedy"]             # at the threshold counts


def test_each_item_question_starts_with_the_shared_item_part():
    genres = parse_spec(BASE).attributes["genres"]
    questions = genres.questions("Heat (1995)")
    assert len(questions) == 3
    shared = questions[0][:questions[0].index("Question:")]
    assert all(q.startswith(shared) for q in questions)
    assert "Item: Scream\ngenres labels: Comedy, Horror" in shared and "Item: Heat (1995)" in shared
    assert all(lab in q for lab, q in zip(genres.labels, questions))


def test_annotate_all_gives_each_kind_its_columns(embedding_engine):
    spec = parse_spec(BASE)
    out = annotate_all_frame(embedding_engine, spec, TEXTS)
    table = AnnotationSchema(spec)
    assert list(out.columns) == [c.name for c in table.udf_columns()]
    ok = out["error"].isna().to_numpy()
    assert ok.tolist() == [True, True, False, True, True]  # the empty text is a row error
    genres = spec.attributes["genres"]
    for labels, scores in zip(out["genres_labels"][ok], out["genres_scores"][ok]):
        assert len(scores) == 3 and all(0 <= s <= 1 for s in scores)
        assert 1 <= len(labels) <= 2 and labels == genres.choose(scores)
    stars, tone = spec.attributes["stars"], spec.attributes["tone"]
    assert out["stars_label"][ok].isin(stars.labels).all()
    assert out["stars_value"][ok].between(1, 3).all() and out["tone_value"][ok].between(0, 1).all()
    probs = embedding_engine.classify(TEXTS[ok].tolist(), stars).scores
    np.testing.assert_allclose(out["stars_value"][ok], probs @ np.array([1, 2, 3]), atol=1e-6)
    assert out.loc[0, "genres_scores"] == out.loc[3, "genres_scores"]  # a repeated text
    assert out.loc[2, "genres_labels"] is None and "genres: empty text" in out.loc[2, "error"]


class Unsure(Engine):
    """A plugin engine with classify() only: neither tag() nor a label distribution."""
    model_name = "unsure"

    def classify(self, texts, attribute):
        return Labels([attribute.labels[0]] * len(texts), [0.5] * len(texts))

    def caption(self, texts, caption):
        return ["x"] * len(texts)


class OutOfRange(Unsure):
    def tag(self, texts, attribute):
        return np.full((len(texts), len(attribute.labels)), 1.5)


def test_engines_without_the_scores_give_row_errors_that_say_so():
    spec = parse_spec(BASE)
    texts = TEXTS.dropna().reset_index(drop=True)
    multi = annotator.tag_texts(Unsure(), spec.attributes["genres"], texts)
    assert multi["labels"].isna().all()
    assert multi["error"].str.contains("cannot score multi-label attributes").all()
    ordinal = annotator.annotate_texts(Unsure(), spec.attributes["stars"], texts)
    assert ordinal["label"].isna().all()
    assert ordinal["error"].str.contains("gives no distribution over the labels").all()
    bad = annotator.tag_texts(OutOfRange(), spec.attributes["genres"], texts)
    assert bad["error"].str.contains(r"outside \[0, 1\]").all()
    single = annotator.annotate_texts(Unsure(), spec.attributes["stars"].__class__(
        name="s", labels=("a", "b"), definitions=("x", "y")), texts)
    assert single["error"].isna().all() and single["value"].isna().all()


def test_sql_functions_for_each_kind(spark, embedding_engine):
    spec = parse_spec(BASE)
    udfs.register(spark, spec, engine={"type": "embedding"}, prefix="kinds_")
    spark.createDataFrame(pd.DataFrame({"sku": ["a", "b", "c"], "name": TEXTS[:3].tolist()})) \
        .createOrReplaceTempView("kinds_items")
    rows = spark.sql("""
        SELECT sku, kinds_annotate_multi('genres', name) AS g, kinds_annotate('stars', name) AS s,
               kinds_annotate('genres', name) AS wrong, kinds_annotate_multi('stars', name) AS w2
        FROM kinds_items ORDER BY sku""").collect()
    direct = annotate_all_frame(embedding_engine, spec, TEXTS[:3])
    for i, row in enumerate(rows[:2]):
        assert row.g.error is None and row.g.version == spec.attributes["genres"].version
        assert list(row.g.labels) == direct.loc[i, "genres_labels"]
        np.testing.assert_allclose(row.g.scores, direct.loc[i, "genres_scores"], atol=1e-6)
        assert row.s.label == direct.loc[i, "stars_label"]
        assert row.s.value == pytest.approx(direct.loc[i, "stars_value"], abs=1e-6)
    assert rows[2].g.labels is None and "empty text" in rows[2].g.error
    assert all("call annotate_multi('genres'" in r.wrong.error for r in rows)
    assert all("is an ordinal attribute: call annotate('stars'" in r.w2.error for r in rows)


def test_jobs_for_single_labels_refuse_a_multi_label_attribute(tmp_path, capsys):
    """Distillation and the review sample learn or stratify one label per item: a
    multi-label attribute is refused with one line, before any work (fine-tuning trains it:
    tests/test_finetune.py)."""
    from spark_jobs import distill, review_sample
    spec = str(ROOT / "specs" / "movielens_kinds.yaml")
    table = tmp_path / "t.csv"
    pd.DataFrame({"item_id": [1, 2], "title": ["Heat", "Up"],
                  "genres_labels": ["Drama", "Comedy"]}).to_csv(table, index=False)
    common = ["--spec", spec, "--attribute", "genres"]
    assert distill.main([*common, "--annotations", str(table), "--items", str(table),
                         "--out", str(tmp_path / "st")]) != 0
    assert review_sample.main(["--annotations", str(table), "--attribute", "genres", "--size", "2",
                               "--out", str(tmp_path / "r.csv")]) != 0
    err = capsys.readouterr().err
    assert err.count("is a multi-label attribute") == 2, err
    assert not (tmp_path / "st").exists()


def test_the_annotate_job_refuses_an_engine_that_cannot_score_a_multi_label_attribute(
        tmp_path, capsys):
    from spark_jobs import annotate
    items = tmp_path / "items.csv"
    pd.DataFrame({"item_id": [1], "title": ["Heat"]}).to_csv(items, index=False)
    rc = annotate.main(["--spec", str(ROOT / "specs" / "movielens_kinds.yaml"),
                        "--input", str(items), "--output", str(tmp_path / "out"),
                        "--engine", "tests.test_attribute_kinds:Unsure"])
    assert rc == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err.strip()
    assert err == ("annotate: error: engine 'tests.test_attribute_kinds:Unsure' cannot score "
                   "multi-label attributes (genres); use the embedding, transformers, vllm or "
                   "openai engine for them")
