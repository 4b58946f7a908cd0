"""
Train the BPE tokenizer on the first --max-chars characters of the training shards and save it
(tiktoken rank file + JSON) to <base_dir>/tokenizer.

    python -m scripts.tok_train --max-chars 2000000000 --vocab-size 65536
"""

import argparse
import time

from nanochat import report
from nanochat.common import NanochatError, run_main
from nanochat.dataset import get_data_dir, parquets_iter_batched
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir


def parse_args():
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer on the pretraining shards")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="characters of training text to train on")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="characters kept per document (long documents are cut)")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size including the special tokens")
    parser.add_argument("--data-dir", type=str, default=None, help="directory of parquet shards (default: $NANOCHAT_DATA_DIR or <base_dir>/base_data)")
    parser.add_argument("--output-dir", type=str, default=None, help="where to save the tokenizer (default: <base_dir>/tokenizer)")
    return parser.parse_args()


def text_iterator(data_dir, max_chars, doc_cap):
    """Training documents, each cut to doc_cap characters, until max_chars characters in total."""
    n_chars = 0
    for docs in parquets_iter_batched(split="train", data_dir=data_dir):
        for doc in docs:
            doc = doc[:doc_cap]
            n_chars += len(doc)
            yield doc
            if n_chars >= max_chars:
                return


def main():
    args = parse_args()
    print(vars(args))
    if args.max_chars <= 0:
        raise NanochatError(f"--max-chars must be positive, got {args.max_chars}")
    data_dir = get_data_dir(args.data_dir)
    output_dir = args.output_dir or get_tokenizer_dir()
    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(text_iterator(data_dir, args.max_chars, args.doc_cap), args.vocab_size)
    train_time = time.time() - t0
    tokenizer.save(output_dir)
    print(f"trained vocab_size={tokenizer.vocab_size} in {train_time:.1f}s, saved to {output_dir}")

    # Sanity: round trip and compression on a slice of the validation shard.
    val_docs = next(parquets_iter_batched(split="val", data_dir=data_dir))[:32]
    n_bytes = n_tokens = 0
    for doc in val_docs:
        ids = tokenizer.encode(doc)
        if tokenizer.decode(ids) != doc:
            raise RuntimeError("tokenizer round trip failed on a validation document")
        n_bytes += len(doc.encode("utf-8"))
        n_tokens += len(ids)
    print(f"validation compression: {n_bytes / max(n_tokens, 1):.3f} bytes/token over {len(val_docs)} documents")
    report.log_stage("tok_train", args=vars(args), metrics={"vocab_size": tokenizer.vocab_size, "train_time_s": train_time, "val_bytes_per_token": n_bytes / max(n_tokens, 1)})


if __name__ == "__main__":
    run_main(main)
