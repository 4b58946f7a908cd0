"""
The learning-curve analyzer (nanochat/analysis.py) on synthetic curves with seeded noise: each
pathology is found on a curve built to have it, a healthy power-law curve is not flagged (also at
10x the noise), the power-law fit recovers known parameters, and odd input gives a result.
"""

import json
import math

import numpy as np
import pytest

from nanochat.analysis import analyze, fit_power_law, format_report, robust_sigma

A, B, C = 4.0, 0.5, 0.9  # the val bpb curve: A s^-B + C


def power_law(s):
    return A * np.asarray(s, float) ** -B + C


def run_rows(n=2000, every=100, noise=1.0, seed=0, train=None, val=power_law):
    """Rows as RunState logs them: a train row per step (loss noise 0.02 x noise) and a val_bpb row
    every `every` steps (noise 0.002 x noise). train, val: functions of the step array."""
    rng = np.random.default_rng(seed)
    s = np.arange(1, n + 1)
    loss = (train(s) if train else power_law(s) + 2.2 * s**-0.3 + 0.3) + 0.02 * noise * rng.standard_normal(n)
    rows = [{"step": int(k), "loss": float(x), "lr_mult": 1.0, "dt": 0.1, "tok_per_s": 5e5, "mfu": 0.4, "time": 0.1 * k}
            for k, x in zip(s, loss)]
    e = np.arange(every, n + 1, every)
    rows += [{"step": int(k), "val_bpb": float(v)} for k, v in zip(e, val(e) + 0.002 * noise * rng.standard_normal(len(e)))]
    return rows


def kinds(result, severity=None):
    return {f.kind for f in result.findings if severity is None or f.severity == severity}


def warnings_(result):
    return {f.kind for f in result.findings if f.severity != "info"}


def finding(result, kind):
    return next(f for f in result.findings if f.kind == kind)


# ------------------------------------------------------------------------------------ healthy curves


@pytest.mark.parametrize("noise", [1.0, 10.0])
@pytest.mark.parametrize("seed", range(5))
def test_healthy_curve_has_no_warning(noise, seed):
    r = analyze(run_rows(noise=noise, seed=seed), stage="base", num_iterations=2000)
    assert warnings_(r) == set(), format_report(r)
    assert r.recommendation.startswith(("healthy", "val_bpb has not improved beyond noise")), r.recommendation
    assert r.train_sigma == pytest.approx(0.02 * noise, rel=0.15)  # the noise scales are measured, not assumed
    assert 0.4 < r.val_sigma / (0.002 * noise) < 2  # from 20 points, and the early curvature adds to it


def test_healthy_curve_trend_and_projection():
    r = analyze(run_rows(), stage="base", num_iterations=2000)
    trend = finding(r, "train_trend")
    assert "still falling" in trend.message and trend.numbers["slope_per_1k"] < 0
    p = r.projection
    assert p["step"] == 4000 and p["lo"] <= power_law(4000) <= p["hi"] and p["reliable"]
    assert f"projected val_bpb {p['value']:.4f}" in r.recommendation
    assert "projection" in finding(r, "projection").message


# ------------------------------------------------------------------------------------ pathologies


def test_overfitting():
    val = lambda s: power_law(s) + 2e-4 * np.maximum(0, s - 1000)  # noqa: E731  (turns up at ~1,000, train still falls)
    r = analyze(run_rows(val=val), stage="base")
    f = finding(r, "overfitting")
    assert f.severity == "warning" and 900 <= f.steps[0] <= 1300 and f.steps[1] == 2000
    assert "train loss still falling" in f.message
    assert r.recommendation.startswith(f"best val_bpb {r.best[1]:.4f} at step {r.best[0]:,}: stop there")
    assert not kinds(r) & {"val_plateau", "schedule_too_short", "projection"}  # no power law to project


