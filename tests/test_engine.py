import pytest
import torch

from nanochat.engine import DecodeBatch, Engine, GenerationRequest, KVCache, sample_tokens
from helpers.steered import Steered
from test_gpt import make_model


class ScriptedModel(torch.nn.Module):
    """Stands in for a GPT: whatever the input, its next-token distribution puts all mass on the
    next token of a script (one script entry per forward call)."""

    def __init__(self, script, vocab_size, config):
        super().__init__()
        self.script, self.vocab_size, self.config = list(script), vocab_size, config
        self.lm_head = torch.nn.Linear(1, 1)
        self.calls = 0

    def get_compute_dtype(self, device):
        return torch.float32

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        kv_cache.advance(T)
        logits = torch.full((B, T, self.vocab_size), -30.0)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 30.0
        self.calls += 1
        return logits


def test_greedy_matches_naive_decode(byte_tok):
    model = make_model(vocab_size=byte_tok.vocab_size)
    engine = Engine(model, byte_tok)
    prompt = byte_tok.encode("hello", prepend="<|bos|>")
    (tokens,), _ = engine.generate_batch(prompt, max_tokens=12, temperature=0.0, stop_tokens=[])
    ids = list(prompt)
    for _ in range(len(tokens)):
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    assert tokens == ids[len(prompt) :][: len(tokens)]


def test_seeded_sampling_is_deterministic(byte_tok):
    model = make_model(vocab_size=byte_tok.vocab_size)
    engine = Engine(model, byte_tok)
    prompt = byte_tok.encode("abc", prepend="<|bos|>")
    a, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=10, temperature=1.0, seed=7)
    b, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=10, temperature=1.0, seed=7)
    c, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=10, temperature=1.0, seed=8)
    assert a == b and a != c


def test_stop_tokens(byte_tok):
    model = make_model(vocab_size=byte_tok.vocab_size)
    engine = Engine(model, byte_tok)
    prompt = byte_tok.encode("xyz", prepend="<|bos|>")
    (greedy,), _ = engine.generate_batch(prompt, max_tokens=8, temperature=0.0, stop_tokens=[])
    (stopped,), _ = engine.generate_batch(prompt, max_tokens=8, temperature=0.0, stop_tokens=[greedy[2]])
    assert stopped == greedy[: greedy.index(greedy[2])]


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]]).expand(200, -1)
    u = torch.rand(200, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(200)
    assert set(sample_tokens(logits, ones, u, top_k=torch.full((200,), 2), max_k=2).tolist()) == {0, 1}
    # probs ~ [0.72, 0.26, ...]: top_p 0.5 keeps only the most likely token
    assert set(sample_tokens(logits, ones, u, top_p=torch.full((200,), 0.5)).tolist()) == {0}
    assert set(sample_tokens(logits, torch.zeros(200), u).tolist()) == {0}
    assert len(set(sample_tokens(logits, ones, u).tolist())) >= 3  # probs 0.72, 0.26, 0.01, ...


@pytest.mark.parametrize("filters", ["none", "top_k", "top_p", "mixed"])
def test_sample_tokens_draws_the_right_distribution(filters):
    """Differential: with the uniforms on a fine grid, each row's token frequencies equal the
    probabilities its settings define (computed here with a sort, plainly) to 1/N, whatever the
    other rows of the batch use."""
    N, V = 4000, 50
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1)) * 2
    temperature = torch.tensor([1.0, 0.7, 1.3, 0.0])
    top_k = {"none": [0] * 4, "top_k": [5, 12, 50, 3], "top_p": [0] * 4, "mixed": [7, 0, 3, 0]}[filters]
    top_p = {"none": [1.0] * 4, "top_k": [1.0] * 4, "top_p": [0.9, 0.5, 0.99, 0.8], "mixed": [1.0, 0.6, 0.9, 1.0]}[filters]
    u = (torch.arange(N) + 0.5) / N
    rows = torch.arange(4).repeat_interleave(N)
    kwargs = {"top_k": torch.tensor(top_k)[rows] if any(top_k) else None, "top_p": torch.tensor(top_p)[rows] if min(top_p) < 1 else None,
              "max_k": max(top_k) if all(top_k) else None}
    tokens = sample_tokens(logits[rows], temperature[rows], u.repeat(4), **kwargs).view(4, N)
    for b in range(4):
        if temperature[b] == 0:
            assert (tokens[b] == logits[b].argmax()).all()
            continue
        probs = torch.softmax(logits[b] / temperature[b], -1)
        order = probs.argsort(descending=True)
        keep = torch.zeros(V, dtype=torch.bool)
        keep[order[: top_k[b] or V]] = True
        cum = torch.cumsum(probs[order], 0)
        keep[order[(cum - probs[order]) >= top_p[b]]] = False
        want = torch.where(keep, probs, 0.0)
        want /= want.sum()
        got = torch.bincount(tokens[b], minlength=V) / N
        assert (got[~keep] == 0).all()
        torch.testing.assert_close(got, want, atol=1.5 / N, rtol=0)


