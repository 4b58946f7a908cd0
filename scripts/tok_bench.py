"""
Benchmark (not a test): BPE training speed, memory and compression of our Rust trainer
(nanochat_bpe, rustbpe/) against Hugging Face `tokenizers` and the PyPI package `rustbpe`, plus
encode throughput of our encoder against tiktoken with the same ranks.

    python -m scripts.tok_bench                                   # whole corpus, V = 65536, 3 rounds
    python -m scripts.tok_bench --max-chars 20000000 --repeats 1  # a quick look

Method. Every training run is its own process (`--worker NAME`, spawned by this script), timed
from spawn to exit: Python start-up, imports, reading the parquet shards and training, the whole
thing, as a user would run it. Peak RSS is the worker's VmHWM (/proc, Linux), read as it exits. The workers import
only pyarrow and the trainer under test (not torch, not nanochat: their imports alone cost
seconds and hundreds of MB that have nothing to do with tokenizer training). Runs are interleaved
(ours, hf, rustbpe, ours, hf, ...) so that load from other processes on a shared machine falls
on all trainers alike; the table reports medians. Each trainer is fed the way it is fastest: ours
and HF take lists of documents (one list per parquet row group), PyPI rustbpe takes str items
(it does not accept lists).

Corpus: the first --max-chars characters of the shards of --data-dir in file order (training
shards, then the validation shard with --corpus all, the default, which is what the issue's
targets measure: "the whole pretraining corpus"). bytes/token is measured on the validation shard
(with --corpus all it is part of the training text; the comparison between trainers is still
like for like).

Writes the tables to stdout and <base_dir>/report/tokenizer-bench.md.
"""

import argparse
import base64
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TRAINERS = ("ours", "hf", "rustbpe")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark BPE trainers (ours, HF tokenizers, PyPI rustbpe) and encoders")
    p.add_argument("--data-dir", type=str, default=None, help="directory of parquet shards (default: $NANOCHAT_DATA_DIR or <base_dir>/base_data)")
    p.add_argument("--corpus", choices=("all", "train"), default="all", help="shards to train on: all (train + val, the issue's setting) or train only")
    p.add_argument("--max-chars", type=int, default=0, help="train on the first N characters of the corpus (0: all of it)")
    p.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size to train (byte tokens + merges)")
    p.add_argument("--pattern", choices=("nanochat", "gpt4"), default="nanochat", help="split pattern: nanochat's (\\p{N}{1,2}) or GPT-4's (\\p{N}{1,3})")
    p.add_argument("--trainers", type=str, default=",".join(TRAINERS), help="comma-separated subset of: " + ", ".join(TRAINERS))
    p.add_argument("--repeats", type=int, default=3, help="rounds of training runs; the table shows medians")
    p.add_argument("--encode-docs", type=int, default=2000, help="validation documents for the encode-throughput test (0: skip it)")
    p.add_argument("--worker", choices=TRAINERS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=str, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# worker: one training run in its own process (only pyarrow + the trainer imported)


def shard_paths(data_dir, corpus):
    """Shards in file order; the last one is the validation shard (nanochat.dataset's rule)."""
    paths = sorted(glob.glob(os.path.join(data_dir, "*.parquet")))
    return paths if corpus == "all" else paths[:-1]


def iter_row_groups(paths, max_chars):
    """Lists of documents, one per parquet row group, until max_chars characters (0: no limit).
    A minimal reader on purpose: nanochat.dataset imports torch through nanochat.common."""
    import pyarrow.parquet as pq

    n_chars = 0
    for path in paths:
        pf = pq.ParquetFile(path)
        for i in range(pf.metadata.num_row_groups):
            docs = pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
            if max_chars:
                kept = []
                for doc in docs:
                    if n_chars >= max_chars:
                        break
                    doc = doc[: max_chars - n_chars]
                    n_chars += len(doc)
                    kept.append(doc)
                docs = kept
            if docs:
                yield docs
            if max_chars and n_chars >= max_chars:
                return


def write_ranks(path, ranks):
    """tiktoken's rank file: '<base64 token> <rank>' per line."""
    with open(path, "w") as f:
        for token, rank in ranks:
            f.write(f"{base64.b64encode(bytes(token)).decode()} {rank}\n")


def worker(args):
    paths = shard_paths(args.data_dir, args.corpus)
    batches = iter_row_groups(paths, args.max_chars)
    if args.worker == "ours":
        import nanochat_bpe

        pattern = nanochat_bpe.NANOCHAT_PATTERN if args.pattern == "nanochat" else nanochat_bpe.GPT4_PATTERN
        tok = nanochat_bpe.Tokenizer()
        tok.train_from_iterator(batches, args.vocab_size, pattern=pattern)
        write_ranks(args.out, tok.get_mergeable_ranks())
    elif args.worker == "rustbpe":
        import rustbpe

        pattern = split_pattern(args.pattern)
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator((doc for docs in batches for doc in docs), args.vocab_size, pattern=pattern)
        write_ranks(args.out, tok.get_mergeable_ranks())
    else:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

        # Byte-level BPE with our split pattern as a Split pre-tokenizer (the ByteLevel step only
        # maps bytes to its printable alphabet, no second split), trained from batches.
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split_pattern(args.pattern)), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, min_frequency=0, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        tok.train_from_iterator(batches, trainer=trainer)
        tok.save(args.out)
    # Peak RSS of this process image, from the kernel. Not the parent's wait4() ru_maxrss: Linux
    # carries the forked parent's high-water mark into it across exec.
    with open("/proc/self/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(args.out + ".rss", "w") as f:
        f.write(str(peak_kib * 1024))


def split_pattern(name):
    """The two patterns, written out here so the rustbpe / HF workers need not import ours."""
    digits = "2" if name == "nanochat" else "3"
    return r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,""" + digits + r"""}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


