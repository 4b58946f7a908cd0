"""
What the training stages (base_train, mid_train, chat_sft, chat_rl) share, written once: the flags
(add_run_args), the run state (RunState: resume, save, stop, the step log, inherited settings),
train_step, device peak FLOPs for MFU, the auto device-batch-size search, the metrics log and RNG
state capture. Each script keeps its own flat loop and supplies only its data, loss and eval
(docs/new_stage.md shows a complete stage).
"""

import argparse
import atexit
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

from nanochat import report
from nanochat.checkpoint_manager import checkpoint_dir, find_latest_model_tag, list_steps, load_meta, load_model, load_tensor_file, load_weights, save_checkpoint
from nanochat.common import NanochatError, atomic_write_bytes, compute_cleanup, compute_init, get_base_dir, print0
from nanochat.lora import DEFAULT_TARGETS, LoraSpec, adapter_state_dict, apply_lora, lora_parameters
from nanochat.optim import apply_schedules, build_adapter_optimizer, build_optimizer
from nanochat.prepared import manifest_path
from nanochat.registry import RunRecorder, check_name, file_hash
from nanochat.scaling import EMBEDDING_LR, MATRIX_LR, SCALAR_LR, UNEMBEDDING_LR
from nanochat.tokenizer import get_tokenizer

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
    One JSON object per line appended to <run_dir>/metrics.jsonl (always), mirrored to wandb when
    a run name is given. Rank 0 only. RunState.track_log starts it empty or cuts it back on resume.
    """

    def __init__(self, run_dir, config, run=None, project="nanochat", rank=0):
        self.rank = rank
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        if rank != 0:
            return
        os.makedirs(run_dir, exist_ok=True)
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


def count_lines(path):
    """Lines in a text file (0 if it does not exist)."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def truncate_lines(path, n):
    """Keep the first n lines of an append-only log (atomically); n = 0 removes the file."""
    if not os.path.exists(path):
        return
    if n == 0:
        os.remove(path)
        return
    with open(path, "rb") as f:
        keep = [line for _, line in zip(range(n), f)]
    atomic_write_bytes(path, b"".join(keep))


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


