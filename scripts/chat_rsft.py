"""
Rejection-sampling fine-tuning on a verifiable task (stage "sft" -> stage "rsft"): each step samples
K completions per prompt with the engine (python tool on), scores every one with the task's verifier
(tasks/*.py evaluate() / reward(), and score() for the coverage where the task has it), and
fine-tunes with cross-entropy on the correct ones only (--rsft-epochs updates per step). Each step
is one round of sample -> select -> fine-tune with the current model (expert iteration). Methods
and sources: nanochat/rl.py, docs/rl.md.

    python -m scripts.chat_rsft --task MultiHop --num-iterations 100            # latest SFT model
    python -m scripts.chat_rsft --task MultiHop --buckets easy,medium            # only those prompts
    python -m scripts.chat_rsft --task MultiHop --prompts my_prompts.jsonl       # prompts of a file, MultiHop's verifier
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rsft --task GSM8K

Prompts: --task on --split (default train), or --prompts FILE.jsonl, one conversation per line in
the task format (tasks/common.py), whose last assistant message is the reference reply and whose
top-level keys carry the metadata the --task verifier reads (MultiHop: "answer", "path", "bucket",
"hops"; GSM8K: none besides the reference ending in "#### <answer>"); every line is validated and
checked against the verifier at start. --buckets keeps only the prompts of those buckets. Before
training, the prompts' bucket and length mix is printed next to the evaluation set's
(nanochat/distribution.py), with a warning when they diverge.

Every scored sample, kept or not, is appended to <base_dir>/checkpoints/rsft/<tag>/run/rsft_samples.jsonl
(cut back to the checkpoint on --resume). Every step logs reward, pass@1 / pass@K, kept, the mean
coverage (tasks with score()) and tokens/s; every --eval-every steps (and before and after
training) pass@1 and pass@k on --eval-task's --eval-split, per bucket. The run skeleton (resume,
save, stop, step log) is nanochat.training.RunState.
"""

import argparse
import json
import os


from nanochat.common import NanochatError, print0, run_main
from nanochat.engine import Engine
from nanochat.registry import file_hash
from nanochat.rl import (add_rl_args, all_sum, check_rl_args, check_rl_run, check_task_names, eval_summary, evaluate_policy, load_rl_data, log_rl_step, print_reward_trend, prompt_schedule, reward_trend, micro_batches,
                         optimizer_step, rollout_to_conversation, sample_step, select_correct)
from nanochat.training import RunState, add_run_args, parse_run_args
from tasks.customjson import parse_conversation, read_lines
from tasks.recipe import TASKS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Rejection-sampling fine-tuning (RSFT) on a verifiable task (GSM8K, MultiHop, ...)")
    g = add_rl_args(p, sources=["sft", "mid"])
    g.add_argument("--prompts", type=str, default=None, help="jsonl file of prompts (conversations with the metadata the --task verifier reads) instead of --task's --split")
    g.add_argument("--rsft-epochs", type=int, default=1, help="optimizer updates on each step's kept samples")
    g.add_argument("--rsft-max-per-question", type=int, default=0, help="correct samples kept per prompt at most (0: all)")
    g.add_argument("--rsft-min-coverage", type=float, default=0.0, help="keep a correct sample only if its coverage (tasks with score()) is at least this (1: the whole reasoning path)")
    g.add_argument("--rsft-distinct", type=int, default=0, choices=[0, 1], help="1: keep one of each set of identical winners of a prompt (RFT's distinct reasoning paths)")
    g.add_argument("--rsft-max-pass-rate", type=float, default=1.0, help="skip a prompt whose share of kept-worthy samples is above this (below 1: drop the prompts the model already solves every time)")
    add_run_args(p, parent="sft", token_batches=False, eval_every=60, init_lr_frac=0.05, warmdown_ratio=1.0, compile=0)
    args = parse_run_args(p, argv)
    check_task_names(TASKS, args)
    return check_rl_args(args, checks=[("--rsft-epochs", args.rsft_epochs >= 1), ("--rsft-max-per-question", args.rsft_max_per_question >= 0),
                                          ("--rsft-min-coverage", 0.0 <= args.rsft_min_coverage <= 1.0),
                                          ("--rsft-max-pass-rate", 0.0 <= args.rsft_max_pass_rate <= 1.0)])


def read_prompts(path):
    """The conversations of a prompts file: each non-blank line validated as a conversation
    (tasks/customjson.py: file:line and what is wrong), its top-level metadata kept."""
    if not os.path.isfile(path):
        raise NanochatError(f"--prompts: no such file {path}")
    prompts = []
    for n, line in read_lines(path):
        conversation = parse_conversation(line, f"{path}:{n}")  # the format checks; drops the metadata
        obj = json.loads(line.decode("utf-8").removeprefix("\ufeff"))
        prompts.append((obj if isinstance(obj, dict) else {}) | conversation)
    if not prompts:
        raise NanochatError(f"--prompts {path}: no conversations in the file")
    return prompts


