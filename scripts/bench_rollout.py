"""
Generation speed where the pipeline spends it: an RL rollout and chat_eval's generative loop, with
the python tool on, on a trained chat checkpoint (its tool calls are what this measures beside the
decode; random weights make none).

    python -m scripts.bench_rollout                            # the newest sft model, runcpu.sh's RL settings
    python -m scripts.bench_rollout --no-arithmetic            # every tool call in the sandbox, as before the in-process arithmetic
    python -m scripts.bench_rollout --source rl --repeats 5

- rollout: --rollout-steps steps, each --prompts GSM8K train prompts (different ones every step)
  x --num-samples samples of at most --rollout-tokens tokens at temperature 1, top-k 50
  (nanochat.rl.sample_rollouts, what chat_rl and chat_rsft sample with; the defaults are runcpu.sh's
  RL settings).
- chat_eval: nanochat.chat_eval.evaluate_generative on the first --problems GSM8K test problems,
  --batch-size at a time, at most --eval-tokens tokens, greedy (judging included).
Each is run once to warm up, then --repeats times; printed: one JSON line with the median tokens/s
of each (generated tokens, tool outputs included, over wall time), and the python tool calls of
one rollout pass and one eval pass: how many, and how many started the sandbox (the others were
one arithmetic expression, computed in the process: nanochat/execution.py).
GSM8K data: --tasks-dir, else $NANOCHAT_TASKS_DIR or $NANOCHAT_DATA_ROOT/tasks.
"""

import argparse
import json
import statistics
import time

import torch

from nanochat import execution
from nanochat.chat_eval import evaluate_generative
from nanochat.checkpoint_manager import STAGES, load_model
from nanochat.common import NanochatError, autodetect_device_type, run_main
from nanochat.engine import Engine
from nanochat.rl import sample_rollouts
from tasks.gsm8k import GSM8K


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=str, default="sft", choices=STAGES, help="stage of the checkpoint")
    p.add_argument("--model-tag", type=str, default=None, help="model tag (default: the newest of the stage)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--tasks-dir", type=str, default=None, help="local task data holding gsm8k/ (default: $NANOCHAT_TASKS_DIR or $NANOCHAT_DATA_ROOT/tasks)")
    p.add_argument("--rollout-steps", type=int, default=6, help="rollout steps per timed pass")
    p.add_argument("--prompts", type=int, default=4, help="prompts per rollout step")
    p.add_argument("--num-samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--rollout-tokens", type=int, default=64, help="new tokens per rollout sample at most")
    p.add_argument("--problems", type=int, default=16, help="GSM8K test problems per eval pass")
    p.add_argument("--batch-size", type=int, default=8, help="problems decoded together in the eval pass")
    p.add_argument("--eval-tokens", type=int, default=48, help="new tokens per eval reply at most")
    p.add_argument("--repeats", type=int, default=2, help="timed passes of each (median reported)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-arithmetic", action="store_true", help="run every tool call in the sandbox (no in-process arithmetic)")
    p.add_argument("--device-type", type=str, default=None, help="cuda | cpu | mps (default: autodetect)")
    args = p.parse_args(argv)
    for name in ("rollout_steps", "prompts", "num_samples", "rollout_tokens", "problems", "batch_size", "eval_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise NanochatError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device_type or autodetect_device_type())
    train = GSM8K(split="train", tasks_dir=args.tasks_dir)
    test = GSM8K(split="test", tasks_dir=args.tasks_dir)
    need = args.rollout_steps * args.prompts
    if need > len(train) or args.problems > len(test):
        raise NanochatError(f"GSM8K has {len(train)} train and {len(test)} test problems; --rollout-steps x --prompts needs {need}, --problems {args.problems}")
    model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)

    calls = {"tool_calls": 0, "sandboxed": 0}
    arithmetic = execution._arithmetic

    def counted(code):
        text = None if args.no_arithmetic else arithmetic(code)
        calls["tool_calls"] += 1
        calls["sandboxed"] += text is None
        return text

    def rollout():
        t0, tokens = time.perf_counter(), 0
        for s in range(args.rollout_steps):
            ids = range(s * args.prompts, (s + 1) * args.prompts)
            prompts = [tokenizer.render_for_completion(train[i]) for i in ids]
            groups = sample_rollouts(engine, prompts, args.num_samples, args.rollout_tokens, 1.0, 50, seeds=list(ids))
            tokens += sum(len(r.tokens) for g in groups for r in g)
        return tokens / (time.perf_counter() - t0)

    def eval_pass():
        t0 = time.perf_counter()
        _, outcomes = evaluate_generative(engine, tokenizer, test, list(range(args.problems)), max_new_tokens=args.eval_tokens, temperature=0.0, batch_size=args.batch_size)
        tokens = sum(len(tokenizer.encode(text)) for samples in outcomes.values() for text, *_ in samples)
        return tokens / (time.perf_counter() - t0)

    execution._arithmetic = counted  # run_tool_call looks it up at each call
    try:
        result = {"model": f"{args.source} {meta['model_tag']} step {meta['step']}", "device": str(device), "threads": torch.get_num_threads(), "arithmetic": not args.no_arithmetic}
        for name, run in (("rollout", rollout), ("chat_eval", eval_pass)):
            calls.update(tool_calls=0, sandboxed=0)
            run()  # warm-up, and the calls of one pass
            result[f"{name}_tool_calls"], result[f"{name}_sandboxed"] = calls["tool_calls"], calls["sandboxed"]
            result[f"{name}_tok_s"] = round(statistics.median(run() for _ in range(args.repeats)), 1)
    finally:
        execution._arithmetic = arithmetic
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_main(main)
