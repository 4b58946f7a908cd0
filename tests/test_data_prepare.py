"""
Dataset recipes by category and prepared data (tasks/recipe.py, nanochat/prepared.py, scripts/data.py):
prepare writes data.jsonl and its manifest with the shares the recipe asks for; status tells CURRENT
from STALE after a source, the recipe, the tokenizer or data.jsonl changes; --dry-run and --force;
bad recipes fail in one line through the CLI; chat_sft --prepared stops on a stale set unless
--allow-stale, and records the prepared set's manifest as its recipe.
"""

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import byte_tokenizer
from helpers.scripts_util import REPO, make_env
from nanochat.checkpoint_manager import checkpoint_dir, save_checkpoint
from nanochat.common import NanochatError
from nanochat.gpt import GPT, GPTConfig
from nanochat.prepared import prepared_dir
from nanochat.registry import file_hash
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer
from scripts import data
from tasks.customjson import CustomJSON
from tasks.recipe import load_recipe

TOK = byte_tokenizer()
SOURCES = {"chat_a": 30, "chat_b": 10, "math": 20, "ident": 5}


def conversations(tag, n):
    """n conversations whose texts all have the same length: every one renders to as many tokens."""
    return [{"messages": [{"role": "user", "content": f"{tag:_<6}-q{i:04d}"}, {"role": "assistant", "content": f"{tag:_<6}-a{i:04d}"}]}
            for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


RECIPE = {"seed": 5, "size": 100, "categories": {"chat": 3, "math": 1, "ident": "all"}, "tasks": [
    {"task": "CustomJSON", "args": {"path": "chat_a.jsonl"}, "category": "chat"},
    {"task": "CustomJSON", "args": {"path": "chat_b.jsonl"}, "category": "chat"},
    {"task": "CustomJSON", "args": {"path": "math.jsonl"}, "category": "math"},
    {"task": "CustomJSON", "args": {"path": "ident.jsonl"}, "category": "ident"}]}


@pytest.fixture
def lab(tmp_path, base_dir):
    """A base dir with the byte tokenizer; tiny CustomJSON sources and a recipe "mix" by category in tmp_path."""
    TOK.save(base_dir / "tokenizer")
    for tag, n in SOURCES.items():
        write_jsonl(tmp_path / f"{tag}.jsonl", conversations(tag, n))
    recipe = tmp_path / "mix.json"
    recipe.write_text(json.dumps(RECIPE))
    return {"base": base_dir, "recipe": recipe, "dir": Path(prepared_dir("mix"))}


def status_of(capsys, name="mix"):
    capsys.readouterr()
    data.main(["status"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.split()[0] == name]
    assert len(lines) == 1
    return lines[0]


def test_prepare_writes_the_mixture_and_a_manifest_with_its_shares(lab, capsys):
    data.main(["prepare", str(lab["recipe"])])
    out = capsys.readouterr().out
    manifest = json.loads((lab["dir"] / "manifest.json").read_text())
    # weighted categories share size=100 as 3:1, a category's rows split by its entries' sizes (30:10); "all": 5 once
    assert [(s["category"], s["rows"], s["weight"]) for s in manifest["sources"]] == [("chat", 56, 3), ("chat", 19, 3), ("math", 25, 1), ("ident", 5, "all")]
    categories = {c["name"]: c for c in manifest["categories"]}
    assert {name: c["rows"] for name, c in categories.items()} == {"chat": 75, "math": 25, "ident": 5}
    # every conversation renders to the same number of tokens, so the token shares are the row shares the weights ask for
    assert categories["chat"]["target"] == pytest.approx(75 / 105) and categories["ident"]["target"] == "all"
    for c in categories.values():
        assert c["token_share"] == pytest.approx(c["rows"] / 105)
    assert sum(c["tokens"] for c in categories.values()) == manifest["tokens"] > 0
    assert manifest["tokenizer"] == TOK.fingerprint() and manifest["recipe"]["sha256"] == file_hash(lab["recipe"])
    assert manifest["sources"][0]["files"] == [{"path": str(lab["recipe"].parent / "chat_a.jsonl"), "bytes": os.path.getsize(lab["recipe"].parent / "chat_a.jsonl"),
                                                "sha256": file_hash(lab["recipe"].parent / "chat_a.jsonl")}]
    # data.jsonl is the recipe's mixture, in its order, and the manifest pins its hash
    prepared = CustomJSON(str(lab["dir"] / "data.jsonl"))
    mixture = load_recipe(str(lab["recipe"]))
    assert [prepared[i]["messages"] for i in range(len(prepared))] == [mixture[i]["messages"] for i in range(len(mixture))]
    assert manifest["data"]["rows"] == 105 and manifest["data"]["sha256"] == file_hash(lab["dir"] / "data.jsonl")
    # the table: a row per category with its row and token share and its target
    assert any(line.split()[:2] == ["chat", "75"] and line.split()[-1] == "71.4%" for line in out.splitlines())
    assert any(line.split()[:2] == ["ident", "5"] and line.split()[-1] == "all" for line in out.splitlines())
    assert " CURRENT " in status_of(capsys)
    # CURRENT: a second prepare leaves it alone
    before = os.stat(lab["dir"] / "manifest.json").st_ino
    data.main(["prepare", str(lab["recipe"])])
    assert "is CURRENT" in capsys.readouterr().out and os.stat(lab["dir"] / "manifest.json").st_ino == before


def change_source(lab):
    path = lab["recipe"].parent / "math.jsonl"
    path.write_text(path.read_text().replace("math__-a0007", "math__-a0008"))  # same size: only the hash tells
    return f"source {path} changed (sha256 "


def edit_recipe(lab):
    lab["recipe"].write_text(json.dumps(RECIPE | {"seed": 6}))
    return f"recipe {lab['recipe']} edited"


def change_tokenizer(lab):
    other = Tokenizer({bytes([i]): i for i in range(256)} | {b"at": 256}, SPLIT_PATTERN)
    other.save(lab["base"] / "tokenizer")
    return f"tokenizer changed ({TOK.fingerprint()} -> {other.fingerprint()})"


def alter_data(lab):
    with open(lab["dir"] / "data.jsonl", "a") as f:
        f.write(json.dumps(conversations("extra", 1)[0]) + "\n")
    return "data.jsonl changed"


@pytest.mark.parametrize("change", [change_source, edit_recipe, change_tokenizer, alter_data])
def test_status_says_stale_and_why_and_prepare_rewrites_it(lab, capsys, change):
    data.main(["prepare", str(lab["recipe"])])
    reason = change(lab)
    line = status_of(capsys)
    assert " STALE " in line and reason in line and f"fix: python -m scripts.data prepare {lab['recipe']}" in line
    data.main(["prepare", str(lab["recipe"])])  # a stale set is rewritten without --force, saying why
    assert f"is STALE: {reason}" in capsys.readouterr().out
    assert " CURRENT " in status_of(capsys)


def test_status_lists_shipped_recipes_and_a_missing_source(lab, capsys):
    assert " NOT PREPARED " in status_of(capsys, "sft")
    data.main(["prepare", str(lab["recipe"])])
    os.remove(lab["recipe"].parent / "chat_b.jsonl")
    assert f"source {lab['recipe'].parent / 'chat_b.jsonl'} missing" in status_of(capsys)


def test_dry_run_writes_nothing_and_force_rewrites(lab, capsys):
    data.main(["prepare", str(lab["recipe"]), "--dry-run"])
    out = capsys.readouterr().out
    assert "--dry-run: nothing written" in out and any(line.split()[:2] == ["math", "25"] for line in out.splitlines())
    assert not os.path.exists(os.path.join(lab["base"], "prepared"))
    data.main(["prepare", str(lab["recipe"])])
    before = os.stat(lab["dir"] / "manifest.json").st_ino
    data.main(["prepare", str(lab["recipe"]), "--force"])
    assert "rewriting it (--force)" in capsys.readouterr().out
    assert os.stat(lab["dir"] / "manifest.json").st_ino != before and " CURRENT " in status_of(capsys)


BAD_RECIPES = [
    ("missing source", RECIPE | {"tasks": RECIPE["tasks"][:3] + [{"task": "CustomJSON", "args": {"path": "gone.jsonl"}, "category": "ident"}]},
     "tasks[3] (CustomJSON): CustomJSON: no such file"),
    ("negative weight", RECIPE | {"categories": {"chat": 3, "math": -1, "ident": "all"}}, "categories: math: must be 'all' or a positive number, got -1"),
    ("unknown key", RECIPE | {"weights": {}}, "unknown key(s) 'weights'"),
    ("weight and categories", RECIPE | {"tasks": RECIPE["tasks"][:3] + [RECIPE["tasks"][3] | {"weight": 2}]},
     "tasks[3] (CustomJSON): weight: a per-entry weight cannot be combined with top-level 'categories'"),
]


@pytest.mark.parametrize("what,recipe,message", BAD_RECIPES, ids=[b[0] for b in BAD_RECIPES])
def test_bad_recipe_is_one_line_naming_file_and_key(lab, what, recipe, message):
    import subprocess
    import sys

    bad = lab["recipe"].parent / "bad.json"
    bad.write_text(json.dumps(recipe))
    proc = subprocess.run([sys.executable, "-m", "scripts.data", "prepare", str(bad)], cwd=REPO, env=make_env(lab["base"], OMP_NUM_THREADS=1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {bad}: {message}") and proc.stderr.count("\n") == 1, proc.stderr
    assert not os.path.exists(os.path.join(lab["base"], "prepared", "bad"))


def test_category_recipe_errors(lab):
    for recipe, message in [
        (RECIPE | {"categories": {"chat": 3, "math": 1}}, "tasks\\[3\\] \\(CustomJSON\\): category 'ident' is not in 'categories'"),
        (RECIPE | {"categories": RECIPE["categories"] | {"code": 1}}, "categories: code: no entry in 'tasks' has this category"),
        ({k: v for k, v in RECIPE.items() if k != "size"}, "size: required when a category has a weight"),
        (RECIPE | {"categories": {"chat": "all", "math": "all", "ident": "all"}}, "size: only applies when a category has a weight"),
        (RECIPE | {"tasks": RECIPE["tasks"][:3] + [RECIPE["tasks"][3] | {"count": 2}]}, "tasks\\[3\\] \\(CustomJSON\\): count: a per-entry count"),
    ]:
        lab["recipe"].write_text(json.dumps(recipe))
        with pytest.raises(NanochatError, match=f"^{lab['recipe']}: {message}"):
            load_recipe(str(lab["recipe"]))


# ------------------------------------------------------------------------------------------------ training

SFT = ["--source", "base", "--model-tag", "t", "--device-batch-size", "2", "--total-batch-size", "256", "--max-seq-len", "64",
       "--val-conversations", "4", "--num-iterations", "1", "--eval-every", "1"]


def test_chat_sft_stops_on_a_stale_prepared_set_unless_allow_stale(lab, monkeypatch, capsys):
    from scripts import chat_sft, mid_train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = GPTConfig(sequence_len=64, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config)
    model.init_weights(seed=0)
    meta = {"stage": "base", "model_tag": "t", "step": 0, "model_config": config.to_dict(), "tokenizer": TOK.fingerprint()}
    save_checkpoint(checkpoint_dir("base", "t", str(lab["base"])), 0, model.state_dict(), None, meta)
    with pytest.raises(NanochatError, match="no prepared data set 'mix' .*python -m scripts.data prepare mix"):
        chat_sft.main(SFT + ["--prepared", "mix"])
    data.main(["prepare", str(lab["recipe"])])
    with pytest.raises(NanochatError, match="--prepared mix and --recipe .* give one"):
        chat_sft.main(SFT + ["--prepared", "mix", "--recipe", str(lab["recipe"])])
    reasons = [edit_recipe(lab), change_source(lab)]
    with pytest.raises(NanochatError) as stale:
        chat_sft.main(SFT + ["--prepared", "mix"])
    message = str(stale.value)
    assert "'mix' is STALE" in message and all(r in message for r in reasons) and f"python -m scripts.data prepare {lab['recipe']}" in message
    assert not os.path.exists(checkpoint_dir("sft", "t", str(lab["base"])))  # stopped before the run wrote anything
    with pytest.raises(NanochatError, match="'mix' is STALE: .*recipe .* edited"):  # mid_train: the same flags, the same check
        mid_train.main(["--model-tag", "t", "--prepared", "mix"])
    with pytest.raises(NanochatError, match="--allow-stale only applies with --prepared"):
        mid_train.main(["--model-tag", "t", "--allow-stale"])

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:  # in-process: main() installs its SIGTERM/SIGINT handlers, put pytest's back afterwards
        capsys.readouterr()
        chat_sft.main(SFT + ["--prepared", "mix", "--allow-stale"])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "warning: prepared data set 'mix' is STALE" in capsys.readouterr().out
    run = json.loads(open(os.path.join(checkpoint_dir("sft", "t", str(lab["base"])), "run", "run.json")).read())
    assert run["recipe_path"] == str(lab["dir"] / "manifest.json") and run["recipe_hash"] == file_hash(lab["dir"] / "manifest.json")
    assert run["config"]["prepared"] == "mix" and run["status"] == "done"