def sample_lines(step, mine, pool, conversations, groups, kept, tokenizer):
    """The samples-file lines of this rank's groups: [(slot, sample index, JSON line)], one per scored
    sample (docs/rl.md: step, question, sample, reward, correct, coverage, bucket, kept, messages)."""
    kept, out = set(kept), []
    for q, ((slot, position, _), conversation, group) in enumerate(zip(mine, conversations, groups)):
        for s, r in enumerate(group):
            record = {"step": step + 1, "question": pool.indices[position], "sample": s, "reward": r.reward, "correct": r.correct}
            record |= ({"coverage": r.coverage} if r.coverage is not None else {}) | {"bucket": conversation.get("bucket"), "kept": (q, s) in kept}
            out.append((slot, s, json.dumps(record | rollout_to_conversation(tokenizer, conversation, r))))
    return out


def main(argv=None):
    args = parse_args(argv)
    run = RunState("rsft", args, parent=args.source)
    device, rank, world_size, tokenizer = run.device, run.rank, run.world_size, run.tokenizer
    check_rl_run(run, args, ("task", "split", "buckets", "max_prompts", "prompts", "questions_per_step", "num_samples", "seed"))  # they define the samples of every step
    model = run.load_model()
    model.compute_dtype = run.compute_dtype()
    engine = Engine(model, tokenizer)  # no torch.compile: rollouts change shape every step, and decoding dominates a step

    # -------------------------------------------------------------------------------- data
    prompts = read_prompts(args.prompts) if args.prompts else None
    if prompts is not None:  # a changed file would change the samples of every step
        digest = file_hash(args.prompts)
        if run.loop.setdefault("prompts_sha256", digest) != digest:
            raise NanochatError(f"--resume: {args.prompts} changed since the checkpoint in {run.ckpt_dir} (sha256 {run.loop['prompts_sha256'][:12]}, now {digest[:12]})")
    # the verifier, the prompts (--buckets), the evaluation; prints the prompts' bucket and length mix against the evaluation's
    task, pool, eval_task, shift = load_rl_data(TASKS, args, tokenizer, prompts)
    eval_name = args.eval_task or args.task
    order, num_iterations = prompt_schedule(run, args, pool)
    K, B = args.num_samples, run.resolve("device_batch_size", 8)

    # -------------------------------------------------------------------------------- optimizer, loop
    optimizer = run.build_optimizer(model)  # MuonAdamW over the model, or AdamW over the LoRA adapters only
    run.start(model, optimizer)
    samples_path = run.track_log(os.path.join(run.ckpt_dir, "run", "rsft_samples.jsonl"))
    for step in run.steps(num_iterations):
        if run.due(args.eval_every, at_start=True) and evaluate_policy(run, model, eval_name, eval_task, args):
            break
        # ---- sample K completions of this rank's prompts, score them with the task's verifier, keep the correct ones
        mine, conversations, groups = sample_step(run, engine, task, pool, order, step, args)
        kept = select_correct(groups, args.rsft_max_per_question or None, args.rsft_min_coverage, args.rsft_max_pass_rate, bool(args.rsft_distinct))
        # every scored sample, in slot order: the file is the same for any number of ranks
        records = sorted(rec for part in run.gather(sample_lines(step, mine, pool, conversations, groups, kept, tokenizer)) for rec in part)
        if rank == 0:
            with open(samples_path, "a") as fh:
                fh.write("".join(line + "\n" for _, _, line in records))

        # ---- fine-tune on the kept samples: mean cross-entropy per trained token of the step, all ranks
        (n_trained,) = all_sum([sum(sum(groups[q][s].mask) for q, s in kept)], device)
        batches = micro_batches([(groups[q][s], None) for q, s in kept], B, tokenizer.bos_token_id, device)
        loss_sum, fed, grad_norm = 0.0, 0, None
        for _ in range(args.rsft_epochs if n_trained > 0 else 0):
            loss_sum = 0.0
            for _, x, y, n_fed in batches:
                loss = model(x, y, loss_reduction="sum") / n_trained
                (loss * world_size).backward()  # the optimizer averages gradients over ranks
                fed += n_fed
                loss_sum += loss.item()
            grad_norm = optimizer_step(model, optimizer)

        # ---- metrics over all ranks
        kept_coverage = [groups[q][s].coverage for q, s in kept if groups[q][s].coverage is not None]
        loss_sum, fed, n_kept, coverage_sum, n_coverage = all_sum([loss_sum, fed, len(kept), sum(kept_coverage), len(kept_coverage)], device)
        log_rl_step(run, groups, K, loss_sum, fed, mine, pool, show=("kept",), kept=int(n_kept), grad_norm=grad_norm, skipped=grad_norm is None,
                    **({"kept_coverage": coverage_sum / n_coverage} if n_coverage else {}))
    else:
        evaluate_policy(run, model, eval_name, eval_task, args)

    # -------------------------------------------------------------------------------- wrap-up
    trend = reward_trend(run.logger.path)  # the training reward's first and last fifth of the steps, and of revisited prompts (rank 0)
    print_reward_trend(trend)
    run.finish(num_params=model.num_params(), **shift, **trend, **eval_summary(run, eval_name, args.eval_split, args.eval_samples))


if __name__ == "__main__":
    run_main(main)
