"""
Base pretraining of the GPT on the parquet shards.

    python -m scripts.base_train --depth 4                       # one process (CPU or one GPU)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth 20

One dial: --depth sets the model and, through nanochat/scaling.py, the token horizon, batch size,
learning rates and weight decay; any of them can be overridden by its flag. The run skeleton
(resume, save, stop, step log) is nanochat.training.RunState.
"""

import argparse

import torch

from nanochat.common import NanochatError, print0, run_main
from nanochat.dataloader import DataLoader
from nanochat.dataset import get_data_dir
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import UnigramBaseline, evaluate_bpb
from nanochat.optim import build_optimizer
from nanochat.scaling import derive_training_hparams, num_scaling_params
from nanochat.training import RunState, add_run_args, find_device_batch_size, parse_run_args

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be", "The opposite of hot is"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain the base model")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers: the one dial that sizes the run")
    g.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: = n_head)")
    g.add_argument("--window-pattern", type=str, default="L", help="per-layer attention span tiled over layers: L full, S sliding window (e.g. SSSL)")
    g.add_argument("--aspect-ratio", type=int, default=64, help="n_embd = depth * aspect_ratio, rounded to the head dim")
    g.add_argument("--target-param-data-ratio", type=float, default=20.0, help="training tokens per scaling parameter (Chinchilla: 20)")
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--data-dir", type=str, default=None, help="parquet shard directory (default: $NANOCHAT_DATA_DIR, $NANOCHAT_DATA_ROOT/pretrain or <base_dir>/base_data)")
    g.add_argument("--eval-tokens", type=int, default=10 * 524288, help="validation tokens per bpb evaluation")
    g.add_argument("--core-every", type=int, default=-1, help="steps between CORE evaluations (-1: never during training)")
    g.add_argument("--core-max-per-task", type=int, default=500, help="examples per CORE task during training")
    g.add_argument("--eval-dir", type=str, default=None, help="CORE data dir (default: $NANOCHAT_EVAL_DIR or <base_dir>/eval_bundle)")
    g.add_argument("--num-prompts", type=int, default=len(SAMPLE_PROMPTS), help="sample prompts completed at the end (0: none)")
    add_run_args(p, parent=None, eval_every=250, warmdown_ratio=0.4, weight_decay=None)
    args = parse_run_args(p, argv)
    for flag, ok in (("--depth", args.depth >= 1), ("--aspect-ratio", args.aspect_ratio >= 1), ("--eval-tokens", args.eval_tokens >= 1), ("--num-prompts", args.num_prompts >= 0)):
        if not ok:
            raise NanochatError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))} is out of range")
    return args


