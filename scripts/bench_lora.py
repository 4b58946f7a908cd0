"""
LoRA against full fine-tuning: the same model, data and steps through the real SFT stage
(scripts/chat_sft.py), each variant in its own process so that memory figures do not mix.

    python -m scripts.bench_lora                          # depth 4, rank 8 on q,k,v,o,fc, 40 steps, CPU: ~2 min
    python -m scripts.bench_lora --depth 8 --steps 200 --lora-rank 16 --lora-targets q,k,v,o,fc,down
    python -m scripts.bench_lora --from-base-dir ~/.cache/nanochat-reasoning --from-stage base   # a trained parent

Set-up (hermetic, in a temporary base dir): the byte-level tokenizer (256 byte tokens + specials),
a random GPT of --depth (GPTConfig.from_depth, context 256) saved as the "mid" checkpoint, and
MultiHop conversations (generated, no downloads; --val-conversations of them held out). Both
variants run chat_sft from that checkpoint with the same flags; the LoRA run adds --lora-*.
With --from-base-dir DIR the parent is instead DIR's checkpoint of --from-stage (tag --from-tag,
default the newest; its last step) with DIR's tokenizer: a trained model, which is what LoRA is for.

Columns:
- trainable: parameters the optimizer updates (full: all; LoRA: the adapters' A and B).
- peak mem: CUDA, torch.cuda.max_memory_allocated() of the training process (tensors only);
  CPU, the process's peak resident set (getrusage ru_maxrss via wait4) minus that of a process that
  only imports torch and the stage (interpreter + libraries): the growth that loading, training and
  evaluating cost, allocator slack included.
- optim state: the size of the final checkpoint's optimizer state file (optim_rank0.pt): Muon
  momenta and AdamW moments of every trainable parameter; the exact part of the memory saving.
- tok/s: the median of the step log's tokens/s over the steps after the first 3 (warm-up).
- val loss: chat_sft's loss on the held-out conversations after the last step.

A random model is a harsh test for LoRA (its frozen weights know nothing), so expect full
fine-tuning to reach a lower loss here; the memory and speed columns do not depend on that.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import shutil
import tempfile

import torch

from nanochat.checkpoint_manager import checkpoint_dir, find_latest_model_tag, load_model, save_checkpoint
from nanochat.common import run_main
from nanochat.gpt import GPT, GPTConfig
from nanochat.lora import LoraSpec, apply_lora
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The child: the stage as `python -m scripts.chat_sft` would run it, then the CUDA peak on one line.
CHILD = (
    "import json, runpy, sys, torch; sys.argv[0] = 'chat_sft'; runpy.run_module('scripts.chat_sft', run_name='__main__'); "
    "print('BENCH_CUDA_PEAK', json.dumps(torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None))"
)
BASELINE = "import torch, nanochat.training, tasks.recipe"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LoRA vs full fine-tuning: trainable parameters, peak memory, tokens/s, val loss")
    p.add_argument("--depth", type=int, default=4, help="model depth (width and heads follow: GPTConfig.from_depth)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each variant")
    p.add_argument("--device-batch-size", type=int, default=8, help="conversations per micro-batch (one micro-batch per step)")
    p.add_argument("--conversations", type=int, default=600, help="MultiHop conversations (training + held out)")
    p.add_argument("--val-conversations", type=int, default=64, help="of them held out for the val loss")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: r)")
    p.add_argument("--lora-targets", type=str, default="q,k,v,o,fc", help="adapted Linears (see --lora-targets of chat_sft)")
    p.add_argument("--lora-lr", type=float, default=None, help="the adapters' learning rate (default: chat_sft's)")
    p.add_argument("--init-lr-frac", type=float, default=None, help="full fine-tuning's LRs as a fraction of the parent's (default: chat_sft's, 0.02; the LoRA run ignores it)")
    p.add_argument("--device-type", type=str, default=None, choices=["cuda", "cpu", "mps"], help="default: autodetect")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and of the runs")
    p.add_argument("--from-base-dir", type=str, default=None, help="a trained parent: this NANOCHAT_BASE_DIR's tokenizer and checkpoint (instead of a random model)")
    p.add_argument("--from-stage", type=str, default="base", help="with --from-base-dir: the parent's stage")
    p.add_argument("--from-tag", type=str, default=None, help="with --from-base-dir: the parent's model tag (default: the newest)")
    p.add_argument("--keep", action="store_true", help="keep the temporary base dir (checkpoints, metrics) instead of deleting it")
    return p.parse_args(argv)


def run_child(code, argv, env):
    """Run `python -c code argv...` in REPO; returns (stdout, stderr, returncode, peak RSS in bytes)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return out.read(), err.read(), proc.returncode, usage.ru_maxrss * 1024  # Linux: ru_maxrss in KiB


