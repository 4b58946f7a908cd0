"""
Helpers for the serving tests: tiny checkpoints with a byte-level tokenizer, and chat_web servers run
as real uvicorn subprocesses.

The "cycle" model is a GPT whose weights are set by hand so that its reply is known: whatever the
prompt, it answers "abcdefghijklmnopqrstuvwxyz abcdef..." forever (never <|assistant_end|>). Its
blocks are the identity (c_proj = 0, as at init), so the next-token logits depend on the last
token only: token c embeds to its own axis of the residual stream and lm_head maps that axis to the
token that follows c in the cycle, with logit 15 * tanh(2) ~ 14.5 against 0 for every other token
(greedy: exact; temperature 1: a wrong token about once in 7000; temperature 2: one in 6, so
seeded samples differ). Replies are therefore predictable, and as long as max_tokens says.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import torch

from conftest import byte_tokenizer
from nanochat.checkpoint_manager import checkpoint_dir, save_checkpoint
from nanochat.gpt import GPT, GPTConfig

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CYCLE = "abcdefghijklmnopqrstuvwxyz "


def cycle_text(n):
    """The first n characters the cycle model replies with."""
    return (CYCLE * (n // len(CYCLE) + 1))[:n]


def cycle_model(sequence_len=1024):
    tok = byte_tokenizer()
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    model = GPT(config)
    model.init_weights(seed=0)
    chain = [tok.special_tokens["<|assistant_start|>"]] + [ord(c) for c in CYCLE]
    successor = {t: ord(CYCLE[i % len(CYCLE)]) for i, t in enumerate(chain)}  # assistant_start -> a -> b ... ' ' -> a
    with torch.no_grad():
        wte, lm_head = model.transformer.wte.weight, model.lm_head.weight
        wte[:, : len(chain)] = 0.0  # the chain's axes belong to the chain tokens alone
        lm_head.zero_()
        for axis, t in enumerate(chain):
            wte[t] = 0.0
            wte[t, axis] = 1.0  # after the RMS norm: sqrt(64) = 8 on this axis
            lm_head[successor[t], axis] = 30.0 / 8  # logit 30 before the 15 * tanh(x / 15) soft-cap
    return model.eval()


def random_model(seed=0, sequence_len=256):
    """A random small GPT (attention and MLPs active: c_proj perturbed away from zero)."""
    tok = byte_tokenizer()
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    model.init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_for_serving(base_dir, model, model_tag, stage="sft", step=1):
    """Save model as a checkpoint of stage/model_tag under base_dir, with the byte tokenizer."""
    byte_tokenizer().save(os.path.join(base_dir, "tokenizer"))
    meta = {"step": step, "model_config": model.config.to_dict(), "model_tag": model_tag}
    save_checkpoint(checkpoint_dir(stage, model_tag, str(base_dir)), step, model.state_dict(), None, meta)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m scripts.chat_web ...` on a free port; .url, .log(), .terminate()."""

    def __init__(self, base_dir, *args, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            env.pop(k, None)
        self.log_path = log_path
        self._log = open(log_path, "w")
        cmd = [sys.executable, "-m", "scripts.chat_web", "--device-type", "cpu", "--port", str(self.port), *map(str, args)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"chat_web exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"chat_web did not come up in {timeout}s:\n{self.log()}")

    def log(self):
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def terminate(self, timeout=30):
        """SIGTERM (graceful shutdown); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
