"""
The RL stages' test set-up (tests/test_rl.py, tests/test_rsft.py): a base dir with the byte tokenizer
and a tiny random GPT saved as an SFT checkpoint, more tags of that checkpoint, and running a stage
script's main() in this process.
"""

import os

import torch

from conftest import byte_tokenizer
from helpers.scripts_util import SHARED_DATA, make_env
from nanochat.checkpoint_manager import checkpoint_dir, save_checkpoint
from nanochat.gpt import GPT, GPTConfig


def make_sft_base(base, tag="t", step=5, sequence_len=128, seed=0):
    """A base dir at `base` (pathlib.Path) with the byte tokenizer and a tiny random 1-layer GPT
    (n_embd 64) saved as the SFT checkpoint `tag` at `step`. Returns the environment of a stage
    subprocess (make_env: this base dir, one thread, the shared task data)."""
    byte_tokenizer().save(base / "tokenizer")
    config = GPTConfig(sequence_len=sequence_len, vocab_size=byte_tokenizer().vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights(seed=seed)
    save_checkpoint(checkpoint_dir("sft", tag, str(base)), step, model.state_dict(), None, {"stage": "sft", "model_tag": tag, "step": step, "model_config": config.to_dict()})
    return make_env(base, OMP_NUM_THREADS=1, NANOCHAT_TASKS_DIR=os.path.join(SHARED_DATA, "tasks"))


def link_sft(base, tag, source="t"):
    """The SFT checkpoint `source` under another tag (a symlink): each run of a test starts from the same weights in its own tag."""
    os.symlink(checkpoint_dir("sft", source, str(base)), checkpoint_dir("sft", tag, str(base)))


def run_main(main, argv, env, monkeypatch):
    """main(argv) of a stage script in this process, with the base dir and task data of env, on one thread."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", env["NANOCHAT_BASE_DIR"])
    monkeypatch.setenv("NANOCHAT_TASKS_DIR", env["NANOCHAT_TASKS_DIR"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: more threads only contend with the other tests for the cores
    try:
        main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
