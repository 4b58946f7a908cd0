"""
Runs evaluate_core under torchrun (used by tests/test_core_eval.py): items are striped over the
ranks and the counts all-reduced, so every rank must report exactly what one process reports.

    torchrun --standalone --nproc_per_node=2 tests/helpers/core_eval_ddp_worker.py EVAL_DIR OUT_DIR

writes OUT_DIR/rank{r}.json = evaluate_core's result on rank r, for the model of make_model() and the
tokenizer of make_tokenizer(), evaluated on the CPU (gloo).
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from nanochat.common import compute_cleanup, compute_init
from nanochat.core_eval import evaluate_core
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer

MAX_PER_TASK = 9  # less than some tasks' item count (subset path) and not a multiple of 2 ranks


def make_tokenizer():
    return Tokenizer({bytes([i]): i for i in range(256)}, SPLIT_PATTERN)


def make_model(vocab_size):
    """A tiny random GPT whose blocks are not the identity (perturbed weights), so it has preferences."""
    model = GPT(GPTConfig(sequence_len=96, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights(seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def main():
    eval_dir, out_dir = sys.argv[1], sys.argv[2]
    ddp, rank, _, world_size, device = compute_init("cpu")
    assert ddp and world_size == 2
    tokenizer = make_tokenizer()
    result = evaluate_core(make_model(tokenizer.vocab_size), tokenizer, device, max_per_task=MAX_PER_TASK, eval_dir=eval_dir)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    compute_cleanup()


if __name__ == "__main__":
    main()
