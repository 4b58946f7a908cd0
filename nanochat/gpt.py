"""
The GPT model. Knows nothing about distribution, checkpoints or data.

Architecture (each choice's source in brackets):
- rotary position embeddings, no learned positions [RoPE, Su et al. 2021]
- RMSNorm without learnable parameters, pre-norm, and after the token embedding [Zhang & Sennrich 2019]
- QK-norm: RMSNorm on queries and keys after RoPE, for stable attention logits [Dehghani et al. 2023]
- grouped-query attention: n_kv_head <= n_head key/value heads [Ainslie et al. 2023]
- ReLU^2 MLP with 4x expansion [So et al. 2021, "Primer"; modded-nanogpt]
- untied token embedding and lm_head, no biases anywhere
- logit soft-capping: logits = c * tanh(logits / c) [Gemma 2, 2024]
- optional sliding-window attention chosen per layer by a pattern such as "SSSL"
  (S = window of sliding_window tokens, L = full context) [Beltagy et al. 2020; Gemma 2]

Precision: parameters live in fp32; activations are computed in the model's compute dtype by
casting weights at their point of use (no autocast): bf16 on CUDA, fp32 elsewhere unless
`model.compute_dtype` says otherwise (bf16 matmuls pay off on CPUs with AMX, e.g. Xeon Sapphire
Rapids, and rarely elsewhere; docs/LOG.md). Logits and loss are always fp32.

The elementwise layers (norm, relu_squared, apply_rotary_emb) and the fused lm_head + soft-cap +
cross-entropy (linear_cross_entropy) carry hand-written backward passes for speed on CPU; they live
in nanochat/kernels.py, and each is the plain expression under torch.compile.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.kernels import apply_rotary_emb, decode_product, linear_cross_entropy, norm, relu_squared, small_linear, small_linear_cat

try:  # FlashAttention-3 (Hopper only), used for training-time attention when installed
    from flash_attn_interface import flash_attn_func as _fa3_func
except ImportError:
    _fa3_func = None


@dataclass
class GPTConfig:
    sequence_len: int = 1024  # max context in tokens (RoPE tables are built 10x longer for generation)
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768
    window_pattern: str = "L"  # per-layer attention span, tiled over layers: L = full, S = sliding window
    sliding_window: int = 0  # tokens attended by S layers (0: sequence_len // 2)
    logit_softcap: float = 15.0  # 0 disables

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head_dim={self.n_embd // self.n_head} must be even for RoPE")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern={self.window_pattern!r} must be a non-empty string of S and L")

    @classmethod
    def from_depth(cls, depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=128, **kwargs):
        """
        The one model-size dial. n_embd = depth * aspect_ratio (64: width grows with depth as in
        nanochat's d12..d26 family), rounded up to a multiple of head_dim; n_head = n_embd / head_dim
        (fixed head dim 128 keeps attention kernels efficient); n_kv_head = n_head (no GQA) unless given.
        """
        n_embd = max(head_dim, math.ceil(depth * aspect_ratio / head_dim) * head_dim)
        n_head = n_embd // head_dim
        if kwargs.get("n_kv_head") is None:
            kwargs["n_kv_head"] = n_head
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_embd=n_embd, **kwargs)

    def to_dict(self):
        return asdict(self)


class Linear(nn.Linear):
    """nn.Linear without bias whose fp32 weight is cast to the input's dtype (bf16 compute on CUDA)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        if decode_product(x):  # a CPU decode step's few rows: the fastest formulation (kernels.py)
            return small_linear(x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight.to(x.dtype))


def attention_mask(Tq, Tk, window, left_pad, device):
    """
    Which keys each query may see, for attention() where its mask-free paths do not apply: bool
    [Tq, Tk] (or [B, 1, Tq, Tk] with left_pad), True = visible; None where a mask-free path applies.
    The Tq queries are the last Tq of the Tk positions; window: keys visible per query (itself
    included); left_pad: None or int64 [B], padding slots at the start of each row (hidden).
    """
    if left_pad is None and window >= Tk and (Tq == Tk or Tq == 1):
        return None
    q_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    k_pos = torch.arange(Tk, device=device)[None, :]
    allowed = (k_pos <= q_pos) & (q_pos - k_pos < window)
    if left_pad is not None:
        # [B, 1, Tq, Tk]; a padding query keeps its own key so its softmax row is not empty
        # (an all-masked row gives NaN, which would then leak through 0 * NaN in later layers)
        real = k_pos[None] >= left_pad[:, None, None]
        allowed = ((allowed & real) | (k_pos == q_pos))[:, None]
    return allowed


def attention(q, k, v, window, left_pad=None, mask=None):
    """
    Causal (optionally sliding-window) attention where the Tq queries are the LAST Tq positions of
    the Tk keys (Tq == Tk in training, Tq < Tk when decoding against a KV cache).
    q: [B, Tq, H, D], k, v: [B, Tk, Hkv, D] (same dtype). window: keys visible per query
    (including itself); >= Tk means full causal. left_pad: None or int64 [B], the number of padding
    slots at the start of each row (a KV cache holding prompts of different lengths): those keys are
    hidden. mask: attention_mask(Tq, Tk, window, left_pad) when the caller made it already (the
    model makes it once per forward, not once per layer). Returns [B, Tq, H, D].
    """
    Tq, Tk = q.size(1), k.size(1)
    if _fa3_func is not None and q.is_cuda and q.dtype == torch.bfloat16 and Tq == Tk and left_pad is None:
        return _fa3_func(q, k, v, causal=True, window_size=(window - 1 if window < Tk else -1, 0))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA wants [B, H, T, D]
    gqa = k.size(1) != q.size(1)
    if mask is None:
        mask = attention_mask(Tq, Tk, window, left_pad, q.device)
    if mask is not None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    elif Tq == Tk:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)  # one new token sees all keys
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, window):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def forward(self, x, cos_sin, kv_cache, mask=None):
        B, T, _ = x.shape
        if decode_product(x) and type(self.c_q) is type(self.c_k) is type(self.c_v) is Linear:
            # a CPU decode step: q, k and v as one product (the LoRA-wrapped layers go one by one)
            qkv = small_linear_cat(x.reshape(B * T, -1), (self.c_q.weight, self.c_k.weight, self.c_v.weight))
            q, k, v = qkv.view(B, T, -1).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        else:
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # all keys/values so far: [B, Tk, Hkv, D]
        y = attention(q, k, v, self.window, kv_cache.left_pad if kv_cache is not None else None, mask)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx, window):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, window)
        self.mlp = MLP(config)
        self.dropout = 0.0  # residual dropout (GPT.set_dropout), in train mode only

    def forward(self, x, cos_sin, kv_cache, mask=None):
        x = x + F.dropout(self.attn(norm(x), cos_sin, kv_cache, mask), self.dropout, self.training)
        return x + F.dropout(self.mlp(norm(x)), self.dropout, self.training)


