"""
Generate the identity conversations that teach the model its name: who it is, who made it, what it
can and cannot do, in many phrasings, some multi-turn (tasks/identity_gen.py). Deterministic by seed.

    python -m scripts.identity --name Ada --creator "the Lovelace lab"
    python -m scripts.identity --name Ada --creator me --n 500 --seed 1 --out ada.jsonl
    python -m scripts.identity --name Ada --creator me --fact "I was trained on one GPU in four hours."

Writes a jsonl of conversations (atomically) to --out, by default <base_dir>/identity/identity.jsonl,
where the Identity task of the mid and SFT recipes finds it (its lookup order: tasks/customjson.py,
docs/finetune.md). Prints the path, the count and three sample conversations.
"""

import argparse
import json
import os

from nanochat.common import atomic_write_bytes, run_main
from tasks.common import assistant_text
from tasks.customjson import generated_identity_file
from tasks.identity_gen import MAX_TEXT_LEN, generate_identity


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate identity conversations for a model's name and creator")
    p.add_argument("--name", type=str, required=True, help=f"the assistant's name (1 to {MAX_TEXT_LEN} characters, one line)")
    p.add_argument("--creator", type=str, required=True, help=f"who made it, as it fits 'I was made by ...' (1 to {MAX_TEXT_LEN} characters)")
    p.add_argument("--n", type=int, default=2000, help="number of conversations")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed and arguments give the same file")
    p.add_argument("--fact", type=str, action="append", default=None, help="an extra sentence about the assistant, added to some answers that describe it (repeatable)")
    p.add_argument("--out", type=str, default=None, help="output jsonl (default: <base_dir>/identity/identity.jsonl, which Identity reads)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print(vars(args))
    conversations = generate_identity(args.name, args.creator, n=args.n, seed=args.seed, facts=args.fact)
    path = args.out or generated_identity_file()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations).encode("utf-8")
    atomic_write_bytes(path, data)
    print(f"wrote {len(conversations)} identity conversations to {path}")
    for i, conversation in enumerate(conversations[:3]):
        print(f"--- sample {i + 1}")
        for message in conversation["messages"]:
            text = assistant_text(message) if message["role"] == "assistant" else message["content"]
            print(f"{message['role']}: {text}")


if __name__ == "__main__":
    run_main(main)
