"""
Supervised fine-tuning on conversations: one conversation per row, padded to the longest row of
the batch, loss only on the assistant's tokens (the mask of Tokenizer.render_conversation).

    python -m scripts.chat_sft                              # from the latest mid (else base) checkpoint
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft --recipe my_mix.json
"""

import argparse
import json
import os
import random

import torch

from nanochat import report
from nanochat.checkpoint_manager import checkpoint_dir, find_last_step, find_latest_model_tag, load_checkpoint, load_model, save_checkpoint
from nanochat.common import NanochatError, compute_cleanup, compute_init, print0, run_main
from nanochat.optim import build_optimizer
from nanochat.training import MetricsLogger, StepTimer, StopSignal, check_finite, format_eta, get_rng_state, set_rng_state
from tasks.recipe import load_recipe

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tasks", "recipes", "sft.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat SFT")
    p.add_argument("--source", type=str, default=None, choices=["base", "mid"], help="stage to start from (default: mid if present, else base)")
    p.add_argument("--model-tag", type=str, default=None, help="model tag of the source and of the output (default: the latest)")
    p.add_argument("--recipe", type=str, default=None, help="JSON/YAML mixture recipe (default: tasks/recipes/sft.json)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="conversations are cut to this many tokens")
    p.add_argument("--device-batch-size", type=int, default=4, help="conversations per micro-batch per device")
    p.add_argument("--batch-size", type=int, default=32, help="conversations per optimizer step (all ranks)")
    p.add_argument("--num-epochs", type=float, default=1.0, help="passes over the training conversations")
    p.add_argument("--num-iterations", type=int, default=None, help="optimizer steps (overrides --num-epochs)")
    p.add_argument("--init-lr-frac", type=float, default=0.02, help="peak LR as a fraction of the base-training LRs (decays linearly to 0)")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="base Muon learning rate (times --init-lr-frac)")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="base AdamW learning rate of the embedding (times --init-lr-frac)")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="base AdamW learning rate of lm_head (times --init-lr-frac)")
    p.add_argument("--scalar-lr", type=float, default=0.5, help="base AdamW learning rate of scalars (times --init-lr-frac)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of the matrices")
    p.add_argument("--val-conversations", type=int, default=256, help="conversations held out for the val loss")
    p.add_argument("--eval-every", type=int, default=50, help="steps between val loss evaluations (-1: only at the start and end)")
    p.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest SFT checkpoint of this model tag")
    p.add_argument("--run", type=str, default=None, help="wandb run name (no wandb logging when not given)")
    p.add_argument("--seed", type=int, default=42, help="seed of the data order")
    p.add_argument("--device-type", type=str, default=None, help="cuda | cpu | mps (default: autodetect)")
    return p.parse_args(argv)


