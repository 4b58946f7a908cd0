"""
Midtraining: continue a base checkpoint on a mixture of conversations (chat, multiple choice,
GSM8K with python tool calls, spelling, identity) so that it learns the chat format, the special
tokens and the tool. Conversations are packed best-fit into BOS-aligned rows of max_seq_len + 1
tokens with the loss only on the assistant's tokens (nanochat/chat_data.py).

    python -m scripts.mid_train                                  # latest base checkpoint, tasks/recipes/mid.json
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train --model-tag d20
    python -m scripts.mid_train --prepared mid                   # python -m scripts.data prepare mid first

The dtype, batch size, context length and learning rates default to the base run's (its checkpoint
meta); the run skeleton (resume, save, stop, step log) is nanochat.training.RunState.
"""

import argparse
import math
import os

from nanochat.chat_data import ConversationLoader, estimate_tokens, holdout_split
from nanochat.common import NanochatError, print0, run_main
from nanochat.loss_eval import evaluate_loss
from nanochat.prepared import add_prepared_args, check_prepared_args, data_path
from nanochat.training import RunState, add_run_args, parse_run_args
from tasks.customjson import CustomJSON
from tasks.recipe import load_recipe

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tasks", "recipes", "mid.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Midtrain a base model on a conversation mixture")
    g = p.add_argument_group("data")
    g.add_argument("--recipe", type=str, default=None, help="JSON/YAML mixture recipe (default: tasks/recipes/mid.json)")
    add_prepared_args(g)
    g.add_argument("--tasks-dir", type=str, default=None, help="local task data (default: $NANOCHAT_TASKS_DIR, $NANOCHAT_DATA_ROOT/tasks or <base_dir>/tasks)")
    g.add_argument("--val-conversations", type=int, default=500, help="conversations held out for the val loss")
    g.add_argument("--buffer-size", type=int, default=100, help="conversations the best-fit packer chooses from")
    g.add_argument("--num-epochs", type=float, default=1.0, help="passes over the training conversations when --num-iterations is not given (estimated from a sample)")
    add_run_args(p, parent="base", eval_every=150)
    args = parse_run_args(p, argv)
    for flag, ok in (("--val-conversations", args.val_conversations >= 0), ("--buffer-size", args.buffer_size >= 1), ("--num-epochs", args.num_epochs > 0), ("--device-batch-size", args.device_batch_size != "auto")):
        if not ok:
            raise NanochatError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))} is out of range")
    check_prepared_args(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    run = RunState("mid", args, parent="base")
    device, rank, world_size, tokenizer = run.device, run.rank, run.world_size, run.tokenizer
    model = run.load_model()
    model.compute_dtype = run.compute_dtype()

    # -------------------------------------------------------------------------------- data and batch
    mixture = CustomJSON(data_path(args.prepared)) if args.prepared else load_recipe(args.recipe or DEFAULT_RECIPE, tasks_dir=args.tasks_dir)
    val_idx, train_idx = holdout_split(len(mixture), args.val_conversations, args.seed, world_size)
    T = run.resolve("max_seq_len", model.config.sequence_len)
    total_batch_size = run.resolve("total_batch_size", 32 * T * world_size)  # a base checkpoint without one: 32 rows per rank
    if total_batch_size % (T * world_size):
        raise NanochatError(f"--total-batch-size {total_batch_size} is not a multiple of max_seq_len x ranks = {T * world_size}")
    rows_per_rank = total_batch_size // (T * world_size)
    device_batch_size = run.resolved["device_batch_size"] = min(run.resolve("device_batch_size", 32), rows_per_rank)
    if rows_per_rank % device_batch_size:
        raise NanochatError(f"--device-batch-size {device_batch_size} does not divide the {rows_per_rank} rows per rank of --total-batch-size {total_batch_size}")
    grad_accum_steps = rows_per_rank // device_batch_size
    num_iterations = run.resolve("num_iterations")
    if num_iterations is None:
        epoch_tokens = estimate_tokens(mixture, train_idx, tokenizer, T + 1)
        num_iterations = max(1, math.ceil(args.num_epochs * epoch_tokens / total_batch_size))
        print0(f"~{epoch_tokens:,} tokens per epoch (estimated from a sample): {num_iterations} steps for {args.num_epochs} epoch(s)")
    print0(
        f"{len(train_idx):,} training / {len(val_idx):,} val conversations; total batch {total_batch_size:,} tokens = {device_batch_size} rows x {T} tokens x "
        f"{world_size} ranks x {grad_accum_steps} accumulation steps; {num_iterations} steps"
    )

    def loader(indices, num_epochs=None):
        return ConversationLoader(mixture, indices, tokenizer, device_batch_size, T, device, rank, world_size, args.buffer_size, num_epochs=num_epochs)

    def evaluate():
        if val_idx:
            with run.evaluating():
                val_loss = run.loop["val_loss"] = evaluate_loss(model, loader(val_idx, num_epochs=1), device)
                print0(f"step {run.step:05d} | val loss {val_loss:.4f}")
                run.log({"step": run.step, "val_loss": val_loss})
            return run.early_stop(val_loss)  # True: stop early (--early-stop-patience, --divergence-threshold)

    # -------------------------------------------------------------------------------- optimizer and loop
    optimizer = run.build_optimizer(model)  # MuonAdamW over the model, or AdamW over the LoRA adapters only
    train_loader = loader(train_idx)
    run.start(model, optimizer, train_loader)
    for step in run.steps(num_iterations):
        if run.due(args.eval_every, at_start=True) and evaluate():
            break
        loss, grad_norm = run.train_step([next(train_loader) for _ in range(grad_accum_steps)], normalize="tokens")
        run.log_step(loss, total_batch_size, show=("epoch",), grad_norm=float(grad_norm), epoch=train_loader.progress())
    else:
        evaluate()

    pad = train_loader.pad_tokens / max(1, train_loader.rows_packed * (T + 1))
    print0(f"padding {100 * pad:.1f}% of the packed tokens (rank 0) | {train_loader.skipped} conversations skipped (no trained token in a row)")
    run.finish(final_val_loss=run.loop.get("val_loss"), pad_fraction=pad)


if __name__ == "__main__":
    run_main(main)
