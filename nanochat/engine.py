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
<|output_end|> into that row's stream. A sandboxed call takes ~30 ms (a fresh interpreter); in
generate_many (evals, RL rollouts) the row is parked meanwhile and the rest of the batch decodes on.

Layers, bottom up: KVCache (tensors) -> sample_tokens -> DecodeBatch (rows, tool use, stops)
-> Engine (generate / generate_batch for one prompt, generate_many for several).
"""

from collections import namedtuple
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanochat.common import NanochatError
from nanochat.kernels import decoding


class KVCache:
    """
    Keys and values of every layer, preallocated: k, v each [n_layer, capacity, max_len, n_kv_head,
    head_dim], of which the first batch_size rows are in use (capacity >= batch_size leaves room
    for rows to join without a new allocation).
    `pos` is the number of slots already written (the same for every row of the batch).
    `pad` (host list) / `left_pad` (None when no row is padded, else int64 [batch_size] on the
    cache's device): row b's first pad[b] slots are padding, hidden by attention, and its token in
    slot s has position s - pad[b]. The GPT reads `pos` and `left_pad`, and calls insert_kv / advance.
    """

    def __init__(self, n_layer, batch_size, max_len, n_kv_head, head_dim, device, dtype, left_pad=None, capacity=None):
        shape = (n_layer, max(capacity or 0, batch_size), max_len, n_kv_head, head_dim)
        # zeros, not empty: slots that become left padding when rows are merged must hold finite
        # values (attention weights them by 0, and 0 * NaN = NaN)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.set_left_pad(left_pad or [0] * batch_size)

    @classmethod
    def for_model(cls, model, batch_size, max_len, left_pad=None, capacity=None):
        """A cache shaped for model (fp32 on CPU, bf16 on CUDA, the model's compute dtype)."""
        c = model.config
        device = model.lm_head.weight.device
        dtype = model.get_compute_dtype(device)
        return cls(c.n_layer, batch_size, max_len, c.n_kv_head, c.n_embd // c.n_head, device, dtype, left_pad, capacity)

    @property
    def batch_size(self):
        return len(self.pad)

    @property
    def capacity(self):
        return self.k.size(1)

    def set_left_pad(self, left_pad):
        """left_pad: one int per row in use (batch_size <= capacity): padding slots at its start."""
        if not 0 < len(left_pad) <= self.capacity:
            raise ValueError(f"left_pad has {len(left_pad)} entries for a cache of {self.capacity} rows")
        self.pad = [int(p) for p in left_pad]
        # None when no row is padded: the model then takes its mask-free attention paths
        self.left_pad = torch.tensor(self.pad, dtype=torch.long, device=self.k.device) if any(self.pad) else None

    def lengths(self):
        """Tokens held per row (slots written minus padding): list of batch_size ints."""
        return [self.pos - p for p in self.pad]

    def insert_kv(self, layer_idx, k, v):
        """Write k, v [batch_size, T, n_kv_head, head_dim] at positions pos..pos+T of layer
        layer_idx; return the keys and values of positions 0..pos+T (views, no copy)."""
        B, T = k.shape[:2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer_idx, :B, self.pos : end] = k
        self.v[layer_idx, :B, self.pos : end] = v
        return self.k[layer_idx, :B, :end], self.v[layer_idx, :B, :end]

    def advance(self, T):
        """Called by the model after its last layer: T new positions are now written."""
        self.pos += T

    @classmethod
    def concat(cls, parts, max_len, capacity=None):
        """
        A new cache holding the rows of several caches, right-aligned so that all rows end at the
        same slot. parts: list of (cache, rows, start): rows (list of ints, repeats allowed) of
        cache, its slots start..cache.pos (start drops leading slots that are padding in every
        selected row). The result has pos = max(cache.pos - start), max_len >= that and at least
        `capacity` rows; each row's left padding grows by however far it was shifted right.
        """
        first = parts[0][0]
        pos = max(c.pos - start for c, _, start in parts)
        if max_len < pos:
            raise ValueError(f"max_len {max_len} < {pos} slots already written")
        n_layer, _, _, n_kv_head, head_dim = first.k.shape
        batch = sum(len(rows) for _, rows, _ in parts)
        new = cls(n_layer, batch, max_len, n_kv_head, head_dim, first.k.device, first.k.dtype, capacity=capacity)
        new.pos, pad, b = pos, [], 0
        for c, rows, start in parts:
            if min((c.pad[r] for r in rows), default=start) < start:
                raise ValueError(f"start {start} drops real tokens of a selected row")
            pad += new._write(b, c, rows, start)
            b += len(rows)
        new.set_left_pad(pad)
        return new

    def _write(self, b, src, rows, start=0):
        """Copy slots start..src.pos of src's rows into rows b.. of this cache, right-aligned at
        self.pos (>= src.pos - start); returns the rows' padding here (the caller sets it)."""
        shift = self.pos - (src.pos - start)
        idx = torch.tensor(rows, dtype=torch.long, device=src.k.device)
        self.k[:, b : b + len(rows), shift : self.pos] = src.k[:, idx, start : src.pos]
        self.v[:, b : b + len(rows), shift : self.pos] = src.v[:, idx, start : src.pos]
        return [src.pad[r] - start + shift for r in rows]

    def append_rows(self, src, rows):
        """Add src's rows (list of ints) after the rows in use, in place: copies only those rows.
        Needs batch_size + len(rows) <= capacity and src.pos <= pos (a new row is left-padded)."""
        b = self.batch_size
        if b + len(rows) > self.capacity or src.pos > self.pos:
            raise ValueError(f"cannot append {len(rows)} rows of {src.pos} slots to a cache of {b}/{self.capacity} rows at slot {self.pos}")
        self.set_left_pad(self.pad + self._write(b, src, rows))

    def keep_rows(self, keep):
        """Keep the rows `keep` (sorted list of row indices) in use, in place, and return their new
        order: each row beyond len(keep) that stays moves into the slot of a row that goes (one
        row's copy each, the rest of the cache untouched). Returns the list `order`: new row i
        holds what old row order[i] held."""
        n, kept = len(keep), set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))
        if holes:
            h = torch.tensor(holes, device=self.k.device)
            m = torch.tensor(movers, device=self.k.device)
            self.k[:, h, : self.pos] = self.k[:, m, : self.pos]
            self.v[:, h, : self.pos] = self.v[:, m, : self.pos]
            for i, j in zip(holes, movers):
                order[i] = j
        self.set_left_pad([self.pad[i] for i in order])
        return order

    def expand(self, batch_size):
        """A cache for batch_size rows, each a copy of row 0 of this one (shared prefill)."""
        return KVCache.concat([(self, [0] * batch_size, 0)], self.max_len)

    def nbytes(self):
        return self.k.numel() * self.k.element_size() * 2


def sample_tokens(logits, temperature, uniform, top_k=None, top_p=None, max_k=None, any_greedy=True):
    """
    One token per row, each row with its own settings, in one set of batched tensor ops.

    logits: fp32 [B, V]. temperature: fp32 [B] (0: greedy, the argmax). uniform: fp32 [B] in [0, 1),
    the row's random number for this draw. top_k: None or int64 [B], the k most likely tokens kept
    (0: all). top_p: None or fp32 [B], the smallest set of most likely tokens whose probability
    reaches p kept (1: all; Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration").
    max_k: a host int >= every top_k, when every row has one (so the candidates are found without
    reading top_k back from the device); None: candidates are the whole sorted vocabulary.
    any_greedy: False when no temperature is 0 (a host fact: the argmax is then skipped).
    Returns int64 [B].

    Inverse-CDF sampling: the token is the first (in the order below) whose cumulative probability
    exceeds uniform * total, so a row's draw depends on its own logits and number only, never on
    the other rows. With top-k / top-p the candidates are the max(top_k) best tokens of each row,
    sorted by probability (torch.topk), and the cumulative sum runs over them; without, over the
    vocabulary in id order. Tokens of probability 0 are never drawn.
    """
    B, V = logits.shape
    greedy = temperature == 0
    t = torch.where(greedy, 1.0, temperature)[:, None]
    K = V if max_k is None else min(max_k, V)
    if top_k is not None or top_p is not None:
        values, ids = torch.topk(logits, K, dim=-1)  # K == V: the whole vocabulary, sorted
        values = values / t
        if top_k is not None:
            k = torch.where(top_k > 0, top_k, V)
            values = values.masked_fill(torch.arange(K, device=logits.device)[None] >= k[:, None], float("-inf"))
        probs = torch.softmax(values, dim=-1)
        if top_p is not None:
            cum = probs.cumsum(-1)
            probs = probs.masked_fill(cum - probs >= top_p[:, None], 0.0)  # keep tokens until p is reached
    else:
        ids, probs = None, torch.softmax(logits / t, dim=-1)
    cdf = probs.cumsum(-1)
    j = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.size(-1) - 1)
    tokens = (j if ids is None else ids.gather(1, j))[:, 0]
    return torch.where(greedy, logits.argmax(-1), tokens) if any_greedy else tokens


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
    """A request's sampling state, shared by its rows: each sample's random numbers, one per step,
    drawn at once from the request's own generator (so they do not depend on the batch)."""

    def __init__(self, key, request, stops, device):
        self.key, self.request, self.stops = key, request, stops
        generator = torch.Generator(device=device).manual_seed(request.seed)
        self.uniform = torch.rand((request.num_samples, request.max_tokens), generator=generator, device=device)