def collate(rows, device):
    """rows: list of (ids, mask). Returns inputs, targets int64 [B, T] (T = longest row - 1);
    targets are -1 where not trained (mask 0 or padding)."""
    T = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        ids_t = torch.tensor(ids, dtype=torch.long)
        inputs[i, :n] = ids_t[:-1]
        trained = torch.tensor(mask[1:], dtype=torch.bool)
        targets[i, :n] = torch.where(trained, ids_t[1:], -1)
    return inputs.to(device), targets.to(device)


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    print0(json.dumps(vars(args)))
    if args.batch_size % (args.device_batch_size * world_size):
        raise NanochatError(f"--batch-size {args.batch_size} is not a multiple of --device-batch-size x ranks = {args.device_batch_size * world_size}")
    grad_accum_steps = args.batch_size // (args.device_batch_size * world_size)

    # -------------------------------------------------------------------------------- model
    if args.resume:
        model_tag = args.model_tag or find_latest_model_tag("sft")
        model, tokenizer, meta = load_model("sft", device, model_tag=model_tag)
        source = meta["source"]
    else:
        source = args.source
        if source is None:
            try:
                find_latest_model_tag("mid")
                source = "mid"
            except NanochatError:
                source = "base"
        model, tokenizer, meta = load_model(source, device, model_tag=args.model_tag)
        model_tag = args.model_tag or meta["model_tag"]
    model.train()
    print0(f"fine-tuning {source} model ({model.num_params():,} parameters)")

    # -------------------------------------------------------------------------------- data
    mixture = load_recipe(args.recipe or DEFAULT_RECIPE)
    order = list(range(len(mixture)))
    random.Random(args.seed).shuffle(order)
    val_idx, train_idx = order[: args.val_conversations], order[args.val_conversations :]
    if not train_idx:
        raise NanochatError(f"no training conversations left after holding out --val-conversations {args.val_conversations}")
    epoch_len = len(train_idx) // args.batch_size
    num_iterations = args.num_iterations or max(1, int(args.num_epochs * epoch_len))
    print0(f"{len(train_idx):,} training / {len(val_idx):,} val conversations, {num_iterations} steps of {args.batch_size}")

    def render(i):
        return tokenizer.render_conversation(mixture[i], max_tokens=args.max_seq_len + 1)

    def train_rows(step, micro):
        """The conversations of this rank for (step, micro-step): a fixed function of the step, so
        resuming needs no data-loader state."""
        start = (step * args.batch_size + (micro * world_size + rank) * args.device_batch_size) % len(train_idx)
        return [render(train_idx[(start + j) % len(train_idx)]) for j in range(args.device_batch_size)]

    @torch.no_grad()
    def val_loss():
        model.eval()
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        mine = val_idx[rank::world_size]
        for k in range(0, len(mine), args.device_batch_size):
            x, y = collate([render(i) for i in mine[k : k + args.device_batch_size]], device)
            total += model(x, y, loss_reduction="sum")
            count += (y >= 0).sum()
        if ddp:
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        model.train()
        return (total / count.clamp(min=1)).item()

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
    )
    ckpt_dir = checkpoint_dir("sft", model_tag)
    start_step = 0
    if args.resume:
        start_step = find_last_step(ckpt_dir)
        _, optim_state, meta = load_checkpoint(ckpt_dir, start_step, device, load_optimizer=True, rank=rank)
        optimizer.load_state_dict(optim_state)
        set_rng_state(meta["rng_state"][rank])
        print0(f"resumed from {ckpt_dir} at step {start_step}")

    logger = MetricsLogger(os.path.join(ckpt_dir, "run"), vars(args), args.run, rank=rank, resume_step=start_step if args.resume else None)
    stop = StopSignal()
    timer = StepTimer(device)

    def save(step):
        rng = [get_rng_state()]
        if ddp:
            rng = [None] * world_size
            torch.distributed.all_gather_object(rng, get_rng_state())
        meta = {"stage": "sft", "source": source, "model_tag": model_tag, "step": step, "model_config": model.config.to_dict(), "args": vars(args), "rng_state": rng}
        return save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer.state_dict(), meta, rank=rank, keep_last=args.keep_last)

    # -------------------------------------------------------------------------------- loop
    step, total_time = start_step, 0.0
    while True:
        last_step = step == num_iterations
        if last_step or step == start_step or (args.eval_every > 0 and step % args.eval_every == 0):
            vl = val_loss()
            print0(f"step {step:05d} | val loss {vl:.4f}")
            logger.log({"step": step, "val_loss": vl})
        if last_step or stop.requested or (args.save_every > 0 and step % args.save_every == 0 and step > start_step):
            print0(f"saved checkpoint {save(step)}")
        if last_step or stop.requested:
            break
        timer.start()
        lrm = 1.0 - step / num_iterations  # linear decay to zero
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        # The loss is the mean over every trained token of the step (all micro-batches, all ranks),
        # not a mean of per-batch means: rows differ a lot in how many assistant tokens they hold.
        batches = [collate(train_rows(step, micro), device) for micro in range(grad_accum_steps)]
        n_targets = sum((y >= 0).sum() for _, y in batches)
        if ddp:
            torch.distributed.all_reduce(n_targets)
        n_targets = n_targets.clamp(min=1)
        train_loss = torch.zeros((), device=device)
        n_tokens = 0
        for x, y in batches:
            loss = model(x, y, loss_reduction="sum") / n_targets
            train_loss += loss.detach()
            n_tokens += x.numel()
            (loss * world_size).backward()  # the optimizer averages gradients over ranks
        if ddp:
            torch.distributed.all_reduce(train_loss)
        loss_value = train_loss.item()
        check_finite(loss_value, step, ckpt_dir)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        dt = timer.stop()
        step += 1
        total_time += dt
        eta = (num_iterations - step) * total_time / (step - start_step)
        print0(f"step {step:05d}/{num_iterations} | loss {loss_value:.4f} | lr x{lrm:.3f} | {dt * 1000:.0f} ms | {n_tokens * world_size / dt:,.0f} tok/s | eta {format_eta(eta)}")
        logger.log({"step": step, "loss": loss_value, "lr_mult": lrm, "dt": dt})
    if step == num_iterations:
        report.log_stage("chat_sft", args=vars(args), metrics_file=logger.path, metrics={"val_loss": vl, "train_time_s": total_time, "source": source})
    logger.finish()
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
