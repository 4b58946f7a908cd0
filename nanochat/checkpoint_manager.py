"""
The one checkpoint format and the one place that maps a training stage to its directory.

    <base_dir>/checkpoints/<stage>/<model_tag>/step_<step:06d>/
        model.pt            model state_dict (fp32 tensors, torch.save, loaded with weights_only=True)
        optim_rank<r>.pt    rank r's optimizer state (the optimizer state is sharded across ranks)
        meta.json           model config, args, step, loop/dataloader state, RNG states, ...

A LoRA run's step (meta["lora"]: rank, alpha, targets, dropout) holds its adapter in PEFT's layout
(nanochat/lora.py) instead of model.pt: adapter_config.json + adapter_model.safetensors. Its
weights are those of meta["parent"] (stage, model_tag, step; itself possibly a LoRA checkpoint)
plus the adapter, which load_model merges.

A checkpoint is written into `step_XXXXXX.tmp/` and renamed into place once every file is
complete, so a directory without the .tmp suffix is always whole; a crash mid-save loses nothing.
"""

import glob
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from nanochat.common import NanochatError, atomic_write_bytes, get_base_dir

# The stages and their directories, checkpoints/<stage>/<model_tag>/, in pipeline order: rsft
# (rejection-sampling fine-tuning, scripts/chat_rsft.py) and rl (GRPO, scripts/chat_rl.py) both start
# from sft (or mid); rl may also start from rsft.
STAGES = ("base", "mid", "sft", "rsft", "rl")


def stage_dir(stage, base_dir=None):
    if stage not in STAGES:
        raise NanochatError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return os.path.join(base_dir or get_base_dir(), "checkpoints", stage)


def checkpoint_dir(stage, model_tag, base_dir=None):
    return os.path.join(stage_dir(stage, base_dir), model_tag)


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def list_steps(ckpt_dir):
    """Steps of the complete checkpoints in ckpt_dir, ascending."""
    steps = []
    for path in glob.glob(os.path.join(ckpt_dir, "step_*")):
        m = re.fullmatch(r"step_(\d+)", os.path.basename(path))
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(ckpt_dir):
    steps = list_steps(ckpt_dir)
    if not steps:
        raise NanochatError(f"no checkpoint found in {ckpt_dir}")
    return steps[-1]


def find_latest_model_tag(stage, base_dir=None):
    """The model_tag under a stage whose newest checkpoint was written last."""
    root = stage_dir(stage, base_dir)
    tags = [t for t in (os.listdir(root) if os.path.isdir(root) else []) if list_steps(os.path.join(root, t))]
    if not tags:
        raise NanochatError(f"no {stage} checkpoint found under {root} (run the {stage} stage first)")
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(root, t)))


def _save_tensor_file(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir, step, model_state, optimizer_state, meta, rank=0, keep_last=None, run_id=None, protect=None):
    """
    Save a checkpoint; every rank calls this (rank r writes its optimizer shard, rank 0 the model and
    meta). keep_last: keep only the newest K complete checkpoints of run_id (meta["run_id"] of
    each; None keeps all); another run's checkpoints are never deleted. A failed write (disk full,
    read-only) removes its temp directory and raises NanochatError. protect: a step never pruned
    (the best checkpoint of an early-stopping run).
    """
    final = os.path.join(ckpt_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        if optimizer_state is not None:
            _save_tensor_file(optimizer_state, os.path.join(tmp, f"optim_rank{rank}.pt"))
        _barrier()
        if rank == 0:
            if meta.get("lora"):  # model_state: lora.adapter_state_dict(); the base is the parent's
                from nanochat.lora import LoraSpec, write_adapter

                p = meta["parent"]
                parent_dir = os.path.abspath(os.path.join(ckpt_dir, os.pardir, os.pardir, p["stage"], p["model_tag"], f"step_{p['step']:06d}"))
                write_adapter(tmp, model_state, LoraSpec(**meta["lora"]), base_model=parent_dir)
            else:
                _save_tensor_file(model_state, os.path.join(tmp, "model.pt"))
            atomic_write_bytes(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1, default=str).encode())
            if os.path.isdir(final):  # re-saving the same step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise NanochatError(f"could not save checkpoint {final}: {reason}") from None
    if rank == 0 and keep_last:
        mine = [s for s in list_steps(ckpt_dir) if run_id is None or load_meta(ckpt_dir, s).get("run_id") == run_id]
        for old in mine[:-keep_last]:
            if old not in (step, protect):
                shutil.rmtree(os.path.join(ckpt_dir, f"step_{old:06d}"), ignore_errors=True)
    _barrier()
    return final


def load_tensor_file(path, device):
    """torch.load(path) with weights_only=True; NanochatError on a missing or corrupt file."""
    if not os.path.isfile(path):
        raise NanochatError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or corrupt file: torch raises several exception types
        raise NanochatError(f"corrupt or truncated checkpoint file {path}: {type(e).__name__}") from None


def load_meta(ckpt_dir, step):
    """The meta.json of a checkpoint as a dict. Raises NanochatError when missing or corrupt."""
    meta_path = os.path.join(ckpt_dir, f"step_{step:06d}", "meta.json")
    if not os.path.isfile(meta_path):
        raise NanochatError(f"checkpoint not found: {os.path.dirname(meta_path)}")
    try:
        with open(meta_path) as f:
            return json.load(f)
    except ValueError:
        raise NanochatError(f"corrupt checkpoint meta {meta_path}") from None


