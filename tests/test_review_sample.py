"""Stratified review samples: allocation, weights, and the accuracy estimate they support."""
import numpy as np
import pandas as pd
import pytest

from quality.sampling import allocate, estimate, stratified_sample
from spark_jobs import review_sample
from spark_jobs.evaluate import MOVIELENS_LABEL_MAP, movielens_genre_items, truth_sets
from tests.conftest import ROOT
from udfs.spec import load_spec

RATINGS = ROOT / "data" / "movielens" / "ratings.csv"
GENRE = load_spec(ROOT / "specs" / "movielens_genre.yaml").attribute("genre")


def test_allocation_covers_every_stratum_then_goes_proportional():
    sizes = pd.Series({"big": 900, "mid": 90, "rare": 3, "single": 1})
    alloc = allocate(sizes, 100, minimum=5)
    assert alloc.sum() == 100
    assert alloc["single"] == 1 and alloc["rare"] == 3  # never more than the stratum holds
    # beyond the minimum, rows follow the room left in each stratum (895 : 85)
    assert (alloc["big"] - 5) / (alloc["mid"] - 5) == pytest.approx(895 / 85, rel=0.15)
    assert (allocate(sizes, 10_000) == sizes).all()  # asking for more than exists: everything
    with pytest.raises(ValueError, match="at least"):
        allocate(sizes, 8, minimum=5)


def synthetic_population(seed: int = 0) -> tuple[pd.DataFrame, float]:
    """Strata of very different size and accuracy; the true accuracy is known exactly."""
    rng = np.random.default_rng(seed)
    spec = [("A|high", 12_000, 0.95), ("A|low", 800, 0.40), ("B|high", 5_000, 0.85),
            ("B|low", 300, 0.20), ("C|mid", 150, 0.50)]
    parts = [pd.DataFrame({"stratum": s, "predicted_label": s[0],
                           "correct": rng.random(n) < p}) for s, n, p in spec]
    pop = pd.concat(parts, ignore_index=True)
    return pop, float(pop["correct"].mean())


def test_estimate_covers_the_true_accuracy_and_beats_the_unweighted_mean():
    pop, truth = synthetic_population()
    per_label_truth = pop.groupby("predicted_label")["correct"].mean()
    covered, err_weighted, err_naive = 0, [], []
    label_covered = dict.fromkeys("ABC", 0)
    runs = 200
    for seed in range(runs):
        sample = stratified_sample(pop, pop["stratum"], 300, minimum=40, seed=seed)
        est = estimate(sample)
        o = est["overall"]
        covered += o["ci_low"] <= truth <= o["ci_high"]
        for lab in label_covered:
            label_covered[lab] += (est["per_label"][lab]["ci_low"] <= per_label_truth[lab]
                                   <= est["per_label"][lab]["ci_high"])
        err_weighted.append(abs(o["accuracy"] - truth))
        err_naive.append(abs(sample["correct"].mean() - truth))
    assert covered / runs >= 0.9
    assert all(n / runs >= 0.9 for n in label_covered.values()), label_covered
    # over-sampled low-accuracy strata drag the plain mean down; the weights undo it
    assert np.mean(err_weighted) < 0.3 * np.mean(err_naive)
    assert est["overall"]["population"] == len(pop)


def test_estimate_works_on_a_partly_reviewed_sheet():
    pop, truth = synthetic_population(1)
    sample = stratified_sample(pop, pop["stratum"], 400, minimum=40, seed=0)
    sample["correct"] = sample["correct"].astype(object)
    sample.loc[sample.index[::4], "correct"] = None  # the reviewer skipped a quarter
    out = estimate(sample)["overall"]
    assert out["reviewed"] == 300 and out["population"] == len(pop)
    assert out["ci_low"] <= truth <= out["ci_high"]
    with pytest.raises(ValueError, match="lack columns"):
        estimate(sample.drop(columns=["stratum"]))


@pytest.fixture(scope="module")
def annotated(embedding_engine, tmp_path_factory):
    """300 MovieLens items labelled with the genre attribute by the embedded engine."""
    from udfs.annotator import annotate_texts, clean_columns

    items = movielens_genre_items(limit=300)
    out = annotate_texts(embedding_engine, GENRE,
                         clean_columns([items["title"], items["tags"]]))
    table = pd.DataFrame({"item_id": items["item_id"], "genre_label": out["label"],
                          "genre_confidence": out["confidence"], "error": out["error"]})
    table.loc[7, ["genre_label", "genre_confidence", "error"]] = [None, None, "engine failed"]
    path = tmp_path_factory.mktemp("review") / "annotations.parquet"
    table.to_parquet(path, index=False)
    items.to_parquet(path.with_name("items.parquet"), index=False)
    return path, table, items


def test_review_sample_command(annotated, tmp_path):
    path, table, items = annotated
    out = tmp_path / "sample.csv"
    argv = ["--annotations", str(path), "--attribute", "genre", "--size", "220",
            "--popularity", str(RATINGS), "--items", str(path.with_name("items.parquet")),
            "--out", str(out)]
    assert review_sample.main(argv) == 0
    sample = pd.read_csv(out)
    population, strata = review_sample.build_strata(
        table, "genre", review_sample.rating_counts(pd.read_csv(RATINGS)))
    assert len(population) == 299  # the row with an error is not reviewable
    assert len(sample) == 220 and sample["item_id"].is_unique
    assert set(sample["stratum"]) == set(strata)  # every stratum is represented
    assert sample["weight"].sum() == pytest.approx(len(population))
    by_stratum = sample.groupby("stratum")["weight"].sum()
    assert np.allclose(by_stratum, strata.value_counts()[by_stratum.index])
    assert set(sample["confidence_band"]) == {"low", "mid", "high"}
    assert set(sample["popularity_band"]) == {"tail", "torso", "head"}
    assert {"title", "correct"} <= set(sample.columns)
    # the same seed draws the same sheet
    assert review_sample.main(argv[:-1] + [str(tmp_path / "again.csv")]) == 0
    assert pd.read_csv(tmp_path / "again.csv")["item_id"].tolist() == sample["item_id"].tolist()

    # Review it with the human genres as the verdict: the estimate must cover the hit rate
    # of the whole population, which is known here.
    genres = truth_sets(items.set_index("item_id")["genres"], GENRE.labels, MOVIELENS_LABEL_MAP)
    hit = np.array([p in genres[i] for p, i in zip(population["predicted_label"],
                                                   population["item_id"])])
    sample["correct"] = [p in genres[i] for p, i in zip(sample["predicted_label"],
                                                       sample["item_id"])]
    result = estimate(sample)["overall"]
    assert result["population"] == len(population)
    assert result["ci_low"] <= hit.mean() <= result["ci_high"]


def test_review_sample_rejects_bad_input(annotated, tmp_path, capsys):
    path, _, _ = annotated
    base = ["--annotations", str(path), "--out", str(tmp_path / "s.csv")]
    assert review_sample.main(base + ["--attribute", "mood", "--size", "50"]) == 2
    assert "lack columns" in capsys.readouterr().err
    assert review_sample.main(base + ["--attribute", "genre", "--size", "3"]) == 2
    assert "ask for at least" in capsys.readouterr().err
