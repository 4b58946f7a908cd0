"""
Inference: a preallocated KV cache and a generation engine with continuous batching.

Prefill runs each prompt once; the N samples of one prompt share that prefill (its cache rows are
copied). Rows are then decoded together, one token per row per step. Prompts of different lengths
sit in one cache left-padded: row b's first left_pad[b] slots are padding that attention hides, and
its positions (for RoPE) start at 0 at its first real token, so every row computes exactly what it
would compute alone. Requests may join a running batch between two steps (after their own prefill)
and rows leave as soon as they finish: iteration-level scheduling, "continuous batching"
(Yu et al. 2022, "Orca: A Distributed Serving System for Transformer-Based Generative Models").

The assistant can call the python tool: when a row emits <|python_start|> code <|python_end|>, the
engine runs the code in the sandbox (nanochat/execution.py) and forces <|output_start|> result
<|output_end|> into that row's stream.

Layers, bottom up: KVCache (tensors) -> sample_next_token -> DecodeBatch (rows, tool use, stops)
-> Engine (generate / generate_batch for one prompt, generate_many for several).
"""

from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanochat.common import NanochatError


class KVCache:
    """
    Keys and values of every layer, preallocated: k, v each [n_layer, B, max_len, n_kv_head, head_dim].
    `pos` is the number of slots already written (the same for every row of the batch).
    `left_pad` is None (every row starts at slot 0) or int64 [B] on the cache's device: row b's
    first left_pad[b] slots are padding, hidden by attention, and its token in slot s has position
    s - left_pad[b]. The GPT reads `pos` and `left_pad`, and calls insert_kv / advance.
    """

    def __init__(self, n_layer, batch_size, max_len, n_kv_head, head_dim, device, dtype, left_pad=None):
        shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        # zeros, not empty: slots that become left padding when caches are merged must hold finite
        # values (attention weights them by 0, and 0 * NaN = NaN)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.set_left_pad(left_pad or [0] * batch_size)

    @classmethod
    def for_model(cls, model, batch_size, max_len, left_pad=None):
        """A cache shaped for model (fp32 on CPU, bf16 on CUDA, the model's compute dtype)."""
        c = model.config
        device = model.lm_head.weight.device
        dtype = model.get_compute_dtype(device)
        return cls(c.n_layer, batch_size, max_len, c.n_kv_head, c.n_embd // c.n_head, device, dtype, left_pad)

    @property
    def batch_size(self):
        return self.k.size(1)

    def set_left_pad(self, left_pad):
        """left_pad: B ints, padding slots at the start of each row (kept on the host too)."""
        if len(left_pad) != self.batch_size:
            raise ValueError(f"left_pad has {len(left_pad)} entries for a batch of {self.batch_size}")
        self.pad = [int(p) for p in left_pad]
        # None when no row is padded: the model then takes its mask-free attention paths
        self.left_pad = torch.tensor(self.pad, dtype=torch.long, device=self.k.device) if any(self.pad) else None

    def lengths(self):
        """Tokens held per row (slots written minus padding): list of B ints."""
        return [self.pos - p for p in self.pad]

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

    @classmethod
    def concat(cls, parts, max_len):
        """
        A new cache holding the rows of several caches, right-aligned so that all rows end at the
        same slot. parts: list of (cache, rows, start): rows (list of ints, repeats allowed) of
        cache, its slots start..cache.pos (start drops leading slots that are padding in every
        selected row). The result has pos = max(cache.pos - start) and max_len >= that; each row's
        left padding grows by however far it was shifted right.
        """
        first = parts[0][0]
        pos = max(c.pos - start for c, _, start in parts)
        if max_len < pos:
            raise ValueError(f"max_len {max_len} < {pos} slots already written")
        n_layer, _, _, n_kv_head, head_dim = first.k.shape
        batch = sum(len(rows) for _, rows, _ in parts)
        new = cls(n_layer, batch, max_len, n_kv_head, head_dim, first.k.device, first.k.dtype)
        pad, b = [], 0
        for c, rows, start in parts:
            shift = pos - (c.pos - start)
            if min((c.pad[r] for r in rows), default=start) < start:
                raise ValueError(f"start {start} drops real tokens of a selected row")
            idx = torch.tensor(rows, dtype=torch.long, device=c.k.device)
            new.k[:, b : b + len(rows), shift:pos] = c.k[:, idx, start : c.pos]
            new.v[:, b : b + len(rows), shift:pos] = c.v[:, idx, start : c.pos]
            pad += [c.pad[r] - start + shift for r in rows]
            b += len(rows)
        new.pos = pos
        new.set_left_pad(pad)
        return new

    def expand(self, batch_size):
        """A cache for batch_size rows, each a copy of row 0 of this one (shared prefill)."""
        return KVCache.concat([(self, [0] * batch_size, 0)], self.max_len)

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


@dataclass
class GenerationRequest:
    """
    One prompt and how to sample its continuations.
    tokens: prompt token ids (non-empty). num_samples: continuations sharing the prompt's prefill.
    max_tokens: decode steps per sample, the stop token included. temperature 0 is greedy; top_k
    None/0 and top_p None/1 are off. seed: the request's own torch.Generator, so its samples do not
    depend on what else is in the batch. stop_tokens: ids that end a sample besides
    <|assistant_end|> and <|bos|>. tools: run the python tool on <|python_start|>...<|python_end|>.
    """

    tokens: list
    num_samples: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 42
    stop_tokens: tuple = ()
    tools: bool = True


TokenEvent = namedtuple("TokenEvent", "key sample token mask finish")
TokenEvent.__doc__ = """
One row's token of one decode step. key: what the caller passed to DecodeBatch.add for the request
(Engine.generate_many: the request's index). sample: 0..num_samples-1. token: int id. mask: 1
sampled, 0 forced by the engine (tool output). finish: None while the row goes on, "stop" when
token is a stop token (the row's last event), "length" when the row used its max_tokens.
"""


class _Group:
    """A request's sampling state, shared by its rows."""

    def __init__(self, key, request, stops, device):
        self.key, self.request, self.stops = key, request, stops
        self.generator = torch.Generator(device=device).manual_seed(request.seed)


class _Row:
    """Per-sample state: steps taken and the tool-use state machine."""

    def __init__(self, group, sample):
        self.group, self.sample = group, sample
        self.steps = 0
        self.forced = []  # tokens to feed next instead of sampling
        self.in_python = False
        self.python_tokens = []
        self.done = False


class DecodeBatch:
    """
    Rows of different prompts decoded together (continuous batching): add() prefills new requests
    and merges them into the running batch, step() samples one token for every row, reports it, and
    feeds the rows still going through the model. Finished and cancelled rows leave the cache at
    once, so the batch never decodes for a row that is done.

    State between steps: cache holds every token fed so far, logits fp32 [B, V] the next-token
    logits of each row; rows[i] is cache row i. A request's rows stay contiguous and in order.
    Not thread-safe: one thread owns a batch (the server gives each model replica its own).
    """

    def __init__(self, model, tokenizer, run_tool=None):
        self.model, self.tokenizer = model, tokenizer
        self.device = model.lm_head.weight.device
        S = tokenizer.special_tokens
        self._default_stops = {S["<|assistant_end|>"], tokenizer.bos_token_id}
        self._run_tool = run_tool or _run_tool
        self.cache, self.logits, self.rows = None, None, []

    def __len__(self):
        return len(self.rows)

    def _capacity(self, pos):
        # slots a row still needs: it feeds at most max_tokens - steps - 1 more tokens
        need = max(r.group.request.max_tokens - r.steps for r in self.rows)
        return pos + max(need, 1)

    @torch.inference_mode()
    def add(self, requests, keys=None):
        """
        Prefill requests (list of GenerationRequest) in one left-padded forward and append their
        num_samples rows each. keys: one per request, reported in TokenEvent.key (default: the
        request's index in this call). Raises ValueError on an empty prompt or a bad num_samples /
        max_tokens, and NanochatError when a prompt and its max_tokens do not fit the model's RoPE
        table (model.rotary_seq_len positions), which would otherwise fail part-way through the reply.
        Prompts longer than config.sequence_len but within the table are the caller's to refuse.
        """
        keys = list(range(len(requests))) if keys is None else list(keys)
        limit = getattr(self.model, "rotary_seq_len", None)  # a stand-in model without RoPE has none
        for r in requests:
            if not r.tokens or r.num_samples < 1 or r.max_tokens < 1:
                raise ValueError(f"bad request: {len(r.tokens)} prompt tokens, num_samples={r.num_samples}, max_tokens={r.max_tokens}")
            # the prompt and every sampled token but the last go through the model, one position each
            need = len(r.tokens) + r.max_tokens - 1
            if limit is not None and need > limit:
                raise NanochatError(f"a prompt of {len(r.tokens)} tokens with max_tokens={r.max_tokens} needs {need} positions, "
                                    f"more than the model's context of {limit}")
        lens = [len(r.tokens) for r in requests]
        L = max(lens)
        idx = torch.tensor([[self.tokenizer.bos_token_id] * (L - len(r.tokens)) + list(r.tokens) for r in requests], dtype=torch.long, device=self.device)
        prefill = KVCache.for_model(self.model, len(requests), L, left_pad=[L - n for n in lens])
        logits = self.model(idx, kv_cache=prefill)[:, -1, :]
        src_rows = [i for i, r in enumerate(requests) for _ in range(r.num_samples)]
        new_rows = []
        for key, r in zip(keys, requests):
            group = _Group(key, r, self._default_stops | set(r.stop_tokens or ()), self.device)
            new_rows += [_Row(group, s) for s in range(r.num_samples)]
        old = [(self.cache, list(range(len(self.rows))), 0)] if self.rows else []
        self.rows += new_rows
        pos = max([L] + ([self.cache.pos] if old else []))
        self.cache = KVCache.concat(old + [(prefill, src_rows, 0)], self._capacity(pos))
        new_logits = logits[torch.tensor(src_rows, device=self.device)]
        self.logits = torch.cat([self.logits, new_logits]) if old else new_logits

    def cancel(self, key, sample=None):
        """Drop the rows of request `key` (one sample, or all); they leave at the next step."""
        for r in self.rows:
            if r.group.key == key and (sample is None or r.sample == sample):
                r.done = True

    @torch.inference_mode()
    def step(self):
        """One decode step for every row. Returns a list of TokenEvent, one per row still going at
        the start of the step (cancelled rows report nothing)."""
        self._drop_done()
        if not self.rows:
            return []
        # sample per request (each has its own generator and settings); rows of a request are contiguous
        sampled, i = [], 0
        while i < len(self.rows):
            g = self.rows[i].group
            j = i
            while j < len(self.rows) and self.rows[j].group is g:
                j += 1
            r = g.request
            sampled.append(sample_next_token(self.logits[i:j], g.generator, r.temperature, r.top_k, r.top_p)[:, 0])
            i = j
        sampled = torch.cat(sampled).tolist()
        S = self.tokenizer.special_tokens
        events, column = [], []
        for row, t in zip(self.rows, sampled):
            req = row.group.request
            m = 1
            if row.forced:
                t, m = row.forced.pop(0), 0
            row.steps += 1
            finish = None
            if t in row.group.stops:
                finish = "stop"
            elif req.tools and t == S["<|python_start|>"]:
                row.in_python, row.python_tokens = True, []
            elif req.tools and t == S["<|python_end|>"] and row.in_python:
                row.in_python = False
                result = self._run_tool(self.tokenizer.decode(row.python_tokens))
                row.forced.extend([S["<|output_start|>"]] + self.tokenizer.encode(result) + [S["<|output_end|>"]])
            elif row.in_python:
                row.python_tokens.append(t)
            if finish is None and row.steps >= req.max_tokens:
                finish = "length"
            row.done = finish is not None
            events.append(TokenEvent(row.group.key, row.sample, t, m, finish))
            column.append(t)
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if keep:
            column = torch.tensor([column[i] for i in keep], dtype=torch.long, device=self.device)[:, None]
            self._drop_done()
            if self.cache.pos + 1 > self.cache.max_len:  # not reached with _capacity's bound; cheap guard
                self.cache = KVCache.concat([(self.cache, list(range(len(self.rows))), 0)], self._capacity(self.cache.pos))
            self.logits = self.model(column, kv_cache=self.cache)[:, -1, :]
        else:
            self._drop_done()
        return events

    def _drop_done(self):
        """Remove finished/cancelled rows from rows, cache and logits; trim slots that became
        padding in every remaining row."""
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.logits = None, None
            return
        start = min(self.cache.pad[i] for i in keep)
        self.cache = KVCache.concat([(self.cache, keep, start)], self.cache.max_len - start)
        self.logits = self.logits[torch.tensor(keep, device=self.device)]


def _run_tool(code):
    from nanochat.execution import run_tool_call

    return run_tool_call(code)


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
        any of stop_tokens; later entries of a done sample's column repeat its last token and
        callers skip them (generate_batch does). Ends when all samples are done or after max_tokens steps.
        """
        request = GenerationRequest(list(tokens), num_samples, max_tokens, temperature, top_k, top_p, seed, tuple(stop_tokens or ()), tools)
        batch = DecodeBatch(self.model, self.tokenizer, self._run_tool)
        batch.add([request])
        column, masks = [None] * num_samples, [1] * num_samples
        while len(batch):
            for e in batch.step():
                column[e.sample], masks[e.sample] = e.token, e.mask
            yield list(column), list(masks)

    @torch.inference_mode()
    def generate_many(self, requests):
        """
        Stream the continuations of several prompts (a list of GenerationRequest, different lengths
        allowed) decoded as one batch. Yields, per decode step, the list of TokenEvent of the rows
        still going (TokenEvent.key is the request's index). Ends when every row is done.
        """
        batch = DecodeBatch(self.model, self.tokenizer, self._run_tool)
        batch.add(requests)
        while len(batch):
            yield batch.step()

    @staticmethod
    def _run_tool(code):
        return _run_tool(code)

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