def test_plateau_and_schedule_too_long():
    val = lambda s: power_law(np.minimum(s, 800))  # noqa: E731  (flat from step 800 of 3,000)
    r = analyze(run_rows(n=3000, val=val), stage="base")
    assert finding(r, "val_plateau").severity == "info"
    f = finding(r, "schedule_too_long")
    assert f.severity == "warning" and 700 <= f.steps[0] <= 1100 and f.numbers["wasted_fraction"] > 0.6
    assert "plateaued from step" in r.recommendation and "overfitting" not in kinds(r)


def test_schedule_too_short():
    decay = lambda s, lo, hi: lo + hi * np.exp(-s / 1500)  # noqa: E731  (an exponential cut at 1.3 time constants)
    r = analyze(run_rows(train=lambda s: decay(s, 3, 7), val=lambda s: decay(s, 1, 3)), stage="base")
    assert finding(r, "schedule_too_short").severity == "warning"
    assert r.recommendation == "still improving: train longer"  # an exponential: its power-law projection is not quoted
    assert not r.projection["reliable"] and "unreliable" in finding(r, "projection").message


def test_divergence_from_rising_loss():
    up = lambda s: power_law(s) + 2.2 * s**-0.3 + 0.3 + 3e-3 * np.maximum(0, s - 1500)  # noqa: E731
    r = analyze(run_rows(train=up, val=lambda s: power_law(s) + 3e-3 * np.maximum(0, s - 1500)), stage="base")
    f = finding(r, "divergence")
    assert f.severity == "critical" and 1500 <= f.steps[0] <= 1600
    assert r.recommendation.startswith(f"diverged at step {f.steps[0]:,}: lower the LR")
    assert "overfitting" not in kinds(r)  # the train loss rose too: instability, not overfitting


def test_divergence_from_nan_loss():
    rows = [r for r in run_rows() if r["step"] <= 1200]
    rows[1199]["loss"] = float("nan")
    rows = json.loads(json.dumps(rows))  # NaN survives the JSON round trip as metrics.jsonl stores it
    r = analyze(rows, stage="base")
    f = finding(r, "divergence")
    assert f.severity == "critical" and f.steps == (1200, 1200) and "nan" in f.message
    assert "diverged at step 1,200" in r.recommendation


@pytest.mark.parametrize("noise, found", [(1.0, True), (10.0, False)])
def test_spikes_scale_with_noise(noise, found):
    """+1.0 at two steps: 50 noise scales at the base noise (spikes that recover), 5 at 10x (noise)."""
    rows = run_rows(noise=noise)
    for k in (500, 1200):
        rows[k - 1]["loss"] += 1.0
    r = analyze(rows, stage="base")
    assert ("spikes" in kinds(r)) == found and "divergence" not in kinds(r)
    if found:
        f = finding(r, "spikes")
        assert f.steps == (500, 1200) and f.numbers["count"] == 2 and f.numbers["unrecovered"] == 0
        assert r.recommendation.startswith("loss spikes")


def test_rl_pass_at_1_is_higher_is_better():
    """RL: eval_pass@1 rises then falls while the reward still rises: overfitting, read the right way up."""
    rng = np.random.default_rng(0)
    s = np.arange(1, 401)
    reward = 0.6 - 0.4 * np.exp(-s / 150) + 0.01 * rng.standard_normal(400)
    rows = [{"step": int(k), "loss": 0.1, "reward": float(x), "train_pass@1": float(x)} for k, x in zip(s, reward)]
    e = np.arange(20, 401, 20)
    p = 0.3 + 0.2 * (1 - np.exp(-e / 60)) - 8e-4 * np.maximum(0, e - 200) + 0.003 * rng.standard_normal(len(e))
    rows += [{"step": int(k), "eval_pass@1": float(v), "eval_pass@8": 0.8} for k, v in zip(e, p)]
    r = analyze(rows)
    assert r.stage == "rl" and r.higher_is_better and r.best[1] == pytest.approx(p.max())
    assert "overfitting" in warnings_(r) and "train reward still rising" in finding(r, "overfitting").message
    assert "still rising" in finding(r, "train_trend").message


