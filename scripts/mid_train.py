"""
Midtraining: continue a base checkpoint on a mixture of conversations (chat, multiple choice,
GSM8K with python tool calls, spelling, identity) so that it learns the chat format, the special
tokens and the tool. Conversations are packed best-fit into BOS-aligned rows of max_seq_len + 1
tokens with the loss only on the assistant's tokens (nanochat/chat_data.py).

    python -m scripts.mid_train                                  # latest base checkpoint, tasks/recipes/mid.json
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train --model-tag d20

The optimizer, LR schedule, checkpoint format and logging are base training's; the batch size,
context length and learning rates default to the base run's (its checkpoint meta).
"""

import argparse
import json
import math
import os

import numpy as np
import torch

from nanochat import report
from nanochat.chat_data import ConversationLoader, estimate_tokens
from nanochat.checkpoint_manager import build_model, checkpoint_dir, find_last_step, find_latest_model_tag, list_steps, load_checkpoint, load_model, save_checkpoint
from nanochat.common import NanochatError, compute_cleanup, compute_init, print0, run_main
from nanochat.optim import apply_schedules, build_optimizer
from nanochat.scaling import EMBEDDING_LR, MATRIX_LR, SCALAR_LR, UNEMBEDDING_LR
from nanochat.tokenizer import get_tokenizer
from nanochat.training import MetricsLogger, StepTimer, StopSignal, check_finite, format_eta, get_peak_flops, get_rng_state, set_rng_state
from tasks.recipe import load_recipe

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tasks", "recipes", "mid.json")
BASE_LRS = {"matrix_lr": MATRIX_LR, "embedding_lr": EMBEDDING_LR, "unembedding_lr": UNEMBEDDING_LR, "scalar_lr": SCALAR_LR}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Midtrain a base model on a conversation mixture")
    # source and data
    p.add_argument("--model-tag", type=str, default=None, help="model tag of the base checkpoint and of the output (default: the latest base)")
    p.add_argument("--step", type=int, default=None, help="base checkpoint step (default: the last)")
    p.add_argument("--recipe", type=str, default=None, help="JSON/YAML mixture recipe (default: tasks/recipes/mid.json)")
    p.add_argument("--tasks-dir", type=str, default=None, help="local task data (default: $NANOCHAT_TASKS_DIR or <base_dir>/tasks)")
    p.add_argument("--val-conversations", type=int, default=500, help="conversations held out for the val loss")
    p.add_argument("--buffer-size", type=int, default=100, help="conversations the best-fit packer chooses from")
    # horizon and batch
    p.add_argument("--max-seq-len", type=int, default=None, help="tokens per row (default: the model's sequence_len)")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per micro-batch per device (capped at the rows per rank of a step)")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step, all ranks (default: the base run's)")
    p.add_argument("--num-epochs", type=float, default=1.0, help="passes over the training conversations (the step count is estimated from a sample of them)")
    p.add_argument("--num-iterations", type=int, default=None, help="optimizer steps (overrides --num-epochs; with --resume, the new horizon)")
    # optimizer
    p.add_argument("--init-lr-frac", type=float, default=1.0, help="peak LRs as a fraction of the base run's")
    p.add_argument("--matrix-lr", type=float, default=None, help="Muon learning rate before --init-lr-frac (default: the base run's)")
    p.add_argument("--embedding-lr", type=float, default=None, help="AdamW embedding learning rate at n_embd 768 before --init-lr-frac (default: the base run's)")
    p.add_argument("--unembedding-lr", type=float, default=None, help="AdamW lm_head learning rate at n_embd 768 before --init-lr-frac (default: the base run's)")
    p.add_argument("--scalar-lr", type=float, default=None, help="AdamW scalar learning rate before --init-lr-frac (default: the base run's)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of the Muon matrices")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear LR warmup")
    p.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of linear LR warmdown at the end")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end of warmdown, as a fraction of the peak")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm to this (0: no clipping)")
    # evaluation, checkpoints, logging (-1 disables a periodic action)
    p.add_argument("--eval-every", type=int, default=150, help="steps between val loss evaluations (-1: only at the start and end)")
    p.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (older ones are deleted)")
    p.add_argument("--resume", action="store_true", help="continue from the latest mid checkpoint of this model tag")
    p.add_argument("--resume-if-exists", action="store_true", help="--resume when a mid checkpoint exists, else start from base (for recipes re-run after a failure)")
    p.add_argument("--run", type=str, default=None, help="wandb run name (no wandb logging when not given)")
    # runtime
    p.add_argument("--device-type", type=str, default=None, help="cuda | cpu | mps (default: autodetect)")
    p.add_argument("--compile", type=int, default=None, help="torch.compile the model (default: 1 on CUDA, 0 elsewhere)")
    p.add_argument("--seed", type=int, default=42, help="seed of the held-out split")
    p.add_argument("--stop-at-step", type=int, default=-1, help=argparse.SUPPRESS)  # test hook: act as if SIGTERM arrived
    args = p.parse_args(argv)
    for name in ("val_conversations", "buffer_size", "device_batch_size"):
        if getattr(args, name) < (0 if name == "val_conversations" else 1):
            raise NanochatError(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range")
    if args.num_epochs <= 0 or (args.num_iterations is not None and args.num_iterations < 1):
        raise NanochatError("--num-epochs must be > 0 and --num-iterations >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    print0(json.dumps(vars(args)))

    # -------------------------------------------------------------------------------- model
    if args.resume_if_exists and not args.resume:
        tag = args.model_tag or find_latest_model_tag("base")
        if list_steps(checkpoint_dir("mid", tag)):
            args.resume, args.model_tag = True, tag
    resume_meta = None
    if args.resume:
        model_tag = args.model_tag or find_latest_model_tag("mid")
        ckpt_dir = checkpoint_dir("mid", model_tag)
        start_step = find_last_step(ckpt_dir)
        model_state, optim_state, resume_meta = load_checkpoint(ckpt_dir, start_step, device, load_optimizer=True, rank=rank)
        model = build_model(model_state, resume_meta, device)
        tokenizer = get_tokenizer()
        if tokenizer.vocab_size != model.config.vocab_size:
            raise NanochatError(f"tokenizer vocab_size {tokenizer.vocab_size} != model vocab_size {model.config.vocab_size} ({ckpt_dir})")
        del model_state
        hp, source_step = resume_meta["hparams"], resume_meta["source_step"]
    else:
        model, tokenizer, meta = load_model("base", device, model_tag=args.model_tag, step=args.step)
        model_tag, source_step, start_step = args.model_tag or meta["model_tag"], meta["step"], 0
        ckpt_dir = checkpoint_dir("mid", model_tag)
        base_hp = meta.get("hparams", {})
        f = args.init_lr_frac
        hp = {key: f * (getattr(args, key) if getattr(args, key) is not None else base_hp.get(key, default)) for key, default in BASE_LRS.items()}
        hp["weight_decay"] = args.weight_decay
        hp["max_seq_len"] = args.max_seq_len or model.config.sequence_len
        # a base checkpoint without hparams (not written by base_train): 32 rows per rank
        hp["total_batch_size"] = args.total_batch_size or base_hp.get("total_batch_size") or 32 * hp["max_seq_len"] * world_size
    model.train()
    T, total_batch_size = hp["max_seq_len"], hp["total_batch_size"]
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    print0(f"midtraining base model {model_tag} (step {source_step}): {model.num_params():,} parameters, {model.config}")

    # -------------------------------------------------------------------------------- data
    mixture = load_recipe(args.recipe or DEFAULT_RECIPE, tasks_dir=args.tasks_dir)
    order = np.random.default_rng(args.seed).permutation(len(mixture)).tolist()
    val_idx, train_idx = order[: args.val_conversations], order[args.val_conversations :]
    if len(train_idx) < world_size or 0 < len(val_idx) < world_size:
        raise NanochatError(f"{len(mixture)} conversations with --val-conversations {args.val_conversations} leave too few for {world_size} ranks")
    if total_batch_size % (T * world_size):
        raise NanochatError(f"--total-batch-size {total_batch_size} is not a multiple of max_seq_len x ranks = {T * world_size}")
    rows_per_rank = total_batch_size // (T * world_size)
    device_batch_size = min(args.device_batch_size, rows_per_rank)
    if rows_per_rank % device_batch_size:
        raise NanochatError(f"--device-batch-size {device_batch_size} does not divide the {rows_per_rank} rows per rank of --total-batch-size {total_batch_size}")
    grad_accum_steps = rows_per_rank // device_batch_size
    if args.num_iterations is not None:  # also on --resume: the way to extend a run
        hp["num_iterations"] = args.num_iterations
    elif "num_iterations" not in hp:  # a fresh run; a resumed one keeps its horizon
        epoch_tokens = estimate_tokens(mixture, train_idx, tokenizer, T + 1)
        hp["num_iterations"] = max(1, math.ceil(args.num_epochs * epoch_tokens / total_batch_size))
        print0(f"~{epoch_tokens:,} tokens per epoch (estimated from a sample): {hp['num_iterations']} steps for {args.num_epochs} epoch(s)")
    num_iterations = hp["num_iterations"]
    if start_step > num_iterations:
        raise NanochatError(f"--num-iterations {num_iterations} is before the resumed step {start_step}")
    print0(
        f"{len(train_idx):,} training / {len(val_idx):,} val conversations; total batch {total_batch_size:,} tokens = {device_batch_size} rows x {T} tokens x "
        f"{world_size} ranks x {grad_accum_steps} accumulation steps; {num_iterations} steps"
    )
    loader_state = resume_meta["dataloader_state"][rank] if resume_meta else None
    train_loader = ConversationLoader(mixture, train_idx, tokenizer, device_batch_size, T, device, rank, world_size, args.buffer_size, state=loader_state)

    @torch.no_grad()
    def val_loss():
        """Mean nats per trained token over every held-out conversation (all ranks)."""
        model.eval()
        total, count = torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device, dtype=torch.int64)
        for x, y in ConversationLoader(mixture, val_idx, tokenizer, device_batch_size, T, device, rank, world_size, args.buffer_size, num_epochs=1):
            total += model(x, y, loss_reduction="sum").double()
            count += (y >= 0).sum()
        if ddp:
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        model.train()
        return (total / count.clamp(min=1)).item()

    # -------------------------------------------------------------------------------- optimizer
    optimizer = build_optimizer(
        model,
        matrix_lr=hp["matrix_lr"],
        embedding_lr=hp["embedding_lr"],
        unembedding_lr=hp["unembedding_lr"],
        scalar_lr=hp["scalar_lr"],
        weight_decay=hp["weight_decay"],
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

    logger = MetricsLogger(os.path.join(ckpt_dir, "run"), vars(args) | hp, args.run, rank=rank, resume_step=start_step if args.resume else None)
    stop = StopSignal()
    timer = StepTimer(device)
    peak_flops = get_peak_flops(device)
    flops_per_token = model.estimate_flops()

    def gather_list(obj):
        """Every rank's obj, as a list indexed by rank (rank 0 writes the meta)."""
        if not ddp:
            return [obj]
        out = [None] * world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def save(step):
        meta = {
            "stage": "mid",
            "source": "base",
            "source_step": source_step,
            "model_tag": model_tag,
            "step": step,
            "model_config": model.config.to_dict(),
            "args": vars(args),
            "hparams": hp,
            "loop_state": loop_state,
            "dataloader_state": gather_list(train_loader.state_dict()),
            "rng_state": gather_list(get_rng_state()),
        }
        return save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer.state_dict(), meta, rank=rank, keep_last=args.keep_last)

    # -------------------------------------------------------------------------------- training loop
    step = start_step
    total_time = loop_state.get("total_time", 0.0)
    vl = loop_state.get("val_loss")
    while True:
        last_step = step == num_iterations
        if step == args.stop_at_step and step > start_step:
            stop.requested, stop.signal_name = True, "--stop-at-step"
        if val_idx and (last_step or (step == 0 and not args.resume) or (args.eval_every > 0 and step % args.eval_every == 0 and step > start_step)):
            vl = val_loss()
            print0(f"step {step:05d} | val loss {vl:.4f}")
            logger.log({"step": step, "val_loss": vl})
        if last_step or stop.requested or (args.save_every > 0 and step % args.save_every == 0 and step > start_step):
            loop_state.update(total_time=total_time, val_loss=vl)
            print0(f"saved checkpoint {save(step)}")
        if stop.requested:
            print0(f"{stop.signal_name}: checkpoint saved at step {step}; continue with --resume")
            break
        if last_step:
            break

        # one optimizer step. The loss is the mean over every trained token of the step (all
        # micro-batches, all ranks), not a mean of per-row means: rows hold very different numbers
        # of assistant tokens.
        timer.start()
        lrm, _ = apply_schedules(optimizer, step, num_iterations=num_iterations, warmup_ratio=args.warmup_ratio, warmdown_ratio=args.warmdown_ratio, final_lr_frac=args.final_lr_frac)
        batches = [next(train_loader) for _ in range(grad_accum_steps)]
        n_targets = sum((y >= 0).sum() for _, y in batches)
        if ddp:
            torch.distributed.all_reduce(n_targets)
        n_targets = n_targets.clamp(min=1)
        train_loss = torch.zeros((), device=device)
        for x, y in batches:
            loss = train_model(x, y, loss_reduction="sum") / n_targets
            train_loss += loss.detach()
            (loss * world_size).backward()  # the optimizer averages gradients over ranks
        grad_norm = optimizer.step()
        model.zero_grad(set_to_none=True)
        if ddp:
            torch.distributed.all_reduce(train_loss)
        loss_value = train_loss.item()
        check_finite(loss_value, step, ckpt_dir)
        dt = timer.stop()
        step += 1

        if step > start_step + 1:
            total_time += dt  # the first step of a process includes compilation and warm-up
        tok_per_s = total_batch_size / dt
        mfu = flops_per_token * tok_per_s / (peak_flops * world_size) if peak_flops else None
        eta = (num_iterations - step) * total_time / max(step - start_step - 1, 1)
        epoch = train_loader.progress()
        mfu_str = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        print0(
            f"step {step:05d}/{num_iterations} | loss {loss_value:.4f} | lr x{lrm:.3f} | grad norm {float(grad_norm):.3f} | {dt * 1000:.0f} ms | "
            f"{tok_per_s:,.0f} tok/s | MFU {mfu_str} | epoch {epoch:.3f} | eta {format_eta(eta)}"
        )
        logger.log({"step": step, "loss": loss_value, "lr_mult": lrm, "grad_norm": float(grad_norm), "dt": dt, "tok_per_s": tok_per_s, "mfu": mfu, "epoch": epoch, "time": total_time})

    # -------------------------------------------------------------------------------- wrap-up
    if step == num_iterations and not stop.requested:
        pad = train_loader.pad_tokens / max(1, train_loader.rows_packed * (T + 1))
        print0(f"final val loss {vl if vl is not None else float('nan'):.4f} | padding {100 * pad:.1f}% of the packed tokens (rank 0) | {train_loader.skipped} conversations skipped (no trained token in a row)")
        logger.log({"step": step, "final_val_loss": vl, "train_time_s": total_time, "pad_fraction": pad})
        report.log_stage("mid_train", args=vars(args), metrics={"final_val_loss": vl, "train_time_s": total_time, "pad_fraction": pad}, metrics_file=logger.path)
    logger.finish()
    print0(f"training time {total_time:.1f}s")
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
