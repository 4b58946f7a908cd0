"""
The chat server (nanochat/serving.py, scripts/chat_web.py): the API in-process with FastAPI's
TestClient, then a real uvicorn process driven by the official `openai` client, under load (50
concurrent streams, each checked against the same request made alone), at its in-flight limit, and
through a graceful shutdown. The served models are tiny: see helpers/serving_util.py.
"""

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from conftest import byte_tokenizer
from helpers.serving_util import ServerProcess, cycle_model, cycle_text, save_for_serving
from nanochat.checkpoint_manager import load_model
from nanochat.serving import ModelPool, Replica, ServingConfig, TextStream, create_app
from scripts.load_test import run_load

HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("serving") / "base"
    save_for_serving(base, cycle_model(), "cycle")
    return base


@pytest.fixture(scope="module")
def client(checkpoints):
    model, tok, _ = load_model("sft", "cpu", model_tag="cycle", base_dir=str(checkpoints))
    config = ServingConfig(model_id="cycle", max_prompt_tokens=256, max_new_tokens=200, max_context=model.rotary_seq_len, max_n=3, max_request_bytes=64 * 1024)
    app = create_app(ModelPool([Replica(model, tok, max_batch_size=4)], max_concurrent=8), tok, config)
    with TestClient(app) as c:
        yield c


def post(client, **body):
    return client.post("/v1/chat/completions", json={"messages": HELLO, **body})


def sse_chunks(text):
    lines = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---------------------------------------------------------------------------------------------
# in-process (TestClient)

