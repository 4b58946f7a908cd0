"""
Chat with a trained model in the terminal, with streaming output and the python tool.

    python -m scripts.chat_cli                      # interactive, latest SFT checkpoint
    python -m scripts.chat_cli -p "Why is the sky blue?"
    python -m scripts.chat_cli --source base --step 2000 --temperature 0

In the interactive session: /clear starts a new conversation, /quit (or Ctrl-D) leaves.
"""

import argparse
import sys

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_init, run_main
from nanochat.engine import Engine


def parse_args():
    p = argparse.ArgumentParser(description="Chat with a nanochat model")
    p.add_argument("-p", "--prompt", type=str, default=None, help="one-shot: answer this prompt and exit")
    p.add_argument("--source", type=str, default="sft", choices=["base", "mid", "sft", "rl"], help="training stage to load")
    p.add_argument("--model-tag", type=str, default=None, help="model tag under the stage (default: the latest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--system", type=str, default=None, help="system message that opens the conversation")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default: off)")
    p.add_argument("--max-tokens", type=int, default=256, help="maximum tokens per reply")
    p.add_argument("--seed", type=int, default=42, help="sampling seed")
    p.add_argument("--device-type", type=str, default=None, help="cuda | cpu | mps (default: autodetect)")
    return p.parse_args()


def reply(engine, tokenizer, messages, args, seed):
    """Stream one assistant reply to stdout; returns (text, ended_at_assistant_end)."""
    S = tokenizer.special_tokens
    ids = tokenizer.render_for_completion({"messages": messages})
    out, ended = [], False
    for column, _ in engine.generate(ids, 1, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=seed):
        t = column[0]
        if t in (S["<|assistant_end|>"], tokenizer.bos_token_id):
            ended = t == S["<|assistant_end|>"]
            break
        out.append(t)
        piece = tokenizer.decode([t]) if t < len(tokenizer.mergeable_ranks) else {
            S["<|python_start|>"]: "\n[python] ", S["<|python_end|>"]: "\n", S["<|output_start|>"]: "[output] ", S["<|output_end|>"]: "\n"
        }.get(t, "")
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return tokenizer.decode([t for t in out if t < len(tokenizer.mergeable_ranks)]), ended


def main():
    args = parse_args()
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)
    base = [{"role": "system", "content": args.system}] if args.system else []

    if args.prompt is not None:
        print(f"User: {args.prompt}\nAssistant: ", end="")
        _, ended = reply(engine, tokenizer, base + [{"role": "user", "content": args.prompt}], args, args.seed)
        print("[stopped at <|assistant_end|>]" if ended else f"[stopped at --max-tokens {args.max_tokens}]")
        return

    print(f"nanochat ({args.source}, step {meta['step']}, {model.num_params():,} parameters). /clear: new conversation, /quit: exit")
    messages, turn = list(base), 0
    while True:
        try:
            user = input("\nUser: ").strip()
        except EOFError:
            print()
            break
        if user in ("/quit", "/exit"):
            break
        if user == "/clear":
            messages, turn = list(base), 0
            print("(conversation cleared)")
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        print("Assistant: ", end="")
        text, _ = reply(engine, tokenizer, messages, args, args.seed + turn)
        messages.append({"role": "assistant", "content": text})
        turn += 1


if __name__ == "__main__":
    with torch.inference_mode():
        run_main(main)
