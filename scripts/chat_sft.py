"""
Supervised fine-tuning on conversations: one conversation per row, padded to the longest row of
the batch, loss only on the assistant's tokens (the mask of Tokenizer.render_conversation).

    python -m scripts.chat_sft                              # from the latest mid (else base) checkpoint
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft --recipe my_mix.json
    python -m scripts.chat_sft --prepared sft_mix            # python -m scripts.data prepare sft_mix first

The dtype, batch size, context length and base learning rates default to the parent checkpoint's;
the run skeleton (resume, save, stop, step log) is nanochat.training.RunState.
"""

import argparse
import os

import torch

from nanochat.chat_data import holdout_split
from nanochat.checkpoint_manager import find_latest_model_tag
from nanochat.common import NanochatError, print0, run_main
from nanochat.loss_eval import evaluate_loss
from nanochat.prepared import add_prepared_args, check_prepared_args, data_path
from nanochat.training import RunState, add_run_args, parse_run_args
from tasks.customjson import CustomJSON
from tasks.recipe import load_recipe

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tasks", "recipes", "sft.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat SFT")
    g = p.add_argument_group("data")
    g.add_argument("--source", type=str, default=None, choices=["base", "mid"], help="stage to start from (default: mid if present, else base)")
    g.add_argument("--recipe", type=str, default=None, help="JSON/YAML mixture recipe (default: tasks/recipes/sft.json)")
    add_prepared_args(g)
    g.add_argument("--val-conversations", type=int, default=256, help="conversations held out for the val loss")
    g.add_argument("--num-epochs", type=float, default=1.0, help="passes over the training conversations when --num-iterations is not given")
    add_run_args(p, parent="mid or base", eval_every=50, init_lr_frac=0.02, warmdown_ratio=1.0, compile=0)
    args = parse_run_args(p, argv)
    for flag, ok in (("--val-conversations", args.val_conversations >= 0), ("--num-epochs", args.num_epochs > 0), ("--device-batch-size", args.device_batch_size != "auto")):
        if not ok:
            raise NanochatError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))} is out of range")
    check_prepared_args(args)
    if args.source is None:
        try:
            find_latest_model_tag("mid")
            args.source = "mid"
        except NanochatError:
            args.source = "base"
    return args


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
        targets[i, :n] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), ids_t[1:], -1)
    return inputs.to(device), targets.to(device)


def main(argv=None):
    args = parse_args(argv)
    run = RunState("sft", args, parent=args.source)
    device, rank, world_size, tokenizer = run.device, run.rank, run.world_size, run.tokenizer
    model = run.load_model()
    model.compute_dtype = run.compute_dtype()

    # -------------------------------------------------------------------------------- data and batch
    mixture = CustomJSON(data_path(args.prepared)) if args.prepared else load_recipe(args.recipe or DEFAULT_RECIPE)
    val_idx, train_idx = holdout_split(len(mixture), args.val_conversations, args.seed, world_size)
    T = run.resolve("max_seq_len", model.config.sequence_len)
    total_batch_size = run.resolve("total_batch_size", 32 * T)  # token slots: rows x max_seq_len
    B = run.resolve("device_batch_size", 4)
    if total_batch_size % (T * B * world_size):
        raise NanochatError(f"--total-batch-size {total_batch_size} is not a multiple of max_seq_len x --device-batch-size x ranks = {T * B * world_size}")
    rows_per_step = total_batch_size // T
    grad_accum_steps = rows_per_step // (B * world_size)
    num_iterations = run.resolve("num_iterations") or max(1, int(args.num_epochs * len(train_idx) / rows_per_step))
    print0(f"{len(train_idx):,} training / {len(val_idx):,} val conversations, {num_iterations} steps of {rows_per_step} conversations")

    def render(i):
        return tokenizer.render_conversation(mixture[i], max_tokens=T + 1)

    def train_batches(step):
        """This rank's micro-batches of a step: a fixed function of the step, so resuming needs no loader state."""
        for micro in range(grad_accum_steps):
            start = step * rows_per_step + (micro * world_size + rank) * B
            yield collate([render(train_idx[(start + j) % len(train_idx)]) for j in range(B)], device)

    def evaluate():
        if not val_idx:
            return
        with run.evaluating():
            mine = val_idx[rank::world_size]
            val_loss = run.loop["val_loss"] = evaluate_loss(model, (collate([render(i) for i in mine[k : k + B]], device) for k in range(0, len(mine), B)), device)
            print0(f"step {run.step:05d} | val loss {val_loss:.4f}")
            run.log({"step": run.step, "val_loss": val_loss})
        return run.early_stop(val_loss)  # True: stop early (--early-stop-patience, --divergence-threshold)

    # -------------------------------------------------------------------------------- optimizer and loop
    optimizer = run.build_optimizer(model)  # MuonAdamW over the model, or AdamW over the LoRA adapters only
    run.start(model, optimizer)
    for step in run.steps(num_iterations):
        if run.due(args.eval_every, at_start=True) and evaluate():
            break
        batches = list(train_batches(step))
        loss, grad_norm = run.train_step(batches, normalize="tokens")
        run.log_step(loss, sum(x.numel() for x, _ in batches) * world_size, grad_norm=float(grad_norm))
    else:
        evaluate()
    run.finish(val_loss=run.loop.get("val_loss"), source=args.source)


if __name__ == "__main__":
    run_main(main)
