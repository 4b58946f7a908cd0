"""
The run skeleton shared by the four training stages (nanochat.training.RunState): a run killed
with SIGKILL right after a checkpoint resumes to exactly the uninterrupted run (base, mid, SFT, RL);
settings set at base reach mid, SFT and RL through the checkpoint meta; a fresh run does not
overwrite another run; pruning touches only this run's steps; a signal saves and exits 143 / 130,
also in the middle of an evaluation; the tokenizer is pinned; a failed save leaves nothing behind;
the shared flags are range-checked.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import byte_tokenizer
from helpers.scripts_util import REPO, SHARED_DATA, make_env, read_metrics, small_data_dir
from nanochat.checkpoint_manager import checkpoint_dir, list_steps, load_meta, load_model, save_checkpoint
from nanochat.common import NanochatError
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import get_muon_momentum
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer
from nanochat.training import add_run_args, parse_run_args

TOK = byte_tokenizer()
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "tasks", "gsm8k")), reason="needs ../shared/data")
CHAT_FILE = os.path.join(SHARED_DATA, "chat", "self_instruct_human.jsonl")
TINY = GPTConfig(sequence_len=128, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)

BASE = ["--depth", 1, "--max-seq-len", 32, "--device-batch-size", 4, "--total-batch-size", 256, "--eval-tokens", 1024, "--num-prompts", 0]
MID = ["--device-batch-size", 2, "--total-batch-size", 512, "--val-conversations", 8, "--buffer-size", 16]
SFT = ["--device-batch-size", 2, "--total-batch-size", 512, "--val-conversations", 8]
RL = ["--questions-per-step", 2, "--num-samples", 4, "--max-new-tokens", 12, "--eval-problems", 2, "--eval-samples", 2, "--device-batch-size", 3]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A base dir with the byte tokenizer, real shards, a small chat recipe, and a tiny random GPT
    saved as the base, mid and SFT checkpoint of tag "t" (the parents of each stage)."""
    tmp = tmp_path_factory.mktemp("runstate")
    base = tmp / "base"
    TOK.save(base / "tokenizer")
    model = GPT(TINY)
    model.init_weights(seed=0)
    for stage in ("base", "mid", "sft"):
        meta = {"stage": stage, "model_tag": "t", "step": 1, "model_config": TINY.to_dict(), "tokenizer": TOK.fingerprint()}
        save_checkpoint(checkpoint_dir(stage, "t", str(base)), 1, model.state_dict(), None, meta)
    recipe = tmp / "chat.json"
    recipe.write_text(json.dumps({"seed": 1, "tasks": [{"task": "CustomJSON", "args": {"path": CHAT_FILE}, "count": 80}]}))
    env = make_env(base, OMP_NUM_THREADS=1, NANOCHAT_DATA_DIR=small_data_dir(tmp), NANOCHAT_TASKS_DIR=os.path.join(SHARED_DATA, "tasks"))
    return {"base": base, "env": env, "recipe": str(recipe)}


def stage_command(stage, lab, tag, *extra):
    """argv of a stage run on the lab's data; RL runs through the parity-judge worker (mixed rewards)."""
    argv = {
        "base": ["-m", "scripts.base_train", *BASE],
        "mid": ["-m", "scripts.mid_train", *MID, "--recipe", lab["recipe"]],
        "sft": ["-m", "scripts.chat_sft", *SFT, "--source", "mid", "--recipe", lab["recipe"]],
        "rl": [os.path.join(REPO, "tests", "helpers", "rl_ddp_worker.py"), "chat_rl", *RL],
    }[stage]
    return [str(a) for a in (*argv, "--model-tag", tag, *extra)]


def parent_of(stage):
    return {"mid": "base", "sft": "mid", "rl": "sft"}.get(stage)


def link_parent(lab, stage, tag):
    """Give tag the parent checkpoint of tag "t" (a symlink), so runs under tag start from it."""
    parent = parent_of(stage)
    if parent and not os.path.exists(checkpoint_dir(parent, tag, str(lab["base"]))):
        os.symlink(checkpoint_dir(parent, "t", str(lab["base"])), checkpoint_dir(parent, tag, str(lab["base"])))


