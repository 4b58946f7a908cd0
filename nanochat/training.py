"""
Bookkeeping shared by the training scripts (base_train, mid_train, chat_sft, chat_rl): device peak
FLOPs for MFU, the auto device-batch-size search, the metrics log, graceful stop on signals, RNG
state capture, and the NaN guard. The loops themselves stay in the scripts, flat and readable.
"""

import json
import math
import os
import random
import signal
import time

import numpy as np
import torch

from nanochat.common import NanochatError

# Dense (no sparsity) peak throughput in FLOP/s from the vendors' datasheets, for MFU.
PEAK_FLOPS = {
    ("H100", torch.bfloat16): 989e12,  # H100 SXM; the PCIe card is 756e12 (matched by name below)
    ("H100 PCIe", torch.bfloat16): 756e12,
    ("H200", torch.bfloat16): 989e12,
    ("A100", torch.bfloat16): 312e12,
    ("B200", torch.bfloat16): 2250e12,
    ("RTX 4090", torch.bfloat16): 165e12,
    ("H100", torch.float8_e4m3fn): 1979e12,
    ("H200", torch.float8_e4m3fn): 1979e12,
}


def get_peak_flops(device, dtype=torch.bfloat16):
    """Peak FLOP/s of the device for dtype, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    best = None
    for (key, dt), flops in PEAK_FLOPS.items():  # the longest matching name wins ("H100 PCIe" over "H100")
        if dt == dtype and key in name and (best is None or len(key) > len(best[0])):
            best = (key, flops)
    return best[1] if best else None


def is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def find_device_batch_size(try_batch, start, min_size=1):
    """
    The largest device batch size, halving from `start`, for which try_batch(B) (one forward and
    backward at batch B) raises no out-of-memory error. Returns it; raises NanochatError if even
    min_size does not fit.
    """
    B = start
    while B >= min_size:
        try:
            try_batch(B)
            return B
        except Exception as e:  # noqa: BLE001 - only OOMs are caught, the rest is re-raised
            if not is_oom(e):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            B //= 2
    raise NanochatError(f"--device-batch-size auto: even batch {min_size} does not fit in memory")


class MetricsLogger:
    """
    One JSON object per line in <run_dir>/metrics.jsonl (always), mirrored to wandb when a run
    name is given. Rank 0 only. On resume, lines from steps after the resume step are dropped so
    the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir, config, run=None, project="nanochat", rank=0, resume_step=None):
        self.rank = rank
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        if rank != 0:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        if run:
            try:
                import wandb
            except ImportError:
                raise NanochatError(f"--run {run!r} asks for wandb logging but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=project, name=run, config=config, resume="allow")

    def log(self, row):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row.get("step"))

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks at step boundaries (to save, then exit)."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.requested:  # a second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def get_rng_state():
    """Python, numpy and torch RNG states as JSON-serialisable lists."""
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state):
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def check_finite(loss_value, step, ckpt_hint):
    """NaN/inf guard: raise a NanochatError naming the step and where the last good checkpoint is."""
    if not math.isfinite(loss_value):
        raise NanochatError(f"loss is {loss_value} at step {step}; stopping. The last good checkpoint is kept in {ckpt_hint}")


class StepTimer:
    """Wall time per step with CUDA synchronisation, and an ETA."""

    def __init__(self, device):
        self.device = device
        self.t = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        self.t = time.perf_counter()

    def stop(self):
        self._sync()
        return time.perf_counter() - self.t


def train_step(model, optimizer, batches, grad_accum_steps):
    """
    One optimizer step: forward and backward over grad_accum_steps micro-batches taken from
    `batches` (an iterator of (inputs, targets) int64 [B, T]), then optimizer.step(), which averages
    gradients over ranks. Returns (loss, grad_norm): the mean loss over the micro-batches and ranks
    (0-D fp32 tensor, still on the device: reading it synchronises) and the optimizer's grad norm.
    """
    loss_sum = None
    for _ in range(grad_accum_steps):
        x, y = next(batches)
        loss = model(x, y)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        (loss / grad_accum_steps).backward()
    grad_norm = optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean_loss = loss_sum / grad_accum_steps
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean_loss, op=torch.distributed.ReduceOp.AVG)
    return mean_loss, grad_norm


def format_eta(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"
