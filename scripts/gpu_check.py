"""
The one-GPU check: every stage for a few steps at a small depth, the comparisons only a GPU can
fail, and the speed numbers that size the 8xH100 speedrun, in one command of about 8 minutes on
one H100. A GPU is lent to this project rarely and briefly, so the check is prepared and proven on
CPU before one is (docs/gpu_check.md: the device call, how to read the table, the projections).

    python -m scripts.gpu_check --prepare-data .gpu_check_data    # once: the small data slice it carries
    bash runs/gpu_check.sh --data-root .gpu_check_data --out DIR  # on a CUDA machine
    bash runs/gpu_check.sh --cpu --data-root .gpu_check_data      # the same checks, tiny, on CPU (CI)

Every check runs in its own subprocesses (a stage script, or this file with --probe NAME for the
in-process comparisons) under its own timeout inside one global time budget: a check that fails,
hangs or takes CUDA down fails alone, and the checks that need its output are skipped, naming it.
Writes gpu_check.json, gpu_check.md and gpu_check_logs.txt to --out (default
<base_dir>/gpu_check) and exits 1 naming every failed check. Nothing is ever downloaded: the data
slice holds the pretraining shards, task files, CORE items and a trained tokenizer (the GPU machine
may lack the Rust BPE extension that trains one).
"""

import argparse
import csv
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
RESULT_PREFIX = "GPU_CHECK_RESULT "  # the line a probe prints its result on
INJECTED_FLAG = "--gpu-check-injected-failure"  # no script knows it: argparse exits 2

# ------------------------------------------------------------------------------------------------
# Sizes. CUDA: the whole check in ~8 minutes on one H100. Every run of the pipeline's depth-4 model
# has the same shapes (16 rows x 512 tokens), so torch.compile is paid once and Inductor's cache
# serves the other runs. The speed rows are at the speedrun's depth (20), at GPT-2-grade depth (24)
# and at 12, with speedrun.sh's seq_len 2048 and vocab 65536. CPU: tiny, a few minutes on 2 cores.

SIZES = {
    "cuda": {
        # the pipeline: base (10 steps), then mid / SFT 4 steps each, evaluations on a few items
        "depth": 4, "seq_len": 512, "batch": 16, "total_batch": 8192, "base_steps": 10, "save_every": 5, "eval_tokens": 16384,
        "stage_steps": 4, "val_conversations": 16, "core_items": 4, "eval_problems": 4, "new_tokens": 32,
        # kill after the first checkpoint (step 4) of 16; auto at the pipeline's 16 rows: the search path under compile, no recompile
        "kill_steps": 16, "kill_save_every": 4, "auto_total_batch": 8192,
        # d24 at 16 rows: 32 rows x 2048 tokens is at the edge of 80 GB from d24 up (upstream nanochat runs d26 at 16)
        "speed_depths": (20, 24, 12), "speed_seq_len": 2048, "speed_vocab": 65536, "speed_batch": {12: 32, 20: 32, 24: 16},
        "speed_steps": ("--warmup-steps", 3, "--windows", 3, "--window-steps", 2),
        "infer": ("--depths", 20, "--batch-sizes", 1, 32, "--vocab-size", 65536, "--prompt-len", 512, "--decode-len", 64, "--repeats", 3),
        # bf16 activations, compiled kernels fuse and round differently; atomics make CUDA runs not bitwise repeatable
        "loss_tol_compile": 5e-2, "loss_tol_resume": 1e-2, "budget_s": 480,
    },
    "cpu": {
        "depth": 2, "seq_len": 64, "batch": 8, "total_batch": 512, "base_steps": 6, "save_every": 3, "eval_tokens": 1024,
        "stage_steps": 3, "val_conversations": 8, "core_items": 2, "eval_problems": 2, "new_tokens": 16,
        "kill_steps": 12, "kill_save_every": 2, "auto_total_batch": 2048,
        "speed_depths": (2, 3, 4), "speed_seq_len": 64, "speed_vocab": 2048, "speed_batch": {2: 8, 3: 8, 4: 8},
        "speed_steps": ("--warmup-steps", 1, "--windows", 2, "--window-steps", 1),
        "infer": ("--depths", 2, "--batch-sizes", 1, 32, "--vocab-size", 2048, "--prompt-len", 32, "--decode-len", 8, "--repeats", 1),
        # fp32: a resumed run is bitwise the uninterrupted one; Inductor's CPU kernels reorder sums (~1e-4)
        "loss_tol_compile": 1e-3, "loss_tol_resume": 1e-5, "budget_s": 900,
    },
}
# Probe tolerances. bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per operation): a few
# layers of it move logits by ~1% RMS, so 5% flags a real bug (a wrong cast, a dtype that leaks into
# the softmax) and not rounding. The KV cache in fp32 computes the same sums in another order: 1e-3
# on logits of magnitude <= 15 (the soft cap). In bf16 the cache and the full forward round
# differently, so only a loose bound holds there.
BF16_REL_RMS_TOL = 5e-2
KV_FP32_TOL = 1e-3
KV_BF16_TOL = 0.25
FA3_TOL = 2e-2

# The data slice: what each file of shared/data contributes (records kept from its start). 256
# training documents are ~2.8M characters, more than one run of the check trains on (the loader
# starts another epoch if a run needs more); 128 val documents cover --eval-tokens at every size.
SLICE_TRAIN_DOCS, SLICE_VAL_DOCS, SLICE_ROW_GROUP = 256, 128, 32
SLICE_RECORDS = {"tasks": 64, "chat": 100, "eval": 24}
SLICE_MMLU_SUBJECTS = 3  # subject files kept per MMLU folder
SLICE_WORD_STRIDE = 50  # every 50th word of the 370K-word list
SLICE_VOCAB, SLICE_TOK_CHARS = 2048, 3_000_000


# ------------------------------------------------------------------------------------------------
# What a check (or a probe) ends with besides its numbers.


class CheckFailed(Exception):
    """A check (or probe) failed: the message names what, numbers are what it measured."""

    def __init__(self, message, numbers=None):
        super().__init__(message)
        self.numbers = numbers or {}


class Skipped(Exception):
    """A check that cannot run here (the message says why)."""


# ------------------------------------------------------------------------------------------------
# The data slice: a data root laid out like shared/data (pretrain/, tasks/, chat/, eval/core/,
# words/) plus tokenizer/, a few MB, carried to the GPU machine with the repository.


