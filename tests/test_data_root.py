"""
One local data root ($NANOCHAT_DATA_ROOT, laid out like shared/data: pretrain/, tasks/, chat/,
eval/core/, words/words_alpha.txt) honoured by every default-path resolver of the library, with the
order explicit argument > specific variable > $NANOCHAT_DATA_ROOT/<subpath> > <base_dir> default
(nanochat.common.resolve_data_path); and the real pipeline finding its data from the root alone.
"""

import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.scripts_util import REPO, SHARED_DATA, make_env, run_script
from nanochat.common import NanochatError, resolve_data_path
from nanochat.core_eval import get_eval_dir
from nanochat.dataset import get_data_dir, list_parquet_files
from tasks.common import resolve_chat_dir, resolve_tasks_dir, resolve_words_file
from tasks.recipe import load_chat_task

DATA_VARS = ("NANOCHAT_DATA_ROOT", "NANOCHAT_DATA_DIR", "NANOCHAT_TASKS_DIR", "NANOCHAT_CHAT_DIR", "NANOCHAT_EVAL_DIR",
             "NANOCHAT_WORDS_FILE")

# (resolver taking the explicit path or None, its variable, its path under the root, its default under the base dir)
RESOLVERS = {
    "pretrain": (get_data_dir, "NANOCHAT_DATA_DIR", "pretrain", "base_data"),
    "tasks": (resolve_tasks_dir, "NANOCHAT_TASKS_DIR", "tasks", "tasks"),
    "chat": (lambda path: resolve_chat_dir(), "NANOCHAT_CHAT_DIR", "chat", "chat"),  # default: the tasks dir's sibling
    "eval": (get_eval_dir, "NANOCHAT_EVAL_DIR", "eval/core", "eval_bundle"),
    "words": (lambda path: resolve_words_file(), "NANOCHAT_WORDS_FILE", "words/words_alpha.txt", "words/words_alpha.txt"),
}


@pytest.fixture(autouse=True)
def no_data_vars(monkeypatch):
    for var in DATA_VARS:
        monkeypatch.delenv(var, raising=False)


def make_root(root):
    """An empty data root with every directory (get_eval_dir checks that its dir exists)."""
    for sub in ("pretrain", "tasks", "chat", "eval/core", "words"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def test_resolve_data_path_order_and_lazy_default(tmp_path, monkeypatch):
    calls = []

    def default():
        calls.append(1)
        return "default"

    resolve = lambda explicit=None: resolve_data_path(explicit, "NANOCHAT_DATA_DIR", "pretrain", default)
    assert resolve() == "default" and calls == [1]
    monkeypatch.setenv("NANOCHAT_DATA_ROOT", str(tmp_path))
    assert resolve() == str(tmp_path / "pretrain")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", "from-env")
    assert resolve() == "from-env"
    assert resolve("explicit") == "explicit"
    assert calls == [1]  # the default (which may create the base dir) only runs when it is the answer
    monkeypatch.setenv("NANOCHAT_DATA_DIR", "")  # an empty variable counts as unset
    assert resolve() == str(tmp_path / "pretrain")


@pytest.mark.parametrize("kind", sorted(RESOLVERS))
def test_every_resolver_follows_the_same_order(kind, tmp_path, base_dir, monkeypatch):
    resolver, var, subpath, default = RESOLVERS[kind]
    if kind == "eval":
        (base_dir / "eval_bundle").mkdir()
    assert os.path.abspath(resolver(None)) == os.path.abspath(base_dir / default)
    root = make_root(tmp_path / "root")
    monkeypatch.setenv("NANOCHAT_DATA_ROOT", str(root))
    assert os.path.abspath(resolver(None)) == str(root / subpath)
    own = make_root(tmp_path / "own")
    monkeypatch.setenv(var, str(own / subpath))
    assert os.path.abspath(resolver(None)) == str(own / subpath)
    if kind in ("pretrain", "tasks", "eval"):  # the ones with a flag
        flag = make_root(tmp_path / "flag")
        assert os.path.abspath(resolver(str(flag / subpath))) == str(flag / subpath)


def test_chat_and_words_under_the_root_beat_the_tasks_dir_sibling(tmp_path, monkeypatch):
    # as runs/stages.sh always did: NANOCHAT_DATA_ROOT set, NANOCHAT_TASKS_DIR pointing elsewhere
    root = make_root(tmp_path / "root")
    monkeypatch.setenv("NANOCHAT_DATA_ROOT", str(root))
    monkeypatch.setenv("NANOCHAT_TASKS_DIR", str(tmp_path / "other" / "tasks"))
    assert resolve_tasks_dir() == str(tmp_path / "other" / "tasks")
    assert resolve_chat_dir() == resolve_chat_dir(str(tmp_path / "x" / "tasks")) == str(root / "chat")
    assert resolve_words_file() == str(root / "words" / "words_alpha.txt")
    monkeypatch.delenv("NANOCHAT_DATA_ROOT")
    assert resolve_chat_dir() == str(tmp_path / "other" / "chat")  # no root: the sibling rule as before


def test_data_is_read_from_the_root(tmp_path, base_dir, monkeypatch):
    root = make_root(tmp_path / "root")
    for i in range(2):
        pq.write_table(pa.table({"text": [f"document {i}"]}), root / "pretrain" / f"shard_{i:05d}.parquet")
    (root / "words" / "words_alpha.txt").write_text("apple\r\nbanana\r\ncherry\r\n")  # CRLF as upstream
    with pytest.raises(NanochatError, match="data directory not found: .*NANOCHAT_DATA_ROOT"):
        list_parquet_files()
    monkeypatch.setenv("NANOCHAT_DATA_ROOT", str(root))
    assert [os.path.basename(p) for p in list_parquet_files()] == ["shard_00000.parquet", "shard_00001.parquet"]
    task = load_chat_task("SpellingBee")
    assert len(task) == 256 and set(task.words) == {"apple", "banana", "cherry"}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "pretrain")), reason="needs ../shared/data")
def test_tok_train_finds_the_shards_from_the_root_alone(tmp_path):
    env = make_env(tmp_path / "base", NANOCHAT_DATA_ROOT=SHARED_DATA)
    for var in DATA_VARS[1:]:
        env.pop(var, None)
    proc = run_script("scripts.tok_train", "--max-chars", 1_000_000, "--vocab-size", 300, env=env, timeout=300)
    assert f"saved to {tmp_path / 'base' / 'tokenizer'}" in proc.stdout
    assert os.listdir(tmp_path / "base" / "tokenizer")


@pytest.mark.slow
def test_stages_sh_makes_the_root_absolute_and_fails_on_a_missing_one(tmp_path):
    root = make_root(tmp_path / "root")
    # printenv: the root reaches the stages' processes, which resolve the other paths under it
    script = 'set -euo pipefail; source runs/stages.sh; echo "$NANOCHAT_DATA_ROOT|$NANOCHAT_DATA_DIR"; printenv NANOCHAT_DATA_ROOT'
    env = {"PATH": os.environ["PATH"], "NANOCHAT_BASE_DIR": str(tmp_path / "base"),
           "NANOCHAT_DATA_ROOT": os.path.relpath(root, REPO)}
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    out = out.stdout.split()
    assert out == [f"{root}|{root}/pretrain", str(root)]
    env["NANOCHAT_DATA_ROOT"] = str(tmp_path / "missing")
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stdout == ""
