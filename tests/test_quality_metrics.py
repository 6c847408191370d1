"""quality.metrics against scikit-learn on random data and on cases checkable by hand."""
import numpy as np
import pytest
from sklearn import metrics as sk

from quality import metrics

LABELS = ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    # skewed truth, noisy predictions, and label "e" never predicted: the zero-division paths
    y_true = rng.choice(LABELS, size=500, p=[0.5, 0.2, 0.15, 0.1, 0.05]).tolist()
    y_pred = [t if rng.random() < 0.6 else rng.choice(LABELS[:4]) for t in y_true]
    cm = metrics.confusion_matrix(y_true, y_pred, LABELS)
    np.testing.assert_array_equal(cm, sk.confusion_matrix(y_true, y_pred, labels=LABELS))
    assert metrics.accuracy(cm) == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert metrics.macro_f1(cm) == pytest.approx(
        sk.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert metrics.cohen_kappa(cm) == pytest.approx(sk.cohen_kappa_score(y_true, y_pred))
    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=LABELS,
                                                    zero_division=0)
    ours = metrics.per_label(cm)
    for mine, theirs in zip((ours["precision"], ours["recall"], ours["f1"], ours["support"]),
                            (p, r, f, s)):
        np.testing.assert_allclose(mine, theirs)


