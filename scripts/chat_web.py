"""
Serve a trained model: a chat page at / and an OpenAI-compatible API at /v1 (FastAPI + uvicorn).

    python -m scripts.chat_web                                  # latest SFT checkpoint, http://127.0.0.1:8000
    python -m scripts.chat_web --source base --step 2000 --port 8080 --host 0.0.0.0
    python -m scripts.chat_web --model chat@prod                # a registered model (python -m scripts.lab)

One model replica per visible GPU (or one on CPU / MPS), each decoding a continuous batch of up to
--max-batch-size rows, behind one FIFO request queue. See docs/serving.md for the API, the limits
and how to call it with the `openai` client.
"""

import argparse
import logging
import signal

import torch

from nanochat.checkpoint_manager import apply_model_ref, load_model
from nanochat.common import NanochatError, autodetect_device_type, compute_init, print0, run_main
from nanochat.serving import ModelPool, Replica, ServingConfig, create_app


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a nanochat model: web chat page + OpenAI-compatible API")
    p.add_argument("--source", type=str, default=None, choices=["base", "mid", "sft", "rl"], help="training stage to load (default: sft)")
    p.add_argument("--model", type=str, default=None, help="a registered model: NAME, NAME:vN or NAME@ALIAS (python -m scripts.lab register; instead of --source/--model-tag/--step)")
    p.add_argument("--model-tag", type=str, default=None, help="model tag under the stage (default: the latest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--lora", type=str, default=None, help="a LoRA adapter directory (PEFT layout, e.g. a step directory of a --lora-rank run) merged on top of the chosen model")
    p.add_argument("--device-type", type=str, default=None, help="cuda | cpu | mps (default: autodetect)")
    p.add_argument("--num-gpus", type=int, default=None, help="CUDA only: replicas, one per GPU (default: every visible GPU)")
    p.add_argument("--host", type=str, default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--model-name", type=str, default=None, help="model id in the API (default: the --model reference, else nanochat-<source>-<tag>-step<step>)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows decoded together per replica (a request with n choices takes n)")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests queued or running; more get HTTP 429")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest rendered conversation in tokens (default: the model's sequence_len)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="largest max_tokens a request may ask for, and its default")
    p.add_argument("--max-n", type=int, default=4, help="largest n (choices per request); at most --max-batch-size")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body in bytes; more get HTTP 413")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature for requests that leave it out")
    p.add_argument("--top-k", type=int, default=50, help="top-k for requests that leave it out (0: off)")
    p.add_argument("--tools", action=argparse.BooleanOptionalAction, default=True, help="run the model's python tool calls in the sandbox")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads (default: torch's choice, one per core)")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds to let responses in flight finish on shutdown")
    return p.parse_args(argv)


def main():
    args = parse_args()
    apply_model_ref(args)
    print0(vars(args))
    if args.max_n > args.max_batch_size:
        raise NanochatError(f"--max-n {args.max_n} is more than --max-batch-size {args.max_batch_size}: such a request could never be scheduled")
    for flag in ("max_batch_size", "max_concurrent", "max_new_tokens", "max_n", "max_request_bytes"):
        if getattr(args, flag) < 1:
            raise NanochatError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

    # ---------------------------------------------------------------------------------------------
    # one replica per GPU (or one on CPU / MPS)
    device_type = args.device_type or autodetect_device_type()
    compute_init(device_type)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device_type == "cuda":
        n = torch.cuda.device_count() if args.num_gpus is None else args.num_gpus
        if not 1 <= n <= torch.cuda.device_count():
            raise NanochatError(f"--num-gpus {args.num_gpus}: {torch.cuda.device_count()} GPUs are visible")
        devices = [torch.device("cuda", i) for i in range(n)]
    else:
        devices = [torch.device(device_type)]
    replicas, meta = [], None
    for device in devices:
        model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag, step=args.step, lora=args.lora)
        replicas.append(Replica(model, tokenizer, args.max_batch_size))
    config = model.config
    print0(f"loaded {args.source} {meta['model_tag']} step {meta['step']} ({model.num_params():,} parameters) on {', '.join(map(str, devices))}")

    # ---------------------------------------------------------------------------------------------
    # limits and the app
    max_context = model.rotary_seq_len
    max_prompt_tokens = args.max_prompt_tokens or config.sequence_len
    if max_prompt_tokens >= max_context:
        raise NanochatError(f"--max-prompt-tokens {max_prompt_tokens} leaves no room in the model's context of {max_context}")
    serving = ServingConfig(
        model_id=args.model_name or args.model or f"nanochat-{args.source}-{meta['model_tag']}-step{meta['step']}" + ("-lora" if args.lora else ""),
        max_prompt_tokens=max_prompt_tokens, max_new_tokens=min(args.max_new_tokens, max_context - 1), max_context=max_context,
        max_n=args.max_n, max_request_bytes=args.max_request_bytes, temperature=args.temperature,
        top_k=args.top_k or None, tools=args.tools,
    )
    app = create_app(ModelPool(replicas, args.max_concurrent), tokenizer, serving)

    import uvicorn  # imported here: only the server needs it

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print0(f"serving {serving.model_id} at http://{args.host}:{args.port}/ (API: http://{args.host}:{args.port}/v1)")
    # uvicorn handles SIGINT/SIGTERM: it stops accepting connections, lets responses in flight finish
    # (up to --graceful-timeout), then runs the app's shutdown hook, which closes the pool. Afterwards
    # it re-raises the signal with the handler that was there before it; this no-op handler makes a
    # SIGTERM shutdown that went well exit 0 (instead of dying of the signal, status -15).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.graceful_timeout, log_level="info")


if __name__ == "__main__":
    run_main(main)
