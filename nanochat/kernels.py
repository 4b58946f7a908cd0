"""
Hand-written autograd kernels for the GPT model's elementwise layers and its loss, kept out of
gpt.py so that the model file reads as the architecture alone (as upstream nanochat keeps
flash_attention.py and fp8.py apart). They are a CPU speed measure: in eager mode each replaces a
chain of full passes over memory with 2-3 passes and saves one tensor for backward; under
torch.compile every function here falls back to the plain expression, which Inductor fuses itself.
Each is tested against eager autograd of the plain expression, values and gradients
(tests/test_gpt.py); timings are in docs/LOG.md.

- norm(x): RMSNorm over the last dim, no learnable scale [Zhang & Sennrich 2019].
  x: [..., D], any float dtype -> same shape and dtype.
- relu_squared(x): ReLU^2 [So et al. 2021, "Primer"]. Any shape and float dtype.
- apply_rotary_emb(x, cos, sin): RoPE in the half-split layout [Su et al. 2021].
  x: [B, T, H, D]; cos, sin: [1 or B, T, 1, D/2] in x's dtype -> [B, T, H, D].
- decoding() / small_linear(x, weight): x @ weight^T for the few rows of a decode step, through
  whichever of four BLAS / oneDNN formulations is fastest for the shape (timed once per shape).
- linear_cross_entropy(x, weight, targets, softcap, reduction): lm_head + logit soft-cap
  [Gemma 2, 2024] + cross-entropy, chunked so the [N, vocab] logits never exist, with the gradient
  formed in the forward pass [Liger-Kernel, Hsu et al. 2024, arXiv:2410.10989].
  x: [N, D] fp32 or bf16; weight: [V, D]; targets: int64 [N], -1 = ignored -> fp32 nats.
"""

import threading
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# Elementwise layers with hand-written backward passes. Eager autograd runs RMSNorm as ~6 kernels
# each way (pow, mean, rsqrt, mul... and PowBackward) and ReLU^2 as 2 + 4; on a CPU, where each
# kernel is a full pass over memory, these take seconds per training step. The versions below
# save one tensor each and make 2-3 passes. Under torch.compile the plain expressions are used:
# Inductor fuses them itself.


class _RMSNorm(torch.autograd.Function):
    """y = x * r, r = 1 / sqrt(mean(x^2) + eps); dx = r * (dy - y * mean(dy * y))."""

    @staticmethod
    def forward(ctx, x, eps):
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
        r = r.square_().div_(x.size(-1)).add_(eps).rsqrt_().to(x.dtype)
        y = x * r
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, r = ctx.saved_tensors
        m = (dy * y).mean(-1, keepdim=True)
        return torch.addcmul(dy, y, m, value=-1.0).mul_(r), None


def norm(x):
    """RMSNorm over the last dim, no learnable scale, eps = the dtype's machine epsilon (as
    F.rms_norm). x: [..., D] -> same shape and dtype."""
    eps = torch.finfo(x.dtype).eps
    if torch.compiler.is_compiling():
        return F.rms_norm(x, (x.size(-1),), eps=eps)
    return _RMSNorm.apply(x, eps)


class _ReluSquared(torch.autograd.Function):
    """y = relu(x)^2; dx = 2 relu(x) dy."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, dy):
        (r,) = ctx.saved_tensors
        return (dy * r).mul_(2.0)


def relu_squared(x):
    """ReLU^2 [So et al. 2021, "Primer"]. Any shape and float dtype."""
    if torch.compiler.is_compiling():
        return F.relu(x).square()
    return _ReluSquared.apply(x)


def _rotate(x, cos, sin):
    """(x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin) on the two halves of the last dim, written
    straight into the two halves of the output (no torch.cat)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    out = torch.empty_like(x)
    o1, o2 = out[..., :d], out[..., d:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=-1.0)
    return out


