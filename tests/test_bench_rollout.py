"""scripts/bench_rollout.py on a tiny GPT steered into a python tool call at the start of every reply:
the JSON line's figures, its count of tool calls, and the in-process arithmetic against the sandbox."""

import os

import pytest
import torch

from conftest import byte_tokenizer
from helpers.scripts_util import SHARED_DATA
from helpers.steered import Steered
from nanochat import execution
from nanochat.common import NanochatError
from nanochat.gpt import GPT, GPTConfig
from scripts import bench_rollout

needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "tasks", "gsm8k")), reason="needs ../shared/data")
TOY = ["--rollout-steps", "1", "--prompts", "2", "--num-samples", "2", "--rollout-tokens", "8", "--problems", "2", "--batch-size", "2", "--eval-tokens", "8", "--repeats", "1", "--threads", "1", "--device-type", "cpu"]


def calls_seven(tokenizer):
    """A random GPT whose reply starts with the python call `7` (<|python_start|> 7 <|python_end|>),
    then goes on as the GPT samples."""
    S, seven = tokenizer.special_tokens, tokenizer.encode("7")[0]
    gpt = GPT(GPTConfig(sequence_len=1024, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    gpt.init_weights(seed=0)
    return Steered(gpt.eval(), {S["<|assistant_start|>"]: S["<|python_start|>"], S["<|python_start|>"]: seven, seven: S["<|python_end|>"]})


@pytest.fixture
def steered(monkeypatch):
    tokenizer = byte_tokenizer()
    model = calls_seven(tokenizer)
    monkeypatch.setattr(bench_rollout, "load_model", lambda *a, **k: (model, tokenizer, {"model_tag": "toy", "step": 0}))
    monkeypatch.setenv("NANOCHAT_TASKS_DIR", os.path.join(SHARED_DATA, "tasks"))


@needs_data
def test_tool_calls_counted_and_arithmetic_kept_out_of_the_sandbox(steered):
    threads = torch.get_num_threads()
    try:
        fast = bench_rollout.main(TOY)
        slow = bench_rollout.main(TOY + ["--no-arithmetic"])
    finally:
        torch.set_num_threads(threads)
    for r in (fast, slow):
        assert r["model"] == "sft toy step 0" and r["rollout_tok_s"] > 0 and r["chat_eval_tok_s"] > 0
        assert 4 <= r["rollout_tool_calls"] <= 8 and 2 <= r["chat_eval_tool_calls"] <= 4  # every reply starts with one; 8 tokens leave room for a second
    assert fast["arithmetic"] and fast["rollout_sandboxed"] == fast["chat_eval_sandboxed"] == 0
    assert not slow["arithmetic"] and slow["rollout_sandboxed"] == slow["rollout_tool_calls"] and slow["chat_eval_sandboxed"] == slow["chat_eval_tool_calls"]
    assert execution._arithmetic.__name__ == "_arithmetic"  # put back


@needs_data
def test_bad_sizes_are_one_line_errors(steered):
    with pytest.raises(NanochatError, match="--repeats must be >= 1, got 0"):
        bench_rollout.main(TOY + ["--repeats", "0"])
    with pytest.raises(NanochatError, match="--problems 100000"):
        bench_rollout.main(TOY + ["--problems", "100000"])
