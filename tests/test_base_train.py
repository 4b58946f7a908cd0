"""
base_train as a real subprocess on real shards: exact resume after an interruption, the NaN
guard, auto device batch size, the one-dial derivations, and the CPU allocator setting.
"""

import os
import platform
import subprocess
import sys

import pytest

from helpers.scripts_util import REPO, SHARED_DATA, make_env, read_metrics, run_script, small_data_dir
from nanochat.scaling import derive_batch_size, derive_training_hparams
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer
from nanochat.training import find_device_batch_size

needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "pretrain")), reason="needs ../shared/data")
ARGS = ["--depth", 1, "--aspect-ratio", 64, "--max-seq-len", 32, "--device-batch-size", 4, "--total-batch-size", 256, "--eval-every", -1, "--eval-tokens", 1024, "--num-prompts", 0, "--core-every", -1]


@pytest.fixture
def env(tmp_path):
    base = tmp_path / "base"
    Tokenizer({bytes([i]): i for i in range(256)}, SPLIT_PATTERN).save(base / "tokenizer")
    return make_env(base, NANOCHAT_DATA_DIR=small_data_dir(tmp_path))


def losses(env, tag):
    rows = read_metrics(os.path.join(env["NANOCHAT_BASE_DIR"], "checkpoints", "base", tag, "run", "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
@needs_data
def test_resume_reproduces_uninterrupted_run(env):
    run_script("scripts.base_train", *ARGS, "--num-iterations", 8, "--model-tag", "full", env=env)
    stopped = run_script("scripts.base_train", *ARGS, "--num-iterations", 8, "--model-tag", "cut", "--stop-at-step", 4, env=env, check=False)
    assert stopped.returncode == 143 and "checkpoint saved at step 4" in stopped.stdout
    assert max(losses(env, "cut")) == 4
    run_script("scripts.base_train", *ARGS, "--num-iterations", 8, "--model-tag", "cut", "--resume", env=env)
    full, cut = losses(env, "full"), losses(env, "cut")
    assert sorted(cut) == sorted(full) == list(range(1, 9))
    for step in full:
        assert abs(full[step] - cut[step]) <= 1e-6, (step, full[step], cut[step])


@pytest.mark.slow
@needs_data
def test_nan_guard_keeps_last_checkpoint(env):
    proc = run_script("scripts.base_train", *ARGS, "--num-iterations", 6, "--save-every", 2, "--nan-at-step", 3, env=env, check=False)
    assert proc.returncode == 1
    assert "loss is nan at step 3" in proc.stderr and proc.stderr.strip().count("\n") == 0
    ckpt = os.path.join(env["NANOCHAT_BASE_DIR"], "checkpoints", "base", "d1")
    assert sorted(os.listdir(ckpt)) == ["run", "step_000002"]


@pytest.mark.slow
@needs_data
def test_auto_device_batch_size(env):
    proc = run_script("scripts.base_train", *ARGS, "--num-iterations", 1, "--device-batch-size", "auto", env=env)
    assert "= 8 rows x 32 tokens" in proc.stdout  # nothing OOMs on CPU: the largest divisor is taken


def test_find_device_batch_size_halves_on_oom():
    tried = []

    def try_batch(B):
        tried.append(B)
        if B > 6:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert find_device_batch_size(try_batch, 32) == 4
    assert tried == [32, 16, 8, 4]

    def other_error(B):
        raise ValueError("not an OOM")

    with pytest.raises(ValueError):
        find_device_batch_size(other_error, 8)


def test_one_dial_derivations():
    # the reference point: 10B tokens -> 2^19 tokens per step
    assert derive_batch_size(1e10, 2048) == 2**19
    small, big = derive_training_hparams(5e6, 256, 1), derive_training_hparams(5e8, 2048, 8)
    assert small["total_batch_size"] < big["total_batch_size"]
    assert small["num_iterations"] * small["total_batch_size"] == small["target_tokens"]
    assert abs(big["target_tokens"] / 5e8 - 20) < 2
    # longer runs (more steps) get less weight decay: lr * wd * steps is held constant
    assert big["weight_decay"] < small["weight_decay"]
    over = derive_training_hparams(5e6, 256, 1, total_batch_size=4096, num_iterations=7, weight_decay=0.1)
    assert (over["total_batch_size"], over["num_iterations"], over["weight_decay"]) == (4096, 7, 0.1)


# Allocates a 64 MiB tensor and prints how much of the heap glibc holds in mmapped blocks (hblkhd).
MMAP_PROBE = """
import ctypes, sys, torch
from nanochat.common import keep_freed_cpu_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_cpu_memory() if sys.argv[1] == "apply" else None
t = torch.ones(64 << 20, dtype=torch.uint8)
assert int(t.sum()) == 64 << 20
print(applied, libc.mallinfo2().hblkhd >> 20)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_cpu_memory only acts on glibc")
def test_keep_freed_cpu_memory_keeps_large_blocks_off_mmap():
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", MMAP_PROBE, mode], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
        return out[0], int(out[1])
    _, mmapped_default = probe("default")
    applied, mmapped_kept = probe("apply")
    assert mmapped_default >= 64  # glibc's default: a 64 MiB block is its own mmap
    assert applied == "True" and mmapped_kept < 64  # with the setting it comes from the heap
