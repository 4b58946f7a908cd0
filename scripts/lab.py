"""
The training lab: the run and model registry (nanochat/registry.py) from the command line. Column
meanings and worked examples: docs/lab.md.

    python -m scripts.lab list [--stage base] [--status done]     # every run of the registry
    python -m scripts.lab show e003                                # one run: record, evals, notes, models
    python -m scripts.lab compare e001 e002 e003 --gpu-hour-price 2.5
    python -m scripts.lab analyze e001                             # learning-curve findings and a recommendation
    python -m scripts.lab curves e001 e002 --out curves.png        # train and val curves, overlaid
    python -m scripts.lab reindex [--check]                        # rebuild runs and evals from the run folders
    python -m scripts.lab register e003:2000 --name chat           # -> chat:v1 (immutable; same weights = same version)
    python -m scripts.lab alias chat@prod v1                       # move an alias
    python -m scripts.lab models [chat]                            # versions and aliases
    python -m scripts.lab note e003 "lr too high" | tag e003 baseline | note chat:v1 "shipped"
    python -m scripts.lab report [--since 24h] [--out lab.md]      # runs, bests and deltas, GPU-hours and cost

RUN is a run id (or a unique prefix of 4+ characters), a run name (the newest run of that name), or
the path of a checkpoint directory (or one of its step_* directories). Every verb takes --json
(the same content, machine-readable), --registry PATH and --base-dir DIR. Bad input: one line on
stderr, exit 1.
"""

import argparse
import json
import math
import os
import re
import sys
from collections import Counter

from nanochat import analysis
from nanochat.checkpoint_manager import list_steps, load_meta
from nanochat.common import NanochatError, get_base_dir, run_main
from nanochat.registry import Registry, iso, now, read_jsonl, reindex
from nanochat.report import DEFAULT_GPU_HOUR_PRICE, PRICE_ENV, final_loss, markdown_table, summarize_metrics

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
# Evaluation metrics where lower is better (losses, bits per byte); every other metric: higher is better.
LOWER_IS_BETTER = re.compile(r".*(loss|bpb).*")
CURVE_KEYS = ("loss", "val_bpb", "val_loss", "eval_pass@1", "core", "reward")  # panels of `curves`, when present


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
    return max(0.0, center - half), min(1.0, center + half)


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


def gpu_hour_price(price):
    if price is None:
        env = os.environ.get(PRICE_ENV)
        try:
            price = float(env) if env else DEFAULT_GPU_HOUR_PRICE
        except ValueError:
            raise NanochatError(f"${PRICE_ENV}={env!r} is not a number (USD per GPU-hour)") from None
    if not (price >= 0 and math.isfinite(price)):
        raise NanochatError(f"--gpu-hour-price {price} must be a number >= 0")
    return price


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


# -----------------------------------------------------------------------------
# compare


def compare(reg, runs, price):
    """The compare table of runs (first = the reference) as a dict: rows of {"metric", "lower_is_better",
    "cells" (per run: value, n, lo, hi, delta to the first run), "winner"}, and the compute multipliers."""
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
    keys = list(dict.fromkeys(k for lat in latest for k in lat))
    for metric, bucket in keys:
        cells = []
        for lat in latest:
            ev = lat.get((metric, bucket))
            lo, hi = (interval(ev) if ev else None) or (None, None)
            cells.append(None if ev is None else {"value": ev["value"], "n": ev["n"], "step": ev["step"], "lo": lo, "hi": hi})
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


def _num(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float) and v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def format_cell(c, first):
    if c is None:
        return "-"
    text = _num(c["value"])
    if c.get("lo") is not None:
        text += f" [{_num(c['lo'], 3)}, {_num(c['hi'], 3)}]"
    if c.get("n"):
        text += f" n={c['n']:,}"
    if not first and c.get("delta") is not None:
        text += f" ({c['delta']:+.4g})"
    return text


