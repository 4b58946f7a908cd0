"""
Compression of our tokenizer against GPT-4's (cl100k_base) and GPT-4o's (o200k_base) on several
kinds of text: bytes per token (higher is better) and our token count relative to theirs.

    python -m scripts.tok_eval
    python -m scripts.tok_eval --data-dir ../shared/data/pretrain --tasks-dir ../shared/data/tasks

Text kinds: prose (the validation shard), code (HumanEval prompts and solutions), math (GSM8K test
questions and solutions), chat (the conversations of the chat directory). Tasks come through
tasks/ (their one interface), so --tasks-dir / $NANOCHAT_TASKS_DIR and $NANOCHAT_CHAT_DIR apply as
everywhere else.

The OpenAI rank files come from the PyPI package `bpe-openai` (bpe_openai/data/*.tiktoken.gz),
checked against the SHA-256 tiktoken expects, so no network is needed; without that package,
tiktoken.get_encoding (which downloads) is the fallback. A missing data source is skipped with a
note rather than failing the whole table.

Prints the table and writes it as markdown to <base_dir>/report/tokenizer-eval.md.
"""

import argparse
import base64
import gzip
import hashlib
import os

import tiktoken

from nanochat import report
from nanochat.common import NanochatError, atomic_write_bytes, get_base_dir, run_main
from nanochat.dataset import get_data_dir, parquets_iter_batched
from nanochat.tokenizer import get_tokenizer

OPENAI_ENCODINGS = ("cl100k_base", "o200k_base")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Compare our tokenizer's compression with GPT-4's and GPT-4o's")
    p.add_argument("--data-dir", type=str, default=None, help="pretraining shards; the last is the validation shard (default: $NANOCHAT_DATA_DIR or <base_dir>/base_data)")
    p.add_argument("--tasks-dir", type=str, default=None, help="task data with humaneval/ and gsm8k/ (default: $NANOCHAT_TASKS_DIR or <base_dir>/tasks); chat: $NANOCHAT_CHAT_DIR or its sibling chat/")
    p.add_argument("--tokenizer-dir", type=str, default=None, help="our tokenizer (default: <base_dir>/tokenizer)")
    p.add_argument("--max-chars", type=int, default=2_000_000, help="characters of text per kind (the first documents of each source)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# the OpenAI encodings, offline


def openai_encoding(name):
    """cl100k_base / o200k_base from bpe_openai's rank files (offline), else tiktoken's download."""
    try:
        import bpe_openai
    except ImportError:
        return tiktoken.get_encoding(name)
    path = os.path.join(os.path.dirname(bpe_openai.__file__), "data", f"{name}.tiktoken.gz")
    if not os.path.isfile(path):
        return tiktoken.get_encoding(name)
    with gzip.open(path, "rb") as f:
        data = f.read()
    import tiktoken_ext.openai_public as openai_public

    # tiktoken's own definition of the encoding (pattern, special tokens), with our ranks in place
    # of its download; the file must be the one tiktoken would have fetched.
    def load_ranks(url, expected_hash=None):
        if expected_hash and hashlib.sha256(data).hexdigest() != expected_hash:
            raise NanochatError(f"{path}: content does not match the SHA-256 tiktoken expects for {name}")
        ranks = {}
        for line in data.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        return ranks

    original = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = load_ranks
    try:
        spec = getattr(openai_public, name)()
    finally:
        openai_public.load_tiktoken_bpe = original
    return tiktoken.Encoding(**spec)


# ------------------------------------------------------------------------------------------------
# text sources


def conversation_text(conversation):
    """All the message text of a conversation, messages separated by newlines."""
    out = []
    for message in conversation["messages"]:
        content = message["content"]
        out.append(content if isinstance(content, str) else "".join(part["text"] for part in content))
    return "\n".join(out)


def take_chars(texts, max_chars):
    out, n = [], 0
    for text in texts:
        if n >= max_chars:
            break
        text = text[: max_chars - n]
        out.append(text)
        n += len(text)
    return out


def prose(args):
    docs = (doc for batch in parquets_iter_batched(split="val", data_dir=get_data_dir(args.data_dir)) for doc in batch)
    return take_chars(docs, args.max_chars)


def task_texts(task, max_chars):
    return take_chars((conversation_text(task[i]) for i in range(len(task))), max_chars)


def code(args):
    from tasks.humaneval import HumanEval

    return task_texts(HumanEval(tasks_dir=args.tasks_dir), args.max_chars)


def math(args):
    from tasks.gsm8k import GSM8K

    return task_texts(GSM8K(split="test", tasks_dir=args.tasks_dir), args.max_chars)


def chat(args):
    from tasks.smoltalk import SmolTalk

    return task_texts(SmolTalk(split="test", tasks_dir=args.tasks_dir), args.max_chars)  # every 100th: all sources


SOURCES = {"prose (val shard)": prose, "code (HumanEval)": code, "math (GSM8K test)": math, "chat (held-out 1%)": chat}


# ------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    print(vars(args))
    if args.max_chars <= 0:
        raise NanochatError(f"--max-chars must be positive, got {args.max_chars}")
    ours = get_tokenizer(args.tokenizer_dir)
    theirs = {name: openai_encoding(name) for name in OPENAI_ENCODINGS}

    header = ["text", "bytes", f"ours ({ours.vocab_size:,})"] + [f"{n} ({theirs[n].n_vocab:,})" for n in OPENAI_ENCODINGS] + [f"ours vs {n}" for n in OPENAI_ENCODINGS]
    rows, notes = [], []
    for kind, load in SOURCES.items():
        try:
            texts = load(args)
        except NanochatError as e:
            notes.append(f"{kind}: skipped ({e})")
            continue
        if not texts:
            notes.append(f"{kind}: skipped (no text)")
            continue
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_ours = sum(len(ours.encode(t)) for t in texts)
        n_theirs = {n: sum(len(ids) for ids in enc.encode_ordinary_batch(texts)) for n, enc in theirs.items()}
        row = [kind, f"{n_bytes:,}", f"{n_bytes / n_ours:.3f}"] + [f"{n_bytes / n_theirs[n]:.3f}" for n in OPENAI_ENCODINGS]
        # Relative token count: negative means we need fewer tokens than they do.
        row += [f"{(n_ours / n_theirs[n] - 1) * 100:+.1f}% tokens" for n in OPENAI_ENCODINGS]
        rows.append(row)

    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print()
    print("bytes per token (higher compresses better)")
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    for note in notes:
        print(note)

    lines = ["## Tokenizer compression (bytes per token; higher is better)", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes]
    path = os.path.join(get_base_dir(), "report", "tokenizer-eval.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    print(f"written to {path}")
    report.log_stage("tok_eval", args=vars(args), tables={"compression": "\n".join(lines)})


if __name__ == "__main__":
    run_main(main)
