"""
Train the BPE tokenizer on the first --max-chars characters of the training shards and save it
(tiktoken rank file + JSON) to <base_dir>/tokenizer.

    python -m scripts.tok_train --max-chars 2000000000 --vocab-size 65536

Everything that can fail is checked before anything is written: the flags, the destination (an
existing tokenizer there is replaced only with --force), every shard's metadata and the validation
documents. The trained tokenizer must round-trip the validation documents; it is then written into
a fresh directory beside the destination and moved into place, so a failed or interrupted run leaves
the destination as it was.
"""

import argparse
import os
import shutil
import time

from nanochat import report
from nanochat.common import NanochatError, run_main
from nanochat.dataset import get_data_dir, open_shard, parquets_iter_batched, read_row_group, split_files
from nanochat.tokenizer import META_FILE, RANKS_FILE, SPECIAL_TOKENS, Tokenizer, get_tokenizer_dir

VAL_DOCS = 32  # validation documents for the round-trip check and the compression figure


def parse_args():
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer on the pretraining shards")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="characters of training text to train on")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="characters kept per document (long documents are cut)")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size including the special tokens")
    parser.add_argument("--data-dir", type=str, default=None, help="directory of parquet shards (default: $NANOCHAT_DATA_DIR or <base_dir>/base_data)")
    parser.add_argument("--output-dir", type=str, default=None, help="where to save the tokenizer (default: <base_dir>/tokenizer)")
    parser.add_argument("--force", action="store_true", help="replace a tokenizer that already exists in the output directory")
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


def check_destination(output_dir, force):
    """Raise NanochatError unless a tokenizer may be written to output_dir."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NanochatError(f"--output-dir {output_dir} exists and is not a directory")
    if not force and any(os.path.exists(os.path.join(output_dir, name)) for name in (RANKS_FILE, META_FILE)):
        raise NanochatError(f"a tokenizer already exists at {output_dir}; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(output_dir))
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    writable = [parent] + ([output_dir] if os.path.isdir(output_dir) else [])
    if not all(os.access(d, os.W_OK | os.X_OK) for d in writable):
        raise NanochatError(f"cannot write the tokenizer to {output_dir}: permission denied")


def save_atomically(tokenizer, output_dir):
    """
    Save into a fresh directory beside output_dir, then move it in: one rename when output_dir is
    new (readers see no tokenizer or all of it); when it exists (--force), one rename per file,
    the meta last, so each file is always whole and other files in the directory are kept.
    """
    staging = f"{os.path.abspath(output_dir)}.tmp.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a crashed run that had the same pid
    os.makedirs(staging)
    try:
        tokenizer.save(staging)
        if not os.path.isdir(output_dir):
            os.rename(staging, output_dir)
            return
        for name in (RANKS_FILE, META_FILE):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main():
    args = parse_args()
    print(vars(args))

    # ---------------------------------------------------------------------------------------------
    # checks, before anything is trained or written
    for flag in ("max_chars", "doc_cap"):
        if getattr(args, flag) < 1:
            raise NanochatError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise NanochatError(f"--vocab-size {args.vocab_size} is too small: need >= {256 + len(SPECIAL_TOKENS)} "
                            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    data_dir = get_data_dir(args.data_dir)
    output_dir = args.output_dir or get_tokenizer_dir()
    check_destination(output_dir, args.force)
    for path in split_files("train", data_dir):
        open_shard(path)  # metadata only: a corrupt shard fails now, not after hours of training
    (val_path,) = split_files("val", data_dir)
    val_docs = read_row_group(open_shard(val_path), val_path, 0)[:VAL_DOCS]

    # ---------------------------------------------------------------------------------------------
    # train
    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(text_iterator(data_dir, args.max_chars, args.doc_cap), args.vocab_size)
    train_time = time.time() - t0
    print(f"trained vocab_size={tokenizer.vocab_size} in {train_time:.1f}s")

    # ---------------------------------------------------------------------------------------------
    # round trip and compression on the validation documents, then save
    n_bytes = n_tokens = 0
    for i, doc in enumerate(val_docs):
        ids = tokenizer.encode(doc)
        if tokenizer.decode(ids) != doc:
            raise NanochatError(f"the trained tokenizer does not round-trip document {i} of {val_path}; nothing was saved")
        n_bytes += len(doc.encode("utf-8"))
        n_tokens += len(ids)
    bytes_per_token = n_bytes / max(n_tokens, 1)
    print(f"validation compression: {bytes_per_token:.3f} bytes/token over {len(val_docs)} documents")
    save_atomically(tokenizer, output_dir)
    print(f"saved to {output_dir} (fingerprint {tokenizer.fingerprint()})")
    report.log_stage("tok_train", args=vars(args),
                     metrics={"vocab_size": tokenizer.vocab_size, "train_time_s": train_time, "val_bytes_per_token": bytes_per_token})


if __name__ == "__main__":
    run_main(main)
