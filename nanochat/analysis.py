"""
Learning-curve analysis of one run (`python -m scripts.lab analyze RUN`): the rows of its
metrics.jsonl in, findings and a recommendation out. Pure numpy, no torch, no I/O.

Rows (nanochat.training.RunState): training rows {"step", "loss", "lr_mult", "dt", ...} (RL adds
"reward"); evaluation rows {"step", M} with M = "val_bpb" (base), "val_loss" (mid, SFT) or
"eval_pass@1" (RL, higher is better); a final summary row ("train_time_s", "final_*") is ignored.
Internally every curve is made lower-is-better (pass@1 and reward are negated).

Every threshold is a multiple of the curve's own noise, so the same curve with 10x the noise is
judged the same way, and a noiseless curve gets a floor of 1e-4 x its typical value:
- noise scales come from robust_sigma: the standard deviation after clipping at 3 MAD scales (the
  MAD of Hampel 1974 ignores spikes and a few strongly curved points; see there).
- train noise sigma_t: robust_sigma of the residuals of the loss from its running median (window
  n/25 steps, 5 to 51). The running median (Tukey 1977) follows the trend and ignores spikes.
- val noise sigma_v: robust_sigma of the second differences of the evaluations / sqrt(6). Second
  differences cancel a locally linear trend with no model of the curve, and have variance 6 sigma^2
  under independent noise (difference-based estimators, Rice 1984). Needs 4+ evaluations.
- Z = 2: "significant" is two standard errors (about 95% under Gaussian noise); slopes are OLS with
  their standard error from the robust noise scale, not from residuals a spike would inflate. The
  val tests use the Student-t value instead (Student 1908): sigma_v from m evaluations is itself
  uncertain, with about (m - 2) / 2 degrees of freedom (the second differences overlap; measured by
  simulation), so with 20 evaluations "significant" is 2.3 standard errors.
- spike: a loss SPIKE_Z = 6 sigma_t above its running median (p < 1e-9 for Gaussian noise);
  divergence: a non-finite loss, or the running median DIVERGE_Z = 10 sigma_t above its running
  minimum at the end of the run (onset: when it last was within 3 sigma_t of it).
- plateau: no evaluation in the last 3+ improves on the best before it by more than Z sigma_v.
- overfitting: the last K = max(3, n/4) evaluations rise significantly, the last is Z sigma_v
  above the best, while the train loss since the best is not rising.
- ended too early: over the last 20% of the run (nanochat's default warmdown length) the metric
  still falls significantly and gained >= 10% of the improvement since 5% of the run. A power law
  L = a s^-b + c with b in 0.3-0.5 gains 3-5% there, a truncated exponential or straight line 14-20%.
- ran too long: a plateau over >= 30% of the run whose improvement is bounded (upper 95%) below
  10% of the improvement over an equally long stretch before it, or all of the run before it if
  shorter (a power law gives about 30%).
  Only a bounded flatness counts: a curve whose late gain is merely hidden by noise is not flagged.
Measured on the healthy curve of tests/test_analysis.py (a power law, 20 evaluations, 300 seeds):
no warning at its own noise; at 10x the noise 3% of the seeds get one (overfitting, too long or
too short), the price of 95% tests on 20 noisy points.
"""

import math
from dataclasses import asdict, dataclass, field

import numpy as np

Z, SPIKE_Z, DIVERGE_Z = 2.0, 6.0, 10.0
EVAL_METRICS = {"val_bpb": False, "val_loss": False, "eval_pass@1": True}  # name -> higher is better
STAGE_METRIC = {"base": "val_bpb", "mid": "val_loss", "sft": "val_loss", "rl": "eval_pass@1"}


@dataclass
class Finding:
    kind: str  # train_trend, val_plateau, overfitting, divergence, spikes, schedule_too_short, ...
    severity: str  # info, warning, critical
    message: str
    steps: tuple | None = None  # (first, last) step the finding covers; equal for a single step
    numbers: dict = field(default_factory=dict)


