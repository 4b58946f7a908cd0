"""
Reinforcement learning on GSM8K from the SFT checkpoint (stage "sft" -> stage "rl").

--algo grpo (default): for each question sample K completions with the engine (python tool on);
reward = the task's verdict on the final answer (plus --format-reward for a well-formed
"#### <number>", off by default); advantages standardised within each question's group; a
token-level policy-gradient loss on the sampled tokens only (prompt and tool-forced tokens are
masked out). On-policy: one update per batch, no KL term. Options: --ppo-epochs > 1 reuses a batch
with PPO's clipped ratio (--clip-eps), --kl-coef > 0 penalises the KL to the frozen starting model.
--algo rsft: rejection-sampling fine-tuning: each step samples K completions per question, keeps
the correct ones (appended to <ckpt_dir>/run/rsft_samples.jsonl as conversations) and fine-tunes on
them with cross-entropy (--rsft-epochs updates per step). Methods and sources: nanochat/rl.py,
docs/rl.md.

    python -m scripts.chat_rl                                     # latest SFT model, one epoch of GSM8K train
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl
    python -m scripts.chat_rl --algo rsft --num-iterations 50

Each step's questions are split over the ranks; each rank samples and trains on its share. Every
step logs reward, pass@1 / pass@K of the sampled groups and tokens/s; every --eval-every steps (and
before and after training) pass@1 and pass@k on the GSM8K test split (nanochat/chat_eval.py).
Metrics: <base_dir>/checkpoints/rl/<tag>/run/metrics.jsonl. The base learning rates, dtype and micro-batch
size default to the SFT checkpoint's; the run skeleton (resume, save, stop, step log) is
nanochat.training.RunState.
"""

import argparse
import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from nanochat.chat_eval import evaluate_task, pass_at_k
from nanochat.checkpoint_manager import load_model
from nanochat.common import NanochatError, print0, run_main
from nanochat.engine import Engine
from nanochat.optim import build_optimizer
from nanochat.rl import collate_rollouts, group_advantages, policy_gradient_loss, rollout_to_conversation, sample_rollouts, select_correct, token_logprobs
from nanochat.training import RunState, add_run_args, parse_run_args
from tasks.gsm8k import GSM8K, extract_answer
from tasks.recipe import load_chat_task


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RL (GRPO) or rejection-sampling fine-tuning on GSM8K")
    g = p.add_argument_group("algorithm and sampling")
    g.add_argument("--algo", type=str, default="grpo", choices=["grpo", "rsft"], help="grpo: group-normalised policy gradient; rsft: fine-tune on the correct samples")
    g.add_argument("--source", type=str, default="sft", choices=["sft", "mid"], help="stage of the starting checkpoint")
    g.add_argument("--tasks-dir", type=str, default=None, help="local task data (default: $NANOCHAT_TASKS_DIR, $NANOCHAT_DATA_ROOT/tasks or <base_dir>/tasks)")
    g.add_argument("--num-epochs", type=float, default=1.0, help="passes over the GSM8K train questions when --num-iterations is not given")
    g.add_argument("--questions-per-step", type=int, default=16, help="questions per step, all ranks (a multiple of the number of ranks)")
    g.add_argument("--num-samples", type=int, default=16, help="completions sampled per question (K, the group size)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per completion at most (tool output included)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of training rollouts and of the evaluation")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--sampling-batch-size", type=int, default=0, help="questions decoded together per rank (0: all of the rank's questions of the step)")
    g.add_argument("--format-reward", type=float, default=0.0, help="reward added when the completion ends in a well-formed '#### <number>' (0: off)")
    g.add_argument("--adv-norm", type=str, default="std", choices=["std", "mean"], help="advantage = (r - group mean) / group std (GRPO), or r - group mean only")
    g.add_argument("--ppo-epochs", type=int, default=1, help="optimizer updates per sampled batch (1: on-policy; > 1: PPO-style reuse with the clipped ratio)")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO ratio clip (only acts when --ppo-epochs > 1)")
    g.add_argument("--kl-coef", type=float, default=0.0, help="weight of the per-token KL penalty to the frozen starting model (0: no KL, no reference model)")
    g.add_argument("--rsft-epochs", type=int, default=1, help="rsft: optimizer updates on each step's kept samples")
    g.add_argument("--rsft-max-per-question", type=int, default=0, help="rsft: correct samples kept per question at most (0: all)")
    g.add_argument("--eval-problems", type=int, default=400, help="GSM8K test problems per evaluation (-1: all 1319)")
    g.add_argument("--eval-samples", type=int, default=8, help="completions per test problem: pass@1 .. pass@k up to this k")
    add_run_args(p, parent="sft", token_batches=False, eval_every=60, init_lr_frac=0.05, warmdown_ratio=1.0, compile=0)
    args = parse_run_args(p, argv)
    checks = [
        ("--questions-per-step", args.questions_per_step >= 1), ("--num-samples", args.num_samples >= (2 if args.algo == "grpo" else 1)),
        ("--max-new-tokens", args.max_new_tokens >= 1), ("--temperature", args.temperature > 0), ("--top-k", args.top_k >= 0),
        ("--sampling-batch-size", args.sampling_batch_size >= 0), ("--ppo-epochs", args.ppo_epochs >= 1), ("--clip-eps", args.clip_eps >= 0),
        ("--kl-coef", args.kl_coef >= 0), ("--rsft-epochs", args.rsft_epochs >= 1), ("--rsft-max-per-question", args.rsft_max_per_question >= 0),
        ("--eval-problems", args.eval_problems == -1 or args.eval_problems >= 1), ("--eval-samples", args.eval_samples >= 1),
        ("--num-epochs", args.num_epochs > 0), ("--device-batch-size", args.device_batch_size != "auto"),
    ]
    for flag, ok in checks:
        if not ok:
            hint = " (GRPO needs a group of >= 2 samples)" if flag == "--num-samples" else ""
            raise NanochatError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))} is out of range{hint}")
    return args


