"""
Training throughput benchmark (not a test): tokens/s and MFU of the real training step
(nanochat.training.train_step with the real model and optimizer) on random tokens, for a given
depth / seq_len / batch.

    python -m scripts.bench_train --depth 6 --max-seq-len 512 --device-batch-size 32 --total-batch-size 16384 --vocab-size 32768
    torchrun --standalone --nproc_per_node=8 -m scripts.bench_train --depth 20

Reports the median over --windows windows of --window-steps steps each, after --warmup-steps
(compilation, allocator warm-up).
"""

import argparse
import statistics
import time

import torch

from nanochat.common import NanochatError, compute_cleanup, compute_init, print0, run_main
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizer
from nanochat.scaling import EMBEDDING_LR, MATRIX_LR, SCALAR_LR, UNEMBEDDING_LR
from nanochat.training import get_peak_flops, train_step


def parse_args():
    p = argparse.ArgumentParser(description="Benchmark training tokens/s and MFU")
    p.add_argument("--depth", type=int, default=6, help="model depth (the one dial)")
    p.add_argument("--max-seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per micro-batch per device")
    p.add_argument("--total-batch-size", type=int, default=16384, help="tokens per optimizer step (all ranks)")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    p.add_argument("--n-kv-head", type=int, default=None, help="key/value heads (default: n_head)")
    p.add_argument("--window-pattern", type=str, default="L", help="sliding-window pattern, e.g. SSSL")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps not timed")
    p.add_argument("--windows", type=int, default=5, help="timed windows (the median is reported)")
    p.add_argument("--window-steps", type=int, default=2, help="optimizer steps per window")
    p.add_argument("--dtype", type=str, default="auto", choices=["auto", "bfloat16", "float32"], help="compute dtype of activations (auto: bf16 on CUDA, fp32 elsewhere; bf16 helps CPUs with AMX)")
    p.add_argument("--compile", type=int, default=None, help="torch.compile (default: 1 on CUDA, 0 elsewhere)")
    p.add_argument("--device-type", type=str, default=None, help="cuda | cpu | mps (default: autodetect)")
    return p.parse_args()


def main():
    args = parse_args()
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    rows = args.total_batch_size // (args.max_seq_len * world_size)
    if rows * args.max_seq_len * world_size != args.total_batch_size or rows % args.device_batch_size:
        raise NanochatError(f"--total-batch-size {args.total_batch_size} must be a multiple of --device-batch-size x --max-seq-len x ranks")
    grad_accum_steps = rows // args.device_batch_size

    config = GPTConfig.from_depth(args.depth, args.vocab_size, args.max_seq_len, n_kv_head=args.n_kv_head, window_pattern=args.window_pattern)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.compute_dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model.init_weights(seed=0)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    optimizer = build_optimizer(model, matrix_lr=MATRIX_LR, embedding_lr=EMBEDDING_LR, unembedding_lr=UNEMBEDDING_LR, scalar_lr=SCALAR_LR, weight_decay=0.0, model_dim=config.n_embd)
    flops_per_token = model.estimate_flops()
    peak = get_peak_flops(device)
    print0(f"{config}\nparameters {model.num_params():,} | {flops_per_token:.3e} FLOPs/token | {grad_accum_steps} micro-batches of {args.device_batch_size}x{args.max_seq_len} per step | torch threads {torch.get_num_threads()}")

    gen = torch.Generator(device=device).manual_seed(rank)

    def random_batches():
        while True:
            x = torch.randint(0, args.vocab_size, (args.device_batch_size, args.max_seq_len + 1), device=device, generator=gen)
            yield x[:, :-1], x[:, 1:]

    batches = random_batches()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup_steps):
        train_step(train_model, optimizer, [next(batches) for _ in range(grad_accum_steps)])
    sync()
    rates = []
    for w in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.window_steps):
            loss, _ = train_step(train_model, optimizer, [next(batches) for _ in range(grad_accum_steps)])
        loss.item()
        sync()
        dt = time.perf_counter() - t0
        rates.append(args.window_steps * args.total_batch_size / dt)
        print0(f"window {w + 1}/{args.windows}: {rates[-1]:,.0f} tokens/s")
    median = statistics.median(rates)
    mfu = f"{100 * flops_per_token * median / (peak * world_size):.1f}%" if peak else "n/a (no peak FLOP/s known for this device)"
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
    print0(f"depth {args.depth} | seq_len {args.max_seq_len} | batch {args.device_batch_size}x{grad_accum_steps}x{world_size} | median {median:,.0f} tokens/s (min {min(rates):,.0f}, max {max(rates):,.0f}) | {flops_per_token * median / world_size / 1e9:,.1f} model GFLOP/s per process | MFU {mfu} | peak mem {mem}")
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
