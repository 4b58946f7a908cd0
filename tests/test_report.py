"""
The report card (nanochat/report.py): the stage record, the metrics summary, report.md from fixture
files (stage table with the cost, evaluation table across stages, loss-curve PNGs, the lab's compare
table of the stages' runs where a run registry exists), reset, and the errors.
"""

import json
import os

import pytest

from nanochat import report
from nanochat.checkpoint_manager import checkpoint_dir
from nanochat.common import NanochatError
from nanochat.registry import Registry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


BASE_ROWS = [
    {"step": 0, "val_bpb": 2.0},
    {"step": 1, "loss": 5.0, "tok_per_s": 100.0, "mfu": 0.10},  # warm-up step: left out of the means
    {"step": 2, "loss": 4.0, "tok_per_s": 200.0, "mfu": 0.20},
    {"step": 3, "loss": 3.0, "tok_per_s": 300.0, "mfu": 0.40},
    {"step": 3, "val_bpb": 1.5},
    {"step": 3, "final_val_bpb": 1.5, "unigram_val_bpb": 2.5, "train_time_s": 12.0},
]


def test_summarize_metrics(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", BASE_ROWS)
    with open(path, "a") as f:
        f.write('{"step": 4, "loss": 2.')  # a line cut by a crash is skipped
    s = report.summarize_metrics(path)
    assert s == {"steps": 3, "tok_per_s": 250.0, "mfu": pytest.approx(0.30), "final_loss": 3.0, "final_val_bpb": 1.5, "train_time_s": 12.0}
    assert report.summarize_metrics(str(tmp_path / "missing.jsonl")) == {}


def test_log_stage_record(base_dir, monkeypatch):
    path = write_metrics(base_dir / "checkpoints" / "base" / "d4" / "run" / "metrics.jsonl", BASE_ROWS)
    out = report.log_stage("base_train", args={"depth": 4}, metrics={"final_val_bpb": 1.25, "wall_time_s": 60.0}, tables={"t": [{"a": 1}]}, metrics_file=path)
    assert out == str(base_dir / "report" / "base_train.json")
    with open(out) as f:
        r = json.load(f)
    assert r["stage"] == "base_train" and r["args"] == {"depth": 4} and r["wall_time_s"] == 60.0
    assert r["metrics"]["final_val_bpb"] == 1.25  # explicit metrics win over the summary
    assert r["metrics"]["tok_per_s"] == 250.0 and r["metrics"]["steps"] == 3
    assert r["gpus"] == len(r["system"]["gpus"]) and r["system"]["cpu_count"] >= 1 and "python" in r["system"]
    assert "commit" in r["git"] and r["metrics_file"] == path
    # the measured wall time when none is given: this process's age, positive
    r2 = json.load(open(report.log_stage("tok_train", metrics={})))
    assert r2["wall_time_s"] is None or r2["wall_time_s"] > 0
    # only rank 0 writes
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert report.log_stage("mid_train", metrics={}) is None
    assert not os.path.exists(base_dir / "report" / "mid_train.json")
    monkeypatch.delenv("RANK")
    for bad in ("../x", "Base", "header", "chat-eval-sft", ""):
        with pytest.raises(NanochatError, match="stage name"):
            report.log_stage(bad)


def fixture_run(base_dir, monkeypatch):
    """A finished run's report dir: header, three stage records (on a fake 8-GPU machine), the eval files."""
    real = report.system_info
    monkeypatch.setattr(report, "system_info", lambda: real() | {"gpus": ["NVIDIA H100 80GB HBM3"] * 8})
    report.reset()
    base_m = write_metrics(base_dir / "checkpoints" / "base" / "d4" / "run" / "metrics.jsonl", BASE_ROWS)
    report.log_stage("base_train", args={"depth": 4}, metrics={"wall_time_s": 3600.0}, metrics_file=base_m)
    sft_m = write_metrics(base_dir / "checkpoints" / "sft" / "d4" / "run" / "metrics.jsonl", [{"step": i, "loss": 2.0 - 0.1 * i} for i in range(1, 6)] + [{"step": 5, "val_loss": 1.4}])
    report.log_stage("chat_sft", metrics={"wall_time_s": 900.0}, metrics_file=sft_m)
    rl_m = write_metrics(base_dir / "checkpoints" / "rl" / "d4" / "run" / "metrics.jsonl", [{"step": 0, "eval_pass@1": 0.02}] + [{"step": i, "reward": 0.1 * i, "tok_per_s": 50.0} for i in range(1, 4)] + [{"step": 3, "eval_pass@1": 0.05}])
    report.log_stage("chat_rl", metrics={"wall_time_s": 1800.0, "gsm8k_pass@1_after": 0.05}, tables={"samples": "| a | b |\n|---|---|\n| 1 | 2 |"}, metrics_file=rl_m)
    # a metrics file no stage record names still gets its curves
    write_metrics(base_dir / "checkpoints" / "mid" / "d4" / "run" / "metrics.jsonl", [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.4}])
    d = base_dir / "report"
    base_eval = {"model_tag": "d4", "step": 3, "core": {"core": 0.1234, "results": {}}, "bpb": {"train": {"bpb": 1.1, "tokens": 10}, "val": {"bpb": 1.2, "tokens": 10}}}
    (d / "base-eval.json").write_text(json.dumps(base_eval))
    for source, gsm, chatcore in (("sft", 0.03, 0.21), ("rl", 0.07, 0.25)):
        tasks = {
            "ARC-Easy": {"task": "ARC-Easy", "accuracy": 0.4, "chance": 0.25, "centered": 0.2},
            "GSM8K": {"task": "GSM8K", "accuracy": gsm, "chance": 0.0, "centered": gsm, "pass_at_k": {"1": gsm, "8": gsm * 3}},
        }
        (d / f"chat-eval-{source}.json").write_text(json.dumps({"source": source, "tasks": tasks, "chatcore": chatcore}))