# ------------------------------------------------------------------------------------ power-law fit


def test_power_law_fit_recovers_parameters():
    s = np.arange(100, 2001, 100)
    v = power_law(s) + 0.001 * np.random.default_rng(0).standard_normal(len(s))
    fit = fit_power_law(s, v)
    assert fit.a == pytest.approx(A, rel=0.3) and fit.b == pytest.approx(B, abs=0.05) and fit.c == pytest.approx(C, abs=0.01)
    assert fit.predict(4000) == pytest.approx(power_law(4000), abs=0.003)
    assert fit.rmse < 0.002


def test_power_law_interval_covers_truth():
    """The 95% bootstrap interval at 2x the last step covers the true curve in most seeded runs."""
    s = np.arange(100, 2001, 100)
    covered, widths = 0, []
    for seed in range(20):
        fit = fit_power_law(s, power_law(s) + 0.002 * np.random.default_rng(seed).standard_normal(len(s)))
        lo, hi = fit.interval(4000)
        covered += lo <= power_law(4000) <= hi
        widths.append(hi - lo)
    assert covered >= 16 and np.median(widths) < 0.02


def test_power_law_fit_refuses_what_is_not_one():
    s = np.arange(100, 2001, 100)
    assert fit_power_law(s[:3], power_law(s[:3])) is None  # too few points
    assert fit_power_law(s, 1.0 + 1e-4 * s) is None  # rising: no decay
    assert fit_power_law(s, -power_law(s)) is None  # not positive


def test_robust_sigma_ignores_outliers():
    x = np.random.default_rng(0).standard_normal(1000)
    assert robust_sigma(x) == pytest.approx(1.0, rel=0.1)
    assert robust_sigma(np.append(x, [1e6] * 50)) == pytest.approx(1.0, rel=0.15)
    assert math.isnan(robust_sigma([]))


# ------------------------------------------------------------------------------------ odd input, real rows


@pytest.mark.parametrize("rows", [[], None, [{"no": "step"}, "junk", {"step": 5}]])
def test_empty_input(rows):
    r = analyze(rows)
    assert r.n_train == 0 and r.n_eval == 0 and "no_eval" in kinds(r)
    assert r.recommendation.startswith("nothing to analyse") and "recommendation" in format_report(r)


def test_no_eval_rows_and_one_eval_row():
    train_only = [r for r in run_rows() if "loss" in r]
    r = analyze(train_only, stage="mid")
    assert "no_eval" in kinds(r) and r.best is None and warnings_(r) == set()
    r = analyze(train_only + [{"step": 2000, "val_loss": 1.25}], stage="mid")
    assert "few_evals" in kinds(r) and r.best == (2000, 1.25) and r.projection is None


def test_incomplete_run_projects_to_the_planned_horizon():
    r = analyze(run_rows(), stage="base", num_iterations=3000)
    assert "incomplete" in kinds(r) and r.projection["step"] == 3000


def test_realistic_base_rows():
    """Rows as base_train writes them: train rows with every key, val_bpb and CORE rows, the final
    summary row (which repeats val_bpb and must not count as an evaluation)."""
    rows = run_rows(n=1000)
    for row in rows:
        if "loss" in row:
            row["grad_norm"] = 0.5
    rows += [{"step": 500, "core": 0.05}, {"step": 1000, "core": 0.08}]
    rows.append({"step": 1000, "final_val_bpb": 1.03, "val_bpb": 1.03, "unigram_val_bpb": 2.1, "train_time_s": 95.0})
    r = analyze(rows)
    assert (r.stage, r.metric, r.n_train, r.n_eval) == ("base", "val_bpb", 1000, 10)
    assert warnings_(r) == set()
    json.dumps(r.to_dict())  # the lab's --json output
    text = format_report(r)
    head = "stage base: 1,000 train rows, 10 evaluations of val_bpb (lower is better), last step 1,000"
    assert text.splitlines()[0] == head
    assert text.splitlines()[-1] == f"recommendation: {r.recommendation}"