# ------------------------------------------------------------------------------------------------
# parent: spawn, time, compare


def run_worker(args, name, out_path):
    """Run one training process; returns (wall seconds, peak RSS bytes as the worker saw it)."""
    cmd = [sys.executable, "-m", "scripts.tok_bench", "--worker", name, "--out", out_path, "--data-dir", args.data_dir, "--corpus", args.corpus, "--max-chars", str(args.max_chars), "--vocab-size", str(args.vocab_size), "--pattern", args.pattern]
    t0 = time.perf_counter()
    returncode = subprocess.call(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    wall = time.perf_counter() - t0
    if returncode != 0:
        raise RuntimeError(f"tok_bench worker {name} failed with exit code {returncode}")
    with open(out_path + ".rss") as f:
        return wall, int(f.read())


def load_encoder(name, path, pattern):
    """An object with .encode_batch(texts) -> list of id lists, for bytes/token."""
    if name == "hf":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(path)
        return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    enc = tiktoken_from_file(path, pattern)
    return lambda texts: enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)


def tiktoken_from_file(path, pattern):
    import tiktoken

    ranks = {}
    with open(path) as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="bench", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})


def encode_throughput(ranks_path, pattern_name, texts):
    """MB/s of ours and tiktoken (same ranks), 1 thread and all threads; checks they agree."""
    import nanochat_bpe

    pattern = split_pattern(pattern_name)
    enc = tiktoken_from_file(ranks_path, pattern)
    ours = nanochat_bpe.Tokenizer.from_ranks(read_ranks(ranks_path), pattern)
    n_bytes = sum(len(t.encode()) for t in texts)
    n_threads = os.cpu_count() or 1
    rows = []
    candidates = [
        ("tiktoken", "1 thread", lambda: [enc.encode_ordinary(t) for t in texts]),
        ("ours", "1 thread", lambda: [ours.encode(t) for t in texts]),
        ("tiktoken", f"{n_threads} threads", lambda: enc.encode_ordinary_batch(texts, num_threads=n_threads)),
        ("ours", f"{n_threads} threads", lambda: ours.batch_encode(texts)),
    ]
    reference = None
    for name, threads, fn in candidates:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            ids = fn()
            times.append(time.perf_counter() - t0)
        if reference is None:
            reference = ids
        elif ids != reference:
            raise RuntimeError(f"{name} ({threads}) encodes differently from tiktoken")
        rows.append((name, threads, n_bytes / statistics.median(times) / 1e6))
    return rows