def test_generate_writes_tables_and_curves(base_dir, monkeypatch):
    fixture_run(base_dir, monkeypatch)
    path = report.generate(gpu_hour_price=2.0)
    md = open(path).read()
    lines = md.splitlines()
    # stage table, in pipeline order, cost = hours x 8 GPUs x $2
    stage_rows = [line for line in lines if line.startswith(("| base_train |", "| chat_sft |", "| chat_rl |"))]
    assert [row.split("|")[1].strip() for row in stage_rows] == ["base_train", "chat_sft", "chat_rl"]
    assert stage_rows[0].endswith("$16.00 |") and "1h00m00s" in stage_rows[0] and "| 8 |" in stage_rows[0]
    assert "val_bpb 1.5000" in stage_rows[0] and "250" in stage_rows[0] and "30.0%" in stage_rows[0]
    assert stage_rows[1].endswith("$4.00 |") and stage_rows[2].endswith("$8.00 |")
    assert any(line.startswith("| **total** | 1h45m00s |") and line.endswith("$28.00 |") for line in lines)
    # evaluation table across stages
    header = next(line for line in lines if line.startswith("| metric | base"))
    assert header == "| metric | base | sft | rl |"
    row = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines if line.startswith("| ") and line.count("|") == 5}
    assert row["CORE"] == ["0.1234", "-", "-"] and row["val bpb"] == ["1.2000", "-", "-"]
    assert row["ChatCORE"] == ["-", "0.2100", "0.2500"] and row["GSM8K"] == ["-", "0.0300", "0.0700"]
    assert row["GSM8K pass@8"] == ["-", "0.0900", "0.2100"] and row["ARC-Easy"] == ["-", "0.4000", "0.4000"]
    # curves: one PNG per metrics file, real PNGs, linked from the markdown
    pngs = sorted(f for f in os.listdir(base_dir / "report") if f.endswith(".png"))
    assert pngs == ["curves-base_train.png", "curves-chat_rl.png", "curves-chat_sft.png", "curves-mid-d4.png"]
    for name in pngs:
        assert open(base_dir / "report" / name, "rb").read(8) == PNG_MAGIC
        assert f"]({name})" in md
    assert "### samples" in md and "| 1 | 2 |" in md and '"depth": 4' in md
    assert "8 x NVIDIA H100 80GB HBM3" in md
    assert "## Stages compared" not in md  # no run registry: no section