def main(argv=None):
    args = parse_args(argv)
    run = RunState("base", args, model_tag=f"d{args.depth}")
    device, rank, world_size, tokenizer = run.device, run.rank, run.world_size, run.tokenizer
    data_dir = get_data_dir(args.data_dir)
    if args.core_every > 0:  # fail now, not hours into the run at the first CORE evaluation
        from nanochat.core_eval import evaluate_core, get_eval_dir

        get_eval_dir(args.eval_dir)
    token_bytes = tokenizer.token_bytes(device)

    # -------------------------------------------------------------------------------- model
    T = run.resolve("max_seq_len", 2048)
    config = GPTConfig.from_depth(args.depth, tokenizer.vocab_size, T, aspect_ratio=args.aspect_ratio, n_kv_head=args.n_kv_head, window_pattern=args.window_pattern)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.compute_dtype = run.compute_dtype()
    model.init_weights(seed=args.seed)
    n_params, n_scaling = model.num_params(), num_scaling_params(model)
    print0(f"model: {config}\nparameters: {n_params:,} ({n_scaling:,} in matmuls), {model.estimate_flops():.3e} FLOPs/token")

    # -------------------------------------------------------------------------------- horizon, batch, optimizer
    hp = derive_training_hparams(n_scaling, T, world_size, args.target_param_data_ratio, args.total_batch_size, args.num_iterations, args.weight_decay)
    total_batch_size, num_iterations = run.resolve("total_batch_size", hp["total_batch_size"]), run.resolve("num_iterations", hp["num_iterations"])
    weight_decay = run.resolve("weight_decay", hp["weight_decay"])
    if total_batch_size % (T * world_size):
        raise NanochatError(f"--total-batch-size {total_batch_size} is not a multiple of max_seq_len * world_size = {T * world_size}")
    rows_per_rank = total_batch_size // (T * world_size)
    device_batch_size = run.resolve("device_batch_size", 32)
    if device_batch_size == "auto":

        def try_batch(B):
            x = torch.randint(0, config.vocab_size, (B, T), device=device)
            run.compile(model)(x, x).backward()
            model.zero_grad(set_to_none=True)

        start = 1 << (rows_per_rank.bit_length() - 1)  # the largest power of two dividing the rows per rank
        while rows_per_rank % start:
            start //= 2
        device_batch_size = run.resolved["device_batch_size"] = find_device_batch_size(try_batch, start)
    device_batch_size = run.resolved["device_batch_size"] = min(device_batch_size, rows_per_rank)
    if rows_per_rank % device_batch_size:
        raise NanochatError(f"--device-batch-size {device_batch_size} does not divide the {rows_per_rank} rows per rank of --total-batch-size {total_batch_size}")
    grad_accum_steps = rows_per_rank // device_batch_size
    print0(
        f"total batch {total_batch_size:,} tokens = {device_batch_size} rows x {T} tokens x {world_size} ranks x {grad_accum_steps} accumulation steps; "
        f"{num_iterations:,} steps, {num_iterations * total_batch_size:,} tokens ({num_iterations * total_batch_size / n_scaling:.1f} per parameter); weight decay {weight_decay:.4g}"
    )
    optimizer = build_optimizer(model, **run.learning_rates(), weight_decay=weight_decay, model_dim=config.n_embd, grad_clip=args.grad_clip)

    # -------------------------------------------------------------------------------- data
    def loader(split):
        return DataLoader(tokenizer, device_batch_size, T, split, device, rank, world_size, data_dir)

    train_loader = loader("train")
    run.start(model, optimizer, train_loader)
    eval_steps = max(1, args.eval_tokens // (device_batch_size * T * world_size))

    def evaluate():
        with run.evaluating():
            val_bpb = run.loop["val_bpb"] = evaluate_bpb(model, loader("val"), eval_steps, token_bytes)
            print0(f"step {run.step:05d} | val bpb {val_bpb:.4f}")
            run.log({"step": run.step, "val_bpb": val_bpb})
            if args.core_every > 0 and (run.step == num_iterations or run.due(args.core_every)):
                core = evaluate_core(model, tokenizer, device, max_per_task=args.core_max_per_task, eval_dir=args.eval_dir)["core"]
                print0(f"step {run.step:05d} | CORE {core:.4f}")
                run.log({"step": run.step, "core": core})
        return run.early_stop(run.loop["val_bpb"])  # True: stop early (--early-stop-patience, --divergence-threshold)

    # -------------------------------------------------------------------------------- training loop
    for step in run.steps(num_iterations):
        if (run.due(args.eval_every) or run.due(args.core_every)) and evaluate():
            break
        loss, grad_norm = run.train_step([next(train_loader) for _ in range(grad_accum_steps)], normalize="rows")
        run.log_step(loss, total_batch_size, show=("grad_norm",), grad_norm=grad_norm.item())
    else:
        evaluate()

    # -------------------------------------------------------------------------------- wrap-up: baseline and samples
    trained_tokens = min(run.step * total_batch_size, 1 << 24)
    unigram = UnigramBaseline(config.vocab_size, device)
    counting = loader("train")
    for _ in range(max(1, trained_tokens // (device_batch_size * T * world_size))):
        unigram.update(next(counting)[1])
    unigram_bpb = unigram.evaluate_bpb(loader("val"), eval_steps, token_bytes)
    val_bpb = run.loop["val_bpb"]
    print0(f"final val bpb {val_bpb:.4f} | unigram baseline val bpb {unigram_bpb:.4f} (token frequencies of {trained_tokens:,} training tokens)")
    timed_steps = max(run.step - run.start_step - 1, 1)
    tok_per_s = total_batch_size * timed_steps / max(run.total_time, 1e-9)
    mfu = run.flops_per_token * tok_per_s / (run.peak_flops * world_size) if run.peak_flops else None
    if rank == 0 and args.num_prompts > 0:
        engine = Engine(model.eval(), tokenizer)
        for prompt in SAMPLE_PROMPTS[: args.num_prompts]:
            ids, _ = engine.generate_batch(tokenizer.encode(prompt, prepend=tokenizer.bos_token_id), max_tokens=16, temperature=0.0)
            print0(f"sample: {prompt!r} -> {tokenizer.decode(ids[0])!r}")
    run.finish(
        final_val_bpb=val_bpb, val_bpb=val_bpb, unigram_val_bpb=unigram_bpb, num_params=n_params, num_scaling_params=n_scaling,
        tokens=run.step * total_batch_size, tok_per_s=tok_per_s, mfu=mfu,
    )


if __name__ == "__main__":
    run_main(main)
