import pytest

from nanochat.common import NanochatError
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer


def test_save_load_roundtrip(tmp_path, byte_tok):
    # add a few merges by hand so the rank file has multi-byte tokens
    ranks = dict(byte_tok.mergeable_ranks)
    for tok in (b"th", b"the", b" the", b"\xe2\x82"):
        ranks[tok] = len(ranks)
    tok = Tokenizer(ranks, byte_tok.pattern)
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.mergeable_ranks == tok.mergeable_ranks and loaded.special_tokens == tok.special_tokens
    text = "the theory of the € and 12345 <|bos|> 🙂"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert tok.encode(" the")[0] == ranks[b" the"]
    assert loaded.vocab_size == len(ranks) + len(SPECIAL_TOKENS)


def test_special_text_is_not_special(byte_tok):
    ids = byte_tok.encode("<|bos|>")
    assert byte_tok.bos_token_id not in ids and byte_tok.decode(ids) == "<|bos|>"


def test_encode_batch_prepend_append(byte_tok):
    out = byte_tok.encode(["ab", "c"], prepend="<|bos|>", append=byte_tok.encode_special("<|user_end|>"))
    assert out == [[byte_tok.bos_token_id, 97, 98, byte_tok.encode_special("<|user_end|>")], [byte_tok.bos_token_id, 99, byte_tok.encode_special("<|user_end|>")]]


def test_token_bytes(byte_tok):
    tb = byte_tok.token_bytes()
    assert tb.shape == (byte_tok.vocab_size,)
    assert tb[:256].eq(1).all() and tb[256:].eq(0).all()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: (d / "tokenizer.tiktoken").write_text("not base64 !!\n"),
        lambda d: (d / "tokenizer.tiktoken").write_text("YQ== 5\n"),
        lambda d: (d / "tokenizer.json").write_text("{truncated"),
        lambda d: (d / "tokenizer.json").unlink(),
    ],
)
def test_corrupt_files_raise_clear_error(tmp_path, byte_tok, corrupt):
    byte_tok.save(tmp_path)
    corrupt(tmp_path)
    with pytest.raises(NanochatError, match=str(tmp_path)):
        Tokenizer.load(tmp_path)


def _render_parts(tok, ids, mask):
    """Decode runs of trained / untrained tokens, for readable assertions."""
    out, cur, cur_m = [], [], None
    for t, m in zip(ids, mask):
        if cur and m != cur_m:
            out.append((cur_m, tok.decode(cur)))
            cur = []
        cur.append(t)
        cur_m = m
    out.append((cur_m, tok.decode(cur)))
    return out


def test_render_conversation_mask(byte_tok):
    conv = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me compute. "},
                {"type": "python", "text": "2+3"},
                {"type": "python_output", "text": "5"},
                {"type": "text", "text": "It is 5."},
            ]},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Welcome"},
        ]
    }
    ids, mask = byte_tok.render_conversation(conv)
    assert len(ids) == len(mask)
    assert _render_parts(byte_tok, ids, mask) == [
        (0, "<|bos|><|user_start|>Be brief.\n\n2+3?<|user_end|><|assistant_start|>"),
        (1, "Let me compute. <|python_start|>2+3<|python_end|>"),
        (0, "<|output_start|>5<|output_end|>"),
        (1, "It is 5.<|assistant_end|>"),
        (0, "<|user_start|>Thanks<|user_end|><|assistant_start|>"),
        (1, "Welcome<|assistant_end|>"),
    ]
    trunc_ids, trunc_mask = byte_tok.render_conversation(conv, max_tokens=10)
    assert trunc_ids == ids[:10] and trunc_mask == mask[:10]


def test_render_for_completion(byte_tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ids = byte_tok.render_for_completion(conv)
    assert byte_tok.decode(ids) == "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
        [],
    ],
)
def test_render_rejects_malformed(byte_tok, messages):
    with pytest.raises(NanochatError):
        byte_tok.render_conversation({"messages": messages})