def _head_records(src, dst, n):
    """Copy the first n records of a .jsonl (lines) or .csv (csv records) file."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if src.endswith(".csv"):
        with open(src, newline="", encoding="utf-8") as f, open(dst, "w", newline="", encoding="utf-8") as g:
            writer = csv.writer(g)
            for _, record in zip(range(n), csv.reader(f)):
                writer.writerow(record)
        return
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        g.writelines(line for _, line in zip(range(n), (line for line in f if line.strip())))


def _write_shard(src, dst, n_docs):
    """Write the first n_docs documents of the shard src as a shard of small row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanochat.dataset import open_shard, read_row_group

    pf, docs = open_shard(src), []
    for i in range(pf.metadata.num_row_groups):
        docs += read_row_group(pf, src, i)
        if len(docs) >= n_docs:
            break
    pq.write_table(pa.table({"text": docs[:n_docs]}), dst, row_group_size=SLICE_ROW_GROUP, compression="zstd")


def prepare_data(source, dest):
    """
    Build the data slice at dest from the full data root source (shared/data). Deterministic: the
    first records of each file, and a tokenizer trained by scripts.tok_train on the training slice.
    Raises SystemExit with a one-line message if source lacks a part or dest exists.
    """
    if not os.path.isdir(os.path.join(source, "pretrain")):
        sys.exit(f"error: no pretrain/ in {source}: pass --source-data (a data root laid out like shared/data)")
    if os.path.exists(dest):
        sys.exit(f"error: {dest} exists; remove it first")
    tmp = dest.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shards = sorted(glob.glob(os.path.join(source, "pretrain", "*.parquet")))
    os.makedirs(os.path.join(tmp, "pretrain"))
    _write_shard(shards[0], os.path.join(tmp, "pretrain", "shard_00000.parquet"), SLICE_TRAIN_DOCS)
    _write_shard(shards[-1], os.path.join(tmp, "pretrain", "shard_00001.parquet"), SLICE_VAL_DOCS)  # the last shard is val
    for root, dirs, files in os.walk(os.path.join(source, "tasks")):
        dirs.sort()
        keep = sorted(f for f in files if f.endswith((".jsonl", ".csv")))
        if os.path.basename(os.path.dirname(root)) == "mmlu":
            keep = keep[:SLICE_MMLU_SUBJECTS]
        for f in keep:
            _head_records(os.path.join(root, f), os.path.join(tmp, os.path.relpath(root, source), f), SLICE_RECORDS["tasks"])
    for path in sorted(glob.glob(os.path.join(source, "chat", "*.jsonl"))):
        _head_records(path, os.path.join(tmp, "chat", os.path.basename(path)), SLICE_RECORDS["chat"])
    core = os.path.join(source, "eval", "core")
    os.makedirs(os.path.join(tmp, "eval", "core"))
    shutil.copy(os.path.join(core, "core_tasks.tsv"), os.path.join(tmp, "eval", "core", "core_tasks.tsv"))
    with open(os.path.join(core, "core_tasks.tsv"), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if os.path.isfile(os.path.join(core, row["file"])):
                _head_records(os.path.join(core, row["file"]), os.path.join(tmp, "eval", "core", row["file"]), SLICE_RECORDS["eval"])
    os.makedirs(os.path.join(tmp, "words"))
    with open(os.path.join(source, "words", "words_alpha.txt"), encoding="utf-8") as f:
        words = f.readlines()[::SLICE_WORD_STRIDE]
    with open(os.path.join(tmp, "words", "words_alpha.txt"), "w", encoding="utf-8") as f:
        f.writelines(words)
    env = _clean_env({"NANOCHAT_BASE_DIR": os.path.join(tmp, ".base")})
    cmd = [sys.executable, "-m", "scripts.tok_train", "--data-dir", os.path.join(tmp, "pretrain"), "--output-dir", os.path.join(tmp, "tokenizer"),
           "--vocab-size", str(SLICE_VOCAB), "--max-chars", str(SLICE_TOK_CHARS)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: tok_train failed on the slice:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    shutil.rmtree(os.path.join(tmp, ".base"), ignore_errors=True)
    os.rename(tmp, dest)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dest) for f in fs)
    print(f"wrote the data slice {dest}: {size / 2**20:.1f} MiB in {sum(len(fs) for _, _, fs in os.walk(dest))} files")


# ------------------------------------------------------------------------------------------------
# Probes: the in-process comparisons, each run as `python -m scripts.gpu_check --probe NAME` so that
# a crash stays in its own process. Each prints one RESULT_PREFIX line: {"status", "numbers", "note"}.


def _probe_model(device, depth, seq_len, vocab_size, seed=0, **config):
    """A GPT whose every layer contributes: init_weights zeroes the output projections (each block
    starts as the identity) and gives lm_head a 0.001 scale, so both are redrawn like the input
    projections (U(-a, a), a = sqrt(3 / fan_in)); logits then have unit scale."""
    import torch

    from nanochat.gpt import GPT, GPTConfig

    model = GPT(GPTConfig.from_depth(depth, vocab_size, seq_len, **config)).to(device)
    model.init_weights(seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for lin in [b.attn.c_proj for b in model.transformer.h] + [b.mlp.c_proj for b in model.transformer.h] + [model.lm_head]:
            a = (3.0 / lin.weight.size(1)) ** 0.5
            lin.weight.uniform_(-a, a, generator=gen)
    return model.eval()


def probe_environment(mode, inject):
    """What the machine has: Python, torch, the GPU, and the optional packages the check relies on."""
    import platform

    import torch

    numbers = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        numbers |= {"device": props.name, "cuda": torch.version.cuda, "capability": f"{props.major}.{props.minor}",
                    "memory_GiB": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count}
    for module in ("flash_attn_interface", "nanochat_bpe", "fastapi", "uvicorn", "pydantic"):
        try:
            __import__(module)
            numbers[module] = True
        except Exception:  # noqa: BLE001 - a broken extension is as absent as a missing one
            numbers[module] = False
    if mode == "cuda" and not numbers["cuda_available"]:
        raise CheckFailed("CUDA is not available in a child process", numbers)
    if inject:
        raise CheckFailed("injected failure", numbers)
    return numbers


def probe_bf16_vs_fp32(mode, inject):
    """The same fp32 weights run with bf16 and with fp32 activations: the logits agree to rounding."""
    import torch

    device, s = mode, SIZES[mode]
    model = _probe_model(device, s["depth"], s["seq_len"], SLICE_VOCAB)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, SLICE_VOCAB, (4, s["seq_len"]), device=device, generator=gen)
    out = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            model.compute_dtype = dtype
            out[dtype] = model(x)
    ref, low = out[torch.float32], out[torch.bfloat16]
    if inject:
        low = low + torch.randn_like(low)
    rel_rms = ((low - ref).norm() / ref.norm()).item()
    numbers = {"rel_rms": rel_rms, "max_abs": (low - ref).abs().max().item(), "top1_agree": (low.argmax(-1) == ref.argmax(-1)).float().mean().item(),
               "tol_rel_rms": BF16_REL_RMS_TOL}
    if not rel_rms < BF16_REL_RMS_TOL:
        raise CheckFailed(f"bf16 logits off by {rel_rms:.3g} RMS (> {BF16_REL_RMS_TOL})", numbers)
    return numbers


