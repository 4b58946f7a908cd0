"""
Inference: a preallocated KV cache and a generation engine.

Prefill runs the prompt once (batch 1); its cache is then replicated for the N samples of that
prompt, which are decoded together one token per step. The assistant can call the python tool:
when a sample emits <|python_start|> code <|python_end|>, the engine runs the code in the sandbox
(nanochat/execution.py) and forces <|output_start|> result <|output_end|> into that sample's stream.
"""

import torch
import torch.nn.functional as F


class KVCache:
    """
    Keys and values of every layer, preallocated: k, v each [n_layer, B, max_len, n_kv_head, head_dim].
    `pos` is the number of positions already written (the same for every row of the batch).
    """

    def __init__(self, n_layer, batch_size, max_len, n_kv_head, head_dim, device, dtype):
        shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    @classmethod
    def for_model(cls, model, batch_size, max_len):
        c = model.config
        device = model.lm_head.weight.device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return cls(c.n_layer, batch_size, max_len, c.n_kv_head, c.n_embd // c.n_head, device, dtype)

    def insert_kv(self, layer_idx, k, v):
        """Write k, v [B, T, n_kv_head, head_dim] at positions pos..pos+T of layer layer_idx; return
        the keys and values of positions 0..pos+T (views, no copy)."""
        T = k.size(1)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer_idx, :, self.pos : end] = k
        self.v[layer_idx, :, self.pos : end] = v
        return self.k[layer_idx, :, :end], self.v[layer_idx, :, :end]

    def advance(self, T):
        """Called by the model after its last layer: T new positions are now written."""
        self.pos += T

    def expand(self, batch_size):
        """A cache for batch_size rows, each a copy of row 0 of this one (shared prefill)."""
        new = KVCache.__new__(KVCache)
        new.k = self.k[:, :1].expand(-1, batch_size, -1, -1, -1).clone()
        new.v = self.v[:, :1].expand(-1, batch_size, -1, -1, -1).clone()
        new.max_len, new.pos = self.max_len, self.pos
        return new

    def nbytes(self):
        return self.k.numel() * self.k.element_size() * 2


def sample_next_token(logits, generator, temperature=1.0, top_k=None, top_p=None):
    """
    logits: fp32 [B, V]. Returns int64 [B, 1]. temperature 0 -> argmax. top_k keeps the k most
    likely tokens; top_p keeps the smallest set whose probability reaches p (Holtzman et al. 2019).
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        drop = cum - F.softmax(sorted_logits, dim=-1) >= top_p  # keep tokens until p is reached
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class _SampleState:
    """Per-sample bookkeeping for the tool-use state machine."""

    def __init__(self):
        self.forced = []  # tokens to feed next instead of sampling
        self.in_python = False
        self.python_tokens = []
        self.done = False


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, top_p=None, seed=42, stop_tokens=None, tools=True):
        """
        Stream the continuation of one prompt. tokens: list[int] prompt ids.
        Yields (token_column, mask_column) per step: lists of num_samples ints; mask 1 = sampled,
        0 = forced by the engine (tool output). A sample is done at <|assistant_end|>, <|bos|> or
        any of stop_tokens; later entries of a done sample's column are meaningless and callers skip
        them (generate_batch does). Ends when all samples are done or after max_tokens steps.
        """
        model, tok = self.model, self.tokenizer
        device = model.lm_head.weight.device
        S = tok.special_tokens
        stops = {S["<|assistant_end|>"], tok.bos_token_id} | set(stop_tokens or ())
        generator = torch.Generator(device=device).manual_seed(seed)

        max_len = len(tokens) + max_tokens
        prefill_cache = KVCache.for_model(model, 1, max_len)
        logits = model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=prefill_cache)[:, -1, :]
        cache = prefill_cache.expand(num_samples) if num_samples > 1 else prefill_cache
        logits = logits.expand(num_samples, -1)
        states = [_SampleState() for _ in range(num_samples)]

        for _ in range(max_tokens):
            if all(s.done for s in states):
                break
            sampled = sample_next_token(logits, generator, temperature, top_k, top_p)[:, 0].tolist()
            column, masks = [], []
            for i, s in enumerate(states):
                if s.forced:
                    t, m = s.forced.pop(0), 0
                else:
                    t, m = sampled[i], 1
                column.append(t)
                masks.append(m)
                if s.done:
                    continue
                if t in stops:
                    s.done = True
                elif tools and t == S["<|python_start|>"]:
                    s.in_python, s.python_tokens = True, []
                elif tools and t == S["<|python_end|>"] and s.in_python:
                    s.in_python = False
                    result = self._run_tool(tok.decode(s.python_tokens))
                    s.forced.extend([S["<|output_start|>"]] + tok.encode(result) + [S["<|output_end|>"]])
                elif s.in_python:
                    s.python_tokens.append(t)
            yield column, masks
            if cache.pos + 1 > cache.max_len:
                break
            logits = model(torch.tensor(column, dtype=torch.long, device=device)[:, None], kv_cache=cache)[:, -1, :]

    @staticmethod
    def _run_tool(code):
        from nanochat.execution import run_tool_call

        return run_tool_call(code)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming: returns (list of token lists, list of mask lists), one per sample, each
        ending at (and excluding) its stop token."""
        S = self.tokenizer.special_tokens
        stops = {S["<|assistant_end|>"], self.tokenizer.bos_token_id} | set(kwargs.get("stop_tokens") or ())
        results = [[] for _ in range(num_samples)]
        masks = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask in self.generate(tokens, num_samples, **kwargs):
            for i, (t, m) in enumerate(zip(column, mask)):
                if done[i]:
                    continue
                if t in stops:
                    done[i] = True
                    continue
                results[i].append(t)
                masks[i].append(m)
            if all(done):
                break
        return results, masks
