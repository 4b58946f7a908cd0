"""
Reinforcement learning with GRPO on a verifiable task (stage "sft" -> stage "rl"): GSM8K by default,
or any task whose evaluate() / reward() judge a completion (--task MultiHop).

For each prompt sample K completions with the engine (python tool on); reward = the task's verdict
(tasks/*.py reward(); plus --format-reward for a well-formed "#### <number>" on GSM8K, off by
default); advantages standardised within each prompt's group; a token-level policy-gradient loss on
the sampled tokens only (prompt and tool-forced tokens are masked out). On-policy: one update per
batch, no KL term. Options: --ppo-epochs > 1 reuses a batch with PPO's clipped ratio (--clip-eps),
--kl-coef > 0 penalises the KL to the frozen starting model. Rejection-sampling fine-tuning is its
own stage, scripts/chat_rsft.py. Methods and sources: nanochat/rl.py, docs/rl.md.

    python -m scripts.chat_rl                                     # latest SFT model, one epoch of GSM8K train
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl
    python -m scripts.chat_rl --task MultiHop --buckets easy,medium --num-iterations 200

Before training it prints how the prompts' difficulty buckets and lengths compare with the
evaluation set's (nanochat/distribution.py), with a warning when they diverge. Each step's prompts
are split over the ranks; each rank samples and trains on its share. Every step logs reward, pass@1
/ pass@K of the sampled groups, the mean coverage (tasks with score(): MultiHop) and tokens/s; every
--eval-every steps (and before and after training) pass@1 and pass@k on the --eval-task test split,
per bucket for tasks with buckets (nanochat/chat_eval.py). Metrics:
<base_dir>/checkpoints/rl/<tag>/run/metrics.jsonl. The base learning rates, dtype and micro-batch
size default to the SFT checkpoint's; the run skeleton (resume, save, stop, step log) is
nanochat.training.RunState.
"""

import argparse

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.common import NanochatError, print0, run_main
from nanochat.engine import Engine
from nanochat.rl import (add_rl_args, all_sum, check_rl_args, check_rl_run, check_task_names, eval_summary, evaluate_policy, group_advantages, load_rl_data, log_rl_step, print_reward_trend, prompt_schedule, reward_trend,
                         micro_batches, optimizer_step, policy_gradient_loss, sample_step, token_logprobs)
from nanochat.training import RunState, add_run_args, parse_run_args
from tasks.gsm8k import extract_answer
from tasks.recipe import TASKS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RL with GRPO on a verifiable task (GSM8K, MultiHop, ...)")
    g = add_rl_args(p, sources=["sft", "mid", "rsft"])
    g.add_argument("--format-reward", type=float, default=0.0, help="GSM8K only: reward added when the completion ends in a well-formed '#### <number>' (0: off)")
    g.add_argument("--coverage-reward", type=float, default=0.0, help="tasks that score a reasoning path (MultiHop): reward added per unit of path coverage, a process reward (0: off; the logged train_pass@1 stays the answer's)")
    g.add_argument("--adv-norm", type=str, default="std", choices=["std", "mean"], help="advantage = (r - group mean) / group std (GRPO), or r - group mean only")
    g.add_argument("--ppo-epochs", type=int, default=1, help="optimizer updates per sampled batch (1: on-policy; > 1: PPO-style reuse with the clipped ratio)")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO ratio clip (only acts when --ppo-epochs > 1)")
    g.add_argument("--kl-coef", type=float, default=0.0, help="weight of the per-token KL penalty to the frozen starting model (0: no KL, no reference model)")
    add_run_args(p, parent="sft", token_batches=False, eval_every=60, init_lr_frac=0.05, warmdown_ratio=1.0, compile=0)
    args = parse_run_args(p, argv)
    check_rl_args(args, min_samples=2, checks=[("--ppo-epochs", args.ppo_epochs >= 1), ("--clip-eps", args.clip_eps >= 0), ("--kl-coef", args.kl_coef >= 0)])
    if args.format_reward and args.task != "GSM8K":
        raise NanochatError(f"--format-reward rewards GSM8K's '#### <number>' form; --task {args.task} has no such format")
    if args.coverage_reward < 0:
        raise NanochatError(f"--coverage-reward must be >= 0, got {args.coverage_reward}")
    args = check_task_names(TASKS, args)
    if args.coverage_reward and not callable(getattr(TASKS[args.task], "score", None)):
        raise NanochatError(f"--coverage-reward needs a task that scores a reasoning path (score()); --task {args.task} has none")
    return args


