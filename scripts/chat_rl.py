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
    python -m scripts.chat_rl --algo rsft --num-steps 50

Each step's questions are split over the ranks; each rank samples and trains on its share. Every
step logs reward, pass@1 / pass@K of the sampled groups and tokens/s; every --eval-every steps (and
before and after training) pass@1 and pass@k on the GSM8K test split (nanochat/chat_eval.py).
Metrics: <base_dir>/checkpoints/rl/<tag>/run/metrics.jsonl.
"""

import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from nanochat import report
from nanochat.chat_eval import evaluate_task, load_chat_task, pass_at_k
from nanochat.checkpoint_manager import build_model, checkpoint_dir, find_last_step, find_latest_model_tag, list_steps, load_checkpoint, load_model, save_checkpoint
from nanochat.common import NanochatError, compute_cleanup, compute_init, print0, run_main
from nanochat.engine import Engine
from nanochat.optim import build_optimizer
from nanochat.rl import collate_rollouts, group_advantages, policy_gradient_loss, rollout_to_conversation, sample_rollouts, select_correct, token_logprobs
from nanochat.tokenizer import get_tokenizer
from nanochat.training import MetricsLogger, StepTimer, StopSignal, check_finite, format_eta, get_peak_flops, get_rng_state, set_rng_state
from tasks.gsm8k import GSM8K, extract_answer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RL (GRPO) or rejection-sampling fine-tuning on GSM8K")
    p.add_argument("--algo", type=str, default="grpo", choices=["grpo", "rsft"], help="grpo: group-normalised policy gradient; rsft: fine-tune on the correct samples")
    # source
    p.add_argument("--source", type=str, default="sft", choices=["sft", "mid"], help="stage of the starting checkpoint")
    p.add_argument("--model-tag", type=str, default=None, help="model tag of the source and of the output (default: the latest of the source stage)")
    p.add_argument("--step", type=int, default=None, help="source checkpoint step (default: the last)")
    p.add_argument("--tasks-dir", type=str, default=None, help="local task data (default: $NANOCHAT_TASKS_DIR or <base_dir>/tasks)")
    # horizon and sampling
    p.add_argument("--num-steps", type=int, default=None, help="RL steps (default: --num-epochs passes over GSM8K train)")
    p.add_argument("--num-epochs", type=float, default=1.0, help="passes over the GSM8K train questions when --num-steps is not given")
    p.add_argument("--questions-per-step", type=int, default=16, help="questions per step, all ranks (a multiple of the number of ranks)")
    p.add_argument("--num-samples", type=int, default=16, help="completions sampled per question (K, the group size)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per completion at most (tool output included)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of training rollouts and of the evaluation")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--sampling-batch-size", type=int, default=0, help="questions decoded together per rank (0: all of the rank's questions of the step)")
    # objective
    p.add_argument("--format-reward", type=float, default=0.0, help="reward added when the completion ends in a well-formed '#### <number>' (0: off)")
    p.add_argument("--adv-norm", type=str, default="std", choices=["std", "mean"], help="advantage = (r - group mean) / group std (GRPO), or r - group mean only")
    p.add_argument("--ppo-epochs", type=int, default=1, help="optimizer updates per sampled batch (1: on-policy; > 1: PPO-style reuse with the clipped ratio)")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO ratio clip (only acts when --ppo-epochs > 1)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="weight of the per-token KL penalty to the frozen starting model (0: no KL, no reference model)")
    p.add_argument("--rsft-epochs", type=int, default=1, help="rsft: optimizer updates on each step's kept samples")
    p.add_argument("--rsft-max-per-question", type=int, default=0, help="rsft: correct samples kept per question at most (0: all)")
    # optimizer (SFT's base learning rates times --init-lr-frac, linear decay to 0)
    p.add_argument("--device-batch-size", type=int, default=8, help="completions per forward/backward micro-batch")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="peak LR as a fraction of the base learning rates below")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="base Muon learning rate (times --init-lr-frac)")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="base AdamW learning rate of the embedding (times --init-lr-frac)")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="base AdamW learning rate of lm_head (times --init-lr-frac)")
    p.add_argument("--scalar-lr", type=float, default=0.5, help="base AdamW learning rate of scalars (times --init-lr-frac)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of the Muon matrices")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm to this (0: no clipping)")
    # evaluation, checkpoints, logging
    p.add_argument("--eval-every", type=int, default=60, help="steps between GSM8K test evaluations (-1: only before and after training)")
    p.add_argument("--eval-problems", type=int, default=400, help="GSM8K test problems per evaluation (-1: all 1319)")
    p.add_argument("--eval-samples", type=int, default=8, help="completions per test problem: pass@1 .. pass@k up to this k")
    p.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest RL checkpoint of this model tag")
    p.add_argument("--resume-if-exists", action="store_true", help="--resume when an RL checkpoint exists, else start from the source (for recipes re-run after a failure)")
    p.add_argument("--run", type=str, default=None, help="wandb run name (no wandb logging when not given)")
    p.add_argument("--seed", type=int, default=42, help="seed of the question order and of the samples")
    p.add_argument("--device-type", type=str, default=None, help="cuda | cpu | mps (default: autodetect)")
    p.add_argument("--stop-at-step", type=int, default=-1, help=argparse.SUPPRESS)  # test hook: act as if SIGTERM arrived
    args = p.parse_args(argv)
    checks = [
        ("--questions-per-step", args.questions_per_step >= 1),
        ("--num-samples", args.num_samples >= (2 if args.algo == "grpo" else 1)),
        ("--max-new-tokens", args.max_new_tokens >= 1),
        ("--temperature", args.temperature > 0),
        ("--top-k", args.top_k >= 0),
        ("--sampling-batch-size", args.sampling_batch_size >= 0),
        ("--ppo-epochs", args.ppo_epochs >= 1),
        ("--clip-eps", args.clip_eps >= 0),
        ("--kl-coef", args.kl_coef >= 0),
        ("--rsft-epochs", args.rsft_epochs >= 1),
        ("--rsft-max-per-question", args.rsft_max_per_question >= 0),
        ("--device-batch-size", args.device_batch_size >= 1),
        ("--eval-problems", args.eval_problems == -1 or args.eval_problems >= 1),
        ("--eval-samples", args.eval_samples >= 1),
        ("--num-epochs", args.num_epochs > 0),
        ("--num-steps", args.num_steps is None or args.num_steps >= 1),
    ]
    for flag, ok in checks:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            hint = " (GRPO needs a group of >= 2 samples)" if flag == "--num-samples" else ""
            raise NanochatError(f"{flag} {value} is out of range{hint}")
    return args


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, _, world_size, device = compute_init(args.device_type, seed=args.seed)
    print0(json.dumps(vars(args)))
    if args.questions_per_step % world_size:
        raise NanochatError(f"--questions-per-step {args.questions_per_step} is not a multiple of the {world_size} ranks")

    # -------------------------------------------------------------------------------- model
    if args.resume_if_exists and not args.resume:
        tag = args.model_tag or find_latest_model_tag(args.source)
        args.resume = bool(list_steps(checkpoint_dir("rl", tag)))
    resume_meta = None
    if args.resume:
        model_tag = args.model_tag or find_latest_model_tag("rl")
        ckpt_dir = checkpoint_dir("rl", model_tag)
        start_step = find_last_step(ckpt_dir)
        model_state, optim_state, resume_meta = load_checkpoint(ckpt_dir, start_step, device, load_optimizer=True, rank=rank)
        for key in ("algo", "questions_per_step", "num_samples", "seed"):  # they define the samples of every step
            if resume_meta["args"][key] != getattr(args, key):
                flag = "--" + key.replace("_", "-")
                raise NanochatError(f"--resume: the checkpoint in {ckpt_dir} was trained with {flag} {resume_meta['args'][key]}, not {getattr(args, key)}")
        model = build_model(model_state, resume_meta, device)
        del model_state
        tokenizer = get_tokenizer()
        if tokenizer.vocab_size != model.config.vocab_size:
            raise NanochatError(f"tokenizer vocab_size {tokenizer.vocab_size} != model vocab_size {model.config.vocab_size} ({ckpt_dir})")
        source, source_step, num_steps = resume_meta["source"], resume_meta["source_step"], resume_meta["num_steps"]
    else:
        model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag, step=args.step)
        model_tag, source, source_step, start_step, num_steps = args.model_tag or meta["model_tag"], args.source, meta["step"], 0, None
        ckpt_dir = checkpoint_dir("rl", model_tag)
    print0(f"{args.algo} on the {source} model {model_tag} (step {source_step}): {model.num_params():,} parameters, {model.config}")
    # The reference for the KL penalty is the starting model, also after a resume.
    ref_model = load_model(source, device, model_tag=model_tag, step=source_step)[0] if args.kl_coef > 0 else None
    if ref_model is not None:
        ref_model.requires_grad_(False)
    engine = Engine(model, tokenizer)
    # No torch.compile: rollouts change shape every step (prompt and completion lengths), and the
    # decode loop dominates a step anyway.

    # -------------------------------------------------------------------------------- data
    train_task = GSM8K(split="train", tasks_dir=args.tasks_dir)
    eval_task = load_chat_task("GSM8K", args.tasks_dir)
    order = np.random.default_rng(args.seed).permutation(len(train_task)).tolist()
    Q, K = args.questions_per_step, args.num_samples
    if num_steps is None:
        num_steps = args.num_steps or max(1, int(args.num_epochs * len(train_task) / Q))
    print0(f"{len(train_task):,} GSM8K train questions; {num_steps} steps x {Q} questions x {K} samples on {world_size} rank(s)")

    def step_questions(step):
        """This rank's (question index, sampling seed) pairs for a step: a fixed function of the step
        (resuming needs no loader state) and of nothing about the world size."""
        out = []
        for j in range(rank, Q, world_size):
            n = step * Q + j
            out.append((order[n % len(order)], args.seed * 1_000_003 + n))
        return out

    # -------------------------------------------------------------------------------- optimizer
    f = args.init_lr_frac
    optimizer = build_optimizer(
        model,
        matrix_lr=args.matrix_lr * f,
        embedding_lr=args.embedding_lr * f,
        unembedding_lr=args.unembedding_lr * f,
        scalar_lr=args.scalar_lr * f,
        weight_decay=args.weight_decay,
        model_dim=model.config.n_embd,
        grad_clip=args.grad_clip,
    )
    loop_state = {}
    if resume_meta:
        optimizer.load_state_dict(optim_state)
        del optim_state
        loop_state = resume_meta["loop_state"]
        set_rng_state(resume_meta["rng_state"][rank])
        print0(f"resumed from {ckpt_dir} at step {start_step}")

    run_dir = os.path.join(ckpt_dir, "run")
    logger = MetricsLogger(run_dir, vars(args), args.run, rank=rank, resume_step=start_step if args.resume else None)
    samples_path = os.path.join(run_dir, "rsft_samples.jsonl")
    if rank == 0 and args.algo == "rsft":
        keep_sample_lines(samples_path, start_step if args.resume else None)
    stop = StopSignal()
    timer = StepTimer(device)
    peak_flops = get_peak_flops(device)
    flops_per_token = model.estimate_flops()  # training (forward + backward); a forward alone is ~1/3
    pad_id = tokenizer.bos_token_id

    def all_sum(values, op=None):
        """Sum (or op) a list of floats over ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    def gather_list(obj):
        if not ddp:
            return [obj]
        out = [None] * world_size
        dist.all_gather_object(out, obj)
        return out

    def save(step):
        meta = {
            "stage": "rl",
            "source": source,
            "source_step": source_step,
            "model_tag": model_tag,
            "step": step,
            "num_steps": num_steps,
            "model_config": model.config.to_dict(),
            "args": vars(args),
            "loop_state": loop_state,
            "rng_state": gather_list(get_rng_state()),
        }
        return save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer.state_dict(), meta, rank=rank, keep_last=args.keep_last)

    def evaluate(step):
        model.eval()
        r = evaluate_task(
            model, tokenizer, "GSM8K", eval_task, max_problems=args.eval_problems, num_samples=args.eval_samples,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None, seed=args.seed,
        )
        row = {"step": step} | {f"eval_pass@{k}": v for k, v in r["pass_at_k"].items()}
        scores = " | ".join(f"pass@{k} {v:.4f}" for k, v in r["pass_at_k"].items())
        print0(f"step {step:05d} | GSM8K test ({r['problems']} problems, {args.eval_samples} samples, T={args.temperature}) | {scores} | {r['time_s']:.0f}s")
        logger.log(row)
        return row

    def micro_batches(rows):
        """rows (list of (Rollout, advantage or None)) as training micro-batches, sorted by length
        (less padding): a list of (advantages fp32 [B] or None, inputs, targets, tokens fed)."""
        rows = sorted(rows, key=lambda ra: len(ra[0].prompt) + len(ra[0].tokens))
        out = []
        for i in range(0, len(rows), args.device_batch_size):
            chunk = rows[i : i + args.device_batch_size]
            x, y = collate_rollouts([r for r, _ in chunk], pad_id, device)
            adv = torch.tensor([a for _, a in chunk], dtype=torch.float32, device=device) if chunk[0][1] is not None else None
            out.append((adv, x, y, sum(len(r.prompt) + len(r.tokens) - 1 for r, _ in chunk)))
        return out

    def optimizer_step():
        # A rank whose share had nothing to train on still joins the collective update with zero gradients.
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grad_norm = optimizer.step()
        model.zero_grad(set_to_none=True)
        return float(grad_norm)

    # -------------------------------------------------------------------------------- loop
    step = start_step
    total_time = loop_state.get("total_time", 0.0)
    first_eval = loop_state.get("first_eval")
    last_eval = loop_state.get("last_eval")
    while True:
        last_step = step == num_steps
        if step == args.stop_at_step and step > start_step:
            stop.requested, stop.signal_name = True, "--stop-at-step"
        eval_due = (step == 0 and not args.resume) or (args.eval_every > 0 and step % args.eval_every == 0 and step > start_step)
        if last_step or (eval_due and not stop.requested):  # a stop request saves first, evaluating costs minutes
            last_eval = evaluate(step)
            first_eval = first_eval or last_eval
        if last_step or stop.requested or (args.save_every > 0 and step % args.save_every == 0 and step > start_step):
            loop_state.update(total_time=total_time, first_eval=first_eval, last_eval=last_eval)
            print0(f"saved checkpoint {save(step)}")
        if stop.requested:
            print0(f"{stop.signal_name}: checkpoint saved at step {step}; continue with --resume")
            break
        if last_step:
            break

        # ---- sample K completions of this rank's questions and score them
        timer.start()
        model.eval()
        mine = step_questions(step)
        conversations = [train_task[i] for i, _ in mine]
        batch = args.sampling_batch_size or len(mine)
        groups = []
        for b in range(0, len(mine), batch):
            prompts = [tokenizer.render_for_completion(c) for c in conversations[b : b + batch]]
            seeds = [s for _, s in mine[b : b + batch]]
            groups += sample_rollouts(engine, prompts, K, args.max_new_tokens, args.temperature, args.top_k or None, seeds)
        for conversation, group in zip(conversations, groups):
            for r in group:
                r.correct = bool(train_task.evaluate(conversation, r.text))
                r.reward = float(train_task.reward(conversation, r.text)) + args.format_reward * (extract_answer(r.text) is not None)
        sample_time = timer.stop()
        timer.start()
        model.train()

        # ---- update
        lrm = 1.0 - step / num_steps  # linear decay to zero
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        rollouts = [r for g in groups for r in g]
        stats = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "kept": 0.0}
        fed, grad_norm = 0, None
        if args.algo == "grpo":
            adv = group_advantages([[r.reward for r in g] for g in groups], normalize_std=args.adv_norm == "std")
            # Token-level mean over every sampled token of the batch (all ranks). Completions with
            # zero advantage (groups that were all right or all wrong) add nothing but their tokens
            # to the normaliser, so without a KL term they skip the forward and backward.
            n_sampled, = all_sum([sum(sum(r.mask) for r in rollouts)])
            active = [(r, a) for r, a in zip(rollouts, adv.flatten().tolist()) if a != 0.0 or args.kl_coef > 0]
            n_active, = all_sum([len(active)])
            batches = micro_batches(active)
            old_logprobs, ref_logprobs = [], []
            for epoch in range(args.ppo_epochs if n_active > 0 else 0):
                last_epoch = epoch == args.ppo_epochs - 1
                for i, (a, x, y, n_fed) in enumerate(batches):
                    lp = token_logprobs(model, x, y)
                    if epoch == 0:  # the sampling policy (the ratio is 1 in this first pass) and the reference
                        old_logprobs.append(lp.detach())
                        with torch.no_grad():
                            ref_logprobs.append(token_logprobs(ref_model, x, y) if ref_model is not None else None)
                    loss, st = policy_gradient_loss(lp, a, y >= 0, n_sampled, old_logprobs[i], args.clip_eps, ref_logprobs[i], args.kl_coef)
                    (loss * world_size).backward()  # the optimizer averages gradients over ranks
                    fed += n_fed
                    if last_epoch:
                        stats["loss"] += loss.item()
                        stats["clipped"] += st["clipped"].item()
                        stats["kl"] += st["kl"].item()
                grad_norm = optimizer_step()
        else:
            kept = select_correct(groups, args.rsft_max_per_question or None)
            stats["kept"] = len(kept)
            lines = [
                json.dumps({"step": step + 1, "question": mine[q][0], "reward": groups[q][s].reward} | rollout_to_conversation(tokenizer, conversations[q], groups[q][s]))
                for q, s in kept
            ]
            all_lines = [line for part in gather_list(lines) for line in part]
            if rank == 0 and all_lines:
                with open(samples_path, "a") as fh:
                    fh.write("\n".join(all_lines) + "\n")
            n_sampled, = all_sum([sum(sum(groups[q][s].mask) for q, s in kept)])
            batches = micro_batches([(groups[q][s], None) for q, s in kept])
            for _ in range(args.rsft_epochs if n_sampled > 0 else 0):
                stats["loss"] = 0.0
                for _, x, y, n_fed in batches:
                    loss = model(x, y, loss_reduction="sum") / n_sampled  # mean cross-entropy per trained token of the step
                    (loss * world_size).backward()
                    fed += n_fed
                    stats["loss"] += loss.item()
                grad_norm = optimizer_step()
        train_time = timer.stop()
        dt = sample_time + train_time
        step += 1

        # ---- metrics over all ranks
        n_q = len(groups)
        local = [
            len(rollouts), sum(r.reward for r in rollouts), sum(r.correct for r in rollouts),
            sum(pass_at_k(K, sum(r.correct for r in g), K) for g in groups), n_q,
            sum(len(r.tokens) for r in rollouts), sum(r.finish == "length" for r in rollouts), fed,
            stats["loss"], stats["clipped"], stats["kl"], stats["kept"],
        ]
        (n, reward_sum, correct, pass_k_sum, n_q, gen_tokens, truncated, fed, loss_sum, clipped, kl_sum, kept_n) = all_sum(local)
        sample_time, train_time, dt = all_sum([sample_time, train_time, dt], op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        skipped = grad_norm is None
        loss_value = loss_sum  # each rank's micro-batch losses are already divided by the global token count
        check_finite(loss_value, step, ckpt_dir)
        total_time += dt
        n_tokens = max(n_sampled, 1)
        flops = flops_per_token * fed + flops_per_token / 3 * gen_tokens  # forward + backward of the updates, forward of the decode
        mfu = flops / dt / (peak_flops * world_size) if peak_flops else None
        row = {
            "step": step,
            "reward": reward_sum / n,
            "train_pass@1": correct / n,
            f"train_pass@{K}": pass_k_sum / n_q,
            "gen_tokens": int(gen_tokens),
            "mean_len": gen_tokens / n,
            "truncated": truncated / n,
            "loss": loss_value,
            "grad_norm": grad_norm,
            "lr_mult": lrm,
            "skipped": skipped,
            "dt": dt,
            "sample_time": sample_time,
            "tok_per_s": gen_tokens / dt,
            "sample_tok_per_s": gen_tokens / sample_time,
            "train_tok_per_s": fed / train_time,
            "mfu": mfu,
            "time": total_time,
        }
        if args.algo == "grpo":
            row |= {"clip_frac": clipped / n_tokens, "kl": kl_sum / n_tokens}
        else:
            row["kept"] = int(kept_n)
        eta = (num_steps - step) * total_time / (step - start_step)
        extra = f"kept {int(kept_n)}/{int(n)}" if args.algo == "rsft" else f"loss {loss_value:+.3e}"
        print0(
            f"step {step:05d}/{num_steps} | reward {row['reward']:.3f} | pass@1 {row['train_pass@1']:.3f} | pass@{K} {row[f'train_pass@{K}']:.3f} | "
            f"{extra}{' (no signal: skipped)' if skipped else ''} | len {row['mean_len']:.0f} | {dt:.1f}s | {row['tok_per_s']:,.0f} tok/s | eta {format_eta(eta)}"
        )
        logger.log(row)

    # -------------------------------------------------------------------------------- wrap-up
    if step == num_steps and not stop.requested:
        k = args.eval_samples
        metrics = {"train_time_s": total_time, "num_params": model.num_params()}
        for name, ev in (("before", first_eval), ("after", last_eval)):
            if ev:
                metrics |= {f"gsm8k_pass@1_{name}": ev.get("eval_pass@1"), f"gsm8k_pass@{k}_{name}": ev.get(f"eval_pass@{k}")}
        print0("GSM8K test: " + ", ".join(f"{key} {v:.4f}" for key, v in metrics.items() if key.startswith("gsm8k") and v is not None))
        logger.log({"step": step} | metrics)
        report.log_stage("chat_rl", args=vars(args), metrics=metrics, metrics_file=logger.path)
    logger.finish()
    print0(f"training time {total_time:.1f}s")
    compute_cleanup()


def keep_sample_lines(path, resume_step):
    """The RSFT samples file, as the metrics log: a fresh run starts it empty, a resumed one drops
    the lines of steps after the checkpoint (rewritten atomically)."""
    if not os.path.exists(path):
        return
    if resume_step is None:
        os.remove(path)
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


if __name__ == "__main__":
    run_main(main)