def run(stage, lab, tag, *extra, check=True):
    link_parent(lab, stage, tag)
    proc = subprocess.run([sys.executable, *stage_command(stage, lab, tag, *extra)], cwd=REPO, env=lab["env"], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{stage} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def rows(lab, stage, tag):
    return read_metrics(os.path.join(checkpoint_dir(stage, tag, str(lab["base"])), "run", "metrics.jsonl"))


def kill_after_checkpoint(stage, lab, tag, k, *extra):
    """Start a stage run, SIGKILL it as soon as it reports its checkpoint at step k."""
    link_parent(lab, stage, tag)
    proc = subprocess.Popen([sys.executable, *stage_command(stage, lab, tag, *extra)], cwd=REPO, env=lab["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("saved checkpoint") and line.rstrip().endswith(f"step_{k:06d}"):
            proc.kill()
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(out)[-3000:]


# ------------------------------------------------------------------------------------------------ kill and resume


HORIZON = {"base": ["--num-iterations", 6, "--save-every", 3, "--eval-every", 3], "mid": ["--num-iterations", 6, "--save-every", 3, "--eval-every", 3],
           "sft": ["--num-iterations", 6, "--save-every", 3, "--eval-every", 3], "rl": ["--num-iterations", 4, "--save-every", 2, "--eval-every", 2]}
NOT_EXACT = {"dt", "tok_per_s", "mfu", "time", "train_time_s", "wall_time_s"}  # wall-clock figures


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("stage", ["base", "mid", "sft", "rl"])
def test_sigkill_after_a_checkpoint_then_resume_equals_the_uninterrupted_run(stage, lab):
    k = HORIZON[stage][3]
    run(stage, lab, f"{stage}-ref", *HORIZON[stage])
    kill_after_checkpoint(stage, lab, f"{stage}-cut", k, *HORIZON[stage])
    resumed = run(stage, lab, f"{stage}-cut", *HORIZON[stage], "--resume")
    assert f"at step {k}" in resumed.stdout
    ref, cut = rows(lab, stage, f"{stage}-ref"), rows(lab, stage, f"{stage}-cut")
    assert [sorted(r) for r in ref] == [sorted(r) for r in cut]  # the same rows, none lost or doubled by the kill
    assert any(r.get("step", 0) > k and "loss" in r for r in ref)
    for a, b in zip(ref, cut):
        for key in a.keys() - NOT_EXACT:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], abs=1e-6), (stage, a["step"], key)
            else:
                assert a[key] == b[key], (stage, a["step"], key)  # RL: samples_sha, the sampled tokens and rewards
    if stage == "rl":
        assert any(r.get("reward", 0) > 0 for r in ref) and all("samples_sha" in r for r in ref if "reward" in r)


# ------------------------------------------------------------------------------------------------ settings inherited through the meta


@pytest.mark.slow
@needs_data
def test_dtype_and_lrs_set_at_base_reach_mid_sft_and_rl(lab):
    """base_train --dtype bfloat16 --matrix-lr 0.03 --embedding-lr 0.1: each later stage records the
    same values in its meta and trains with them (the optimizer's initial_lr = base LR x its
    --init-lr-frac), and SFT and RL follow the Muon momentum schedule."""
    run("base", lab, "chain", "--num-iterations", 2, "--eval-every", -1, "--max-seq-len", 128, "--dtype", "bfloat16", "--matrix-lr", 0.03, "--embedding-lr", 0.1)
    run("mid", lab, "chain", "--num-iterations", 2, "--eval-every", -1, "--max-seq-len", 32)
    run("sft", lab, "chain", "--num-iterations", 2, "--eval-every", -1, "--init-lr-frac", 0.5)
    run("rl", lab, "chain", "--num-iterations", 1, "--eval-every", -1, "--eval-problems", 1)
    base = str(lab["base"])
    fracs = {"base": 1.0, "mid": 1.0, "sft": 0.5, "rl": 0.05}
    for stage, frac in fracs.items():
        ckpt = checkpoint_dir(stage, "chain", base)
        step = list_steps(ckpt)[-1]
        meta = load_meta(ckpt, step)
        assert meta["resolved"]["dtype"] == "bfloat16" and meta["resolved"]["matrix_lr"] == 0.03 and meta["resolved"]["embedding_lr"] == 0.1, stage
        assert set(meta) >= {"stage", "model_tag", "step", "run_id", "parent", "tokenizer", "model_config", "args", "resolved", "loop_state", "rng_state"}
        groups = torch.load(os.path.join(ckpt, f"step_{step:06d}", "optim_rank0.pt"), weights_only=True)["param_groups"]
        muon = [g for g in groups if g.get("kind") == "muon"]
        assert muon and all(g["initial_lr"] == pytest.approx(0.03 * frac) for g in muon), stage
        assert all(g["momentum"] == pytest.approx(get_muon_momentum(step - 1)) for g in muon), stage  # set for the last step taken
        if stage != "base":
            assert meta["parent"] == {"stage": parent_of(stage), "model_tag": "chain", "step": load_meta(checkpoint_dir(parent_of(stage), "chain", base), meta["parent"]["step"])["step"]}
    assert load_meta(checkpoint_dir("mid", "chain", base), 2)["resolved"]["max_seq_len"] == 32
    assert load_meta(checkpoint_dir("sft", "chain", base), 2)["resolved"]["max_seq_len"] == 32  # inherited from mid


# ------------------------------------------------------------------------------------------------ no lost work


@pytest.mark.slow
@needs_data
def test_a_fresh_run_refuses_a_tag_with_another_run(lab):
    run("base", lab, "taken", "--num-iterations", 4, "--save-every", 2, "--eval-every", -1)
    before = sorted(os.listdir(checkpoint_dir("base", "taken", str(lab["base"]))))
    proc = run("base", lab, "taken", "--num-iterations", 2, "--eval-every", -1, check=False)
    assert proc.returncode == 1 and "holds a base run" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert sorted(os.listdir(checkpoint_dir("base", "taken", str(lab["base"])))) == before  # nothing touched
    run("base", lab, "taken", "--num-iterations", 2, "--eval-every", -1, "--overwrite")
    ckpt = checkpoint_dir("base", "taken", str(lab["base"]))
    assert list_steps(ckpt) == [2] and max(r["step"] for r in rows(lab, "base", "taken")) == 2
    _, _, meta = load_model("base", "cpu", model_tag="taken", base_dir=str(lab["base"]))
    assert meta["step"] == 2 and meta["resolved"]["num_iterations"] == 2


def test_keep_last_prunes_only_this_runs_steps(tmp_path):
    model = GPT(TINY)
    state = model.state_dict()
    for step in (5, 6):  # another run's checkpoints (e.g. copied in by hand)
        save_checkpoint(str(tmp_path), step, state, None, {"step": step, "run_id": "other"})
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, state, None, {"step": step, "run_id": "mine"}, keep_last=1, run_id="mine")
    assert list_steps(str(tmp_path)) == [3, 5, 6]  # the step just saved is kept though older-numbered ones exist


