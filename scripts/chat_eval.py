"""
Evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU (categorical: the answer letter's logit),
GSM8K, HumanEval and SpellingBee (generative, through the engine with the python tool; pass@k),
and their ChatCORE (nanochat/chat_eval.py). MultiHop (tasks/multihop.py) is evaluated on request
(--tasks MultiHop) and stays outside ChatCORE, so that ChatCORE remains comparable with earlier runs.

    python -m scripts.chat_eval --source sft                            # everything, greedy
    python -m scripts.chat_eval --source mid --tasks ARC-Easy,GSM8K --max-problems 200
    python -m scripts.chat_eval --source sft --tasks HumanEval --num-samples 10 --temperature 0.8
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval --source sft
    python -m scripts.chat_eval --source rsft --tasks MultiHop --paired-with sft   # and problem by problem against sft's

Prints the table, then the accuracy per difficulty bucket with n and a 95% interval (MultiHop by
hops, GSM8K by solution steps, ARC by set, MMLU by subject group), and writes both to
<base_dir>/report/chat-eval-<source>.json and .md (rank 0); the results also go to the run registry
under the run that wrote the checkpoint (nanochat/registry.py). --paired-with compares this
evaluation with the saved evaluations of other stages on the problems both scored: per bucket, the
mean per-problem difference with its 95% interval (nanochat.chat_eval.paired_difference), the fair
test of whether one stage beat another on the same problems.
"""

import argparse
import json
import os
import time

from nanochat.chat_eval import chat_core, evaluate_task, format_table, paired_difference, paired_table
from nanochat.checkpoint_manager import STAGES, apply_model_ref, checkpoint_dir, load_model
from nanochat import report as run_report
from nanochat.common import NanochatError, atomic_write_bytes, compute_cleanup, compute_init, get_base_dir, print0, run_main
from nanochat.registry import chat_eval_rows, record_evals
from tasks.recipe import CHAT_TASKS, EVAL_TASKS, load_chat_task


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a chat model: ARC, MMLU, GSM8K, HumanEval, SpellingBee and ChatCORE (MultiHop on request)")
    p.add_argument("--source", type=str, default=None, choices=STAGES, help="stage of the checkpoint to evaluate (default: sft)")
    p.add_argument("--model", type=str, default=None, help="a registered model: NAME, NAME:vN or NAME@ALIAS (python -m scripts.lab register; instead of --source/--model-tag/--step)")
    p.add_argument("--model-tag", type=str, default=None, help="model tag (default: the newest of the stage)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--lora", type=str, default=None, help="a LoRA adapter directory (PEFT layout, e.g. a step directory of a --lora-rank run) merged on top of the chosen model")
    p.add_argument("--tasks", type=str, default=",".join(CHAT_TASKS), help=f"comma-separated tasks, of: {', '.join(EVAL_TASKS)} (default: ChatCORE's {len(CHAT_TASKS)})")
    p.add_argument("--tasks-dir", type=str, default=None, help="local task data (default: $NANOCHAT_TASKS_DIR, $NANOCHAT_DATA_ROOT/tasks or <base_dir>/tasks)")
    p.add_argument("--max-problems", type=int, default=-1, help="problems per task (-1: all; else a fixed random subset)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass of the categorical tasks")
    p.add_argument("--num-samples", type=int, default=1, help="completions per problem of the generative tasks (pass@k up to this k)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens generated per completion at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the generative tasks (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=42, help="seed of the problem subset and of the samples")
    p.add_argument("--paired-with", type=str, default="", help="comma-separated stages whose saved evaluation (report/chat-eval-<stage>.json) this one is compared with, problem by problem")
    p.add_argument("--device-type", type=str, default=None, help="cuda | cpu | mps (default: autodetect)")
    args = p.parse_args(argv)
    args.paired_with = [s.strip() for s in args.paired_with.split(",") if s.strip()]
    if any(s not in STAGES for s in args.paired_with):
        raise NanochatError(f"--paired-with {','.join(args.paired_with)}: expected stages of {', '.join(STAGES)}")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in EVAL_TASKS]
    if unknown or not args.tasks:
        raise NanochatError(f"--tasks {','.join(args.tasks)!r}: expected a comma-separated subset of {', '.join(EVAL_TASKS)}")
    if args.max_problems == 0 or args.max_problems < -1:
        raise NanochatError(f"--max-problems {args.max_problems}: expected -1 (all) or >= 1")
    if args.batch_size < 1 or args.num_samples < 1 or args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
        raise NanochatError("--batch-size, --num-samples and --max-new-tokens must be >= 1, --temperature and --top-k >= 0")
    return args


# The settings that define a generative task's score: a greedy accuracy and a sampled pass@1 (or two
# temperatures, or two length limits) are different measures, and their difference is no comparison.
DECODING_ARGS = ("temperature", "top_k", "max_new_tokens")