def test_hand_checked_case():
    out = metrics.report(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b", "c"])
    assert out["accuracy"] == 0.75
    assert out["per_label"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                                     "support": 2}
    assert out["per_label"]["b"]["precision"] == pytest.approx(2 / 3)
    assert out["per_label"]["b"]["f1"] == pytest.approx(0.8)
    assert out["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # "c" never occurs, so the macro average is over a and b only (sklearn's convention)
    assert out["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    # p_o = 0.75, p_e = (1*2 + 3*2) / 16 = 0.5
    assert out["kappa"] == pytest.approx(0.5)
    assert out["confusion_matrix"]["counts"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_expected_calibration_error_by_hand():
    conf = [0.95, 0.95, 0.15, 0.15, 0.1, 0.0]
    correct = [True, False, False, False, True, True]
    table = metrics.reliability(conf, correct, n_bins=10)
    # bins are (lo, hi]: 0.1 and 0.0 both land in the first bin
    assert table["count"] == [2, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table["accuracy"][0] == 1.0 and table["confidence"][0] == pytest.approx(0.05)
    # 2/6 * |1 - 0.05| + 2/6 * |0 - 0.15| + 2/6 * |0.5 - 0.95|
    assert metrics.expected_calibration_error(conf, correct) == pytest.approx(
        (0.95 + 0.15 + 0.45) / 3)


def test_calibrated_confidences_have_small_ece():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 100_000)
    assert metrics.expected_calibration_error(conf, rng.random(100_000) < conf) < 0.01
    assert metrics.expected_calibration_error(conf, np.ones_like(conf, bool)) == pytest.approx(
        1 - conf.mean(), abs=0.01)


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="not in the label list"):
        metrics.confusion_matrix(["a"], ["z"], ["a", "b"])
    with pytest.raises(ValueError, match="same length|predictions"):
        metrics.confusion_matrix(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.reliability([1.5], [True])


def test_score_against_multi_label_truth():
    truth = [frozenset({"a"}), frozenset({"a", "b"}), frozenset(), frozenset({"b"})]
    out = metrics.score_against_truth(["a", "b", "a", "a"], [0.9, 0.6, 0.5, 0.8], truth,
                                      ["a", "b"])
    assert out["items"] == 4 and out["items_without_truth"] == 1
    assert out["strict"]["n"] == 2 and out["strict"]["accuracy"] == 0.5
    assert out["strict"]["majority_baseline"] == 0.5
    assert out["hit"]["n"] == 3 and out["hit"]["hit_rate"] == pytest.approx(2 / 3)
    # strict: 0.9 right and 0.8 wrong fall in two bins, each off by its confidence gap
    assert out["strict"]["ece"] == pytest.approx((0.1 + 0.8) / 2)


# ---- multi-label ----

ML_LABELS = ("a", "b", "c", "d")


def multi_attribute(min_labels=0, max_labels=4, threshold=0.5):
    from udfs.spec import Attribute
    return Attribute(name="g", labels=ML_LABELS, definitions=("w", "x", "y", "z"),
                     kind="multi", min_labels=min_labels, max_labels=max_labels,
                     threshold=threshold)


def test_multilabel_hand_checked_case():
    truth = metrics.indicator([{"a", "b"}, {"b"}, {"c"}, {"a"}], ML_LABELS)
    pred = metrics.indicator([{"a"}, {"b", "c"}, {"c"}, set()], ML_LABELS)
    scores = np.array([[0.9, 0.6, 0.5, 0.0],
                       [0.2, 0.6, 0.5, 0.0],
                       [0.2, 0.1, 0.5, 0.0],
                       [0.4, 0.3, 0.1, 0.0]])
    out = metrics.multilabel_report(truth, pred, scores, ML_LABELS)
    # true positives a 1, b 1, c 1; predicted a 1, b 1, c 2; support a 2, b 2, c 1
    pl = out["per_label"]
    assert (pl["a"]["precision"], pl["a"]["recall"]) == (1.0, 0.5)
    assert (pl["c"]["precision"], pl["c"]["recall"]) == (0.5, 1.0)
    assert pl["c"]["predicted"] == 2 and pl["c"]["support"] == 1
    assert pl["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0,
                       "predicted": 0, "auc": None}  # never true: no AUC
    # micro: 3 of 4 predicted right, 3 of 5 true found
    assert out["micro_precision"] == 0.75 and out["micro_recall"] == 0.6
    assert out["micro_f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    # every label's F1 is 2/3; d never occurs, so the macro mean is over a, b, c
    assert out["macro_f1"] == pytest.approx(2 / 3)
    # Jaccard per item: 1/2, 1/2, 1, 0
    assert out["jaccard"] == pytest.approx(0.5)
    assert out["exact_match"] == 0.25
    assert out["mean_labels"] == 1.0 and out["mean_true_labels"] == 1.25
    # AUC: a and b separate perfectly; c's positive (0.5) ties two negatives, beats one
    assert pl["a"]["auc"] == 1.0 and pl["b"]["auc"] == 1.0
    assert pl["c"]["auc"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert out["auc_labels"] == 3 and out["macro_auc"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert sum(out["reliability"]["count"]) == 16
    assert out["brier"] == pytest.approx(float(np.mean((scores - truth) ** 2)))


def test_multilabel_calibration_by_hand():
    truth = np.array([[True, False], [False, False]])
    scores = np.array([[0.9, 0.1], [0.1, 0.3]])
    out = metrics.multilabel_report(truth, truth, scores, ("a", "b"))
    # pairs by bin: (0.0, 0.1]: 0.1, 0.1 both false -> gap 0.1; (0.2, 0.3]: 0.3 false -> 0.3;
    # (0.8, 0.9]: 0.9 true -> 0.1
    assert out["reliability"]["count"][0] == 2
    assert out["ece"] == pytest.approx((2 * 0.1 + 0.3 + 0.1) / 4)
    assert out["micro_f1"] == 1.0 and out["jaccard"] == 1.0  # the second item: both empty


@pytest.mark.parametrize("seed", range(3))
def test_multilabel_matches_sklearn_on_random_sets(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random((300, 4)) < [0.5, 0.3, 0.1, 0.05]
    truth[truth.sum(axis=1) == 0, 0] = True  # no empty truth: Jaccard is then unambiguous
    scores = np.clip(truth * 0.3 + rng.random((300, 4)) * 0.7, 0, 1)
    pred = scores > 0.5
    out = metrics.multilabel_report(truth, pred, scores, ML_LABELS)
    assert out["micro_f1"] == pytest.approx(sk.f1_score(truth, pred, average="micro",
                                                         zero_division=0))
    assert out["macro_f1"] == pytest.approx(sk.f1_score(truth, pred, average="macro",
                                                        zero_division=0))
    assert out["jaccard"] == pytest.approx(sk.jaccard_score(truth, pred, average="samples"))
    assert out["exact_match"] == pytest.approx(sk.accuracy_score(truth, pred))
    for j, lab in enumerate(ML_LABELS):
        assert out["per_label"][lab]["auc"] == pytest.approx(
            sk.roc_auc_score(truth[:, j], scores[:, j]))


def test_majority_baseline_by_hand():
    train = metrics.indicator([{"a", "b"}, {"a"}, {"a", "c"}, {"b"}], ML_LABELS)
    freq = metrics.label_frequencies(train)
    np.testing.assert_allclose(freq, [0.75, 0.5, 0.25, 0.0])
    # "more than half": a only; b's exactly one half is not a majority
    assert metrics.majority_sets(freq, 2).tolist() == [[True, False, False, False]] * 2
    assert metrics.majority_sets(freq, 1, min_labels=2)[0].tolist() == [True, True, False, False]
    # nothing over half: the empty set, or the min_labels most frequent
    low = [0.3, 0.4, 0.1, 0.0]
    assert not metrics.majority_sets(low, 3).any()
    assert metrics.majority_sets(low, 1, min_labels=1)[0].tolist() == [False, True, False, False]
    assert metrics.majority_sets(freq, 1, min_labels=0, max_labels=0)[0].sum() == 0


def test_multilabel_baselines_fit_on_training_items():
    train = metrics.indicator([{"a", "b"}, {"a"}, {"a", "c"}, {"b"}], ML_LABELS)
    held_out = metrics.indicator([{"a"}, {"b", "c"}], ML_LABELS)
    out = metrics.multilabel_baselines(train, held_out, multi_attribute())
    assert out["train_items"] == 4 and out["frequencies"]["a"] == 0.75
    maj = out["majority"]
    assert maj["labels"] == ["a"] and "macro_auc" not in maj  # constant sets, no scores
    assert maj["jaccard"] == pytest.approx((1 + 0) / 2)
    # label frequency: scored 0.75, 0.5, 0.25, 0 for every item, chosen by the attribute's
    # rule (at or over its threshold 0.5): a and b
    freq = out["label_frequency"]
    assert freq["labels"] == ["a", "b"]
    assert freq["jaccard"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    for lab in ("a", "b", "c"):  # a constant score ranks nothing: AUC one half
        assert freq["per_label"][lab]["auc"] == 0.5
    assert freq["per_label"]["d"]["auc"] is None  # d is never true in the held-out items
    # with min_labels 3 the attribute's rule tops the set up with the next most frequent
    assert metrics.multilabel_baselines(train, held_out, multi_attribute(min_labels=3))[
        "label_frequency"]["labels"] == ["a", "b", "c"]
    # and a threshold over every frequency leaves its min_labels most frequent
    assert metrics.multilabel_baselines(train, held_out, multi_attribute(1, 4, 0.9))[
        "label_frequency"]["labels"] == ["a"]


def test_multilabel_bad_input():
    with pytest.raises(ValueError, match="not in the label list"):
        metrics.indicator([{"a", "zz"}], ML_LABELS)
    with pytest.raises(ValueError, match="shape"):
        metrics.multilabel_report(np.zeros((2, 4), bool), np.zeros((3, 4), bool), None,
                                  ML_LABELS)
