"""
The Rust BPE trainer (`nanochat_bpe`, rustbpe/) against a plain-Python reference BPE, and its
encoder against tiktoken built from the same ranks.

The reference below is the textbook algorithm, written for clarity, not speed: pre-tokenize with
the pattern (the `regex` module), count unique chunks, then repeatedly count all adjacent pairs
(overlapping ones too) and merge the most frequent one left to right. Its rules, which the Rust
trainer must match exactly:
- ties go to the smaller pair (left id, then right id);
- a merge whose bytes already are a token reuses that token (no new id);
- training stops early when no pair is left.
"""

import collections
import os
import random
import subprocess
import sys

import nanochat_bpe  # the extension must be built: a missing build fails, never skips
import pytest
import regex
import tiktoken


GPT4 = nanochat_bpe.GPT4_PATTERN
NANOCHAT = nanochat_bpe.NANOCHAT_PATTERN


# ------------------------------------------------------------------------------------------------
# plain-Python reference


def reference_bpe(texts, vocab_size, pattern):
    """Returns (merges, tokens): merges as (left, right, result) ids, tokens[id] = bytes."""
    words = collections.Counter()
    for text in texts:
        for chunk in regex.findall(pattern, text):
            words[tuple(chunk.encode("utf-8"))] += 1
    tokens = [bytes([i]) for i in range(256)]
    token_id = {t: i for i, t in enumerate(tokens)}
    merges = []
    while len(tokens) < vocab_size:
        stats = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                stats[pair] += count
        if not stats:
            break
        a, b = max(stats, key=lambda p: (stats[p], -p[0], -p[1]))
        new_bytes = tokens[a] + tokens[b]
        if new_bytes in token_id:
            z = token_id[new_bytes]
        else:
            z = token_id[new_bytes] = len(tokens)
            tokens.append(new_bytes)
        merges.append((a, b, z))
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(z)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges, tokens


def train(texts, vocab_size, pattern=None, **kwargs):
    tok = nanochat_bpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=pattern, **kwargs)
    return tok


def tiktoken_of(tok):
    ranks = {bytes(t): r for t, r in tok.get_mergeable_ranks()}
    return tiktoken.Encoding(name="test", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens={})


# ------------------------------------------------------------------------------------------------
# random corpora

ALPHABETS = {
    "ascii": "the quick brown fox jumps over a lazy dog THE END",
    "emoji": "😀🙂👍🏽🇫🇷❤️\u200d🔥 ab",
    "cjk": "漢字かなカナ한국어 。、「」",
    "combining": "e\u0301a\u0308o\u0303\u093f\u0915 n\u0303",
    "whitespace": " \t\n\r\u00a0\u3000\u2028x  \n\n   ",
    "digits": "0123456789٣٤½²Ⅻ 1,000.5 ",
    "contractions": "'s'S'll'LL've're'd'mſ don't I'M ",
    "punctuation": "...!?()[]{}<>--__==++;:\"' ",
}


def random_corpus(rng, alphabet, n_docs, doc_len):
    # Words from a small random lexicon over the alphabet, so that pairs repeat and merges chain.
    lexicon = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(12)]
    docs = []
    for _ in range(n_docs):
        parts = []
        while sum(map(len, parts)) < doc_len:
            parts.append(rng.choice(lexicon) if rng.random() < 0.8 else rng.choice(alphabet))
        docs.append("".join(parts))
    return docs


def corpora():
    rng = random.Random(1234)
    cases = []
    for name, alphabet in ALPHABETS.items():
        for k in range(4):
            cases.append((f"{name}-{k}", random_corpus(rng, alphabet, rng.randint(1, 12), rng.randint(5, 120))))
    mixed = "".join(ALPHABETS.values())
    for k in range(8):
        cases.append((f"mixed-{k}", random_corpus(rng, mixed, rng.randint(1, 12), rng.randint(5, 200))))
    return cases


# ------------------------------------------------------------------------------------------------
# merges identical to the reference


@pytest.mark.parametrize("name,docs", corpora(), ids=[c[0] for c in corpora()])
def test_merges_match_reference(name, docs):
    vocab_size = 256 + 60
    for pattern in (GPT4, NANOCHAT):
        expected_merges, expected_tokens = reference_bpe(docs, vocab_size, pattern)
        tok = train(docs, vocab_size, pattern)
        assert tok.get_merges() == expected_merges, name
        assert [bytes(t) for t, _ in tok.get_mergeable_ranks()] == expected_tokens
        assert [r for _, r in tok.get_mergeable_ranks()] == list(range(len(expected_tokens)))
        assert len(set(expected_tokens)) == len(expected_tokens)  # tiktoken needs unique bytes
        assert tok.vocab_size == len(expected_tokens)