def load_saved_evaluation(stage, task_names, args=None):
    """{task: evaluate_task result} of the saved evaluation of `stage` (report/chat-eval-<stage>.json),
    for the tasks of task_names. NanochatError when the file is missing or unreadable, lacks one of
    the tasks, or (args given: this run's flags) a generative task of it was decoded otherwise
    (DECODING_ARGS; --num-samples may differ: pass@1 estimates the same score)."""
    path = os.path.join(get_base_dir(), "report", f"chat-eval-{stage}.json")
    try:
        with open(path) as fh:
            report = json.load(fh)
        saved, saved_args = report["tasks"], report.get("args", {})
    except FileNotFoundError:
        raise NanochatError(f"--paired-with {stage}: {path} not found; evaluate it first (python -m scripts.chat_eval --source {stage} with the same --tasks)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NanochatError(f"--paired-with {stage}: {path} is not a chat_eval report ({type(e).__name__}: {e})") from None
    missing = [name for name in task_names if name not in saved]
    if missing:
        raise NanochatError(f"--paired-with {stage}: {path} has no {', '.join(missing)} (it evaluated {', '.join(saved) or 'nothing'})")
    generative = [name for name in task_names if saved[name].get("eval_type") == "generative"]
    for key in DECODING_ARGS if args is not None and generative else ():
        if key in saved_args and saved_args[key] != getattr(args, key):
            raise NanochatError(f"--paired-with {stage}: {path} decoded {', '.join(generative)} with --{key.replace('_', '-')} {saved_args[key]}, this run with {getattr(args, key)}; evaluate both alike")
    return saved


def main(argv=None):
    args = apply_model_ref(parse_args(argv))
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    print0(json.dumps(vars(args)))
    earlier = {stage: load_saved_evaluation(stage, args.tasks, args) for stage in args.paired_with}  # fail before the work on a missing comparison

    # -------------------------------------------------------------------------------- model and tasks
    model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag, step=args.step, lora=args.lora)
    print0(f"evaluating {args.source} model {meta['model_tag']} step {meta['step']}: {model.config}")
    tasks = {name: load_chat_task(name, args.tasks_dir) for name in args.tasks}  # fail early on missing data

    # -------------------------------------------------------------------------------- evaluate
    t0 = time.time()
    results = []
    for name, task in tasks.items():
        print0(f"{name} ({task.eval_type}, {len(task)} problems)")
        r = evaluate_task(
            model,
            tokenizer,
            name,
            task,
            max_problems=args.max_problems,
            batch_size=args.batch_size,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            seed=args.seed,
            log=print0,
        )
        notes = f" | {r['cropped']} prompts cut to fit" if r["cropped"] else ""
        notes += f" | {r['eval_errors']} judge errors" if r.get("eval_errors") else ""
        notes += f" | coverage {r['coverage']:.4f}" if "coverage" in r else ""
        print0(f"{name}: accuracy {r['accuracy']:.4f} (chance {r['chance']:.4f}, centred {r['centered']:+.4f}) on {r['problems']} problems in {r['time_s']:.1f}s{notes}")
        results.append(r)
    core_results = [r for r in results if r["task"] in CHAT_TASKS]  # MultiHop and the like stay outside ChatCORE
    extra_results = [r for r in results if r["task"] not in CHAT_TASKS]
    chatcore = chat_core(core_results)
    table = format_table(results, chatcore, CHAT_TASKS)
    print0(table)
    paired = {stage: {r["task"]: paired_difference(saved[r["task"]], r) for r in results} for stage, saved in earlier.items()}
    paired_tables = {stage: f"Paired with {stage}, on the problems both evaluated:\n\n" + "\n\n".join(paired_table(stage, args.source, task, rows) for task, rows in by_task.items())
                     for stage, by_task in paired.items()}
    for t in paired_tables.values():
        print0("\n" + t)

    # -------------------------------------------------------------------------------- report
    if rank == 0:
        report = {
            "source": args.source,
            "model_tag": meta["model_tag"],
            "step": meta["step"],
            "lora_dir": meta.get("lora_dir"),
            "model_config": model.config.to_dict(),
            "args": vars(args),
            "tasks": {r["task"]: r for r in results},
            "chatcore": chatcore,
            "paired": paired,
            "time_s": time.time() - t0,
        }
        report_dir = os.path.join(get_base_dir(), "report")
        os.makedirs(report_dir, exist_ok=True)
        path = os.path.join(report_dir, f"chat-eval-{args.source}")
        atomic_write_bytes(path + ".json", json.dumps(report, indent=1).encode())
        title = f"# Chat evaluation: {args.source} model {meta['model_tag']} step {meta['step']}\n\n"
        atomic_write_bytes(path + ".md", (title + "\n\n".join([table, *paired_tables.values()]) + "\n").encode())
        print0(f"wrote {path}.json and .md")
        run_report.log_stage(f"chat_eval_{args.source}", args=vars(args), metrics={"chatcore": chatcore} | {f"{r['task']}_accuracy": r["accuracy"] for r in results}, tables={"results": table} | {f"paired with {stage}": t for stage, t in paired_tables.items()})
        if args.lora is None:  # the registry's evals belong to a checkpoint; checkpoint + --lora is none
            record_evals(checkpoint_dir(args.source, meta["model_tag"]), meta, chat_eval_rows(core_results, chatcore) + chat_eval_rows(extra_results, None), "chat_eval")
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