class _Rotary(torch.autograd.Function):
    """A rotation per pair; its gradient is the inverse rotation (sin negated)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, -sin), None, None


def apply_rotary_emb(x, cos, sin):
    """
    RoPE [Su et al. 2021] in the half-split layout: rotates the pairs (x[..., i], x[..., i + D/2])
    by the angles whose cos / sin are given. x: [B, T, H, D]; cos, sin: [1, T, 1, D/2] or
    [B, T, 1, D/2] (per-row positions), x's dtype. Returns [B, T, H, D]. cos and sin are constants
    (no gradient).
    """
    if torch.compiler.is_compiling():
        d = x.shape[-1] // 2
        x1, x2 = x[..., :d], x[..., d:]
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
    return _Rotary.apply(x, cos, sin)


# ------------------------------------------------------------------------------------------------
# Few-row products (decoding): the fastest of four equal formulations, measured per shape


# A decode step multiplies a handful of rows (the batch) by each weight. On CPU, which BLAS kernel
# torch's x @ W^T reaches for such a skinny product depends on the shape, and the spread is wide:
# on a 2-vCPU AMD EPYC (Zen 4), MKL takes 8.1 ms for [8, 384] @ [384, 32768] (the lm_head) as
# F.linear, 3.0 ms as (W @ x^T)^T, and at 1 row 5.0 ms as F.linear against 2.0 ms as x @ W^T with
# W^T stored contiguous; oneDNN's inner product on a weight reordered once into its blocked layout
# (what Inductor's CPU freezing pass does) is the fastest at most shapes: the 37 products of a
# depth-6 step read 20 / 14 / 9 GB/s at 1 / 8 / 32 rows against 14 / 13 / 6 for the best of the
# other three (docs/LOG.md). So the first product of each (weight shape, rows bucket, dtype) times
# the formulations and keeps the fastest, as cuBLAS / Inductor autotuning do on GPU.
SMALL_ROWS = 64  # products of at most this many rows are tuned; more rows: F.linear
# formulations: 0 F.linear, 1 (W @ x^T)^T, 2 x @ W^T (W^T stored), 3 oneDNN on a reordered copy of W
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_FORMULATIONS = (0, 1, 2, 3) if _ONEDNN else (0, 1, 2)
_STORED = (2, 3)  # formulations that keep a copy of the weight in the decoding() store
_FASTEST = {}  # (out, in, rows bucket, dtype) -> formulation
_session = threading.local()  # .store: the active decoding() block's weight copies, or None


@contextmanager
def decoding(store=None):
    """
    Within the block, GPT Linear layers with few rows (decode steps, on CPU, without autograd) go
    through small_linear. store: a dict kept by the caller across blocks (DecodeBatch keeps one
    per batch) that holds the weight copies formulations 2 and 3 multiply by; None: a fresh one for this
    block. The weights must not change while a store is in use: optimizers update weights in
    place, some without bumping their version (torch._fused_adamw_), so a stale copy could not be
    detected. Re-entrant; thread-local.
    """
    previous = getattr(_session, "store", None)
    _session.store = {} if store is None else store
    try:
        yield
    finally:
        _session.store = previous


def decoding_active():
    return getattr(_session, "store", None) is not None


def decode_product(x):
    """True when x [..., in] @ W^T should go through small_linear: inside decoding(), on CPU,
    without autograd, and at most SMALL_ROWS rows."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and decoding_active() and x.numel() <= SMALL_ROWS * x.size(-1)


def _stored(choice, weight, dtype):
    """The copy of weight (cast to dtype) that formulation 2 or 3 multiplies by, made on first use
    in this store. Keyed by the weight itself, never by a temporary cast of it (whose address a
    later temporary could reuse)."""
    store = _session.store
    key = (choice, weight.data_ptr(), dtype, tuple(weight.shape))
    if key not in store:
        w = weight.to(dtype)
        store[key] = w.t().contiguous() if choice == 2 else torch.ops.mkldnn._reorder_linear_weight(w)
    return store[key]


def _product(choice, x, weight):
    if choice == 0:
        return F.linear(x, weight.to(x.dtype))
    if choice == 1:
        return torch.mm(weight.to(x.dtype), x.t()).t().contiguous()
    if choice == 2:
        return torch.mm(x, _stored(2, weight, x.dtype))
    return torch.ops.mkldnn._linear_pointwise(x, _stored(3, weight, x.dtype), None, "none", [], "")


