"""
Serving: an OpenAI-compatible chat API and a one-page web UI in front of the engine.

    client --HTTP--> FastAPI handler (asyncio) --Job--> ModelPool queue --> Replica thread (one per GPU,
                     validate, tokenize, limits         FIFO, shared          or one on CPU): a DecodeBatch
    client <--SSE--- detokenize, stop strings  <--token events (call_soon_threadsafe)-- step after step

- Each Replica thread owns one model and one DecodeBatch (nanochat/engine.py) and runs continuous
  batching: between two decode steps it admits queued requests while it has free rows
  (--max-batch-size rows; a request with n choices takes n rows) and drops rows that finished or
  whose client went away. The queue is FIFO: a request that does not fit yet is not overtaken.
- Limits, each a 4xx in OpenAI's error shape {"error": {"message", "type", "param", "code"}}:
  request body bytes (413), prompt tokens (400 context_length_exceeded), max_tokens (400),
  n (400), requests in flight, queued or running (429, ModelPool.max_concurrent). Bad JSON or
  wrong types: 400 with the field in "param".
- Text: tokens are decoded incrementally (a UTF-8 character split across tokens is held back until
  whole); stop strings are matched on the text and never returned; the python tool's call and
  output are shown as ```python / ```output fences.
- Graceful shutdown: uvicorn stops accepting connections and lets responses in flight finish
  (--graceful-timeout), then the lifespan hook closes the pool: queued jobs get a 503 error,
  replica threads are joined.

API reference: https://platform.openai.com/docs/api-reference/chat (fields we do not implement,
such as logprobs or tools, are ignored, as OpenAI ignores unknown ones).
"""

import asyncio
import codecs
import collections
import json
import logging
import os
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.common import NanochatError
from nanochat.engine import DecodeBatch, GenerationRequest

log = logging.getLogger("nanochat.serving")

UI_PATH = os.path.join(os.path.dirname(__file__), "ui.html")


@dataclass
class ServingConfig:
    """Limits and defaults of one server. Token counts are tokens of the model's tokenizer."""

    model_id: str  # what /v1/models lists and requests must name (or omit)
    max_prompt_tokens: int  # rendered conversation, <|bos|> ... <|assistant_start|>
    max_new_tokens: int  # upper bound on a request's max_tokens, and its default
    max_context: int  # prompt + max_tokens (the model's RoPE table length)
    max_n: int = 4  # choices per request
    max_request_bytes: int = 1 << 20  # body size; beyond: 413
    temperature: float = 0.6  # used when a request leaves it out
    top_k: int | None = 50  # used when a request leaves it out (an extension field, as in vLLM)
    tools: bool = True  # run the python tool


# ------------------------------------------------------------------------------------------------
# errors in OpenAI's shape

class APIError(Exception):
    def __init__(self, status, message, type="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(err):
    return JSONResponse(err.body(), status_code=err.status)


# ------------------------------------------------------------------------------------------------
# request schema (strict: "0.5" is not a number, "yes" is not a boolean)

class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self):
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None


def validation_error(e):
    """The first error as a 400; param is its field path. A value that fails every member of a
    union (str | list[TextPart]) gets one error per member, whose locs end in the member's name:
    the common prefix of the errors on the same field is the field itself."""
    errors = e.errors()
    first = errors[0]
    loc = list(first["loc"])
    for other in errors[1:]:
        if other["loc"][:1] == first["loc"][:1]:
            n = 0
            while n < min(len(loc), len(other["loc"])) and loc[n] == other["loc"][n]:
                n += 1
            loc = loc[:n]
    param = ".".join(str(x) for x in loc) or None
    return APIError(400, f"invalid value for '{param}': {first['msg']}" if param else first["msg"], param=param)


# ------------------------------------------------------------------------------------------------
# jobs, replicas and the pool