def test_tool_call_output_is_forced(byte_tok):
    S = byte_tok.special_tokens
    code = byte_tok.encode("6*7")
    script = [S["<|python_start|>"], *code, S["<|python_end|>"], 0, 0, 0, 0, 0, 0, byte_tok.encode("!")[0], S["<|assistant_end|>"]]
    model = ScriptedModel(script, byte_tok.vocab_size, make_model().config)
    engine = Engine(model, byte_tok)
    (tokens,), (masks,) = engine.generate_batch([byte_tok.bos_token_id], max_tokens=40, temperature=0.0)
    out_start = tokens.index(S["<|output_start|>"])
    out_end = tokens.index(S["<|output_end|>"])
    assert byte_tok.decode(tokens[out_start + 1 : out_end]).strip() == "42"
    assert all(m == 0 for m in masks[out_start : out_end + 1])
    assert all(m == 1 for m in masks[: out_start])


def test_kv_cache_bytes():
    model = make_model()
    cache = KVCache.for_model(model, 2, 16)
    c = model.config
    assert cache.nbytes() == 2 * c.n_layer * 2 * 16 * c.n_kv_head * (c.n_embd // c.n_head) * 4


# ---------------------------------------------------------------------------------------------
# batches of different prompts: left padding, per-row positions, continuous batching

def full_logits(model, ids):
    """Next-token logits after each prefix of ids, from one uncached forward: fp32 [len(ids), V]."""
    return model(torch.tensor([ids]))[0]


@pytest.mark.parametrize("lengths", [(7,), (5, 9, 12)])
@pytest.mark.parametrize("pattern", ["L", "SSL"])
def test_left_padded_cache_matches_full_forward(pattern, lengths):
    """Prompts (one of length 7; or lengths 5, 9, 12 in one left-padded batch) prefilled, then 6
    decode steps: every row's logits equal its own uncached forward (<= 1e-5, fp32; sliding
    windows and GQA included)."""
    model = make_model(window_pattern=pattern, sliding_window=4)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 97, (n + 6,), generator=gen).tolist() for n in lengths]
    L = max(lengths)
    cache = KVCache.for_model(model, len(seqs), L + 6, left_pad=[L - (len(s) - 6) for s in seqs])
    idx = torch.tensor([[0] * (L - (len(s) - 6)) + s[:-6] for s in seqs])
    steps = [model(idx, kv_cache=cache)[:, -1]]
    for t in range(5):
        steps.append(model(torch.tensor([[s[len(s) - 6 + t]] for s in seqs]), kv_cache=cache)[:, -1])
    assert cache.lengths() == [len(s) - 1 for s in seqs]
    for b, s in enumerate(seqs):
        want = full_logits(model, s)[len(s) - 7 : len(s) - 1]
        torch.testing.assert_close(torch.stack([x[b] for x in steps]), want, atol=1e-5, rtol=0)


