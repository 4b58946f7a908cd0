"""
The one dial: everything a pretraining run needs is derived from --depth (and the data/seq_len
the user picks). Every derived value can be overridden by its flag. Summary in docs/scaling.md.

Model: GPTConfig.from_depth (n_embd = 64 * depth rounded to head_dim 128, n_head = n_embd / 128).

Token horizon: D = ratio * N, N = parameters in matmuls (transformer matrices + lm_head, the
embedding lookup costs no FLOPs), ratio 20 by default (Chinchilla, Hoffmann et al. 2022).

Total batch size (tokens per optimizer step): B = 2^19 * (D / 10^10) ^ 0.383, rounded to a power
of two. 2^19 tokens is nanochat's batch for its d20 run (~10B tokens); the exponent is the fit of
the optimal batch size against dataset size in Bergsma et al. 2025 ("Power Lines: Scaling Laws for
Weight Decay and Batch Size in LLM Pre-training"): the optimal batch depends on D, not on N.

Learning rates: Muon's orthogonalised updates have a width-independent scale, so matrix_lr is a
constant 0.02; the AdamW learning rates (embedding 0.2, lm_head 0.004, scalars 0.5) are given at
n_embd = 768 and scaled by (n_embd / 768)^-0.5 in nanochat.optim.build_optimizer (muP-style).

Weight decay (decoupled, on the Muon matrices): Wang & Aitchison 2024 ("How to set AdamW's weight
decay as you scale model and dataset size") and Bergsma et al. 2025 find that what should stay
fixed is the EMA timescale of the weights, 1 / (lr * wd) steps, as a fraction of the run. We take
wd = 0.2 at the reference run (2^19-token batches for 10B tokens, ~19k steps) and keep
lr * wd * num_iterations constant: wd = 0.2 * 19073 / num_iterations, capped so that the timescale stays >= 100 steps
(wd <= 1 / (100 lr) = 0.5): in short runs (toy CPU runs of a few hundred steps) the fraction rule
would otherwise make the weights an average of the last handful of updates (wd 15, a 3-step
timescale, at 250 steps).
"""

import math

REFERENCE_TOKENS = 1e10
REFERENCE_BATCH = 2**19
REFERENCE_WEIGHT_DECAY = 0.2
REFERENCE_ITERATIONS = REFERENCE_TOKENS / REFERENCE_BATCH

MIN_DECAY_TIMESCALE = 100  # steps
MATRIX_LR = 0.02
EMBEDDING_LR = 0.2
UNEMBEDDING_LR = 0.004
SCALAR_LR = 0.5


def num_scaling_params(model):
    """Parameters that cost FLOPs: all but the token embedding lookup."""
    return model.num_params() - model.transformer.wte.weight.numel()


def derive_batch_size(target_tokens, min_batch):
    """Power-of-two total batch size in tokens for a run of target_tokens, at least min_batch."""
    b = REFERENCE_BATCH * (target_tokens / REFERENCE_TOKENS) ** 0.383
    b = 2 ** round(math.log2(b))
    return max(b, min_batch)


def derive_weight_decay(num_iterations, matrix_lr=MATRIX_LR):
    wd = REFERENCE_WEIGHT_DECAY * REFERENCE_ITERATIONS / max(num_iterations, 1)
    return min(wd, 1.0 / (MIN_DECAY_TIMESCALE * matrix_lr))


def derive_training_hparams(n_params, seq_len, world_size, ratio=20.0, total_batch_size=None, num_iterations=None, weight_decay=None):
    """
    n_params: num_scaling_params(model). Returns a dict with target_tokens, total_batch_size,
    num_iterations, weight_decay, and the learning rates; given (non-None) values are kept.
    """
    target_tokens = ratio * n_params
    if total_batch_size is None:
        total_batch_size = derive_batch_size(target_tokens, seq_len * world_size)
    if num_iterations is None:
        num_iterations = max(1, round(target_tokens / total_batch_size))
    if weight_decay is None:
        weight_decay = derive_weight_decay(num_iterations)
    return {
        "target_tokens": int(num_iterations * total_batch_size),
        "total_batch_size": int(total_batch_size),
        "num_iterations": int(num_iterations),
        "weight_decay": float(weight_decay),
        "matrix_lr": MATRIX_LR,
        "embedding_lr": EMBEDDING_LR,
        "unembedding_lr": UNEMBEDDING_LR,
        "scalar_lr": SCALAR_LR,
    }