def test_custom_pattern_uses_regex_and_matches_reference():
    docs = random_corpus(random.Random(7), ALPHABETS["ascii"] + ALPHABETS["digits"], 10, 100)
    pattern = r"\w+|\s+|[^\w\s]+"
    merges, tokens = reference_bpe(docs, 300, pattern)
    tok = train(docs, 300, pattern)
    assert tok.get_pattern() == pattern
    assert tok.get_merges() == merges


def test_no_merges_left_stops_early():
    tok = train(["ab ab", "c"], 1000)
    merges, tokens = reference_bpe(["ab ab", "c"], 1000, GPT4)
    assert tok.get_merges() == merges
    assert tok.vocab_size == len(tokens) == 258  # "ab", " ab"
    single_bytes = train(["a", "b", "?"], 300)  # no chunk has two bytes: nothing to merge
    assert single_bytes.vocab_size == 256 and single_bytes.get_merges() == []
    empty = train([], 300)
    assert empty.vocab_size == 256 and empty.get_merges() == []


# ------------------------------------------------------------------------------------------------
# determinism: batching and thread count


def _synthetic_docs(n_docs=3000, seed=0):
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "sen", "mo", "la", "que", "zu", "ph", "ing", " ", "\n", ", ", "42", "é"]
    lexicon = ["".join(rng.choice(syllables[:10]) for _ in range(rng.randint(1, 5))) for _ in range(12000)]
    return [" ".join(rng.choice(lexicon) for _ in range(rng.randint(5, 60))) + rng.choice(syllables[10:]) for _ in range(n_docs)]


def test_batching_does_not_change_merges():
    docs = _synthetic_docs(600)
    ref = train(docs, 700).get_merges()
    assert train(docs, 700, buffer_size=1).get_merges() == ref
    assert train(docs, 700, buffer_size=7).get_merges() == ref
    lists = [docs[i : i + 50] for i in range(0, len(docs), 50)]  # items may be lists of str
    tok = nanochat_bpe.Tokenizer()
    tok.train_from_iterator(iter(lists), 700)
    assert tok.get_merges() == ref


_CHILD = """
import hashlib, sys
sys.path.insert(0, {tests_dir!r})
import nanochat_bpe
from test_rustbpe import _synthetic_docs
tok = nanochat_bpe.Tokenizer()
tok.train_from_iterator(iter(_synthetic_docs()), 4096, buffer_size=500)
print(hashlib.sha256(repr(tok.get_merges()).encode()).hexdigest())
"""


