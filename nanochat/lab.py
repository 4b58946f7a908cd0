"""
The lab's computations on rows of the run registry (nanochat/registry.py): what a run's record and
evaluations say (final metric, GPU-hours, curves, the baselines of its evaluations), the statistics
of a comparison (Wilson intervals, winners and ties, the compute multiplier at matched val bpb) and
the compare table. Reads the registry and the run folders, writes nothing. Callers:
scripts/lab.py (`compare`, `show`, `report`) and nanochat/report.py (the compare table of a
recipe's stages). Column meanings: docs/lab.md.
"""

import math
import os
import re

from nanochat.report import final_loss, fmt, summarize_metrics

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
# Evaluation metrics where lower is better (losses, bits per byte); every other metric: higher is better.
LOWER_IS_BETTER = re.compile(r".*(loss|bpb).*")


# -----------------------------------------------------------------------------
# Statistics: intervals, winners, the compute multiplier


def wilson(p, n, z=Z95):
    """
    Wilson score interval of a binomial proportion p observed on n trials (Wilson 1927, "Probable
    inference, the law of succession, and statistical inference"): center (p + z^2/2n) / (1 + z^2/n),
    half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n). Unlike p +- z sqrt(p(1-p)/n) it stays
    inside [0, 1] and is not zero-width at p = 0 or 1. Returns (lo, hi).
    """
    if n <= 0:
        raise ValueError(f"wilson: n must be > 0, got {n}")
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at p = 0 (or 1) the bound is 0 (or 1) exactly; the formula leaves a round-off residue (8.7e-19 at n = 400)
    return 0.0 if p <= 0 else max(0.0, center - half), 1.0 if p >= 1 else min(1.0, center + half)


def interval(ev):
    """The 95% interval of an evals row: Wilson for a proportion with its n, else value +- z SE where
    a standard error is known, else None."""
    if ev.get("value") is None:
        return None
    if ev.get("kind") == "proportion" and ev.get("n"):
        return wilson(ev["value"], ev["n"])
    if ev.get("stderr") is not None:
        return ev["value"] - Z95 * ev["stderr"], ev["value"] + Z95 * ev["stderr"]
    return None


def winner(cells, lower_is_better):
    """
    The index of the best cell ({"value", "lo", "hi"} or None per run), or "tie" when the best one's
    interval overlaps another's (a cell without an interval is the point [value, value]; two equal
    points overlap), or None with fewer than two values.
    """
    have = [(i, c) for i, c in enumerate(cells) if c is not None and c.get("value") is not None]
    if len(have) < 2:
        return None
    best_i, best = min(have, key=lambda ic: ic[1]["value"] if lower_is_better else -ic[1]["value"])

    def bounds(c):
        return (c["lo"], c["hi"]) if c.get("lo") is not None else (c["value"], c["value"])

    lo, hi = bounds(best)
    for i, c in have:
        if i != best_i:
            o_lo, o_hi = bounds(c)
            if o_lo <= hi and lo <= o_hi:
                return "tie"
    return best_i