def format_eta(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"


def train_step(model, optimizer, batches, normalize="rows"):
    """
    One optimizer step: forward and backward over the micro-batches `batches` (a list of
    (inputs, targets), int64 [B, T]; targets -1 are not trained), then optimizer.step(), which
    averages gradients over ranks. normalize:
      "rows":   every micro-batch's mean loss weighs the same (pretraining: every row has T targets);
      "tokens": the sum over trained tokens divided by their count over all micro-batches and ranks
                (chat data: rows hold very different numbers of assistant tokens, and a mean of
                per-row means would overweight short replies).
    Returns (loss, grad_norm): the step's loss averaged as above over every rank (0-D fp32 tensor
    on the device: reading it synchronises) and the optimizer's gradient norm.
    """
    ddp = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if ddp else 1
    if normalize == "tokens":
        n_targets = sum((y >= 0).sum() for _, y in batches)
        if ddp:
            dist.all_reduce(n_targets)
        n_targets = n_targets.clamp(min=1)
    elif normalize != "rows":
        raise ValueError(f"normalize must be 'rows' or 'tokens', got {normalize!r}")
    total = None
    for x, y in batches:
        if normalize == "rows":
            loss = model(x, y)
            (loss / len(batches)).backward()
        else:
            loss = model(x, y, loss_reduction="sum") / n_targets
            (loss * world_size).backward()  # the optimizer averages over ranks; the normaliser is global
        total = loss.detach() if total is None else total + loss.detach()
    grad_norm = optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if normalize == "rows":
        total = total / len(batches)
    if ddp:
        dist.all_reduce(total, op=dist.ReduceOp.AVG if normalize == "rows" else dist.ReduceOp.SUM)
    return total, grad_norm


# ------------------------------------------------------------------------------------------------
# The flags every training stage shares: one name and one meaning in base, mid, SFT and RL.

INHERITED = ("dtype", "matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "max_seq_len", "device_batch_size", "total_batch_size")
BASE_LRS = {"matrix_lr": MATRIX_LR, "embedding_lr": EMBEDDING_LR, "unembedding_lr": UNEMBEDDING_LR, "scalar_lr": SCALAR_LR}
# The adapters' AdamW learning rate, used as given at every depth: B starts at zero and one Adam step
# moves each factor entry by ~lr, so the update B @ A grows with r (fixed by alpha / r), not with
# width. 1e-3 is the usual LoRA rate for small models (Hu et al. 2021 used 2e-4 to 2e-3 on GPT-2).
LORA_LR = 1e-3


def add_run_args(p, parent, token_batches=True, **defaults):
    """
    Add the shared flags to the argparse parser p, in help groups. parent: the stage a run starts
    from (None for base). token_batches: the stage trains on rows of max_seq_len tokens (adds
    --max-seq-len and --total-batch-size). defaults: per-stage defaults by dest (e.g. eval_every=250).
    A value left None is inherited from the parent checkpoint (INHERITED) or derived by the stage.
    """
    inherit = f"default: the {parent} checkpoint's" if parent else "default"
    g = p.add_argument_group("run")
    g.add_argument("--config", type=str, default=None, help="YAML or JSON file of this stage's flags (keys: flag names, - or _); flags given on the command line win")
    g.add_argument("--device-type", type=str, default=None, choices=["cuda", "cpu", "mps"], help="default: autodetect")
    g.add_argument("--dtype", type=str, default=None, choices=["auto", "bfloat16", "float32"], help=f"compute dtype of activations ({inherit}; auto: bf16 on CUDA, fp32 elsewhere)")
    g.add_argument("--compile", type=int, default=None, help="torch.compile the model (default: 1 on CUDA, 0 elsewhere)")
    g.add_argument("--seed", type=int, default=42, help="seed of the initialisation, data order and samples")
    g.add_argument("--run", type=str, default=None, help="wandb run name (no wandb logging when not given)")
    g.add_argument("--name", type=str, default=None, help="run name in the run registry (default: e001, e002, ...; see docs/lab.md)")
    g.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name" + (f" of the output, and of the {parent} source unless --source-tag (default: --source-tag, else the latest {parent})" if parent else ""))
    if parent:
        g.add_argument("--source-tag", type=str, default=None, help=f"model tag of the {parent} checkpoint to start from, when the output goes to another tag (--model-tag)")
    if parent:
        g.add_argument("--step", type=int, default=None, help=f"step of the {parent} checkpoint to start from (default: its last)")
    g = p.add_argument_group("horizon and batch")
    g.add_argument("--num-iterations", type=int, default=None, help="optimizer steps (default: derived; with --resume, a new horizon)")
    g.add_argument("--device-batch-size", type=str, default=None, help=f"rows per micro-batch per device ({inherit}; base: 32, or 'auto': the largest that fits)")
    if token_batches:
        g.add_argument("--max-seq-len", type=int, default=None, help=f"tokens per row ({inherit})")
        g.add_argument("--total-batch-size", type=int, default=None, help=f"tokens per optimizer step, all ranks: rows x max_seq_len ({inherit}; base: derived)")
    g = p.add_argument_group("optimizer (LRs of AdamW at n_embd 768, scaled as n_embd^-0.5)")
    for name, value in BASE_LRS.items():
        g.add_argument("--" + name.replace("_", "-"), type=float, default=None, help=f"base learning rate ({inherit}; base: {value})")
    if parent:
        g.add_argument("--init-lr-frac", type=float, default=1.0, help="peak LRs of this stage as a fraction of the base learning rates")
        g.add_argument("--dropout", type=float, default=0.0, help="residual dropout while training (fine-tuning on small data; 0: none)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of the Muon matrices")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear LR warmup")
    g.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of linear LR warmdown at the end")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end of warmdown, as a fraction of the peak")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm to this (0: no clipping)")
    if parent:
        g = p.add_argument_group("LoRA adapters (docs/finetune.md): train low-rank updates of a frozen model")
        g.add_argument("--lora-rank", type=int, default=0, help="rank r of the adapters (0: full fine-tuning, no adapters)")
        g.add_argument("--lora-alpha", type=float, default=None, help="the adapters' updates are scaled by alpha / r (default: r, a scale of 1)")
        g.add_argument("--lora-targets", type=str, default=None, help=f"Linears of every block to adapt, comma-separated: q,k,v,o (attention), fc, down (MLP) (default: {DEFAULT_TARGETS})")
        g.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input while training (default: 0)")
        g.add_argument("--lora-lr", type=float, default=None, help=f"peak AdamW learning rate of the adapters, under the stage's LR schedule; --init-lr-frac does not apply (default: {LORA_LR})")
    g = p.add_argument_group("evaluation and checkpoints (-1 disables a periodic action)")
    g.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (-1: only at the end)")
    g.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints of this run kept (older ones are deleted)")
    g.add_argument("--resume", action="store_true", help="continue this model tag's run from its latest checkpoint")
    g.add_argument("--resume-if-exists", action="store_true", help="--resume when this stage has a checkpoint, else start fresh (recipes re-run after a failure)")
    g.add_argument("--overwrite", action="store_true", help="start fresh and delete the run already in this model tag")
    g.add_argument("--early-stop-patience", type=int, default=0, help="stop after this many evaluations without improvement (0: never); the best checkpoint is kept")
    g.add_argument("--early-stop-min-delta", type=float, default=0.0, help="the smallest change of the validation metric that counts as an improvement")
    g.add_argument("--divergence-threshold", type=float, default=None, help="stop as soon as the validation metric is worse than this")
    g.add_argument("--stop-at-step", type=int, default=-1, help=argparse.SUPPRESS)  # test hook: act as if SIGTERM arrived
    g.add_argument("--nan-at-step", type=int, default=-1, help=argparse.SUPPRESS)  # test hook: a NaN loss at this step
    p.set_defaults(**defaults)


def load_config(path, p):
    """
    The flag values of a --config file (.json, .yaml or .yml: a mapping of flag names, with - or _,
    to values) as argparse defaults for parser p: {dest: value}, each value checked against its
    flag's type and choices. Raises NanochatError naming the file and the key at fault.
    """
    if not os.path.isfile(path):
        raise NanochatError(f"--config: no such file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                config = yaml.safe_load(f)
            else:
                config = json.load(f)
    except Exception as e:  # noqa: BLE001 - json's ValueError and yaml.YAMLError share no base
        raise NanochatError(f"{path}: not a valid config file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise NanochatError(f"{path}: expected a mapping of flag names to values, got a {type(config).__name__}")
    actions = {a.dest: a for a in p._actions if a.option_strings and a.dest not in ("help", "config")}
    values = {}
    for key, value in config.items():
        dest = str(key).removeprefix("--").replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise NanochatError(f"{path}: unknown key {key!r} (not a flag of this stage; see --help)")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise NanochatError(f"{path}: key {key!r} takes true or false, got {value!r}")
        elif value is not None:
            if isinstance(value, (dict, list, bool)) and action.type is not str:
                raise NanochatError(f"{path}: key {key!r} takes one value, got {value!r}")
            try:
                value = action.type(value) if action.type is not None else value
            except (TypeError, ValueError):
                raise NanochatError(f"{path}: key {key!r}: {value!r} is not a valid {getattr(action.type, '__name__', 'value')}") from None
            if action.choices is not None and value not in action.choices:
                raise NanochatError(f"{path}: key {key!r}: {value!r} is not one of {', '.join(map(str, action.choices))}")
        values[dest] = value
    return values


def parse_run_args(p, argv=None):
    """
    p.parse_args(argv), with the values of --config FILE as defaults (flags on the command line
    win; args.config_values records what the file set), then the range checks of the shared
    flags: NanochatError naming the flag.
    """
    args = p.parse_args(argv)
    args.config_values = None
    if args.config:
        values = load_config(args.config, p)
        p.set_defaults(**values)
        args = p.parse_args(argv)
        args.config_values = values
    if args.device_batch_size not in (None, "auto"):
        try:
            args.device_batch_size = int(args.device_batch_size)
        except ValueError:
            raise NanochatError(f"--device-batch-size must be an integer or 'auto', got {args.device_batch_size!r}") from None
    ok = lambda name, test: getattr(args, name, None) is None or test(getattr(args, name))  # noqa: E731
    checks = [(n, lambda v: v >= 1) for n in ("num_iterations", "max_seq_len", "total_batch_size")]
    checks += [("device_batch_size", lambda v: v == "auto" or v >= 1), ("step", lambda v: v >= 0), ("keep_last", lambda v: v >= 1), ("early_stop_patience", lambda v: v >= 0)]
    checks += [("early_stop_min_delta", lambda v: v >= 0 and math.isfinite(v)), ("divergence_threshold", math.isfinite)]
    checks += [(n, lambda v: v >= 0 and math.isfinite(v)) for n in (*BASE_LRS, "weight_decay", "grad_clip")]
    checks += [(n, lambda v: 0 <= v <= 1) for n in ("warmup_ratio", "warmdown_ratio", "final_lr_frac")] + [("dropout", lambda v: 0 <= v < 1)]
    checks += [("init_lr_frac", lambda v: 0 < v < math.inf)] + [(n, lambda v: v == -1 or v >= 1) for n in ("eval_every", "save_every")]
    for name, test in checks:
        if not ok(name, test):
            raise NanochatError(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range")
    if getattr(args, "lora_rank", 0) < 0:
        raise NanochatError(f"--lora-rank {args.lora_rank} is out of range (0: no adapters)")
    lora_flags = [f for f in ("lora_alpha", "lora_targets", "lora_dropout", "lora_lr") if getattr(args, f, None) is not None]
    if lora_flags and not args.lora_rank:
        raise NanochatError(f"--{lora_flags[0].replace('_', '-')} needs --lora-rank (adapters are off without it)")
    if getattr(args, "lora_rank", 0):
        lora_spec(args)  # NanochatError naming the flag: --lora-alpha, --lora-targets, --lora-dropout
        if not (args.lora_lr is None or 0 < args.lora_lr < math.inf):
            raise NanochatError(f"--lora-lr {args.lora_lr} is out of range")
    if args.warmup_ratio + args.warmdown_ratio > 1:
        raise NanochatError(f"--warmup-ratio {args.warmup_ratio} + --warmdown-ratio {args.warmdown_ratio} is above 1")
    if args.resume and args.overwrite:
        raise NanochatError("--resume and --overwrite contradict each other: give one")
    if args.name is not None:
        check_name(args.name, "--name")
    return args


def lora_spec(args):
    """The LoraSpec of the --lora-* flags, None without --lora-rank. Raises NanochatError naming the flag."""
    if not getattr(args, "lora_rank", 0):
        return None
    alpha = float(args.lora_rank) if args.lora_alpha is None else args.lora_alpha
    targets = DEFAULT_TARGETS if args.lora_targets is None else args.lora_targets
    return LoraSpec(args.lora_rank, alpha, targets, args.lora_dropout or 0.0)


# ------------------------------------------------------------------------------------------------
# The run state: what every training stage shares (shaped like torchtitan's CheckpointManager).

REPORT_NAMES = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft", "rl": "chat_rl"}
# The data recipe a stage reads when --recipe is not given (mid_train, chat_sft): its hash goes to the run registry.
RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks", "recipes")


class _Interrupt(BaseException):
    """Raised by the signal handler inside an interruptible section (an evaluation, sampling)."""


class RunState:
    """
    The skeleton of a training stage, owned once: compute init, the checkpoint directory and its
    rules, resume, inherited settings, the LR schedule, the step log, stop on a signal, save.

        run = RunState("mid", args, parent="base")        # compute_init, tokenizer, resume or refuse
        model = run.load_model()                           # own checkpoint when resuming, else the parent's
        ...                                                # the stage's data, optimizer
        run.start(model, optimizer, loader)                # load optimizer / loader / RNG state on resume
        def evaluate():
            with run.evaluating(): ...                     # eval mode, interruptible, RNG untouched
            return run.early_stop(val)                     # True: --early-stop-patience / --divergence-threshold
        for step in run.steps(num_iterations):             # LR schedule set; save every --save-every
            if run.due(args.eval_every) and evaluate():
                break
            loss, grad_norm = run.train_step(batches)
            run.log_step(loss, tokens)
        else:
            evaluate()                                     # final evaluation
        run.finish(metric=...)                             # final checkpoint, registry, report card, clean-up

    Rules: a fresh run refuses a model tag that holds another run's checkpoints unless --overwrite
    (or --resume); keep-last pruning deletes only this run's steps; SIGTERM / SIGINT (or
    --stop-at-step) save the current step and exit 143 / 130, within seconds: at the end of the
    step being trained, at once during an evaluation or sampling (one process; under DDP at the next
    step boundary, where the ranks agree); a NaN/inf loss stops with exit 1 and keeps the last good
    checkpoint; every checkpoint pins the tokenizer (its fingerprint, checked on load and resume);
    append-only logs (metrics.jsonl, track_log files) are cut back to their length at the
    checkpoint on resume. Checkpoint meta: stage, model_tag, step, run_id, parent, tokenizer,
    model_config, lora (a LoRA run's rank, alpha, targets, dropout; None otherwise: nanochat/lora.py,
    its step holds the adapter instead of model.pt), args, resolved (every setting as used, inherited
    by the next stage), loop_state, rng_state and dataloader_state (per rank).

    Run registry (nanochat.registry, rank 0; an error there is one warning line, never a stop):
    start() registers the run under its run_id (name: --name, else e001, e002, ...; run/run.json
    holds the same record), log() rows with val_bpb / val_loss / core / eval_pass@k become evals,
    every save() updates the wall time, and the run ends "done" (finish(), with its metrics as the
    summary and end_reason, e.g. an early stop, as the reason), "stopped" (a signal or
    --stop-at-step) or "failed" (the process exits otherwise); a process that dies unseen (SIGKILL)
    is found "killed" by the next reader.
    """

    def __init__(self, stage, args, parent=None, model_tag=None):
        self.stage, self.args, self.parent = stage, args, parent
        self.ddp, self.rank, _, self.world_size, self.device = compute_init(args.device_type, seed=args.seed)
        print0(json.dumps(vars(args)))
        self.tokenizer = get_tokenizer()
        self.tokenizer_fp = self.tokenizer.fingerprint()
        source_tag = getattr(args, "source_tag", None)
        self.model_tag = args.model_tag or model_tag or source_tag or find_latest_model_tag(stage if args.resume else parent)
        self.source_tag = source_tag or self.model_tag  # the parent's tag (a fresh run; a resumed one reads it from its meta)
        self.ckpt_dir = checkpoint_dir(stage, self.model_tag)
        steps = list_steps(self.ckpt_dir)
        self.resuming = args.resume or (args.resume_if_exists and bool(steps))
        if args.resume and not steps:
            raise NanochatError(f"--resume: no {stage} checkpoint in {self.ckpt_dir}")
        if steps and not self.resuming and not args.overwrite:
            raise NanochatError(f"{self.ckpt_dir} holds a {stage} run (steps {steps[0]}..{steps[-1]}); continue it with --resume or replace it with --overwrite")
        if self.rank == 0:
            if steps and args.overwrite:
                shutil.rmtree(self.ckpt_dir)
            try:  # fail now, not at the first save hours in
                os.makedirs(self.ckpt_dir, exist_ok=True)
                atomic_write_bytes(os.path.join(self.ckpt_dir, ".write_test"), b"")
                os.remove(os.path.join(self.ckpt_dir, ".write_test"))
            except OSError as e:
                raise NanochatError(f"cannot write checkpoints to {self.ckpt_dir}: {e.strerror}") from None
        self.meta = load_meta(self.ckpt_dir, steps[-1]) if self.resuming else {}
        if self.resuming:
            self._check_tokenizer(self.meta, self.ckpt_dir)
        self.start_step = self.step = self.meta.get("step", 0)
        self.run_id = self.meta.get("run_id") or uuid.uuid4().hex[:12]
        self.loop = dict(self.meta.get("loop_state", {}))
        self.parent_info = self.meta.get("parent")
        self.lora = self._lora()
        self.resolved, self._inherit = {}, dict(self.meta.get("resolved", {}))
        self.model = self.optimizer = self.loader = self.train_model = None
        self.total_time, self.lrm, self._saved_step, self._logs = self.loop.get("total_time", 0.0), 1.0, None, {}
        self.stop_reason, self._exit_code, self._interruptible = None, 0, False
        self.end_reason, self.recorder, self._failure = None, None, None
        self._old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    # ---------------------------------------------------------------------------------- set-up

    def _check_tokenizer(self, meta, where):
        pinned, ours = meta.get("tokenizer"), self.tokenizer_fp
        if pinned is not None and pinned != ours:
            raise NanochatError(f"the tokenizer in {get_base_dir()}/tokenizer (fingerprint {ours}) is not the one {where} was trained with ({pinned})")

    def _lora(self):
        """This run's LoraSpec (None: full fine-tuning): the --lora-* flags; when resuming, the
        checkpoint's (flags given again must agree)."""
        wanted = lora_spec(self.args)
        if not self.resuming:
            return wanted
        saved = LoraSpec(**self.meta["lora"]) if self.meta.get("lora") else None
        if wanted is not None and wanted != saved:
            held = f"a LoRA run ({saved.to_dict()})" if saved else "a full fine-tuning run"
            raise NanochatError(f"--resume: {self.ckpt_dir} holds {held}; the --lora-* flags ask for {wanted.to_dict()}")
        return saved

    def load_model(self):
        """The model to train (fp32 weights, train mode): this run's latest checkpoint when
        resuming, else the parent stage's checkpoint of this model tag (--step, default its last).
        A LoRA run (--lora-rank): the parent's weights frozen, with trainable adapters on top."""
        if self.resuming:  # a LoRA run: its parent's weights and this run's adapter, unmerged
            model, _ = load_weights(self.stage, self.model_tag, self.start_step, self.device, merge=False)
        else:
            model, _, meta = load_model(self.parent, self.device, model_tag=self.source_tag, step=self.args.step)
            self._inherit = {k: v for k, v in (meta.get("resolved") or meta.get("hparams", {})).items() if k in INHERITED}
            self.parent_info = {"stage": self.parent, "model_tag": self.source_tag, "step": meta["step"]}
            into = f", into {self.stage} {self.model_tag}" if self.source_tag != self.model_tag else ""
            print0(f"{self.stage}: starting from the {self.parent} model {self.source_tag} (step {meta['step']}){into}")
            if self.lora is not None:
                apply_lora(model, self.lora)
        if self.lora is not None:
            trainable = sum(p.numel() for p in lora_parameters(model))
            print0(f"LoRA {self.lora.to_dict()}: {trainable:,} trainable parameters of {model.num_params():,} ({100 * trainable / model.num_params():.2f}%)")
        return model.set_dropout(getattr(self.args, "dropout", 0.0)).train()

    def build_optimizer(self, model):
        """The optimizer of this run: MuonAdamW over the whole model (nanochat.optim.build_optimizer,
        at the resolved base learning rates x --init-lr-frac), or for a LoRA run AdamW over the
        adapters only (build_adapter_optimizer at --lora-lr): no optimizer state for frozen weights."""
        a = self.args
        if self.lora is not None:
            return build_adapter_optimizer(lora_parameters(model), lr=self.resolve("lora_lr", LORA_LR), grad_clip=a.grad_clip)
        lrs = self.learning_rates(getattr(a, "init_lr_frac", 1.0))
        return build_optimizer(model, **lrs, weight_decay=self.resolve("weight_decay"), model_dim=model.config.n_embd, grad_clip=a.grad_clip)

    def resolve(self, name, default=None):
        """A setting: its flag if given, else the resumed run's or (INHERITED only) the parent
        checkpoint's value, else default. Recorded in the checkpoint meta's "resolved"."""
        value = getattr(self.args, name, None)
        self.resolved[name] = self._inherit.get(name, default) if value is None else value
        return self.resolved[name]

    def compute_dtype(self):
        """The resolved --dtype as a torch dtype (auto: bf16 on CUDA, fp32 elsewhere)."""
        dtype = self.resolve("dtype", "auto")
        if dtype == "auto":
            self.resolved["dtype"] = dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        return getattr(torch, dtype)

    def learning_rates(self, init_lr_frac=1.0):
        """build_optimizer's LR arguments: the resolved base learning rates times init_lr_frac."""
        return {name: init_lr_frac * self.resolve(name, value) for name, value in BASE_LRS.items()}

    def track_log(self, path):
        """An append-only file of this run (rank 0): removed on a fresh start, cut back on resume."""
        self._logs[path] = os.path.basename(path)
        if self.rank == 0:
            truncate_lines(path, self.loop.get("log_lines", {}).get(self._logs[path], 0) if self.resuming else 0)
        return path

    def start(self, model, optimizer, loader=None):
        """Attach the stateful objects; on resume load their state (base: the weights too)."""
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.compile(model)
        self.flops_per_token = model.estimate_flops()
        self.peak_flops = get_peak_flops(self.device)
        if self.resuming:
            path = os.path.join(self.ckpt_dir, f"step_{self.start_step:06d}")
            if self.parent is None:
                if self.meta["model_config"] != model.config.to_dict():
                    raise NanochatError(f"--resume: the checkpoint in {self.ckpt_dir} has another model config; give the same model flags")
                model.load_state_dict(load_tensor_file(os.path.join(path, "model.pt"), self.device))
            optimizer.load_state_dict(load_tensor_file(os.path.join(path, f"optim_rank{self.rank}.pt"), self.device))
            if len(self.meta["rng_state"]) != self.world_size:
                raise NanochatError(f"--resume: {path} was written by {len(self.meta['rng_state'])} ranks, this run has {self.world_size}")
            if loader is not None:
                loader.load_state_dict(self.meta["dataloader_state"][self.rank])
            set_rng_state(self.meta["rng_state"][self.rank])
            print0(f"resumed from {path} at step {self.start_step}")
        self.logger = MetricsLogger(os.path.join(self.ckpt_dir, "run"), vars(self.args) | self.resolved, self.args.run, rank=self.rank)
        self.track_log(self.logger.path)
        if self.rank == 0:  # training evals are reloaded from the log as it was cut back
            self.recorder = RunRecorder(os.path.dirname(self.logger.path))
            self.recorder.start(self._run_record(), self.logger.path)
            atexit.register(self._on_exit)

    def _run_record(self):
        """This run's row of the run registry (nanochat.registry.RUN_COLUMNS; the recorder adds
        host, pid, times and status)."""
        parent, parent_run_id, git = self.parent_info or {}, None, report.git_info()
        if parent:
            with contextlib.suppress(NanochatError):
                parent_run_id = load_meta(checkpoint_dir(parent["stage"], parent["model_tag"]), parent["step"]).get("run_id")
        # --prepared NAME: the prepared set's manifest stands for the data (it hashes the recipe, sources and data)
        prepared = getattr(self.args, "prepared", None)
        recipe = manifest_path(prepared) if prepared else getattr(self.args, "recipe", None) or os.path.join(RECIPES_DIR, f"{self.stage}.json")
        recipe = os.path.abspath(recipe) if os.path.isfile(recipe) else None
        device = self.device.type + (f" {torch.cuda.get_device_name(self.device)}" if self.device.type == "cuda" else "")
        return {
            "id": self.run_id, "name": self.args.name, "stage": self.stage, "model_tag": self.model_tag, "ckpt_dir": os.path.abspath(self.ckpt_dir),
            "parent_stage": parent.get("stage"), "parent_tag": parent.get("model_tag"), "parent_step": parent.get("step"),
            "parent_run_id": parent_run_id,
            "config": vars(self.args) | self.resolved, "git_commit": git["commit"], "git_dirty": git["dirty"], "tokenizer": self.tokenizer_fp,
            "recipe_path": recipe, "recipe_hash": file_hash(recipe) if recipe else None, "flops_per_token": self.flops_per_token,
            "device": device, "world_size": self.world_size,
        }

    # ---------------------------------------------------------------------------------- the loop

    def steps(self, num_iterations):
        """
        Yields the steps to train, start_step .. num_iterations - 1, with the LR schedule (and
        Muon momentum) set for each. After each step: a requested stop saves and exits; every
        --save-every steps a checkpoint.
        """
        a = self.args
        self.num_iterations = self.resolved["num_iterations"] = num_iterations
        if self.start_step > num_iterations:
            raise NanochatError(f"--num-iterations {num_iterations} is before the resumed step {self.start_step}")
        while self.step < num_iterations:
            self.lrm, _ = apply_schedules(self.optimizer, self.step, num_iterations=num_iterations, warmup_ratio=a.warmup_ratio, warmdown_ratio=a.warmdown_ratio, final_lr_frac=a.final_lr_frac)
            self._sync()
            self._t0, self._eval_time = time.perf_counter(), 0.0
            yield self.step
            self.step += 1
            if self.step == a.stop_at_step and self.stop_reason is None:
                self.stop_reason, self._exit_code = "--stop-at-step", 128 + signal.SIGTERM
            if self.ddp:  # every rank stops at the same step, whichever got the signal
                code = torch.tensor(self._exit_code, device=self.device)
                dist.all_reduce(code, op=dist.ReduceOp.MAX)
                if code.item() and self.stop_reason is None:
                    self.stop_reason, self._exit_code = "a signal on another rank", code.item()
            if self.stop_reason is not None:
                self._save_and_exit()
            if self.step < num_iterations and self.due(a.save_every):
                self.save()

    def due(self, every, at_start=False):
        """True if a periodic action with period `every` (-1: never) is due at the current step;
        at step 0 only when at_start (an evaluation before training, whatever the period)."""
        if self.step == self.loop.get("evaluated_step"):  # saved as the best right after its evaluation
            return False
        if self.step == 0:
            return at_start
        return every > 0 and self.step % every == 0

    def early_stop(self, value, higher_is_better=False):
        """
        After an evaluation of the validation metric `value`: track the best value (loop state,
        so resume-safe) and, with --early-stop-patience, checkpoint each new best (never pruned).
        Returns True when training should stop: --early-stop-patience evaluations in a row without
        an improvement of more than --early-stop-min-delta, or a value worse than
        --divergence-threshold. A NaN value (nothing measured) is skipped. The semantics of Lightning's EarlyStopping callback.
        """
        a, sign = self.args, 1 if higher_is_better else -1
        if not math.isfinite(value):  # nothing measured (e.g. no trained token held out); a NaN loss stops in log_step
            return False
        best = self.loop.get("best")
        if best is None or sign * (value - best["value"]) > a.early_stop_min_delta:
            self.loop.update(best={"step": self.step, "value": value}, bad_evals=0)
            if a.early_stop_patience > 0 and self.step > self.start_step:
                self.loop["evaluated_step"] = self.step
                self.save()
        else:
            self.loop["bad_evals"] = self.loop.get("bad_evals", 0) + 1
        thr = a.divergence_threshold
        if thr is not None and sign * (value - thr) < 0:
            self.end_reason = f"diverged: validation metric {value:.4g} is past --divergence-threshold {thr}"
        elif a.early_stop_patience and self.loop["bad_evals"] >= a.early_stop_patience:
            best = self.loop["best"]
            self.end_reason = f"early stop: no improvement in {a.early_stop_patience} evaluations; best {best['value']:.4g} at step {best['step']}"
        if self.end_reason:
            print0(f"step {self.step:05d} | {self.end_reason}")
        return self.end_reason is not None

    def train_step(self, batches, normalize="rows"):
        """train_step() with this run's model and optimizer; see there."""
        return train_step(self.train_model, self.optimizer, batches, normalize)

    def compile(self, model):
        """The model the training steps run: torch.compile'd per --compile (default: on CUDA)."""
        if self.train_model is None:
            use_compile = self.args.compile if self.args.compile is not None else self.device.type == "cuda"
            self.train_model = torch.compile(model, dynamic=False) if use_compile else model
        return self.train_model

    def log_step(self, loss, tokens, flops=None, show=(), **metrics):
        """
        After a step: stop on a NaN/inf loss, then one step-log line (loss, lr, `show` metrics,
        time, tokens/s, MFU, ETA) and one metrics row. tokens: tokens processed by the step (all
        ranks), for tokens/s and MFU; flops: the step's FLOPs when not flops_per_token * tokens.
        """
        loss = float("nan") if self.step == self.args.nan_at_step else float(loss)
        if not math.isfinite(loss):
            self._failure = f"loss is {loss} at step {self.step}"
            raise NanochatError(f"{self._failure}; stopping. The last good checkpoint is kept in {self.ckpt_dir}")
        self._sync()
        dt = time.perf_counter() - self._t0 - self._eval_time
        step, timed = self.step + 1, self.step - self.start_step
        if timed > 0:  # the first step of a process includes compilation and warm-up
            self.total_time += dt
        smooth = self.loop["smooth_loss"] = 0.9 * self.loop.get("smooth_loss", 0.0) + 0.1 * loss
        mfu = (flops or self.flops_per_token * tokens) / dt / (self.peak_flops * self.world_size) if self.peak_flops else None
        eta = (self.num_iterations - step) * (self.total_time / timed if timed else dt)
        extra = "".join(f"{k} {metrics[k]:.4g} | " for k in show)
        print0(
            f"step {step:05d}/{self.num_iterations} | loss {smooth / (1 - 0.9**step):.4f} | lr x{self.lrm:.3f} | {extra}{dt * 1000:.0f} ms | "
            f"{tokens / dt:,.0f} tok/s | MFU {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} | eta {format_eta(eta)}"
        )
        self.log({"step": step, "loss": loss, "lr_mult": self.lrm, "dt": dt, "tok_per_s": tokens / dt, "mfu": mfu, "time": self.total_time} | metrics)

    def log(self, row):
        """One metrics row (rank 0 writes it); its evaluation keys also go to the run registry."""
        self.logger.log(row)
        if self.recorder is not None:
            self.recorder.log(row)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------------------------- evaluation, stop

    @contextlib.contextmanager
    def interruptible(self):
        """A section a stop signal may cut short (one process): it saves the current step and
        exits. The RNG streams are forked, so the section does not change the training run's."""
        if self.stop_reason is not None and not self.ddp:  # under DDP the ranks agree at the step boundary
            self._save_and_exit()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self._interruptible = not self.ddp
            try:
                yield
            except _Interrupt:
                self._interruptible = False
                self._save_and_exit()
            finally:
                self._interruptible = False

    @contextlib.contextmanager
    def evaluating(self):
        """An evaluation: eval mode, interruptible, its time left out of the step's."""
        t0 = time.perf_counter()
        self.model.eval()
        try:
            with self.interruptible():
                yield
        finally:
            self.model.train()
            self._eval_time += time.perf_counter() - t0

    def _on_signal(self, signum, frame):
        if self.stop_reason is not None:  # a second signal: give up at once, without saving
            raise KeyboardInterrupt
        self.stop_reason, self._exit_code = signal.Signals(signum).name, 128 + signum
        print0(f"{self.stop_reason}: saving a checkpoint of step {self.step} before exiting")
        if self._interruptible:
            raise _Interrupt

    def _save_and_exit(self):
        path = self.save()
        print0(f"{self.stop_reason}: checkpoint saved at step {self.step} ({path}); continue with --resume")
        if self.recorder is not None:
            self.recorder.end("stopped", stop_reason=self.stop_reason, summary=report.summarize_metrics(self.logger.path))
        self.close()
        sys.exit(self._exit_code)

    # ---------------------------------------------------------------------------------- save, finish

    def gather(self, obj):
        """Every rank's obj as a list indexed by rank (rank 0 writes the meta)."""
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def save(self):
        """Checkpoint the current step (every rank calls this). Returns its directory."""
        if self._saved_step == self.step:
            return os.path.join(self.ckpt_dir, f"step_{self.step:06d}")
        self.loop.update(total_time=self.total_time, log_lines={name: count_lines(path) for path, name in self._logs.items()})
        meta = {
            "stage": self.stage,
            "model_tag": self.model_tag,
            "step": self.step,
            "run_id": self.run_id,
            "parent": self.parent_info,
            "tokenizer": self.tokenizer_fp,
            "model_config": self.model.config.to_dict(),
            "lora": self.lora.to_dict() if self.lora is not None else None,
            "args": vars(self.args),
            "resolved": self.resolved,
            "loop_state": self.loop,
            "rng_state": self.gather(get_rng_state()),
        }
        if self.loader is not None:
            meta["dataloader_state"] = self.gather(self.loader.state_dict())
        model_state = adapter_state_dict(self.model) if self.lora is not None else self.model.state_dict()
        path = save_checkpoint(self.ckpt_dir, self.step, model_state, self.optimizer.state_dict(), meta, rank=self.rank, keep_last=self.args.keep_last, run_id=self.run_id, protect=self.loop.get("best", {}).get("step") if self.args.early_stop_patience else None)
        self._saved_step = self.step
        print0(f"saved checkpoint {path}")
        if self.recorder is not None:  # the wall time so far and the settings resolved since start()
            self.recorder.update(config=vars(self.args) | self.resolved)
        return path

    def finish(self, **metrics):
        """The end of a completed run: final checkpoint, final metrics row, report card, clean-up."""
        self.save()
        metrics["train_time_s"] = self.total_time
        self.log({"step": self.step} | metrics)
        report.log_stage(REPORT_NAMES.get(self.stage, self.stage), args=vars(self.args), metrics=metrics, metrics_file=self.logger.path)
        if self.recorder is not None:
            self.recorder.end("done", stop_reason=self.end_reason, summary=report.summarize_metrics(self.logger.path) | metrics)
        print0(f"training time {self.total_time:.1f}s")
        self.close()

    def _on_exit(self):
        """atexit, rank 0: the process ends with neither finish() nor a saved stop: the run failed
        (the reason: a NaN loss, an uncaught exception, or see stderr), or a second signal gave up."""
        if self.stop_reason is not None:
            status, reason = "stopped", f"{self.stop_reason}, exited without saving"
        else:
            e = getattr(sys, "last_value", None)  # the interpreter sets it for an uncaught exception before atexit runs
            uncaught = f"{type(e).__name__}: {e}".splitlines()[0] if e is not None else None
            status, reason = "failed", self._failure or uncaught or "exited before finish() (the error is on stderr)"
        self.recorder.end(status, stop_reason=reason, summary=report.summarize_metrics(self.logger.path))

    def close(self):
        atexit.unregister(self._on_exit)
        self.logger.finish()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        compute_cleanup()