@dataclass
class Analysis:
    stage: str | None
    metric: str | None  # the validation metric analysed
    higher_is_better: bool
    n_train: int
    n_eval: int
    last_step: int | None
    train_sigma: float | None  # robust noise scale of the train curve (loss, or reward in RL)
    val_sigma: float | None
    best: tuple | None  # (step, value) of the best evaluation
    projection: dict | None  # power-law projection (base runs): step, value, lo, hi, a, b, c
    findings: list = field(default_factory=list)
    recommendation: str = ""

    def to_dict(self):
        return asdict(self)


@dataclass
class PowerLawFit:
    a: float
    b: float
    c: float
    rmse: float  # of the fitted points, in the curve's units
    n_points: int
    boot: np.ndarray  # (n_boot, 3) refits (a, b, c) on resampled points; rows of nan where degenerate

    def predict(self, step):
        return self.a * float(step) ** -self.b + self.c

    def interval(self, step, level=0.95):
        """Percentile bootstrap interval (lo, hi) of the curve's value at `step`."""
        pred = self.boot[:, 0] * float(step) ** -self.boot[:, 1] + self.boot[:, 2]
        q = 50 * (1 - level)
        return tuple(float(x) for x in np.nanpercentile(pred, [q, 100 - q]))


def robust_sigma(x):
    """
    Noise scale of x, same units, nan if empty: the standard deviation of the values within 3 MAD
    scales of the median (MAD = 1.4826 x median |x - median(x)|, Hampel 1974), divided by 0.9866
    (the standard deviation of a Gaussian clipped at 3 sigma). The MAD alone ignores outliers but
    wastes 63% of the data (its efficiency is 37%); one clipping step keeps the robustness and
    most of the efficiency, which matters with 10-40 evaluations.
    """
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if not x.size:
        return math.nan
    mad = 1.4826 * np.median(np.abs(x - np.median(x)))
    kept = x[np.abs(x - np.median(x)) <= 3 * mad]
    return float(kept.std() / 0.9866) if kept.size > 1 else float(mad)


def running_median(x, window):
    """Centred running median of a 1-D array (Tukey 1977), edges padded with the end values."""
    h = window // 2
    padded = np.pad(np.asarray(x, float), h, mode="edge")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, 2 * h + 1), axis=1)


def _floor(sigma, y):
    return max(sigma if math.isfinite(sigma) else 0.0, 1e-4 * float(np.median(np.abs(y))), 1e-12)


