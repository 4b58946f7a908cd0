"""
The run and model registry (nanochat/registry.py) and its hooks: two processes writing at once lose
no row; a run whose process died shows "killed" (a real SIGKILL of a training run too); reindex of
the run folders equals the live registry, evaluation baselines included (hand-made folders, and
real base_train runs that finish, stop, resume, fail and are killed); an old schema is migrated;
the same checkpoint registered twice is one version; an alias moves and `chat_cli --model
NAME@alias` loads that version; a broken registry never stops training.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import byte_tokenizer
from helpers.scripts_util import REPO, SHARED_DATA, make_env, small_data_dir
from nanochat.checkpoint_manager import apply_model_ref, checkpoint_dir, resolve_model_ref, save_checkpoint
from nanochat.common import NanochatError
from nanochat.gpt import GPT, GPTConfig
from nanochat.registry import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Registry,
    RunRecorder,
    base_eval_rows,
    centred_mean_stderr,
    chat_eval_rows,
    pid_alive,
    record_evals,
    reindex,
)
from scripts.lab import diff_registry

TOK = byte_tokenizer()
TINY = GPTConfig(sequence_len=64, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
needs_data = pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_DATA, "pretrain", "shard_00006.parquet")), reason="needs ../shared/data")


def record(run_id, stage="base", tag="t", **extra):
    return {"id": run_id, "stage": stage, "model_tag": tag, "config": {"total_batch_size": 256}, "device": "cpu", "world_size": 1} | extra


def fake_run(base, run_id, tag, rows, status=None, name=None):
    """A run folder as RunState leaves it: run.json written through RunRecorder, metrics.jsonl rows."""
    run_dir = os.path.join(checkpoint_dir("base", tag, str(base)), "run")
    os.makedirs(run_dir, exist_ok=True)
    rec = RunRecorder(run_dir)
    rec.start(record(run_id, tag=tag, name=name, ckpt_dir=os.path.dirname(run_dir)), os.path.join(run_dir, "metrics.jsonl"))
    for r in rows:  # as RunState.log: the metrics row, then the recorder
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(r) + "\n")
        rec.log(r)
    if status:
        rec.end(status, stop_reason="test", summary={"final_val_bpb": 1.0})
    return rec


# ------------------------------------------------------------------------------------------------ the database


def test_schema_is_versioned_and_a_newer_file_is_refused(tmp_path):
    path = str(tmp_path / "lab.sqlite")
    with Registry(path) as reg:
        assert reg.version() == SCHEMA_VERSION
        reg.put_run(record("r1") | {"status": "done"})
    with Registry(path) as reg:  # reopening migrates nothing and keeps the rows
        assert [r["name"] for r in reg.runs()] == ["e001"]
        reg.db.execute(f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
    with pytest.raises(NanochatError, match="newer than this code"):
        Registry(path)


def test_names_ids_and_checkpoint_dirs_resolve_to_runs(tmp_path, base_dir):
    with Registry() as reg:
        reg.put_run(record("abcdef012345", ckpt_dir=str(tmp_path)) | {"status": "done", "started": 1.0})
        reg.put_run(record("abcd99999999", name="mine") | {"status": "done", "started": 2.0})
        assert reg.get_run("e001")["id"] == "abcdef012345" and reg.get_run("mine")["id"] == "abcd99999999"
        assert reg.get_run("abcdef")["id"] == "abcdef012345"
        with pytest.raises(NanochatError, match="matches 2 runs"):
            reg.get_run("abcd")
        with pytest.raises(NanochatError, match="no run 'nope'"):
            reg.get_run("nope")
        rows = [{"step": 1, "loss": 2.0}, {"step": 1, "val_bpb": 1.5}]
        fake_run(base_dir, "abcdef012345", "t", rows)
        assert reg.get_run(checkpoint_dir("base", "t", str(base_dir)))["id"] == "abcdef012345"


def test_a_version_1_file_is_migrated_and_keeps_its_rows(tmp_path):
    """A registry written before the evals had a baseline column: opening it adds the column (NULL
    for the old rows), keeps every row, and new rows carry their baseline."""
    path = str(tmp_path / "lab.sqlite")
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "; CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);")
    db.execute("INSERT INTO runs (id, name, stage, status) VALUES ('r1', 'e001', 'sft', 'done')")
    db.execute("INSERT INTO evals (run_id, step, metric, value, source) VALUES ('r1', 5, 'ARC-Easy', 0.5, 'chat_eval')")
    db.commit()
    db.close()
    with pytest.raises(NanochatError, match="schema version 1, this code reads"):
        Registry(path, readonly=True)  # a reader never migrates
    with Registry(path) as reg:
        assert reg.version() == SCHEMA_VERSION == 2
        assert [r["name"] for r in reg.runs()] == ["e001"]
        reg.add_evals([{"run_id": "r1", "step": 6, "metric": "ARC-Easy", "value": 0.6, "source": "chat_eval", "baseline": 0.25}])
        assert [(e["step"], e["value"], e["baseline"]) for e in reg.evals("r1")] == [(5, 0.5, None), (6, 0.6, 0.25)]


@pytest.mark.slow
def test_two_concurrent_writer_processes_lose_no_row(tmp_path):
    """Two processes start together and each writes 150 auto-named runs and 150 eval rows, every
    one its own transaction (and a fresh connection): all 600 rows arrive and the automatic names
    are e001..e300 exactly. (SQLite's busy wait is not fair: a writer that never pauses can hold off
    the other until it is done; the 2 ms pause between writes stands for the work between them.)"""
    path, go = str(tmp_path / "lab.sqlite"), tmp_path / "go"
    code = textwrap.dedent(f"""
        import os, sys, time
        from nanochat.registry import Registry
        me = sys.argv[1]
        open(os.path.join({str(tmp_path)!r}, "ready-" + me), "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        for i in range(150):
            with Registry({path!r}) as reg:
                reg.put_run({{"id": f"{{me}}-{{i}}", "stage": "base", "status": "done", "started": time.time()}})
                reg.add_evals([{{"run_id": f"{{me}}-{{i}}", "step": i, "metric": "val_bpb", "value": i / 7, "source": "train"}}])
            time.sleep(0.002)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, w], cwd=REPO, stderr=subprocess.PIPE, text=True) for w in "ab"]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready-{w}").exists() for w in "ab") and time.time() < deadline:  # both imported: start together
        time.sleep(0.05)
    go.touch()
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    with Registry(path) as reg:
        runs, evals = reg.runs(), reg.evals()
    assert sorted(r["id"] for r in runs) == sorted(f"{w}-{i}" for w in "ab" for i in range(150))
    assert sorted(r["name"] for r in runs) == [f"e{i:03d}" for i in range(1, 301)]
    assert sorted((e["run_id"], e["step"]) for e in evals) == sorted((f"{w}-{i}", i) for w in "ab" for i in range(150))
    writers = [r["id"][0] for r in runs]  # in the order they wrote
    assert sum(a != b for a, b in zip(writers, writers[1:])) > 1  # the writers really interleaved