def small_linear(x, weight):
    """
    x @ weight^T for x [M, in] with M <= SMALL_ROWS, inside decoding(): the fastest formulation
    for this shape, timed on first use (the best of 4 interleaved runs of each, 15-20 products per
    new (shape, power-of-two row bucket)). x: fp32 or bf16; weight: [out, in], any float dtype,
    cast to x's (stored copies are cast once). Returns [M, out] contiguous in x's dtype. The
    formulations differ only in summation order (round-off).
    """
    key = (weight.size(0), weight.size(1), 1 << (x.size(0) - 1).bit_length(), x.dtype)
    choice = _FASTEST.get(key)
    if choice is None:
        times = {c: float("inf") for c in _FORMULATIONS}
        for c in _FORMULATIONS:
            _product(c, x, weight)  # warm-up (and the stored copy)
        for _ in range(4):  # interleaved rounds, the best of each: robust to a busy moment
            for c in _FORMULATIONS:
                t0 = time.perf_counter()
                _product(c, x, weight)
                times[c] = min(times[c], time.perf_counter() - t0)
        choice = _FASTEST[key] = min(times, key=times.__getitem__)
        for c in _STORED:  # keep only the copy the winner uses
            if c != choice:
                _session.store.pop((c, weight.data_ptr(), x.dtype, tuple(weight.shape)), None)
    return _product(choice, x, weight)


def small_linear_cat(x, weights):
    """
    x @ cat(weights)^T through small_linear: several products of the same input (attention's q, k
    and v) as one wider one, which streams the weights better than three skinny ones (depth 6,
    8 rows: 0.9 ms against 1.6 ms per step's q/k/v, docs/LOG.md). weights: [out_i, in] each; the
    concatenation (in x's dtype) is kept in the decoding() store. Returns [M, sum out_i].
    """
    store = _session.store
    key = ("cat", x.dtype) + tuple((w.data_ptr(), tuple(w.shape)) for w in weights)
    if key not in store:
        store[key] = torch.cat([w.to(x.dtype) for w in weights])
    return small_linear(x, store[key])


# ------------------------------------------------------------------------------------------------
# The language-model head and its loss, fused and chunked

# Rows of x per chunk of the fused head, chosen so that one chunk of logits is ~32M fp32 elements
# (128 MiB at vocab 32768: big enough for the three matmuls to run at full speed, small enough
# that the buffers are reused instead of a fresh [N, vocab] tensor per op), and rows per sub-block
# of the elementwise work (~4M elements: it stays in the L2/L3 caches across its ~10 passes).
HEAD_CHUNK_ELEMENTS = 1 << 25
HEAD_SUBBLOCK_ELEMENTS = 1 << 22


