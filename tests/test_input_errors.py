"""
Bad input gives a one-line error that says what is wrong, where, before any work is done: chat data
lines (validated when the task is made), chat_cli's flags and over-long prompts, and the engine's
refusal of a request that does not fit the model's RoPE table.
"""

import json
import re
import sys

import pytest
import torch

from nanochat.common import NanochatError, run_main
from nanochat.engine import Engine
from scripts import chat_cli
from tasks.customjson import CustomJSON
from tasks.smoltalk import SmolTalk
from test_gpt import make_model

GOOD = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'

BAD_LINES = [
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "b"}]}',
     "not valid UTF-8 \\(byte 0xe9"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}',
     r"message 0 has a lone surrogate \\ud800"),
    (b'{"messages": [{"role": "user"', "invalid JSON"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
     "message 1 has role 'user', expected 'assistant'"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}]}',
     "message 1 part 0 must be"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_smoltalk_validates_every_line_when_made(tmp_path, monkeypatch, line, message):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(GOOD + b"\n" + GOOD + b"\n\n" + line + b"\n" + GOOD + b"\n")
    monkeypatch.setenv("NANOCHAT_CHAT_DIR", str(tmp_path))
    with pytest.raises(NanochatError, match=rf"^{re.escape(str(path))}:4: {message}"):
        SmolTalk("train")


@pytest.mark.parametrize("line,message", BAD_LINES[:2])
def test_customjson_rejects_text_that_is_not_utf8(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(GOOD + b"\n" + line + b"\n")
    with pytest.raises(NanochatError, match=rf"^{re.escape(str(path))}:2: {message}"):
        CustomJSON(str(path))


def test_customjson_accepts_a_byte_order_mark_and_surrogate_pairs(tmp_path):
    pair = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, {"role": "assistant", "content": "b"}]}'
    path = tmp_path / "mine.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\r\n" + pair + b"\r\n")
    task = CustomJSON(str(path))
    assert task[0] == json.loads(GOOD) and task[1]["messages"][0]["content"] == "\U0001f600"


# -----------------------------------------------------------------------------
# chat_cli and the engine


@pytest.fixture
def cli(monkeypatch, capsys, byte_tok):
    """Runs chat_cli's main in this process on a tiny random model (sequence_len 32, RoPE table 320).
    Returns run(*argv) -> (exit code, stdout, stderr)."""
    model = make_model(vocab_size=byte_tok.vocab_size)
    monkeypatch.setattr(chat_cli, "compute_init", lambda device_type: (False, 0, 0, 1, torch.device("cpu")))
    monkeypatch.setattr(chat_cli, "load_model", lambda *args, **kwargs: (model, byte_tok, {"step": 0}))

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["chat_cli", *map(str, argv)])
        capsys.readouterr()
        try:
            run_main(chat_cli.main)
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _eof_after(lines):
    for line in lines:
        yield line
    raise EOFError


@pytest.mark.parametrize("flags,message", [
    (["--temperature", -1], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--top-k", -3], "--top-k must be >= 0"),
    (["--top-p", 0], "--top-p must be in"),
    (["--top-p", 1.5], "--top-p must be in"),
    (["--max-tokens", 0], "--max-tokens must be >= 1"),
    (["--max-tokens", 1000], "--max-tokens 1000 is more than this model can generate"),
    (["--step", -1], "--step must be >= 0"),
])
def test_chat_cli_rejects_out_of_range_flags(cli, flags, message):
    code, out, err = cli("-p", "hi", *flags)
    assert code == 1 and err.strip().count("\n") == 0 and message in err, err
    assert "Assistant:" not in out


def test_chat_cli_greedy_and_top_p_one_are_allowed(cli):
    code, out, _ = cli("-p", "hi", "--temperature", 0, "--top-p", 1, "--max-tokens", 4)
    assert code == 0 and "Assistant:" in out


def test_chat_cli_refuses_a_prompt_longer_than_the_context(cli):
    code, out, err = cli("-p", "x" * 40, "--max-tokens", 4)
    assert code == 1 and err.strip().count("\n") == 0, err
    assert "the conversation is 44 tokens, longer than the model's context of 32 tokens" in err
    assert "Assistant:" not in out


def test_chat_cli_interactive_keeps_going_after_an_over_long_message(cli, monkeypatch):
    lines = _eof_after(["x" * 40, "hi"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = cli("--max-tokens", 4, "--temperature", 0)
    assert code == 0
    assert "longer than the model's context of 32 tokens; /clear starts a new conversation" in err
    assert out.count("Assistant:") == 1  # the short message was answered; the long one was dropped


def test_engine_refuses_a_request_past_the_rope_table_before_decoding(byte_tok):
    engine = Engine(make_model(vocab_size=byte_tok.vocab_size), byte_tok)  # RoPE table of 320 positions
    stream = engine.generate([byte_tok.bos_token_id] * 300, max_tokens=40, temperature=0.0)
    with pytest.raises(NanochatError, match="prompt of 300 tokens with max_tokens=40 needs 339 positions, more than .* 320"):
        next(stream)
    (tokens,), _ = engine.generate_batch([byte_tok.bos_token_id] * 300, max_tokens=21, temperature=0.0, stop_tokens=[])
    assert len(tokens) == 21  # 300 + 21 - 1 = 320 positions: exactly fits
