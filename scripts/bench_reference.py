"""
Decode throughput of karpathy/nanochat's Engine, the reference that bench_infer compares against.

    python -m scripts.bench_infer --reference /path/to/nanochat        # runs this in a child process

Run with the reference checkout first on sys.path (so `nanochat` is theirs, not ours) and one JSON
argument: {"depth", "n_embd", "n_head", "vocab_size", "prompt_len", "decode_len", "batch",
"repeats", "threads"}. Builds their GPT at the same shapes as ours (window_pattern "L", random
init_weights()), prefills one prompt of random ids and decodes `batch` samples of it with
Engine.generate at temperature 1, top-k 50 (its one sampling call per step for the whole batch).
Their special tokens get ids outside the vocabulary, so no row stops early: every timed step
produces `batch` tokens. Prints one JSON line: {"decode_engine_tok_s": median over repeats}.
"""

import json
import statistics
import sys
import time

import torch


class _Tok:
    """What nanochat's Engine asks of its tokenizer; special tokens are never sampled."""

    def encode_special(self, name):
        return -1 - hash(name) % 1000

    def get_bos_token_id(self):
        return -1000

    def encode(self, text):
        return []

    def decode(self, ids):
        return ""


def main():
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, GPTConfig

    config = GPTConfig(sequence_len=spec["prompt_len"] + spec["decode_len"], vocab_size=spec["vocab_size"], n_layer=spec["depth"],
                       n_head=spec["n_head"], n_kv_head=spec["n_head"], n_embd=spec["n_embd"], window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    model.eval()
    engine = Engine(model, _Tok())
    prompt = torch.randint(0, spec["vocab_size"], (spec["prompt_len"],), generator=torch.Generator().manual_seed(0)).tolist()

    def run():
        steps = engine.generate(prompt, num_samples=spec["batch"], max_tokens=spec["decode_len"], temperature=1.0, top_k=50)
        next(steps)  # prefill, cache copy to batch rows, first sample
        t0 = time.perf_counter()
        n = sum(len(column) for column, _ in steps)
        return n / (time.perf_counter() - t0)

    run()  # warm-up
    print(json.dumps({"decode_engine_tok_s": statistics.median(run() for _ in range(spec["repeats"]))}))


if __name__ == "__main__":
    main()
