"""
Base pretraining of the GPT on the parquet shards.

    python -m scripts.base_train --depth 4                       # one process (CPU or one GPU)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth 20

One dial: --depth sets the model and, through nanochat/scaling.py, the token horizon, batch size,
learning rates and weight decay; any of them can be overridden by its flag.
"""

import argparse
import json
import os
import time

import torch

from nanochat import report
from nanochat.checkpoint_manager import checkpoint_dir, find_last_step, list_steps, load_checkpoint, save_checkpoint
from nanochat.common import NanochatError, compute_cleanup, compute_init, print0, run_main
from nanochat.dataloader import DataLoader
from nanochat.dataset import get_data_dir
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import UnigramBaseline, evaluate_bpb
from nanochat.optim import apply_schedules, build_optimizer
from nanochat.scaling import derive_training_hparams, num_scaling_params
from nanochat.tokenizer import get_tokenizer
from nanochat.training import (
    MetricsLogger,
    StepTimer,
    StopSignal,
    check_finite,
    find_device_batch_size,
    format_eta,
    get_peak_flops,
    get_rng_state,
    set_rng_state,
    train_step,
)

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be", "The opposite of hot is"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain the base model")
    # model
    p.add_argument("--depth", type=int, default=20, help="number of transformer layers: the one dial that sizes the run")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    p.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: = n_head)")
    p.add_argument("--window-pattern", type=str, default="L", help="per-layer attention span tiled over layers: L full, S sliding window (e.g. SSSL)")
    p.add_argument("--aspect-ratio", type=int, default=64, help="n_embd = depth * aspect_ratio, rounded to the head dim")
    # horizon and batch
    p.add_argument("--target-param-data-ratio", type=float, default=20.0, help="training tokens per scaling parameter (Chinchilla: 20)")
    p.add_argument("--num-iterations", type=int, default=None, help="optimizer steps (overrides the derived horizon)")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step (default: derived from the horizon)")
    p.add_argument("--device-batch-size", type=str, default="32", help="sequences per micro-batch per device, or 'auto' (largest that fits)")
    # optimizer
    p.add_argument("--matrix-lr", type=float, default=None, help="Muon learning rate for hidden matrices (default 0.02)")
    p.add_argument("--embedding-lr", type=float, default=None, help="AdamW learning rate of the token embedding at n_embd 768")
    p.add_argument("--unembedding-lr", type=float, default=None, help="AdamW learning rate of lm_head at n_embd 768")
    p.add_argument("--scalar-lr", type=float, default=None, help="AdamW learning rate of scalar/vector parameters")
    p.add_argument("--weight-decay", type=float, default=None, help="decoupled weight decay of the Muon matrices (default: derived)")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear LR warmup")
    p.add_argument("--warmdown-ratio", type=float, default=0.4, help="fraction of steps of linear LR warmdown at the end")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end of warmdown, as a fraction of the peak")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm to this (0: no clipping)")
    # evaluation, checkpoints, logging (-1 disables a periodic action)
    p.add_argument("--eval-every", type=int, default=250, help="steps between val bpb evaluations (-1: only at the end)")
    p.add_argument("--eval-tokens", type=int, default=10 * 524288, help="validation tokens per bpb evaluation")
    p.add_argument("--core-every", type=int, default=-1, help="steps between CORE evaluations (-1: never during training)")
    p.add_argument("--core-max-per-task", type=int, default=500, help="examples per CORE task during training")
    p.add_argument("--eval-dir", type=str, default=None, help="CORE data dir (default: $NANOCHAT_EVAL_DIR or <base_dir>/eval_bundle)")
    p.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (older ones are deleted)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this model tag")
    p.add_argument("--resume-if-exists", action="store_true", help="--resume when a checkpoint exists, else start fresh (for recipes re-run after a failure)")
    p.add_argument("--run", type=str, default=None, help="wandb run name (no wandb logging when not given)")
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default: d<depth>)")
    p.add_argument("--num-samples", type=int, default=len(SAMPLE_PROMPTS), help="prompts completed at the end")
    # runtime
    p.add_argument("--device-type", type=str, default=None, help="cuda | cpu | mps (default: autodetect)")
    p.add_argument("--data-dir", type=str, default=None, help="parquet shard directory (default: $NANOCHAT_DATA_DIR or <base_dir>/base_data)")
    p.add_argument("--dtype", type=str, default="auto", choices=["auto", "bfloat16", "float32"], help="compute dtype of activations (auto: bf16 on CUDA, fp32 elsewhere; bf16 helps CPUs with AMX)")
    p.add_argument("--compile", type=int, default=None, help="torch.compile the model (default: 1 on CUDA, 0 elsewhere)")
    p.add_argument("--seed", type=int, default=42, help="seed of the initialisation")
    # test hooks: inject a NaN loss / act as if SIGTERM arrived, at this step
    p.add_argument("--nan-at-step", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--stop-at-step", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    print0(json.dumps(vars(args)))
    data_dir = get_data_dir(args.data_dir)
    if args.core_every > 0:  # fail now, not hours into the run at the first CORE evaluation
        from nanochat.core_eval import evaluate_core, get_eval_dir

        get_eval_dir(args.eval_dir)
    tokenizer = get_tokenizer()
    token_bytes = tokenizer.token_bytes(device)

    # -------------------------------------------------------------------------------- model
    config = GPTConfig.from_depth(
        args.depth, tokenizer.vocab_size, args.max_seq_len, aspect_ratio=args.aspect_ratio, n_kv_head=args.n_kv_head, window_pattern=args.window_pattern
    )
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.compute_dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model.init_weights(seed=args.seed)
    n_params, n_scaling = model.num_params(), num_scaling_params(model)
    flops_per_token = model.estimate_flops()
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    print0(f"model: {config}\nparameters: {n_params:,} ({n_scaling:,} in matmuls), {flops_per_token:.3e} FLOPs/token")

    # -------------------------------------------------------------------------------- horizon, batch, optimizer
    hp = derive_training_hparams(n_scaling, args.max_seq_len, world_size, args.target_param_data_ratio, args.total_batch_size, args.num_iterations, args.weight_decay)
    for key in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr"):
        if getattr(args, key) is not None:
            hp[key] = getattr(args, key)
    total_batch_size, num_iterations = hp["total_batch_size"], hp["num_iterations"]
    tokens_per_fwdbwd_rank = args.max_seq_len
    if total_batch_size % (args.max_seq_len * world_size):
        raise NanochatError(f"--total-batch-size {total_batch_size} is not a multiple of max_seq_len * world_size = {args.max_seq_len * world_size}")
    rows_per_rank = total_batch_size // (args.max_seq_len * world_size)
    if args.device_batch_size == "auto":

        def try_batch(B):
            x = torch.randint(0, config.vocab_size, (B, args.max_seq_len), device=device)
            train_model(x, x).backward()
            model.zero_grad(set_to_none=True)

        start = 1 << (rows_per_rank.bit_length() - 1)  # largest power of two <= rows per rank
        while rows_per_rank % start:
            start //= 2
        device_batch_size = find_device_batch_size(try_batch, start)
    else:
        try:
            device_batch_size = int(args.device_batch_size)
        except ValueError:
            raise NanochatError(f"--device-batch-size must be an integer or 'auto', got {args.device_batch_size!r}") from None
        device_batch_size = min(device_batch_size, rows_per_rank)
    if device_batch_size <= 0 or rows_per_rank % device_batch_size:
        raise NanochatError(f"--device-batch-size {device_batch_size} does not divide the {rows_per_rank} rows per rank of --total-batch-size {total_batch_size}")
    grad_accum_steps = rows_per_rank // device_batch_size
    tokens_per_fwdbwd_rank = device_batch_size * args.max_seq_len
    print0(
        f"total batch {total_batch_size:,} tokens = {device_batch_size} rows x {args.max_seq_len} tokens x {world_size} ranks x {grad_accum_steps} accumulation steps; "
        f"{num_iterations:,} steps, {hp['target_tokens']:,} tokens ({hp['target_tokens'] / n_scaling:.1f} per parameter); weight decay {hp['weight_decay']:.4g}"
    )
    optimizer = build_optimizer(
        model,
        matrix_lr=hp["matrix_lr"],
        embedding_lr=hp["embedding_lr"],
        unembedding_lr=hp["unembedding_lr"],
        scalar_lr=hp["scalar_lr"],
        weight_decay=hp["weight_decay"],
        model_dim=config.n_embd,
        grad_clip=args.grad_clip,
    )

    # -------------------------------------------------------------------------------- resume
    model_tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = checkpoint_dir("base", model_tag)
    start_step, loop_state, loader_state = 0, {}, None
    args.resume = args.resume or (args.resume_if_exists and bool(list_steps(ckpt_dir)))
    if args.resume:
        step = find_last_step(ckpt_dir)
        model_state, optim_state, meta = load_checkpoint(ckpt_dir, step, device, load_optimizer=True, rank=rank)
        if meta["model_config"] != config.to_dict():
            raise NanochatError(f"--resume: the checkpoint in {ckpt_dir} has a different model config; use the same flags")
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        start_step, loop_state = meta["step"], meta["loop_state"]
        loader_state = meta["dataloader_state"][rank]
        set_rng_state(meta["rng_state"][rank])
        del model_state, optim_state
        print0(f"resumed from {ckpt_dir} at step {start_step}")
    train_loader = DataLoader(tokenizer, device_batch_size, args.max_seq_len, "train", device, rank, world_size, data_dir, state=loader_state)

    def val_batches():
        return iter(DataLoader(tokenizer, device_batch_size, args.max_seq_len, "val", device, rank, world_size, data_dir))

    eval_steps = max(1, args.eval_tokens // (device_batch_size * args.max_seq_len * world_size))
    run_dir = os.path.join(ckpt_dir, "run")
    logger = MetricsLogger(run_dir, vars(args) | hp, args.run, rank=rank, resume_step=start_step if args.resume else None)
    stop = StopSignal()
    peak_flops = get_peak_flops(device)
    timer = StepTimer(device)

    def save(step):
        meta = {
            "stage": "base",
            "model_tag": model_tag,
            "step": step,
            "model_config": config.to_dict(),
            "args": vars(args),
            "hparams": hp,
            "device_batch_size": device_batch_size,
            "loop_state": loop_state,
            "dataloader_state": gather_list(train_loader.state_dict()),
            "rng_state": gather_list(get_rng_state()),
        }
        return save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer.state_dict(), meta, rank=rank, keep_last=args.keep_last)

    def gather_list(obj):
        """Every rank's obj, as a list indexed by rank (rank 0 writes the meta)."""
        if not ddp:
            return [obj]
        out = [None] * world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    # -------------------------------------------------------------------------------- training loop
    step = start_step
    smooth_loss = loop_state.get("smooth_loss", 0.0)
    total_time = loop_state.get("total_time", 0.0)
    val_bpb = loop_state.get("val_bpb")
    while True:
        last_step = step == num_iterations
        if step == args.stop_at_step and step > start_step:
            stop.requested, stop.signal_name = True, "--stop-at-step"
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0 and step > start_step):
            model.eval()
            val_bpb = evaluate_bpb(model, val_batches(), eval_steps, token_bytes)
            model.train()
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            logger.log({"step": step, "val_bpb": val_bpb})
            loop_state["val_bpb"] = val_bpb
        if args.core_every > 0 and (last_step or (step % args.core_every == 0 and step > start_step)):
            model.eval()
            core = evaluate_core(model, tokenizer, device, max_per_task=args.core_max_per_task, eval_dir=args.eval_dir)
            model.train()
            print0(f"step {step:05d} | CORE {core['core']:.4f}")
            logger.log({"step": step, "core": core["core"]})
        if last_step or stop.requested or (args.save_every > 0 and step % args.save_every == 0 and step > start_step):
            loop_state.update(smooth_loss=smooth_loss, total_time=total_time)
            path = save(step)
            print0(f"saved checkpoint {path}")
        if stop.requested:
            print0(f"{stop.signal_name}: checkpoint saved at step {step}; continue with --resume")
            break
        if last_step:
            break

        # one optimizer step: accumulate gradients over micro-batches
        timer.start()
        lrm, _ = apply_schedules(optimizer, step, num_iterations=num_iterations, warmup_ratio=args.warmup_ratio, warmdown_ratio=args.warmdown_ratio, final_lr_frac=args.final_lr_frac)
        train_loss, grad_norm = train_step(train_model, optimizer, train_loader, grad_accum_steps)
        if step == args.nan_at_step:
            train_loss = train_loss * float("nan")
        loss_value = train_loss.item()
        check_finite(loss_value, step, ckpt_dir)
        dt = timer.stop()
        step += 1

        # log
        if step > start_step + 1:
            total_time += dt  # the first step of a process includes compilation and warm-up
        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
        debiased = smooth_loss / (1 - 0.9**step)  # smooth_loss is part of the resume state
        tok_per_s = total_batch_size / dt
        mfu = flops_per_token * tok_per_s / (peak_flops * world_size) if peak_flops else None
        eta = (num_iterations - step) * (total_time / max(step - start_step - 1, 1))
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        mfu_str = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        print0(
            f"step {step:05d}/{num_iterations} | loss {debiased:.4f} | lr x{lrm:.3f} | grad norm {grad_norm.item():.3f} | "
            f"{dt * 1000:.0f} ms | {tok_per_s:,.0f} tok/s | MFU {mfu_str} | mem {mem:.1f} GiB | eta {format_eta(eta)}"
        )
        logger.log({"step": step, "loss": loss_value, "lr_mult": lrm, "grad_norm": grad_norm.item(), "dt": dt, "tok_per_s": tok_per_s, "mfu": mfu, "mem_gib": mem, "time": total_time})

    # -------------------------------------------------------------------------------- wrap-up: baseline and samples
    if step == num_iterations and not stop.requested:
        trained_tokens = min(num_iterations * total_batch_size, 1 << 24)
        unigram = UnigramBaseline(config.vocab_size, device)
        counting = iter(DataLoader(tokenizer, device_batch_size, args.max_seq_len, "train", device, rank, world_size, data_dir))
        for _ in range(max(1, trained_tokens // (device_batch_size * args.max_seq_len * world_size))):
            unigram.update(next(counting)[1])
        unigram_bpb = unigram.evaluate_bpb(val_batches(), eval_steps, token_bytes)
        print0(f"final val bpb {val_bpb:.4f} | unigram baseline val bpb {unigram_bpb:.4f} (token frequencies of {trained_tokens:,} training tokens)")
        logger.log({"step": step, "final_val_bpb": val_bpb, "unigram_val_bpb": unigram_bpb, "train_time_s": total_time, "num_params": n_params})
        steps_timed = max(num_iterations - start_step - 1, 1)
        tok_per_s = total_batch_size * steps_timed / max(total_time, 1e-9)
        report.log_stage("base_train", args=vars(args), metrics_file=logger.path, metrics={
            "num_params": n_params, "num_scaling_params": n_scaling, "tokens": num_iterations * total_batch_size, "val_bpb": val_bpb,
            "unigram_val_bpb": unigram_bpb, "tok_per_s": tok_per_s, "mfu": flops_per_token * tok_per_s / (peak_flops * world_size) if peak_flops else None,
            "train_time_s": total_time,
        })
        if rank == 0 and args.num_samples > 0:
            engine = Engine(model.eval(), tokenizer)
            for prompt in SAMPLE_PROMPTS[: args.num_samples]:
                ids, _ = engine.generate_batch(tokenizer.encode(prompt, prepend=tokenizer.bos_token_id), max_tokens=16, temperature=0.0)
                print0(f"sample: {prompt!r} -> {tokenizer.decode(ids[0])!r}")
    logger.finish()
    print0(f"training time {total_time:.1f}s")
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
