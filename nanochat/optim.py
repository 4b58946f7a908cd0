"""
The pretraining optimizer: Muon for the hidden weight matrices, AdamW for the embedding, the
lm_head and the 0/1-D parameters, in ONE optimizer object that also does the data-parallel
gradient averaging (ZeRO-2 style, no DDP wrapper around the model). Plus the schedules (LR
warmup / constant / warmdown, Muon momentum warmup) that every training script shares.

Public API
- orthogonalize(G, steps, method, dtype)   Newton-Schulz / Polar Express orthogonalisation.
- polar_express_coefficients(steps)        the Polar Express polynomial schedule.
- muon_shape_scale(shape)                  Muon's per-matrix update scale.
- MuonAdamW(param_groups, grad_clip=0.0)   the optimizer; step() returns the global grad norm.
- build_optimizer(model, ...)              parameter grouping by name for nanochat's GPT.
- get_lr_multiplier, get_muon_momentum, apply_schedules.

Import-safe: nothing here touches CUDA or the process group at import time; the distributed
world (rank, world_size) is read when the optimizer is constructed.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from nanochat.common import NanochatError

# ------------------------------------------------------------------------------------------------
# Orthogonalisation (the heart of Muon)

# Keller Jordan's quintic Newton-Schulz coefficients ("Muon: An optimizer for hidden layers in
# neural networks", 2024, https://kellerjordan.github.io/posts/muon/). p(x) = a x + b x^3 + c x^5
# is applied to the singular values; the coefficients maximise the slope at 0 (a = 3.4445) so that
# small singular values grow fast, at the price of not converging to exactly 1: after 5 steps
# singular values of the input in [2e-3, 1] * ||G||_F land in [0.68, 1.21] (see the tests).
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel, Persson, Musco, Gower 2025, "The Polar Express: Optimal Matrix Sign Methods
# and Their Application to the Muon Algorithm", arXiv:2505.16932, Algorithm 1): a different odd
# quintic per iteration, each the minimax-optimal one for the interval the singular values are known
# to lie in after the previous iterations. The paper's settings: singular values assumed >= 1e-3
# of the Frobenius norm, "cushion" 0.024 (no polynomial is fitted on an interval reaching lower
# than 0.024 * its top: keeps early polynomials well conditioned), and a 1.01 safety factor against
# bf16 round-off (every polynomial but the last is applied to x / 1.01, and G is normalised by
# 1.01 * ||G||_F). After 5 steps singular values in [1e-3, 1] * ||G||_F land in [0.86, 1.14].
POLAR_EXPRESS_LOWER = 1e-3
POLAR_EXPRESS_CUSHION = 0.02407327424182761
POLAR_EXPRESS_SAFETY = 1.01

ORTHOGONALIZATIONS = ("newton_schulz", "polar_express")
# Precision of the polynomial iteration. "auto": bf16 on CUDA and on CPUs with native bf16 matmuls
# (AVX512-BF16 or AMX, as reported by oneDNN), fp32 elsewhere. bf16 is what nanochat and
# modded-nanogpt use everywhere; on a 2-core AVX512-BF16 EPYC it orthogonalises the depth-6 matrix
# set in 0.27 s instead of 0.65 s (fp32) with the same singular-value band. "float32" makes the
# iteration bit-reproducible across code paths (the exact differential tests pin it).
NS_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


def default_ns_dtype(device):
    """The "auto" iteration dtype for a device: bf16 where matmuls run natively in bf16, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _minimax_odd_quintic(lo, hi):
    """
    Coefficients (a, b, c) of the odd quintic p(x) = a x + b x^3 + c x^5 that minimises
    max_{x in [lo, hi]} |1 - p(x)| (0 < lo <= hi). Remez exchange: the optimum equioscillates
    on lo < q < r < hi, where q, r are p's interior critical points, with p = 1 - E at lo and r
    and p = 1 + E at q and hi. Solve the 4x4 linear system for (a, b, c, E), move q, r to the
    new critical points (roots of p' = a + 3 b x^2 + 5 c x^4), repeat until E is stable.
    """
    if lo / hi > 1 - 5e-6:
        # Degenerate interval: the limit of the optimum as lo -> hi, the unique odd quintic with
        # p(hi) = 1, p'(hi) = 0, p''(hi) = 0 (flat at hi).
        return 15 / (8 * hi), -10 / (8 * hi**3), 3 / (8 * hi**5)
    q, r = (3 * lo + hi) / 4, (lo + 3 * hi) / 4  # exact in the limit lo -> hi
    err = math.inf
    for _ in range(100):
        x = np.array([lo, q, r, hi])
        system = np.stack([x, x**3, x**5, np.array([1.0, -1.0, 1.0, -1.0])], axis=1)
        a, b, c, new_err = np.linalg.solve(system, np.ones(4))
        disc = math.sqrt(9 * b * b - 20 * a * c)
        q, r = math.sqrt((-3 * b - disc) / (10 * c)), math.sqrt((-3 * b + disc) / (10 * c))
        if abs(new_err - err) < 1e-15:
            return float(a), float(b), float(c)
        err = new_err
    raise RuntimeError(f"Remez exchange did not converge on [{lo}, {hi}]")