class _Row:
    """Per-sample state: steps taken and the tool-use state machine."""

    def __init__(self, group, sample):
        self.group, self.sample = group, sample
        self.steps = 0
        self.forced = []  # tokens to feed next instead of sampling
        self.in_python = False
        self.python_tokens = []
        self.tool = None  # with park_tools: the Future of the python tool call whose output comes next
        self.done = False


class DecodeBatch:
    """
    Rows of different prompts decoded together (continuous batching): add() prefills new requests
    and merges them into the running batch, step() samples one token for every row, reports it, and
    feeds the rows still going through the model. Finished and cancelled rows leave at once, so
    the batch never decodes for a row that is done.

    State between steps: cache holds every token fed so far, logits fp32 [B, V] the next-token
    logits of each row, uniform fp32 [B, W] each row's random numbers for its next steps (column 0
    is the next one); rows[i] is cache row i. Rows leave in place (KVCache.keep_rows: the last rows
    move into the holes, so the row order is not the order of arrival) and join in place when the
    cache has room (KVCache.append_rows); only when it has not is the cache rebuilt, with room to
    spare for later arrivals. Sampling is one batched call for all rows (sample_tokens); the one
    host sync per step is reading the sampled tokens, which the stop and tool logic needs.
    The model's weights must not change while a batch lives: its decode products may keep
    transposed copies of them (kernels.decoding). Make a new batch after an optimizer step.
    Not thread-safe: one thread owns a batch (the server gives each model replica its own).
    """

    def __init__(self, model, tokenizer, run_tool=None, park_tools=False):
        self.model, self.tokenizer = model, tokenizer
        self.park_tools = park_tools
        self.parked = []  # (row, its 1-row KVCache, its random numbers [1, W]): tool calls in flight
        self._tools = None  # the thread pool running parked rows' tool calls
        self.device = model.lm_head.weight.device
        S = tokenizer.special_tokens
        self._default_stops = {S["<|assistant_end|>"], tokenizer.bos_token_id}
        self._python = (S["<|python_start|>"], S["<|python_end|>"], S["<|output_start|>"], S["<|output_end|>"])
        self._run_tool = run_tool or _run_tool
        self.cache, self.logits, self.uniform, self.rows = None, None, None, []
        self._sampling = None  # sample_tokens' per-row arguments, rebuilt when the rows change
        self._weights = {}  # kernels.decoding()'s weight copies: the model must not change while the batch lives

    def __len__(self):
        """Rows still going: in the batch, or parked on a tool call."""
        return len(self.rows) + len(self.parked)

    def live_keys(self):
        """The keys of the requests with a row still going (in the batch or parked)."""
        return {r.group.key for r in self.rows} | {r.group.key for r, _, _ in self.parked}

    def _need(self, rows):
        # slots a row still needs: it feeds at most max_tokens - steps - 1 more tokens
        return max([r.group.request.max_tokens - r.steps for r in rows] + [1])

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
        groups = [_Group(key, r, self._default_stops | set(r.stop_tokens or ()), self.device) for key, r in zip(keys, requests)]
        self._check_parked(block=False)  # rows parked since the last step may rejoin with these
        new_rows = [_Row(g, s) for g in groups for s in range(g.request.num_samples)]
        new_logits = logits[torch.tensor(src_rows, device=self.device)]
        self._n_logits = logits.size(-1)
        self._merge(prefill, src_rows, new_rows, new_logits, _cat_columns([g.uniform for g in groups]))

    def _merge(self, src, src_rows, new_rows, new_logits, new_uniform):
        """Append new_rows, whose keys and values are src's rows src_rows (src.pos <= the batch's
        slots, or the batch empty), with their next-token logits [n, V] and random numbers [n, W]."""
        c = self.cache
        if not self.rows:  # an empty batch: exactly the room these rows need
            start = min(src.pad[r] for r in src_rows)  # slots that are padding in every new row are dropped
            self.cache = KVCache.concat([(src, src_rows, start)], src.pos - start + self._need(new_rows))
        elif len(self.rows) + len(new_rows) <= c.capacity and src.pos <= c.pos and c.pos + self._need(new_rows) <= c.max_len:
            c.append_rows(src, src_rows)  # room: only the new rows are copied
        else:  # rebuild, dropping slots that are padding in every row, with room for more arrivals
            start = min(c.pad)
            B = len(self.rows) + len(new_rows)
            pos = max(c.pos - start, src.pos)
            self.cache = KVCache.concat([(c, list(range(len(self.rows))), start), (src, src_rows, 0)],
                                        pos + 2 * self._need(self.rows + new_rows), capacity=2 * B)
        self.rows += new_rows
        self.logits = torch.cat([self.logits, new_logits]) if self.logits is not None else new_logits
        self.uniform = _cat_columns(([self.uniform] if self.uniform is not None else []) + [new_uniform])
        self._sampling = None

    def cancel(self, key, sample=None):
        """Drop the rows of request `key` (one sample, or all); they leave at the next step."""
        for r in self.rows + [row for row, _, _ in self.parked]:
            if r.group.key == key and (sample is None or r.sample == sample):
                r.done = True

    def _sample(self):
        """The next token of every row, int64 [B] on the device."""
        if self._sampling is None:
            reqs = [r.group.request for r in self.rows]
            temperature = torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=self.device)
            if all(r.temperature == 0 for r in reqs):
                self._sampling = "greedy"
            else:
                top_k = [r.top_k or 0 for r in reqs]
                top_p = [r.top_p if r.top_p is not None and 0 < r.top_p < 1 else 1.0 for r in reqs]
                self._sampling = {
                    "temperature": temperature,
                    "top_k": torch.tensor(top_k, device=self.device) if any(top_k) else None,
                    "top_p": torch.tensor(top_p, dtype=torch.float32, device=self.device) if min(top_p) < 1 else None,
                    "max_k": max(top_k) if all(top_k) else None,
                    "any_greedy": any(r.temperature == 0 for r in reqs),
                }
        if self._sampling == "greedy":
            return self.logits.argmax(-1)
        return sample_tokens(self.logits, uniform=self.uniform[:, 0], **self._sampling)

    @torch.inference_mode()
    def step(self):
        """One decode step for every row. Returns a list of TokenEvent, one per row still going at
        the start of the step (cancelled rows report nothing)."""
        self._drop_done()
        self._check_parked(block=True)
        if not self.rows:
            return []
        sampled = self._sample().tolist()
        self.uniform = self.uniform[:, 1:]
        python_start, python_end, output_start, output_end = self._python
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
            elif req.tools and t == python_start:
                row.in_python, row.python_tokens = True, []
            elif req.tools and t == python_end and row.in_python:
                row.in_python = False
                code = self.tokenizer.decode(row.python_tokens)
                if self.park_tools:
                    if self._tools is None:
                        self._tools = ThreadPoolExecutor(max_workers=4, thread_name_prefix="engine-tool")
                    row.tool = self._tools.submit(self._run_tool, code)
                else:
                    row.forced.extend(self._tool_output(self._run_tool(code)))
            elif row.in_python:
                row.python_tokens.append(t)
            if finish is None and row.steps >= req.max_tokens:
                finish = "length"
            row.done = finish is not None
            events.append(TokenEvent(row.group.key, row.sample, t, m, finish))
            column.append(t)
        order = self._drop_done()
        if self.rows:
            column = torch.tensor([column[i] for i in order], dtype=torch.long, device=self.device)[:, None]
            if self.cache.pos + 1 > self.cache.max_len:  # not reached with _need's bound; cheap guard
                self.cache = KVCache.concat([(self.cache, list(range(len(self.rows))), min(self.cache.pad))], self.cache.pos + self._need(self.rows))
            with decoding(self._weights):
                self.logits = self.model(column, kv_cache=self.cache)[:, -1, :]
        return events

    def _drop_done(self):
        """Remove finished/cancelled rows from rows, cache, logits and random numbers (in place:
        KVCache.keep_rows). Returns the new order: new row i is old row order[i]."""
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return keep
        if not keep:
            self.rows, self.cache, self.logits, self.uniform, self._sampling = [], None, None, None, None
            return keep
        order = self.cache.keep_rows(keep)
        self.rows = [self.rows[i] for i in order]
        index = torch.tensor(order, device=self.device)
        self.logits, self.uniform, self._sampling = self.logits[index], self.uniform[index], None
        return order

    def _tool_output(self, result):
        """The tokens forced after a tool call: <|output_start|> result <|output_end|>."""
        _, _, output_start, output_end = self._python
        return [output_start] + self.tokenizer.encode(result) + [output_end]

    def _check_parked(self, block):
        """Rows whose tool call is running are parked (cache rows copied aside, out of the batch);
        parked rows whose call has returned rejoin with its output queued. block: when no row is
        left to decode, wait for a call to return (step), rather than return at once (add)."""
        if not self.park_tools:
            return
        waiting = [i for i, r in enumerate(self.rows) if r.tool is not None and not r.tool.done()]
        if waiting:
            leaving = [self.rows[i] for i in waiting]
            for i, row in zip(waiting, leaving):
                self.parked.append((row, KVCache.concat([(self.cache, [i], self.cache.pad[i])], self.cache.pos - self.cache.pad[i] + 1), self.uniform[i : i + 1]))
                row.done = True  # leaves the batch now; not finished (rejoins below)
            self._drop_done()
            for row in leaving:
                row.done = False
        for row in self.rows:  # returned before the row had to wait
            if row.tool is not None:
                row.forced.extend(self._tool_output(row.tool.result()))
                row.tool = None
        self.parked = [p for p in self.parked if not p[0].done]  # cancelled while parked
        if block and self.parked and not self.rows:
            wait([row.tool for row, _, _ in self.parked], return_when=FIRST_COMPLETED)
        done = [p[0].tool.done() for p in self.parked]  # read once: a call may return meanwhile
        back = [p for p, d in zip(self.parked, done) if d]
        if back:
            self.parked = [p for p, d in zip(self.parked, done) if not d]
            for row, cache, uniform in back:  # one at a time: each brings its own cache
                row.forced.extend(self._tool_output(row.tool.result()))
                row.tool = None
                # its next token is forced, so its logits are never read
                self._merge(cache, [0], [row], torch.zeros(1, self._n_logits, device=self.device), uniform)
        if not self.rows and not self.parked and self._tools is not None:
            self._tools.shutdown(wait=False)
            self._tools = None


def _cat_columns(parts):
    """Stack fp32 [n_i, W_i] tensors into [sum n_i, max W_i], zero-filled on the right."""
    width = max(p.size(1) for p in parts)
    return torch.cat([F.pad(p, (0, width - p.size(1))) for p in parts])


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
        batch = DecodeBatch(self.model, self.tokenizer, self._run_tool, park_tools=True)
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
