"""Confusion metrics at a threshold, threshold selection, AUROC / PR AUC and the paper's table.

Convention everywhere: a score at or above the threshold is anomalous (the positive class).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

import numpy as np

METRIC_COLUMNS = ("threshold", "precision", "recall", "fpr", "specificity", "f1",
                  "balanced_accuracy")
CRITERIA = ("balanced_accuracy", "f2")


def confusion_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    y_true = np.asarray(y_true).astype(bool)
    y_pred = np.asarray(y_pred).astype(bool)
    tp = int((y_true & y_pred).sum())
    fp = int((~y_true & y_pred).sum())
    tn = int((~y_true & ~y_pred).sum())
    fn = int((y_true & ~y_pred).sum())

    def ratio(a, b):
        return a / b if b else 0.0

    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn)
    specificity = ratio(tn, tn + fp)
    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": precision,
        "recall": recall,
        "fpr": ratio(fp, fp + tn),
        "specificity": specificity,
        "f1": ratio(2 * precision * recall, precision + recall),
        "balanced_accuracy": (recall + specificity) / 2,
    }


def _sweep(y_true: np.ndarray, scores: np.ndarray):
    """Every distinct threshold (plus one above all scores) with its tp, fp, tn, fn."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, np.float64)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # Cut after the last occurrence of each distinct value: predicted positive = s >= value.
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s_sorted) - 1]
    tp = np.cumsum(y_sorted)[last]
    fp = np.cumsum(~y_sorted)[last]
    thresholds = np.r_[np.inf, s_sorted[last]]
    tp = np.r_[0, tp]
    fp = np.r_[0, fp]
    pos, neg = y.sum(), (~y).sum()
    return thresholds, tp, fp, neg - fp, pos - tp


def choose_threshold(y_true: np.ndarray, scores: np.ndarray,
                     criterion: str = "balanced_accuracy") -> float:
    """The threshold maximising the criterion (balanced accuracy, or F2 which weights recall),
    in the middle of the score gap over which the maximum holds."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}")
    thresholds, tp, fp, tn, fn = _sweep(y_true, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        if criterion == "balanced_accuracy":
            spec = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), 0.0)
            value = (recall + spec) / 2
        else:
            precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
            value = np.where(precision + recall > 0,
                             5 * precision * recall / np.maximum(4 * precision + recall, 1e-12), 0.0)
    # Every cut of the run of cuts that reach the maximum gives the same value on these scores;
    # the middle of the gap it spans keeps the widest margin on both sides for unseen clips.
    first = int(np.argmax(value))
    last = first
    while last + 1 < len(value) and value[last + 1] == value[first]:
        last += 1
    if first == 0 and last == 0:  # "flag nothing": just above every score, kept finite
        return float(np.nextafter(np.max(np.asarray(scores, np.float64)), np.inf))
    first = max(first, 1)
    if last + 1 >= len(thresholds):  # the run reaches "flag everything"
        return float(thresholds[last])
    return float((thresholds[first] + thresholds[last + 1]) / 2)


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(int)
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, np.nan_to_num(np.asarray(scores, np.float64), posinf=1e300)))


def pr_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    y = np.asarray(y_true).astype(int)
    if y.min() == y.max():
        return float("nan")
    return float(average_precision_score(y, np.nan_to_num(np.asarray(scores, np.float64),
                                                          posinf=1e300)))


@dataclass
class Evaluation:
    name: str  # e.g. "dinov2-s14 | k-Means | local"
    threshold: float
    threshold_source: str
    metrics: dict
    auroc: float
    pr_auc: float
    n: int


def evaluate_scores(name: str, y_eval: np.ndarray, s_eval: np.ndarray, *,
                    y_calib: np.ndarray | None = None, s_calib: np.ndarray | None = None,
                    mode: str = "calibrated", threshold: float | None = None,
                    source: str = "") -> Evaluation:
    """Metrics on the evaluated frames at a threshold chosen on calibration frames ("calibrated",
    the honest default), on the evaluated frames themselves, recall-weighted ("paper"), or
    given ("fixed": ``threshold``, e.g. the label-free one a fit set)."""
    if mode == "fixed":
        if threshold is None:
            raise ValueError("a fixed threshold needs a threshold")
        t = float(threshold)
        source = source or "given"
    elif mode == "calibrated":
        if y_calib is None or s_calib is None:
            raise ValueError("calibrated thresholds need calibration frames")
        t = choose_threshold(y_calib, s_calib, "balanced_accuracy")
        source = "calibrated on held-out clips (max balanced accuracy)"
    elif mode == "paper":
        t = choose_threshold(y_eval, s_eval, "f2")
        source = "chosen on the evaluated set (max F2), as the paper did"
    elif mode != "fixed":
        raise ValueError("mode must be 'calibrated', 'paper' or 'fixed'")
    pred = np.asarray(s_eval) >= t
    return Evaluation(name, t, source, confusion_metrics(y_eval, pred), auroc(y_eval, s_eval),
                      pr_auc(y_eval, s_eval), len(y_eval))


def _fmt(x: float) -> str:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def table_rows(evaluations: list[Evaluation]) -> list[dict]:
    rows = []
    for ev in evaluations:
        row = {"configuration": ev.name, "threshold": ev.threshold}
        row.update({k: ev.metrics[k] for k in METRIC_COLUMNS[1:]})
        row.update({"auroc": ev.auroc, "pr_auc": ev.pr_auc, "frames": ev.n})
        rows.append(row)
    return rows


def to_markdown(evaluations: list[Evaluation]) -> str:
    rows = table_rows(evaluations)
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[h]) for h in head) + " |")
    return "\n".join(lines) + "\n"


def to_csv(evaluations: list[Evaluation]) -> str:
    rows = table_rows(evaluations)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()