@functools.lru_cache(maxsize=None)
def polar_express_coefficients(steps, safety=POLAR_EXPRESS_SAFETY):
    """
    The Polar Express schedule for `steps` iterations: a tuple of `steps` (a, b, c) triples, each
    the odd quintic a x + b x^3 + c x^5 for one iteration (Amsel et al. 2025, Algorithm 1, with
    their defaults lower bound 1e-3 and cushion 0.024). Greedy: polynomial t is the minimax
    approximation of 1 on [l_t, u_t], the interval that the singular values occupy after the
    polynomials before it; then l_{t+1} = p_t(l_t), u_{t+1} = 2 - l_{t+1}. Every polynomial but
    the last is replaced by p(x / safety), and the interval is tracked through what is actually
    applied. safety=1.0 reproduces the paper's table of coefficients (before its 1.01 division).
    Raises ValueError for steps < 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    lo, hi = POLAR_EXPRESS_LOWER, 1.0
    out = []
    for t in range(steps):
        a, b, c = _minimax_odd_quintic(max(lo, POLAR_EXPRESS_CUSHION * hi), hi)
        if POLAR_EXPRESS_CUSHION * hi > lo:
            # Fitted on the cushioned interval, so it is not centred on 1 over [lo, hi]: rescale
            # so that 1 - p(lo) = p(hi) - 1.
            s = 2 / (a * lo + b * lo**3 + c * lo**5 + a * hi + b * hi**3 + c * hi**5)
            a, b, c = a * s, b * s, c * s
        if t < steps - 1:  # p(x / safety): room for round-off; the last one maps onto the final band
            a, b, c = a / safety, b / safety**3, c / safety**5
        out.append((a, b, c))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    return tuple(out)


def orthogonalize(G, steps=5, method="newton_schulz", dtype=None):
    """
    Approximate the orthogonal polar factor U V^T of G = U S V^T (the "zeroth power" of G) by an
    odd matrix polynomial X <- a X + b (X X^T) X + c (X X^T)^2 X applied `steps` times, which acts
    on every singular value separately and pushes it towards 1.

    G: [..., rows, cols] float tensor (a stack of matrices). Returns a tensor of G's shape and dtype
    whose singular values lie, for singular values of G in [l, 1] * ||G||_F (l = 2e-3 for
    "newton_schulz", 1e-3 for "polar_express"), in [0.68, 1.21] (newton_schulz, 5 steps) or
    [0.86, 1.14] (polar_express, 5 steps); smaller singular values are shrunk less far towards 1
    but never flipped in sign. dtype: precision of the iteration; None = default_ns_dtype(G.device)
    (bf16 on CUDA and bf16-capable CPUs: the iteration is stable in bf16, Jordan 2024). The
    Frobenius normalisation is always fp32.
    method: "newton_schulz" (fixed coefficients, Jordan 2024) or "polar_express" (per-iteration
    coefficients, Amsel et al. 2025). Raises ValueError for G.ndim < 2 or an unknown method.
    """
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    if method == "newton_schulz":
        coeffs, norm_safety = (NEWTON_SCHULZ_COEFFS,) * steps, 1.0
    elif method == "polar_express":
        coeffs, norm_safety = polar_express_coefficients(steps), POLAR_EXPRESS_SAFETY
    else:
        raise ValueError(f"unknown orthogonalization {method!r}, expected one of {ORTHOGONALIZATIONS}")
    shape = G.shape
    X = G.float().reshape(-1, shape[-2], shape[-1])
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the smaller Gram matrix X X^T: rows <= cols
        X = X.mT
    # ||X||_2 <= ||X||_F, so after this every singular value is in [0, 1] where the polynomials are
    # designed to work; the 1e-7 keeps an all-zero update at zero.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * norm_safety + 1e-7)
    if dtype is None:
        dtype = default_ns_dtype(G.device)
    X = X.to(dtype)
    for a, b, c in coeffs:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    if transposed:
        X = X.mT
    return X.reshape(shape).to(G.dtype)


def muon_shape_scale(shape):
    """
    Muon's update multiplier for a [rows, cols] = [fan_out, fan_in] weight: sqrt(max(1, rows / cols)).
    The orthogonalised update has spectral norm ~1; the spectral condition for feature learning
    (Yang, Simon, Bernstein 2023, arXiv:2310.17813) asks for ||dW||_2 ~ sqrt(fan_out / fan_in), which
    we follow for tall matrices (e.g. the MLP's c_fc [4d, d] gets 2x) and clamp at 1 for wide ones,
    as in Keller Jordan's Muon / modded-nanogpt.
    """
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


# ------------------------------------------------------------------------------------------------
# The optimizer

MUON_DEFAULTS = dict(momentum=0.95, nesterov=True, ns_steps=5, orthogonalization="newton_schulz", ns_dtype="auto", weight_decay=0.0)
ADAMW_DEFAULTS = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)

# AdamW parameters smaller than this are never sharded: a reduce-scatter + all-gather pair costs two
# latency-bound collectives, while all the small ones share ONE coalesced all-reduce. 16384 fp32
# elements = 64 KiB; embeddings and lm_head (vocab x n_embd) are far above it.
ADAMW_SHARD_MIN_NUMEL = 16384


@dataclass
class _MuonBucket:
    """The Muon parameters of one group that share one shape, stacked for batched orthogonalisation."""

    group_index: int
    shape: tuple
    params: list  # all K parameters of this shape, in group order
    chunk: int  # ceil(K / world_size): matrices per rank, the last ones padding
    positions: list  # params[i] lives at row positions[i] of the padded [world_size * chunk, ...] stack
    pad_positions: list
    owned: list  # params[rank::world_size]: the ones this rank updates (rows 0.. of its chunk)


def _stack(tensors):
    """torch.stack via a preallocated buffer: torch.stack (a cat) of many matrices is ~25x slower on
    CPU than one multi-tensor copy (measured on this project's 2-core CPU)."""
    out = tensors[0].new_empty((len(tensors), *tensors[0].shape))
    torch._foreach_copy_(list(out.unbind(0)), tensors)
    return out


def _sq_norm(tensors, device):
    """Sum of squares of a list of tensors as a 0-D fp32 tensor (one pass per tensor, no temporaries)."""
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm(tensors)).float().square().sum()


class _Pending:
    """An async collective's result tensor; .get() waits once (no-op without a collective)."""

    def __init__(self, tensor, work=None):
        self.tensor, self.work = tensor, work

    def get(self):
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.tensor


class MuonAdamW(torch.optim.Optimizer):
    """
    One optimizer for the whole model. Each param group has kind="muon" or kind="adamw".

    Muon (Jordan 2024, https://kellerjordan.github.io/posts/muon/), for 2-D hidden matrices:
        buf <- momentum * buf + (1 - momentum) * grad
        u   <- (1 - momentum) * grad + momentum * buf    (Nesterov; nesterov=False: u <- buf)
        p   <- p * (1 - lr * weight_decay) - lr * muon_shape_scale(p.shape) * orthogonalize(u)
    Group keys: lr, momentum (0.95), nesterov (True), ns_steps (5), orthogonalization
    ("newton_schulz" | "polar_express"), ns_dtype ("auto" | "bfloat16" | "float32", see NS_DTYPES),
    weight_decay (0; decoupled, multiplied by lr as in AdamW).
    Parameters of equal shape are stacked and orthogonalised as one batch.

    AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101), for everything else: p <- p * (1 - lr * wd);
    m, v EMAs with betas; bias-corrected step. Computed by torch's fused AdamW kernel (the one behind
    torch.optim.AdamW(fused=True)): one pass over p, g, m, v instead of eight, 5x faster on CPU.
    Group keys: lr, betas ((0.8, 0.95)), eps (1e-10: embedding rows of rare tokens get tiny
    gradients, a larger eps would silence them), weight_decay (0).

    Every group also gets initial_lr (= lr unless given) for apply_schedules.

    grad_clip: if > 0, the averaged gradient is scaled by min(1, grad_clip / (||g|| + 1e-6)) (the
    torch.nn.utils.clip_grad_norm_ rule) before the update. With data parallelism this must happen
    here: the averaged gradient only exists inside step(). Clipping costs one extra synchronisation
    (all reductions must land before any update), so it is off by default.

    step() returns the L2 norm of the averaged gradient over all parameters (0-D fp32 tensor on the
    parameters' device, before clipping). Every parameter must have a .grad at each step
    (RuntimeError otherwise); after step() the .grad tensors hold unspecified values (under data
    parallelism not the averaged gradient): zero them before the next backward.

    Distribution: if torch.distributed is initialised with world_size > 1 at construction, step()
    averages gradients across ranks, each rank updates its shard and keeps only its shard of the
    optimizer state, and the updated parameters are all-gathered. No collectives when world_size == 1.
    state_dict() / load_state_dict() hold this rank's shard (load it on the same rank of a run with
    the same world size and model; NanochatError otherwise).

    Raises NanochatError for invalid hyperparameters or a Muon parameter that is not 2-D.
    """

    # Communication pattern (world_size W > 1), all collectives async on the default group:
    #
    #   1. launch reductions, Muon first (their updates cost the most compute, so they should start
    #      first while the rest is still in flight):
    #      - Muon: per shape bucket of K matrices, matrix i belongs to rank i % W (round-robin);
    #        the gradients are copied into a [W * ceil(K/W), rows, cols] stack ordered rank by rank
    #        (zero padding at the end of the short ranks' chunks) and reduce_scatter'ed (AVG): each
    #        rank receives the averaged gradients of exactly the matrices it owns.
    #      - AdamW, dim 0 divisible by W and >= ADAMW_SHARD_MIN_NUMEL elements: reduce_scatter (AVG)
    #        of the gradient along dim 0; the rank owns rows [rank * n/W, (rank + 1) * n/W).
    #      - every other AdamW parameter: one all_reduce (AVG) of all their gradients flattened
    #        into a single buffer; every rank then does the same (replicated) update.
    #   2. (grad_clip > 0 only) wait for all reductions, all_reduce the squared norm, scale.
    #   3. for each bucket / parameter in launch order: wait for its reduction, update the owned
    #      part in place, launch its all_gather (Muon: into the now-free padded gradient stack;
    #      AdamW: in place, the shard is a view of the parameter). Compute on one bucket overlaps
    #      the reductions of the later ones and the gathers of the earlier ones.
    #   4. all_reduce the squared grad norm, wait for the gathers, copy the gathered Muon matrices
    #      into the parameters this rank does not own.
    # Bytes on the wire per step: one reduce-scatter + one all-gather of every parameter, as in
    # DDP's all-reduce, but the optimizer state and the update compute are split W ways.
    # Rejected alternative: DDP-style bucketed all-reduce during backward (overlaps with backward,
    # but every rank would run every Muon orthogonalisation, which dominates the optimizer step).

    def __init__(self, param_groups, grad_clip=0.0):
        groups = []
        for i, group in enumerate(param_groups):
            group = dict(group)
            group["params"] = list(group["params"])
            kind = group.get("kind")
            if kind not in ("muon", "adamw"):
                raise NanochatError(f"MuonAdamW: param group {i} has kind={kind!r}, expected 'muon' or 'adamw'")
            if "lr" not in group:
                raise NanochatError(f"MuonAdamW: param group {i} ({kind}) has no lr")
            for key, value in (MUON_DEFAULTS if kind == "muon" else ADAMW_DEFAULTS).items():
                group.setdefault(key, value)
            group.setdefault("initial_lr", group["lr"])
            group.setdefault("name", f"{kind}{i}")
            self._validate_group(group)
            groups.append(group)
        if grad_clip < 0:
            raise NanochatError(f"MuonAdamW: grad_clip must be >= 0 (0 disables), got {grad_clip}")
        super().__init__(groups, defaults={})
        self.grad_clip = float(grad_clip)
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        else:
            self._rank, self._world_size = 0, 1
        self._build_plan()

    @staticmethod
    def _validate_group(group):
        where = f"MuonAdamW: param group {group['name']!r}"
        if not group["lr"] >= 0:
            raise NanochatError(f"{where}: lr must be >= 0, got {group['lr']}")
        if not group["weight_decay"] >= 0:
            raise NanochatError(f"{where}: weight_decay must be >= 0, got {group['weight_decay']}")
        if group["kind"] == "muon":
            if not 0 <= group["momentum"] < 1:
                raise NanochatError(f"{where}: momentum must be in [0, 1), got {group['momentum']}")
            if not (isinstance(group["ns_steps"], int) and group["ns_steps"] >= 1):
                raise NanochatError(f"{where}: ns_steps must be an integer >= 1, got {group['ns_steps']!r}")
            if group["orthogonalization"] not in ORTHOGONALIZATIONS:
                raise NanochatError(f"{where}: orthogonalization={group['orthogonalization']!r}, expected one of {ORTHOGONALIZATIONS}")
            if group["ns_dtype"] not in NS_DTYPES:
                raise NanochatError(f"{where}: ns_dtype={group['ns_dtype']!r}, expected one of {tuple(NS_DTYPES)}")
            for p in group["params"]:
                if p.ndim != 2:
                    raise NanochatError(f"{where}: Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")
        else:
            b1, b2 = group["betas"]
            if not (0 <= b1 < 1 and 0 <= b2 < 1):
                raise NanochatError(f"{where}: betas must be in [0, 1), got {group['betas']}")
            if not group["eps"] > 0:
                raise NanochatError(f"{where}: eps must be > 0, got {group['eps']}")

    def _build_plan(self):
        """Who updates what: a pure function of the groups and the world size, same on all ranks."""
        W, r = self._world_size, self._rank
        self._muon_buckets, self._adamw_sharded, self._adamw_replicated = [], [], []
        for gi, group in enumerate(self.param_groups):
            if group["kind"] == "muon":
                by_shape = {}
                for p in group["params"]:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
                for shape, params in by_shape.items():
                    chunk = -(-len(params) // W)
                    positions = [(i % W) * chunk + i // W for i in range(len(params))]
                    pads = sorted(set(range(W * chunk)) - set(positions))
                    self._muon_buckets.append(_MuonBucket(gi, shape, params, chunk, positions, pads, params[r::W]))
            else:
                for p in group["params"]:
                    shard = W > 1 and p.ndim >= 1 and p.shape[0] % W == 0 and p.numel() >= ADAMW_SHARD_MIN_NUMEL
                    (self._adamw_sharded if shard else self._adamw_replicated).append((gi, p))

    def _expected_state_shapes(self):
        """{param: shape of its optimizer state tensors on this rank} (absent: no state here)."""
        W, r = self._world_size, self._rank
        shapes = {}
        for b in self._muon_buckets:
            for p in b.owned:
                shapes[p] = tuple(p.shape)
        for _, p in self._adamw_sharded:
            shapes[p] = (p.shape[0] // W, *p.shape[1:])
        for _, p in self._adamw_replicated:
            shapes[p] = tuple(p.shape)
        return shapes

    @staticmethod
    def _grad(p):
        if p.grad is None:
            raise RuntimeError(f"MuonAdamW.step(): a parameter of shape {tuple(p.shape)} has no .grad; every parameter given to the optimizer must get a gradient each step (freeze with requires_grad=False before building the optimizer)")
        return p.grad

    # -------------------------------------------------------------------------- updates (local)

    def _muon_update(self, group, bucket, g):
        """g: [>= len(owned), rows, cols] averaged gradients of the owned matrices (rows 0..), modified in place."""
        owned = bucket.owned
        if not owned:
            return
        g = g[: len(owned)]
        bufs = []
        for p in owned:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        grads = list(g.unbind(0))
        m = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - m)
        if group["nesterov"]:
            torch._foreach_lerp_(grads, bufs, m)
        else:
            torch._foreach_copy_(grads, bufs)
        update = orthogonalize(g, group["ns_steps"], group["orthogonalization"], NS_DTYPES[group["ns_dtype"]])
        lr = group["lr"]
        torch._foreach_mul_(owned, 1 - lr * group["weight_decay"])
        torch._foreach_add_(owned, list(update.unbind(0)), alpha=-lr * muon_shape_scale(bucket.shape))

    def _adamw_update(self, group, keys, params, grads):
        """AdamW on params (full parameters or dim-0 shards); state lives under the full parameter keys."""
        if not params:
            return
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for key, p in zip(keys, params):
            state = self.state[key]
            if not state:
                # step: 0-D fp32 tensor on the parameter's device, as torch's fused kernel wants it
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            elif state["step"].device != p.device:  # e.g. a checkpoint loaded with map_location="cpu"
                state["step"] = state["step"].to(p.device)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        torch._foreach_add_(steps, 1)
        b1, b2 = group["betas"]
        torch._fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            lr=group["lr"], beta1=b1, beta2=b2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False,
        )  # fmt: skip

    # -------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self):
        W, rank = self._world_size, self._rank
        avg = dist.ReduceOp.AVG if W > 1 else None
        device = next(p.device for group in self.param_groups for p in group["params"])

        # 1. launch the gradient reductions
        muon = []  # (bucket, pending chunk of averaged grads, padded stack)
        for b in self._muon_buckets:
            grads = [self._grad(p) for p in b.params]
            if W == 1:
                muon.append((b, _Pending(_stack(grads)), None))
                continue
            stack = grads[0].new_empty((W * b.chunk, *b.shape))
            torch._foreach_copy_([stack[i] for i in b.positions], grads)
            for i in b.pad_positions:
                stack[i].zero_()
            chunk = grads[0].new_empty((b.chunk, *b.shape))
            muon.append((b, _Pending(chunk, dist.reduce_scatter_tensor(chunk, stack, op=avg, async_op=True)), stack))
        sharded = []  # (group index, param, pending averaged grad shard)
        for gi, p in self._adamw_sharded:
            grad = self._grad(p).contiguous()
            out = grad.new_empty((p.shape[0] // W, *p.shape[1:]))
            sharded.append((gi, p, _Pending(out, dist.reduce_scatter_tensor(out, grad, op=avg, async_op=True))))
        replicated = self._adamw_replicated
        flat = None
        if replicated:
            grads = [self._grad(p) for _, p in replicated]
            if W == 1:
                flat = _Pending(grads)
            else:
                buf = torch.cat([g.reshape(-1) for g in grads])
                work = dist.all_reduce(buf, op=avg, async_op=True)
                flat = _Pending([v.view_as(g) for v, g in zip(buf.split([g.numel() for g in grads]), grads)], work)

        def local_sq_norm(muon_chunks, shard_grads, replicated_grads):
            # each element of the averaged gradient counted exactly once across ranks
            sq = _sq_norm([c[: len(b.owned)] for b, c in muon_chunks if b.owned], device) + _sq_norm(shard_grads, device)
            return sq + _sq_norm(list(replicated_grads), device) if rank == 0 else sq

        # 2. clipping needs the global norm before any update
        sq = torch.zeros((), device=device)
        if self.grad_clip > 0:
            chunks = [(b, pend.get()) for b, pend, _ in muon]
            shard_grads = [pend.get() for _, _, pend in sharded]
            rep_grads = flat.get() if flat is not None else []
            sq = local_sq_norm(chunks, shard_grads, rep_grads)
            if W > 1:
                dist.all_reduce(sq)
            coef = (self.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            for t in [c for _, c in chunks] + shard_grads + list(rep_grads):
                t.mul_(coef.to(t.dtype))

        # 3. update the owned parts, launch the all-gathers
        gathers = []
        for b, pend, stack in muon:
            g = pend.get()
            if self.grad_clip == 0:
                sq += local_sq_norm([(b, g)], [], [])
            group = self.param_groups[b.group_index]
            self._muon_update(group, b, g)
            if W > 1:
                # g becomes the send buffer: owned matrices at rows 0.., padding (zeros) after
                if b.owned:
                    torch._foreach_copy_(list(g[: len(b.owned)].unbind(0)), b.owned)
                gathers.append((b, stack, dist.all_gather_into_tensor(stack, g, async_op=True)))
        for gi in range(len(self.param_groups)):
            keys, shards, grads = [], [], []
            for sgi, p, pend in sharded:
                if sgi == gi:
                    n = p.shape[0] // W
                    keys.append(p)
                    shards.append(p[rank * n : (rank + 1) * n])
                    grads.append(pend.get())
            if self.grad_clip == 0:
                sq += local_sq_norm([], grads, [])
            self._adamw_update(self.param_groups[gi], keys, shards, grads)
            for p, s in zip(keys, shards):
                gathers.append((None, None, dist.all_gather_into_tensor(p, s, async_op=True)))
        if replicated:
            rep_grads = flat.get()
            if self.grad_clip == 0:
                sq += local_sq_norm([], [], rep_grads)
            for gi in range(len(self.param_groups)):
                idx = [j for j, (rgi, _) in enumerate(replicated) if rgi == gi]
                params = [replicated[j][1] for j in idx]
                self._adamw_update(self.param_groups[gi], params, params, [rep_grads[j] for j in idx])

        # 4. global grad norm, finish the gathers
        norm_work = dist.all_reduce(sq, async_op=True) if W > 1 and self.grad_clip == 0 else None
        for b, stack, work in gathers:
            work.wait()
            if b is not None:
                others = [(p, i) for j, (p, i) in enumerate(zip(b.params, b.positions)) if j % W != rank]
                if others:
                    torch._foreach_copy_([p for p, _ in others], [stack[i] for _, i in others])
        if norm_work is not None:
            norm_work.wait()
        return sq.sqrt()

    # -------------------------------------------------------------------------- checkpointing

    def state_dict(self):
        """torch's optimizer state dict of this rank's shard, plus {"sharding": {"rank", "world_size"}}."""
        sd = super().state_dict()
        sd["sharding"] = {"rank": self._rank, "world_size": self._world_size}
        return sd

    def load_state_dict(self, state_dict):
        """Load a shard saved by state_dict() on the same rank of a run with the same world size and
        model. Raises NanochatError on a rank / world-size / parameter-shape mismatch."""
        sharding = state_dict.get("sharding")
        here = {"rank": self._rank, "world_size": self._world_size}
        if sharding != here:
            raise NanochatError(f"optimizer state was saved as {sharding} but this process is {here}: resume with the same number of processes")
        state_dict = {k: v for k, v in state_dict.items() if k != "sharding"}
        try:
            super().load_state_dict(state_dict)
        except ValueError as e:
            raise NanochatError(f"optimizer state does not match the model's parameter groups: {e}") from None
        expected = self._expected_state_shapes()
        for group in self.param_groups:
            for p in group["params"]:
                for key, value in self.state.get(p, {}).items():
                    if key != "step" and (p not in expected or tuple(value.shape) != expected[p]):
                        raise NanochatError(f"optimizer state {key!r} of a parameter of shape {tuple(p.shape)} has shape {tuple(value.shape)}, expected {expected.get(p)}: different model or world size?")


# ------------------------------------------------------------------------------------------------
# Parameter grouping for nanochat's GPT

EMBEDDING_NAME = "transformer.wte.weight"
LM_HEAD_NAME = "lm_head.weight"
LR_REFERENCE_DIM = 768


def build_optimizer(
    model,
    *,
    matrix_lr,
    embedding_lr,
    unembedding_lr,
    scalar_lr,
    weight_decay,
    adam_betas=(0.8, 0.95),
    muon_momentum=0.95,
    ns_steps=5,
    orthogonalization="newton_schulz",
    ns_dtype="auto",
    model_dim=None,
    grad_clip=0.0,
):
    """
    MuonAdamW for a model, grouping its trainable parameters by name:
    - "transformer.wte.weight" ([vocab_size, n_embd]): AdamW, group "embedding", lr embedding_lr * s
    - "lm_head.weight" ([vocab_size, n_embd]): AdamW, group "unembedding", lr unembedding_lr * s
    - every other 2-D parameter (hidden matrices): Muon, group "matrix", lr matrix_lr, weight_decay
    - 0-D / 1-D parameters (gains, per-layer scalars): AdamW, group "scalar", lr scalar_lr
    Weight decay applies to the Muon matrices only; the AdamW groups use 0 (nanochat convention:
    embeddings and gains are not pulled towards zero). adam_betas, muon_momentum, ns_steps,
    orthogonalization, ns_dtype and grad_clip are passed to MuonAdamW (see there).

    model_dim: n_embd. If given, s = (model_dim / 768) ** -0.5 (the AdamW learning rates are tuned at
    n_embd = 768; nanochat scales them like 1/sqrt(width) because an Adam step moves every weight by
    ~lr regardless of width, so the effect on a layer's output grows with the width it sums over;
    muP-style, Yang et al. 2022). None: s = 1 (the rates are used as given). Muon's rate is not
    scaled (its shape scaling keeps updates width-independent), nor are the scalars' (one scalar's
    effect does not grow with width).
    Every group gets initial_lr = lr (see apply_schedules) and name (for logging).
    Raises NanochatError for a parameter of > 2 dims or invalid hyperparameters.
    """
    s = (model_dim / LR_REFERENCE_DIM) ** -0.5 if model_dim is not None else 1.0
    embedding, lm_head, matrices, scalars = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == EMBEDDING_NAME:
            embedding.append(p)
        elif name == LM_HEAD_NAME:
            lm_head.append(p)
        elif p.ndim == 2:
            matrices.append(p)
        elif p.ndim < 2:
            scalars.append(p)
        else:
            raise NanochatError(f"build_optimizer: parameter {name} has shape {tuple(p.shape)}; only 0-, 1- and 2-D parameters are supported")
    adamw = dict(kind="adamw", betas=tuple(adam_betas), eps=1e-10, weight_decay=0.0)
    groups = [
        dict(adamw, name="unembedding", params=lm_head, lr=unembedding_lr * s),
        dict(adamw, name="embedding", params=embedding, lr=embedding_lr * s),
        dict(adamw, name="scalar", params=scalars, lr=scalar_lr),
        dict(kind="muon", name="matrix", params=matrices, lr=matrix_lr, momentum=muon_momentum, ns_steps=ns_steps, orthogonalization=orthogonalization, ns_dtype=ns_dtype, weight_decay=weight_decay),
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise NanochatError("build_optimizer: the model has no trainable parameters")
    return MuonAdamW(groups, grad_clip=grad_clip)


def build_adapter_optimizer(params, *, lr, adam_betas=(0.8, 0.95), weight_decay=0.0, grad_clip=0.0):
    """
    MuonAdamW with one AdamW group "lora" over params (LoRA adapter factors, nanochat.lora): the
    frozen base weights get no optimizer state. AdamW rather than Muon, as in LoRA's published recipes
    (Hu et al. 2021): Muon's orthogonalisation and shape scaling are tuned for full hidden
    matrices, not for [r, in] / [out, r] factors of which only the product B @ A matters.
    lr: used as given (no width scaling); betas and eps as the model's other AdamW groups.
    Raises NanochatError when params is empty or a hyperparameter is invalid.
    """
    params = list(params)
    if not params:
        raise NanochatError("build_adapter_optimizer: no adapter parameters")
    return MuonAdamW([dict(kind="adamw", name="lora", params=params, lr=lr, betas=tuple(adam_betas), eps=1e-10, weight_decay=weight_decay)], grad_clip=grad_clip)


# ------------------------------------------------------------------------------------------------
# Schedules


def get_lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """
    LR multiplier for optimizer step `step` (0-based) of a run of num_iterations steps: linear warmup
    over round(warmup_ratio * N) steps ((step + 1) / warmup), then 1.0, then a linear warmdown over the
    last round(warmdown_ratio * N) steps from 1.0 down to final_lr_frac (reached at step N), the
    trapezoid ("warmup-stable-decay") schedule of nanochat / modded-nanogpt (Hu et al. 2024, MiniCPM).
    Raises NanochatError for num_iterations < 1, ratios outside [0, 1] or summing above 1,
    final_lr_frac outside [0, 1].
    """
    if num_iterations < 1:
        raise NanochatError(f"--num-iterations must be >= 1, got {num_iterations}")
    if not (0 <= warmup_ratio <= 1 and 0 <= warmdown_ratio <= 1 and warmup_ratio + warmdown_ratio <= 1):
        raise NanochatError(f"--warmup-ratio {warmup_ratio} and --warmdown-ratio {warmdown_ratio} must be in [0, 1] with a sum <= 1")
    if not 0 <= final_lr_frac <= 1:
        raise NanochatError(f"--final-lr-frac must be in [0, 1], got {final_lr_frac}")
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if warmdown > 0 and step >= num_iterations - warmdown:
        frac = max(0.0, (num_iterations - step) / warmdown)  # 1 at the start of the warmdown, 0 at step N
        return final_lr_frac + (1 - final_lr_frac) * frac
    return 1.0


def get_muon_momentum(step, warmup_steps=300, start=0.85, end=0.95):
    """Muon momentum for step `step`: linear from `start` to `end` over the first warmup_steps steps,
    then `end` (modded-nanogpt: a lower momentum early averages over fewer, faster-changing gradients)."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return start + (end - start) * frac


def apply_schedules(optimizer, step, *, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """
    Set every group's lr = initial_lr * get_lr_multiplier(...) and every Muon group's momentum =
    get_muon_momentum(step), for the optimizer step about to be taken. Returns (lr multiplier,
    Muon momentum) for logging.
    """
    lrm = get_lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac)
    momentum = get_muon_momentum(step)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            group["momentum"] = momentum
    return lrm, momentum
