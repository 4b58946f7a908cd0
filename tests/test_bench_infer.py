"""scripts/bench_infer.py at toy size: the table's columns, bf16 decode (weights stored in bf16, half
the bytes per step) and its greedy-token comparison with fp32."""

import re
import sys

import torch

from nanochat.gpt import GPT, GPTConfig
from scripts import bench_infer

TOY = ["--depths", "1", "--batch-sizes", "1", "2", "--vocab-size", "512", "--prompt-len", "16", "--decode-len", "6", "--repeats", "1", "--threads", "1"]


def table(capsys, monkeypatch, *extra):
    monkeypatch.setattr(sys, "argv", ["bench_infer", *TOY, *extra])
    bench_infer.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:] if not line.startswith("|---")]


def test_fp32_table(capsys, monkeypatch):
    rows = table(capsys, monkeypatch)
    assert [r["batch"] for r in rows] == ["1", "2"] and all(r["dtype"] == "float32" for r in rows)
    assert "greedy = fp32" not in rows[0] and all(float(r["decode tok/s (engine)"].replace(",", "")) > 0 for r in rows)


def test_bf16_stores_bf16_weights_and_compares_greedy_tokens(capsys, monkeypatch):
    fp32 = {r["batch"]: float(r["MB/step"]) for r in table(capsys, monkeypatch)}
    rows = table(capsys, monkeypatch, "--dtype", "bfloat16")
    assert all(r["dtype"] == "bfloat16" for r in rows)
    for r in rows:
        k, n = map(int, re.fullmatch(r"(\d+)/(\d+)", r["greedy = fp32"]).groups())
        assert n == 6 and 0 <= k <= n
        assert float(r["MB/step"]) < 0.6 * fp32[r["batch"]]  # weights and KV cache at 2 bytes instead of 4


def test_greedy_match_counts_tokens_before_the_first_difference():
    config = GPTConfig(sequence_len=64, vocab_size=256, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights(seed=0)
    args = bench_infer.parse_args(["--prompt-len", "8", "--decode-len", "5"])
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    ref = bench_infer.greedy_tokens(model, prompt, 5)
    assert len(ref) == 5 and ref == bench_infer.greedy_tokens(model, prompt, 5)  # deterministic
    assert re.fullmatch(r"[0-5]/5", bench_infer.to_bf16(model, args, torch.device("cpu")))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_to_bf16_counts_the_tokens_before_the_first_difference(monkeypatch):
    config = GPTConfig(sequence_len=64, vocab_size=256, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    args = bench_infer.parse_args(["--prompt-len", "8", "--decode-len", "5"])
    for fp32, bf16, expected in (([1, 2, 3, 4, 5], [1, 2, 9, 4, 5], "2/5"), ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], "5/5"), ([7, 2, 3, 4, 5], [1, 2, 3, 4, 5], "0/5")):
        calls = iter([fp32, bf16])
        monkeypatch.setattr(bench_infer, "greedy_tokens", lambda model, prompt, n: next(calls))
        model = GPT(config)
        model.init_weights(seed=0)
        assert bench_infer.to_bf16(model, args, torch.device("cpu")) == expected
