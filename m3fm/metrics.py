"""Evaluation metrics per task, with small-cell suppression.

AUC comes with a DeLong 95% confidence interval (DeLong et al. 1988, in the
fast midrank form of Sun & Xu 2014): the AUC's variance from its structural
components, no resampling. Multi-class tasks get one-vs-rest AUC per answer
and their mean; the two risk tasks get an AUC per horizon of 1..6 years
(censored patients count only for the years they were followed); every binary
view also gets calibration error and sensitivity/specificity at a threshold.

A group smaller than the site's minimum cell size shows SUPPRESSED, never a
number: a count, or a statistic over a handful of patients, says too much
about them. Positives and negatives are suppressed together, so neither can be
worked out from the total.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from m3fm.tasks import HAZARD_YEARS, YES_NO, Task

SUPPRESSED = "suppressed"


def delong(y: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """y: (N,) 0/1, score: (N,) -> (AUC, DeLong variance of the AUC). Needs both classes present."""
    from scipy.stats import rankdata  # here: scipy.stats costs every ClientApp process half a second

    y, score = np.asarray(y).astype(bool), np.asarray(score, dtype=np.float64)
    pos, neg = score[y], score[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        raise ValueError(f"AUC needs positives and negatives (got {m} and {n})")
    tz = rankdata(np.concatenate([pos, neg]))  # midranks over all: ties count one half
    tx, ty = rankdata(pos), rankdata(neg)
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:m] - tx) / n  # per positive: the share of negatives it outranks
    v01 = 1.0 - (tz[m:] - ty) / m  # per negative: the share of positives that outrank it
    var = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (np.var(v01, ddof=1) / n if n > 1 else 0.0)
    return float(auc), float(var)


def normal_ci(estimate: float, se: float, level: float = 0.95) -> tuple[float, float]:
    """The normal interval estimate +- z * se, clipped to [0, 1]."""
    from scipy.stats import norm

    half = norm.ppf(0.5 + level / 2) * se
    return float(max(0.0, estimate - half)), float(min(1.0, estimate + half))


def auc_ci(y: np.ndarray, score: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """-> (AUC, lower, upper): the DeLong normal interval, clipped to [0, 1]."""
    auc, var = delong(y, score)
    return auc, *normal_ci(auc, np.sqrt(var), level)


# A site whose scores separate its classes perfectly has DeLong variance 0; floored so that one site cannot take the
# whole weight of a meta-analysis (0.01 is about the standard error of one misranked pair among 10 x 10).
MIN_AUC_SE = 0.01


def pooled_auc(aucs: list[float], ses: list[float], level: float = 0.95) -> dict:
    """Fixed-effect inverse-variance meta-analysis of several sites' AUCs, each with its DeLong standard error:
    the across-site AUC and its CI from the aggregates the sites send (no score leaves a site). I2 (Higgins &
    Thompson 2002) is the share of the spread between sites beyond chance: where it is high, the sites' AUCs differ
    and the pooled AUC is their weighted average, not one shared value."""
    a, se = np.asarray(aucs, dtype=np.float64), np.maximum(np.asarray(ses, dtype=np.float64), MIN_AUC_SE)
    w = 1.0 / se**2
    auc = float((w * a).sum() / w.sum())
    q = float((w * (a - auc) ** 2).sum())
    i2 = max(0.0, (q - (len(a) - 1)) / q) if q > 0 else 0.0
    return {"auc": auc, "auc_ci": list(normal_ci(auc, 1.0 / np.sqrt(w.sum()), level)), "sites": len(a),
            "i2": float(i2)}


def calibration_error(y: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |mean predicted - observed rate| over equal-width bins, weighted by size."""
    y, prob = np.asarray(y, dtype=np.float64), np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    which = np.minimum((prob * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            err += inside.mean() * abs(prob[inside].mean() - y[inside].mean())
    return float(err)


def sensitivity_specificity(y: np.ndarray, prob: np.ndarray, threshold: float) -> tuple[float, float]:
    y, call = np.asarray(y).astype(bool), np.asarray(prob) >= threshold
    return float((call & y).sum() / y.sum()), float((~call & ~y).sum() / (~y).sum())


def shown(count: int, min_cell: int):
    """A count as it may be shown: itself, or SUPPRESSED under the minimum cell size (0 < count < min_cell)."""
    return int(count) if count == 0 or count >= min_cell else SUPPRESSED


def binary_metrics(y: np.ndarray, score: np.ndarray, min_cell: int, threshold: float = 0.5,
                   roc: bool = False) -> dict:
    """AUC with CI, calibration, sensitivity/specificity for one binary view; suppressed when either class
    has fewer than min_cell members. roc=True adds the ROC curve points (for the site's own report only)."""
    y = np.asarray(y).astype(bool)
    n, positives = len(y), int(y.sum())
    out = {"n": shown(n, min_cell)}
    if min(positives, n - positives) < min_cell:
        out["positives"] = SUPPRESSED if n >= min_cell and 0 < positives < n else shown(positives, min_cell)
        out.update({k: SUPPRESSED for k in ("auc", "auc_ci", "auc_se", "calibration_error", "sensitivity",
                                            "specificity")})
        return out
    auc, var = delong(y, score)
    lo, hi = normal_ci(auc, np.sqrt(var))
    sens, spec = sensitivity_specificity(y, score, threshold)
    out.update({"positives": positives, "auc": auc, "auc_ci": [lo, hi], "auc_se": float(np.sqrt(var)),
                "calibration_error": calibration_error(y, score), "threshold": threshold,
                "sensitivity": sens, "specificity": spec})
    if roc:
        from sklearn.metrics import roc_curve  # sklearn's import costs about 1 s: only where a curve is drawn

        fpr, tpr, _ = roc_curve(y, score)
        out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


def _mean_auc(views: dict[str, dict]):
    aucs = [v["auc"] for v in views.values() if v["auc"] != SUPPRESSED]
    return float(np.mean(aucs)) if aucs else SUPPRESSED


def per_exam_risk(probs: np.ndarray, answers: list, exam_ids: list[str]) -> tuple[np.ndarray, list]:
    """Lung cancer risk is asked per lung; the exam's risk is the max over its lungs, its event any lung's."""
    rows = defaultdict(list)
    for i, e in enumerate(exam_ids):
        rows[e].append(i)
    risk = np.stack([probs[idx].max(0) for idx in rows.values()])
    merged = [(answers[idx[0]][0], max(int(answers[i][1]) for i in idx)) for idx in rows.values()]
    return risk, merged


def horizon_labels(answers: list, year: int) -> tuple[np.ndarray, np.ndarray]:
    """(years_to_event, event) per patient -> (known, y) for "event within `year` years": a censored patient
    is known event-free only up to its follow-up."""
    t = np.array([a[0] for a in answers], dtype=np.float64)
    event = np.array([int(a[1]) for a in answers], dtype=bool)
    known = event | (t >= year)
    return known, event & (t <= year)


def task_metrics(task: Task, probs: np.ndarray, answers: list, min_cell: int, threshold: float = 0.5,
                 exam_ids: list[str] | None = None, roc: bool = False) -> dict:
    """Metrics for one task from its predictions (m3fm/model/heads.task_probabilities) and answers.
    "auc" is the task's headline: the AUC (yes/no), the mean one-vs-rest AUC (multi-class), the mean over
    horizons (risk); none for the numeric clinical retrieval task."""
    out = {"task": task.name, "group": task.group, "kind": task.loss}
    if task.loss == "ce" and task.answers == YES_NO:
        y = np.asarray(answers) == 0  # answer index 0 is "Yes": the positive class
        return {**out, **binary_metrics(y, probs[:, 0], min_cell, threshold, roc)}
    if task.loss == "ce":
        a = np.asarray(answers)
        views = {name: binary_metrics(a == i, probs[:, i], min_cell, threshold, roc)
                 for i, name in enumerate(task.answers)}
        out.update({"n": shown(len(a), min_cell), "answers": views, "auc": _mean_auc(views)})
        out["accuracy"] = float(np.mean(probs.argmax(1) == a)) if len(a) >= min_cell else SUPPRESSED
        return out
    if task.loss == "hazard":
        if task.region == "each_lung" and exam_ids is not None:
            probs, answers = per_exam_risk(probs, answers, exam_ids)
        views = {}
        for year in range(1, HAZARD_YEARS + 1):
            known, y = horizon_labels(answers, year)
            views[str(year)] = binary_metrics(y[known], probs[known, year - 1], min_cell, threshold, roc)
        out.update({"n": shown(len(answers), min_cell), "years": views, "auc": _mean_auc(views)})
        return out
    # digits: the number read back from three digit classifications
    value = (probs.argmax(-1) * np.array([100, 10, 1])).sum(1)
    truth = np.asarray(answers)
    ok = len(truth) >= min_cell
    out.update({"n": shown(len(truth), min_cell),
                "mean_absolute_error": float(np.abs(value - truth).mean()) if ok else SUPPRESSED,
                "accuracy": float(np.mean(value == truth)) if ok else SUPPRESSED})
    return out


def binary_views(metrics: dict) -> dict[str, dict]:
    """A task's binary views by label: "" for a yes/no task, one per answer, one per horizon ("3 y"); none for
    the numeric retrieval task."""
    if "auc_ci" in metrics:
        return {"": metrics}
    return metrics.get("answers") or {f"{y} y": v for y, v in metrics.get("years", {}).items()}


def roc_views(metrics: dict) -> dict[str, dict]:
    """The ROC curves a task's metrics hold, by label."""
    return {k: v["roc"] for k, v in binary_views(metrics).items() if "roc" in v}


def without_curves(metrics: dict) -> dict:
    """The metrics with the ROC points removed: what a site sends to the coordinator (aggregates only)."""
    if isinstance(metrics, dict):
        return {k: without_curves(v) for k, v in metrics.items() if k != "roc"}
    return metrics
