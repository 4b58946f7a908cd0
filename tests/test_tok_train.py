"""
scripts/tok_train.py on tiny synthetic shards, run in-process: it checks everything before writing,
writes atomically and replaces an existing tokenizer only with --force. Also Tokenizer.fingerprint().
"""

import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import run_main
from nanochat.tokenizer import META_FILE, RANKS_FILE, Tokenizer
from scripts import tok_train

WORDS = "the cat sat on a mat while theory and thermal therapy met at the theatre near the ninth tree".split()


def write_shards(data_dir, corrupt_val=False):
    """Two shards of word salad: shard_00000 (train) and shard_00001 (val, or garbage bytes)."""
    data_dir.mkdir()
    docs = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40 + i % 13)) for i in range(200)]
    for index in (0, 1):
        path = data_dir / f"shard_{index:05d}.parquet"
        if index == 1 and corrupt_val:
            path.write_bytes(b"not a parquet file")
        else:
            pq.write_table(pa.table({"text": docs[index::2]}), path)
    return data_dir


def run_tok_train(monkeypatch, *args):
    """Run scripts.tok_train with args in this process; returns the exit code (0: success)."""
    monkeypatch.setattr(sys, "argv", ["tok_train", *map(str, args)])
    try:
        run_main(tok_train.main)
    except SystemExit as e:
        return e.code
    return 0


def snapshot(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.fixture
def data(tmp_path, base_dir):
    return write_shards(tmp_path / "data")


def test_refuses_to_replace_a_tokenizer_without_force(monkeypatch, capsys, tmp_path, data):
    out = tmp_path / "tok"
    assert run_tok_train(monkeypatch, "--data-dir", data, "--output-dir", out, "--vocab-size", 300) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert run_tok_train(monkeypatch, "--data-dir", data, "--output-dir", out, "--vocab-size", 320) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out) in err and "--force" in err, err
    assert snapshot(out) == before
    assert run_tok_train(monkeypatch, "--data-dir", data, "--output-dir", out, "--vocab-size", 320, "--force") == 0
    assert Tokenizer.load(out).vocab_size == 320
    assert sorted(os.listdir(tmp_path)) == ["base", "data", "tok"]  # no staging directory left behind


def test_bad_validation_shard_fails_before_writing(monkeypatch, capsys, tmp_path, base_dir):
    data = write_shards(tmp_path / "data", corrupt_val=True)
    out = tmp_path / "tok"
    assert run_tok_train(monkeypatch, "--data-dir", data, "--output-dir", out, "--vocab-size", 300) == 1
    assert "shard_00001.parquet" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--doc-cap", 0], ["--max-chars", -5], ["--vocab-size", 100]])
def test_bad_flags_fail_before_writing(monkeypatch, capsys, tmp_path, data, flags):
    out = tmp_path / "tok"
    assert run_tok_train(monkeypatch, "--data-dir", data, "--output-dir", out, *flags) == 1
    assert flags[0] in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_save_leaves_the_old_tokenizer(monkeypatch, tmp_path, data):
    out = tmp_path / "tok"
    assert run_tok_train(monkeypatch, "--data-dir", data, "--output-dir", out, "--vocab-size", 300) == 0
    before = snapshot(out)

    def save_then_crash(self, directory):  # the rank file is written, then the disk fills up
        with open(os.path.join(directory, RANKS_FILE), "w") as f:
            f.write("partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Tokenizer, "save", save_then_crash)
    with pytest.raises(OSError, match="No space left"):
        run_tok_train(monkeypatch, "--data-dir", data, "--output-dir", out, "--vocab-size", 320, "--force")
    assert snapshot(out) == before and set(before) == {RANKS_FILE, META_FILE}
    assert sorted(os.listdir(tmp_path)) == ["base", "data", "tok"]


# -----------------------------------------------------------------------------
# Tokenizer.fingerprint


def test_fingerprint_survives_save_and_load(tmp_path, byte_tok):
    ranks = dict(byte_tok.mergeable_ranks)
    for tok in (b"th", b"the", b" the"):
        ranks[tok] = len(ranks)
    tok = Tokenizer(ranks, byte_tok.pattern)
    tok.save(tmp_path)
    fp = tok.fingerprint()
    assert isinstance(fp, str) and len(fp) == 16 and int(fp, 16) >= 0
    assert Tokenizer.load(tmp_path).fingerprint() == fp
    # pinned: checkpoints store this value, so the recipe must not drift
    assert byte_tok.fingerprint() == "6fa3dfacb26f9f75"


def test_fingerprint_tells_tokenizers_of_the_same_size_apart(byte_tok):
    def with_merges(*merges, pattern=byte_tok.pattern):
        ranks = dict(byte_tok.mergeable_ranks)
        for tok in merges:
            ranks[tok] = len(ranks)
        return Tokenizer(ranks, pattern)

    a, b, swapped = with_merges(b"th", b"he"), with_merges(b"th", b"in"), with_merges(b"he", b"th")
    assert a.vocab_size == b.vocab_size == swapped.vocab_size
    other_pattern = with_merges(b"th", b"he", pattern=r"\S+|\s+")
    specials = dict(a.special_tokens)
    specials["<|user_start|>"], specials["<|user_end|>"] = specials["<|user_end|>"], specials["<|user_start|>"]
    other_specials = Tokenizer(a.mergeable_ranks, a.pattern, specials)
    assert len({t.fingerprint() for t in (a, b, swapped, other_pattern, other_specials)}) == 5
    assert with_merges(b"th", b"he").fingerprint() == a.fingerprint()