def test_continuous_batching_matches_full_forward(byte_tok):
    """Requests join a running batch (one longer than the batch so far, one shorter), one is
    cancelled mid-way and rows finish at different steps; after every step each row's next-token
    logits equal an uncached forward of its prompt + tokens so far (<= 1e-5, fp32)."""
    model = make_model(vocab_size=byte_tok.vocab_size, window_pattern="SL", sliding_window=6)
    batch = DecodeBatch(model, byte_tok)
    prompts = {"a": byte_tok.encode("hello", prepend="<|bos|>"), "b": byte_tok.encode("a much longer prompt", prepend="<|bos|>"),
               "c": byte_tok.encode("hi", prepend="<|bos|>"), "d": byte_tok.encode("cancel me", prepend="<|bos|>")}
    settings = {"a": {"num_samples": 2, "max_tokens": 9, "temperature": 1.0, "seed": 1}, "b": {"max_tokens": 6, "temperature": 0.0},
                "c": {"num_samples": 3, "max_tokens": 5, "temperature": 0.8, "top_k": 20, "seed": 2}, "d": {"max_tokens": 50, "temperature": 0.0}}
    generated = {(k, s): [] for k in prompts for s in range(settings[k].get("num_samples", 1))}
    checked = 0

    def check():
        nonlocal checked
        for i, row in enumerate(batch.rows):
            ids = prompts[row.group.key] + generated[(row.group.key, row.sample)]
            torch.testing.assert_close(batch.logits[i], full_logits(model, ids)[-1], atol=1e-5, rtol=0)
            checked += 1

    def step():
        for e in batch.step():
            generated[(e.key, e.sample)].append(e.token)
        check()

    batch.add([GenerationRequest(prompts["a"], **settings["a"]), GenerationRequest(prompts["d"], **settings["d"])], keys=["a", "d"])
    check()
    step(), step()
    batch.add([GenerationRequest(prompts["b"], **settings["b"])], keys=["b"])  # longer: the batch shifts right
    check()
    step()
    cache = batch.cache
    batch.cancel("d")  # a row in the middle: the last row moves into its place
    step()
    batch.add([GenerationRequest(prompts["c"], **settings["c"])], keys=["c"])  # shorter: left-padded
    check()
    assert batch.cache is cache and batch.cache.capacity > len(batch)  # both in place, no new cache
    while len(batch):
        step()
    assert checked > 30
    assert len(generated[("d", 0)]) == 3  # cancelled after three steps
    for key, cfg in settings.items():  # every other row ran to a stop token or to its max_tokens
        for s in range(cfg.get("num_samples", 1)):
            toks = generated[(key, s)]
            if key != "d":
                assert len(toks) == cfg["max_tokens"] or toks[-1] in (byte_tok.bos_token_id, byte_tok.special_tokens["<|assistant_end|>"])


@pytest.mark.slow
def test_batched_prompts_match_alone(byte_tok):
    """generate_many over prompts of different lengths gives each request exactly what it gets
    alone (greedy and seeded sampling: each request has its own generator), with per-request
    max_tokens and stop tokens."""
    model = make_model(vocab_size=byte_tok.vocab_size)
    engine = Engine(model, byte_tok)
    texts = ["x", "the quick brown fox", "1+2=", "lorem ipsum"]
    reqs = [GenerationRequest(byte_tok.encode(t, prepend="<|bos|>"), num_samples=n, max_tokens=m, temperature=temp, seed=s, stop_tokens=stop)
            for t, n, m, temp, s, stop in zip(texts, [1, 2, 1, 3], [12, 7, 10, 4], [0.0, 1.0, 0.7, 1.2], [0, 1, 2, 3], [(), (), (byte_tok.encode("e")[0],), ()])]
    together = {(i, s): [] for i, r in enumerate(reqs) for s in range(r.num_samples)}
    finishes = {}
    for events in engine.generate_many(reqs):
        for e in events:
            assert (e.key, e.sample) not in finishes  # nothing after a row's last event
            together[(e.key, e.sample)].append(e.token)
            if e.finish:
                finishes[(e.key, e.sample)] = e.finish
    assert set(finishes) == set(together)
    for i, r in enumerate(reqs):
        alone, _ = engine.generate_batch(r.tokens, r.num_samples, max_tokens=r.max_tokens, temperature=r.temperature, seed=r.seed, stop_tokens=list(r.stop_tokens))
        for s in range(r.num_samples):
            toks = together[(i, s)]
            if finishes[(i, s)] == "stop":
                assert toks[-1] in {*r.stop_tokens, byte_tok.bos_token_id, byte_tok.special_tokens["<|assistant_end|>"]}
                toks = toks[:-1]
            else:
                assert len(toks) == r.max_tokens
            assert toks == alone[s]


