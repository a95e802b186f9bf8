import json

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from m3fm.metrics import (SUPPRESSED, auc_ci, binary_metrics, calibration_error, delong, horizon_labels,
                          pooled_auc, task_metrics, without_curves)
from m3fm.tasks import get_task


def synthetic_scores(n_pos, n_neg, shift, seed=0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    score = np.r_[rng.normal(shift, 1, n_pos), rng.normal(0, 1, n_neg)]
    return y, score


@pytest.mark.parametrize("n_pos,n_neg,shift", [(120, 180, 1.0), (40, 260, 0.5), (60, 60, 2.0)])
def test_delong_ci_agrees_with_a_stratified_bootstrap(n_pos, n_neg, shift):
    y, score = synthetic_scores(n_pos, n_neg, shift)
    auc, var = delong(y, score)
    assert auc == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    rng = np.random.default_rng(1)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    # 2000 resamples of positives and negatives separately, as DeLong's variance assumes; each AUC by the
    # Mann-Whitney identity (rank sum of the positives), all resamples at once
    idx = np.c_[rng.choice(pos, (2000, len(pos))), rng.choice(neg, (2000, len(neg)))]
    ranks = rankdata(score[idx], axis=1)
    boots = (ranks[:, :len(pos)].sum(1) - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
    i = rng.integers(2000)  # the identity, checked on one resample
    assert boots[i] == pytest.approx(roc_auc_score(y[idx[i]], score[idx[i]]), abs=1e-12)
    assert np.sqrt(var) == pytest.approx(boots.std(ddof=1), rel=0.12)
    _, lo, hi = auc_ci(y, score)
    b_lo, b_hi = np.percentile(boots, [2.5, 97.5])
    assert abs(lo - b_lo) < 0.02 and abs(hi - b_hi) < 0.02
    assert lo < auc < hi


def test_the_sites_pooled_auc_covers_the_shared_auc_as_often_as_it_claims():
    """Three sites of unequal size score one population (true AUC = Phi(shift / sqrt 2)): the meta-analysis of their
    AUCs and DeLong errors covers the truth in about 95% of cohorts, is narrower than any site's own interval, and
    finds no heterogeneity; sites that disagree get a high I2."""
    from scipy.stats import norm

    truth, covered = norm.cdf(0.8 / np.sqrt(2)), 0
    for rep in range(300):
        sites = [binary_metrics(*synthetic_scores(n, 2 * n, 0.8, seed=100 * rep + i), min_cell=5)
                 for i, n in enumerate((12, 30, 60))]
        p = pooled_auc([m["auc"] for m in sites], [m["auc_se"] for m in sites])
        covered += p["auc_ci"][0] <= truth <= p["auc_ci"][1]
        assert p["auc_ci"][1] - p["auc_ci"][0] < min(m["auc_ci"][1] - m["auc_ci"][0] for m in sites)
    assert 0.9 <= covered / 300 <= 0.99
    same = pooled_auc([0.8, 0.8, 0.8], [0.05, 0.05, 0.05])
    assert same["auc"] == pytest.approx(0.8) and same["i2"] == 0.0 and same["sites"] == 3
    assert pooled_auc([0.95, 0.55], [0.02, 0.02])["i2"] > 0.9
    perfect = pooled_auc([1.0, 0.6], [0.0, 0.05])  # a perfect site's zero variance is floored, not infinite weight
    assert 0.9 < perfect["auc"] < 1.0


def test_delong_handles_ties_and_perfect_separation():
    y = np.array([1, 1, 0, 0, 1, 0], bool)
    assert delong(y, np.zeros(6)) == (0.5, pytest.approx(0.0))
    auc, var = delong(y, y.astype(float))
    assert auc == 1.0 and var == pytest.approx(0.0)
    with pytest.raises(ValueError, match="positives and negatives"):
        delong(np.ones(4), np.arange(4))


def test_calibration_error_and_sensitivity_at_a_threshold():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0])
    p = np.array([.9, .8, .3, .1, .2, .6, .1, .1, .7, .4])
    m = binary_metrics(y, p, min_cell=2, threshold=0.5)
    assert m["sensitivity"] == pytest.approx(3 / 4) and m["specificity"] == pytest.approx(5 / 6)
    assert calibration_error(np.ones(5), np.ones(5)) == 0.0
    assert calibration_error(np.zeros(4), np.full(4, 0.75)) == pytest.approx(0.75)


def test_groups_under_the_minimum_cell_size_are_suppressed_never_a_number():
    y, score = synthetic_scores(3, 40, 1.0)
    m = binary_metrics(y, score, min_cell=5, roc=True)
    assert m["n"] == 43 and m["positives"] == SUPPRESSED
    for k in ("auc", "auc_ci", "sensitivity", "specificity", "calibration_error"):
        assert m[k] == SUPPRESSED
    assert "roc" not in m
    tiny = binary_metrics(*synthetic_scores(2, 2, 1.0), min_cell=5)
    assert tiny["n"] == SUPPRESSED and tiny["positives"] == SUPPRESSED

    # multi-class: the rare answer is suppressed, the mean one-vs-rest AUC is over the others
    task = get_task("nodule_attenuation")
    rng = np.random.default_rng(0)
    answers = np.r_[np.zeros(30, int), np.ones(30, int), np.full(2, 2)]
    probs = rng.dirichlet(np.ones(3), len(answers))
    probs[answers == 0, 0] += 1.0
    m = task_metrics(task, probs / probs.sum(1, keepdims=True), list(answers), min_cell=5)
    views = m["answers"]
    assert views[task.answers[2]]["auc"] == SUPPRESSED and views[task.answers[2]]["positives"] == SUPPRESSED
    assert m["auc"] == pytest.approx(np.mean([views[task.answers[i]]["auc"] for i in (0, 1)]))
    assert views[task.answers[0]]["auc"] > 0.75
    # what leaves the site holds no ROC points, and no number where a group is small
    sent = json.dumps(without_curves(task_metrics(task, probs, list(answers), min_cell=5, roc=True)))
    assert '"roc"' not in sent and sent.count(SUPPRESSED) >= 6


def test_risk_auc_per_year_counts_censored_patients_only_while_followed():
    answers = [(1.0, 1), (3.0, 0), (5.0, 1), (2.0, 0)]
    known, y = horizon_labels(answers, 3)
    assert known.tolist() == [True, True, True, False] and y.tolist() == [True, False, False, False]

    task = get_task("lung_cancer_risk")
    rng = np.random.default_rng(0)
    n = 60
    years = rng.uniform(0.5, 6.5, n)
    event = rng.random(n) < 0.5
    risk = np.sort(rng.random((n, 6)), 1) * 0.5 + 0.5 * (event & (years < 3))[:, None]
    # asked per lung: the exam's risk is the max over its two lungs, its event either lung's
    probs = np.repeat(risk, 2, 0)
    probs[1::2] *= 0.5
    ans = [a for t, e in zip(years, event) for a in ((t, int(e)), (t, 0))]
    exams = [f"e{i}" for i in range(n) for _ in range(2)]
    m = task_metrics(task, probs, ans, min_cell=5, exam_ids=exams)
    assert m["n"] == n and set(m["years"]) == {"1", "2", "3", "4", "5", "6"}
    for year, v in m["years"].items():
        k, yy = horizon_labels(list(zip(years, event.astype(int))), int(year))
        if v["auc"] != SUPPRESSED:
            assert v["n"] == k.sum() and v["auc"] == pytest.approx(roc_auc_score(yy[k], risk[k, int(year) - 1]))
    assert m["years"]["2"]["auc"] > 0.8