def probe_fa3_vs_sdpa(mode, inject):
    """FlashAttention-3 against PyTorch SDPA (what runs without FA3): attention outputs and the
    gradient of q, full causal and sliding window, then a whole SSSL model's logits."""
    import torch

    from nanochat import gpt

    if mode != "cuda":
        raise Skipped("needs CUDA (FA3 is Hopper-only)")
    if gpt._fa3_func is None:
        raise Skipped("FA3 not installed (flash_attn_interface does not import)")
    fa3 = gpt._fa3_func
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, D = 2, 1024, 4, 128
    numbers = {}
    for name, window in (("full", T), ("window", T // 4)):
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3))
        g = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        outs = []
        for kernel in (fa3, None):
            gpt._fa3_func = kernel
            y = gpt.attention(q, k, v, window)
            (dq,) = torch.autograd.grad((y.float() * g.float()).sum(), (q,))
            outs.append((y.float() + (1.0 if inject and kernel else 0.0), dq.float()))
        gpt._fa3_func = fa3
        (y1, g1), (y2, g2) = outs
        numbers[f"{name}_out_max_abs"] = (y1 - y2).abs().max().item()
        numbers[f"{name}_grad_rel"] = ((g1 - g2).norm() / g2.norm()).item()
    model = _probe_model("cuda", 4, T, SLICE_VOCAB, window_pattern="SSSL")
    x = torch.randint(0, SLICE_VOCAB, (B, T), device="cuda", generator=gen)
    with torch.no_grad():
        logits = []
        for kernel in (fa3, None):
            gpt._fa3_func = kernel
            logits.append(model(x))
        gpt._fa3_func = fa3
    numbers["model_logits_rel_rms"] = ((logits[0] - logits[1]).norm() / logits[1].norm()).item()
    worst = max(numbers.values())
    numbers["tol"] = FA3_TOL
    if not worst < FA3_TOL:
        raise CheckFailed(f"FA3 and SDPA differ by {worst:.3g} (> {FA3_TOL})", numbers)
    return numbers


