import os

import pytest
import torch

from nanochat.checkpoint_manager import build_model, checkpoint_dir, find_last_step, list_steps, load_checkpoint, load_model, save_checkpoint
from nanochat.common import NanochatError
from nanochat.gpt import GPT, GPTConfig


def small_model():
    model = GPT(GPTConfig(sequence_len=16, vocab_size=265, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights(seed=1)
    return model


def save(ckpt_dir, step, model, keep_last=None):
    meta = {"step": step, "model_config": model.config.to_dict()}
    opt_state = {"state": {0: {"m": torch.ones(3) * step}}}
    return save_checkpoint(str(ckpt_dir), step, model.state_dict(), opt_state, meta, keep_last=keep_last)


def test_round_trip(tmp_path):
    model = small_model()
    save(tmp_path, 7, model)
    state, opt, meta = load_checkpoint(str(tmp_path), 7, "cpu", load_optimizer=True)
    rebuilt = build_model(state, meta, "cpu")
    idx = torch.randint(0, 265, (1, 8))
    torch.testing.assert_close(rebuilt(idx), model(idx))
    assert torch.equal(opt["state"][0]["m"], torch.full((3,), 7.0)) and meta["step"] == 7


def test_keep_last_and_incomplete_ignored(tmp_path):
    model = small_model()
    for step in (1, 2, 3):
        save(tmp_path, step, model, keep_last=2)
    os.makedirs(tmp_path / "step_000009.tmp")  # a crashed save: never picked up
    os.makedirs(tmp_path / "step_000010")  # no meta.json: incomplete
    assert list_steps(str(tmp_path)) == [2, 3]
    assert find_last_step(str(tmp_path)) == 3


def test_truncated_and_missing(tmp_path):
    model = small_model()
    path = save(tmp_path, 5, model)
    model_file = os.path.join(path, "model.pt")
    with open(model_file, "r+b") as f:
        f.truncate(os.path.getsize(model_file) // 2)
    with pytest.raises(NanochatError, match="truncated"):
        load_checkpoint(str(tmp_path), 5, "cpu")
    with pytest.raises(NanochatError, match="not found"):
        load_checkpoint(str(tmp_path), 6, "cpu")
    with pytest.raises(NanochatError, match="no checkpoint"):
        find_last_step(str(tmp_path / "nothing"))


def test_load_model_checks_tokenizer(base_dir, byte_tok):
    model = small_model()  # vocab 265 = 256 bytes + 9 special tokens
    save(checkpoint_dir("sft", "d2"), 4, model)
    with pytest.raises(NanochatError, match="tokenizer file not found"):
        load_model("sft", "cpu")
    byte_tok.save(base_dir / "tokenizer")
    loaded, tok, meta = load_model("sft", "cpu")
    assert meta["step"] == 4 and not loaded.training and tok.vocab_size == 265
    with pytest.raises(NanochatError, match="no mid checkpoint"):
        load_model("mid", "cpu")
