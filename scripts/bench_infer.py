"""
Inference benchmark: prefill and decode throughput of the KV-cache engine, and KV-cache memory.

    python -m scripts.bench_infer                                   # depths 4 and 6, batch 1 and 8, CPU (+ CUDA if present)
    python -m scripts.bench_infer --depths 12 20 --vocab-size 65536 --prompt-len 512 --device-types cuda

Random weights of the shapes GPTConfig.from_depth gives (speed does not depend on the values). For
each (device, depth, batch size):
- prefill: one forward of batch x prompt_len tokens into an empty KV cache; tokens/s = B*T / time.
- decode (model): decode_len single-token forwards against the cache, each feeding the previous
  step's argmax; tokens/s = B * decode_len / time. What the hardware does.
- decode (engine): the same number of steps through engine.DecodeBatch (sampling at temperature 1
  with top-k 50, per-row bookkeeping), i.e. what a served request gets. tokens/s counts the tokens
  actually produced.
- KV cache: bytes of the preallocated cache for B x (prompt_len + decode_len) positions.
Each number is the median of --repeats runs after one warm-up run. Printed as a markdown table.
"""

import argparse
import statistics
import time

import torch

from nanochat.common import NanochatError, print0, run_main
from nanochat.engine import DecodeBatch, GenerationRequest, KVCache
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Prefill/decode tokens/s and KV-cache memory of the inference engine")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6], help="model depths (GPTConfig.from_depth)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="sequences decoded together")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (runs/runcpu.sh trains 8192)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (prefill)")
    p.add_argument("--decode-len", type=int, default=32, help="decode steps")
    p.add_argument("--device-types", type=str, nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda when available)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads (default: torch's choice, one per core)")
    return p.parse_args(argv)


class _Tok:
    """The few tokenizer attributes DecodeBatch needs, for a vocabulary of vocab_size ids whose last
    ids are the special tokens (no text decoding happens: tools are off)."""

    def __init__(self, vocab_size):
        first = vocab_size - len(SPECIAL_TOKENS)
        self.special_tokens = {name: first + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.bos_token_id = self.special_tokens["<|bos|>"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_rate(fn, repeats):
    """fn() -> (tokens, seconds). One warm-up call, then the median tokens/s of repeats calls."""
    fn()
    return statistics.median(n / t for n, t in (fn() for _ in range(repeats)))


def bench_one(device, depth, batch, args):
    config = GPTConfig.from_depth(depth, vocab_size=args.vocab_size, sequence_len=args.prompt_len + args.decode_len)
    with torch.device(device):
        model = GPT(config)
    model.init_weights(seed=0)
    model.eval()
    max_len = args.prompt_len + args.decode_len
    gen = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(0, args.vocab_size - len(SPECIAL_TOKENS), (batch, args.prompt_len), device=device, generator=gen)

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
        for _ in range(args.decode_len - 1):
            nxt = model(nxt, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        return batch * (args.decode_len - 1), time.perf_counter() - t0

    tok = _Tok(args.vocab_size)

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
    row = {"device": str(device), "depth": depth, "n_embd": config.n_embd, "params_M": model.num_params() / 1e6, "batch": batch,
           "prefill_tok_s": median_rate(prefill, args.repeats), "decode_model_tok_s": median_rate(decode_model, args.repeats),
           "decode_engine_tok_s": median_rate(decode_engine, args.repeats), "kv_MiB": kv.nbytes() / 2**20,
           "kv_dtype": str(kv.k.dtype).removeprefix("torch.")}
    row["decode_ms_per_step"] = 1000 * batch / row["decode_model_tok_s"]
    return row


def main():
    args = parse_args()
    print0(vars(args))
    if min(args.depths + args.batch_sizes + [args.prompt_len, args.repeats]) < 1 or args.decode_len < 2:
        raise NanochatError("--depths, --batch-sizes, --prompt-len and --repeats must be >= 1, --decode-len >= 2")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device_types = args.device_types or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in device_types and not torch.cuda.is_available():
        raise NanochatError("--device-types cuda was given but CUDA is not available")
    rows = []
    for dt in device_types:
        device = torch.device(dt)
        name = torch.cuda.get_device_name(device) if dt == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        for depth in args.depths:
            for batch in args.batch_sizes:
                t0 = time.perf_counter()
                rows.append(bench_one(device, depth, batch, args) | {"hardware": name})
                print0(f"  {dt} depth {depth} batch {batch}: {time.perf_counter() - t0:.1f}s")
    print0(f"\nprompt {args.prompt_len} tokens, {args.decode_len} decode steps, vocab {args.vocab_size}, median of {args.repeats}\n")
    print0("| hardware | depth | n_embd | params | batch | prefill tok/s | decode tok/s (model) | decode tok/s (engine) | ms/step | KV cache |")
    print0("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print0(f"| {r['hardware']} | {r['depth']} | {r['n_embd']} | {r['params_M']:.1f}M | {r['batch']} | {r['prefill_tok_s']:,.0f} | "
               f"{r['decode_model_tok_s']:,.0f} | {r['decode_engine_tok_s']:,.0f} | {r['decode_ms_per_step']:.1f} | {r['kv_MiB']:.2f} MiB {r['kv_dtype']} |")


if __name__ == "__main__":
    run_main(main)
