"""
runs/gpu_check.sh --cpu, the guard that keeps the one-GPU check from rotting between GPU runs: on a
data slice built by --prepare-data, every check passes on CPU except those that need CUDA, which
are skipped saying so; the JSON and the table hold every check with its numbers; injected failures
make it exit 1 naming each failed check, while the other checks still run and the checks that need a
failed one are skipped, naming it.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SHARED_DATA = os.path.abspath(os.path.join(REPO, "..", "shared", "data"))

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "pretrain")), reason="needs ../shared/data")]

CPU_CHECKS = [
    "environment", "bf16_vs_fp32", "fa3_vs_sdpa", "kv_cache", "tok_train", "base_train", "base_eval", "mid_train", "chat_sft", "chat_rl",
    "chat_eval", "chat_cli", "chat_web", "kill_resume", "compile", "device_batch_size_auto", "infer_speed",
    "train_speed_d2", "train_speed_d3", "train_speed_d4",
]
CUDA_ONLY = {"fa3_vs_sdpa"}


def gpu_check(lab, out, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env |= {"NANOCHAT_BASE_DIR": str(lab / "base"), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    argv = ["bash", "runs/gpu_check.sh", "--cpu", "--data-root", str(lab / "data"), "--out", str(lab / out), "--work-dir", str(lab / f"{out}_work"),
            *args]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert (lab / out / "gpu_check.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(lab / out / "gpu_check.json") as f:
        return proc, json.load(f)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--prepare-data", str(tmp / "data"), "--source-data", SHARED_DATA],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp / "data") for f in fs)
    assert size < 8 * 2**20  # it travels with the repository to the GPU machine (64 MiB in all, wheels included)
    return tmp


def test_cpu_mode_runs_every_check(lab):
    proc, report = gpu_check(lab, "out")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == CPU_CHECKS and report["failed"] == [] and report["mode"] == "cpu"
    for name, c in checks.items():
        assert c["status"] == ("skipped" if name in CUDA_ONLY else "pass"), c
        assert c["seconds"] > 0
    assert "CUDA" in checks["fa3_vs_sdpa"]["note"]
    n = {name: c["numbers"] for name, c in checks.items()}
    assert n["bf16_vs_fp32"]["rel_rms"] < n["bf16_vs_fp32"]["tol_rel_rms"]
    assert n["kv_cache"]["engine_greedy_mismatches"] == 0 and n["kv_cache"]["float32_max_abs"] < 1e-3
    assert n["kill_resume"]["max_abs_loss_diff"] <= 1e-5 and 0 < n["kill_resume"]["killed_after_step"] < n["kill_resume"]["steps"]
    assert n["base_eval"]["core_tasks"] == 18 and n["chat_eval"]["tasks"] == 6
    assert n["chat_web"]["completion_tokens"] >= 1
    assert all(n[f"train_speed_d{d}"]["tok_per_s"] > 0 and n[f"train_speed_d{d}"]["mfu"] is None for d in (2, 3, 4))
    assert n["infer_speed"]["d2_b32_decode_tok_s"] > 0
    # the token horizons are derived; the hours need the CUDA speed rows
    assert len(report["projections"]) == 3 and all(p["tokens"] > 1e9 and "hours_8gpu" not in p for p in report["projections"])
    table = (lab / "out" / "gpu_check.md").read_text()
    assert all(f"| {name} | " in table for name in CPU_CHECKS) and "failed: none" in table


def test_injected_failures_are_named_and_isolated(lab):
    only = "bf16_vs_fp32,kv_cache,tok_train,base_train,base_eval,chat_cli"
    proc, report = gpu_check(lab, "out_fail", "--only", only, "--inject-failure", "kv_cache", "--inject-failure", "base_train")
    assert proc.returncode == 1
    assert "FAILED: kv_cache, base_train" in proc.stderr
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == only.split(",")
    assert checks["kv_cache"]["status"] == "fail" and "cached logits" in checks["kv_cache"]["note"]  # the comparison itself failed
    assert checks["bf16_vs_fp32"]["status"] == checks["tok_train"]["status"] == "pass"  # tok_train runs after a failure
    assert checks["base_train"]["status"] == "fail" and "exited 2" in checks["base_train"]["note"] and checks["base_train"]["log_tail"]
    assert checks["base_eval"]["status"] == "skipped" and checks["base_eval"]["note"] == "needs base_train (fail)"
    assert checks["chat_cli"]["status"] == "skipped" and checks["chat_cli"]["note"] == "needs chat_sft (not run)"
    assert report["failed"] == ["kv_cache", "base_train"]