def test_cache_concat_and_expand():
    model = make_model()
    cache = KVCache.for_model(model, 2, 10, left_pad=[0, 3])
    model(torch.randint(0, 97, (2, 6)), kv_cache=cache)
    merged = KVCache.concat([(cache, [1, 1, 0], 0)], 12)
    assert merged.pos == 6 and merged.pad == [3, 3, 0] and merged.max_len == 12
    torch.testing.assert_close(merged.k[:, 2, :6], cache.k[:, 0, :6])
    torch.testing.assert_close(merged.k[:, 0, :6], cache.k[:, 1, :6])
    trimmed = KVCache.concat([(cache, [1], 3)], 7)  # row 1's 3 padding slots dropped
    assert trimmed.pos == 3 and trimmed.pad == [0] and trimmed.left_pad is None
    torch.testing.assert_close(trimmed.k[:, 0, :3], cache.k[:, 1, 3:6])
    with pytest.raises(ValueError, match="drops real tokens"):
        KVCache.concat([(cache, [0, 1], 2)], 10)
    # in place: append rows of another cache (left-padded to this one's pos), then keep some
    other = KVCache.for_model(model, 2, 4, left_pad=[1, 0])
    model(torch.randint(0, 97, (2, 4)), kv_cache=other)
    room = KVCache.concat([(cache, [0, 1], 0)], 12, capacity=5)
    room.append_rows(other, [1, 0])
    want = KVCache.concat([(cache, [0, 1], 0), (other, [1, 0], 0)], 12)
    assert room.pad == want.pad == [0, 3, 2, 3] and room.capacity == 5
    torch.testing.assert_close(room.k[:, :4, :6], want.k[:, :, :6])
    order = room.keep_rows([0, 2, 3])  # row 1 leaves: row 3 moves into its slot
    assert order == [0, 3, 2] and room.pad == [0, 3, 2] and room.batch_size == 3
    torch.testing.assert_close(room.v[:, :3, :6], want.v[:, order, :6])
    with pytest.raises(ValueError, match="cannot append"):
        room.append_rows(other, [0, 1, 0])  # 6 rows > capacity 5
    wide = cache.expand(4)
    assert wide.pad == [0] * 4 and torch.equal(wide.v[:, 3, :6], cache.v[:, 0, :6])


