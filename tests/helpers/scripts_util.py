"""Helpers for tests that run the stage scripts as real subprocesses."""

import json
import os
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def find_shared_data():
    """The real data sets: shared/data beside the repository (<repo>/../shared/data), the one place
    tests look. Tests that need it skip when it is absent."""
    return os.path.abspath(os.path.join(REPO, "..", "shared", "data"))


SHARED_DATA = find_shared_data()


def run_script(module, *args, env, timeout=600, check=True):
    """python -m <module> args... from the repo root; returns the CompletedProcess (text)."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def make_env(base_dir, **extra):
    env = dict(os.environ)
    env.update({"NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")})
    env.update({k: str(v) for k, v in extra.items()})
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    return env


def small_data_dir(tmp_path):
    """A data dir with one real training shard and the real validation shard (symlinks)."""
    src = os.path.join(SHARED_DATA, "pretrain")
    d = tmp_path / "data"
    d.mkdir()
    os.symlink(os.path.join(src, "shard_00000.parquet"), d / "shard_00000.parquet")
    os.symlink(os.path.join(src, "shard_00006.parquet"), d / "shard_00006.parquet")
    return d


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