def probe_kv_cache(mode, inject):
    """
    The KV-cache engine against the full forward. (1) Prompts of three lengths, left-padded into one
    cache, prefilled, then 8 teacher-forced decode steps: each row's logits against its own uncached
    forward, in fp32 (tight) and bf16 (loose). (2) Engine greedy decoding of the same prompts as one
    continuous batch (fp32): every token is the argmax of the uncached forward of what came before.
    """
    import torch

    from nanochat.engine import Engine, GenerationRequest, KVCache
    from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer

    device, s = mode, SIZES[mode]
    tok = Tokenizer({bytes([i]): i for i in range(256)}, SPLIT_PATTERN)  # bytes + the special tokens
    model = _probe_model(device, s["depth"], s["seq_len"], tok.vocab_size, window_pattern="SL")
    gen = torch.Generator().manual_seed(0)
    lengths, steps = (5, s["seq_len"] // 2, s["seq_len"] - 8), 8
    L = max(lengths)
    seqs = [torch.randint(0, 256, (n + steps,), generator=gen).tolist() for n in lengths]
    numbers, failures = {}, []
    for dtype, tol in ((torch.float32, KV_FP32_TOL), (torch.bfloat16, KV_BF16_TOL)):
        model.compute_dtype = dtype
        with torch.no_grad():
            cache = KVCache.for_model(model, len(seqs), L + steps, left_pad=[L - n for n in lengths])
            idx = torch.tensor([[0] * (L - n) + q[:n] for n, q in zip(lengths, seqs)], device=device)
            cached = [model(idx, kv_cache=cache)[:, -1]]
            for t in range(steps - 1):
                cached.append(model(torch.tensor([[q[n + t]] for n, q in zip(lengths, seqs)], device=device), kv_cache=cache)[:, -1])
            cached = torch.stack(cached, 1) + (10 * tol if inject else 0.0)  # [rows, steps, V]
            full = torch.stack([model(torch.tensor([q], device=device))[0, n - 1 : n - 1 + steps] for n, q in zip(lengths, seqs)])
        name = str(dtype).removeprefix("torch.")
        numbers |= {f"{name}_max_abs": (cached - full).abs().max().item(), f"{name}_tol": tol}
        if not numbers[f"{name}_max_abs"] <= tol:
            failures.append(f"{name} cached logits off by {numbers[f'{name}_max_abs']:.3g}")
    model.compute_dtype = torch.float32
    requests = [GenerationRequest(q[:n], max_tokens=steps, temperature=0.0, tools=False) for n, q in zip(lengths, seqs)]
    out = {}
    for events in Engine(model, tok).generate_many(requests):
        for e in events:
            out.setdefault(e.key, []).append(e.token)
    mismatches = 0
    with torch.no_grad():
        for key, tokens in out.items():
            n = lengths[key]
            greedy = model(torch.tensor([seqs[key][:n] + tokens], device=device))[0].argmax(-1).tolist()
            mismatches += sum(greedy[n - 1 + i] != t for i, t in enumerate(tokens))
    numbers |= {"engine_tokens": sum(map(len, out.values())), "engine_greedy_mismatches": mismatches}
    if mismatches or not out:
        failures.append(f"{mismatches} of {numbers['engine_tokens']} engine tokens are not the full forward's argmax")
    if failures:
        raise CheckFailed("; ".join(failures), numbers)
    return numbers


PROBES = {"environment": probe_environment, "bf16_vs_fp32": probe_bf16_vs_fp32, "fa3_vs_sdpa": probe_fa3_vs_sdpa, "kv_cache": probe_kv_cache}


def run_probe(name, mode, inject):
    """Run one probe and print its result line (the harness reads it; a crash prints none)."""
    try:
        result = {"status": "pass", "numbers": PROBES[name](mode, inject), "note": ""}
    except Skipped as e:
        result = {"status": "skipped", "numbers": {}, "note": str(e)}
    except CheckFailed as e:
        result = {"status": "fail", "numbers": e.numbers, "note": str(e)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# The harness: subprocesses with timeouts and logs, and the results.


def _clean_env(extra):
    """This environment for a stage subprocess: the data-path variables that would win over
    NANOCHAT_DATA_ROOT and torchrun's rank variables removed, extra added."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NANOCHAT_DATA_DIR", "NANOCHAT_TASKS_DIR", "NANOCHAT_CHAT_DIR", "NANOCHAT_EVAL_DIR", "NANOCHAT_WORDS_FILE")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONUNBUFFERED": "1"} | extra


class Context:
    """What a check gets: the mode and sizes, the stage environment, and run() for subprocesses
    bounded by the check's deadline."""

    def __init__(self, mode, work, data_root):
        self.mode, self.s, self.work = mode, SIZES[mode], work
        self.base = os.path.join(work, "base")
        self.env = _clean_env({"NANOCHAT_BASE_DIR": self.base, "NANOCHAT_DATA_ROOT": data_root})
        self.device_flags = ["--device-type", mode]
        self.name, self.deadline, self.inject, self.budget_cut, self.log_path, self._first = None, None, False, False, None, False

    def begin(self, name, deadline, inject, budget_cut):
        """Start check `name`: its subprocesses end by `deadline` (time.monotonic()); budget_cut: the
        deadline is the global budget's, not the check's own timeout."""
        self.name, self.deadline, self.inject, self.budget_cut = name, deadline, inject, budget_cut
        self.log_path = os.path.join(self.work, "logs", f"{name}.log")
        self._first = True

    def _argv(self, module, args):
        argv = [sys.executable, "-m", module, *map(str, args)]
        if self.inject and self._first and module != "scripts.gpu_check":
            argv.append(INJECTED_FLAG)  # a stage check fails through its subprocess, as a real failure would
        self._first = False
        return argv

    def remaining(self):
        return self.deadline - time.monotonic()

    def timed_out(self, what):
        """The check ran out of time: a failure at its own timeout, a skip when the global budget ran out."""
        if self.budget_cut:
            raise Skipped(f"cut by the time budget: {what}")
        raise CheckFailed(f"timed out: {what}")

    def popen(self, module, *args):
        """Start python -m module args (its own process group, output appended to the check's log)."""
        argv = self._argv(module, args)
        log = open(self.log_path, "a")
        log.write(f"$ {' '.join(argv[1:])}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        proc.log, proc.output = log, []
        return proc

    def stream(self, proc, until=None):
        """Copy proc's output to the log (and proc.output) until it ends, or until a line matches the
        regex `until` (then return that line, proc still running). Kills proc's group at the deadline."""
        timer = threading.Timer(max(self.remaining(), 0.1), kill_group, (proc,))
        timer.start()
        try:
            for line in proc.stdout:
                proc.log.write(line)
                proc.output.append(line)
                if until and re.search(until, line):
                    proc.log.flush()
                    return line
            proc.wait()
        finally:
            timer.cancel()
        proc.log.close()
        if self.remaining() <= 0:
            self.timed_out(f"{module_of(proc)} killed")
        return None

    def run(self, module, *args):
        """Run python -m module args to the end; returns its output. Raises CheckFailed on a
        non-zero exit (with its last line) or at the deadline."""
        proc = self.popen(module, *args)
        self.stream(proc)
        output = "".join(proc.output)
        if proc.returncode != 0:
            raise CheckFailed(f"{module} exited {proc.returncode}: {last_lines(output, 1)}")
        return output

    def probe(self, name):
        flags = (["--cpu"] if self.mode == "cpu" else []) + (["--inject-failure", name] if self.inject else [])
        output = self.run("scripts.gpu_check", "--probe", name, *flags)
        lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
        if not lines:
            raise CheckFailed(f"probe {name} printed no result")
        result = json.loads(lines[-1][len(RESULT_PREFIX) :])
        if result["status"] == "skipped":
            raise Skipped(result["note"])
        if result["status"] != "pass":
            raise CheckFailed(result["note"], result["numbers"])
        return result["numbers"]

    # ---- reading what the stages wrote

    def ckpt_dir(self, stage, tag):
        return os.path.join(self.base, "checkpoints", stage, tag)

    def metrics(self, stage, tag):
        with open(os.path.join(self.ckpt_dir(stage, tag), "run", "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    def losses(self, stage, tag):
        """{step: training loss} of a run's metrics log; CheckFailed if a step is logged twice or missing."""
        steps = [(r["step"], r["loss"]) for r in self.metrics(stage, tag) if "loss" in r]
        found = [s for s, _ in steps]
        if found != list(range(1, len(found) + 1)):
            raise CheckFailed(f"{stage}/{tag}: the step log is not 1..N once each: {found}")
        return dict(steps)

    def last(self, stage, tag, *keys):
        """The last logged value of each key (None if never logged)."""
        out = dict.fromkeys(keys)
        for row in self.metrics(stage, tag):
            out |= {k: row[k] for k in keys if row.get(k) is not None}
        return out


def kill_group(proc):
    """SIGKILL the process group of proc (started with start_new_session) while proc runs."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def module_of(proc):
    return proc.args[2] if len(proc.args) > 2 else proc.args[0]


def last_lines(text, n):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:]) if lines else "(no output)"


def compare_losses(a, b, tol, inject):
    """Max |a - b| over the steps of two {step: loss} runs; CheckFailed above tol or if the steps differ."""
    if sorted(a) != sorted(b):
        raise CheckFailed(f"the runs logged different steps: {sorted(a)} vs {sorted(b)}")
    diff = max(abs(a[k] - b[k] + (1.0 if inject else 0.0)) for k in a)
    numbers = {"steps": len(a), "max_abs_loss_diff": diff, "tol": tol, "final_loss": b[max(b)]}
    if diff > tol:
        raise CheckFailed(f"losses differ by {diff:.3g} (> {tol})", numbers)
    return numbers


# ------------------------------------------------------------------------------------------------
# The checks. Each takes the Context, returns a dict of numbers (pass), or raises Skipped / CheckFailed.


def base_args(ctx, tag, *extra):
    """base_train's flags for the pipeline's model under `tag`; a flag repeated in extra wins (argparse keeps the last)."""
    s = ctx.s
    return (*ctx.device_flags, "--depth", s["depth"], "--max-seq-len", s["seq_len"], "--device-batch-size", s["batch"],
            "--total-batch-size", s["total_batch"], "--eval-tokens", s["eval_tokens"], "--model-tag", tag, *extra)


def pipeline_tag(ctx):
    return f"d{ctx.s['depth']}"


def read_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def check_tok_train(ctx):
    """The Rust BPE trainer (skipped where the extension is not built for this Python)."""
    try:
        import nanochat_bpe  # noqa: F401
    except ImportError as e:
        raise Skipped(f"nanochat_bpe does not import ({e}); the stages use the slice's prepared tokenizer") from None
    out = os.path.join(ctx.work, "tok_train")
    output = ctx.run("scripts.tok_train", "--output-dir", out, "--vocab-size", SLICE_VOCAB, "--max-chars", 1_000_000)
    if not os.path.isfile(os.path.join(out, "tokenizer.tiktoken")):
        raise CheckFailed(f"no tokenizer written to {out}")
    m = re.search(r"trained vocab_size=(\d+)", output)
    return {"vocab_size": int(m.group(1)) if m else None}


def check_base_train(ctx):
    """Pretraining with evaluations and checkpoints, compiled on CUDA: the pipeline's base model."""
    s, tag = ctx.s, pipeline_tag(ctx)
    ctx.run("scripts.base_train", *base_args(ctx, tag, "--num-iterations", s["base_steps"], "--eval-every", s["save_every"],
                                             "--save-every", s["save_every"], "--num-prompts", 1))
    last = ctx.last("base", tag, "loss", "val_bpb", "unigram_val_bpb", "tok_per_s", "mfu")
    if not all(isinstance(last[k], float) and math.isfinite(last[k]) for k in ("loss", "val_bpb")):
        raise CheckFailed(f"no finite loss and val bpb in the metrics log: {last}", last)
    return last


def check_base_eval(ctx):
    """CORE on a few items per task, bpb, samples."""
    s = ctx.s
    ctx.run("scripts.base_eval", *ctx.device_flags, "--model-tag", pipeline_tag(ctx), "--max-per-task", s["core_items"],
            "--split-tokens", s["eval_tokens"], "--device-batch-size", s["batch"], "--num-samples", 1, "--sample-tokens", 8)
    report = read_json(ctx.base, "report", "base-eval.json")
    return {"core": report["core"]["core"], "core_tasks": report["core"]["tasks_present"], "core_items_per_task": s["core_items"],
            "val_bpb": report["bpb"]["val"]["bpb"]}


def check_mid_train(ctx):
    s, tag = ctx.s, pipeline_tag(ctx)
    ctx.run("scripts.mid_train", *ctx.device_flags, "--model-tag", tag, "--num-iterations", s["stage_steps"],
            "--val-conversations", s["val_conversations"], "--eval-every", -1)
    return ctx.last("mid", tag, "loss", "val_loss")


def check_chat_sft(ctx):
    s, tag = ctx.s, pipeline_tag(ctx)
    ctx.run("scripts.chat_sft", *ctx.device_flags, "--source", "mid", "--model-tag", tag, "--num-iterations", s["stage_steps"],
            "--val-conversations", s["val_conversations"], "--eval-every", -1)
    return ctx.last("sft", tag, "loss", "val_loss")


def check_chat_rl(ctx):
    """GRPO: rollouts through the engine (python tool on), a policy-gradient step, the GSM8K evaluation."""
    s, tag = ctx.s, pipeline_tag(ctx)
    ctx.run("scripts.chat_rl", *ctx.device_flags, "--model-tag", tag, "--num-iterations", 2, "--questions-per-step", 2, "--num-samples", 2,
            "--max-new-tokens", s["new_tokens"], "--eval-every", -1, "--eval-problems", 2, "--eval-samples", 2, "--device-batch-size", 4)
    return ctx.last("rl", tag, "loss", "reward")


def check_chat_eval(ctx):
    """Every chat task (categorical and generative, HumanEval in the sandbox) on a few problems, and ChatCORE."""
    s = ctx.s
    ctx.run("scripts.chat_eval", *ctx.device_flags, "--source", "sft", "--model-tag", pipeline_tag(ctx), "--max-problems", s["eval_problems"],
            "--max-new-tokens", s["new_tokens"], "--batch-size", 4)
    report = read_json(ctx.base, "report", "chat-eval-sft.json")
    return {"chatcore": report["chatcore"], "tasks": len(report["tasks"]), "problems_per_task": s["eval_problems"]}


def check_chat_cli(ctx):
    """The engine behind the chat CLI: one greedy reply from the SFT model."""
    output = ctx.run("scripts.chat_cli", *ctx.device_flags, "--model-tag", pipeline_tag(ctx), "-p", "What is the capital of France?",
                     "--max-tokens", ctx.s["new_tokens"], "--temperature", 0)
    if "Assistant:" not in output:
        raise CheckFailed("no 'Assistant:' reply in the output")
    return {}


def _http(url, body=None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def check_chat_web(ctx):
    """The server: /health, one OpenAI-style chat completion, then SIGTERM and a clean exit 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = ctx.popen("scripts.chat_web", *ctx.device_flags, "--model-tag", pipeline_tag(ctx), "--port", port, "--max-batch-size", 4,
                     "--max-new-tokens", ctx.s["new_tokens"], "--graceful-timeout", 5)

    def log_output():  # and kill the server at the deadline
        try:
            ctx.stream(proc)
        except (CheckFailed, Skipped):
            pass

    threading.Thread(target=log_output, daemon=True).start()
    t0, url = time.monotonic(), f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise CheckFailed(f"chat_web exited {proc.returncode} before serving")
            if ctx.remaining() <= 0:
                ctx.timed_out("chat_web was not serving yet")
            try:
                if _http(url + "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        ready_s, t1 = time.monotonic() - t0, time.monotonic()
        body = {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 8, "temperature": 0}
        status, reply = _http(url + "/v1/chat/completions", body, timeout=max(ctx.remaining(), 1))
        request_s = time.monotonic() - t1
        if status != 200 or not isinstance(reply["choices"][0]["message"]["content"], str):
            raise CheckFailed(f"HTTP {status}: {reply}")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=max(ctx.remaining(), 1))
        if code != 0:
            raise CheckFailed(f"chat_web exited {code} on SIGTERM (expected 0)")
        return {"ready_s": ready_s, "request_s": request_s, "completion_tokens": reply.get("usage", {}).get("completion_tokens")}
    finally:
        kill_group(proc)


def check_kill_resume(ctx):
    """SIGKILL a base_train run right after its first checkpoint, --resume it: the step log equals the
    uninterrupted run's (each step once, the same losses)."""
    s = ctx.s
    horizon = ("--num-iterations", s["kill_steps"], "--save-every", s["kill_save_every"], "--eval-every", -1, "--num-prompts", 0)
    ctx.run("scripts.base_train", *base_args(ctx, "resume_ref", *horizon))
    proc = ctx.popen("scripts.base_train", *base_args(ctx, "resume_cut", *horizon))
    line = ctx.stream(proc, until=r"^saved checkpoint .*step_\d+")
    if line is None:
        raise CheckFailed(f"base_train ended (exit {proc.returncode}) without saving a checkpoint to kill after")
    kill_group(proc)
    proc.wait()
    proc.log.close()
    killed_at = int(re.search(r"step_(\d+)", line).group(1))
    if killed_at >= s["kill_steps"]:
        raise CheckFailed("the run finished before it could be killed")
    output = ctx.run("scripts.base_train", *base_args(ctx, "resume_cut", *horizon, "--resume"))
    resumed_at = int(m.group(1)) if (m := re.search(r"resumed from \S+ at step (\d+)", output)) else None
    numbers = compare_losses(ctx.losses("base", "resume_ref"), ctx.losses("base", "resume_cut"), s["loss_tol_resume"], ctx.inject)
    return numbers | {"killed_after_step": killed_at, "resumed_at_step": resumed_at}


def check_compile(ctx):
    """torch.compile off and on: the same base_train run, the same losses to a tolerance."""
    runs = {}
    for flag in (0, 1):
        ctx.run("scripts.base_train", *base_args(ctx, f"compile{flag}", "--compile", flag, "--num-iterations", 3, "--eval-every", -1, "--num-prompts", 0))
        runs[flag] = ctx.losses("base", f"compile{flag}")
    return compare_losses(runs[0], runs[1], ctx.s["loss_tol_compile"], ctx.inject)


def check_device_batch_size_auto(ctx):
    """--device-batch-size auto (speedrun.sh's setting): the search under torch.compile, then training at what it chose."""
    s, tag = ctx.s, "dbs_auto"
    ctx.run("scripts.base_train", *base_args(ctx, tag, "--device-batch-size", "auto", "--total-batch-size", s["auto_total_batch"],
                                             "--num-iterations", 2, "--eval-every", -1, "--num-prompts", 0))
    B = read_json(sorted(glob.glob(os.path.join(ctx.ckpt_dir("base", tag), "step_*", "meta.json")))[-1])["resolved"]["device_batch_size"]
    rows = s["auto_total_batch"] // s["seq_len"]
    if not isinstance(B, int) or B < 1 or rows % B:
        raise CheckFailed(f"auto chose device_batch_size {B!r} for {rows} rows")
    return {"device_batch_size": B, "rows_per_step": rows}


def speed_check(depth):
    """The check of bench_train's tokens/s and MFU at `depth` (bf16 on CUDA; no peak is known for a CPU: MFU n/a)."""

    def check(ctx):
        s, B = ctx.s, ctx.s["speed_batch"][depth]
        output = ctx.run("scripts.bench_train", *ctx.device_flags, "--depth", depth, "--max-seq-len", s["speed_seq_len"], "--device-batch-size", B,
                         "--total-batch-size", B * s["speed_seq_len"], "--vocab-size", s["speed_vocab"],
                         "--dtype", "bfloat16" if ctx.mode == "cuda" else "float32", *s["speed_steps"])
        m = re.search(r"median ([\d,]+) tokens/s .*\| MFU (\S+)", output)
        if not m:
            raise CheckFailed("no 'median ... tokens/s ... MFU' line in bench_train's output")
        flops, mem = re.search(r"([\d.e+]+) FLOPs/token", output), re.search(r"peak mem ([\d.]+) GiB", output)
        return {"tok_per_s": int(m.group(1).replace(",", "")), "mfu": float(m.group(2)[:-1]) / 100 if m.group(2).endswith("%") else None,
                "flops_per_token": float(flops.group(1)) if flops else None, "peak_mem_GiB": float(mem.group(1)) if mem else None,
                "device_batch_size": B, "seq_len": s["speed_seq_len"]}

    return check


def check_infer_speed(ctx):
    """bench_infer: prefill and decode tokens/s of the engine at batch 1 and 32."""
    output = ctx.run("scripts.bench_infer", "--device-types", ctx.mode, *ctx.s["infer"])
    numbers, columns = {}, None
    for line in output.splitlines():  # the markdown table: columns found by their header names
        cells = [c.strip().replace(",", "") for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["hardware", "depth"]:
            columns = {name: i for i, name in enumerate(cells)}
        elif columns and len(cells) == len(columns) and cells[columns["batch"]].isdigit():
            row, cell = f"d{cells[columns['depth']]}_b{cells[columns['batch']]}", lambda name: int(cells[columns[name]])
            numbers |= {f"{row}_prefill_tok_s": cell("prefill tok/s"), f"{row}_decode_tok_s": cell("decode tok/s (model)"),
                        f"{row}_engine_decode_tok_s": cell("decode tok/s (engine)")}
    if not numbers:
        raise CheckFailed("no result rows in bench_infer's table")
    return numbers


def probe_check(name):
    """The check that runs probe `name` in its own process."""

    def check(ctx):
        return ctx.probe(name)

    check.__doc__ = PROBES[name].__doc__
    return check


# (name, function, checks it needs, timeout in seconds). Correctness first, then the stages in
# pipeline order, then the speed rows (the speedrun's depth first): when the budget runs out, what
# is left is skipped and named.
CHECKS = [
    ("environment", probe_check("environment"), (), 60),
    ("bf16_vs_fp32", probe_check("bf16_vs_fp32"), (), 90),
    ("fa3_vs_sdpa", probe_check("fa3_vs_sdpa"), (), 90),
    ("kv_cache", probe_check("kv_cache"), (), 90),
    ("tok_train", check_tok_train, (), 120),
    ("base_train", check_base_train, (), 180),
    ("base_eval", check_base_eval, ("base_train",), 120),
    ("mid_train", check_mid_train, ("base_train",), 120),
    ("chat_sft", check_chat_sft, ("mid_train",), 120),
    ("chat_rl", check_chat_rl, ("chat_sft",), 120),
    ("chat_eval", check_chat_eval, ("chat_sft",), 120),
    ("chat_cli", check_chat_cli, ("chat_sft",), 60),
    ("chat_web", check_chat_web, ("chat_sft",), 90),
    ("kill_resume", check_kill_resume, (), 180),
    ("compile", check_compile, (), 180),
    ("device_batch_size_auto", check_device_batch_size_auto, (), 120),
]
SPEED_TIMEOUT_S, INFER_TIMEOUT_S = 150, 120


def checks_for(mode):
    speed = [(f"train_speed_d{d}", speed_check(d), (), SPEED_TIMEOUT_S) for d in SIZES[mode]["speed_depths"]]
    return CHECKS + [("infer_speed", check_infer_speed, (), INFER_TIMEOUT_S)] + speed


def run_checks(ctx, checks, budget_s, inject):
    """Run the checks in order, each isolated; returns the list of result dicts."""
    t_end = time.monotonic() + budget_s
    results, status = [], {}
    for name, fn, needs, timeout_s in checks:
        t0 = time.monotonic()
        result = {"name": name, "status": "pass", "seconds": 0.0, "numbers": {}, "note": ""}
        missing = [n for n in needs if status.get(n) != "pass"]
        if missing:
            why = ", ".join(f"{n} ({status[n]})" if n in status else f"{n} (not run)" for n in missing)
            result |= {"status": "skipped", "note": f"needs {why}"}
        elif t_end - t0 < 5:
            result |= {"status": "skipped", "note": f"time budget of {budget_s:.0f}s spent"}
        else:
            ctx.begin(name, min(t0 + timeout_s, t_end), name in inject, budget_cut=t_end < t0 + timeout_s)
            print(f"== [{name}] (timeout {min(timeout_s, t_end - t0):.0f}s)", flush=True)
            try:
                result["numbers"] = fn(ctx) or {}
            except Skipped as e:
                result |= {"status": "skipped", "note": str(e)}
            except CheckFailed as e:
                result |= {"status": "fail", "note": str(e), "numbers": e.numbers}
            except Exception as e:  # noqa: BLE001 - a bug in one check must not stop the others
                result |= {"status": "fail", "note": f"{type(e).__name__}: {e}"}
            if result["status"] == "fail" and os.path.isfile(ctx.log_path):
                with open(ctx.log_path) as f:
                    result["log_tail"] = last_lines(f.read(), 25)
        result["seconds"] = round(time.monotonic() - t0, 1)
        status[name] = result["status"]
        results.append(result)
        print(f"== [{name}] {result['status']} in {result['seconds']}s {format_numbers(result['numbers'])} {result['note']}".rstrip(), flush=True)
    return results


# ------------------------------------------------------------------------------------------------
# Projections from the measured tokens/s (docs/gpu_check.md: the formulas and their assumptions).

UPSTREAM_GPT2_DEPTH = 24  # upstream nanochat's leaderboard: GPT-2-grade CORE between d24 and d26; its d24 baseline reached 0.2585
PROJECTION_GPUS = 8


def base_train_tokens(depth, ratio, vocab_size=65536, seq_len=2048):
    """Tokens base_train trains at this depth (the --depth derivation of nanochat/scaling.py, 8 ranks)."""
    import torch

    from nanochat.gpt import GPT, GPTConfig
    from nanochat.scaling import derive_training_hparams, num_scaling_params

    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab_size, seq_len))
    n = num_scaling_params(model)
    return n, derive_training_hparams(n, seq_len, PROJECTION_GPUS, ratio)["target_tokens"]


def projections(results):
    """The projection rows: the token horizons always (the --depth derivation), the hours only from a
    measured one-GPU tokens/s at that depth (a CUDA run). Never raises: a failure becomes the row's note."""
    speed = {r["name"]: r["numbers"] for r in results if r["name"].startswith("train_speed_d") and r["status"] == "pass"}
    out = []
    for label, depth, ratio in (("speedrun.sh base_train (d20, ratio 20)", 20, 20.0),
                                (f"GPT-2-grade CORE (d{UPSTREAM_GPT2_DEPTH}, ratio 20)", UPSTREAM_GPT2_DEPTH, 20.0),
                                (f"GPT-2-grade CORE (d{UPSTREAM_GPT2_DEPTH}, ratio 10.5)", UPSTREAM_GPT2_DEPTH, 10.5)):
        row = {"projection": label}
        try:
            row["scaling_params"], row["tokens"] = base_train_tokens(depth, ratio)
        except Exception as e:  # noqa: BLE001 - the report is written whatever happens here
            out.append(row | {"note": f"could not derive the horizon: {type(e).__name__}: {e}"})
            continue
        tok_s = speed.get(f"train_speed_d{depth}", {}).get("tok_per_s")
        if tok_s:
            row |= {"tok_per_s_1gpu": tok_s, "hours_8gpu": round(row["tokens"] / (PROJECTION_GPUS * tok_s) / 3600, 2),
                    "note": "PROJECTION: tokens / (8 x one-GPU tokens/s); linear scaling over 8 GPUs, no eval time"}
        else:
            row["note"] = f"n/a: needs train_speed_d{depth} (a CUDA run)"
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------
# Report


def format_numbers(numbers):
    def fmt(v):
        if v is None:
            return "n/a"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in numbers.items())


def write_report(out_dir, header, results, projected, logs_dir):
    os.makedirs(out_dir, exist_ok=True)
    failed = [r["name"] for r in results if r["status"] == "fail"]
    report = header | {"failed": failed, "checks": results, "projections": projected}
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# GPU check ({header['mode']} mode): {header['device']}", "",
             f"torch {header['torch']}, {header['date']}, commit {header['commit']}, wall {header['wall_s']:.0f}s of a {header['budget_s']:.0f}s budget", "",
             "| check | status | s | numbers / note |", "|---|---|---|---|"]
    for r in results:
        text = "; ".join(x for x in (format_numbers(r["numbers"]), r["note"]) if x).replace("|", "/")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {text} |")
    lines += ["", "## Projections (not measurements)", "", "| projection | hours on 8 GPUs | from | note |", "|---|---|---|---|"]
    for p in projected:
        source = f"{p['tokens']:,} tokens" if "tokens" in p else ""
        source += f" at {p['tok_per_s_1gpu']:,} tok/s/GPU" if "tok_per_s_1gpu" in p else ""
        lines.append(f"| {p['projection']} | {p.get('hours_8gpu', 'n/a')} | {source} | {p['note']} |")
    lines += ["", f"failed: {', '.join(failed) or 'none'}", ""]
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "gpu_check_logs.txt"), "w") as f:
        for r in results:
            path = os.path.join(logs_dir, f"{r['name']}.log")
            if os.path.isfile(path):
                with open(path) as g:
                    f.write(f"\n######## {r['name']} ({r['status']})\n{g.read()}")
    return failed


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "CPU"


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The one-GPU check: every stage, the GPU-only comparisons and the speed numbers, in ~8 minutes")
    p.add_argument("--cpu", action="store_true", help="the same checks at tiny sizes on CPU (what needs CUDA is skipped, saying so)")
    p.add_argument("--data-root", type=str, default=os.path.join(REPO, ".gpu_check_data"), help="the data slice (--prepare-data builds it)")
    p.add_argument("--out", type=str, default=None, help="results folder (default: <base_dir>/gpu_check)")
    p.add_argument("--work-dir", type=str, default=None, help="scratch base dir of the stages, wiped at the start (default: <base_dir>/gpu_check_work)")
    p.add_argument("--budget-s", type=float, default=None, help="global time budget in seconds (default: 480 on CUDA, 900 on CPU)")
    p.add_argument("--only", type=str, default=None, help="comma-separated checks to run (default: all); a needed check left out skips its dependents")
    p.add_argument("--list", action="store_true", help="print the checks and exit")
    p.add_argument("--prepare-data", type=str, default=None, metavar="DIR", help="build the data slice in DIR from --source-data and exit")
    p.add_argument("--source-data", type=str, default=None, help="full data root to slice (default: $NANOCHAT_DATA_ROOT, else <repo>/../shared/data)")
    p.add_argument("--inject-failure", action="append", default=[], help=argparse.SUPPRESS)  # test hook: make this check fail
    p.add_argument("--probe", type=str, default=None, choices=sorted(PROBES), help=argparse.SUPPRESS)  # internal: one in-process comparison
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    mode = "cpu" if args.cpu else "cuda"
    if args.probe:
        run_probe(args.probe, mode, args.probe in args.inject_failure)
        return 0
    if args.prepare_data:
        source = args.source_data or os.environ.get("NANOCHAT_DATA_ROOT") or os.path.join(REPO, "..", "shared", "data")
        prepare_data(os.path.abspath(source), os.path.abspath(args.prepare_data))
        return 0
    checks = checks_for(mode)
    names = [c[0] for c in checks]
    if args.list:
        for name, fn, needs, timeout_s in checks:
            print(f"{name} (timeout {timeout_s}s{', needs ' + ', '.join(needs) if needs else ''})")
        return 0
    if args.only:
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(only) - set(names))
        if unknown:
            sys.exit(f"error: --only: unknown check(s) {', '.join(unknown)}; known: {', '.join(names)}")
        checks = [c for c in checks if c[0] in only]
    bad = sorted(set(args.inject_failure) - set(names))
    if bad:
        sys.exit(f"error: --inject-failure: unknown check(s) {', '.join(bad)}")

    import torch  # after the argument checks: --list and --prepare-data stay fast

    if mode == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device is visible; run with --cpu for the CPU version of the check")
    data_root = os.path.abspath(args.data_root)
    for part in ("pretrain", "tasks", "chat", "eval/core", "words", "tokenizer/tokenizer.tiktoken"):
        if not os.path.exists(os.path.join(data_root, part)):
            sys.exit(f"error: {data_root} lacks {part}: build the slice with python -m scripts.gpu_check --prepare-data {data_root}")
    from nanochat.common import get_base_dir

    out_dir = os.path.abspath(args.out or os.path.join(get_base_dir(), "gpu_check"))
    work = os.path.abspath(args.work_dir or os.path.join(get_base_dir(), "gpu_check_work"))
    marker = os.path.join(work, ".gpu_check_work")
    if os.path.exists(work) and os.listdir(work) and not os.path.isfile(marker):
        sys.exit(f"error: --work-dir {work} is not empty and not a gpu_check work dir; it is wiped at the start, so give an empty or new one")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "logs"))
    open(marker, "w").close()
    shutil.copytree(os.path.join(data_root, "tokenizer"), os.path.join(work, "base", "tokenizer"))

    budget_s = args.budget_s or SIZES[mode]["budget_s"]
    print(f"gpu_check: {len(checks)} checks ({mode}), budget {budget_s:.0f}s, data {data_root}, work {work}", flush=True)
    t0 = time.monotonic()
    ctx = Context(mode, work, data_root)
    results = run_checks(ctx, checks, budget_s, set(args.inject_failure))
    env = next((r["numbers"] for r in results if r["name"] == "environment"), {})  # the harness itself never touches CUDA
    device = env.get("device", "a CUDA device") if mode == "cuda" else f"{cpu_name()}, {os.cpu_count()} cores"
    header = {"mode": mode, "device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(),
              "budget_s": budget_s, "wall_s": time.monotonic() - t0, "data_root": data_root, "sizes": SIZES[mode]}
    failed = write_report(out_dir, header, results, projections(results), os.path.join(work, "logs"))
    with open(os.path.join(out_dir, "gpu_check.md")) as f:
        print("\n" + f.read())
    print(f"results: {os.path.join(out_dir, 'gpu_check.json')} and gpu_check.md (logs: gpu_check_logs.txt)")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