def main(argv=None):
    args = parse_args(argv)
    run = RunState("rl", args, parent=args.source)
    device, rank, world_size, tokenizer = run.device, run.rank, run.world_size, run.tokenizer
    if args.questions_per_step % world_size:
        raise NanochatError(f"--questions-per-step {args.questions_per_step} is not a multiple of the {world_size} ranks")
    for key in ("algo", "questions_per_step", "num_samples", "seed"):  # they define the samples of every step
        if run.resuming and run.meta["args"][key] != getattr(args, key):
            raise NanochatError(f"--resume: the checkpoint in {run.ckpt_dir} was trained with --{key.replace('_', '-')} {run.meta['args'][key]}, not {getattr(args, key)}")
    model = run.load_model()
    model.compute_dtype = run.compute_dtype()
    # The reference for the KL penalty is the starting model, also after a resume.
    ref_model = load_model(run.parent_info["stage"], device, model_tag=run.model_tag, step=run.parent_info["step"])[0].requires_grad_(False) if args.kl_coef > 0 else None
    engine = Engine(model, tokenizer)  # no torch.compile: rollouts change shape every step, and decoding dominates a step

    # -------------------------------------------------------------------------------- data
    train_task = GSM8K(split="train", tasks_dir=args.tasks_dir)
    eval_task = load_chat_task("GSM8K", args.tasks_dir)
    order = np.random.default_rng(args.seed).permutation(len(train_task)).tolist()
    Q, K, B = args.questions_per_step, args.num_samples, run.resolve("device_batch_size", 8)
    num_iterations = run.resolve("num_iterations") or max(1, int(args.num_epochs * len(train_task) / Q))
    print0(f"{len(train_task):,} GSM8K train questions; {num_iterations} steps x {Q} questions x {K} samples on {world_size} rank(s)")

    def step_questions(step):
        """This rank's (question index, sampling seed) pairs for a step: a fixed function of the step
        (resuming needs no loader state) and of nothing about the world size."""
        return [(order[(step * Q + j) % len(order)], args.seed * 1_000_003 + step * Q + j) for j in range(rank, Q, world_size)]

    # -------------------------------------------------------------------------------- optimizer, helpers
    optimizer = build_optimizer(model, **run.learning_rates(args.init_lr_frac), weight_decay=run.resolve("weight_decay"), model_dim=model.config.n_embd, grad_clip=args.grad_clip)
    run.start(model, optimizer)
    samples_path = run.track_log(os.path.join(run.ckpt_dir, "run", "rsft_samples.jsonl"))

    def all_sum(values, op=None):
        """Sum (or op) a list of floats over ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if run.ddp:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    def evaluate():
        with run.evaluating():
            r = evaluate_task(model, tokenizer, "GSM8K", eval_task, max_problems=args.eval_problems, num_samples=args.eval_samples,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None, seed=args.seed)
            row = run.loop["last_eval"] = {"step": run.step} | {f"eval_pass@{k}": v for k, v in r["pass_at_k"].items()}
            run.loop.setdefault("first_eval", row)
            print0(f"step {run.step:05d} | GSM8K test ({r['problems']} problems, {args.eval_samples} samples, T={args.temperature}) | " + " | ".join(f"pass@{k} {v:.4f}" for k, v in r["pass_at_k"].items()))
            run.log(row)
        return run.early_stop(row["eval_pass@1"], higher_is_better=True)  # True: stop early

    def micro_batches(rows):
        """rows (list of (Rollout, advantage or None)) as micro-batches sorted by length (less padding):
        a list of (advantages fp32 [B] or None, inputs, targets, tokens fed)."""
        rows = sorted(rows, key=lambda ra: len(ra[0].prompt) + len(ra[0].tokens))
        out = []
        for i in range(0, len(rows), B):
            chunk = rows[i : i + B]
            x, y = collate_rollouts([r for r, _ in chunk], tokenizer.bos_token_id, device)
            adv = torch.tensor([a for _, a in chunk], dtype=torch.float32, device=device) if chunk[0][1] is not None else None
            out.append((adv, x, y, sum(len(r.prompt) + len(r.tokens) - 1 for r, _ in chunk)))
        return out

    def optimizer_step():
        for p in model.parameters():  # a rank with nothing to train on joins the collective update with zero gradients
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grad_norm = optimizer.step()
        model.zero_grad(set_to_none=True)
        return float(grad_norm)

    # -------------------------------------------------------------------------------- loop
    for step in run.steps(num_iterations):
        if run.due(args.eval_every, at_start=True) and evaluate():
            break
        # ---- sample K completions of this rank's questions and score them
        mine = step_questions(step)
        conversations = [train_task[i] for i, _ in mine]
        batch, groups = args.sampling_batch_size or len(mine), []
        model.eval()
        with run.interruptible():
            for b in range(0, len(mine), batch):
                prompts = [tokenizer.render_for_completion(c) for c in conversations[b : b + batch]]
                groups += sample_rollouts(engine, prompts, K, args.max_new_tokens, args.temperature, args.top_k or None, [s for _, s in mine[b : b + batch]])
        model.train()
        for conversation, group in zip(conversations, groups):
            for r in group:
                r.correct = bool(train_task.evaluate(conversation, r.text))
                r.reward = float(train_task.reward(conversation, r.text)) + args.format_reward * (extract_answer(r.text) is not None)
        rollouts = [r for g in groups for r in g]

        # ---- update
        stats = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "kept": 0.0}
        fed, grad_norm = 0, None
        if args.algo == "grpo":
            adv = group_advantages([[r.reward for r in g] for g in groups], normalize_std=args.adv_norm == "std")
            # Token-level mean over every sampled token of the batch (all ranks). Completions with zero advantage
            # (groups all right or all wrong) add only their tokens to the normaliser: without a KL term they skip the update.
            (n_sampled,) = all_sum([sum(sum(r.mask) for r in rollouts)])
            active = [(r, a) for r, a in zip(rollouts, adv.flatten().tolist()) if a != 0.0 or args.kl_coef > 0]
            batches = micro_batches(active)
            old_logprobs, ref_logprobs = [], []
            for epoch in range(args.ppo_epochs if all_sum([len(active)])[0] > 0 else 0):
                for i, (a, x, y, n_fed) in enumerate(batches):
                    lp = token_logprobs(model, x, y)
                    if epoch == 0:  # the sampling policy (the ratio is 1 in this first pass) and the reference
                        old_logprobs.append(lp.detach())
                        with torch.no_grad():
                            ref_logprobs.append(token_logprobs(ref_model, x, y) if ref_model is not None else None)
                    loss, st = policy_gradient_loss(lp, a, y >= 0, n_sampled, old_logprobs[i], args.clip_eps, ref_logprobs[i], args.kl_coef)
                    (loss * world_size).backward()  # the optimizer averages gradients over ranks
                    fed += n_fed
                    if epoch == args.ppo_epochs - 1:
                        stats["loss"], stats["clipped"], stats["kl"] = stats["loss"] + loss.item(), stats["clipped"] + st["clipped"].item(), stats["kl"] + st["kl"].item()
                grad_norm = optimizer_step()
        else:
            kept = select_correct(groups, args.rsft_max_per_question or None)
            stats["kept"] = len(kept)
            lines = [json.dumps({"step": step + 1, "question": mine[q][0], "reward": groups[q][s].reward} | rollout_to_conversation(tokenizer, conversations[q], groups[q][s])) for q, s in kept]
            all_lines = [line for part in run.gather(lines) for line in part]
            if rank == 0 and all_lines:
                with open(samples_path, "a") as fh:
                    fh.write("\n".join(all_lines) + "\n")
            (n_sampled,) = all_sum([sum(sum(groups[q][s].mask) for q, s in kept)])
            batches = micro_batches([(groups[q][s], None) for q, s in kept])
            for _ in range(args.rsft_epochs if n_sampled > 0 else 0):
                stats["loss"] = 0.0
                for _, x, y, n_fed in batches:
                    loss = model(x, y, loss_reduction="sum") / n_sampled  # mean cross-entropy per trained token of the step
                    (loss * world_size).backward()
                    fed += n_fed
                    stats["loss"] += loss.item()
                grad_norm = optimizer_step()

        # ---- metrics over all ranks
        digest = hashlib.sha256(json.dumps([[r.tokens, r.reward] for r in rollouts]).encode()).hexdigest()[:16]
        local = [len(rollouts), sum(r.reward for r in rollouts), sum(r.correct for r in rollouts), sum(pass_at_k(K, sum(r.correct for r in g), K) for g in groups),
                 len(groups), sum(len(r.tokens) for r in rollouts), sum(r.finish == "length" for r in rollouts), fed, stats["loss"], stats["clipped"], stats["kl"], stats["kept"]]
        (n, reward_sum, correct, pass_k_sum, n_q, gen_tokens, truncated, fed, loss_sum, clipped, kl_sum, kept_n) = all_sum(local)
        row = {"reward": reward_sum / n, "train_pass@1": correct / n, f"train_pass@{K}": pass_k_sum / n_q, "gen_tokens": int(gen_tokens), "mean_len": gen_tokens / n,
               "truncated": truncated / n, "grad_norm": grad_norm, "skipped": grad_norm is None, "samples_sha": ",".join(run.gather(digest))}
        if args.algo == "grpo":
            row |= {"clip_frac": clipped / max(n_sampled, 1), "kl": kl_sum / max(n_sampled, 1)}
        else:
            row["kept"] = int(kept_n)
        flops = run.flops_per_token * fed + run.flops_per_token / 3 * gen_tokens  # forward + backward of the updates, forward of the decode
        run.log_step(loss_sum, gen_tokens, flops=flops, show=("reward", "train_pass@1", f"train_pass@{K}", "mean_len"), **row)
    else:
        evaluate()

    # -------------------------------------------------------------------------------- wrap-up
    metrics = {"num_params": model.num_params()}
    for name, ev in (("before", run.loop.get("first_eval")), ("after", run.loop.get("last_eval"))):
        metrics |= {f"gsm8k_pass@1_{name}": ev.get("eval_pass@1"), f"gsm8k_pass@{args.eval_samples}_{name}": ev.get(f"eval_pass@{args.eval_samples}")} if ev else {}
    print0("GSM8K test: " + ", ".join(f"{key} {v:.4f}" for key, v in metrics.items() if key.startswith("gsm8k") and v is not None))
    run.finish(**metrics)


if __name__ == "__main__":
    run_main(main)
