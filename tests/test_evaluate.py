"""spark_jobs.evaluate: scoring annotations against human labels, end to end."""
import json

import numpy as np
import pandas as pd
import pytest

from spark_jobs import evaluate
from tests.conftest import ROOT

SPEC = str(ROOT / "specs" / "movielens_genre.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_movielens_items_never_show_the_genres():
    items = evaluate.movielens_genre_items(limit=400)
    assert len(items) == 400 and items["item_id"].is_unique
    assert items["tags"].notna().sum() > 50  # tags exist for a good share of early movies
    for col in ("title", "tags"):
        text = items[col].dropna()
        assert not any(g in t for t, g in zip(text, items.loc[text.index, "genres"])
                       if "|" in g)  # a multi-genre string would only come from movies.csv
    assert items["tags"].dropna().str.count(",").max() < evaluate.MAX_TAGS


@pytest.fixture(scope="module")
def movielens_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "genre"
    code = evaluate.main(["--spec", SPEC, "--attribute", "genre", "--movielens",
                          "--limit", "250", "--out", str(out)])
    assert code == 0
    return out


def test_annotate_then_evaluate_writes_metrics_and_plots(movielens_run):
    out = movielens_run
    m = json.loads((out / "metrics.json").read_text())
    s, h = m["strict"], m["hit"]
    assert m["items"] + m["annotation_errors"] == 250 == m["annotations"]
    assert h["n"] + m["items_without_truth"] == m["items"]
    assert 0 < s["n"] < h["n"]
    cm = np.asarray(json.loads((out / "confusion_matrix.json").read_text())["counts"])
    assert cm.shape == (14, 14) and cm.sum() == s["n"]
    assert sum(v["support"] for v in s["per_label"].values()) == s["n"]
    assert s["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    for value in (s["accuracy"], s["macro_f1"], s["ece"], h["hit_rate"], h["ece"]):
        assert 0 <= value <= 1
    assert -1 <= s["kappa"] <= 1
    assert sum(s["reliability"]["count"]) == s["n"] and len(s["reliability"]["count"]) == 10
    # a hit needs only one of several genres to match: never below strict accuracy's share
    assert h["hit_rate"] * h["n"] >= s["accuracy"] * s["n"]
    assert m["annotation_run"]["model"].startswith("embedding:")
    assert m["label_map"]["Children"] == "Animation"
    for png in ("confusion_matrix.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC and (out / png).stat().st_size > 5000
    annotations = pd.read_parquet(out / "annotations.parquet")
    assert len(annotations) == 250 and annotations["genre_label"].notna().all()


def test_evaluate_existing_annotations_by_hand(tmp_path):
    truth = pd.DataFrame({"item_id": [1, 2, 3, 4, 5, 6],
                          "labels": ["Drama", "Comedy|Romance", "Children", "IMAX", "Horror",
                                     None]})
    annotations = pd.DataFrame({
        "item_id": [1, 2, 3, 4, 5, 6, 7],
        "genre_label": ["Drama", "Romance", "Animation", "Drama", None, "Drama", "Drama"],
        "genre_confidence": [0.9, 0.6, 0.7, 0.5, None, 0.4, 0.3],
        "error": [None, None, None, None, "engine failed", None, None]})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    annotations.to_parquet(tmp_path / "ann.parquet", index=False)
    code = evaluate.main(["--spec", SPEC, "--attribute", "genre",
                          "--annotations", str(tmp_path / "ann.parquet"),
                          "--truth", str(tmp_path / "truth.csv"),
                          "--label-map", "Children=Animation", "--out", str(tmp_path / "o")])
    assert code == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["annotation_errors"] == 1 and m["items_without_human_row"] == 1  # items 5 and 7
    # items 1 (Drama) and 3 (Children -> Animation) have one spec label and are right;
    # item 2 is a hit (Romance is one of two); items 4 (IMAX only) and 6 have no truth
    assert m["strict"]["n"] == 2 and m["strict"]["accuracy"] == 1.0
    assert m["strict"]["kappa"] == 1.0 and m["strict"]["macro_f1"] == 1.0
    assert m["hit"]["n"] == 3 and m["hit"]["hit_rate"] == 1.0
    # strict calibration: confidences 0.9 and 0.7, both right -> ECE = (0.1 + 0.3) / 2
    assert m["strict"]["ece"] == pytest.approx(0.2)
    assert m["items_without_truth"] == 2


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    base = ["--spec", SPEC, "--out", str(tmp_path / "o")]
    assert evaluate.main(base + ["--attribute", "mood", "--movielens", "--limit", "5"]) == 2
    assert "unknown attribute" in capsys.readouterr().err
    assert evaluate.main(base + ["--attribute", "genre", "--annotations", "nope.parquet",
                                 "--truth", "t.csv"]) == 2
    assert "not found" in capsys.readouterr().err
    assert evaluate.main(base + ["--attribute", "genre", "--movielens", "--limit", "5",
                                 "--label-map", "Noir=Gloom"]) == 2
    assert "not labels of the attribute" in capsys.readouterr().err
