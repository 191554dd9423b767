import numpy as np
import pytest
from sklearn import metrics as skm

from vitad_ray.evaluation.metrics import (auroc, choose_threshold, confusion_metrics,
                                          evaluate_scores, pr_auc, to_csv, to_markdown)
from vitad_ray.pipeline.score import majority_anomalous, vote_score


def test_confusion_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    pred = rng.integers(0, 2, 500)
    m = confusion_metrics(y, pred)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["fpr"] == pytest.approx(fp / (fp + tn))


def test_chosen_threshold_is_the_best_by_brute_force():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y * 0.8, 1.0), 2)  # ties included
    t = choose_threshold(y, s, "balanced_accuracy")
    best = max(skm.balanced_accuracy_score(y, s >= c) for c in np.unique(s))
    assert skm.balanced_accuracy_score(y, s >= t) == pytest.approx(best)
    t2 = choose_threshold(y, s, "f2")
    best_f2 = max(skm.fbeta_score(y, s >= c, beta=2) for c in np.unique(s))
    assert skm.fbeta_score(y, s >= t2, beta=2) == pytest.approx(best_f2)


def test_flag_nothing_threshold_stays_finite():
    y = np.array([0, 0, 0, 1])
    s = np.array([1.0, 1.0, 1.0, 0.5])  # any cut flags more normals than anomalies
    t = choose_threshold(y, s)
    assert np.isfinite(t) and not (s >= t).any()


def test_auroc_and_pr_auc_match_scikit_learn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    s = rng.normal(y, 1.0)
    assert auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert pr_auc(y, s) == pytest.approx(skm.average_precision_score(y, s))
    assert np.isnan(auroc(np.zeros(5), s[:5]))


def test_vote_score_threshold_equals_majority_vote():
    rng = np.random.default_rng(3)
    for p in (256, 7, 1024):
        conf = np.minimum(1.0, rng.exponential(0.6, (300, p)))
        score = vote_score(conf)
        for t in (0.2, 0.5, 0.9, 1.0):
            n_anom = (conf >= t).sum(axis=1)
            np.testing.assert_array_equal(score >= t, majority_anomalous(n_anom, p))


def test_majority_vote_ties_count_as_anomalous():
    assert majority_anomalous(np.array([128, 127, 129]), 256).tolist() == [True, False, True]


def test_evaluation_modes_and_tables():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 100)
    s = rng.normal(y * 2, 1.0)
    ev = evaluate_scores("bk / k-Means / global", y[50:], s[50:], y_calib=y[:50], s_calib=s[:50])
    assert "held-out" in ev.threshold_source
    assert ev.metrics["balanced_accuracy"] > 0.7
    paper = evaluate_scores("bk / k-Means / global", y, s, mode="paper")
    assert "evaluated set" in paper.threshold_source
    md = to_markdown([ev, paper])
    assert md.count("\n") == 4 and "balanced_accuracy" in md and "auroc" in md
    assert to_csv([ev]).splitlines()[0].startswith("configuration,threshold,precision,recall")
    with pytest.raises(ValueError):
        evaluate_scores("x", y, s)


def test_threshold_sits_in_the_middle_of_the_best_gap():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 5.0, 7.0])  # any cut in (0.3, 5.0] separates perfectly
    assert choose_threshold(y, s) == pytest.approx(2.65)
    y = np.array([1, 1, 1])
    s = np.array([0.5, 0.7, 0.9])
    assert (s >= choose_threshold(y, s)).all()