class Job:
    """
    One chat completion request on its way through the pool. The handler (event loop) reads
    `events`, an asyncio.Queue of lists of (sample, token, finish) (one list per decode step) or an
    APIError; the replica thread writes it with call_soon_threadsafe. The handler sets `cancelled`
    (client gone) or finishes single samples (stop strings) with stop_sample().
    """

    def __init__(self, request, loop):
        self.request = request  # GenerationRequest
        self.loop = loop
        self.events = asyncio.Queue()
        self.cancelled = False
        self.released = False  # counted out of the pool's in-flight requests
        self._lock = threading.Lock()
        self._stopped = []

    def push(self, item):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

    def stop_sample(self, sample):
        with self._lock:
            self._stopped.append(sample)

    def take_stopped(self):
        with self._lock:
            stopped, self._stopped = self._stopped, []
        return stopped


class Replica:
    """A model on one device and the thread that decodes its batch."""

    def __init__(self, model, tokenizer, max_batch_size):
        self.model, self.tokenizer = model, tokenizer
        self.device = str(model.lm_head.weight.device)
        self.max_batch_size = max_batch_size
        self.rows = 0  # rows in the batch, for /health
        self.thread = None

    def run(self, pool):
        if self.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.device))
        batch = DecodeBatch(self.model, self.tokenizer, park_tools=True)
        active = set()
        while True:
            new = pool.take(self.max_batch_size - len(batch), block=not len(batch))
            if new is None:  # closing
                for job in active:
                    job.push(APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))
                return
            try:
                if new:
                    batch.add([job.request for job in new], keys=new)
                    active.update(new)
                for job in list(active):
                    if job.cancelled:
                        batch.cancel(job)
                        active.discard(job)
                    else:
                        for sample in job.take_stopped():
                            batch.cancel(job, sample)
                events = batch.step()
            except Exception as e:  # a bug or an OOM fails this batch's requests, not the server
                log.exception("generation failed on %s", self.device)
                for job in active | set(new):
                    job.push(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))
                batch, active = DecodeBatch(self.model, self.tokenizer, park_tools=True), set()
                self.rows = 0
                continue
            per_job = collections.defaultdict(list)
            for e in events:
                per_job[e.key].append((e.sample, e.token, e.finish))
            for job, evs in per_job.items():
                job.push(evs)
            active &= batch.live_keys()
            self.rows = len(batch)


class ModelPool:
    """The request queue (FIFO) in front of the replicas, and the in-flight limit."""

    def __init__(self, replicas, max_concurrent):
        self.replicas = replicas
        self.max_concurrent = max_concurrent
        self.in_flight = 0  # requests queued or running; touched only on the event loop
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._closing = False

    def start(self):
        for i, r in enumerate(self.replicas):
            r.thread = threading.Thread(target=r.run, args=(self,), name=f"replica-{i}", daemon=True)
            r.thread.start()

    @property
    def queued(self):
        return len(self._queue)

    @property
    def closing(self):
        return self._closing

    def submit(self, job):
        """Queue a job (event loop only). Raises APIError 503 when closing, 429 at the in-flight limit."""
        if self._closing:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if self.in_flight >= self.max_concurrent:
            raise APIError(429, f"the server is at its limit of {self.max_concurrent} requests in flight; retry later",
                           type="rate_limit_error", code="rate_limit_exceeded")
        self.in_flight += 1
        with self._cond:
            self._queue.append(job)
            self._cond.notify()

    def release(self, job):
        """The handler is done with a job (event loop only; idempotent): its rows are freed and it
        no longer counts against the in-flight limit."""
        job.cancelled = True
        if not job.released:
            job.released = True
            self.in_flight -= 1

    def take(self, free_rows, block):
        """Called by a replica: the queued jobs that fit in free_rows, oldest first (None when closing).
        block: wait for work (the replica's batch is empty)."""
        with self._cond:
            while block and not self._queue and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            taken = []
            while self._queue and (self._queue[0].cancelled or self._queue[0].request.num_samples <= free_rows):
                job = self._queue.popleft()
                if not job.cancelled:
                    taken.append(job)
                    free_rows -= job.request.num_samples
            return taken

    def close(self, timeout=10.0):
        with self._cond:
            self._closing = True
            queued, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for job in queued:
            job.push(APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))
        for r in self.replicas:
            if r.thread is not None:
                r.thread.join(timeout)