@pytest.mark.slow
def test_a_running_run_whose_process_is_gone_is_killed(tmp_path):
    child = subprocess.Popen(["sleep", "60"])
    path = str(tmp_path / "lab.sqlite")
    rec = RunRecorder(str(tmp_path / "run"), path)
    rec.start(record("r1"))
    with Registry(path) as reg:  # our own process is alive: running
        assert reg.get_run("r1")["status"] == "running"
        rec.record |= {"pid": child.pid, "pid_start": None}  # as if `sleep` were the training process
        reg.put_run(rec.record)
        assert reg.get_run("r1")["status"] == "running"
    child.kill()
    child.wait()
    assert not pid_alive(child.pid)
    with Registry(path, readonly=True) as reg:  # a reader reports it; only a writer marks it
        assert reg.get_run("r1")["status"] == "killed"
        assert reg.db.execute("SELECT status FROM runs").fetchone()[0] == "running"
    with Registry(path) as reg:
        assert reg.db.execute("SELECT status, stop_reason FROM runs").fetchone()[0] == "killed"
        assert reg.runs(status="killed")[0]["stop_reason"].startswith(f"process {child.pid} ended")


def test_a_recycled_pid_is_not_the_run(tmp_path):
    rec = RunRecorder(str(tmp_path / "run"), str(tmp_path / "lab.sqlite"))
    rec.start(record("r1"))
    assert pid_alive(os.getpid(), rec.record["pid_start"])
    assert not pid_alive(os.getpid(), rec.record["pid_start"] + 1)  # same pid, another process start time


