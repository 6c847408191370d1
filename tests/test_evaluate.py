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


# ---- the multi-label genres attribute ----

def genre_vector(**scores) -> list[float]:
    from udfs.spec import load_spec
    labels = load_spec(SPEC).attribute("genres").labels
    return [scores.get(lab.replace("-", "_"), 0.1) for lab in labels]


def test_evaluate_multi_label_annotations_by_hand(tmp_path, capsys):
    truth = pd.DataFrame({
        "item_id": [1, 2, 3, 4, 5, 10, 11, 12, 13],
        "labels": ["Comedy|Romance", "Drama", "IMAX", "Adventure|Children", "Horror",
                   "Drama|Comedy", "Drama", "Drama|Romance", "(no genres listed)"]})
    annotations = pd.DataFrame({
        "item_id": [1, 2, 3, 4, 5, 6],
        "genres_labels": [["Comedy"], ["Drama", "Thriller"], ["Drama"],
                          ["Adventure", "Children"], None, ["Drama"]],
        "genres_scores": [genre_vector(Comedy=0.9, Romance=0.4),
                          genre_vector(Drama=0.8, Thriller=0.6),
                          genre_vector(Drama=0.7),
                          genre_vector(Adventure=0.6, Children=0.9), None,
                          genre_vector(Drama=0.9)],
        "error": [None, None, None, None, "engine failed", None]})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    annotations.to_parquet(tmp_path / "ann.parquet", index=False)
    out = tmp_path / "o"
    code = evaluate.main(["--spec", SPEC, "--attribute", "genres",
                          "--annotations", str(tmp_path / "ann.parquet"),
                          "--truth", str(tmp_path / "truth.csv"), "--out", str(out)])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "multi" and m["label_map"] == {}
    # item 5 failed, item 6 has no human row, item 3's only genre (IMAX) is no label
    assert m["annotation_errors"] == 1 and m["items_without_human_row"] == 1
    assert m["items"] == 4 and m["items_without_truth"] == 1
    s = m["multi"]
    assert s["n"] == 3
    # per item: {Comedy} of {Comedy, Romance}, {Drama, Thriller} of {Drama}, both of
    # {Adventure, Children}: Jaccard 1/2, 1/2, 1; 4 right of 5 chosen and of 5 true
    assert s["jaccard"] == pytest.approx(2 / 3)
    assert s["micro_precision"] == pytest.approx(0.8) and s["micro_recall"] == pytest.approx(0.8)
    assert s["per_label"]["Romance"]["recall"] == 0.0
    assert s["per_label"]["Adventure"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0,
                                           "support": 1, "predicted": 1, "auc": 1.0}
    # Comedy's one positive scores 0.9 against two negatives at 0.1
    assert s["per_label"]["Comedy"]["auc"] == 1.0
    assert s["per_label"]["Western"]["auc"] is None  # never true here
    assert sum(s["reliability"]["count"]) == 3 * 18
    b = m["baselines"]
    # fitted on items 10-12 (13 has no genre): Drama 1, Comedy and Romance 1/3
    assert b["fit"] == "other items" and b["train_items"] == 3
    assert b["frequencies"]["Drama"] == 1.0 and b["frequencies"]["Comedy"] == pytest.approx(1 / 3)
    assert b["majority"]["labels"] == ["Drama"] == b["label_frequency"]["labels"]
    # {Drama} for every item: Jaccard 0, 1, 0; 1 right of 3 chosen, of 5 true
    assert b["majority"]["jaccard"] == pytest.approx(1 / 3)
    assert b["majority"]["micro_f1"] == pytest.approx(2 * (1 / 3) * (1 / 5) / (1 / 3 + 1 / 5))
    assert b["label_frequency"]["per_label"]["Comedy"]["auc"] == 0.5
    printed = capsys.readouterr().out
    assert "genres: multi n=3" in printed and "majority ['Drama']" in printed
    for png in ("per_label.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_multi_label_bad_annotations_exit_2(tmp_path, capsys):
    truth = pd.DataFrame({"item_id": [1], "labels": ["Drama"]})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    base = ["--spec", SPEC, "--attribute", "genres", "--truth", str(tmp_path / "truth.csv"),
            "--out", str(tmp_path / "o"), "--annotations", str(tmp_path / "ann.parquet")]
    pd.DataFrame({"item_id": [1], "genres_label": ["Drama"], "genres_confidence": [0.5]}) \
        .to_parquet(tmp_path / "ann.parquet")
    assert evaluate.main(base) == 2
    assert "genres_labels" in capsys.readouterr().err
    pd.DataFrame({"item_id": [1], "genres_labels": [["Drama"]], "genres_scores": [[0.5, 0.2]]}) \
        .to_parquet(tmp_path / "ann.parquet")
    assert evaluate.main(base) == 2
    assert "one probability per label" in capsys.readouterr().err
    pd.DataFrame({"item_id": [1], "genres_labels": [["Gloom"]],
                  "genres_scores": [genre_vector()]}).to_parquet(tmp_path / "ann.parquet")
    assert evaluate.main(base) == 2
    assert "not in the label list" in capsys.readouterr().err
    assert evaluate.main(["--spec", SPEC, "--attribute", "genres", "--movielens", "--limit",
                          "5", "--sample", "5", "--out", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
    assert evaluate.main(["--spec", SPEC, "--attribute", "genres", "--movielens", "--limit",
                          "5", "--engine", '{"type": "student", "path": "nowhere"}',
                          "--out", str(tmp_path / "o")]) == 2
    assert "cannot score multi-label attributes" in capsys.readouterr().err


def test_multi_label_genres_live_through_the_embedding_engine(tmp_path):
    """The real MiniLM engine tags 60 random MovieLens movies (title + tags) with every genre;
    scored against their human genres, none folded, baselines from the other movies."""
    from udfs.spec import load_spec
    attribute = load_spec(SPEC).attribute("genres")
    out = tmp_path / "genres"
    assert evaluate.main(["--spec", SPEC, "--attribute", "genres", "--movielens",
                          "--sample", "60", "--seed", "3", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["annotations"] == 60 and m["annotation_errors"] == 0
    assert m["annotation_run"]["model"].startswith("embedding:")
    assert m["label_map"] == {}  # every MovieLens genre but IMAX is a label
    s, b = m["multi"], m["baselines"]
    assert s["n"] + m["items_without_truth"] == 60 and s["n"] > 50
    assert set(s["per_label"]) == set(attribute.labels)
    assert sum(v["support"] for v in s["per_label"].values()) == pytest.approx(
        s["mean_true_labels"] * s["n"])
    assert s["mean_labels"] >= 1  # min_labels 1
    for value in (s["micro_f1"], s["macro_f1"], s["jaccard"], s["ece"], s["brier"]):
        assert 0 <= value <= 1
    assert all(v["auc"] is None or 0 <= v["auc"] <= 1 for v in s["per_label"].values())
    assert s["auc_labels"] >= 8 and 0 <= s["macro_auc"] <= 1
    # the baselines learn from the rest of the catalogue: no scored movie among them
    assert b["fit"] == "other items" and 9000 < b["train_items"] < 9742 - 60
    assert b["frequencies"]["Drama"] == max(b["frequencies"].values())
    assert b["majority"]["labels"] == ["Drama"]  # nothing is in half the movies; min_labels 1
    ann = pd.read_parquet(out / "annotations.parquet")
    items = pd.read_parquet(out / "items.parquet")
    assert len(ann) == 60 and ann["item_id"].tolist() == items["item_id"].tolist()
    for chosen, scores in zip(ann["genres_labels"], ann["genres_scores"]):
        assert len(scores) == len(attribute.labels)
        assert all(0 <= p <= 1 for p in scores)
        assert list(chosen) == attribute.choose(list(scores))  # spec order, the spec's rule
    for png in ("per_label.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC and (out / png).stat().st_size > 5000