def _t975(dof):
    """Two-sided 95% Student-t value for dof >= 3: the Cornish-Fisher expansion around z = 1.96
    (Abramowitz & Stegun 26.7.5), within 4% of the exact value."""
    z, dof = 1.959964, max(dof, 3)
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def _trend(x, y, sigma):
    """OLS slope of y on x and its standard error given the per-point noise sigma."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    dx = x - x.mean()
    sxx = float(dx @ dx)
    if len(x) < 2 or sxx == 0:
        return math.nan, math.nan
    return float(dx @ (y - y.mean())) / sxx, sigma / math.sqrt(sxx)


def _fit_batch(s, v, fractions):
    """Grid fit of v = a s^-b + c for each row of s, v (B, n) over c = fractions (B, G) x min(v): for each
    c a least-squares line log(v - c) = log a - b log s; the c with the least squared error in v wins."""
    c = fractions * v.min(axis=1, keepdims=True)  # (B, G)
    x, logs = -np.log(s)[:, None, :], np.log(s)[:, None, :]
    with np.errstate(all="ignore"):
        y = np.log(v[:, None, :] - c[..., None])  # (B, G, n)
        xc = x - x.mean(-1, keepdims=True)
        b = (xc * y).sum(-1) / (xc * xc).sum(-1)
        loga = y.mean(-1) - b * x.mean(-1)
        sse = ((c[..., None] + np.exp(loga[..., None] - b[..., None] * logs) - v[:, None, :]) ** 2).sum(-1)
    best = np.argmin(np.where(np.isfinite(sse), sse, np.inf), axis=1)
    pick = lambda m: np.take_along_axis(m, best[:, None], 1)[:, 0]  # noqa: E731
    return np.exp(pick(loga)), pick(b), pick(c), pick(sse), pick(fractions)


def fit_power_law(steps, values, n_boot=200, seed=0):
    """
    Fit L(s) = a s^-b + c to a learning curve: the form of Kaplan et al. 2020 ("Scaling Laws for
    Neural Language Models", loss vs steps) and Hoffmann et al. 2022 (Chinchilla; c the irreducible
    loss). steps: optimizer steps (> 0, others dropped); values: the metric, positive, lower is
    better (val bpb). c is searched on a grid in [0, min L) (then refined), a and b by a linear fit
    in log space, the c with the least squared error in L wins. The interval comes from a pairs
    bootstrap (n_boot refits on points resampled with replacement; Efron & Tibshirani 1993).
    Returns a PowerLawFit, or None with fewer than 4 points, non-positive values or no decay (b <= 0).
    """
    s, v = np.asarray(steps, float), np.asarray(values, float)
    keep = (s > 0) & np.isfinite(v)
    s, v = s[keep], v[keep]
    if len(np.unique(s)) < 4 or v.min() <= 0:
        return None
    coarse = np.linspace(0, 1, 128, endpoint=False)

    def fit(S, V):  # a coarse grid of c, then a fine one around each row's best
        f = _fit_batch(S, V, np.broadcast_to(coarse, (len(S), len(coarse))))[4]
        return _fit_batch(S, V, np.clip(f[:, None] + np.linspace(-1, 1, 33) / len(coarse), 0, 1 - 1e-6))[:4]

    a, b, c, sse = (float(t[0]) for t in fit(s[None], v[None]))
    if not (b > 0 and math.isfinite(a)):
        return None
    idx = np.random.default_rng(seed).integers(0, len(s), size=(n_boot, len(s)))
    ba, bb, bc, _ = fit(s[idx], v[idx])
    degenerate = (np.diff(np.sort(s[idx], axis=1), axis=1) > 0).sum(1) < 2  # fewer than 3 distinct steps
    boot = np.stack([ba, bb, bc], 1)
    boot[degenerate] = np.nan
    return PowerLawFit(a, b, c, math.sqrt(sse / len(s)), len(s), boot)


@dataclass
class _Curve:
    steps: np.ndarray  # int64 (n,)
    y: np.ndarray  # float64 (n,), lower is better: sign x the logged value
    name: str  # as reported: "train loss", "val_bpb", ...
    sign: int  # +1 if the logged metric is lower-is-better, -1 if higher
    sigma: float = math.nan  # robust noise scale
    z: float = Z  # the significance multiple for this curve's tests

    def way(self, better=True):
        """How the logged metric moves when the curve improves (or worsens)."""
        return "falling" if (self.sign > 0) == better else "rising"


def _num(x):
    return float(x) if isinstance(x, (int, float)) else math.nan


def _steps(a, b=None):
    return f"step {a:,}" if b is None or a == b else f"steps {a:,}-{b:,}"


def _add(out, kind, severity, message, steps=None, **numbers):
    steps = None if steps is None else (int(steps[0]), int(steps[-1]))
    out.findings.append(Finding(kind, severity, message, steps, numbers))


def analyze(rows, stage=None, num_iterations=None, project_to=None):
    """
    Analyse one run's learning curves. rows: the dicts of its metrics.jsonl, in any order; stage:
    base, mid, sft or rl (None: inferred from the evaluation metric); num_iterations: the planned
    steps (optional: flags a run that stopped early, and is the default projection horizon);
    project_to: the step of the power-law projection (default: num_iterations if the run stopped
    before it, else twice the last step). Returns an Analysis: findings (kind, severity info /
    warning / critical, steps, message, numbers in the metric's units, slopes per 1k steps) and a
    recommendation. Never raises on odd input: empty rows, no evaluations, NaN losses give findings.
    See the module docstring for the thresholds and their reasons.
    """
    rows = [r for r in rows or () if isinstance(r, dict) and isinstance(r.get("step"), (int, float))
            and "train_time_s" not in r and not any(str(k).startswith("final_") for k in r)]
    metric = STAGE_METRIC.get(stage) or next((m for m in EVAL_METRICS if any(m in r for r in rows)), None)
    stage = stage or {"val_bpb": "base", "eval_pass@1": "rl"}.get(metric)
    key = "reward" if any("reward" in r for r in rows) else "loss"  # RL: the reward is the learning curve
    train = {int(r["step"]): (_num(r["loss"]), _num(r.get(key))) for r in rows if "loss" in r}
    evals = {int(r["step"]): _num(r[metric]) for r in rows if r.get(metric) is not None}
    t_steps, e_steps = np.array(sorted(train), dtype=np.int64), np.array(sorted(evals), dtype=np.int64)
    sign_t, sign_v = (-1 if key == "reward" else 1), (-1 if EVAL_METRICS.get(metric) else 1)
    t = _Curve(t_steps, sign_t * np.array([train[s][1] for s in t_steps]), f"train {key}", sign_t)
    v = _Curve(e_steps, sign_v * np.array([evals[s] for s in e_steps]), metric, sign_v)
    run_len = int(max(t_steps.max(initial=0), e_steps.max(initial=0)))
    out = Analysis(stage, metric, sign_v < 0, len(t_steps), len(e_steps), run_len or None, None, None, None, None)

    t = _train_findings(out, t, np.array([train[s][0] for s in t_steps]))
    v = _val_findings(out, v, t, run_len)
    found = {f.kind for f in out.findings}
    if "divergence" not in found:
        _schedule_findings(out, v if v is not None and len(v.y) >= 6 else t, run_len)
        if num_iterations and run_len < num_iterations:
            _add(out, "incomplete", "info", f"the run stopped at step {run_len:,} of the planned {num_iterations:,}")
        if metric == "val_bpb" and v is not None and len(v.y) >= 5 and "overfitting" not in found:
            horizon = num_iterations if num_iterations and num_iterations > run_len else 2 * run_len
            _projection(out, v, int(project_to or horizon))
    out.recommendation = _recommend(out)
    return out


def _train_findings(out, c, loss):
    """Divergence (non-finite loss, or a sustained rise), spikes and the late trend of the train curve.
    Returns the curve before any divergence, spikes dropped, with its noise scale; None if too short."""
    bad = ~(np.isfinite(loss) & np.isfinite(c.y))
    if bad.any():
        i = int(np.argmax(bad))
        what = f"train loss is {loss[i]}" if not np.isfinite(loss[i]) else f"{c.name} is {c.sign * c.y[i]}"
        _add(out, "divergence", "critical", f"{what} at step {c.steps[i]:,}", (c.steps[i],))
        c.steps, c.y = c.steps[:i], c.y[:i]
    if len(c.y) < 10:
        if len(c.y):
            _add(out, "few_train_rows", "info", f"only {len(c.y)} train rows: too few for trend, noise and spike tests")
        return None
    w = int(np.clip(len(c.y) // 25, 5, 51)) | 1
    smooth = running_median(c.y, w)
    resid = c.y - smooth
    sig = out.train_sigma = c.sigma = _floor(robust_sigma(resid), c.y)
    excess = (smooth - np.minimum.accumulate(smooth)) / sig
    end = len(c.y)
    if excess[-1] > DIVERGE_Z and not bad.any():
        end = int(np.nonzero(excess <= 3)[0][-1]) + 1  # the last time within 3 sigma of the minimum
        i = int(np.argmin(smooth))
        _add(out, "divergence", "critical", f"smoothed {c.name} went from its best {c.sign * smooth[i]:.4g} (step "
             f"{c.steps[i]:,}) to {c.sign * smooth[-1]:.4g} ({excess[-1]:.0f} noise scales worse), "
             f"from step {c.steps[end]:,} on",
             (c.steps[end], c.steps[-1]), rise_sigmas=float(excess[-1]))
    z = resid[:end] / sig
    hot = np.nonzero(z > SPIKE_Z)[0]
    if hot.size:
        groups = np.split(hot, np.nonzero(np.diff(hot) > 1)[0] + 1)
        unrecovered = sum(g[-1] + 1 >= end or np.median(c.y[g[-1] + 1 : g[-1] + 1 + w]) - smooth[g[0]] > 3 * sig
                          for g in groups)
        at = [int(c.steps[g[np.argmax(z[g])]]) for g in groups]
        _add(out, "spikes", "warning", f"{len(groups)} spike(s) of the {c.name} above {SPIKE_Z:.0f} noise scales (largest "
             f"{z[hot].max():.0f}) at {'step' if len(at) == 1 else 'steps'} {', '.join(f'{s:,}' for s in at[:5])}"
             + (f"; {unrecovered} did not recover" if unrecovered else ""), (at[0], at[-1]),
             count=len(groups), max_sigmas=float(z[hot].max()), unrecovered=int(unrecovered))
    keep = np.abs(resid[:end]) <= SPIKE_Z * sig
    clean = _Curve(c.steps[:end][keep], c.y[:end][keep], c.name, c.sign, sig)
    last = clean.steps >= clean.steps[-1] - 0.2 * float(clean.steps[-1] - clean.steps[0]) if len(clean.y) else []
    if np.sum(last) >= 5:
        slope, se = _trend(clean.steps[last], clean.y[last], sig)
        state = f"still {c.way()}" if slope + Z * se < 0 else c.way(False) if slope - Z * se > 0 else "flat within noise"
        _add(out, "train_trend", "info", f"smoothed {c.name} {c.sign * smooth[0]:.4g} -> {c.sign * smooth[end - 1]:.4g}; "
             f"{c.sign * 1000 * slope:+.3g} +- {2000 * se:.2g} per 1k steps over the last 20% "
             f"({_steps(clean.steps[last][0], clean.steps[-1])}): {state}", clean.steps[last],
             slope_per_1k=c.sign * 1000 * slope, slope_se_per_1k=1000 * se)
    return clean


def _val_findings(out, v, train, run_len):
    """Non-finite values, the best evaluation, overfitting or plateau (and a run that went on too long).
    Returns the curve with its noise scale and t value, or None with fewer than 4 evaluations."""
    if v.name is None or not len(v.y):
        _add(out, "no_eval", "info", "no evaluation rows (val_bpb, val_loss or eval_pass@1): no plateau, overfitting "
             "or projection")
        return None
    bad = ~np.isfinite(v.y)
    if bad.any():
        i = int(np.argmax(bad))
        _add(out, "divergence", "critical", f"{v.name} is {v.y[i]} at step {v.steps[i]:,}", (v.steps[i],))
        v.steps, v.y = v.steps[:i], v.y[:i]
    m = len(v.y)
    if m == 0:
        return None
    best = int(np.argmin(v.y))
    out.best = (int(v.steps[best]), float(v.sign * v.y[best]))
    if m < 4:
        _add(out, "few_evals", "info", f"only {m} evaluation(s): too few to tell noise from trend (need 4)")
        return None
    v.sigma = out.val_sigma = _floor(robust_sigma(np.diff(v.y, 2)) / math.sqrt(6), v.y)
    v.z = _t975((m - 2) // 2)
    k = max(3, math.ceil(m / 4))
    slope, se = _trend(v.steps[-k:], v.y[-k:], v.sigma)
    t_slope = t_se = None
    if train is not None and (train.steps >= v.steps[best]).sum() >= 3:
        after = train.steps >= v.steps[best]
        t_slope, t_se = _trend(train.steps[after], train.y[after], train.sigma)
    rise = v.y[-1] - v.y[best]
    if best < m - 1 and slope - v.z * se > 0 and rise > v.z * v.sigma and (t_slope is None or t_slope - Z * t_se <= 0):
        note = "no train rows to compare" if t_slope is None else (
            f"{train.name} {'still ' + train.way() if t_slope + Z * t_se < 0 else 'flat'} "
            f"({train.sign * 1000 * t_slope:+.3g} per 1k steps)")
        _add(out, "overfitting", "warning", f"{v.name} worsened from its best {out.best[1]:.4f} at step {out.best[0]:,} to "
             f"{v.sign * v.y[-1]:.4f} at step {v.steps[-1]:,} ({rise / v.sigma:.1f} noise scales) while {note}",
             (v.steps[best], v.steps[-1]), best=out.best[1], rise_sigmas=float(rise / v.sigma))
        return v
    # the plateau starts at the first evaluation that no later one beats by more than z sigma
    later = np.minimum.accumulate(v.y[::-1])[::-1]
    i0 = int(np.argmax(np.append(later[1:] > np.minimum.accumulate(v.y)[:-1] - v.z * v.sigma, True)))
    if m - 1 - i0 < 3:
        return v
    _add(out, "val_plateau", "info", f"no {v.name} improvement beyond noise ({v.z:.1f} sigma = {v.z * v.sigma:.2g}) "
         f"over the last {m - 1 - i0} evaluations ({_steps(v.steps[i0], v.steps[-1])})", (v.steps[i0], v.steps[-1]))
    span = float(v.steps[-1] - v.steps[i0])
    s_slope, s_se = _trend(v.steps[i0:], v.y[i0:], v.sigma)
    bound = max(0.0, -s_slope + v.z * s_se) * span  # 95% upper bound on the gain over the plateau
    before = v.y[np.searchsorted(v.steps, v.steps[i0] - span)] - v.y[i0]  # over as many steps before (or fewer)
    if span >= 0.3 * run_len and bound < 0.1 * before and not any(f.kind == "divergence" for f in out.findings):
        _add(out, "schedule_too_long", "warning", f"{v.name} flat from step {v.steps[i0]:,} ({span / run_len:.0%} of the "
             f"run): at most {bound:.2g} gained there (95% bound) against {before:.2g} over as many steps before",
             (v.steps[i0], v.steps[-1]), wasted_fraction=span / run_len, gain_bound=bound, gain_before=before)
    return v


def _schedule_findings(out, c, run_len):
    """Still improving at the end (info), or by so much that the schedule ended early (warning)."""
    if c is None or len(c.y) < 6:
        return
    idx = np.nonzero(c.steps >= 0.8 * run_len)[0]
    idx = idx if len(idx) >= 3 else np.arange(len(c.y) - 3, len(c.y))
    slope, se = _trend(c.steps[idx], c.y[idx], c.sigma)
    gain_lo = (-slope - c.z * se) * float(c.steps[idx[-1]] - c.steps[idx[0]])
    ref = c.y if c.name == out.metric else running_median(c.y, 5)
    r = int(np.searchsorted(c.steps, 0.05 * run_len))
    total = ref[r] - ref[r:].min() if r < idx[0] else 0.0
    if gain_lo > 0:
        frac = gain_lo / total if total > 0 else None
        early = frac is not None and frac >= 0.1
        _add(out, "schedule_too_short" if early else "still_improving", "warning" if early else "info",
             f"{c.name} still {c.way()} at the end: {c.sign * 1000 * slope:+.3g} +- {c.z * 1000 * se:.2g} per 1k steps over "
             f"{_steps(c.steps[idx[0]], c.steps[idx[-1]])}, at least {gain_lo:.3g} gained there"
             + (f" ({frac:.0%} of the gain since step {c.steps[r]:,})" if frac is not None else "")
             + ("; the schedule ended early" if early else ""),
             c.steps[idx], slope_per_1k=c.sign * 1000 * slope, late_gain_fraction=frac)


def _projection(out, v, target):
    """The power-law projection of a base run's val bpb at `target`; unreliable (and left out of the
    recommendation) when the fit misses the points by more than 3 noise scales (rmse)."""
    fit = fit_power_law(v.steps, v.y)
    if fit is None:
        _add(out, "projection", "info", f"no power-law fit: {v.name} is not decaying like a s^-b + c")
        return
    lo, hi = fit.interval(target)
    reliable = fit.rmse <= 3 * v.sigma
    out.projection = dict(step=target, value=fit.predict(target), lo=lo, hi=hi, a=fit.a, b=fit.b, c=fit.c, rmse=fit.rmse,
                          reliable=reliable)
    _add(out, "projection", "info", f"power-law fit L(s) = {fit.a:.3g} s^-{fit.b:.3g} + {fit.c:.3g} over {fit.n_points} "
         f"evaluations (rmse {fit.rmse:.2g}): projected {v.name} {fit.predict(target):.4f} (95% interval {lo:.4f}-{hi:.4f}) "
         f"at step {target:,}, a projection, not a measurement"
         + ("" if reliable else f"; unreliable: the curve is no power law (rmse {fit.rmse / v.sigma:.0f} noise scales)"),
         (target,), **out.projection)


def _recommend(out):
    f = {x.kind: x for x in out.findings}
    p = out.projection if out.projection and out.projection["reliable"] else None
    proj = f" (projected {out.metric} {p['value']:.4f}, {p['lo']:.4f}-{p['hi']:.4f}, at step {p['step']:,})" if p else ""
    if "divergence" in f:
        return (f"diverged at step {f['divergence'].steps[0]:,}: lower the LR (or lengthen warmup, clip gradients) "
                "and restart from a checkpoint before it")
    if "overfitting" in f:
        return f"best {out.metric} {out.best[1]:.4f} at step {out.best[0]:,}: stop there (keep that checkpoint), or add data"
    if "schedule_too_long" in f:
        x = f["schedule_too_long"]
        return (f"{out.metric} plateaued from step {x.steps[0]:,}: stop there next time "
                f"({x.numbers['wasted_fraction']:.0%} of the steps), or add data or capacity")
    if "schedule_too_short" in f:
        return f"still improving: train longer{proj}"
    if "spikes" in f:
        return f"loss spikes ({_steps(*f['spikes'].steps)}): consider a lower LR, a longer warmup or gradient clipping"
    if not out.n_train and not out.n_eval:
        return "nothing to analyse: no training or evaluation rows"
    if "val_plateau" in f:
        return (f"{out.metric} has not improved beyond noise since step {f['val_plateau'].steps[0]:,}: the run is about "
                "done (or its evaluation too noisy to tell: evaluate on more tokens)")
    return "healthy: no problems found" + (f"; training longer would help{proj}" if "still_improving" in f else proj)


def format_report(result):
    """Readable text of an Analysis: a summary line, noise scales, findings (worst first), the recommendation."""
    r = result
    lines = [f"stage {r.stage or '?'}: {r.n_train:,} train rows, {r.n_eval:,} evaluations of {r.metric or '-'}"
             f" ({'higher' if r.higher_is_better else 'lower'} is better), last step {r.last_step or 0:,}"]
    noise = [f"{name} {s:.3g}" for name, s in (("train", r.train_sigma), ("val", r.val_sigma)) if s is not None]
    if noise:
        lines.append("noise scale (robust sigma): " + ", ".join(noise))
    if r.best:
        lines.append(f"best {r.metric} {r.best[1]:.4f} at step {r.best[0]:,}")
    order = {"critical": 0, "warning": 1, "info": 2}
    for x in sorted(r.findings, key=lambda x: order[x.severity]):
        lines.append(f"  {x.severity.upper():8} {x.kind:18} {x.message}")
    lines.append(f"recommendation: {r.recommendation}")
    return "\n".join(lines)