class GPT(nn.Module):
    def __init__(self, config, compute_dtype=None):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype  # None: bf16 on CUDA, fp32 elsewhere
        self.windows = self.layer_windows(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i, w) for i, w in enumerate(self.windows)]),
        })
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        # RoPE tables: fp32 buffers (not parameters, not saved), 10x the training context so the
        # engine can generate past it.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary(self.rotary_seq_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def layer_windows(config):
        """Keys visible per query in each layer: the pattern tiled over layers; the last layer is
        always full context (it produces the logits)."""
        big = 1 << 62
        short = config.sliding_window or max(1, config.sequence_len // 2)
        pattern = (config.window_pattern * config.n_layer)[: config.n_layer]
        return [short if c == "S" and i < config.n_layer - 1 else big for i, c in enumerate(pattern)]

    @staticmethod
    def _precompute_rotary(seq_len, head_dim, base=10000):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self, seed=None):
        """
        Initialisation (also what a fresh model gets before training):
        - wte ~ N(0, 1): the embedding is RMS-normed right after lookup, so its scale is free.
        - c_q, c_k, c_v, c_fc ~ U(-a, a), a = sqrt(3 / fan_in): unit-variance outputs for unit inputs.
        - attention and MLP output projections (c_proj) = 0: every block starts as the identity,
          so the residual stream is clean at step 0 (modded-nanogpt).
        - lm_head ~ N(0, 0.001^2): near-uniform initial predictions, loss starts at ~ln(vocab_size).
        Runs on whatever device the parameters are on (construct on "meta", to_empty, then init).
        """
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        self.transformer.wte.weight.normal_(0.0, 1.0, generator=gen)
        self.lm_head.weight.normal_(0.0, 0.001, generator=gen)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                a = math.sqrt(3.0 / lin.weight.size(1))
                lin.weight.uniform_(-a, a, generator=gen)
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        cos, sin = self._precompute_rotary(self.rotary_seq_len, self.config.n_embd // self.config.n_head)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_compute_dtype(self, device):
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    def set_dropout(self, p):
        """Residual dropout: each block's attention and MLP outputs are zeroed with probability p
        (and the rest scaled by 1 / (1 - p)) in train mode [Srivastava et al. 2014; GPT-2's
        resid_pdrop], for fine-tuning on small data. Not a model setting: checkpoints do not store
        it. Raises ValueError unless 0 <= p < 1."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout {p} is not in [0, 1)")
        for block in self.transformer.h:
            block.dropout = float(p)
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """
        Training FLOPs per token at full context: 6 * (parameters in matmuls, i.e. all but the
        embedding lookup) + the attention score/value matmuls, 12 * n_layer * n_embd * ctx where ctx
        is each layer's average attended span (Kaplan et al. 2020, appendix; PaLM appendix B).
        """
        c = self.config
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        T = c.sequence_len
        attn = sum(12 * c.n_embd * min(w, T) for w in self.windows)
        return 6 * matmul_params + attn

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """
        idx: int64 [B, T] token ids. targets: int64 [B, T] or None; -1 = ignored position.
        kv_cache: an engine.KVCache (inference) or None; positions continue from kv_cache.pos, minus
        kv_cache.left_pad[b] for row b when the cache holds left-padded prompts of different lengths.
        Returns fp32 logits [B, T, vocab_size] if targets is None, else the fp32 cross-entropy loss
        (scalar for "mean"/"sum", [B, T] for "none"; nats per token).
        """
        B, T = idx.shape
        t0 = kv_cache.pos if kv_cache is not None else 0
        longest = t0 + T - (min(kv_cache.pad) if kv_cache is not None else 0)  # slots minus the least padding
        if longest > self.rotary_seq_len:
            raise ValueError(f"sequence of {longest} tokens exceeds the RoPE table ({self.rotary_seq_len})")
        compute_dtype = self.get_compute_dtype(idx.device)
        left_pad = kv_cache.left_pad if kv_cache is not None else None
        if left_pad is None:
            cos_sin = (self.cos[:, t0 : t0 + T].to(compute_dtype), self.sin[:, t0 : t0 + T].to(compute_dtype))
        else:  # per-row positions [B, T] (padding slots get position 0; they are masked anyway)
            pos = (torch.arange(t0, t0 + T, device=idx.device)[None, :] - left_pad[:, None]).clamp(min=0)
            cos_sin = (self.cos[0, pos].to(compute_dtype), self.sin[0, pos].to(compute_dtype))  # [B, T, 1, D/2]
        masks = {}  # window -> attention_mask, made once per forward when there is one (a padded cache)
        if left_pad is not None:
            masks = {w: attention_mask(T, t0 + T, w, left_pad, idx.device) for w in set(self.windows)}
        x = norm(self.transformer.wte(idx).to(compute_dtype))
        for block, window in zip(self.transformer.h, self.windows):
            x = block(x, cos_sin, kv_cache, masks.get(window))
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        if targets is None:
            logits = self.lm_head(x).float()
            if self.config.logit_softcap:
                c = self.config.logit_softcap
                if torch.is_grad_enabled():
                    logits = c * torch.tanh(logits / c)
                else:  # inference: in place, no [B, T, V] temporaries
                    logits = logits.div_(c).tanh_().mul_(c)
            return logits
        loss = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), self.config.logit_softcap, loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss
