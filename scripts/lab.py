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
    python -m scripts.lab report [--since 24h] [--out lab.md]      # runs, bests and deltas, cost, stale data, analyzer warnings

The computations on registry rows (compare and its statistics) live in nanochat/lab.py.

RUN is a run id (or a unique prefix of 4+ characters), a run name (the newest run of that name), or
the path of a checkpoint directory (or one of its step_* directories). Every verb takes --json
(the same content, machine-readable), --registry PATH and --base-dir DIR. Bad input: one line on
stderr, exit 1.
"""

import argparse
import json
import os
import re
import sys
from collections import Counter

from nanochat import analysis
from nanochat.checkpoint_manager import STAGES, list_steps, load_meta
from nanochat.common import NanochatError, get_base_dir, run_main
from nanochat.lab import (
    LOWER_IS_BETTER,
    compare,
    final_metric,
    format_compare,
    gpu_hours,
    interval,
    latest_evals,
    metrics_path,
    parent_evals,
    ref_name,
    train_curves,
)
from nanochat.registry import Registry, file_hash, iso, now, read_jsonl, reindex
from nanochat.report import DEFAULT_GPU_HOUR_PRICE, PRICE_ENV, fmt, markdown_table, resolve_price

CURVE_KEYS = ("loss", "val_bpb", "val_loss", "eval_pass@1", "core", "reward")  # panels of `curves`, when present
STALE_RUNS_LISTED = 5  # runs named per stale recipe in the report (the newest; the rest are counted)


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


def stale_recipes(runs):
    """The data recipes that no longer hold what runs trained on: one entry per recipe file and
    recorded sha256, {"recipe", "recorded", "now" (the file's sha256 now, None when it is gone),
    "runs" (names, oldest first)}, for runs that recorded a recipe (mid, SFT)."""
    groups, current, out = {}, {}, []
    for r in runs:
        if r.get("recipe_path") and r.get("recipe_hash"):
            groups.setdefault((r["recipe_path"], r["recipe_hash"]), []).append(ref_name(r))
    for (path, recorded), names in groups.items():
        if path not in current:
            try:
                current[path] = file_hash(path)
            except OSError:  # deleted, moved or unreadable: the recipe cannot be rebuilt from it
                current[path] = None
        if current[path] != recorded:
            out.append({"recipe": path, "recorded": recorded, "now": current[path], "runs": names})
    return out


def analyze_run(run, project_to=None):
    """nanochat.analysis.analyze of a run's metrics.jsonl (an Analysis)."""
    planned = (run.get("config") or {}).get("num_iterations")
    return analysis.analyze(read_jsonl(metrics_path(run)), stage=run["stage"], num_iterations=planned, project_to=project_to)


def recommendations(runs):
    """The analyzer on each run that finished (any status but running): [{"run", "stage", "model_tag",
    "status", "warnings" (kinds of the warning and critical findings), "recommendation"}] of those with
    a warning, and the number of finished runs analysed."""
    finished = [r for r in runs if r["status"] != "running"]
    out = []
    for r in finished:
        result = analyze_run(r)
        warnings = [f.kind for f in result.findings if f.severity != "info"]
        if warnings:
            out.append({"run": ref_name(r), "stage": r["stage"], "model_tag": r["model_tag"], "status": r["status"],
                        "warnings": warnings, "recommendation": result.recommendation})
    return out, len(finished)


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
    advice, analysed = recommendations(window)
    return {"time": t, "since": since, "previous_report": previous["time"] if previous else None, "counts": counts,
            "gpu_hours": hours, "cost": hours * price, "gpu_hour_price": price,
            "runs": [{k: r[k] for k in ("name", "id", "stage", "model_tag", "status", "stop_reason", "wall_s")}
                     | {"started": iso(r["started"]), "gpu_hours": gpu_hours(r), "final": final_metric(r, reg.evals(r["id"]))} for r in window],
            "best": best, "stale_recipes": stale_recipes(reg.runs()), "recommendations": advice, "analysed": analysed}


def format_report(rep):
    c = rep["counts"]
    previous = f"; previous report {iso(rep['previous_report'])}" if rep["previous_report"] else ""
    lines = ["# nanochat lab report", "", f"From {iso(rep['since'])} to {iso(rep['time'])}{previous}.", ""]
    lines += ["## Runs", "", f"{c['started']} started, {c['done']} finished, {c['failed']} failed, {c['killed']} killed, "
              f"{c['stopped']} stopped, {c['running']} running.", ""]
    rows = []
    for r in rep["runs"]:
        status = r["status"] + (f" ({r['stop_reason']})" if r["stop_reason"] else "")
        final = f"{r['final'][0]} {fmt(r['final'][1])}" if r["final"][0] else "-"
        rows.append({"run": r["name"], "stage": r["stage"], "tag": r["model_tag"], "status": status, "started": r["started"], "wall (s)": r["wall_s"],
                     "GPU-h": r["gpu_hours"], "final": final})
    lines += [markdown_table(rows) if rows else "(no runs in the window)", ""]
    lines += ["## Compute", "", f"{rep['gpu_hours']:.2f} GPU-hours, ${rep['cost']:,.2f} at ${rep['gpu_hour_price']:.2f} per GPU-hour "
              "(whole runs active in the window).", ""]
    lines += ["## Best run per metric (all runs)", ""]
    rows = [{"stage/metric": k, "best": b["value"], "run": b["run"], "previous report": b["previous"], "delta": b["delta"]}
            for k, b in sorted(rep["best"].items())]
    lines += [markdown_table(rows) if rows else "(no evaluations yet)", ""]
    lines += ["## Stale datasets (all runs)", ""]
    for x in rep["stale_recipes"]:
        names = x["runs"][-STALE_RUNS_LISTED:]
        more = f" and {len(x['runs']) - len(names)} earlier" if len(x["runs"]) > len(names) else ""
        state = f"changed (sha256 {x['recorded'][:12]} then, {x['now'][:12]} now)" if x["now"] else "gone"
        lines.append(f"- `{x['recipe']}` {state}: runs {', '.join(names)}{more} trained on data it no longer gives")
    if not rep["stale_recipes"]:
        lines.append("(none: every recorded data recipe still has the content its runs trained on)")
    lines += ["", "## Recommendations (runs finished in the window)", ""]
    for x in rep["recommendations"]:
        lines.append(f"- {x['run']} ({x['stage']}/{x['model_tag']}, {x['status']}) {', '.join(x['warnings'])}: {x['recommendation']}")
    quiet = rep["analysed"] - len(rep["recommendations"])
    lines.append(f"{quiet} other finished run(s) without warnings; `lab analyze RUN` gives all findings." if rep["recommendations"]
                 else f"(no warnings in the {quiet} finished run(s); `lab analyze RUN` gives all findings)")
    lines.append("")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The verbs: each returns (json-able result, text)


def _run_row(reg, r):
    name, value = final_metric(r, reg.evals(r["id"]))
    return {"name": r["name"], "id": r["id"], "stage": r["stage"], "tag": r["model_tag"], "status": r["status"], "started": iso(r["started"]),
            "wall (s)": f"{r['wall_s']:.1f}" if r["wall_s"] is not None else None, "final": f"{name} {fmt(value)}" if name else None,
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
        parent, rows = parent_evals(reg, r), []
        for ev in evals:  # the evaluation scripts' results next to the checkpoint the run started from
            ev["parent"] = parent.get((ev["metric"], ev["bucket"])) if ev["source"] != "train" else None
            iv = interval(ev)
            metric = ev["metric"] + (f" [{ev['bucket']}]" if ev["bucket"] else "")
            rows.append({"source": ev["source"], "step": ev["step"], "metric": metric, "value": ev["value"], "n": ev["n"],
                         "95% interval": f"[{iv[0]:.4f}, {iv[1]:.4f}]" if iv else None, "parent": ev["parent"], "chance": ev["baseline"]})
        lines += ["## Evaluations", "", markdown_table(rows), ""]
        if any(ev["parent"] is not None or ev["baseline"] is not None for ev in evals):
            lines += [f"parent: the same evaluation of the checkpoint it started from ({r['parent_stage']}/{r['parent_tag']} step "
                      f"{r['parent_step']}); chance: a model that guesses (0 for the centred CORE and ChatCORE).", ""]
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
    result = compare(reg, [reg.get_run(ref) for ref in args.runs], resolve_price(args.gpu_hour_price))
    return result, format_compare(result)


def cmd_analyze(reg, args):
    r = reg.get_run(args.run)
    result = analyze_run(r, args.project_to)
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

    cols = ("run_id", "source", "step", "metric", "bucket", "value", "n", "stderr", "kind", "baseline", "time")
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
    rep = make_report(reg, parse_since(args.since), resolve_price(args.gpu_hour_price))
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
    s.add_argument("--stage", type=str, default=None, help=f"only runs of this stage ({', '.join(STAGES)})")
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