@pytest.mark.parametrize("choice", [0, 1, 2, 3])
def test_small_linear_formulations_equal_f_linear(choice, monkeypatch):
    import nanochat.kernels as K

    if choice not in K._FORMULATIONS:
        pytest.skip("this torch has no oneDNN")
    w, x = torch.randn(300, 64), torch.randn(5, 64)
    monkeypatch.setitem(K._FASTEST, (300, 64, 8, torch.float32), choice)
    with K.decoding():
        torch.testing.assert_close(K.small_linear(x, w), torch.nn.functional.linear(x, w), atol=1e-5, rtol=1e-5)
    K._FASTEST.pop((300, 64, 8, torch.float32))
    with K.decoding():
        got = K.small_linear(x, w)  # timed now: whichever wins, the same product
    assert K._FASTEST[(300, 64, 8, torch.float32)] in K._FORMULATIONS
    torch.testing.assert_close(got, x @ w.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("choice", [2, 3])
def test_decoding_after_an_in_place_optimizer_step_sees_the_new_weights(byte_tok, monkeypatch, choice):
    """torch._fused_adamw_ updates weights without bumping their version: a transposed copy kept
    past the step would decode with the old weights. A new DecodeBatch (as every RL step makes)
    must see the new ones, whichever product formulation is in use."""
    import nanochat.kernels as K

    if choice not in K._FORMULATIONS:
        pytest.skip("this torch has no oneDNN")
    model = make_model(vocab_size=byte_tok.vocab_size)
    for key in [(o, i, b, torch.float32) for o, i in {tuple(p.shape) for p in model.parameters() if p.dim() == 2} for b in (1, 2, 4)]:
        monkeypatch.setitem(K._FASTEST, key, choice)  # a formulation with stored copies, everywhere
    prompt = byte_tok.encode("hello", prepend="<|bos|>")
    Engine(model, byte_tok).generate_batch(prompt, max_tokens=4, temperature=0.0)
    params = [p for p in model.parameters()]
    with torch.no_grad():
        grads = [torch.randn_like(p) for p in params]
        zeros = [torch.zeros_like(p) for p in params]
        torch._fused_adamw_(params, grads, zeros, [torch.zeros_like(p) for p in params], [], [torch.tensor(1.0) for _ in params],
                            lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    batch = DecodeBatch(model, byte_tok)
    batch.add([GenerationRequest(prompt, max_tokens=3, temperature=0.0)])
    (event,) = batch.step()  # the decode forward of the first sampled token
    torch.testing.assert_close(batch.logits[0], full_logits(model, prompt + [event.token])[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("choice", [2, 3])
def test_stored_copies_are_keyed_by_the_weight_not_a_temporary_cast(choice, monkeypatch):
    """bf16 decode of fp32 weights: each layer's copy is cast once and kept under its own weight.
    Keyed by a per-call cast, the next layer's cast (same shape, often the same address once the
    first is freed) would be served the first layer's copy."""
    import nanochat.kernels as K
    from nanochat.gpt import Linear

    if choice not in K._FORMULATIONS:
        pytest.skip("this torch has no oneDNN")
    layers = [Linear(64, 96) for _ in range(4)]
    monkeypatch.setitem(K._FASTEST, (96, 64, 4, torch.bfloat16), choice)
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad(), K.decoding():
        for _ in range(2):
            for lin in layers:
                want = torch.nn.functional.linear(x.float(), lin.weight.bfloat16().float())
                torch.testing.assert_close(lin(x).float(), want, atol=2e-2, rtol=2e-2)


def test_rows_parked_on_a_tool_call_get_the_same_tokens_and_others_keep_going(byte_tok):
    """generate_many parks a row while its python tool call runs (here a slow one): the other rows
    decode meanwhile, and every row's tokens equal those of inline tool calls (the row's cache
    rejoins the batch intact: its sampled continuation after the tool output depends on it)."""
    import threading
    import time

    S = byte_tok.special_tokens
    trigger, digit = byte_tok.encode("#")[0], byte_tok.encode("7")[0]
    steer = {trigger: S["<|python_start|>"], S["<|python_start|>"]: digit, digit: S["<|python_end|>"]}
    gpt = make_model(vocab_size=byte_tok.vocab_size)
    with torch.no_grad():
        gpt.lm_head.weight.mul_(20.0)  # peaked next-token distributions: what a row samples depends on its cache
    model = Steered(gpt, steer)
    calls, others_done = [], threading.Event()

    def tool(code):
        return str(int(code) * 6)

    def slow_tool(code):  # returns once the other rows are done: the batch is then all parked
        calls.append(threading.current_thread().name)
        deadline = time.time() + 3
        while not others_done.is_set() and time.time() < deadline:
            time.sleep(0.005)  # (not Event.wait(timeout): that made the main thread's small products 5x slower here)
        return tool(code)

    # only request 0 may call the tool (another row could sample "#" and would wait on itself)
    reqs = [GenerationRequest(byte_tok.encode(t, prepend="<|bos|>"), num_samples=n, max_tokens=m, temperature=1.0, seed=i, tools=i == 0)
            for i, (t, n, m) in enumerate([("call #", 2, 14), ("plain text", 2, 24), ("x", 1, 9)])]

    def run(park):
        others_done.clear()
        batch = DecodeBatch(model, byte_tok, slow_tool if park else tool, park_tools=park)
        batch.add(reqs)
        tokens, steps, finished = {}, [], set()
        while len(batch):
            events = batch.step()
            assert events  # a batch whose rows are all parked waits for a tool; it does not spin
            steps.append({(e.key, e.sample) for e in events})
            for e in events:
                tokens.setdefault((e.key, e.sample), []).append((e.token, e.mask))
                if e.finish:
                    finished.add((e.key, e.sample))
            if batch.parked:  # the server keeps a request whose rows are all parked (live_keys)
                assert 0 in batch.live_keys()
            if {(1, 0), (1, 1), (2, 0)} <= finished:
                others_done.set()
        return tokens, steps

    inline, _ = run(False)
    parked, steps = run(True)
    assert parked == inline
    for s in range(2):  # the tool rows called the tool and got its output, then sampled on
        toks = [t for t, _ in parked[(0, s)]]
        out = toks.index(S["<|output_start|>"])
        assert byte_tok.decode(toks[out + 1 : toks.index(S["<|output_end|>"])]) == "42" and len(toks) == 14
    assert len(calls) == 2 and all(name.startswith("engine-tool") for name in calls)
    # while the tool rows were parked, the others went on to their end
    assert steps[-1] <= {(0, 0), (0, 1)} and any((0, 0) not in keys and (1, 0) in keys for keys in steps)