def load_checkpoint(ckpt_dir, step, device, load_optimizer=False, rank=0):
    """Returns (model_state, optimizer_state or None, meta). Raises NanochatError on a missing or
    corrupt file."""
    meta = load_meta(ckpt_dir, step)
    path = os.path.join(ckpt_dir, f"step_{step:06d}")
    model_state = load_tensor_file(os.path.join(path, "model.pt"), device)
    optimizer_state = load_tensor_file(os.path.join(path, f"optim_rank{rank}.pt"), device) if load_optimizer else None
    return model_state, optimizer_state, meta


def build_model(model_state, meta, device):
    """A GPT with the checkpoint's config and weights on device."""
    from nanochat.gpt import GPT, GPTConfig

    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills the non-persistent RoPE buffers; weights are overwritten below
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise NanochatError(f"checkpoint does not match its model config: {str(e).splitlines()[0]}") from None
    return model


def load_weights(stage, model_tag, step, device, base_dir=None, merge=True, _seen=()):
    """
    The GPT of one checkpoint (fp32, train mode) and its meta. A full checkpoint: build_model of
    its model.pt. A LoRA checkpoint: its parent's weights (recursively) with this step's adapter on
    top, merged into the weights (merge=True; a plain model, every parameter trainable) or kept as
    a trainable adapter over the frozen parent (merge=False: resuming the LoRA run). Raises
    NanochatError for a missing or corrupt file or a parent chain that loops.
    """
    ckpt_dir = checkpoint_dir(stage, model_tag, base_dir)
    meta = load_meta(ckpt_dir, step)
    if not meta.get("lora"):
        model_state = load_tensor_file(os.path.join(ckpt_dir, f"step_{step:06d}", "model.pt"), device)
        return build_model(model_state, meta, device), meta
    from nanochat.lora import load_adapter

    parent, here = meta.get("parent") or {}, (stage, model_tag, step)
    if not parent or here in _seen:
        raise NanochatError(f"LoRA checkpoint {ckpt_dir} step {step}: {'no parent in its meta' if not parent else 'its parent chain loops'}")
    model, _ = load_weights(parent["stage"], parent["model_tag"], parent["step"], device, base_dir, True, (*_seen, here))
    load_adapter(os.path.join(ckpt_dir, f"step_{step:06d}"), model, merge=merge)
    if merge:
        model.requires_grad_(True)  # like build_model's: a merged model is a plain one
    return model, meta


def load_model(stage, device, model_tag=None, step=None, base_dir=None, lora=None):
    """
    Load the model of a stage (STAGES: base, mid, sft, rsft, rl) for inference: the newest model_tag and step
    unless given; a LoRA checkpoint comes with its adapter merged (load_weights). lora: an adapter
    directory in PEFT's layout (the --lora flag of the inference scripts) merged on top, recorded as
    meta["lora_dir"]. Returns (model in eval mode, tokenizer, meta). Raises NanochatError when there is
    nothing to load or the tokenizer is not the one the model was trained with
    (vocab size, and the fingerprint pinned in the meta).
    """
    from nanochat.tokenizer import get_tokenizer

    model_tag = model_tag or find_latest_model_tag(stage, base_dir)
    ckpt_dir = checkpoint_dir(stage, model_tag, base_dir)
    step = find_last_step(ckpt_dir) if step is None else step
    model, meta = load_weights(stage, model_tag, step, device, base_dir)
    meta.setdefault("model_tag", model_tag)
    if lora is not None:
        from nanochat.lora import load_adapter

        load_adapter(lora, model, merge=True)
        meta["lora_dir"] = os.path.abspath(lora)
    model.eval()
    tokenizer = get_tokenizer(os.path.join(base_dir, "tokenizer") if base_dir else None)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise NanochatError(f"tokenizer vocab_size {tokenizer.vocab_size} != model vocab_size {model.config.vocab_size} ({ckpt_dir})")
    if meta.get("tokenizer") not in (None, tokenizer.fingerprint()):  # checkpoints before the pin have none
        raise NanochatError(f"the tokenizer (fingerprint {tokenizer.fingerprint()}) is not the one {ckpt_dir} was trained with ({meta['tokenizer']})")
    return model, tokenizer, meta


def resolve_model_ref(ref, base_dir=None):
    """
    A reference into the model registry (nanochat.registry): NAME (its newest version), NAME:vN or
    NAME@ALIAS, as (stage, model_tag, step) for load_model. Raises NanochatError (one line) for an
    unknown name, version or alias, or when the registered checkpoint is gone, no longer holds the
    registered weights, or lies outside this base dir.
    """
    from nanochat.registry import Registry, verify_model

    with Registry(base_dir=base_dir) as reg:
        model = reg.resolve_model(ref)
    verify_model(model)
    here = os.path.join(checkpoint_dir(model["stage"], model["model_tag"], base_dir), f"step_{model['step']:06d}")
    if os.path.realpath(here) != os.path.realpath(model["ckpt_path"]):
        raise NanochatError(f"{ref} is the checkpoint {model['ckpt_path']}, not under this base dir ({base_dir or get_base_dir()})")
    return model["stage"], model["model_tag"], model["step"]


def apply_model_ref(args, default_source="sft"):
    """
    The --model flag of the inference scripts: with --model REF, set args.source, args.model_tag and
    args.step from the registry (NanochatError when --source, --model-tag or --step are given too);
    without it, args.source defaults to default_source. Returns args.
    """
    if args.model is None:
        args.source = args.source or default_source
        return args
    given = [flag for flag, value in (("--source", args.source), ("--model-tag", args.model_tag), ("--step", args.step)) if value is not None]
    if given:
        raise NanochatError(f"--model {args.model} names a checkpoint already: drop {', '.join(given)}")
    args.source, args.model_tag, args.step = resolve_model_ref(args.model)
    return args