def test_page_models_health(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert all(f'id="{i}"' in page.text for i in ("messages", "input", "send", "stop", "new-chat"))
    assert client.get("/v1/models").json()["data"][0]["id"] == "cycle"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["replicas"][0]["device"] == "cpu" and health["in_flight"] == 0


def test_completion(client):
    r = post(client, temperature=0, max_tokens=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "cycle"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": cycle_text(30)} and choice["finish_reason"] == "length"
    prompt_tokens = len(byte_tokenizer().render_for_completion({"messages": HELLO}))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 30, "total_tokens": prompt_tokens + 30}


def test_stop_strings_and_n(client):
    body = post(client, temperature=0, max_tokens=100, n=3, stop=["zzz", "klm"]).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for c in body["choices"]:
        assert c["message"]["content"] == "abcdefghij" and c["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 3 * 13  # a..m: the stop string's tokens were generated
    # a stop string spanning the cycle's wrap-around, given as a plain string
    assert post(client, temperature=0, max_tokens=100, stop="z ab").json()["choices"][0]["message"]["content"] == cycle_text(25)


def test_streaming_matches_non_streaming(client):
    r = post(client, temperature=0, max_tokens=40, n=2, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_chunks(r.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    texts, finish = ["", ""], [None, None]
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        finish[choice["index"]] = choice["finish_reason"] or finish[choice["index"]]
        assert c["usage"] is None
    assert texts == [cycle_text(40)] * 2 and finish == ["length"] * 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 80
    assert len(chunks) > 40  # streamed token by token, not in one piece


def test_seeded_sampling(client):
    def reply(seed):
        return post(client, temperature=2.0, top_k=0, max_tokens=40, seed=seed).json()["choices"][0]["message"]["content"]

    assert reply(1) == reply(1)
    assert reply(1) != reply(2)


def test_text_stream_utf8_and_stop_holdback():
    tok = byte_tokenizer()
    text = "héllo ✓ wörld"
    ids = tok.encode(text)  # one token per byte
    stream = TextStream(tok)
    deltas = [stream.feed(t)[0] for t in ids] + [stream.flush()]
    assert "".join(deltas) == text
    assert deltas[1:3] == ["", "é"]  # 'é' is two bytes: nothing is shown until it is whole
    stream = TextStream(tok, ["✓ w"])
    shown = []
    for t in ids:
        delta, hit = stream.feed(t)
        shown.append(delta)
        if hit:
            break
    assert hit and "".join(shown) == "héllo "
    assert shown[-5:] == [""] * 5  # '✓' and ' ' could start the stop string: held back, never shown


BAD_REQUESTS = [
    ("malformed JSON", b'{"messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("messages missing", {"temperature": 0.5}, 400, "messages"),
    ("messages wrong type", {"messages": "hi"}, 400, "messages"),
    ("messages empty", {"messages": []}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("content wrong type", {"messages": [{"role": "user", "content": 42}]}, 400, "messages.0.content"),
    ("roles out of order", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "messages"),
    ("last role assistant", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "messages"),
    ("temperature string", {"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ("temperature too high", {"messages": HELLO, "temperature": 3}, 400, "temperature"),
    ("top_p zero", {"messages": HELLO, "top_p": 0}, 400, "top_p"),
    ("n float", {"messages": HELLO, "n": 1.5}, 400, "n"),
    ("n too large", {"messages": HELLO, "n": 4}, 400, "n"),
    ("stream not bool", {"messages": HELLO, "stream": "yes"}, 400, "stream"),
    ("max_tokens negative", {"messages": HELLO, "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens too large", {"messages": HELLO, "max_tokens": 201}, 400, "max_tokens"),
    ("too many stop strings", {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("prompt too long", {"messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages"),
    ("body too large", {"messages": [{"role": "user", "content": "x" * 70000}]}, 413, None),
    ("unknown model", {"messages": HELLO, "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("name,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(client, name, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param
    if name == "prompt too long":
        assert err["code"] == "context_length_exceeded"
    # the server stays up and serves the next request
    assert post(client, temperature=0, max_tokens=3).json()["choices"][0]["message"]["content"] == "abc"


def test_unknown_route_and_method(client):
    assert client.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


# ---------------------------------------------------------------------------------------------
# a real uvicorn process

@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "chat_web.log"
    srv = ServerProcess(checkpoints, "--max-concurrent", 50, "--max-batch-size", 8, "--max-new-tokens", 5000, "--max-n", 4, log_path=log).wait_ready()
    yield srv
    srv.terminate()


@pytest.mark.slow
def test_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    (model,) = client.models.list().data
    assert model.id == "nanochat-sft-cycle-step1"
    r = client.chat.completions.create(model=model.id, messages=HELLO, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == cycle_text(12) and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    stream = client.chat.completions.create(model=model.id, messages=HELLO, max_tokens=30, temperature=0, stop=["xyz"], stream=True)
    deltas, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            deltas.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(deltas) == "abcdefghijklmnopqrstuvw" and finish == "stop" and len([d for d in deltas if d]) > 5
    r = client.chat.completions.create(model=model.id, messages=HELLO, max_tokens=5, temperature=0, n=2, extra_body={"top_k": 1})
    assert [c.message.content for c in r.choices] == ["abcde"] * 2
    with pytest.raises(openai.BadRequestError, match="n=9"):
        client.chat.completions.create(model=model.id, messages=HELLO, n=9)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)


@pytest.mark.slow
def test_fifty_concurrent_streams(server):
    """50 streaming requests at once: none fails, and each gets exactly what it gets alone (seeded
    sampling at temperature 2, so the replies differ from each other and a mix-up would show)."""
    results, summary = run_load(server.url, 50, max_tokens=24, temperature=2.0, prompt="Hi", seed=100)
    assert summary["failed"] == 0, [r["error"] for r in results if not r["ok"]]
    assert summary["latency_p99_s"] >= summary["latency_p50_s"] > 0 and summary["tokens_per_s"] > 0
    assert len({r["content"] for r in results}) > 25
    for i, r in enumerate(results):
        alone = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 24, "temperature": 2.0, "top_k": 0, "seed": 100 + i}).json()
        assert (r["content"], r["finish_reason"]) == (alone["choices"][0]["message"]["content"], alone["choices"][0]["finish_reason"]), i
        assert r["completion_tokens"] == alone["usage"]["completion_tokens"]


@pytest.mark.slow
def test_in_flight_limit_and_disconnects_free_the_server(server):
    """At the limit of 50 requests in flight the 51st gets 429; closing the streams (as the page's
    stop button does) frees the rows and the slots."""
    async def scenario():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=60)) as c:
            body = {"messages": HELLO, "max_tokens": 5000, "temperature": 0, "stream": True}
            streams = [c.stream("POST", server.url + "/v1/chat/completions", json=body) for _ in range(50)]
            responses = [await s.__aenter__() for s in streams]
            assert all(r.status_code == 200 for r in responses)
            lines = responses[0].aiter_lines()  # kept referenced: a collected iterator closes the connection
            assert (await lines.__anext__()).startswith("data: ")
            over = await c.post(server.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
            assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
            health = (await c.get(server.url + "/health")).json()
            assert health["in_flight"] == 50 and health["replicas"][0]["rows"] == 8
            for s in streams:
                await s.__aexit__(None, None, None)

    asyncio.run(scenario())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        health = httpx.get(server.url + "/health").json()
        if health["in_flight"] == 0 and health["replicas"][0]["rows"] == 0:
            break
        time.sleep(0.1)
    assert health["in_flight"] == 0 and health["replicas"][0]["rows"] == 0 and health["queued"] == 0, health
    assert post_ok(server.url)


def post_ok(url):
    r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4, "temperature": 0}, timeout=30)
    return r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "abcd"


@pytest.mark.slow
def test_graceful_shutdown(checkpoints, tmp_path):
    """SIGTERM while a reply is streaming: the reply still completes, then the process exits 0."""
    srv = ServerProcess(checkpoints, "--max-new-tokens", 5000, log_path=tmp_path / "shutdown.log").wait_ready()
    try:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60,
                          json={"messages": HELLO, "max_tokens": 600, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            head = [next(lines) for _ in range(4)]  # role chunk, blank, first token, blank
            assert json.loads(head[2][len("data: "):])["choices"][0]["delta"]["content"] == "a"
            health = httpx.get(srv.url + "/health").json()
            assert health["replicas"][0]["rows"] == 1  # the reply is being generated when the signal comes
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):  # no new connections once shutdown began
                httpx.get(srv.url + "/health", timeout=5)
            rest = list(lines)
        chunks = sse_chunks("\n".join(rest))
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert "a" + "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == cycle_text(600)
        assert srv.proc.wait(30) == 0, srv.log()
    finally:
        srv.terminate()
    assert "Waiting for connections to close" in srv.log() and "Application shutdown complete" in srv.log()