def main(argv=None):
    args = parse_args(argv)
    run = RunState("rl", args, parent=args.source)
    device, rank, world_size, tokenizer = run.device, run.rank, run.world_size, run.tokenizer
    if run.resuming and run.meta["args"].get("algo", "grpo") != "grpo":
        raise NanochatError(f"--resume: {run.ckpt_dir} is an --algo {run.meta['args']['algo']} run of the former chat_rl; RSFT is now its own stage, scripts.chat_rsft")
    check_rl_run(run, args, ("task", "split", "buckets", "max_prompts", "questions_per_step", "num_samples", "seed"))  # they define the samples of every step
    model = run.load_model()
    model.compute_dtype = run.compute_dtype()
    # The reference for the KL penalty is the starting model, also after a resume.
    ref_model = load_model(run.parent_info["stage"], device, model_tag=run.parent_info["model_tag"], step=run.parent_info["step"])[0].requires_grad_(False) if args.kl_coef > 0 else None
    engine = Engine(model, tokenizer)  # no torch.compile: rollouts change shape every step, and decoding dominates a step

    # -------------------------------------------------------------------------------- data
    # the verifier, the prompts (--buckets), the evaluation; prints the prompts' bucket and length mix against the evaluation's
    task, pool, eval_task, shift = load_rl_data(TASKS, args, tokenizer)
    eval_name = args.eval_task or args.task
    order, num_iterations = prompt_schedule(run, args, pool)
    K, B = args.num_samples, run.resolve("device_batch_size", 8)

    # -------------------------------------------------------------------------------- optimizer, loop
    optimizer = run.build_optimizer(model)  # MuonAdamW over the model, or AdamW over the LoRA adapters only
    run.start(model, optimizer)
    for step in run.steps(num_iterations):
        if run.due(args.eval_every, at_start=True) and evaluate_policy(run, model, eval_name, eval_task, args):
            break
        # ---- sample K completions of this rank's prompts and score them with the task's verifier
        mine, _, groups = sample_step(run, engine, task, pool, order, step, args)
        rollouts = [r for g in groups for r in g]
        for r in rollouts if args.format_reward else ():  # GSM8K only (parse_args)
            r.reward += args.format_reward * (extract_answer(r.text) is not None)
        for r in rollouts if args.coverage_reward else ():  # tasks whose score() gives a coverage
            r.reward += args.coverage_reward * (r.coverage or 0.0)

        # ---- update
        stats = {"loss": 0.0, "clipped": 0.0, "kl": 0.0}
        fed, grad_norm = 0, None
        adv = group_advantages([[r.reward for r in g] for g in groups], normalize_std=args.adv_norm == "std")
        # Token-level mean over every sampled token of the batch (all ranks). Completions with zero advantage
        # (groups all right or all wrong) add only their tokens to the normaliser: without a KL term they skip the update.
        (n_sampled,) = all_sum([sum(sum(r.mask) for r in rollouts)], device)
        active = [(r, a) for r, a in zip(rollouts, adv.flatten().tolist()) if a != 0.0 or args.kl_coef > 0]
        batches = micro_batches(active, B, tokenizer.bos_token_id, device)
        old_logprobs, ref_logprobs = [], []
        for epoch in range(args.ppo_epochs if all_sum([len(active)], device)[0] > 0 else 0):
            for i, (a, x, y, n_fed) in enumerate(batches):
                lp = token_logprobs(model, x, y, args.temperature)  # of the distribution that sampled: on-policy
                if epoch == 0:  # the sampling policy (the ratio is 1 in this first pass) and the reference
                    old_logprobs.append(lp.detach())
                    with torch.no_grad():
                        ref_logprobs.append(token_logprobs(ref_model, x, y, args.temperature) if ref_model is not None else None)
                loss, st = policy_gradient_loss(lp, a, y >= 0, n_sampled, old_logprobs[i], args.clip_eps, ref_logprobs[i], args.kl_coef)
                (loss * world_size).backward()  # the optimizer averages gradients over ranks
                fed += n_fed
                if epoch == args.ppo_epochs - 1:
                    stats["loss"], stats["clipped"], stats["kl"] = stats["loss"] + loss.item(), stats["clipped"] + st["clipped"].item(), stats["kl"] + st["kl"].item()
            grad_norm = optimizer_step(model, optimizer)

        # ---- metrics over all ranks
        loss_sum, clipped, kl_sum, fed = all_sum([stats["loss"], stats["clipped"], stats["kl"], fed], device)
        log_rl_step(run, groups, K, loss_sum, fed, mine, pool, show=("mean_len",), clip_frac=clipped / max(n_sampled, 1), kl=kl_sum / max(n_sampled, 1),
                    grad_norm=grad_norm, skipped=grad_norm is None)
    else:
        evaluate_policy(run, model, eval_name, eval_task, args)

    # -------------------------------------------------------------------------------- wrap-up
    trend = reward_trend(run.logger.path)  # the training reward's first and last fifth of the steps, and of revisited prompts (rank 0)
    print_reward_trend(trend)
    run.finish(num_params=model.num_params(), **shift, **trend, **eval_summary(run, eval_name, args.eval_split, args.eval_samples))


if __name__ == "__main__":
    run_main(main)