def test_merges_independent_of_thread_count():
    # rayon's pool is per process: train in child processes with 1 and 3 threads. The corpus is
    # large enough for the parallel merge steps (>= 2048 words) and several counting parts.
    code = _CHILD.format(tests_dir=os.path.dirname(os.path.abspath(__file__)))
    digests = set()
    for threads in ("1", "3"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


# ------------------------------------------------------------------------------------------------
# encoding: tiktoken parity and round trips

ENCODE_TEXTS = [
    "",
    "hello world",
    "Hello, World! It's 2024-06-01 and we'll pay $1,234.56 for 12345678 items.\n\n\tDone.",
    "def f(x):\n    return x ** 2  # square\r\n",
    "😀 emoji 👍🏽 flags 🇫🇷 zwj ❤️\u200d🔥",
    "漢字とかなカナ、한국어。",
    "combining e\u0301 a\u0308 and Devanagari \u0915\u093f",
    "      many spaces   \n\n\n\n  and newlines \r\n\r\n",
    "ſ'ſ 'S 'LL don'T ",
    "unseen bytes: \x00\x01\x7f \u0085 \U0010fffd",
]


@pytest.fixture(scope="module")
def trained():
    docs = _synthetic_docs(400, seed=3) + [t * 3 for t in ENCODE_TEXTS[1:]] + sum((d for _, d in corpora()), [])
    return {pattern: train(docs, 256 + 400, pattern) for pattern in (GPT4, NANOCHAT)}


@pytest.mark.parametrize("pattern", [GPT4, NANOCHAT], ids=["gpt4", "nanochat"])
def test_encode_matches_tiktoken_and_round_trips(trained, pattern):
    tok = trained[pattern]
    enc = tiktoken_of(tok)
    texts = ENCODE_TEXTS + [d for _, docs in corpora() for d in docs] + _synthetic_docs(50, seed=11)
    for text in texts:
        ids = tok.encode(text)
        assert ids == enc.encode_ordinary(text), text
        assert tok.decode(ids) == text
    assert tok.batch_encode(texts) == [tok.encode(t) for t in texts]
    assert any(len(tok.encode(t)) < len(t.encode()) for t in texts)  # merges are actually used


def test_untrained_tokenizer_is_bytes():
    tok = nanochat_bpe.Tokenizer()
    assert tok.get_pattern() == GPT4
    assert tok.get_mergeable_ranks() == [(bytes([i]), i) for i in range(256)]
    assert tok.encode("añ") == list("añ".encode())


def test_decode_invalid_utf8_and_unknown_id(trained):
    tok = trained[GPT4]
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # cut UTF-8 -> replacement char, as tiktoken
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([tok.vocab_size])


def test_lone_surrogates_are_replaced():
    tok = train(["a\ud800b a\ud800b"], 260)
    assert tok.decode(tok.encode("x\udfffy")) == "x\ufffdy"


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("vocab_size", [-1, 0, 255, 256, 2**17 + 1, 10**12])
def test_bad_vocab_size(vocab_size):
    with pytest.raises(ValueError, match="vocab_size must be in 257..=131072"):
        train(["abc"], vocab_size)


def test_vocab_size_bounds_accepted():
    assert train(["abab"], 257).vocab_size == 257
    assert train(["abab"], 2**17).vocab_size == 258  # runs out of pairs


def test_bad_pattern_buffer_and_items():
    with pytest.raises(ValueError, match="invalid split pattern"):
        train(["abc"], 300, pattern="(unclosed")
    with pytest.raises(ValueError, match="buffer_size"):
        train(["abc"], 300, buffer_size=0)
    with pytest.raises(TypeError, match="expected str"):
        train(["abc", b"bytes"], 300)
    with pytest.raises(TypeError, match="expected str items in a list"):
        train([["abc", 3]], 300)
    with pytest.raises(TypeError):
        nanochat_bpe.Tokenizer().train_from_iterator(42, 300)


def test_iterator_exception_propagates():
    def gen():
        yield "some text"
        raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError, match="reader failed"):
        nanochat_bpe.Tokenizer().train_from_iterator(gen(), 300)


def test_from_ranks_encodes_like_the_trained_tokenizer(trained):
    tok = trained[NANOCHAT]
    ranks = tok.get_mergeable_ranks()
    for given in (ranks, dict(ranks)):
        rebuilt = nanochat_bpe.Tokenizer.from_ranks(given, NANOCHAT)
        assert rebuilt.get_pattern() == NANOCHAT and rebuilt.get_mergeable_ranks() == ranks
        for text in ENCODE_TEXTS:
            assert rebuilt.encode(text) == tok.encode(text)


@pytest.mark.parametrize(
    "ranks,match",
    [
        ([(bytes([i]), i) for i in range(255)], "single byte 255"),
        ([(bytes([i]), i) for i in range(256)] + [(b"ab", 300)], "out of range"),
        ([(bytes([i]), i) for i in range(256)] + [(b"a", 256)], "same bytes"),
        ([(bytes([i]), i) for i in range(256)] + [(b"ab", 255)], "given twice"),
    ],
)
def test_from_ranks_rejects_bad_ranks(ranks, match):
    with pytest.raises(ValueError, match=match):
        nanochat_bpe.Tokenizer.from_ranks(ranks)


def test_merges_match_pypi_rustbpe_when_installed():
    # A second, independent implementation of the same algorithm and tie-breaking (nanochat's
    # original trainer, installed for scripts/tok_bench.py); skipped where it is not installed.
    rustbpe = pytest.importorskip("rustbpe")
    if not hasattr(rustbpe, "Tokenizer"):  # the repo's rustbpe/ crate dir, imported as a namespace package
        pytest.skip("the PyPI package rustbpe is not installed")
    docs = _synthetic_docs(300, seed=5) + [d for _, docs in corpora() for d in docs]
    ours = train(docs, 1500)
    theirs = rustbpe.Tokenizer()
    theirs.train_from_iterator(iter(docs), 1500)
    assert ours.get_mergeable_ranks() == [(bytes(t), r) for t, r in theirs.get_mergeable_ranks()]