def format_compare(result):
    names = [r["name"] or r["id"] for r in result["runs"]]
    lines = ["| metric | " + " | ".join(names) + " | winner |", "|---" * (len(names) + 2) + "|"]
    for row in result["rows"]:
        cells = [format_cell(c, i == 0) for i, c in enumerate(row["cells"])]
        lines.append(f"| {row['metric']} | " + " | ".join(cells) + f" | {row['winner'] or '-'} |")
    lines += ["", f"Intervals: 95% (Wilson for proportions of n, else +- 1.96 SE where known); (delta) to {names[0]}; "
              f"winner: best value, 'tie' when its interval overlaps another's; cost at ${result['gpu_hour_price']:.2f} per GPU-hour."]
    for m in result["compute_multiplier"]:
        if m["multiplier"] is None:
            lines.append(f"compute multiplier: {m['first']} never reaches {m['run']}'s final val bpb {m['target_bpb']:.4f} "
                         "(its curve does not fall)")
        else:
            how = "extrapolated" if m["extrapolated"] else "interpolated"
            lines.append(f"compute multiplier at val bpb {m['target_bpb']:.4f}: {m['first']} needs {m['flops_first']:.3e} FLOPs ({how}), "
                         f"{m['run']} spent {m['flops_other']:.3e}: {m['multiplier']:.3f}x" + (" (EXTRAPOLATED)" if m["extrapolated"] else ""))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# curves


def plot_curves(runs, out):
    """Train loss and each validation metric (CURVE_KEYS present) against step, one panel per key,
    the runs overlaid. Returns out; NanochatError when no run has a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for r in runs:
        for row in read_jsonl(metrics_path(r)):
            if "train_time_s" in row or not isinstance(row.get("step"), (int, float)):
                continue
            for key in CURVE_KEYS:
                if isinstance(row.get(key), (int, float)):
                    series.setdefault(key, {}).setdefault(ref_name(r), []).append((row["step"], row[key]))
    panels = [k for k in CURVE_KEYS if k in series]
    if not panels:
        names = ", ".join(ref_name(r) for r in runs)
        raise NanochatError(f"no curves: the metrics.jsonl of {names} hold none of {', '.join(CURVE_KEYS)}")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    colors = {ref_name(r): f"C{i % 10}" for i, r in enumerate(runs)}  # a run keeps its colour in every panel
    for ax, key in zip(axes[0], panels):
        for name, points in series[key].items():
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, label=name, color=colors[name], marker="o" if len(steps) < 30 else None, markersize=3, linewidth=1.2)
        ax.set_title("train loss" if key == "loss" else key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# -----------------------------------------------------------------------------
# report


def parse_since(text):
    """'24h', '7d', '90m', '3600s' (or a bare number of hours) -> seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text or "")
    if not m:
        raise NanochatError(f"--since {text!r}: expected a duration such as 24h, 7d, 90m or 3600s")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 3600}[m.group(2)]


def best_per_metric(reg, runs):
    """{"<stage>/<metric>": {"value", "run", "lower_is_better"}}: the best run of each stage on each
    evaluation metric (the latest of each run) and each final training evaluation."""
    best = {}
    for r in runs:
        evals = reg.evals(r["id"])
        values = {m + (f" [{b}]" if b else ""): ev["value"] for (m, b), ev in latest_evals(evals).items()}
        values |= {f"final {m}": c[-1][1] for m, c in train_curves(evals).items()}
        for metric, value in values.items():
            lower = bool(LOWER_IS_BETTER.fullmatch(metric.removeprefix("final ")))
            key = f"{r['stage']}/{metric}"
            if value is not None and (key not in best or (value < best[key]["value"] if lower else value > best[key]["value"])):
                best[key] = {"value": value, "run": ref_name(r), "lower_is_better": lower}
    return best


