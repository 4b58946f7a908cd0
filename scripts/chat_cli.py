"""
Chat with a trained model in the terminal, with streaming output and the python tool.

    python -m scripts.chat_cli                      # interactive, latest SFT checkpoint
    python -m scripts.chat_cli -p "Why is the sky blue?"
    python -m scripts.chat_cli --source base --step 2000 --temperature 0
    python -m scripts.chat_cli --model chat@prod     # a registered model (python -m scripts.lab register / alias)

In the interactive session: /clear starts a new conversation, /quit (or Ctrl-D) leaves. A
conversation longer than the model's context (its sequence_len) is refused with a one-line error.
"""

import argparse
import math
import sys

import torch

from nanochat.checkpoint_manager import apply_model_ref, load_model
from nanochat.common import NanochatError, compute_init, run_main
from nanochat.engine import Engine


def parse_args():
    p = argparse.ArgumentParser(description="Chat with a nanochat model")
    p.add_argument("-p", "--prompt", type=str, default=None, help="one-shot: answer this prompt and exit")
    p.add_argument("--source", type=str, default=None, choices=["base", "mid", "sft", "rl"], help="training stage to load (default: sft)")
    p.add_argument("--model", type=str, default=None, help="a registered model: NAME, NAME:vN or NAME@ALIAS (python -m scripts.lab register; instead of --source/--model-tag/--step)")
    p.add_argument("--model-tag", type=str, default=None, help="model tag under the stage (default: the latest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--lora", type=str, default=None, help="a LoRA adapter directory (PEFT layout, e.g. a step directory of a --lora-rank run) merged on top of the chosen model")
    p.add_argument("--system", type=str, default=None, help="system message that opens the conversation")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default: off)")
    p.add_argument("--max-tokens", type=int, default=256, help="maximum tokens per reply")
    p.add_argument("--seed", type=int, default=42, help="sampling seed")
    p.add_argument("--device-type", type=str, default=None, help="cuda | cpu | mps (default: autodetect)")
    return p.parse_args()


def check_args(args):
    """Raise NanochatError for a numeric flag out of range (before the model loads)."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise NanochatError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise NanochatError(f"--top-k must be >= 0 (0: all tokens), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise NanochatError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_tokens < 1:
        raise NanochatError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.step is not None and args.step < 0:
        raise NanochatError(f"--step must be >= 0, got {args.step}")
    if not 0 <= args.seed < 2**63:
        raise NanochatError(f"--seed must be in [0, 2**63), got {args.seed}")


def prompt_ids(model, tokenizer, messages):
    """The conversation rendered for the next reply (list of ids). Raises NanochatError when it is
    longer than the model's context, config.sequence_len: the model never saw positions past it."""
    ids = tokenizer.render_for_completion({"messages": messages})
    if len(ids) > model.config.sequence_len:
        raise NanochatError(f"the conversation is {len(ids)} tokens, longer than the model's context of "
                            f"{model.config.sequence_len} tokens")
    return ids


def reply(engine, tokenizer, ids, args, seed):
    """Stream one assistant reply to the prompt `ids` to stdout; returns (text, ended_at_assistant_end)."""
    S = tokenizer.special_tokens
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
    check_args(args)
    apply_model_ref(args)
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag, step=args.step, lora=args.lora)
    # a full context plus the reply must fit the RoPE table (the engine refuses a request that does not)
    most = model.rotary_seq_len - model.config.sequence_len + 1
    if args.max_tokens > most:
        raise NanochatError(f"--max-tokens {args.max_tokens} is more than this model can generate after a full context: "
                            f"at most {most}")
    engine = Engine(model, tokenizer)
    base = [{"role": "system", "content": args.system}] if args.system else []

    if args.prompt is not None:
        ids = prompt_ids(model, tokenizer, base + [{"role": "user", "content": args.prompt}])
        print(f"User: {args.prompt}\nAssistant: ", end="")
        _, ended = reply(engine, tokenizer, ids, args, args.seed)
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
        try:
            ids = prompt_ids(model, tokenizer, messages + [{"role": "user", "content": user}])
        except NanochatError as e:
            print(f"error: {e}; /clear starts a new conversation", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": user})
        print("Assistant: ", end="")
        text, _ = reply(engine, tokenizer, ids, args, args.seed + turn)
        messages.append({"role": "assistant", "content": text})
        turn += 1


if __name__ == "__main__":
    with torch.inference_mode():
        run_main(main)
