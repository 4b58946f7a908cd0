"""
Evaluate a base checkpoint: the CORE metric, bpb on the train and val shards, and a few greedy samples.

    python -m scripts.base_eval                                   # newest base checkpoint, everything
    python -m scripts.base_eval --model-tag d4 --max-per-task 100 # a quick CORE estimate
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval --model-tag d20

Writes <base_dir>/report/base-eval.json and base-eval.md, and the stage record of nanochat.report
(report/base_eval.json), on rank 0; the results also go to the run registry under the run that wrote
the checkpoint (nanochat/registry.py). CORE data: --eval-dir (see nanochat/core_eval.py and
docs/core.md); tasks whose files are missing are listed as missing and CORE is averaged over the
tasks present.
"""

import argparse
import json
import os
import time

from nanochat import report as run_report
from nanochat.checkpoint_manager import checkpoint_dir, load_model
from nanochat.common import NanochatError, atomic_write_bytes, compute_cleanup, compute_init, get_base_dir, print0, run_main
from nanochat.core_eval import BASELINE_VERSIONS, evaluate_core, format_core_table
from nanochat.dataloader import DataLoader
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb
from nanochat.registry import base_eval_rows, record_evals

EVALS = ("core", "bpb", "sample")
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a base model: CORE, train/val bpb, samples")
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint directory under checkpoints/base (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--eval", type=str, default=",".join(EVALS), help=f"comma-separated evaluations to run, of: {', '.join(EVALS)}")
    p.add_argument("--eval-dir", type=str, default=None, help="CORE data: core_tasks.tsv + jsonl files (default: $NANOCHAT_EVAL_DIR or <base_dir>/eval_bundle)")
    p.add_argument("--max-per-task", type=int, default=-1, help="CORE items per task (-1: all; a fixed subset otherwise)")
    p.add_argument("--baseline", type=str, default="v1", choices=BASELINE_VERSIONS, help="CORE random baselines: v1 (published CORE numbers) or v2 (DCLM's corrected ones)")
    p.add_argument("--split-tokens", type=int, default=10 * 524288, help="tokens per split (train, val) for bpb")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows of sequence_len tokens per forward pass for bpb")
    p.add_argument("--data-dir", type=str, default=None, help="parquet shard directory (default: $NANOCHAT_DATA_DIR or <base_dir>/base_data)")
    p.add_argument("--num-samples", type=int, default=len(SAMPLE_PROMPTS), help="prompts completed greedily")
    p.add_argument("--sample-tokens", type=int, default=24, help="tokens generated per sample")
    p.add_argument("--device-type", type=str, default=None, help="cuda | cpu | mps (default: autodetect)")
    args = p.parse_args(argv)
    args.eval = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = [e for e in args.eval if e not in EVALS]
    if unknown or not args.eval:
        raise NanochatError(f"--eval {','.join(args.eval)!r}: expected a comma-separated subset of {', '.join(EVALS)}")
    if args.max_per_task == 0 or args.max_per_task < -1:
        raise NanochatError(f"--max-per-task {args.max_per_task}: expected -1 (all items) or >= 1")
    if args.split_tokens < 1 or args.device_batch_size < 1 or args.sample_tokens < 1 or args.num_samples < 0:
        raise NanochatError("--split-tokens, --device-batch-size and --sample-tokens must be >= 1, --num-samples >= 0")
    return args


def markdown_report(report):
    lines = [f"# Base model evaluation: {report['model_tag']} step {report['step']}", ""]
    cfg = report["model_config"]
    lines += [f"model: n_layer {cfg['n_layer']}, n_embd {cfg['n_embd']}, n_head {cfg['n_head']}, vocab_size {cfg['vocab_size']}, sequence_len {cfg['sequence_len']}", ""]
    if "core" in report:
        lines += ["## CORE", "", format_core_table(report["core"]), ""]
    if "bpb" in report:
        lines += ["## Bits per byte", "", "| split | bpb | tokens |", "|---|---|---|"]
        lines += [f"| {split} | {r['bpb']:.4f} | {r['tokens']:,} |" for split, r in report["bpb"].items()]
        lines.append("")
    if "samples" in report:
        lines += ["## Samples (greedy)", ""]
        lines += [f"- {s['prompt']!r} -> {s['completion']!r}" for s in report["samples"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    _, rank, _, world_size, device = compute_init(args.device_type)
    print0(json.dumps(vars(args)))

    # -------------------------------------------------------------------------------- model
    model, tokenizer, meta = load_model("base", device, model_tag=args.model_tag, step=args.step)
    T = model.config.sequence_len
    step = meta.get("step", args.step)
    print0(f"model {meta['model_tag']} step {step}: {model.config}")
    report = {"model_tag": meta["model_tag"], "step": step, "model_config": model.config.to_dict(), "args": vars(args)}

    # -------------------------------------------------------------------------------- CORE
    if "core" in args.eval:
        t0 = time.time()
        core = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task, eval_dir=args.eval_dir, baseline=args.baseline, log=print0)
        print0(format_core_table(core))
        print0(f"CORE {core['core']:.4f} ({core['tasks_present']}/{core['tasks_total']} tasks) in {time.time() - t0:.1f}s")
        report["core"] = core

    # -------------------------------------------------------------------------------- bpb
    if "bpb" in args.eval:
        token_bytes = tokenizer.token_bytes(device)
        steps = max(1, args.split_tokens // (args.device_batch_size * T * world_size))
        report["bpb"] = {}
        for split in ("train", "val"):
            t0 = time.time()
            loader = DataLoader(tokenizer, args.device_batch_size, T, split, device, rank, world_size, args.data_dir)
            try:
                bpb = evaluate_bpb(model, loader, steps, token_bytes)
            finally:
                loader.close()
            tokens = steps * args.device_batch_size * T * world_size
            report["bpb"][split] = {"bpb": bpb, "tokens": tokens}
            print0(f"{split} bpb {bpb:.4f} ({tokens:,} tokens, {time.time() - t0:.1f}s)")

    # -------------------------------------------------------------------------------- samples
    if "sample" in args.eval and rank == 0:
        engine = Engine(model, tokenizer)
        report["samples"] = []
        for prompt in SAMPLE_PROMPTS[: args.num_samples]:
            ids, _ = engine.generate_batch(tokenizer.encode(prompt, prepend=tokenizer.bos_token_id), max_tokens=args.sample_tokens, temperature=0.0)
            completion = tokenizer.decode(ids[0])
            report["samples"].append({"prompt": prompt, "completion": completion})
            print0(f"sample: {prompt!r} -> {completion!r}")

    # -------------------------------------------------------------------------------- report
    if rank == 0:
        report_dir = os.path.join(get_base_dir(), "report")
        os.makedirs(report_dir, exist_ok=True)
        atomic_write_bytes(os.path.join(report_dir, "base-eval.json"), json.dumps(report, indent=1).encode())
        atomic_write_bytes(os.path.join(report_dir, "base-eval.md"), markdown_report(report).encode())
        print0(f"wrote {os.path.join(report_dir, 'base-eval.json')} and base-eval.md")
        record_evals(checkpoint_dir("base", meta["model_tag"]), meta, base_eval_rows(report), "base_eval")
    # the stage's record for the run's report card (rank 0 only; wall time, system, arguments)
    metrics = {"model_tag": report["model_tag"], "step": step}
    if "core" in report:
        metrics |= {"core": report["core"]["core"], "core_tasks_present": report["core"]["tasks_present"], "core_max_per_task": args.max_per_task}
    metrics |= {f"{split}_bpb": r["bpb"] for split, r in report.get("bpb", {}).items()}
    run_report.log_stage("base_eval", args=vars(args), metrics=metrics)
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