def test_generate_includes_the_compare_table_of_the_stages(base_dir, monkeypatch, tmp_path):
    """The newest registered run of each stage under this base dir, in pipeline order, through the
    lab's compare; runs of other base dirs (a shared $NANOCHAT_REGISTRY) are left out."""
    fixture_run(base_dir, monkeypatch)
    with Registry() as reg:
        runs = (("old00001", "old-base", "base", "d3", base_dir), ("base0001", "b", "base", "d4", base_dir), ("sft00001", "s", "sft", "d4", base_dir),
                ("else0001", "elsewhere", "mid", "d4", tmp_path / "other"))
        for i, (run_id, name, stage, tag, base) in enumerate(runs):
            parent = {"parent_run_id": "base0001", "parent_step": 3} if stage == "sft" else {}
            reg.put_run({"id": run_id, "name": name, "stage": stage, "model_tag": tag, "ckpt_dir": checkpoint_dir(stage, tag, str(base)),
                         "status": "done", "started": float(i), "wall_s": 3600.0, "device": "cuda NVIDIA H100", "world_size": 8} | parent)
        reg.add_evals([{"run_id": "base0001", "step": 3, "metric": "val_bpb", "value": 1.5, "source": "train"},
                       {"run_id": "sft00001", "step": 5, "metric": "ARC-Easy", "value": 0.4, "n": 100, "kind": "proportion", "baseline": 0.25,
                        "source": "chat_eval"}])
    md = open(report.generate(gpu_hour_price=2.0)).read()
    section = md.split("## Stages compared (run registry)\n", 1)[1].split("\n## ", 1)[0]
    assert "`python -m scripts.lab compare b s`" in section and "| metric | b | s | winner |" in section
    assert "| ARC-Easy | - | 0.4000 [0.309, 0.498] n=100; chance 0.2500 | - |" in section
    assert "| final val_bpb | 1.5000 | - | - |" in section and "| cost ($) | 16.0000 | 16.0000 (+0) | tie |" in section
    assert "old-base" not in section and "elsewhere" not in section
    # an unreadable registry is one line in the section's place; the registry turned off: no section
    (base_dir / "lab.sqlite").write_bytes(b"not a database" * 100)
    for suffix in ("-wal", "-shm"):
        if (base_dir / f"lab.sqlite{suffix}").exists():
            (base_dir / f"lab.sqlite{suffix}").unlink()
    md = open(report.generate()).read()
    assert "(the run registry could not be read: cannot open the registry" in md
    monkeypatch.setenv("NANOCHAT_REGISTRY", "off")
    assert "## Stages compared" not in open(report.generate()).read()


def test_price_from_env_and_bad_price(base_dir, monkeypatch):
    fixture_run(base_dir, monkeypatch)
    monkeypatch.setenv(report.PRICE_ENV, "1.5")
    md = open(report.generate()).read()
    assert "$12.00 |" in md and "$1.50 per GPU-hour" in md
    monkeypatch.setenv(report.PRICE_ENV, "cheap")
    with pytest.raises(NanochatError, match="cheap"):
        report.generate()
    with pytest.raises(NanochatError, match="gpu-hour-price"):
        report.generate(gpu_hour_price=-1.0)


def test_reset_archives_and_cli(base_dir, monkeypatch, capsys):
    fixture_run(base_dir, monkeypatch)
    report.main(["generate"])
    assert "report.md" in capsys.readouterr().out
    report.main(["reset"])
    assert os.listdir(base_dir / "report") == ["header.json"]
    archived = os.listdir(base_dir / "report-archive")
    assert len(archived) == 1
    kept = set(os.listdir(base_dir / "report-archive" / archived[0]))
    assert {"report.md", "base_train.json", "base-eval.json", "chat-eval-rl.json", "header.json"} <= kept
    # an empty report generates without stages
    md = open(report.generate()).read()
    assert md.startswith("# nanochat report") and "## Stages" not in md
