"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

    POST /v1/completions, /v1/chat/completions   (stream=true: server-sent events)
    GET  /v1/models, /health, /metrics           (Prometheus text format)

The engine runs on its own thread, stepping whenever it has work; each HTTP request
submits to it and awaits its tokens through an asyncio queue. Limits answer with a 4xx
and a message in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}):

    body larger than max_body_bytes                        413
    malformed JSON                                         400
    unknown or ill-typed fields                            422
    unknown model                                          404
    prompt over max_prompt_tokens, max_tokens over its
    limit or the context, bad sampling values              400
    more than max_concurrent requests in flight            429 (Retry-After); up to the limit,
                                                           requests wait in the engine's queue

A client that disconnects (mid-stream or while waiting) aborts its request, which frees
its pages at the engine's next step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import pathlib
import secrets
import threading
import time
import uuid

import fastapi
import prometheus_client as prom
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llm_jax.inference.api_schema import ChatBody, ChatTemplate, CompletionBody
from llm_jax.inference.engine import Engine, Request, RequestError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str = "llm_jax"
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the model's context minus one
    max_tokens: int | None = None  # the largest max_tokens a request may ask for; None: the context
    default_chat_max_tokens: int = 256  # chat requests without max_tokens get this (or what fits)
    max_concurrent: int = 64  # requests in flight (running or queued) before 429

    def __post_init__(self):
        for name in ("max_body_bytes", "default_chat_max_tokens", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ValueError(f"server.{name} must be >= 1, got {getattr(self, name)}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class EngineLoop:
    """Steps the engine on a background thread while it has work."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._parked = threading.Event()  # set while the thread waits in pause
        self._thread = threading.Thread(target=self._run, name="llm-jax-engine", daemon=True)
        self.window = collections.deque()  # (time, generated_tokens) samples for tokens/s

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._running.set()
        self.engine.wakeup.set()
        self._thread.join(timeout=10)

    def pause(self, timeout: float = 30.0):
        """Hold the engine between steps (requests still queue) and return once it is held."""
        self._running.clear()
        self.engine.wakeup.set()
        if not self._parked.wait(timeout):
            raise TimeoutError("the engine thread did not pause")

    def resume(self):
        self._running.set()

    def tokens_per_second(self, horizon: float = 10.0) -> float:
        """Generated tokens per second over the last `horizon` seconds."""
        now = time.perf_counter()
        self.window.append((now, self.engine.stats["generated_tokens"]))
        while len(self.window) > 2 and self.window[0][0] < now - horizon:
            self.window.popleft()
        (t0, n0), (t1, n1) = self.window[0], self.window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def _run(self):
        engine = self.engine
        while not self._stop.is_set():
            if not self._running.is_set():
                self._parked.set()
                self._running.wait()
                self._parked.clear()
            if not engine.has_work():
                engine.wakeup.wait(0.1)
                engine.wakeup.clear()
                continue
            try:
                engine.step()
            except Exception:  # a bug must fail the requests in flight, not hang them
                log.exception("engine step failed; failing the requests in flight")
                engine.fail_all()


class _Metrics:
    def __init__(self, engine: Engine, loop: EngineLoop):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        prom.Gauge("llm_jax_requests_waiting", "requests queued for a batch slot", registry=r).set_function(
            lambda: engine.snapshot()["waiting"])
        prom.Gauge("llm_jax_requests_running", "requests in the running batch", registry=r).set_function(
            lambda: engine.snapshot()["running"])
        prom.Gauge("llm_jax_kv_pages_in_use", "KV-cache pages referenced by running requests",
                   registry=r).set_function(lambda: engine.pool.in_use())
        prom.Gauge("llm_jax_generation_tokens_per_second", "generated tokens per second over the last 10 s",
                   registry=r).set_function(loop.tokens_per_second)
        self.generated = prom.Counter("llm_jax_generated_tokens", "tokens generated", registry=r)
        self.prompt = prom.Counter("llm_jax_prompt_tokens", "prompt tokens received", registry=r)
        self.requests = prom.Counter("llm_jax_requests", "finished requests", ["finish_reason"], registry=r)
        self.rejected = prom.Counter("llm_jax_rejected_requests", "requests answered with a 4xx", ["status"],
                                     registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = prom.Histogram("llm_jax_time_to_first_token_seconds", "time to first token", buckets=buckets,
                                   registry=r)
        self.latency = prom.Histogram("llm_jax_request_latency_seconds", "time from submit to finish",
                                      buckets=buckets, registry=r)

    def finished(self, req: Request):
        self.generated.inc(len(req.output))
        self.requests.labels(req.finish_reason).inc()
        if req.first_token_at is not None:
            self.ttft.observe(req.first_token_at - req.submitted_at)
        if req.finished_at is not None:
            self.latency.observe(req.finished_at - req.submitted_at)


class _BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413 before the app parses them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:  # buffer the body (at most `limit` bytes), then replay it to the app
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send):
        payload = json.dumps(_error_body(f"request body exceeds the limit of {self.limit} bytes",
                                         code="body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


class _Outbox:
    """Hands the engine thread's updates to the event loop, one wakeup per batch of updates.

    A decode step finishes a token for every running request at once; one
    `call_soon_threadsafe` per request would wake the loop (a write to its self-pipe) that
    many times per step. The first update of a batch schedules the flush; the others join it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._lock, self._items = loop, threading.Lock(), []

    def put(self, queue: asyncio.Queue, item) -> None:  # engine thread
        with self._lock:
            self._items.append((queue, item))
            first = len(self._items) == 1
        if first:
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:  # event loop
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


class _Session:
    """One request's bridge from the engine thread to the event loop."""

    def __init__(self, outbox: _Outbox):
        self.queue: asyncio.Queue = asyncio.Queue()
        self._outbox = outbox

    def on_update(self, request: Request, tokens: list[int], finished: bool):  # engine thread
        self._outbox.put(self.queue, (list(tokens), finished))


class _TextStream:
    """Incremental detokenization whose pieces always concatenate to decode(all tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""

    def push(self, tokens: list[int], finished: bool) -> str:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens)
        # An incomplete multi-byte character decodes as U+FFFD until its last byte arrives.
        if not text.startswith(self.sent) or (not finished and text.endswith("\ufffd")):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def create_app(engine: Engine, tokenizer, config: ServerConfig = ServerConfig(),
               chat_template: ChatTemplate | None = None):
    """The FastAPI app; the engine thread starts and stops with the app's lifespan."""
    cfg = engine.cfg
    context = cfg.max_seq_len
    max_prompt = config.max_prompt_tokens or context - 1
    max_tokens_limit = config.max_tokens or context
    template = chat_template or ChatTemplate()
    loop_runner = EngineLoop(engine)
    metrics = _Metrics(engine, loop_runner)
    in_flight = {"n": 0}
    outboxes: dict = {}  # event loop -> _Outbox (one loop per server)
    eos = getattr(tokenizer, "eos_id", None)

    async def lifespan(app):
        loop_runner.start()
        yield
        loop_runner.stop()

    app = fastapi.FastAPI(title="llm_jax", lifespan=lifespan)
    app.state.engine, app.state.engine_loop, app.state.metrics = engine, loop_runner, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        metrics.rejected.labels(str(e.status)).inc()
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(_error_body(e.message, param=e.param, code=e.code), status_code=e.status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" or tuple(err.get("loc", ())) == ("body",) for err in errors):
            metrics.rejected.labels("400").inc()
            return JSONResponse(_error_body("the request body is not a JSON object (send JSON with "
                                            "Content-Type: application/json)", code="invalid_json"), 400)
        parts = [f"{'.'.join(str(x) for x in err['loc'] if x != 'body') or 'body'}: {err['msg']}" for err in errors]
        metrics.rejected.labels("422").inc()
        return JSONResponse(_error_body("invalid request: " + "; ".join(parts)), 422)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.snapshot()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "llm_jax", "max_model_len": context}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    def check_common(body) -> None:
        if body.model != config.model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")
        problem = body.unsupported()
        if problem:
            raise ApiError(400, problem)

    def submit(body, prompt_ids: list[int], max_tokens: int, session: _Session) -> Request:
        if len(prompt_ids) > max_prompt:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the limit is {max_prompt}",
                           param="prompt", code="context_length_exceeded")
        if max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} exceeds the server's limit of {max_tokens_limit}",
                           param="max_tokens")
        if in_flight["n"] >= config.max_concurrent:
            raise ApiError(429, f"too many requests in flight (limit {config.max_concurrent}); retry later",
                           code="rate_limit_exceeded")
        stops = [tokenizer.encode(s) for s in body.stop_strings()]
        if eos is not None and not body.ignore_eos:
            stops.append([eos])
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        try:
            return engine.submit(prompt_ids, max_tokens=max_tokens, sampling=body.sampling(), stop_sequences=stops,
                                 seed=seed, on_update=session.on_update)
        except RequestError as e:
            raise ApiError(400, str(e)) from None

    async def run(http_request: fastapi.Request, body, prompt_ids, max_tokens, render):
        """Submit, then answer with one JSON object or an event stream built by `render`."""
        loop = asyncio.get_running_loop()
        if loop not in outboxes:
            outboxes[loop] = _Outbox(loop)
        session = _Session(outboxes[loop])
        req = submit(body, prompt_ids, max_tokens, session)
        in_flight["n"] += 1
        metrics.prompt.inc(len(prompt_ids))
        text = _TextStream(tokenizer)
        rid = f"{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        async def updates():
            try:
                while True:
                    try:
                        tokens, finished = await asyncio.wait_for(session.queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await http_request.is_disconnected():
                            return
                        continue
                    while not finished and not session.queue.empty():  # coalesce a backlog into one event
                        more, finished = session.queue.get_nowait()
                        tokens = tokens + more
                    yield text.push(tokens, finished), finished
                    if finished:
                        return
            finally:  # normal end, client gone, or cancelled by the server: free the pages
                in_flight["n"] -= 1
                if req.finish_reason is None:
                    engine.abort(req)
                else:
                    metrics.finished(req)

        usage = lambda: {"prompt_tokens": len(prompt_ids), "completion_tokens": len(req.output),  # noqa: E731
                         "total_tokens": len(prompt_ids) + len(req.output)}
        if not body.stream:
            pieces = [delta async for delta, _ in updates()]
            if req.finish_reason == "error":
                raise ApiError(500, "the engine failed while generating; see the server log")
            return render(rid, created, "".join(pieces), req.finish_reason, usage(), stream=False)

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events():
            async for delta, finished in updates():
                reason = req.finish_reason if finished else None
                if delta or finished:
                    yield f"data: {json.dumps(render(rid, created, delta, reason, None, stream=True))}\n\n"
            if include_usage:
                chunk = render(rid, created, "", None, usage(), stream=True)
                chunk["choices"] = []
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def max_tokens_of(body, n_prompt: int, default: int | None) -> int:
        value = body.max_tokens if body.max_tokens is not None else default
        if value is None:
            value = max(1, min(config.default_chat_max_tokens, context - n_prompt))
        if value < 1:
            raise ApiError(400, f"max_tokens must be >= 1, got {value}", param="max_tokens")
        return value

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http_request: fastapi.Request):
        check_common(body)
        prompt_ids = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)

        def render(rid, created, text, reason, usage, stream):
            out = {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": config.model_name,
                   "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}
            if usage is not None:
                out["usage"] = usage
            return out

        return await run(http_request, body, prompt_ids, max_tokens_of(body, len(prompt_ids), 16), render)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http_request: fastapi.Request):
        check_common(body)
        prompt_ids = tokenizer.encode(template.render(body.messages))
        body_max = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        max_tokens = max_tokens_of(body.model_copy(update={"max_tokens": body_max}), len(prompt_ids), None)
        first = {"sent": False}

        def render(rid, created, text, reason, usage, stream):
            if not stream:
                return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created,
                        "model": config.model_name, "usage": usage,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": reason}]}
            delta = {"content": text} if text or reason is None else {}
            if not first["sent"]:
                delta["role"], first["sent"] = "assistant", True
            out = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created,
                   "model": config.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            if usage is not None:
                out["usage"] = usage
            return out

        return await run(http_request, body, prompt_ids, max_tokens, render)

    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    return app