# ------------------------------------------------------------------------------------------------
# text

class TextStream:
    """
    Incremental text of one choice: feed() token ids, get back the text that is safe to show.
    Bytes of a character split across tokens wait until it is whole; text that could be the start
    of a stop string waits until it is not (or is, then the choice ends before it).
    """

    def __init__(self, tokenizer, stop_strings=()):
        S = tokenizer.special_tokens
        self.tokenizer = tokenizer
        self.n_ranks = len(tokenizer.mergeable_ranks)
        self.special_text = {S["<|python_start|>"]: "\n```python\n", S["<|python_end|>"]: "\n```\n",
                             S["<|output_start|>"]: "```output\n", S["<|output_end|>"]: "\n```\n"}
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = [s for s in stop_strings if s]
        self.text, self.sent = "", 0
        self.stopped = False

    def feed(self, token):
        """Returns (delta, hit_stop)."""
        if token < self.n_ranks:
            self.text += self.decoder.decode(self.tokenizer.id_to_token(token))
        else:
            self.text += self.decoder.decode(b"", final=True) + self.special_text.get(token, "")
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._take(len(self.text)), True
        hold = max([k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])], default=0)
        return self._take(max(self.sent, len(self.text) - hold)), False

    def flush(self):
        """The rest, at the end of the choice (no stop string follows any more)."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _take(self, end):
        delta, self.sent = self.text[self.sent : end], end
        return delta


# ------------------------------------------------------------------------------------------------
# the app

def _stop_strings(stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise APIError(400, f"'stop' has {len(stops)} strings; at most 4 are allowed", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "'stop' strings must not be empty", param="stop")
    return stops


def prepare(config, tokenizer, req):
    """Validate a parsed request against the limits and render its prompt. Returns
    (GenerationRequest, stop strings). Raises APIError."""
    if req.model is not None and req.model != config.model_id:
        raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{config.model_id}'", param="model", code="model_not_found")
    if req.n > config.max_n:
        raise APIError(400, f"n={req.n} is more than this server's limit of {config.max_n}", param="n")
    stops = _stop_strings(req.stop)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    if messages[-1]["role"] != "user":
        raise APIError(400, f"the last message must have role 'user', not '{messages[-1]['role']}'", param="messages")
    try:
        tokens = tokenizer.render_for_completion({"messages": messages})
    except NanochatError as e:
        raise APIError(400, str(e), param="messages") from None
    if len(tokens) > config.max_prompt_tokens:
        raise APIError(400, f"the conversation is {len(tokens)} tokens, over this server's limit of {config.max_prompt_tokens} prompt tokens",
                       param="messages", code="context_length_exceeded")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > config.max_new_tokens:
        raise APIError(400, f"max_tokens={max_tokens} is more than this server's limit of {config.max_new_tokens}", param="max_tokens")
    room = config.max_context - len(tokens)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"{len(tokens)} prompt tokens + max_tokens={max_tokens} exceed the model's context of {config.max_context}",
                       param="max_tokens", code="context_length_exceeded")
    max_tokens = max_tokens or min(config.max_new_tokens, room)
    if max_tokens < 1:
        raise APIError(400, f"the conversation leaves no room to reply in the model's context of {config.max_context}", param="messages", code="context_length_exceeded")
    temperature = config.temperature if req.temperature is None else req.temperature
    top_k = config.top_k if req.top_k is None else (req.top_k or None)
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    gen = GenerationRequest(tokens, num_samples=req.n, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                            top_p=req.top_p, seed=seed, tools=config.tools)
    return gen, stops


async def read_body(request, limit):
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {length} bytes, over this server's limit of {limit}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over this server's limit of {limit} bytes", code="request_too_large")
    return bytes(body)


async def completion_events(job, tokenizer, stops, request=None):
    """Run a submitted job to its end. Yields ("delta", choice, text) and ("finish", choice, reason);
    returns via the last ("usage", completion_tokens, None). Raises APIError from the replica."""
    n = job.request.num_samples
    streams = [TextStream(tokenizer, stops) for _ in range(n)]
    finished, completion_tokens = [False] * n, 0
    last_check = time.monotonic()
    while not all(finished):
        item = await job.events.get()
        if isinstance(item, APIError):
            raise item
        for sample, token, finish in item:
            if finished[sample]:
                continue
            if finish != "stop":
                completion_tokens += 1
                delta, hit = streams[sample].feed(token)
                if delta:
                    yield "delta", sample, delta
                if hit:
                    job.stop_sample(sample)
                    finish = "stop"
            if finish:
                delta = streams[sample].flush()
                if delta:
                    yield "delta", sample, delta
                finished[sample] = True
                yield "finish", sample, finish
        # a non-streaming client that hung up: stop spending the replica on it
        if request is not None and time.monotonic() - last_check > 0.25:
            last_check = time.monotonic()
            if await request.is_disconnected():
                job.cancelled = True
                return
    yield "usage", completion_tokens, None


def create_app(pool, tokenizer, config):
    """The FastAPI app: GET / (the page), GET /health, GET /v1/models, POST /v1/chat/completions."""

    @asynccontextmanager
    async def lifespan(app):
        pool.start()
        yield
        await run_in_threadpool(pool.close)

    app = FastAPI(title="nanochat", lifespan=lifespan)
    with open(UI_PATH, encoding="utf-8") as f:
        page = f.read()
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, err):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        return error_response(APIError(err.status_code, str(err.detail)))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "shutting_down" if pool.closing else "ok", "model": config.model_id,
                "replicas": [{"device": r.device, "rows": r.rows, "max_rows": r.max_batch_size} for r in pool.replicas],
                "queued": pool.queued, "in_flight": pool.in_flight,
                "limits": {"max_prompt_tokens": config.max_prompt_tokens, "max_new_tokens": config.max_new_tokens,
                           "max_n": config.max_n, "max_concurrent": pool.max_concurrent}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": created, "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, config.max_request_bytes)
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = ChatCompletionRequest.model_validate(obj)
        except ValidationError as e:
            raise validation_error(e) from None
        gen, stops = await run_in_threadpool(prepare, config, tokenizer, req)
        job = Job(gen, asyncio.get_running_loop())
        pool.submit(job)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = len(gen.tokens)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            # the background task releases the job even if the stream never started (client gone early)
            return StreamingResponse(_stream(job, cid, now, prompt_tokens, stops, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, background=BackgroundTask(_release, job))
        try:
            texts, reasons, usage = [""] * gen.num_samples, [None] * gen.num_samples, 0
            async for kind, a, b in completion_events(job, tokenizer, stops, request):
                if kind == "delta":
                    texts[a] += b
                elif kind == "finish":
                    reasons[a] = b
                else:
                    usage = a
        finally:
            pool.release(job)  # frees the rows too when the client left
        return {"id": cid, "object": "chat.completion", "created": now, "model": config.model_id,
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None, "finish_reason": reasons[i]}
                            for i in range(gen.num_samples)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": usage, "total_tokens": prompt_tokens + usage}}

    async def _stream(job, cid, now, prompt_tokens, stops, include_usage):
        def chunk(choices, usage=None):
            c = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": config.model_id, "choices": choices}
            if include_usage:
                c["usage"] = usage
            return f"data: {json.dumps(c)}\n\n"

        try:
            for i in range(job.request.num_samples):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            async for kind, a, b in completion_events(job, tokenizer, stops):
                if kind == "delta":
                    yield chunk([{"index": a, "delta": {"content": b}, "logprobs": None, "finish_reason": None}])
                elif kind == "finish":
                    yield chunk([{"index": a, "delta": {}, "logprobs": None, "finish_reason": b}])
                elif include_usage:
                    yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": a, "total_tokens": prompt_tokens + a})
            yield "data: [DONE]\n\n"
        except APIError as err:  # headers are gone: report in-band, as OpenAI does
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:  # also runs when the client disconnects (the stop button): free the rows
            pool.release(job)

    async def _release(job):
        pool.release(job)

    return app
