import torch

from nanochat.engine import Engine, KVCache, sample_next_token
from test_gpt import make_model


class ScriptedModel(torch.nn.Module):
    """Stands in for a GPT: whatever the input, its next-token distribution puts all mass on the
    next token of a script (one script entry per forward call)."""

    def __init__(self, script, vocab_size, config):
        super().__init__()
        self.script, self.vocab_size, self.config = list(script), vocab_size, config
        self.lm_head = torch.nn.Linear(1, 1)
        self.calls = 0

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
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]]).expand(200, -1)
    assert set(sample_next_token(logits, gen, 1.0, top_k=2)[:, 0].tolist()) <= {0, 1}
    # probs ~ [0.72, 0.26, ...]: top_p 0.5 keeps only the most likely token
    assert set(sample_next_token(logits, gen, 1.0, top_p=0.5)[:, 0].tolist()) == {0}
    assert set(sample_next_token(logits, gen, 0.0)[:, 0].tolist()) == {0}


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