def load_server(run_dir: str | pathlib.Path, *, step: int | None = None, engine_options: dict | None = None,
                server_config: ServerConfig | None = None, chat_template_path: str | None = None, quantize=None):
    """(ASGI app, engine) for a run directory: its newest checkpoint, tokenizer and chat template.

    `engine_options` are EngineConfig fields; without `num_pages` the pool holds
    `max_batch` sequences of the model's full context.
    """
    import math

    from llm_jax.data.tokenizers import load_tokenizer
    from llm_jax.inference.api_schema import find_chat_template
    from llm_jax.inference.engine import EngineConfig
    from llm_jax.training.checkpoint import load_trained_model

    run_dir = pathlib.Path(run_dir)
    cfg, params, _ = load_trained_model(run_dir, step=step)
    if quantize:
        from llm_jax.inference.quantize import quantize_params

        params = quantize_params(params, cfg.model, bits=8 if quantize == "int8" else 4)
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    source = pathlib.Path(chat_template_path).read_text(encoding="utf-8") if chat_template_path else None
    template = ChatTemplate(source or find_chat_template(run_dir))
    options = dict(engine_options or {})
    if options.get("num_pages") is None:
        page_size = options.get("page_size", EngineConfig.page_size)
        max_batch = options.get("max_batch", EngineConfig.max_batch)
        options["num_pages"] = max_batch * math.ceil(cfg.model.max_seq_len / page_size) + 1
    engine_config = EngineConfig(**options)
    engine = Engine(params, cfg.model, engine_config)
    engine.warmup()
    server_config = server_config or ServerConfig(model_name=run_dir.name)
    return create_app(engine, tokenizer, server_config, template), engine