def test_a_failed_save_leaves_no_temp_directory(tmp_path, monkeypatch):
    def disk_full(obj, path, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(NanochatError, match="could not save checkpoint .*step_000007: No space left on device"):
        save_checkpoint(str(tmp_path), 7, {"w": torch.zeros(2)}, {"o": torch.zeros(1)}, {"step": 7})
    assert os.listdir(tmp_path) == []


def test_the_tokenizer_is_pinned_in_the_checkpoint(base_dir):
    TOK.save(base_dir / "tokenizer")
    model = GPT(TINY)
    meta = {"stage": "base", "model_tag": "t", "step": 1, "model_config": TINY.to_dict(), "tokenizer": TOK.fingerprint()}
    save_checkpoint(checkpoint_dir("base", "t"), 1, model.state_dict(), None, meta)
    load_model("base", "cpu")
    other = Tokenizer({bytes([i]): i for i in range(256)}, SPLIT_PATTERN.replace("?+", "+"))  # same vocab size, another split
    other.save(base_dir / "tokenizer")
    with pytest.raises(NanochatError, match="not the one .* was trained with"):
        load_model("base", "cpu")


# ------------------------------------------------------------------------------------------------ signals


def start_base(lab, tag, *extra):
    env = dict(lab["env"])
    return subprocess.Popen([sys.executable, *stage_command("base", lab, tag, *extra)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_evaluation_saves_at_once_and_exits_nonzero(lab, sig, code):
    """SIGTERM / SIGINT arriving in a long evaluation: the evaluation is cut short, the step saved,
    the exit code 128 + signal (so a recipe does not mark the stage done), and --resume continues."""
    tag = f"sig{code}"
    proc = start_base(lab, tag, "--num-iterations", 50, "--eval-every", 2, "--eval-tokens", 4_000_000)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("step 00002/"):  # the evaluation of step 2 (~4M tokens) starts now
            time.sleep(0.5)
            proc.send_signal(sig)
            t0 = time.perf_counter()
            break
    rest, _ = proc.communicate(timeout=120)
    elapsed = time.perf_counter() - t0
    text = "".join(out) + rest
    assert proc.returncode == code, text[-3000:]
    assert elapsed < 15, elapsed
    assert "checkpoint saved at step 2" in text and "val bpb" not in text
    assert list_steps(checkpoint_dir("base", tag, str(lab["base"]))) == [2]
    resumed = run("base", lab, tag, "--num-iterations", 3, "--eval-every", -1, "--resume")
    assert "at step 2" in resumed.stdout


# ------------------------------------------------------------------------------------------------ flags


def parse(argv, parent="base"):
    import argparse

    p = argparse.ArgumentParser()
    add_run_args(p, parent=parent)
    return parse_run_args(p, argv)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--max-seq-len", "0"], "--max-seq-len 0"),
        (["--device-batch-size", "0"], "--device-batch-size 0"),
        (["--device-batch-size", "many"], "--device-batch-size must be"),
        (["--num-iterations", "0"], "--num-iterations 0"),
        (["--total-batch-size", "-8"], "--total-batch-size -8"),
        (["--eval-every", "0"], "--eval-every 0"),
        (["--save-every", "0"], "--save-every 0"),
        (["--keep-last", "0"], "--keep-last 0"),
        (["--matrix-lr", "-1"], "--matrix-lr -1"),
        (["--matrix-lr", "nan"], "--matrix-lr nan"),
        (["--init-lr-frac", "0"], "--init-lr-frac 0"),
        (["--warmup-ratio", "0.7", "--warmdown-ratio", "0.5"], "--warmup-ratio 0.7 \\+ --warmdown-ratio 0.5"),
        (["--final-lr-frac", "2"], "--final-lr-frac 2"),
        (["--step", "-1"], "--step -1"),
        (["--resume", "--overwrite"], "--resume and --overwrite"),
    ],
)
def test_shared_flags_are_range_checked(argv, flag):
    with pytest.raises(NanochatError, match=flag):
        parse(argv)


def test_shared_flags_have_one_name_in_every_stage(base_dir):
    from scripts import base_train, chat_rl, chat_sft, mid_train

    shared = {"device_type", "dtype", "model_tag", "seed", "run", "num_iterations", "device_batch_size", "eval_every", "save_every", "keep_last", "resume",
              "resume_if_exists", "overwrite", "stop_at_step", "matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay", "warmdown_ratio"}
    for module in (base_train, mid_train, chat_sft, chat_rl):
        args = module.parse_args(["--num-iterations", "5", "--device-batch-size", "3"])
        assert shared <= set(vars(args)) and args.num_iterations == 5 and args.device_batch_size == 3, module.__name__
    for module in (mid_train, chat_sft, chat_rl):  # the later stages take the parent's step, and an LR fraction
        args = module.parse_args(["--step", "3"])
        assert args.step == 3 and args.init_lr_frac > 0
    assert base_train.parse_args(["--device-batch-size", "auto"]).device_batch_size == "auto"
    with pytest.raises(NanochatError, match="--device-batch-size auto"):
        chat_sft.parse_args(["--device-batch-size", "auto"])


# ------------------------------------------------------------------------------------------------ early stopping


@pytest.mark.slow
@needs_data
def test_early_stopping_keeps_the_best_checkpoint_and_resumes(lab):
    """--early-stop-min-delta so large that only the first evaluation counts as an improvement: the
    run stops after --early-stop-patience 2 more, keeps the best step past --keep-last 1, and a run
    stopped (SIGTERM hook) in between resumes to the same evaluations and the same stop."""
    flags = ["--num-iterations", 20, "--eval-every", 1, "--early-stop-patience", 2, "--early-stop-min-delta", 100, "--keep-last", 1]
    ref = run("base", lab, "es-ref", *flags)
    assert "early stop: no improvement in 2 evaluations; best" in ref.stdout
    ckpt = checkpoint_dir("base", "es-ref", str(lab["base"]))
    assert list_steps(ckpt) == [1, 3]  # the best (step 1) and the last
    assert load_meta(ckpt, 3)["loop_state"]["best"]["step"] == 1
    stopped = run("base", lab, "es-cut", *flags, "--stop-at-step", 2, check=False)
    assert stopped.returncode == 143
    run("base", lab, "es-cut", *flags, "--resume")
    strip = [{k: v for k, v in r.items() if k not in NOT_EXACT} for r in rows(lab, "base", "es-ref")]
    assert strip == [{k: v for k, v in r.items() if k not in NOT_EXACT} for r in rows(lab, "base", "es-cut")]
    assert max(r["step"] for r in strip if "loss" in r) == 3
    diverged = run("base", lab, "es-div", "--num-iterations", 20, "--eval-every", 1, "--divergence-threshold", 0.5)
    assert "past --divergence-threshold 0.5" in diverged.stdout and list_steps(checkpoint_dir("base", "es-div", str(lab["base"]))) == [1]


def test_an_unwritable_checkpoint_directory_fails_before_training(base_dir, monkeypatch):
    """A read-only (or full) disk is found at start, as one error naming the directory, not at the
    first save hours in."""
    import nanochat.training
    from scripts import base_train

    TOK.save(base_dir / "tokenizer")

    def read_only(path, data):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(nanochat.training, "atomic_write_bytes", read_only)
    with pytest.raises(NanochatError, match=r"cannot write checkpoints to .*checkpoints/base/d1: Read-only file system"):
        base_train.main([str(a) for a in BASE] + ["--device-type", "cpu"])


@pytest.mark.slow
@needs_data
def test_source_tag_starts_from_one_tag_and_writes_another(lab):
    """--source-tag: fine-tune the mid model of tag "t" into sft tag "ft", leaving sft "t" alone;
    the parent is recorded with its own tag."""
    base = str(lab["base"])
    sft_t = sorted(os.listdir(checkpoint_dir("sft", "t", base)))
    argv = stage_command("sft", lab, "ft", "--source-tag", "t", "--num-iterations", 2, "--eval-every", -1)
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=lab["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting from the mid model t (step 1), into sft ft" in proc.stdout
    assert not os.path.exists(checkpoint_dir("mid", "ft", base))  # no symlink was needed
    assert sorted(os.listdir(checkpoint_dir("sft", "t", base))) == sft_t
    meta = load_meta(checkpoint_dir("sft", "ft", base), 2)
    assert meta["model_tag"] == "ft" and meta["parent"] == {"stage": "mid", "model_tag": "t", "step": 1}
