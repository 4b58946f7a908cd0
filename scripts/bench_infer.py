"""
Inference benchmark: prefill and decode throughput of the KV-cache engine against the bare model,
KV-cache memory, and (optionally) karpathy/nanochat's Engine at the same shapes.

    python -m scripts.bench_infer --threads 2                          # depths 4 and 6, batch 1, 8, 32, CPU (+ CUDA if present)
    python -m scripts.bench_infer --reference /path/to/nanochat        # + nanochat's Engine, same shapes, same process settings
    python -m scripts.bench_infer --source sft --batch-sizes 1 8       # a trained checkpoint and its tokenizer
    python -m scripts.bench_infer --depths 12 20 --prompt-len 512 --device-types cuda

Random weights of the shapes GPTConfig.from_depth gives (speed does not depend on the values), or
the checkpoint of --source (newest --model-tag / --step unless given). For each (device, depth,
batch size):
- prefill: one forward of batch x prompt_len tokens into an empty KV cache; tokens/s = B*T / time.
- decode (model): decode_len - 1 single-token forwards against the cache, each feeding the previous
  step's argmax; tokens/s = B * steps / time. What the hardware does, with no sampling at all.
- decode (engine): engine.DecodeBatch on B requests of the same prompt length, sampling at
  temperature 1 with top-k 50, each request with its own seed: everything a served request, an
  eval or an RL rollout pays (sampling, stop and tool checks, bookkeeping). Random weights: the
  special tokens get ids outside the vocabulary, so no row stops early and both loops decode the
  same number of tokens. The first step (the prefill's sample) is not timed, as in the model loop.
- overhead: engine time over model time, minus 1 (the share of model-only time the engine adds).
- bytes/step: what one decode step reads at least: every weight (the embedding: B rows) and the
  KV cache up to the mean context of the timed steps; GB/s = bytes/step / time per step.
- nanochat (with --reference DIR): its Engine.generate at the same shapes and settings, one prompt
  with B samples (scripts/bench_reference.py, run in a child process on DIR's code).
- --dtype bfloat16: the weights are cast to bf16 (not only the activations), so a step reads half
  the bytes; "greedy = fp32" is k/n, the greedy tokens of one prompt that equal fp32's before the
  first difference (meaningful with --source: random weights give near-uniform logits).
Each number is the median of --repeats runs after one warm-up run. Printed as a markdown table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from nanochat.common import NanochatError, print0, run_main
from nanochat.engine import DecodeBatch, GenerationRequest, KVCache
from nanochat.gpt import GPT, GPTConfig
from nanochat.kernels import decoding
from nanochat.tokenizer import SPECIAL_TOKENS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Prefill/decode tokens/s and KV-cache memory of the inference engine")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6], help="model depths (GPTConfig.from_depth)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="sequences decoded together")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size (speedrun's tokenizer: 32768)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per sequence (prefill)")
    p.add_argument("--decode-len", type=int, default=128, help="decode steps")
    p.add_argument("--device-types", type=str, nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda when available)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads (default: torch's choice, one per core)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype (default: the model's: fp32 on CPU, bf16 on CUDA); bfloat16 also stores the weights in bf16 and compares greedy tokens with fp32's")
    p.add_argument("--source", choices=["base", "mid", "sft", "rl"], default=None, help="benchmark this stage's checkpoint instead of random weights")
    p.add_argument("--model-tag", type=str, default=None, help="with --source: the model tag (default: newest)")
    p.add_argument("--step", type=int, default=None, help="with --source: the step (default: last)")
    p.add_argument("--reference", type=str, default=None, help="a karpathy/nanochat checkout: also time its Engine at the same shapes (random weights only)")
    return p.parse_args(argv)


class _Tok:
    """The tokenizer attributes DecodeBatch needs, for random weights: the special tokens get ids
    past the vocabulary, so they are never sampled (no row stops early; no text is decoded)."""

    def __init__(self, vocab_size):
        self.special_tokens = {name: vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.bos_token_id = self.special_tokens["<|bos|>"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_rate(fn, repeats):
    """fn() -> (tokens, seconds). One warm-up call, then the median tokens/s of repeats calls."""
    fn()
    return statistics.median(n / t for n, t in (fn() for _ in range(repeats)))


def random_model(device, depth, args):
    config = GPTConfig.from_depth(depth, vocab_size=args.vocab_size, sequence_len=args.prompt_len + args.decode_len)
    with torch.device(device):
        model = GPT(config)
    model.init_weights(seed=0)
    return model, _Tok(args.vocab_size)


def step_bytes(model, batch, context, dtype):
    """Bytes one decode step reads at least: every weight as stored (of the embedding, only the
    batch's rows) and the keys and values of `context` positions per row, in the cache's dtype."""
    c = model.config
    wte = model.transformer.wte.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - (wte.numel() - batch * c.n_embd) * wte.element_size()
    kv = 2 * c.n_layer * batch * context * c.n_kv_head * (c.n_embd // c.n_head) * torch.tensor([], dtype=dtype).element_size()
    return weights + kv


@torch.inference_mode()
def greedy_tokens(model, prompt, n):
    """n greedy tokens after prompt (int64 [1, T]) through the KV cache and the decode products."""
    cache = KVCache.for_model(model, 1, prompt.size(1) + n)
    nxt = model(prompt, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
    out = [nxt.item()]
    with decoding():
        for _ in range(n - 1):
            nxt = model(nxt, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
            out.append(nxt.item())
    return out


def to_bf16(model, args, device):
    """Cast the model's weights to bf16 for a bf16 decode (half the bytes per step) and compare its
    greedy tokens on one prompt with fp32's: "k/n", k = tokens before the first difference."""
    gen = torch.Generator(device=device).manual_seed(1)
    n_text = model.config.vocab_size - (len(SPECIAL_TOKENS) if args.source else 0)
    prompt = torch.randint(0, n_text, (1, args.prompt_len), device=device, generator=gen)
    model.eval().compute_dtype = torch.float32
    ref = greedy_tokens(model, prompt, args.decode_len)
    model.to(torch.bfloat16).compute_dtype = torch.bfloat16
    got = greedy_tokens(model, prompt, args.decode_len)
    same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
    return f"{same}/{len(ref)}"


def bench_one(device, model, tok, batch, args):
    model.eval()
    config = model.config
    if args.dtype:
        model.compute_dtype = getattr(torch, args.dtype)
    max_len = args.prompt_len + args.decode_len
    gen = torch.Generator(device=device).manual_seed(0)
    n_text = config.vocab_size - (len(SPECIAL_TOKENS) if args.source else 0)  # a real tokenizer's specials are its last ids
    prompt = torch.randint(0, n_text, (batch, args.prompt_len), device=device, generator=gen)

    @torch.inference_mode()
    def prefill():
        cache = KVCache.for_model(model, batch, max_len)
        sync(device)
        t0 = time.perf_counter()
        model(prompt, kv_cache=cache)
        sync(device)
        return batch * args.prompt_len, time.perf_counter() - t0

    @torch.inference_mode()
    def decode_model():
        cache = KVCache.for_model(model, batch, max_len)
        nxt = model(prompt, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        t0 = time.perf_counter()
        with decoding():  # the decode products the engine uses (kernels.small_linear)
            for _ in range(args.decode_len - 1):
                nxt = model(nxt, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        return batch * (args.decode_len - 1), time.perf_counter() - t0

    def decode_engine():
        rows = DecodeBatch(model, tok)
        rows.add([GenerationRequest(p.tolist(), max_tokens=args.decode_len, temperature=1.0, top_k=50, seed=i, tools=False) for i, p in enumerate(prompt)])
        rows.step()  # samples from the prefill's logits, then runs the first decode forward
        sync(device)
        t0 = time.perf_counter()
        n = 0
        while len(rows):
            n += len(rows.step())
        sync(device)
        return n, time.perf_counter() - t0

    kv = KVCache.for_model(model, batch, max_len)
    row = {"device": str(device), "depth": config.n_layer, "n_embd": config.n_embd, "params_M": model.num_params() / 1e6, "batch": batch,
           "prefill_tok_s": median_rate(prefill, args.repeats), "decode_model_tok_s": median_rate(decode_model, args.repeats),
           "decode_engine_tok_s": median_rate(decode_engine, args.repeats), "kv_MiB": kv.nbytes() / 2**20,
           "dtype": str(kv.k.dtype).removeprefix("torch.")}
    row["overhead"] = row["decode_model_tok_s"] / row["decode_engine_tok_s"] - 1
    row["bytes_per_step"] = step_bytes(model, batch, args.prompt_len + args.decode_len // 2, kv.k.dtype)
    row["model_GB_s"] = row["bytes_per_step"] * row["decode_model_tok_s"] / batch / 1e9
    return row


def bench_reference(path, depth, n_embd, n_head, batch, args):
    """nanochat's Engine decode tokens/s at these shapes (scripts/bench_reference.py on its code)."""
    spec = {"depth": depth, "n_embd": n_embd, "n_head": n_head, "vocab_size": args.vocab_size, "prompt_len": args.prompt_len,
            "decode_len": args.decode_len, "batch": batch, "repeats": args.repeats, "threads": torch.get_num_threads()}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_reference.py")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
    proc = subprocess.run([sys.executable, script, json.dumps(spec)], cwd=path, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NanochatError(f"--reference {path}: its Engine failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["decode_engine_tok_s"]


def main():
    args = parse_args()
    print0(vars(args))
    if min(args.depths + args.batch_sizes + [args.prompt_len, args.repeats]) < 1 or args.decode_len < 2:
        raise NanochatError("--depths, --batch-sizes, --prompt-len and --repeats must be >= 1, --decode-len >= 2")
    if args.reference and (args.source or not os.path.isfile(os.path.join(args.reference, "nanochat", "engine.py"))):
        raise NanochatError(f"--reference {args.reference}: needs a karpathy/nanochat checkout (nanochat/engine.py) and random weights (no --source)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device_types = args.device_types or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in device_types and not torch.cuda.is_available():
        raise NanochatError("--device-types cuda was given but CUDA is not available")
    rows = []
    for dt in device_types:
        device = torch.device(dt)
        name = torch.cuda.get_device_name(device) if dt == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        models = []
        if args.source:
            from nanochat.checkpoint_manager import load_model

            model, tok, _ = load_model(args.source, device, args.model_tag, args.step)
            if args.prompt_len + args.decode_len > model.config.sequence_len:
                raise NanochatError(f"--prompt-len + --decode-len = {args.prompt_len + args.decode_len} > the model's sequence_len {model.config.sequence_len}")
            models.append((model, tok))
        else:
            models += [random_model(device, depth, args) for depth in args.depths]
        for model, tok in models:
            greedy = to_bf16(model, args, device) if args.dtype == "bfloat16" else None
            for batch in args.batch_sizes:
                t0 = time.perf_counter()
                row = bench_one(device, model, tok, batch, args) | {"hardware": name, "greedy": greedy}
                if args.reference and dt == "cpu":
                    row["reference_tok_s"] = bench_reference(args.reference, row["depth"], row["n_embd"], model.config.n_head, batch, args)
                rows.append(row)
                print0(f"  {dt} depth {row['depth']} batch {batch}: {time.perf_counter() - t0:.1f}s")
    print0(f"\nprompt {args.prompt_len} tokens, {args.decode_len} decode steps, vocab {'of the checkpoint' if args.source else args.vocab_size}, "
           f"engine sampling temperature 1 top-k 50, median of {args.repeats}\n")
    ref = any("reference_tok_s" in r for r in rows)
    greedy = any(r["greedy"] for r in rows)
    print0("| hardware | depth | n_embd | params | batch | dtype | prefill tok/s | decode tok/s (model) | decode tok/s (engine) | overhead | "
           + ("nanochat engine tok/s | engine / nanochat | " if ref else "") + "MB/step | GB/s (model) | KV cache |" + (" greedy = fp32 |" if greedy else ""))
    print0("|---" * (13 + 2 * ref + greedy) + "|")
    for r in rows:
        cells = [r["hardware"], r["depth"], r["n_embd"], f"{r['params_M']:.1f}M", r["batch"], r["dtype"], f"{r['prefill_tok_s']:,.0f}",
                 f"{r['decode_model_tok_s']:,.0f}", f"{r['decode_engine_tok_s']:,.0f}", f"{100 * r['overhead']:.1f}%"]
        if ref:
            cells += [f"{r['reference_tok_s']:,.0f}", f"{r['decode_engine_tok_s'] / r['reference_tok_s']:.2f}x"] if "reference_tok_s" in r else ["", ""]
        cells += [f"{r['bytes_per_step'] / 1e6:.1f}", f"{r['model_GB_s']:.1f}", f"{r['kv_MiB']:.2f} MiB"] + ([r["greedy"]] if greedy else [])
        print0("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    run_main(main)