def read_ranks(path):
    with open(path) as f:
        return [(base64.b64decode(tok), int(rank)) for tok, rank in (line.split() for line in f)]


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.worker:
        worker(args)
        return

    from nanochat.common import NanochatError, get_base_dir
    from nanochat.dataset import get_data_dir, list_parquet_files, read_row_group, open_shard

    args.data_dir = get_data_dir(args.data_dir)
    paths = list_parquet_files(args.data_dir)  # raises a one-line error for a bad --data-dir
    if len(paths) < 2:
        raise NanochatError(f"tok_bench needs at least 2 shards in {args.data_dir} (the last one is the validation shard)")
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    for t in trainers:
        if t not in TRAINERS:
            raise NanochatError(f"--trainers: unknown trainer {t!r} (choose from {', '.join(TRAINERS)})")
        if t == "hf":
            import tokenizers  # noqa: F401  (fail now, not in a worker)
        if t == "rustbpe":
            try:
                import rustbpe  # noqa: F401
            except ImportError:
                print("PyPI rustbpe is not installed (pip install rustbpe): skipping it")
                trainers.remove(t)
    if args.repeats < 1:
        raise NanochatError(f"--repeats must be >= 1, got {args.repeats}")
    if not 257 <= args.vocab_size <= 2**17:
        raise NanochatError(f"--vocab-size must be in 257..131072, got {args.vocab_size}")
    print(vars(args))

    val_pf = open_shard(paths[-1])
    val_docs = [doc for i in range(val_pf.metadata.num_row_groups) for doc in read_row_group(val_pf, paths[-1], i)]
    val_bytes = sum(len(d.encode()) for d in val_docs)
    pattern = split_pattern(args.pattern)

    with tempfile.TemporaryDirectory(prefix="tok_bench_") as tmp:
        results = {t: [] for t in trainers}
        outputs = {t: os.path.join(tmp, t + (".json" if t == "hf" else ".tiktoken")) for t in trainers}
        for r in range(args.repeats):
            order = trainers[r % len(trainers) :] + trainers[: r % len(trainers)]  # rotate who goes first
            for t in order:
                wall, rss = run_worker(args, t, outputs[t])
                results[t].append((wall, rss))
                print(f"round {r + 1}/{args.repeats}  {t:8s} {wall:7.2f} s  {rss / 2**30:5.2f} GiB peak RSS", flush=True)

        rows = []
        summary = {}
        for t in trainers:
            walls, rsss = zip(*results[t])
            encode = load_encoder(t, outputs[t], pattern)
            n_tokens = sum(len(ids) for ids in encode(val_docs))
            summary[t] = (statistics.median(walls), statistics.median(rsss), val_bytes / n_tokens)
        base = "ours" if "ours" in summary else trainers[0]
        for t in trainers:
            wall, rss, bpt = summary[t]
            bw, br, bb = summary[base]
            runs = " / ".join(f"{w:.1f}" for w, _ in results[t])
            rows.append((t, f"{wall:.2f}", runs, f"{rss / 2**30:.2f}", f"{bpt:.4f}", f"{bw / wall:.2f}", f"{br / rss:.2f}", f"{(bb / bpt - 1) * 100:+.2f}%"))
        header = ("trainer", "wall s (median)", "runs", "peak RSS GiB", "bytes/token (val)", f"{base} wall / this", f"{base} RSS / this", f"{base} bytes/token vs this")
        n_chars = "all" if not args.max_chars else f"{args.max_chars:,}"
        title = f"BPE training: corpus={args.corpus} max_chars={n_chars} vocab_size={args.vocab_size} pattern={args.pattern}, {args.repeats} rounds, {os.cpu_count()} CPUs"
        report = [f"## {title}", "", markdown_table(header, rows)]

        if args.encode_docs and "ours" in trainers:
            texts = val_docs[: args.encode_docs]
            enc_rows = [(name, threads, f"{mbs:.1f}") for name, threads, mbs in encode_throughput(outputs["ours"], args.pattern, texts)]
            report += ["", f"## Encode throughput ({len(texts)} validation documents, {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB, our ranks; identical ids checked)", "", markdown_table(("encoder", "threads", "MB/s"), enc_rows)]

    text = "\n".join(report) + "\n"
    print()
    print(text)
    out_dir = os.path.join(get_base_dir(), "report")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer-bench.md")
    from nanochat.common import atomic_write_bytes

    atomic_write_bytes(path, text.encode())
    print(f"written to {path}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        main()  # a worker: no nanochat import (see the module docstring)
    else:
        from nanochat.common import run_main

        run_main(main)
