"""Distillation: the pure student, the distill command, and the `student` engine."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from quality import distill
from spark_jobs import distill as distill_job
from spark_jobs.evaluate import movielens_genre_items
from tests.conftest import ROOT
from udfs.annotator import annotate_texts, caption_texts, clean_columns
from udfs.engines import build_engine, model_name
from udfs.spec import load_spec

GENRE_SPEC = ROOT / "specs" / "movielens_genre.yaml"
GENRE = load_spec(GENRE_SPEC).attribute("genre")


@pytest.mark.parametrize("n_classes", [2, 3])
def test_student_probabilities_match_sklearn(n_classes, tmp_path):
    rng = np.random.default_rng(n_classes)
    x = rng.normal(size=(200, 8))
    y = np.array(["x", "y", "z"][:n_classes])[(x[:, 0] > 0).astype(int) + (x[:, 1] > 1)
                                               * (n_classes - 2)]
    labels, coef, intercept = distill.fit(x, y.tolist(), c=1.0)
    student = distill.Student("attr", labels, "v1", "s1", "teacher", "enc", coef, intercept)
    student.save(tmp_path)
    loaded = distill.Student.load(tmp_path / "attr.json")
    reference = LogisticRegression(C=1.0, max_iter=2000, random_state=0).fit(x, y)
    np.testing.assert_allclose(loaded.predict_proba(x), reference.predict_proba(x), atol=1e-6)
    assert loaded.labels == list(reference.classes_)


def test_holdout_split_is_stratified_and_disjoint():
    labels = ["a"] * 50 + ["b"] * 10 + ["c"]
    train, test = distill.holdout_split(labels, 0.2, seed=3)
    assert sorted([*train, *test]) == list(range(61))
    assert [labels[i] for i in test].count("a") == 10
    assert [labels[i] for i in test].count("b") == 2
    assert 60 in train  # a label seen once cannot be held out
    with pytest.raises(ValueError, match="two labels"):
        distill.fit(np.zeros((3, 2)), ["a", "a", "a"])


@pytest.fixture(scope="module")
def student_dir(embedding_engine, tmp_path_factory):
    """The embedded engine labels 300 MovieLens items; a student is distilled from that."""
    base = tmp_path_factory.mktemp("distill")
    items = movielens_genre_items(limit=300)
    out = annotate_texts(embedding_engine, GENRE, clean_columns([items["title"], items["tags"]]))
    pd.DataFrame({"item_id": items["item_id"], "genre_label": out["label"],
                  "genre_confidence": out["confidence"], "model": embedding_engine.model_name,
                  "error": out["error"]}).to_parquet(base / "ann.parquet", index=False)
    items.to_parquet(base / "items.parquet", index=False)
    code = distill_job.main(["--spec", str(GENRE_SPEC), "--attribute", "genre",
                             "--annotations", str(base / "ann.parquet"),
                             "--items", str(base / "items.parquet"),
                             "--text-columns", "title,tags", "--out", str(base / "student")])
    assert code == 0
    return base


def test_distill_reports_agreement_and_throughput(student_dir):
    card = json.loads((student_dir / "student" / "genre.json").read_text())
    assert (student_dir / "student" / "genre.npz").exists()
    assert card["attribute"] == "genre" and card["attribute_version"] == GENRE.version
    assert card["spec_version"] == load_spec(GENRE_SPEC).version
    assert card["teacher"].startswith("embedding:") and set(card["labels"]) <= set(GENRE.labels)
    r = card["report"]
    assert r["train_rows"] + r["heldout_rows"] == 300 and r["heldout_rows"] >= 50
    # the student must beat always answering the teacher's most common label
    assert r["agreement"]["accuracy"] > max(r["teacher_label_share"].values())
    assert 0 < r["agreement"]["kappa"] <= 1 and 0 < r["agreement"]["macro_f1"] <= 1
    tp = r["throughput_rows_per_second"]
    assert tp["student"] > 0 and tp["teacher"] > 0
    assert r["speedup_vs_teacher"] == pytest.approx(tp["student"] / tp["teacher"], rel=0.01)


@pytest.fixture(scope="module")
def student(student_dir):
    engine = build_engine({"type": "student", "path": str(student_dir / "student")})
    yield engine
    engine.close()


def test_student_engine_labels_texts(student):
    texts = ["Alien (1979) Tags: space, monster", "Toy Story (1995) Tags: pixar"]
    out = student.classify(texts, GENRE)
    assert len(out.labels) == 2 and set(out.labels) <= set(GENRE.labels)
    assert all(1 / len(GENRE.labels) < c <= 1 for c in out.confidences)
    assert student.model_name == "student:genre:embedding:all-MiniLM-L6-v2-onnx"
    assert model_name({"type": "student", "path": student.path}) == student.model_name


def test_student_engine_through_the_annotator(student, spec):
    texts = pd.Series(["Heat (1995)", None, "Casablanca (1942) Tags: classic", "Heat (1995)"])
    out = annotate_texts(student, GENRE, texts)
    assert out["error"].notna().tolist() == [False, True, False, False]
    assert out.loc[[0, 2, 3], "label"].isin(GENRE.labels).all()
    assert out.loc[0, "label"] == out.loc[3, "label"]
    # an attribute the student never learned: every row gets the error, nothing crashes
    vibe = annotate_texts(student, spec.attribute("vibe"), texts)
    assert vibe["label"].isna().all()
    assert vibe["error"].dropna().str.contains("no student for attribute 'vibe'").sum() == 3
    # a changed definition makes the student stale
    changed = dataclasses.replace(GENRE, definitions=("x",) * len(GENRE.labels))
    stale = annotate_texts(student, changed, texts)
    assert stale["error"].dropna().str.contains("distill it again").sum() == 3
    # captions fall back to the descriptor captions of the embedding encoder
    captions = caption_texts(student, spec.caption, texts)
    assert captions["caption"].iloc[0] and captions["error"].iloc[0] is None


def test_student_engine_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no distilled student"):
        build_engine({"type": "student", "path": str(tmp_path)})
