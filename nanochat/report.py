"""
The report card of a run: every stage records its section with one call, and `generate` turns the
sections, the evaluation files and the metrics logs into one markdown file with loss curves (and,
where the run registry exists, the lab's compare table of the stages' runs: nanochat/lab.py).

    from nanochat import report
    report.log_stage("base_train", args=vars(args), metrics={"final_val_bpb": bpb}, metrics_file=logger.path)

    python -m nanochat.report reset                          # start a new report (archives the old one)
    python -m nanochat.report generate --gpu-hour-price 2.5  # write <base_dir>/report/report.md

Files, all under <base_dir>/report/ (written atomically; rank 0 only):
    header.json               `reset`: start time, system and git info of the run
    <stage>.json              log_stage(): system and git info, arguments, wall time, GPUs used,
                              metrics (tokens/s, MFU, final losses, ...), tables, metrics file
    base-eval.json            scripts/base_eval.py (CORE, bpb)
    chat-eval-<source>.json   scripts/chat_eval.py (task accuracies, pass@k, ChatCORE)
    report.md, curves-*.png   `generate`

Estimated cost = wall time x the machine's GPUs x price per GPU-hour (--gpu-hour-price, else
$NANOCHAT_GPU_HOUR_PRICE, else DEFAULT_GPU_HOUR_PRICE): a rented node bills every GPU for every
stage, the CPU-only ones included. A machine without GPUs costs nothing here.
"""

import argparse
import datetime
import glob
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys

from nanochat.common import NanochatError, atomic_write_bytes, get_base_dir, get_dist_info, run_main

# USD per GPU-hour when no price is given: the order of an on-demand H100 SXM in 2025 (a 8xH100
# node at ~$24/h). Set your own with --gpu-hour-price or NANOCHAT_GPU_HOUR_PRICE.
DEFAULT_GPU_HOUR_PRICE = 3.0
PRICE_ENV = "NANOCHAT_GPU_HOUR_PRICE"
# The pipeline's order; stages not listed here come after, in the order they were logged.
STAGE_ORDER = ("tok_train", "tok_eval", "base_train", "base_eval", "mid_train", "chat_eval_mid", "chat_sft", "chat_eval_sft", "rsft", "chat_eval_rsft",
               "chat_rl", "chat_eval_rl")
EVAL_SOURCES = ("base", "mid", "sft", "rsft", "rl")
# Curves drawn from a metrics.jsonl, one panel per key present (label, key).
CURVES = (("train loss", "loss"), ("val loss", "val_loss"), ("val bpb", "val_bpb"), ("reward", "reward"), ("GSM8K pass@1 (test)", "eval_pass@1"))
# Keys of a metrics.jsonl whose last value the stage summary keeps.
FINAL_KEYS = ("loss", "val_loss", "val_bpb", "core", "reward", "eval_pass@1")
RESERVED_FILES = ("header.json", "base-eval.json")


def resolve_price(price=None):
    """USD per GPU-hour: price, else $NANOCHAT_GPU_HOUR_PRICE, else DEFAULT_GPU_HOUR_PRICE. Raises
    NanochatError for a value that is not a finite number >= 0."""
    if price is None:
        env = os.environ.get(PRICE_ENV)
        try:
            price = float(env) if env else DEFAULT_GPU_HOUR_PRICE
        except ValueError:
            raise NanochatError(f"${PRICE_ENV}={env!r} is not a number (USD per GPU-hour)") from None
    if not (price >= 0 and math.isfinite(price)):
        raise NanochatError(f"--gpu-hour-price {price} must be a number >= 0")
    return price


def report_dir(base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "report")


# -----------------------------------------------------------------------------
# System and git information


