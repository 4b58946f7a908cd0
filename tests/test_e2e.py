"""
The whole pipeline at toy size on real data from ../shared: tok_train -> base_train -> chat_sft ->
chat_cli, each as a real subprocess, plus the bad-input paths of the scripts.
"""

import os

import pytest

from helpers.scripts_util import SHARED_DATA, make_env, read_metrics, run_script, small_data_dir

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "pretrain")), reason="needs ../shared/data")]

BASE_ARGS = ["--depth", 2, "--aspect-ratio", 64, "--max-seq-len", 64, "--device-batch-size", 16, "--total-batch-size", 2048, "--eval-tokens", 16384, "--num-prompts", 1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    env = make_env(tmp / "base", NANOCHAT_DATA_DIR=small_data_dir(tmp), NANOCHAT_TASKS_DIR=os.path.join(SHARED_DATA, "tasks"), NANOCHAT_CHAT_DIR=os.path.join(SHARED_DATA, "chat"), NANOCHAT_WORDS_FILE=os.path.join(SHARED_DATA, "words", "words_alpha.txt"))
    out = {"env": env, "tmp": tmp}
    out["tok"] = run_script("scripts.tok_train", "--max-chars", 3_000_000, "--vocab-size", 1024, env=env)
    out["base"] = run_script("scripts.base_train", *BASE_ARGS, "--num-iterations", 150, "--eval-every", 75, env=env)
    recipe = tmp / "sft.json"
    recipe.write_text('{"seed": 1, "tasks": [{"task": "CustomJSON", "args": {"path": "%s"}, "count": 400}]}' % os.path.join(SHARED_DATA, "chat", "self_instruct_human.jsonl"))
    out["sft"] = run_script("scripts.chat_sft", "--recipe", recipe, "--max-seq-len", 128, "--device-batch-size", 8, "--total-batch-size", 2048, "--num-iterations", 20, "--val-conversations", 32, "--eval-every", 10, "--init-lr-frac", 0.5, env=env)
    out["cli"] = run_script("scripts.chat_cli", "-p", "What is the capital of France?", "--max-tokens", 24, "--temperature", 0, env=env)
    return out


def test_tokenizer_stage(pipeline):
    assert "trained vocab_size=1024" in pipeline["tok"].stdout
    assert os.path.isfile(pipeline["tmp"] / "base" / "tokenizer" / "tokenizer.tiktoken")


def test_base_train_beats_unigram(pipeline):
    rows = read_metrics(pipeline["tmp"] / "base" / "checkpoints" / "base" / "d2" / "run" / "metrics.jsonl")
    final = [r for r in rows if "final_val_bpb" in r][-1]
    assert final["final_val_bpb"] < final["unigram_val_bpb"] - 0.1, final
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.0
    assert "sample:" in pipeline["base"].stdout


def test_sft_loss_goes_down(pipeline):
    rows = read_metrics(pipeline["tmp"] / "base" / "checkpoints" / "sft" / "d2" / "run" / "metrics.jsonl")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0], val


def test_chat_cli_one_shot(pipeline):
    out = pipeline["cli"].stdout
    assert "Assistant:" in out and "[stopped at" in out


def test_missing_data_dir_is_one_line_error(tmp_path):
    env = make_env(tmp_path / "base", NANOCHAT_DATA_DIR=tmp_path / "nope")
    proc = run_script("scripts.tok_train", "--max-chars", 1000, env=env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and str(tmp_path / "nope") in proc.stderr


def test_missing_tokenizer_and_checkpoint(tmp_path):
    env = make_env(tmp_path / "base", NANOCHAT_DATA_DIR=small_data_dir(tmp_path))
    proc = run_script("scripts.base_train", *BASE_ARGS, "--num-iterations", 1, env=env, check=False)
    assert proc.returncode == 1 and "tokenizer" in proc.stderr and proc.stderr.strip().count("\n") == 0
    proc = run_script("scripts.chat_cli", "-p", "hi", env=env, check=False)
    assert proc.returncode == 1 and "checkpoint" in proc.stderr and proc.stderr.strip().count("\n") == 0
