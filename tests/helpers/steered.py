"""A real GPT steered into chosen tokens (tool calls) while its KV cache stays the real model's:
the engine tests (tests/test_engine.py) and the rollout bench's (tests/test_bench_rollout.py)."""

import torch


class Steered(torch.nn.Module):
    """A real GPT whose next token is forced where the current input token is a key of `steer`
    (a large bias on steer[token]); elsewhere it samples as the GPT does. Drives rows into and out
    of tool calls while their KV cache is the real model's."""

    def __init__(self, model, steer):
        super().__init__()
        self.model, self.steer = model, steer
        self.config, self.lm_head, self.rotary_seq_len = model.config, model.lm_head, model.rotary_seq_len

    def get_compute_dtype(self, device):
        return self.model.get_compute_dtype(device)

    def forward(self, idx, kv_cache=None):
        logits = self.model(idx, kv_cache=kv_cache)
        for b, t in enumerate(idx[:, -1].tolist()):
            if t in self.steer:
                logits[b, -1, self.steer[t]] += 1000.0
        return logits