def bind_socket(host: str = "127.0.0.1", port: int = 0):
    """A listening socket (port 0: a free one); pass it to `serve_forever` or `start_in_thread`."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def start_in_thread(app, sock):
    """Run uvicorn on `sock` in a daemon thread; returns the uvicorn.Server (call .should_exit = True to stop)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.02)
    server.thread = thread
    return server


def serve_main(args) -> int:
    """`llm-jax serve`: load the run directory and serve it until interrupted."""
    import uvicorn

    run_dir = pathlib.Path(args.checkpoint)
    engine_options = dict(max_batch=args.max_batch, page_size=args.page_size, num_pages=args.num_pages,
                          prefill_chunk=args.prefill_chunk, prefill_rows=min(2, args.max_batch),
                          paged_attention=args.paged_attention)
    server_config = ServerConfig(model_name=args.model_name or run_dir.absolute().name,
                                 max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                                 max_tokens=args.max_tokens, max_concurrent=args.max_concurrent)
    app, engine = load_server(run_dir, step=args.step, engine_options=engine_options, server_config=server_config,
                              chat_template_path=args.chat_template, quantize=args.quantize)
    print(f"llm-jax serve: {server_config.model_name} on http://{args.host}:{args.port}/v1 "
          f"({engine.config.num_pages} pages x {engine.config.page_size} tokens, batch {engine.config.max_batch}, "
          f"paged attention: {engine.kernel})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