def _loglog_fit(points):
    """OLS line log(y) = a + b log(x) through points [(x, y)]; returns (a, b)."""
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def flops_to_reach(curve, target):
    """
    The FLOPs at which a run's val bpb curve [(flops, bpb)] first reaches target: linear
    interpolation in log(flops)-log(bpb) between the evaluations around the first one at or below
    target (a power law bpb = a F^-b is a straight line there, so it is exact on one). Outside the
    curve the line is extrapolated: an OLS fit in log-log over the first half of the evaluations
    (target above the first one) or the last half (target never reached). Returns (flops,
    extrapolated), or (None, True) when the fitted line does not fall (it never reaches target).
    """
    curve = sorted((f, v) for f, v in curve if f > 0 and v > 0)
    if len(curve) < 2 or target <= 0:
        return (curve[0][0], False) if len(curve) == 1 and curve[0][1] == target else (None, True)
    for i, (f, v) in enumerate(curve):
        if v <= target:
            if v == target:
                return f, False
            if i == 0:
                break
            (f0, v0), (f1, v1) = curve[i - 1], curve[i]
            t = (math.log(target) - math.log(v0)) / (math.log(v1) - math.log(v0))
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0))), False
    half = max(2, len(curve) // 2)
    a, b = _loglog_fit(curve[:half] if curve[0][1] <= target else curve[-half:])
    if b >= 0:
        return None, True
    return math.exp((math.log(target) - a) / b), True


def compute_multiplier(first, other):
    """
    Compute multiplier at matched val bpb of two base runs' curves [(flops, bpb)]: the FLOPs the
    first run needs to reach the other's final bpb, divided by the FLOPs the other spent on it.
    Above 1: the other run gets there with less compute. Returns {"target_bpb", "flops_other",
    "flops_first", "multiplier", "extrapolated"} or None when a curve is empty.
    """
    if not first or not other:
        return None
    flops_other, target = max(other)
    flops_first, extrapolated = flops_to_reach(first, target)
    return {"target_bpb": target, "flops_other": flops_other, "flops_first": flops_first,
            "multiplier": flops_first / flops_other if flops_first else None, "extrapolated": extrapolated}


# -----------------------------------------------------------------------------
# What a run's record and evals say


def metrics_path(run):
    """The run's metrics.jsonl (RunState's step and evaluation rows)."""
    return os.path.join(run["ckpt_dir"] or "", "run", "metrics.jsonl")


def run_summary(run):
    """The run's summary: its metrics log summarised (tokens/s, MFU, final values), then the summary
    the run recorded at its end, which wins."""
    return summarize_metrics(metrics_path(run)) | (run.get("summary") or {})


def gpus(run):
    """GPUs a run held: its ranks on CUDA, none on CPU / MPS (nothing to bill)."""
    return (run.get("world_size") or 1) if (run.get("device") or "").startswith("cuda") else 0


def gpu_hours(run):
    return None if run.get("wall_s") is None else run["wall_s"] * gpus(run) / 3600


def latest_evals(evals):
    """{(metric, bucket): the evals row of the highest step (then the newest)} of the evaluation
    scripts' rows (source other than "train")."""
    out = {}
    for ev in sorted(evals, key=lambda e: (e["step"] if e["step"] is not None else -1, e["id"])):
        if ev["source"] != "train":
            out[(ev["metric"], ev["bucket"])] = ev
    return out


def train_curves(evals):
    """{metric: [(step, value)]} of the training evaluations (metrics.jsonl rows), in step order."""
    out = {}
    for ev in evals:
        if ev["source"] == "train":
            out.setdefault(ev["metric"], []).append((ev["step"], ev["value"]))
    return {m: sorted(v) for m, v in out.items()}


def flops_curve(run, evals):
    """[(FLOPs, val bpb)] of a base run: FLOPs = flops_per_token x total_batch_size x step (the
    tokens seen at the evaluation); [] when the run did not record them."""
    fpt, tbs = run.get("flops_per_token"), (run.get("config") or {}).get("total_batch_size")
    if run.get("stage") != "base" or not fpt or not isinstance(tbs, (int, float)):
        return []
    return [(fpt * tbs * step, v) for step, v in train_curves(evals).get("val_bpb", []) if step > 0]


def final_metric(run, evals):
    """(name, value) a run ended at: its summary's final loss, else its last training evaluation."""
    name, value = final_loss(run.get("summary") or {})
    if name is None:
        curves = train_curves(evals)
        for metric in ("val_bpb", "val_loss", "eval_pass@1"):
            if curves.get(metric):
                return metric, curves[metric][-1][1]
    return name, value


def ref_name(run):
    return run["name"] or run["id"]


def parent_evals(reg, run):
    """{(metric, bucket): value} of the checkpoint a run started from, as the evaluation scripts
    scored it: the parent run's latest results at the parent step. {} when the run records no
    parent run, or that checkpoint was not evaluated (results at other steps of the parent run do
    not count: they are other weights)."""
    if not run.get("parent_run_id") or run.get("parent_step") is None:
        return {}
    at_step = [ev for ev in reg.evals(run["parent_run_id"]) if ev["step"] == run["parent_step"]]
    return {key: ev["value"] for key, ev in latest_evals(at_step).items()}


# -----------------------------------------------------------------------------
# compare


def compare(reg, runs, price):
    """
    The compare table of runs (registry rows; the first is the reference) as a dict: "runs", "rows"
    of {"metric", "lower_is_better", "cells", "winner" (a run name, "tie" or None)}, and
    "compute_multiplier" (base runs: one per run after the first). A cell per run: None, or
    {"value", "lo", "hi" (95% interval or None), "n", "delta" (to the first run)}; the cells of
    the evaluation scripts' metrics also hold "step", "baseline" (chance) and "parent" (the value
    of the checkpoint the run started from, parent_evals). price: USD per GPU-hour.
    """
    evals = {r["id"]: reg.evals(r["id"]) for r in runs}
    rows = []

    def add(metric, cells, lower_is_better):
        if all(c is None for c in cells):
            return
        ref = cells[0]["value"] if cells[0] is not None else None
        for c in cells:
            if c is not None:
                c["delta"] = c["value"] - ref if ref is not None and c["value"] is not None else None
        w = winner(cells, lower_is_better)
        w = w if w in (None, "tie") else ref_name(runs[w])
        rows.append({"metric": metric, "lower_is_better": lower_is_better, "cells": cells, "winner": w})

    # evaluations of the checkpoints (chat_eval, base_eval): the latest of each metric
    latest = [latest_evals(evals[r["id"]]) for r in runs]
    parents = [parent_evals(reg, r) for r in runs]
    keys = list(dict.fromkeys(k for lat in latest for k in lat))
    for metric, bucket in keys:
        cells = []
        for lat, parent in zip(latest, parents):
            ev = lat.get((metric, bucket))
            lo, hi = (interval(ev) if ev else None) or (None, None)
            cells.append(None if ev is None else {"value": ev["value"], "n": ev["n"], "step": ev["step"], "lo": lo, "hi": hi,
                                                  "baseline": ev.get("baseline"), "parent": parent.get((metric, bucket))})
        add(metric + (f" [{bucket}]" if bucket else ""), cells, bool(LOWER_IS_BETTER.fullmatch(metric)))
    # training evaluations: final and best
    curves = [train_curves(evals[r["id"]]) for r in runs]
    for metric in dict.fromkeys(m for c in curves for m in c):
        lower = bool(LOWER_IS_BETTER.fullmatch(metric))
        finals = [{"value": c[metric][-1][1], "step": c[metric][-1][0]} if c.get(metric) else None for c in curves]
        bests = [{"value": (min if lower else max)(v for _, v in c[metric])} if c.get(metric) else None for c in curves]
        add(f"final {metric}", finals, lower)
        add(f"best {metric}", bests, lower)
    # speed and cost
    summaries = [run_summary(r) for r in runs]
    add("tokens/s", [{"value": s["tok_per_s"]} if isinstance(s.get("tok_per_s"), (int, float)) else None for s in summaries], False)
    add("MFU", [{"value": s["mfu"]} if isinstance(s.get("mfu"), (int, float)) else None for s in summaries], False)
    add("wall time (s)", [{"value": r["wall_s"]} if r.get("wall_s") is not None else None for r in runs], True)
    add("GPU-hours", [{"value": gpu_hours(r)} if gpu_hours(r) is not None else None for r in runs], True)
    add("cost ($)", [{"value": gpu_hours(r) * price} if gpu_hours(r) is not None else None for r in runs], True)
    # base runs: compute multiplier at matched val bpb
    multipliers = []
    first = flops_curve(runs[0], evals[runs[0]["id"]])
    for r in runs[1:]:
        m = compute_multiplier(first, flops_curve(r, evals[r["id"]]))
        if m is not None:
            multipliers.append({"run": ref_name(r), "first": ref_name(runs[0])} | m)
    runs = [{k: r[k] for k in ("id", "name", "stage", "model_tag", "status")} for r in runs]
    return {"runs": runs, "gpu_hour_price": price, "rows": rows, "compute_multiplier": multipliers}


def format_cell(c, first):
    """A compare cell as text: value [lo, hi] n=N (delta; not for the first run); parent P, chance C."""
    if c is None:
        return "-"
    text = fmt(c["value"])
    if c.get("lo") is not None:
        text += f" [{fmt(c['lo'], 3)}, {fmt(c['hi'], 3)}]"
    if c.get("n"):
        text += f" n={c['n']:,}"
    if not first and c.get("delta") is not None:
        text += f" ({c['delta']:+.4g})"
    against = [f"{label} {fmt(c[key])}" for key, label in (("parent", "parent"), ("baseline", "chance")) if c.get(key) is not None]
    return text + ("; " + ", ".join(against) if against else "")


def format_compare(result):
    """The markdown table of a compare() result, its legend, and the compute multiplier lines."""
    names = [r["name"] or r["id"] for r in result["runs"]]
    lines = ["| metric | " + " | ".join(names) + " | winner |", "|---" * (len(names) + 2) + "|"]
    for row in result["rows"]:
        cells = [format_cell(c, i == 0) for i, c in enumerate(row["cells"])]
        lines.append(f"| {row['metric']} | " + " | ".join(cells) + f" | {row['winner'] or '-'} |")
    lines += ["", f"Intervals: 95% (Wilson for proportions of n, else +- 1.96 SE where known); (delta) to {names[0]}; "
              f"winner: best value, 'tie' when its interval overlaps another's; cost at ${result['gpu_hour_price']:.2f} per GPU-hour."]
    if any(c and (c.get("parent") is not None or c.get("baseline") is not None) for row in result["rows"] for c in row["cells"]):
        lines.append("parent: the same evaluation of the checkpoint the run started from; chance: a model that guesses "
                     "(0 for the centred CORE and ChatCORE).")
    for m in result["compute_multiplier"]:
        if m["multiplier"] is None:
            lines.append(f"compute multiplier: {m['first']} never reaches {m['run']}'s final val bpb {m['target_bpb']:.4f} "
                         "(its curve does not fall)")
        else:
            how = "extrapolated" if m["extrapolated"] else "interpolated"
            lines.append(f"compute multiplier at val bpb {m['target_bpb']:.4f}: {m['first']} needs {m['flops_first']:.3e} FLOPs ({how}), "
                         f"{m['run']} spent {m['flops_other']:.3e}: {m['multiplier']:.3f}x" + (" (EXTRAPOLATED)" if m["extrapolated"] else ""))
    return "\n".join(lines)