def test_a_broken_registry_is_one_warning_and_the_run_goes_on(tmp_path, capsys):
    bad = tmp_path / "is_a_dir"
    bad.mkdir()
    rec = RunRecorder(str(tmp_path / "run"), str(bad))
    rec.start(record("r1"), str(tmp_path / "none.jsonl"))
    rec.log({"step": 3, "val_bpb": 1.0})
    rec.end("done", summary={"x": 1})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: run registry") and "reindex" in err[0]
    with open(tmp_path / "run" / "run.json") as f:  # the run folder still has the record
        assert json.load(f)["status"] == "done"


# ------------------------------------------------------------------------------------------------ reindex


def test_reindex_equals_the_live_registry(base_dir):
    """Runs that finished, stopped, were killed and were resumed (their log cut back), evaluations
    from the eval scripts, a run folder from before the registry: the tables rebuilt from the
    folders are the live ones, row for row (a folder without run.json gives what it records)."""
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "val_bpb": 2.0, "core": 0.1}, {"step": 2, "loss": 2.5}, {"step": 4, "val_bpb": 1.8}, {"step": 4, "train_time_s": 9.0, "val_bpb": 1.8}]
    fake_run(base_dir, "run00done", "a", rows, status="done", name="first")
    fake_run(base_dir, "run0stop", "b", rows[:3], status="stopped")
    killed = fake_run(base_dir, "run0kill", "c", rows[:2])
    killed.update(pid_start=-1)  # the recorded process is not this one any more: dead
    resumed = fake_run(base_dir, "run0res", "d", rows)  # a run that logged to step 4, then resumed from step 2:
    with open(os.path.join(resumed.run_dir, "metrics.jsonl"), "w") as f:  # RunState cuts the log back
        f.write("".join(json.dumps(r) + "\n" for r in rows[:2]))
    RunRecorder(resumed.run_dir).start(resumed.record | {"name": None}, os.path.join(resumed.run_dir, "metrics.jsonl"))
    meta = {"run_id": "run00done", "step": 4, "stage": "base"}
    record_evals(checkpoint_dir("base", "a", str(base_dir)), meta, chat_eval_rows([{"task": "ARC-Easy", "accuracy": 0.5, "chance": 0.25, "problems": 40}], 1 / 3), "chat_eval")
    old = checkpoint_dir("base", "old", str(base_dir))  # a run from before the registry: a checkpoint, a log, no run.json
    save_checkpoint(old, 3, {"w": torch.zeros(1)}, None, {"run_id": "oldrun", "stage": "base", "model_tag": "old", "step": 3, "args": {"seed": 1}})
    os.makedirs(os.path.join(old, "run"))
    with open(os.path.join(old, "run", "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 3, "val_bpb": 2.5}) + "\n" + json.dumps({"step": 3, "train_time_s": 1.0}) + "\n")

    runs, evals = reindex(str(base_dir))
    with Registry() as reg:
        live_runs, live_evals = reg.runs(), reg.evals()
        status = {r["name"]: r["status"] for r in live_runs}
        assert status == {"first": "done", "e001": "stopped", "e002": "killed", "e003": "running"}
        assert {e["step"] for e in live_evals if e["run_id"] == "run0res"} == {2}  # evals past the resumed checkpoint are gone
        assert [(e["metric"], e["baseline"]) for e in live_evals if e["source"] == "chat_eval"] == [("ARC-Easy", 0.25), ("ChatCORE", 0.0)]
        assert [(e["metric"], e["baseline"]) for e in evals if e["source"] == "chat_eval"] == [("ARC-Easy", 0.25), ("ChatCORE", 0.0)]
        by_id = {r["id"]: r for r in runs}
        assert by_id["oldrun"]["status"] == "done" and by_id["oldrun"]["name"] == "e004" and by_id["oldrun"]["config"] == {"seed": 1}
        assert diff_registry(live_runs, live_evals, [r for r in runs if r["id"] != "oldrun"], [e for e in evals if e["run_id"] != "oldrun"]) == []
        reg.replace_runs(runs, evals)
        assert diff_registry(reg.runs(), reg.evals(), *reindex(str(base_dir))) == []
        live_evals[0]["value"] += 1
        assert diff_registry(live_runs, live_evals, runs, evals)  # a difference is seen


# ------------------------------------------------------------------------------------------------ evaluation rows


def test_eval_rows_carry_n_and_the_standard_error_of_centred_means():
    # two tasks: accuracy 0.5 on 100 items (baseline 0), 0.6 on 50 items (baseline 0.2)
    se = centred_mean_stderr([(0.5, 0.0, 100), (0.6, 0.2, 50)])
    assert se == pytest.approx(((0.25 / 100) + (0.24 / 50) / 0.64) ** 0.5 / 2)
    rows = chat_eval_rows([{"task": "GSM8K", "accuracy": 0.5, "chance": 0.0, "problems": 100, "pass_at_k": {1: 0.5, 4: 0.7}}], 0.5)
    assert [(r["metric"], r["n"], r["kind"]) for r in rows] == [("GSM8K", 100, "proportion"), ("GSM8K pass@4", 100, "proportion"), ("ChatCORE", 100, "mean")]
    assert [r["baseline"] for r in rows] == [0.0, 0.0, 0.0]  # a guesser never solves a generative problem; ChatCORE is centred
    categorical = chat_eval_rows([{"task": "T", "accuracy": 0.5, "chance": 0.25, "problems": 100, "pass_at_k": {"2": 0.6}}], None)
    assert [r["baseline"] for r in categorical] == [0.25, pytest.approx(1 - 0.75**2)]  # pass@2: one of two guesses right
    assert rows[-1]["stderr"] == pytest.approx(0.05)
    buckets = {"easy": {"problems": 30, "accuracy": 0.6}, "hard": {"problems": 10, "accuracy": 0.1}, "empty": {"problems": 0, "accuracy": None}}
    bucketed = chat_eval_rows([{"task": "MultiHop", "accuracy": 0.475, "chance": 0.0, "problems": 40, "buckets": buckets}], None)
    assert [(r["metric"], r.get("bucket"), r["value"], r["n"]) for r in bucketed] == [("MultiHop", None, 0.475, 40), ("MultiHop", "easy", 0.6, 30), ("MultiHop", "hard", 0.1, 10)]
    core = {"core": 0.1, "results": {"copa": {"accuracy": 0.6, "random_baseline": 0.5, "num_items": 100}}}
    rows = base_eval_rows({"core": core, "bpb": {"val": {"bpb": 1.2, "tokens": 4096}}})
    assert [(r["metric"], r["n"], r.get("kind")) for r in rows] == [("CORE", 100, "mean"), ("CORE copa", 100, "proportion"), ("val_bpb", 4096, None)]
    assert [r.get("baseline") for r in rows] == [0.0, 0.5, None]  # CORE is centred; copa's random baseline; bpb has none
    assert rows[0]["stderr"] == pytest.approx((0.24 / 100) ** 0.5 / 0.5)


# ------------------------------------------------------------------------------------------------ models


def ckpt(base, stage, tag, step, seed, run_id):
    model = GPT(TINY)
    model.init_weights(seed=seed)
    meta = {"stage": stage, "model_tag": tag, "step": step, "run_id": run_id, "model_config": TINY.to_dict(), "tokenizer": TOK.fingerprint()}
    return save_checkpoint(checkpoint_dir(stage, tag, str(base)), step, model.state_dict(), None, meta)


def test_the_same_checkpoint_registered_twice_is_one_version(base_dir, tmp_path):
    a, b = ckpt(base_dir, "sft", "t", 1, 0, "r1"), ckpt(base_dir, "sft", "t", 2, 1, "r1")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.pt").write_bytes(open(os.path.join(a, "model.pt"), "rb").read())
    with Registry() as reg:
        assert reg.register_model("m", "r1", "sft", "t", 1, a) == (1, True)
        assert reg.register_model("m", "r1", "sft", "t", 1, a) == (1, False)
        assert reg.register_model("m", "r1", "sft", "t", 1, str(copy)) == (1, False)  # same bytes elsewhere: same version
        assert reg.register_model("m", "r1", "sft", "t", 2, b) == (2, True)
        assert reg.register_model("other", "r1", "sft", "t", 2, b) == (1, True)  # versions count per name
        assert [m["version"] for m in reg.models("m")] == [1, 2]
        assert reg.resolve_model("m")["version"] == 2 and reg.resolve_model("m:v1")["step"] == 1 and reg.resolve_model("m:1")["step"] == 1
        for ref, msg in (("nope", "no registered model 'nope'"), ("m:v9", "no version v9"), ("m@prod", "no alias 'prod'"), ("m:x", "bad model reference")):
            with pytest.raises(NanochatError, match=msg):
                reg.resolve_model(ref)
        with pytest.raises(NanochatError, match="no model version m:v7"):
            reg.set_alias("m", "prod", 7)
    os.remove(os.path.join(b, "model.pt"))
    with pytest.raises(NanochatError, match="m:v2: its checkpoint .* is gone"):
        resolve_model_ref("m:v2")


def chat(monkeypatch, capsys, *argv):
    """chat_cli -p in this process; returns the reply line."""
    from scripts import chat_cli

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["chat_cli", "-p", "hi", "--temperature", "0", "--max-tokens", "12", "--device-type", "cpu", *map(str, argv)])
    with torch.inference_mode():
        chat_cli.main()
    return capsys.readouterr().out.splitlines()[1]


def test_an_alias_moves_and_model_ref_loads_that_version(base_dir, monkeypatch, capsys):
    TOK.save(str(base_dir / "tokenizer"))
    for step, seed in ((1, 0), (2, 1)):
        ckpt(base_dir, "sft", "t", step, seed, "r1")
    with Registry() as reg:
        reg.put_run(record("r1", stage="sft", ckpt_dir=checkpoint_dir("sft", "t", str(base_dir))) | {"status": "done"})
    from scripts import lab

    for step in (1, 2):
        lab.main(["register", f"e001:{step}", "--name", "chat"])
    step1, step2 = chat(monkeypatch, capsys, "--model-tag", "t", "--step", 1), chat(monkeypatch, capsys, "--model-tag", "t", "--step", 2)
    assert step1 != step2  # two different models: the test can tell which one answered
    lab.main(["alias", "chat@prod", "v1"])
    assert chat(monkeypatch, capsys, "--model", "chat@prod") == step1
    lab.main(["alias", "chat@prod", "v2"])
    capsys.readouterr()
    assert chat(monkeypatch, capsys, "--model", "chat@prod") == step2
    assert chat(monkeypatch, capsys, "--model", "chat:v1") == step1 and chat(monkeypatch, capsys, "--model", "chat") == step2
    args = SimpleNamespace(model="chat@prod", source=None, model_tag=None, step=3)
    with pytest.raises(NanochatError, match="--model chat@prod names a checkpoint already: drop --step"):
        apply_model_ref(args)


@pytest.mark.slow
def test_chat_cli_model_errors_are_one_line(base_dir):
    ckpt(base_dir, "sft", "t", 1, 0, "r1")
    with Registry() as reg:
        reg.register_model("chat", "r1", "sft", "t", 1, checkpoint_dir("sft", "t", str(base_dir)) + "/step_000001")
    env = make_env(base_dir)
    for ref, msg in (("nope", "no registered model 'nope'"), ("chat:v3", "no version v3"), ("chat@prod", "no alias 'prod'")):
        proc = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "hi", "--model", ref], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and msg in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------------ real runs


