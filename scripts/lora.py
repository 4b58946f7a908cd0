"""
LoRA adapters (nanochat/lora.py; docs/finetune.md): merge a LoRA run's checkpoint into a full one, or
describe an adapter directory.

    python -m scripts.lora merge --source sft --model-tag d20          # -> sft/d20-merged, same step
    python -m scripts.lora merge --source sft --model-tag d20 --step 300 --out-tag d20-chat --overwrite
    python -m scripts.lora info ~/.cache/nanochat/checkpoints/sft/d20/step_000300

merge writes the parent's weights with the adapter folded in (W + alpha / r * B @ A) as an ordinary
checkpoint (model.pt + meta.json, no optimizer or loop state: it is for inference and later stages)
of the same stage under a new model tag; "merged_from" in its meta names the LoRA checkpoint.
"""

import argparse
import os
import shutil

import torch

from nanochat.checkpoint_manager import STAGES, checkpoint_dir, find_last_step, find_latest_model_tag, list_steps, load_meta, load_model, save_checkpoint
from nanochat.common import NanochatError, run_main
from nanochat.lora import TARGETS, read_adapter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Merge or describe LoRA adapters")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="write a LoRA checkpoint's merged weights as a full checkpoint")
    m.add_argument("--source", type=str, default="sft", choices=STAGES, help="stage of the LoRA checkpoint")
    m.add_argument("--model-tag", type=str, default=None, help="model tag of the LoRA run (default: the stage's latest)")
    m.add_argument("--step", type=int, default=None, help="step to merge (default: the latest)")
    m.add_argument("--out-tag", type=str, default=None, help="model tag of the merged checkpoint, same stage (default: MODEL_TAG-merged)")
    m.add_argument("--overwrite", action="store_true", help="replace the checkpoints already under --out-tag")
    i = sub.add_parser("info", help="print an adapter directory's rank, alpha, targets and parameter count")
    i.add_argument("dir", type=str, help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    return p.parse_args(argv)


def merge(args):
    tag = args.model_tag or find_latest_model_tag(args.source)
    src_dir = checkpoint_dir(args.source, tag)
    step = find_last_step(src_dir) if args.step is None else args.step
    if not load_meta(src_dir, step).get("lora"):
        raise NanochatError(f"--model-tag {tag} step {step} ({src_dir}) is not a LoRA checkpoint: nothing to merge")
    out_tag = args.out_tag or f"{tag}-merged"
    out_dir = checkpoint_dir(args.source, out_tag)
    if out_tag == tag:
        raise NanochatError(f"--out-tag {out_tag} is the LoRA run's own tag: pick another")
    if list_steps(out_dir) and not args.overwrite:
        raise NanochatError(f"--out-tag {out_tag}: {out_dir} holds checkpoints already; replace them with --overwrite")
    model, _, meta = load_model(args.source, torch.device("cpu"), model_tag=tag, step=step)  # parent chain + adapter, merged
    drop = ("lora", "run_id", "loop_state", "rng_state", "dataloader_state")
    meta = {k: v for k, v in meta.items() if k not in drop} | {"model_tag": out_tag, "merged_from": {"stage": args.source, "model_tag": tag, "step": step}}
    if args.overwrite and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    path = save_checkpoint(out_dir, step, model.state_dict(), None, meta)
    print(f"merged {src_dir} step {step} into {path} ({model.num_params():,} parameters)")


def info(args):
    spec, state = read_adapter(args.dir)
    n = sum(t.numel() for t in state.values())
    modules = ", ".join(TARGETS[t] for t in spec.targets)
    print(f"{args.dir}: LoRA rank {spec.rank} | alpha {spec.alpha:g} (scale {spec.scale:g}) | dropout {spec.dropout:g} | targets {','.join(spec.targets)} ({modules})")
    print(f"{n:,} trainable parameters in {len(state)} tensors")


def main(argv=None):
    args = parse_args(argv)
    merge(args) if args.command == "merge" else info(args)


if __name__ == "__main__":
    run_main(main)
