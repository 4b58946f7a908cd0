"""
Small utilities shared by the library and the scripts: the base directory, the one distributed
entry point (compute_init / compute_cleanup), rank-0 printing and the user-facing error type.

Import-safe: nothing here queries CUDA, touches the network or initialises a process group at
import time.
"""

import ctypes
import os
import sys

import torch
import torch.distributed as dist


class NanochatError(Exception):
    """A problem with the user's input (a path, a flag, a file): reported as one line, exit 1."""


def run_main(main):
    """Run a script's main(); a NanochatError becomes a one-line message on stderr and exit code 1."""
    try:
        main()
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def get_base_dir():
    """Root for tokenizer, checkpoints and reports: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def print0(*args, **kwargs):
    """print() on rank 0 only (RANK from torchrun; a plain process is rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def is_ddp():
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from torchrun's environment variables."""
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def keep_freed_cpu_memory():
    """
    Make glibc's malloc reuse freed memory for large blocks instead of returning it to the OS.
    PyTorch's CPU allocator mallocs and frees every tensor, and glibc serves blocks above its mmap
    threshold (128 KiB to 32 MiB) with a fresh mmap: each activation-sized tensor then page-faults
    on first touch and is zeroed by the kernel. On a 2-core EPYC an elementwise op on a 100 MB tensor
    takes ~35 ms that way and ~6 ms from reused memory; a depth-6 training step spends seconds in
    such ops (docs/LOG.md). mallopt(M_MMAP_MAX, 0) keeps large blocks on the heap and a 1 GiB
    M_TRIM_THRESHOLD keeps the freed top of the heap mapped. Process-wide, once; a no-op where
    libc is not glibc (macOS, musl). Returns True if applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def compute_init(device_type=None, seed=42):
    """
    The one distributed entry point. Works the same on CPU, one GPU and N GPUs (torchrun).

    device_type: "cuda" | "cpu" | "mps" | None (autodetect).
    Returns (ddp, rank, local_rank, world_size, device). Under torchrun initialises the process
    group: NCCL on CUDA, gloo on CPU. On CPU also applies keep_freed_cpu_memory().
    Raises NanochatError if CUDA is asked for but not available.
    """
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise NanochatError("--device-type cuda was given but CUDA is not available")
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device_type == "cpu":
        keep_freed_cpu_memory()
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
    else:
        device = torch.device(device_type)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def atomic_write_bytes(path, data):
    """Write bytes to path via a temp file in the same directory + os.replace (never a torn file)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_data_path(explicit, env_var, subpath, default):
    """
    Where a kind of local data lives, the first that is set of: `explicit` (a function argument or
    a script's flag) > $env_var (e.g. NANOCHAT_DATA_DIR) > $NANOCHAT_DATA_ROOT/subpath (one data
    root laid out like shared/data: pretrain/, tasks/, chat/, eval/core/, words/words_alpha.txt) >
    default(), a callable so that a default under the base dir creates that dir only when it is used.
    Returns the path as found (a str); whether it exists is the caller's to check.
    """
    if explicit:
        return explicit
    if os.environ.get(env_var):
        return os.environ[env_var]
    if os.environ.get("NANOCHAT_DATA_ROOT"):
        return os.path.join(os.environ["NANOCHAT_DATA_ROOT"], subpath)
    return default()