BASE = ["--depth", 1, "--max-seq-len", 32, "--device-batch-size", 4, "--total-batch-size", 256, "--eval-tokens", 1024, "--num-prompts", 0, "--eval-every", 2]


def base_train(env, tag, *extra, check=True):
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", *map(str, BASE), "--model-tag", tag, *map(str, extra)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"base_train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
@needs_data
def test_training_runs_register_themselves_and_reindex_gives_the_same_rows(tmp_path):
    """base_train runs that finish (+ base_eval), stop and resume, fail on a NaN, and are SIGKILLed:
    each has its status, its evaluations, and the folders reindex to the live registry."""
    base = tmp_path / "base"
    TOK.save(str(base / "tokenizer"))
    env = make_env(base, OMP_NUM_THREADS=1, NANOCHAT_DATA_DIR=small_data_dir(tmp_path))
    base_train(env, "done", "--num-iterations", 4, "--name", "ref")
    subprocess.run([sys.executable, "-m", "scripts.base_eval", "--model-tag", "done", "--eval", "bpb", "--split-tokens", "512", "--device-batch-size", "4"],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    assert base_train(env, "stop", "--num-iterations", 4, "--stop-at-step", 2, check=False).returncode == 143
    with Registry(str(base / "lab.sqlite")) as reg:
        assert reg.get_run("e001")["status"] == "stopped" and reg.get_run("e001")["stop_reason"] == "--stop-at-step"
    base_train(env, "stop", "--num-iterations", 4, "--resume")
    proc = base_train(env, "nan", "--num-iterations", 4, "--nan-at-step", 3, check=False)
    assert proc.returncode == 1
    kill = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *map(str, BASE), "--model-tag", "kill", "--num-iterations", "500", "--save-every", "2"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in kill.stdout:
        if line.startswith("saved checkpoint"):
            kill.send_signal(signal.SIGKILL)
            break
    assert kill.wait(timeout=60) == -signal.SIGKILL

    with Registry(str(base / "lab.sqlite")) as reg:
        runs = {r["model_tag"]: r for r in reg.runs()}
        assert {t: (r["name"], r["status"]) for t, r in runs.items()} == {"done": ("ref", "done"), "stop": ("e001", "done"), "nan": ("e002", "failed"), "kill": ("e003", "killed")}
        assert runs["nan"]["stop_reason"] == "loss is nan at step 3"
        evals = {(e["source"], e["metric"], e["step"]): e["value"] for e in reg.evals(runs["done"]["id"])}
        assert runs["done"]["summary"]["final_val_bpb"] == evals["train", "val_bpb", 4]
        assert {("train", "val_bpb", 2), ("train", "val_bpb", 4), ("base_eval", "val_bpb", 4), ("base_eval", "train_bpb", 4)} <= evals.keys()
        assert [e["step"] for e in reg.evals(runs["stop"]["id"])] == [2, 4]  # the resumed run: nothing lost, nothing doubled
        assert runs["done"]["git_commit"] and runs["done"]["tokenizer"] == TOK.fingerprint() and runs["done"]["flops_per_token"] > 0
        assert diff_registry(reg.runs(), reg.evals(), *reindex(str(base))) == []
