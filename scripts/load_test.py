"""
Load test for scripts/chat_web.py: N concurrent streaming chat completions; reports failures, latency
percentiles (time to first token and to the last) and throughput in generated tokens/s.

    python -m scripts.load_test --url http://127.0.0.1:8000 -n 50       # a server that is running
    python -m scripts.load_test --tiny                                  # starts one on a tiny random model on CPU

--tiny saves a random depth-2 GPT with a byte-level tokenizer into a temporary NANOCHAT_BASE_DIR,
starts `python -m scripts.chat_web` on it as a subprocess, runs the test, and shuts the server down
with SIGTERM (checking that the graceful shutdown exits 0). Exit status 1 when any request failed.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from nanochat.common import NanochatError, print0, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fire concurrent streaming requests at a chat_web server")
    p.add_argument("--url", type=str, default=None, help="server root, e.g. http://127.0.0.1:8000 (default with --tiny: the one it starts)")
    p.add_argument("--tiny", action="store_true", help="start a server on a tiny random model on CPU for the test")
    p.add_argument("-n", "--num-requests", type=int, default=50, help="requests, all sent at once")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of each request")
    p.add_argument("--prompt", type=str, default="Tell me a story about a robot.", help="the user message")
    p.add_argument("--seed", type=int, default=0, help="request i uses seed + i")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a request counts as failed")
    p.add_argument("--depth", type=int, default=2, help="--tiny: model depth")
    p.add_argument("--max-batch-size", type=int, default=32, help="--tiny: the server's rows per replica")
    return p.parse_args(argv)


async def one_request(client, url, body):
    """One streaming request. Returns a dict: ok, error, content, finish_reason, completion_tokens,
    ttft and latency (seconds)."""
    out = {"ok": False, "error": None, "content": "", "finish_reason": None, "completion_tokens": None, "ttft": None, "latency": None}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                out["error"] = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return out
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                    return out
                if chunk.get("usage"):
                    out["completion_tokens"] = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        if out["ttft"] is None:
                            out["ttft"] = time.perf_counter() - t0
                        out["content"] += choice["delta"]["content"]
                    if choice["finish_reason"]:
                        out["finish_reason"] = choice["finish_reason"]
            if not done or out["finish_reason"] is None or out["completion_tokens"] is None:
                out["error"] = "stream ended early"
                return out
    except (httpx.HTTPError, ValueError, KeyError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["latency"] = time.perf_counter() - t0
    out["ok"] = True
    return out


async def run_load_async(url, num_requests, max_tokens, temperature=1.0, prompt="Hello", seed=0, timeout=300.0):
    limits = httpx.Limits(max_connections=num_requests + 4, max_keepalive_connections=num_requests + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        bodies = [{"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": temperature,
                   "top_k": 0, "seed": seed + i, "stream": True, "stream_options": {"include_usage": True}} for i in range(num_requests)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, b) for b in bodies))
        wall = time.perf_counter() - t0
    return results, wall


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, -(-q * len(s) // 100) - 1))]


def run_load(url, num_requests, max_tokens, temperature=1.0, prompt="Hello", seed=0, timeout=300.0):
    """
    Send num_requests streaming requests at once (request i with seed + i) to the server at url.
    Returns (results, summary): results in request order (dicts from one_request); summary has
    ok, failed, wall_s, tokens, tokens_per_s (all generated tokens / wall time) and p50/p99 of
    ttft_s and latency_s over the successful requests.
    """
    results, wall = asyncio.run(run_load_async(url, num_requests, max_tokens, temperature, prompt, seed, timeout))
    good = [r for r in results if r["ok"]]
    tokens = sum(r["completion_tokens"] for r in good)
    summary = {"ok": len(good), "failed": len(results) - len(good), "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}
    for key in ("ttft", "latency"):
        vals = [r[key] for r in good if r[key] is not None]
        for q in (50, 99):
            summary[f"{key}_p{q}_s"] = percentile(vals, q) if vals else float("nan")
    return results, summary


def start_tiny_server(tmp, depth, num_requests, max_batch_size):
    """Save a random GPT + byte tokenizer under tmp and start chat_web on it; returns (process, url)."""
    import torch

    from nanochat.checkpoint_manager import checkpoint_dir, save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer

    tok = Tokenizer({bytes([i]): i for i in range(256)}, SPLIT_PATTERN)
    tok.save(os.path.join(tmp, "tokenizer"))
    model = GPT(GPTConfig.from_depth(depth, vocab_size=tok.vocab_size, sequence_len=512))
    model.init_weights(seed=0)
    with torch.no_grad():  # c_proj starts at zero (identity blocks): perturb so attention does work
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    meta = {"step": 0, "model_config": model.config.to_dict(), "model_tag": f"d{depth}-random"}
    save_checkpoint(checkpoint_dir("sft", f"d{depth}-random", tmp), 0, model.state_dict(), None, meta)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NANOCHAT_BASE_DIR=tmp, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "scripts.chat_web", "--device-type", "cpu", "--port", str(port), "--max-concurrent", str(num_requests), "--max-batch-size", str(max_batch_size)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NanochatError(f"the chat_web server exited with {proc.returncode} (run it by hand to see why)")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise NanochatError("the chat_web server did not come up in 120 s")


def main():
    args = parse_args()
    print0(vars(args))
    if args.url is None and not args.tiny:
        raise NanochatError("give --url of a running server, or --tiny to start one")
    if args.num_requests < 1 or args.max_tokens < 1:
        raise NanochatError(f"-n {args.num_requests} and --max-tokens {args.max_tokens} must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = (start_tiny_server(tmp, args.depth, args.num_requests, args.max_batch_size) if args.tiny else (None, None))
        url = (args.url or url).rstrip("/")
        try:
            health = httpx.get(url + "/health", timeout=10).json()
            print0(f"server: {health['model']} on {', '.join(r['device'] for r in health['replicas'])}")
            results, s = run_load(url, args.num_requests, args.max_tokens, args.temperature, args.prompt, args.seed, args.timeout)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(60)
                print0(f"server shut down gracefully: exit code {code}")
    for i, r in enumerate(results):
        if not r["ok"]:
            print0(f"request {i} failed: {r['error']}")
    print0(f"requests: {s['ok']} ok, {s['failed']} failed, {args.num_requests} concurrent, max_tokens {args.max_tokens}")
    print0(f"time to first token: p50 {s['ttft_p50_s'] * 1000:.0f} ms, p99 {s['ttft_p99_s'] * 1000:.0f} ms")
    print0(f"latency (whole reply): p50 {s['latency_p50_s'] * 1000:.0f} ms, p99 {s['latency_p99_s'] * 1000:.0f} ms")
    print0(f"throughput: {s['tokens']} tokens in {s['wall_s']:.2f} s = {s['tokens_per_s']:.0f} tokens/s")
    if s["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
