"""
Trains tiny models with nanochat.optim (used by tests/test_optim.py).

Under torchrun every rank takes its share of each global batch and the optimizer averages the
gradients (reduce-scatter / all-gather inside MuonAdamW.step); in one process, train(...,
world_size=1, accum=W) runs gradient accumulation over the same rows, which must give the same
losses and parameters.

    torchrun --standalone --nproc_per_node=2 tests/helpers/optim_ddp_worker.py OUT_DIR

writes OUT_DIR/rank{r}.pt = {config name: {"plain": run, "resumed": run}} where a run is
train()'s dict and "resumed" stops after RESUME_AT steps, round-trips model and optimizer state
through torch.save / torch.load(weights_only=True) into fresh objects, and continues.
"""

import io
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from nanochat.common import compute_cleanup, compute_init  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.optim import apply_schedules, build_optimizer  # noqa: E402

STEPS = 5
RESUME_AT = 3
# Chosen so that with 2 ranks every sharding path runs:
# "gpt": nanochat's GPT; 258 * 64 >= ADAMW_SHARD_MIN_NUMEL and 258 is even, so wte and lm_head
#   are reduce-scattered along dim 0; n_layer 3 gives Muon buckets of 3 matrices ([64, 64] x 6,
#   [32, 64] x 6, [256, 64] x 3, [64, 256] x 3): padded stacks.
# "tiny": odd vocab 257 (wte / lm_head fall back to all-reduce + replicated update), 0-D and 1-D
#   parameters (scalar group), one layer so buckets hold 1 matrix and rank 1 owns none of them;
#   Polar Express; gradient clipping that actually clips.
CONFIGS = {
    "gpt": dict(model="gpt", vocab_size=258, n_layer=3, n_embd=64, n_head=2, n_kv_head=1, seq_len=16, global_batch=4, orthogonalization="newton_schulz", grad_clip=0.0),
    "tiny": dict(model="tiny", vocab_size=257, n_layer=1, n_embd=64, seq_len=16, global_batch=4, orthogonalization="polar_express", grad_clip=0.05),
}


class TinyLM(nn.Module):
    """Embedding -> n_layer residual ReLU^2 MLPs scaled by per-layer scalars -> RMSNorm with a learned
    gain -> lm_head with a learned logit scale. Parameter names follow nanochat's GPT where they overlap."""

    def __init__(self, vocab_size, n_layer, n_embd):
        super().__init__()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab_size, n_embd),
            "h": nn.ModuleList([nn.ModuleDict({"c_fc": nn.Linear(n_embd, 4 * n_embd, bias=False), "c_proj": nn.Linear(4 * n_embd, n_embd, bias=False)}) for _ in range(n_layer)]),
        })
        self.resid_lambdas = nn.Parameter(torch.ones(n_layer))
        self.norm_gain = nn.Parameter(torch.ones(n_embd))
        self.logit_scale = nn.Parameter(torch.tensor(1.0))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx, targets):
        x = self.transformer.wte(idx)
        for i, block in enumerate(self.transformer.h):
            h = F.rms_norm(x, (x.size(-1),))
            x = self.resid_lambdas[i] * x + block.c_proj(F.relu(block.c_fc(h)).square())
        logits = self.lm_head(F.rms_norm(x, (x.size(-1),)) * self.norm_gain) * self.logit_scale
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def make_model(cfg, seed):
    torch.manual_seed(seed)
    if cfg["model"] == "gpt":
        model = GPT(GPTConfig(sequence_len=cfg["seq_len"], vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_kv_head=cfg["n_kv_head"], n_embd=cfg["n_embd"]))
        model.init_weights(seed=seed)
        return model
    return TinyLM(cfg["vocab_size"], cfg["n_layer"], cfg["n_embd"])


def make_optimizer(model, cfg):
    return build_optimizer(
        model,
        matrix_lr=0.02,
        embedding_lr=0.2,
        unembedding_lr=0.02,
        scalar_lr=0.05,
        weight_decay=0.1,
        orthogonalization=cfg["orthogonalization"],
        ns_dtype="float32",  # bf16 round-off would amplify the fp32 reduction-order differences
        model_dim=cfg["n_embd"],
        grad_clip=cfg["grad_clip"],
    )


def global_batch(cfg, step):
    """[global_batch, seq_len + 1] tokens for a step, the same in every process; skewed towards low
    ids so there is something to learn."""
    gen = torch.Generator().manual_seed(1000 + step)
    u = torch.rand(cfg["global_batch"], cfg["seq_len"] + 1, generator=gen)
    return (u.square() * cfg["vocab_size"]).long()


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def train(name, world_size=1, rank=0, accum=1, resume_at=None):
    """
    STEPS optimizer steps of config `name`. Each global batch is split into world_size * accum
    equal micro-batches; this process runs micro-batches rank * accum .. rank * accum + accum - 1.
    resume_at: after that many steps, continue with a fresh model and optimizer loaded from
    round-tripped state dicts. Returns {"losses", "grad_norms": floats per step, "params":
    {name: tensor}, "state_shapes": {param name: {state key: shape}} of this rank's optimizer}.
    """
    cfg = CONFIGS[name]
    model = make_model(cfg, seed=0)
    optimizer = make_optimizer(model, cfg)
    rows = cfg["global_batch"] // (world_size * accum)
    losses, grad_norms = [], []
    for step in range(STEPS):
        if step == resume_at:
            model_state, optim_state = _round_trip(model.state_dict()), _round_trip(optimizer.state_dict())
            model = make_model(cfg, seed=1)  # different weights: loading must overwrite them all
            optimizer = make_optimizer(model, cfg)
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
        apply_schedules(optimizer, step, num_iterations=STEPS, warmup_ratio=0.2, warmdown_ratio=0.4, final_lr_frac=0.0)
        batch = global_batch(cfg, step)
        total = torch.zeros(())
        for k in range(accum):
            m = rank * accum + k
            tokens = batch[m * rows : (m + 1) * rows]
            loss = model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
            (loss / accum).backward()
            total += loss.detach() / accum
        if world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        grad_norms.append(optimizer.step().item())
        model.zero_grad(set_to_none=True)
        losses.append(total.item())
    names = {p: n for n, p in model.named_parameters()}
    state_shapes = {names[p]: {k: tuple(v.shape) for k, v in s.items() if k != "step"} for p, s in optimizer.state.items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "grad_norms": grad_norms, "params": params, "state_shapes": state_shapes}


def main():
    out_dir = sys.argv[1]
    _, rank, _, world_size, _ = compute_init("cpu")
    results = {name: {"plain": train(name, world_size, rank), "resumed": train(name, world_size, rank, resume_at=RESUME_AT)} for name in CONFIGS}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    compute_cleanup()


if __name__ == "__main__":
    main()