def main(argv=None):
    args = parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench_lora_")
    try:
        bench(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def bench(args, work):
    base = os.path.join(work, "base")
    if args.from_base_dir:  # a trained parent: link its checkpoint directory, copy its tokenizer
        source = args.from_stage
        parent_dir = checkpoint_dir(source, args.from_tag or find_latest_model_tag(source, args.from_base_dir), args.from_base_dir)
        shutil.copytree(os.path.join(args.from_base_dir, "tokenizer"), os.path.join(base, "tokenizer"))
        model, _, meta = load_model(source, torch.device("cpu"), model_tag=os.path.basename(parent_dir), base_dir=args.from_base_dir)
        config = model.config
        os.makedirs(os.path.dirname(checkpoint_dir(source, "bench", base)), exist_ok=True)
        os.symlink(os.path.abspath(parent_dir), checkpoint_dir(source, "bench", base))
    else:
        source = "mid"
        tok = Tokenizer({bytes([i]): i for i in range(256)}, SPLIT_PATTERN)
        tok.save(os.path.join(base, "tokenizer"))
        config = GPTConfig.from_depth(args.depth, vocab_size=tok.vocab_size, sequence_len=256)
        model = GPT(config)
        model.init_weights(seed=args.seed)
        meta = {"stage": "mid", "model_tag": "bench", "step": 0, "model_config": config.to_dict(), "tokenizer": tok.fingerprint()}
        save_checkpoint(checkpoint_dir("mid", "bench", base), 0, model.state_dict(), None, meta)
    recipe = os.path.join(work, "recipe.json")
    with open(recipe, "w") as f:
        json.dump({"seed": args.seed, "tasks": [{"task": "MultiHop", "args": {"split": "train", "size": args.conversations}}]}, f)
    spec = LoraSpec(args.lora_rank, args.lora_alpha or float(args.lora_rank), args.lora_targets)
    full_params = model.num_params()
    lora_params = sum(p.numel() for p in apply_lora(model, spec))

    env = dict(os.environ, NANOCHAT_BASE_DIR=base, PYTHONUNBUFFERED="1")
    common = ["--source", source, "--recipe", recipe, "--num-iterations", args.steps, "--device-batch-size", args.device_batch_size,
              "--total-batch-size", args.device_batch_size * config.sequence_len, "--val-conversations", args.val_conversations,
              "--eval-every", -1, "--seed", args.seed] + (["--init-lr-frac", args.init_lr_frac] if args.init_lr_frac is not None else [])
    if args.device_type:
        common += ["--device-type", args.device_type]
    lora = ["--lora-rank", spec.rank, "--lora-alpha", spec.alpha, "--lora-targets", ",".join(spec.targets)] + (["--lora-lr", args.lora_lr] if args.lora_lr else [])
    _, _, _, baseline_rss = run_child(BASELINE, [], env)
    parent = f"the {source} checkpoint of {args.from_base_dir}" if args.from_base_dir else "a random model"
    print(f"{parent}: depth {config.n_layer} ({full_params:,} parameters), {args.steps} steps of {args.device_batch_size} MultiHop conversations, in {work}")
    results = []
    for name, tag, extra, trainable in (("full", "full", [], full_params), (f"LoRA r{spec.rank}", "lora", lora, lora_params)):
        os.symlink(checkpoint_dir(source, "bench", base), checkpoint_dir(source, tag, base))
        out, err, code, rss = run_child(CHILD, [*common, "--model-tag", tag, *extra], env)
        if code != 0:
            raise SystemExit(f"{name} run failed ({code}):\n{out[-2000:]}\n{err[-2000:]}")
        with open(os.path.join(checkpoint_dir("sft", tag, base), "run", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        speeds = [r["tok_per_s"] for r in rows if "tok_per_s" in r][3:]
        cuda_peak = json.loads(out.rsplit("BENCH_CUDA_PEAK", 1)[1].split("\n", 1)[0])
        mem = cuda_peak if cuda_peak is not None else rss - baseline_rss
        val = [r["val_loss"] for r in rows if r.get("val_loss") is not None][-1]
        optim = os.path.getsize(os.path.join(checkpoint_dir("sft", tag, base), f"step_{args.steps:06d}", "optim_rank0.pt"))
        results.append((name, trainable, mem, optim, statistics.median(speeds) if speeds else float("nan"), val))
        print(f"  {name}: done")
    kind = "CUDA peak allocated" if cuda_peak is not None else f"peak RSS - {baseline_rss / 2**20:.0f} MiB baseline"
    print(f"\n| variant | trainable params | peak mem, MiB ({kind}) | optim state, MiB | tok/s (median) | val loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, trainable, mem, optim, speed, val in results:
        print(f"| {name} | {trainable:,} ({100 * trainable / full_params:.2f}%) | {mem / 2**20:,.0f} | {optim / 2**20:,.2f} | {speed:,.0f} | {val:.4f} |")


if __name__ == "__main__":
    run_main(main)