def _head_chunk_loop(x, weight, targets, softcap, need_grad):
    """
    The chunked head: for rows [s, e) of x, logits = softcap(x @ W^T) is computed into a reused
    buffer, the per-row loss logsumexp(logits) - logits[target] taken, and, when need_grad, the
    gradient of the SUMMED loss with respect to the pre-cap logits,
        dz = (softmax(logits) - onehot(target)) * (1 - tanh(z / c)^2),
    formed in place and immediately contracted into dx = dz @ W and dW += dz^T @ x. The [N, vocab]
    logits never exist. Returns (row_loss fp32 [N] (0 at ignored rows), dx [N, D] in x's dtype or
    None, dW fp32 [V, D] or None).
    With a soft-cap c > 0 the logits lie in [-c, c], so exp() cannot overflow for c < 80 and no
    max is subtracted; without one the row max is subtracted first.
    """
    N, V = x.size(0), weight.size(0)
    w = weight.to(x.dtype)
    chunk = max(1, min(N, HEAD_CHUNK_ELEMENTS // V))
    sub = max(1, min(chunk, HEAD_SUBBLOCK_ELEMENTS // V))
    z_buf = x.new_empty(chunk, V)  # x @ W^T in the compute dtype, then tanh(z / c) in place
    p_buf = torch.empty(chunk, V, dtype=torch.float32, device=x.device)  # logits -> softmax -> dz
    row_loss = torch.empty(N, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x) if need_grad else None
    dw = torch.zeros(V, x.size(1), dtype=torch.float32, device=x.device) if need_grad else None
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        xc, zc, pc = x[s:e], z_buf[: e - s], p_buf[: e - s]
        torch.mm(xc, w.t(), out=zc)
        for a in range(0, e - s, sub):
            b = min(a + sub, e - s)
            y = targets[s + a : s + b]
            valid = y >= 0
            y = y.clamp(min=0)[:, None]
            logits = pc[a:b]
            if softcap:
                t = zc[a:b].float().mul_(1.0 / softcap).tanh_()  # float() is a copy only for bf16
                torch.mul(t, softcap, out=logits)
                target_logit = logits.gather(1, y).squeeze(1)
                sumexp = logits.exp_().sum(1, keepdim=True)
                log_z = sumexp.log().squeeze(1)
            else:
                logits.copy_(zc[a:b])
                target_logit = logits.gather(1, y).squeeze(1)
                row_max = logits.amax(1, keepdim=True)
                sumexp = logits.sub_(row_max).exp_().sum(1, keepdim=True)
                log_z = sumexp.log().squeeze(1) + row_max.squeeze(1)
            row_loss[s + a : s + b] = (log_z - target_logit) * valid
            if not need_grad:
                continue
            dz = logits.div_(sumexp)  # softmax
            dz.scatter_add_(1, y, -valid[:, None].float())  # - onehot(target) on counted rows
            dz.mul_(valid[:, None])  # ignored rows get no gradient
            if softcap:
                dz.addcmul_(dz, t.square_(), value=-1.0)  # * (1 - t^2): the derivative of c tanh(z / c)
        if need_grad:
            dzc = pc.to(x.dtype)  # no copy in fp32; bf16 matmuls as in the plain path
            torch.mm(dzc, w, out=dx[s:e])
            if dw.dtype == x.dtype:
                dw.addmm_(dzc.t(), xc)
            else:
                dw.add_(torch.mm(dzc.t(), xc))
    return row_loss, dx, dw


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed loss of the chunked head with its gradients computed in the forward pass (the loss is
    the end of the graph, so nothing is lost by doing it early; Liger-Kernel's fused linear cross
    entropy does the same on GPU, Hsu et al. 2024, arXiv:2410.10989)."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap):
        row_loss, dx, dw = _head_chunk_loop(x, weight, targets, softcap, need_grad=True)
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        return row_loss.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return dx * grad_loss.to(dx.dtype), (dw * grad_loss).to(ctx.weight_dtype), None, None


def linear_cross_entropy(x, weight, targets, softcap=0.0, reduction="mean"):
    """
    cross_entropy(softcap(x @ weight^T), targets) without materialising the [N, vocab] logits.
    x: [N, D] activations (fp32 or bf16); weight: [V, D] (lm_head, any float dtype, cast to x's);
    targets: int64 [N], -1 = ignored. softcap: c of c * tanh(logits / c), 0 = none. reduction:
    "mean" over counted positions (NaN if there are none, as in F.cross_entropy), "sum", or "none"
    (fp32 [N], 0 at ignored positions). Returns fp32 nats.
    The fused path (chunked, gradient formed in the forward pass) is exact up to fp32 round-off and
    takes the CPU head from ~20 s to ~8.5 s per 16K tokens at vocab 32768 (docs/LOG.md). Under
    torch.compile, or when a per-token loss needs a gradient (RL), the plain path runs instead:
    Inductor fuses its elementwise work itself.
    Raises ValueError for an unknown reduction.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown loss reduction {reduction!r}, expected 'mean', 'sum' or 'none'")
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if torch.compiler.is_compiling() or (need_grad and reduction == "none"):
        logits = F.linear(x, weight.to(x.dtype)).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)
    if need_grad:
        total = _FusedLinearCrossEntropy.apply(x, weight, targets, float(softcap))
    else:
        row_loss = _head_chunk_loop(x, weight, targets, softcap, need_grad=False)[0]
        if reduction == "none":
            return row_loss
        total = row_loss.sum()
    return total / (targets >= 0).sum() if reduction == "mean" else total