def make_report(reg, since_s, price):
    t = now()
    since = t - since_s
    window = reg.runs(since=since)
    counts = {
        "started": sum(r["started"] is not None and r["started"] >= since for r in window),
        **{status: sum(r["status"] == status for r in window) for status in ("done", "failed", "killed", "stopped", "running")},
    }
    hours = sum(gpu_hours(r) or 0 for r in window)
    best = best_per_metric(reg, reg.runs())
    previous = reg.last_report()
    for key, b in best.items():
        old = (previous or {}).get("best", {}).get(key)
        b["previous"] = old["value"] if old else None
        b["delta"] = b["value"] - old["value"] if old else None
    reg.add_report(t, since, {k: {"value": b["value"], "run": b["run"]} for k, b in best.items()})
    return {"time": t, "since": since, "previous_report": previous["time"] if previous else None, "counts": counts,
            "gpu_hours": hours, "cost": hours * price, "gpu_hour_price": price,
            "runs": [{k: r[k] for k in ("name", "id", "stage", "model_tag", "status", "stop_reason", "wall_s")}
                     | {"started": iso(r["started"]), "gpu_hours": gpu_hours(r), "final": final_metric(r, reg.evals(r["id"]))} for r in window],
            "best": best}


def format_report(rep):
    c = rep["counts"]
    previous = f"; previous report {iso(rep['previous_report'])}" if rep["previous_report"] else ""
    lines = ["# nanochat lab report", "", f"From {iso(rep['since'])} to {iso(rep['time'])}{previous}.", ""]
    lines += ["## Runs", "", f"{c['started']} started, {c['done']} finished, {c['failed']} failed, {c['killed']} killed, "
              f"{c['stopped']} stopped, {c['running']} running.", ""]
    rows = []
    for r in rep["runs"]:
        status = r["status"] + (f" ({r['stop_reason']})" if r["stop_reason"] else "")
        final = f"{r['final'][0]} {_num(r['final'][1])}" if r["final"][0] else "-"
        rows.append({"run": r["name"], "stage": r["stage"], "tag": r["model_tag"], "status": status, "started": r["started"], "wall (s)": r["wall_s"],
                     "GPU-h": r["gpu_hours"], "final": final})
    lines += [markdown_table(rows) if rows else "(no runs in the window)", ""]
    lines += ["## Compute", "", f"{rep['gpu_hours']:.2f} GPU-hours, ${rep['cost']:,.2f} at ${rep['gpu_hour_price']:.2f} per GPU-hour "
              "(whole runs active in the window).", ""]
    lines += ["## Best run per metric (all runs)", ""]
    rows = [{"stage/metric": k, "best": b["value"], "run": b["run"], "previous report": b["previous"], "delta": b["delta"]}
            for k, b in sorted(rep["best"].items())]
    lines += [markdown_table(rows) if rows else "(no evaluations yet)", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The verbs: each returns (json-able result, text)


def _run_row(reg, r):
    name, value = final_metric(r, reg.evals(r["id"]))
    return {"name": r["name"], "id": r["id"], "stage": r["stage"], "tag": r["model_tag"], "status": r["status"], "started": iso(r["started"]),
            "wall (s)": f"{r['wall_s']:.1f}" if r["wall_s"] is not None else None, "final": f"{name} {_num(value)}" if name else None,
            "parent": f"{r['parent_stage']}/{r['parent_tag']}@{r['parent_step']}" if r["parent_stage"] else None}


def cmd_list(reg, args):
    runs = reg.runs(stage=args.stage, status=args.status)
    rows = [_run_row(reg, r) for r in runs]
    return runs, markdown_table(rows) if rows else "(no runs)"


def cmd_show(reg, args):
    r = reg.get_run(args.run)
    evals = reg.evals(r["id"])
    models = [m for m in reg.models() if m["run_id"] == r["id"]]
    result = r | {"evals": evals, "notes": reg.notes(f"run:{r['id']}"), "models": models}
    lines = [f"# {r['name']} ({r['id']})", ""]
    for key in ("stage", "model_tag", "ckpt_dir", "status", "stop_reason", "parent_stage", "parent_tag", "parent_step", "parent_run_id",
                "git_commit", "git_dirty", "tokenizer", "recipe_path", "recipe_hash", "host", "device", "world_size", "pid", "wall_s"):
        if r.get(key) is not None:
            lines.append(f"- {key}: {r[key]}")
    lines += [f"- started: {iso(r['started'])}", f"- ended: {iso(r['ended'])}", ""]
    if r.get("summary"):
        lines += ["## Summary", "", markdown_table([{"metric": k, "value": v} for k, v in r["summary"].items()]), ""]
    if evals:
        rows = []
        for ev in evals:
            iv = interval(ev)
            metric = ev["metric"] + (f" [{ev['bucket']}]" if ev["bucket"] else "")
            rows.append({"source": ev["source"], "step": ev["step"], "metric": metric, "value": ev["value"], "n": ev["n"],
                         "95% interval": f"[{iv[0]:.4f}, {iv[1]:.4f}]" if iv else None})
        lines += ["## Evaluations", "", markdown_table(rows), ""]
    for n in result["notes"]:
        lines.append(f"- {n['kind']}: {n['text']} ({iso(n['time'])})")
    for m in result["models"]:
        lines.append(f"- registered as {m['name']}:v{m['version']} (step {m['step']})")
    if r.get("config"):
        lines += ["", "## Config", "", "```json", json.dumps(r["config"], indent=1, default=str), "```"]
    return result, "\n".join(lines)


def cmd_compare(reg, args):
    if len(args.runs) < 2:
        raise NanochatError("compare needs two runs or more")
    result = compare(reg, [reg.get_run(ref) for ref in args.runs], gpu_hour_price(args.gpu_hour_price))
    return result, format_compare(result)


def cmd_analyze(reg, args):
    r = reg.get_run(args.run)
    planned = (r.get("config") or {}).get("num_iterations")
    result = analysis.analyze(read_jsonl(metrics_path(r)), stage=r["stage"], num_iterations=planned, project_to=args.project_to)
    return result.to_dict(), f"# {r['name']} ({r['id']})\n" + analysis.format_report(result)


def cmd_curves(reg, args):
    out = plot_curves([reg.get_run(ref) for ref in args.runs], args.out)
    return {"out": os.path.abspath(out)}, f"wrote {out}"


def diff_registry(live_runs, live_evals, runs, evals):
    """What differs between the live tables and reindexed ones: a list of one-line differences."""
    out = []
    live = {r["id"]: r for r in live_runs}
    rebuilt = {r["id"]: r for r in runs}
    for run_id in sorted(live.keys() | rebuilt.keys()):
        a, b = live.get(run_id), rebuilt.get(run_id)
        if a is None or b is None:
            out.append(f"run {run_id}: only in the {'run folders' if a is None else 'registry'}")
            continue
        out += [f"run {run_id} {k}: registry {a[k]!r}, folders {b.get(k)!r}" for k in a if k in b and a[k] != b[k]]

    cols = ("run_id", "source", "step", "metric", "bucket", "value", "n", "stderr", "kind", "time")
    la, lb = (Counter(tuple(e.get(c) for c in cols) for e in rows) for rows in (live_evals, evals))
    if la != lb:
        out.append(f"evals: {sum((la - lb).values())} rows only in the registry, {sum((lb - la).values())} only in the run folders")
    return out


def cmd_reindex(reg, args):
    base_dir = args.base_dir or get_base_dir()
    runs, evals = reindex(base_dir)
    if args.check:
        diff = diff_registry(reg.runs(), reg.evals(), runs, evals)
        return {"differences": diff}, "\n".join(diff) or f"the registry matches the run folders ({len(runs)} runs, {len(evals)} evals)"
    reg.replace_runs(runs, evals)
    text = f"reindexed {len(runs)} runs and {len(evals)} evals from {os.path.join(base_dir, 'checkpoints')} into {reg.path}"
    return {"runs": len(runs), "evals": len(evals)}, text


def cmd_register(reg, args):
    ref, step = args.run, None
    m = re.fullmatch(r"(.+):(\d+)", ref)
    if m and not os.path.exists(ref):
        ref, step = m.group(1), int(m.group(2))
    m = re.fullmatch(r"step_(\d+)", os.path.basename(os.path.normpath(ref)))
    if step is None and m and os.path.isdir(ref):
        step = int(m.group(1))
    run = reg.get_run(ref)
    steps = list_steps(run["ckpt_dir"] or "")
    if not steps:
        raise NanochatError(f"run {ref_name(run)} has no checkpoint left in {run['ckpt_dir']}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise NanochatError(f"run {ref_name(run)} has no checkpoint at step {step} (steps: {', '.join(map(str, steps))})")
    meta = load_meta(run["ckpt_dir"], step)
    if meta.get("run_id") not in (None, run["id"]):
        raise NanochatError(f"step {step} in {run['ckpt_dir']} belongs to run {meta['run_id']}, not {run['id']}")
    path = os.path.join(run["ckpt_dir"], f"step_{step:06d}")
    version, created = reg.register_model(args.name, run["id"], run["stage"], run["model_tag"], step, path)
    model = reg.resolve_model(f"{args.name}:v{version}")
    digest = model["content_hash"][:12]
    text = (f"{args.name}:v{version} = run {ref_name(run)} ({run['stage']}/{run['model_tag']} step {step}), sha256 {digest}" if created
            else f"{args.name}:v{version} already holds these weights (sha256 {digest}): no new version")
    return model | {"created": created}, text


def cmd_alias(reg, args):
    m = re.fullmatch(r"([^@]+)@([^@]+)", args.target)
    v = re.fullmatch(r"v?(\d+)", args.version)
    if not m or not v:
        raise NanochatError(f"usage: lab alias NAME@ALIAS vN (got {args.target} {args.version})")
    name, alias, version = m.group(1), m.group(2), int(v.group(1))
    old = reg.set_alias(name, alias, version)
    return {"name": name, "alias": alias, "version": version, "previous": old}, f"{name}@{alias}: " + (f"v{old} -> " if old else "") + f"v{version}"


def cmd_models(reg, args):
    models = reg.models(args.name)
    rows = [{"model": f"{m['name']}:v{m['version']}", "aliases": ", ".join(m["aliases"]) or None, "run": m["run_id"],
             "checkpoint": f"{m['stage']}/{m['model_tag']} step {m['step']}", "sha256": m["content_hash"][:12], "created": iso(m["created"])}
            for m in models]
    return models, markdown_table(rows) if rows else "(no registered models)"


def cmd_note(reg, args):
    try:
        target = f"run:{reg.get_run(args.target)['id']}"
    except NanochatError:
        model = reg.resolve_model(args.target)  # NanochatError names what is wrong with it as a model
        target = f"model:{model['name']}:v{model['version']}"
    kind = "tag" if args.verb == "tag" else "note"
    reg.add_note(target, args.text, kind)
    return {"target": target, "kind": kind, "text": args.text}, f"{kind} added to {target}"


def cmd_report(reg, args):
    rep = make_report(reg, parse_since(args.since), gpu_hour_price(args.gpu_hour_price))
    text = format_report(rep)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        rep["out"] = os.path.abspath(args.out)
    return rep, text


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_argument("--registry", type=str, default=None, help="registry file (default: $NANOCHAT_REGISTRY or <base_dir>/lab.sqlite)")
    common.add_argument("--base-dir", type=str, default=None, help="base dir of the run folders (default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    p = argparse.ArgumentParser(description="The training lab: runs, evaluations and models of the registry")
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("list", parents=[common], help="the runs, oldest first")
    s.add_argument("--stage", type=str, default=None, help="only runs of this stage (base, mid, sft, rl)")
    s.add_argument("--status", type=str, default=None, choices=("running", "done", "failed", "killed", "stopped"), help="only runs with this status")
    s = sub.add_parser("show", parents=[common], help="one run: its record, evaluations, notes and model versions")
    s.add_argument("run", help="run id, name or checkpoint directory")
    s = sub.add_parser("compare", parents=[common], help="one table of two or more runs; the first is the reference")
    s.add_argument("runs", nargs="+", help="run ids, names or checkpoint directories")
    s.add_argument("--gpu-hour-price", type=float, default=None, help=f"USD per GPU-hour (default: ${PRICE_ENV} or {DEFAULT_GPU_HOUR_PRICE})")
    s = sub.add_parser("analyze", parents=[common], help="learning-curve findings of a run and a recommendation (nanochat/analysis.py)")
    s.add_argument("run", help="run id, name or checkpoint directory")
    s.add_argument("--project-to", type=int, default=None, help="step of the power-law projection of a base run's val bpb (default: its planned horizon, or 2x its last step)")
    s = sub.add_parser("curves", parents=[common], help="PNG of the train and val curves of runs, overlaid")
    s.add_argument("runs", nargs="+", help="run ids, names or checkpoint directories")
    s.add_argument("--out", type=str, default="curves.png", help="PNG to write")
    s = sub.add_parser("reindex", parents=[common], help="rebuild the runs and evals tables from the run folders")
    s.add_argument("--check", action="store_true", help="only list what differs between the registry and the folders")
    s = sub.add_parser("register", parents=[common], help="make a checkpoint an immutable model version NAME:vN")
    s.add_argument("run", help="RUN or RUN:STEP (default step: the run's last checkpoint)")
    s.add_argument("--name", type=str, required=True, help="model name")
    s = sub.add_parser("alias", parents=[common], help="point NAME@ALIAS at a version")
    s.add_argument("target", help="NAME@ALIAS")
    s.add_argument("version", help="vN")
    s = sub.add_parser("models", parents=[common], help="registered model versions and their aliases")
    s.add_argument("name", nargs="?", default=None, help="only this model")
    for verb, what in (("note", "a note"), ("tag", "a tag")):
        s = sub.add_parser(verb, parents=[common], help=f"add {what} to a run or a model version")
        s.add_argument("target", help="RUN, or a model NAME:vN / NAME@ALIAS")
        s.add_argument("text", help=f"the {verb}")
    s = sub.add_parser("report", parents=[common], help="markdown report of the runs in a time window")
    s.add_argument("--since", type=str, default="24h", help="window: 24h, 7d, 90m, 3600s")
    s.add_argument("--out", type=str, default=None, help="also write the report to this file")
    s.add_argument("--gpu-hour-price", type=float, default=None, help=f"USD per GPU-hour (default: ${PRICE_ENV} or {DEFAULT_GPU_HOUR_PRICE})")
    return p.parse_args(argv)


VERBS = {"list": cmd_list, "show": cmd_show, "compare": cmd_compare, "analyze": cmd_analyze, "curves": cmd_curves, "reindex": cmd_reindex, "register": cmd_register,
         "alias": cmd_alias, "models": cmd_models, "note": cmd_note, "tag": cmd_note, "report": cmd_report}


def main(argv=None):
    args = parse_args(argv)
    if args.base_dir:
        os.environ["NANOCHAT_BASE_DIR"] = args.base_dir  # checkpoint paths and the default registry file follow it
    with Registry(args.registry) as reg:
        result, text = VERBS[args.verb](reg, args)
    if args.json:
        json.dump(result, sys.stdout, indent=1, default=str)
        print()
    else:
        print(text)


if __name__ == "__main__":
    run_main(main)
