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