def _run(cmd, cwd=None):
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info():
    """{"commit", "branch", "dirty"} of the repository holding this package (None values outside a checkout)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    status = _run(["git", "status", "--porcelain"], cwd=repo)
    return {
        "commit": _run(["git", "rev-parse", "HEAD"], cwd=repo),
        "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=repo),
        "dirty": None if status is None else bool(status),
    }


def system_info():
    """Host, OS, Python/torch/CUDA versions, CPU count, memory and GPUs of this machine."""
    import torch

    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "memory_gib": None,
        "gpus": [],
    }
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def process_wall_time():
    """Seconds since this process started (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime in clock ticks after boot
    except (OSError, IndexError, ValueError):
        return None


# -----------------------------------------------------------------------------
# Recording a stage


def summarize_metrics(path):
    """
    A stage summary from a metrics.jsonl (nanochat.training.MetricsLogger): "steps" (the last step),
    "tok_per_s" and "mfu" (means over the logged steps, the first one left out: it includes
    compilation and warm-up), "final_<key>" for the last value of each of FINAL_KEYS, and the last
    value of every key the script logged as "final_*" or "*_time_s". Missing file: {}.
    """
    if not os.path.isfile(path):
        return {}
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a crash: the rest is still worth summarising
    out = {}
    steps = [r["step"] for r in rows if isinstance(r.get("step"), (int, float))]
    if steps:
        out["steps"] = max(steps)
    for key in ("tok_per_s", "mfu"):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if len(values) > 1:
            values = values[1:]
        if values:
            out[key] = sum(values) / len(values)
    for row in rows:
        for key, value in row.items():
            if value is None:
                continue
            if key in FINAL_KEYS:
                out[f"final_{key}"] = value
            elif key.startswith("final_") or key.endswith("_time_s"):
                out[key] = value
    return out


def log_stage(stage, args=None, metrics=None, tables=None, metrics_file=None, base_dir=None):
    """
    Record one stage of the run in <base_dir>/report/<stage>.json (rank 0; other ranks return None).

    stage: a name such as "base_train" (the file name; see STAGE_ORDER). args: the script's
    vars(args). metrics: dict of numbers/strings (tokens/s, MFU, final losses, ...); "wall_time_s"
    overrides the measured wall time (default: since the process started). tables: {title: markdown
    str, or a list of dict rows}, shown under the stage. metrics_file: the stage's metrics.jsonl;
    its summary (summarize_metrics) fills in metrics not given, and `generate` draws its curves.
    GPUs billed: every GPU of the machine (a rented node bills them all, whichever stage runs).
    Returns the path written. Raises NanochatError for a stage name other than [a-z0-9_]+ (or "header").
    """
    _, rank, _, _ = get_dist_info()
    if rank != 0:
        return None
    if not isinstance(stage, str) or not re.fullmatch(r"[a-z0-9_]+", stage) or stage == "header":
        raise NanochatError(f"report.log_stage: bad stage name {stage!r} (lower-case letters, digits and _)")
    metrics = dict(metrics or {})
    summary = summarize_metrics(metrics_file) if metrics_file else {}
    metrics = summary | metrics
    wall = metrics.pop("wall_time_s", None)
    if wall is None:
        wall = process_wall_time()
    system = system_info()
    record = {
        "stage": stage,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": wall,
        "gpus": len(system["gpus"]),
        "system": system,
        "git": git_info(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "args": args or {},
        "metrics": metrics,
        "tables": tables or {},
        "metrics_file": os.path.abspath(metrics_file) if metrics_file else None,
    }
    d = report_dir(base_dir)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{stage}.json")
    atomic_write_bytes(path, json.dumps(record, indent=1, default=str).encode())
    return path


def reset(base_dir=None):
    """
    Start a new report: an existing report directory is moved to <base_dir>/report-archive/<time>/
    (nothing is deleted), then a fresh one gets header.json (start time, system, git). Returns the
    header path.
    """
    d = report_dir(base_dir)
    now = datetime.datetime.now(datetime.timezone.utc)
    if os.path.isdir(d) and os.listdir(d):
        archive = os.path.join(os.path.dirname(d), "report-archive", now.strftime("%Y%m%dT%H%M%S%fZ"))
        os.makedirs(os.path.dirname(archive), exist_ok=True)
        shutil.move(d, archive)
    os.makedirs(d, exist_ok=True)
    header = {"started": now.isoformat(timespec="seconds"), "system": system_info(), "git": git_info()}
    path = os.path.join(d, "header.json")
    atomic_write_bytes(path, json.dumps(header, indent=1).encode())
    return path


# -----------------------------------------------------------------------------
# Generating report.md


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise NanochatError(f"cannot read report file {path}: {e}") from None


def fmt(value, digits=4):
    """A number for a markdown table: "-" for None, thousands separators, 4 decimals (digits), and
    scientific notation below 1e-3 or from 1e5 on."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.{digits}f}"
    return str(value)


def _duration(seconds):
    if seconds is None:
        return "-"
    s = round(seconds)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s"


def markdown_table(rows, columns=None):
    """A markdown table of a list of dicts (columns: the keys of the first row unless given)."""
    if not rows:
        return "(empty)"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def load_stages(d):
    """The stage records in report dir d, in pipeline order."""
    records = []
    for path in glob.glob(os.path.join(d, "*.json")):
        name = os.path.basename(path)
        if name in RESERVED_FILES or name.startswith("chat-eval-"):
            continue
        records.append(_read_json(path))
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(records, key=lambda r: (order.get(r.get("stage"), len(order)), r.get("time", "")))


def final_loss(metrics):
    """The loss a stage ended at, for the stage table: (name, value) or (None, None)."""
    for key in ("final_val_bpb", "final_val_loss", "final_reward", "final_loss"):
        if metrics.get(key) is not None:
            return key.removeprefix("final_"), metrics[key]
    return None, None


def eval_table(d):
    """Markdown: rows = metrics, columns = the stages (EVAL_SOURCES: base, mid, sft, rsft, rl) that were evaluated."""
    columns, cells = [], {}
    base = _read_json(os.path.join(d, "base-eval.json")) if os.path.isfile(os.path.join(d, "base-eval.json")) else None
    rows, tasks = [], []  # tasks: in the order the chat-eval files list them (the suite's order)
    if base:
        if "core" in base:
            cells[("CORE", "base")] = base["core"].get("core")
            rows.append("CORE")
        if "val" in base.get("bpb", {}):
            cells[("val bpb", "base")] = base["bpb"]["val"]["bpb"]
            rows.append("val bpb")
        columns.append("base")
    for source in EVAL_SOURCES:
        path = os.path.join(d, f"chat-eval-{source}.json")
        if not os.path.isfile(path):
            continue
        ev = _read_json(path)
        if source not in columns:
            columns.append(source)
        if ev.get("chatcore") is not None:
            cells[("ChatCORE", source)] = ev["chatcore"]
        for task, r in ev.get("tasks", {}).items():
            if task not in tasks:
                tasks.append(task)
            cells[(task, source)] = r.get("accuracy")
            for k, v in (r.get("pass_at_k") or {}).items():
                if str(k) != "1":
                    cells[(f"{task} pass@{k}", source)] = v
    if not columns:
        return None
    columns = [c for c in EVAL_SOURCES if c in columns]
    names = {name for name, _ in cells}
    extra = sorted(n for n in names if n not in rows and n != "ChatCORE" and n not in tasks)
    rows += [n for n in ["ChatCORE"] + tasks if n in names and n not in rows] + extra
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += ["| " + r + " | " + " | ".join(fmt(cells.get((r, c))) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def stages_compare(base_dir, gpu_hour_price):
    """
    The lab's compare table (nanochat.lab.compare) of the stages of this base dir: the newest run
    in the run registry of each stage of EVAL_SOURCES (base, mid, sft, rsft, rl) whose checkpoints lie
    under <base_dir>/checkpoints, the first of them the reference. Markdown, or None when there is
    no registry ($NANOCHAT_REGISTRY=off, or no file) or no such run. A registry that cannot be
    read is one line in the table's place: the report card never fails on it.
    """
    from nanochat import lab  # nanochat.lab (and the registry) build on this module: imported here, not at the top
    from nanochat.registry import Registry, registry_path

    path = registry_path(None, base_dir)
    if path is None or not os.path.isfile(path):
        return None
    root = os.path.realpath(os.path.join(base_dir, "checkpoints"))
    try:
        with Registry(path, readonly=True) as reg:
            newest = {r["stage"]: r for r in reg.runs() if r.get("ckpt_dir") and os.path.realpath(r["ckpt_dir"]).startswith(root + os.sep)}
            runs = [newest[stage] for stage in EVAL_SOURCES if stage in newest]
            if not runs:
                return None
            table = lab.format_compare(lab.compare(reg, runs, gpu_hour_price))
    except NanochatError as e:
        return f"(the run registry could not be read: {e})"
    names = " ".join(lab.ref_name(r) for r in runs)
    return f"The newest registered run of each stage (`python -m scripts.lab compare {names}`).\n\n{table}"


def metrics_files(base_dir, records):
    """(label, path) of every metrics.jsonl to plot: those named by stage records, then any other
    under <base_dir>/checkpoints/<stage>/<tag>/run/."""
    seen, out = set(), []
    for r in records:
        path = r.get("metrics_file")
        if path and os.path.isfile(path) and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            out.append((r["stage"], path))
    for path in sorted(glob.glob(os.path.join(base_dir, "checkpoints", "*", "*", "run", "metrics.jsonl"))):
        if os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            parts = path.split(os.sep)
            out.append((f"{parts[-4]}-{parts[-3]}", path))
    return out


def plot_curves(label, path, out_png):
    """Draw one panel per key of CURVES present in the metrics.jsonl at path, against step. Returns
    out_png, or None when the file has none of those keys."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to files only
    import matplotlib.pyplot as plt

    series = {key: ([], []) for _, key in CURVES}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            for _, key in CURVES:
                if isinstance(row.get(key), (int, float)) and isinstance(row.get("step"), (int, float)):
                    series[key][0].append(row["step"])
                    series[key][1].append(row[key])
    panels = [(title, key) for title, key in CURVES if series[key][0]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, key) in zip(axes[0], panels):
        steps, values = series[key]
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(label, fontsize=11)
    fig.tight_layout()
    tmp = out_png + f".tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def generate(base_dir=None, gpu_hour_price=None):
    """
    Write <base_dir>/report/report.md (and one curves-<label>.png per metrics file) from the stage
    records, the evaluation files, the metrics logs and, where a run registry exists, the compare
    table of the stages' runs (stages_compare). gpu_hour_price: USD per GPU-hour (default
    $NANOCHAT_GPU_HOUR_PRICE, else DEFAULT_GPU_HOUR_PRICE). Returns the report path. Raises
    NanochatError for an unreadable record or a bad price.
    """
    base_dir = base_dir or get_base_dir()
    d = report_dir(base_dir)
    os.makedirs(d, exist_ok=True)
    gpu_hour_price = resolve_price(gpu_hour_price)
    header = _read_json(os.path.join(d, "header.json")) if os.path.isfile(os.path.join(d, "header.json")) else {}
    records = load_stages(d)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = ["# nanochat report", "", f"Generated {now}" + (f"; run started {header['started']}" if header.get("started") else "") + ".", ""]

    # ------------------------------------------------------------------ environment
    ref = records[-1] if records else header
    system, git = ref.get("system") or header.get("system") or {}, ref.get("git") or header.get("git") or {}
    if system or git:
        lines += ["## Environment", ""]
        if git.get("commit"):
            lines.append(f"- git: {git['commit'][:12]} on {git.get('branch')}" + (" (uncommitted changes)" if git.get("dirty") else ""))
        if system:
            gpus = system.get("gpus") or []
            gpu_text = f"{len(gpus)} x {gpus[0]}" if gpus else "none"
            lines.append(f"- host: {system.get('hostname')} ({system.get('platform')}), {system.get('cpu_count')} CPUs, {system.get('memory_gib')} GiB RAM")
            lines.append(f"- GPUs: {gpu_text}; Python {system.get('python')}, torch {system.get('torch')}, CUDA {system.get('cuda')}")
        lines.append("")

    # ------------------------------------------------------------------ stages
    if records:
        lines += ["## Stages", "", "| stage | wall time | GPUs | tokens/s | MFU | final | est. cost |", "|---|---|---|---|---|---|---|"]
        total_time, total_cost = 0.0, 0.0
        for r in records:
            m = r.get("metrics", {})
            wall, gpus = r.get("wall_time_s"), r.get("gpus", 0) or 0
            cost = (wall or 0) / 3600 * gpus * gpu_hour_price
            total_time += wall or 0
            total_cost += cost
            name, value = final_loss(m)
            loss = f"{name} {fmt(value)}" if name else "-"
            mfu = f"{100 * m['mfu']:.1f}%" if isinstance(m.get("mfu"), (int, float)) else "-"
            tps = f"{m['tok_per_s']:,.0f}" if isinstance(m.get("tok_per_s"), (int, float)) else "-"
            lines.append(f"| {r['stage']} | {_duration(wall)} | {gpus} | {tps} | {mfu} | {loss} | ${cost:,.2f} |")
        lines.append(f"| **total** | {_duration(total_time)} | | | | | ${total_cost:,.2f} |")
        lines += ["", f"Cost: wall time x the machine's GPUs x ${gpu_hour_price:.2f} per GPU-hour (--gpu-hour-price or ${PRICE_ENV}).", ""]

    # ------------------------------------------------------------------ evaluations
    table = eval_table(d)
    if table:
        lines += ["## Evaluation", "", table, ""]
    table = stages_compare(base_dir, gpu_hour_price)
    if table:
        lines += ["## Stages compared (run registry)", "", table, ""]

    # ------------------------------------------------------------------ curves
    pngs = []
    for label, path in metrics_files(base_dir, records):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        png = plot_curves(label, path, os.path.join(d, f"curves-{safe}.png"))
        if png:
            pngs.append((label, os.path.basename(png)))
    if pngs:
        lines += ["## Curves", ""]
        lines += [f"![{label}]({name})" for label, name in pngs]
        lines.append("")

    # ------------------------------------------------------------------ per-stage details
    for r in records:
        lines += [f"## {r['stage']}", "", f"- finished {r.get('time')}, wall time {_duration(r.get('wall_time_s'))}, {r.get('gpus', 0)} GPUs"]
        if r.get("command"):
            lines.append(f"- command: `{r['command']}`")
        lines.append("")
        if r.get("metrics"):
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in r["metrics"].items()] + [""]
        for title, t in (r.get("tables") or {}).items():
            lines += [f"### {title}", "", t if isinstance(t, str) else markdown_table(t), ""]
        if r.get("args"):
            lines += ["<details><summary>arguments</summary>", "", "```json", json.dumps(r["args"], indent=1, default=str), "```", "", "</details>", ""]
    path = os.path.join(d, "report.md")
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


# -----------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description="The run's report card")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write <base_dir>/report/report.md and the curve PNGs")
    g.add_argument("--gpu-hour-price", type=float, default=None, help=f"USD per GPU-hour for the cost estimate (default ${PRICE_ENV} or {DEFAULT_GPU_HOUR_PRICE})")
    g.add_argument("--base-dir", type=str, default=None, help="run directory (default $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    r = sub.add_parser("reset", help="start a new report (the old one is archived under <base_dir>/report-archive/)")
    r.add_argument("--base-dir", type=str, default=None, help="run directory (default $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    args = p.parse_args(argv)
    if args.command == "generate":
        print(f"wrote {generate(args.base_dir, args.gpu_hour_price)}")
    else:
        print(f"new report started: {reset(args.base_dir)}")


if __name__ == "__main__":
    run_main(main)
