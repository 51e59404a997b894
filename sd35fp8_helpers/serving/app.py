"""``sd35fp8 serve``: an OpenAI-style images API for a team — one resident pipeline, a queue, keys, metrics.

Where model servers usually go wrong, and what this one does instead:

* **Reloading per request** (10–60 s each for SD3.5): the pipeline is loaded *once*, by the worker thread,
  right after start-up; ``/readyz`` says 503 until it is resident, then 200.
* **Falling over under two users**: one worker thread owns the pipeline (a GPU runs one generation well,
  two badly) behind a bounded queue. A request that finds the queue full is answered 429 at once, with a
  ``Retry-After`` estimated from recent job times, instead of piling up until everything times out.
* **Work for nobody**: a client that disconnects, or a request past ``--timeout``, has its job cancelled —
  the pipeline's step callback raises, so at most one denoising step runs after the client has gone.
* **One bad request killing the server**: bad input is a 4xx in OpenAI's error shape
  (``{"error": {"message", "type", "param", "code"}}``), checked by the same
  :func:`~sd35fp8_helpers.pipeline.generation.check_settings` as everything else; a CUDA out-of-memory error in one
  job is a 503 for that job only (memory freed, the worker goes on).
* **Leaking keys and prompts**: keys are hashed at rest and compared in constant time
  (:mod:`~sd35fp8_helpers.serving.auth`); logs are JSON lines with a request id and never carry the
  ``Authorization`` header, the key, or (unless ``--log-prompts``) the prompt.

* **Bodies and numbers that cost memory or crash a worker**: the body is read as a stream and refused (413)
  the moment it passes 64 KiB; every number (seed beyond 64 bits, NaN/infinite guidance, steps, n, ``true``
  for a count) is checked for every image of the request before anything is queued.
* **One client starving the rest**: a key may have at most ``--max-in-flight`` jobs queued or running (default:
  half the queue), and rate-limit state is bounded (:class:`~sd35fp8_helpers.serving.auth.RateLimiter`).

With ``--broker redis://…`` the same API puts jobs on a Redis queue served by ``sd35fp8 worker`` processes
(one per GPU, any number of machines; :mod:`~sd35fp8_helpers.serving.jobs`), adds asynchronous jobs
(``POST /v1/images/jobs`` → 202, ``GET``/``DELETE /v1/images/jobs/{id}``), shares rate limits and in-flight caps
across API processes through Redis, and answers 503 (never a hang) while Redis is away. JWT bearer tokens
(``--jwt-secret-file`` / ``--jwt-public-key``) work next to API keys.

Endpoints: ``POST /v1/images/generations``, ``GET /healthz`` (process alive), ``GET /readyz`` (model
loaded — with a broker: Redis reachable and a worker alive), ``GET /metrics`` (Prometheus). The Gradio demo (:mod:`~sd35fp8_helpers.interactive.demo`) renders through the
same :class:`ImageEngine`.

Example (``sd35fp8 api-key --keys-file keys.txt`` prints a key once and stores its hash):
    $ sd35fp8 serve --model tiny --keys-file keys.txt --queue-size 8 --rate 60
    $ curl -s localhost:8000/v1/images/generations -H "Authorization: Bearer $KEY" \
        -H 'Content-Type: application/json' -d '{"prompt": "a fox", "size": "128x128"}'
    {"created": 1795530000, "data": [{"b64_json": "iVBORw0KGgo...", "seed": 1234}]}

:mod:`~sd35fp8_helpers.serving.client` starts one in the background for notebooks and tests.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations
# (``request: Request``) at run time, and ``Request`` is imported inside :func:`create_app`.

import asyncio
import base64
import contextlib
import functools
import json
import logging
import re
import secrets
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from ..errors import InvalidGenerationInput, QueueUnavailable, Sd35fp8Error, ServerStartFailed
from ..pipeline.generation import GenerationResult, GenerationSettings
from .config import (
    DEFAULT_PORT,
    IMAGES_ROUTE,
    JOBS_ROUTE,
    MAX_BODY_BYTES,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    POLL_S,
    REQUEST_ID_PATTERN,
    SIZE_PATTERN,
    ServeConfig,
)
from .engine import ImageEngine, JobCancelled
from .logs import configure_logging, log_event, request_id_var
from .metrics import Metrics
from .service import ImageService, Job, KeyBusy, QueueFull, is_oom

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,80}$")

# --- the HTTP app --------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, code: str, type: str = "invalid_request_error",
                 param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type, param
        self.headers = {"Retry-After": str(retry_after)} if retry_after else {}
        if status == 401:
            self.headers["WWW-Authenticate"] = "Bearer"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@functools.lru_cache(maxsize=1)
def _request_model():
    """The request body schema (pydantic checks types; the rules live in :func:`parse_request`)."""
    from pydantic import BaseModel, ConfigDict, field_validator

    class ImagesRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        @field_validator("n", "seed", "steps", "guidance_scale", "lora_scale", mode="before")
        @classmethod
        def _not_a_boolean(cls, value):  # pydantic would read true as 1: a bug in the client, not a count
            if isinstance(value, bool):
                raise ValueError(f"must be a number, not {str(value).lower()}")
            return value

        prompt: str
        model: str | None = None
        n: int = 1
        size: str | None = None
        response_format: str = "b64_json"
        seed: int | None = None
        steps: int | None = None
        guidance_scale: float | None = None  # None: the served model's own default
        negative_prompt: str = ""
        lora: str | None = None  # a LoRA by name (sd35fp8_helpers.lora.shipped.named_loras), never a path
        lora_scale: float = 1.0
        user: str | None = None  # OpenAI's end-user id: accepted, not used

    return ImagesRequest


def parse_request(raw: bytes, engine) -> list[GenerationSettings]:
    """Body bytes → one :class:`GenerationSettings` per image, or :class:`ApiError` (400) naming the field.

    ``engine`` is what is served: an :class:`ImageEngine`, or the
    :class:`~sd35fp8_helpers.serving.jobstore.ServedModel` the queue's workers registered (``.model``,
    ``.defaults()``, ``.limits()``). Every image's settings are checked (image ``i`` has seed ``seed + i``, so
    ``seed=2**64-1, n=2`` is refused here, not by a worker after the first image)."""
    from pydantic import ValidationError

    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object like {\"prompt\": \"a fox\"}",
                       code="invalid_json")
    try:
        req = _request_model().model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field {param!r}; this server takes: "
                                f"{', '.join(_request_model().model_fields)}",
                           param=param, code="unknown_parameter") from None
        raise ApiError(400, f"{param}: {err['msg'].removeprefix('Value error, ')}", param=param,
                       code="invalid_type") from None
    if req.model not in (None, engine.model):
        raise ApiError(400, f"model={req.model!r} is not served here; this server serves {engine.model!r}",
                       param="model", code="model_not_found")
    if req.response_format != "b64_json":
        raise ApiError(400, f"response_format={req.response_format!r} is not supported: this server keeps no "
                            "images to link to; use 'b64_json'", param="response_format", code="invalid_value")
    if not 1 <= req.n <= MAX_IMAGES:
        raise ApiError(400, f"n={req.n} is out of range: 1 to {MAX_IMAGES} images per request",
                       param="n", code="invalid_value")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if len(text) > MAX_PROMPT_CHARS:
            raise ApiError(400, f"{name} is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}",
                           param=name, code="invalid_value")
    if req.steps is not None and req.steps > MAX_STEPS:
        raise ApiError(400, f"steps={req.steps} is over this server's limit of {MAX_STEPS}",
                       param="steps", code="invalid_value")
    native, default_steps = engine.defaults()
    width = height = native
    if req.size is not None:
        match = SIZE_PATTERN.match(req.size)
        if not match:
            raise ApiError(400, f"size={req.size!r} is not WIDTHxHEIGHT, e.g. '{native}x{native}'",
                           param="size", code="invalid_value")
        width, height = int(match[1]), int(match[2])
    seed = secrets.randbelow(2**31) if req.seed is None else req.seed
    guidance = req.guidance_scale if req.guidance_scale is not None else engine.default_guidance()
    settings = [GenerationSettings(req.prompt, req.negative_prompt, seed + i,
                                   default_steps if req.steps is None else req.steps,
                                   guidance, height, width, req.lora or "", req.lora_scale) for i in range(req.n)]
    from ..pipeline.generation import check_settings

    multiple, max_side = engine.limits()
    try:
        for s in settings:
            check_settings(s, multiple=multiple, max_side=max_side)
    except InvalidGenerationInput as exc:
        param = "size" if exc.argument in ("height", "width") else exc.argument
        raise ApiError(400, exc.one_line, param=param, code="invalid_value") from None
    return settings


def _error_for(exc: BaseException) -> ApiError:
    """What the worker's exception means to the client."""
    if isinstance(exc, JobCancelled):
        return ApiError(503, "the server is stopping; the request was cancelled", type="server_error",
                        code="cancelled", retry_after=5)
    if is_oom(exc):
        return ApiError(503, "out of memory generating this request; the server freed memory and keeps serving. "
                             "fix: ask for a smaller size or n, or start the server with a leaner "
                             "--memory-strategy", type="server_error", code="out_of_memory", retry_after=5)
    if isinstance(exc, InvalidGenerationInput):
        return ApiError(400, exc.one_line, param=exc.argument, code="invalid_value")
    return _internal_error(exc)


def _internal_error(exc: BaseException) -> ApiError:
    """A bug: logged with its type and frames (not its message, which may quote the input), answered 500."""
    log_event("internal_error", level=logging.ERROR, error_type=type(exc).__name__,
         traceback="".join(traceback.format_tb(exc.__traceback__)))
    return ApiError(500, f"internal error ({type(exc).__name__}); the server logged it under this request id",
                    type="server_error", code="internal_error")


class _RequestContext:
    """ASGI middleware: an ``X-Request-ID`` for every request (kept if the client sent a sane one, echoed in
    the response), one JSON access-log line, and the latency histogram. Pure ASGI, so a disconnect still
    reaches the handler (``BaseHTTPMiddleware`` would hide it)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = sent if REQUEST_ID_PATTERN.match(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        status = [499]  # client closed the request, unless a response started
        start = time.perf_counter()

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            if scope["path"] in (IMAGES_ROUTE, JOBS_ROUTE):
                self.metrics.latency.labels(str(status[0])).observe(seconds)
            log_event("request", method=scope["method"], path=scope["path"], status=status[0],
                 seconds=round(seconds, 4), key=scope["state"].get("key"))
            request_id_var.reset(token)


async def read_body(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, read as a stream and refused (413) as soon as it passes ``limit`` bytes.

    ``await request.body()`` would first hold the whole body in memory — a client could send gigabytes (or
    promise them in ``Content-Length`` and trickle them) before hearing no. A declared length over the limit is
    refused before a byte is read.
    """
    message = (f"the request body is over {limit} bytes; send the prompt and settings only "
               "(a valid request is well under 3 KB)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, message, code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, message, code="body_too_large")
    return bytes(body)


def _unavailable(exc: QueueUnavailable, job_id: str | None = None) -> ApiError:
    kept = (f" Job {job_id} is kept in the queue: ask GET {JOBS_ROUTE}/{job_id} when it is back."
            if job_id else " Nothing was queued.")
    return ApiError(503, f"{exc.one_line} — retry in a few seconds.{kept}", type="server_error",
                    code="queue_unavailable", retry_after=5)


def _job_error(record) -> ApiError:
    """What a failed or cancelled job means to the client of the synchronous endpoint."""
    code = record.error_code or record.state
    if code == "invalid_value":
        return ApiError(400, record.error, code="invalid_value")
    if code == "out_of_memory":
        return ApiError(503, f"{record.error}; the worker freed memory and keeps serving", type="server_error",
                        code="out_of_memory", retry_after=5)
    if record.state == "cancelled":
        return ApiError(503, f"the job was cancelled ({record.cancel_reason or 'cancelled'})", type="server_error",
                        code="cancelled", retry_after=5)
    return ApiError(500, f"{record.error or 'the job failed'}; the worker logged it under job id {record.id}",
                    type="server_error", code=code or "internal_error")


def create_app(config: ServeConfig, keys, *, engine: ImageEngine | None = None,
               on_fatal: Callable[[BaseException], None] | None = None):
    """The FastAPI app: routes, error shape, metrics; the worker starts (and loads the model) at start-up.

    ``keys`` is a :class:`~sd35fp8_helpers.serving.auth.KeyStore`; with ``config.require_auth=False`` it may be
    empty and clients are rate-limited by address. With ``config.broker`` no model is loaded here: jobs go to
    the Redis queue and requests are checked against the model the workers registered.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from .auth import Authenticator, RateLimiter
    from .jwt_auth import JwtVerifier, TokenRejected

    queue = service = None
    if config.broker:
        from .jobs import QueueBackend

        queue = QueueBackend(config)
        metrics = Metrics(store=queue.store)
    else:
        engine = engine or ImageEngine(config.model, precision=config.precision, device=config.device,
                                       memory_strategy=config.memory_strategy)
        service = ImageService(engine, config, on_fatal=on_fatal)
        metrics = service.metrics = Metrics(service)
    limiter = RateLimiter(config.rate_per_min, config.burst)
    auth = Authenticator(keys, JwtVerifier(config.jwt) if config.jwt else None)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if service is not None:
            service.start()
        if queue is not None:
            await run_in_threadpool(queue.warm)
        log_event("started", model=config.model, precision=config.precision, queue_size=config.queue_size,
                  rate_per_min=config.rate_per_min, keys=len(keys), auth=config.require_auth,
                  jwt=config.jwt.algorithm if config.jwt else None, max_in_flight=config.in_flight_cap,
                  broker=queue.safe_url if queue else None)
        yield
        if service is not None:
            service.stop()
        log_event("stopped")

    app = FastAPI(title="sd35fp8 images API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.queue = queue
    app.state.metrics = metrics
    app.add_middleware(_RequestContext, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        metrics.errors.labels(exc.code).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(QueueUnavailable)
    async def _queue_down(request: Request, exc: QueueUnavailable):
        log_event("queue_unavailable", level=logging.WARNING, broker=exc.url)
        return await _api_error(request, _unavailable(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return await _api_error(request, _internal_error(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(code).inc()
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code=code).body(),
                            status_code=exc.status_code)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if queue is not None:
            body = await run_in_threadpool(queue.ready)
            return JSONResponse(body, status_code=200 if body["ready"] else 503)
        body = {"ready": service.ready, "model": engine.model, "precision": engine.precision,
                "device": str(engine.device), "queue_size": config.queue_size}
        if service.load_error is not None:
            body["error"] = type(service.load_error).__name__
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE_LATEST)

    def identify(request: Request) -> str:
        """The caller's identity (key label, ``jwt:SUB``, or the client address with --no-auth), or 401."""
        if not config.require_auth:
            label = f"client-{request.client.host if request.client else 'unknown'}"
        else:
            try:
                label = auth.identify(request.headers.get("authorization"))
            except TokenRejected as exc:
                is_key = exc.message == Authenticator.MISSING
                raise ApiError(401, exc.message, type="authentication_error",
                               code="invalid_api_key" if is_key else "invalid_token") from None
        request.state.key = label
        return label

    async def admit(request: Request) -> tuple[str, list[GenerationSettings]]:
        """Identity → rate limit → readiness → body → settings: everything checked before a job exists."""
        label = identify(request)
        if queue is not None:
            wait = await run_in_threadpool(queue.rate_wait, label)
        else:
            wait = limiter.retry_after(label)
        if wait:
            raise ApiError(429, f"rate limit of {config.rate_per_min:g} requests per minute reached for this key; "
                                f"retry after {wait} s", type="rate_limit_error", code="rate_limit_exceeded",
                           retry_after=wait)
        if queue is not None:
            served = await run_in_threadpool(queue.served)
            if served is None:
                raise ApiError(503, "no worker has started on this queue yet: start one with `sd35fp8 worker "
                                    "--broker URL --model MODEL` (see GET /readyz)", type="server_error",
                               code="not_ready", retry_after=5)
        else:
            if not service.ready:
                raise ApiError(503, "the model is still loading (see GET /readyz)", type="server_error",
                               code="not_ready", retry_after=5)
            served = engine
        return label, parse_request(await read_body(request), served)

    def busy_error(full: QueueFull) -> ApiError:
        if isinstance(full, KeyBusy):
            return ApiError(429, f"this key already has {full.cap} jobs queued or running (the per-key limit); "
                                 f"wait for one to finish, retry after {full.retry_after} s", type="rate_limit_error",
                            code="too_many_in_flight", retry_after=full.retry_after)
        return ApiError(429, f"the server is busy: {config.queue_size} requests are already waiting; "
                             f"retry after {full.retry_after} s", type="server_busy", code="queue_full",
                        retry_after=full.retry_after)

    async def enqueue(request: Request, label: str, settings: list[GenerationSettings]) -> str:
        try:
            return await run_in_threadpool(lambda: queue.submit(settings, identity=label,
                                                                request_id=request.state.request_id))
        except QueueFull as full:
            raise busy_error(full) from None

    @app.post(IMAGES_ROUTE)
    async def images(request: Request):
        label, settings = await admit(request)
        if queue is not None:
            job_id = await enqueue(request, label, settings)
            record = await _wait_queued(queue, job_id, request, config.timeout_s)
            if record is None:
                metrics.errors.labels("client_disconnected").inc()
                return Response(status_code=499)
            data = await run_in_threadpool(queue.images, record)
            metrics.images.inc(len(data))
            return JSONResponse({"created": int(time.time()), "data": data}, headers={"X-Job-ID": job_id})
        job = Job(settings, request.state.request_id, label)
        try:
            service.submit(job)
        except QueueFull as full:
            raise busy_error(full) from None
        results = await _wait(job, request, config.timeout_s)
        if results is None:  # the client has gone: nobody reads this answer
            metrics.errors.labels("client_disconnected").inc()
            return Response(status_code=499)
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(r.png_bytes()).decode(), "seed": r.settings.seed}
                         for r in results]}

    def need_queue() -> None:
        if queue is None:
            raise ApiError(404, "asynchronous jobs need the Redis job queue: start the server with "
                                "--broker redis://HOST:PORT/0 (and `sd35fp8 worker` processes); without it, use "
                                f"POST {IMAGES_ROUTE}", code="jobs_need_broker")

    async def owned(request: Request, job_id: str):
        need_queue()
        label = identify(request)
        record = await run_in_threadpool(queue.record, job_id, label) if JOB_ID_PATTERN.match(job_id) else None
        if record is None:
            raise ApiError(404, f"no job {job_id!r} for this key (finished jobs are kept {config.result_ttl_s} s)",
                           param="id", code="job_not_found")
        return record

    @app.post(JOBS_ROUTE)
    async def create_job(request: Request):
        need_queue()
        label, settings = await admit(request)
        job_id = await enqueue(request, label, settings)
        return JSONResponse({"id": job_id, "object": "image.job", "status": "queued", "created": int(time.time()),
                             "n": len(settings)}, status_code=202, headers={"Location": f"{JOBS_ROUTE}/{job_id}"})

    @app.get(JOBS_ROUTE + "/{job_id}")
    async def get_job(job_id: str, request: Request):
        record = await owned(request, job_id)
        return await run_in_threadpool(queue.job_json, record)

    @app.delete(JOBS_ROUTE + "/{job_id}")
    async def cancel_job(job_id: str, request: Request):
        record = await owned(request, job_id)
        if record.state in ("done", "failed"):
            raise ApiError(409, f"job {job_id} has already ended ({record.state}); nothing to cancel",
                           param="id", code="job_finished")
        state = await run_in_threadpool(queue.cancel, job_id, "deleted")
        log_event("job_cancel_requested", job_id=job_id, state=state)
        return {"id": job_id, "object": "image.job", "status": "cancelling" if state == "running" else state}

    return app


async def _wait(job: Job, request, timeout_s: float) -> list[GenerationResult] | None:
    """The job's results; cancels it (and returns None) when the client disconnects; 504 past the deadline."""
    future = asyncio.wrap_future(job.future)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waiting is not an error
    deadline = time.monotonic() + timeout_s
    while True:
        done, _ = await asyncio.wait({future}, timeout=POLL_S)
        if done:
            try:
                return future.result()
            except BaseException as exc:  # noqa: BLE001 - mapped to an answer
                raise _error_for(exc) from None
        if await request.is_disconnected():
            job.cancel("client_disconnected")  # the step callback ends it within one step
            log_event("client_disconnected", cancelled=True)
            return None
        if time.monotonic() > deadline:
            job.cancel("deadline")
            raise ApiError(504, f"the request took longer than the server's --timeout ({timeout_s:g} s) and was "
                                "cancelled", type="server_error", code="timeout")


async def _wait_queued(queue, job_id: str, request, timeout_s: float):
    """The queued job's final record (done), polling Redis; None when the client disconnected (the job is
    cancelled: its worker stops at the next step); 504 (cancelled) past the deadline.

    The poll starts at 5 ms and backs off to ``POLL_S``: a fixed 100 ms poll added ~50 ms to every short job
    (measured: docs/benchmarks.md, queue section), while a long job costs Redis ten reads a second at most.
    """
    from starlette.concurrency import run_in_threadpool

    deadline = time.monotonic() + timeout_s
    delay = 0.005
    try:
        while True:
            record = await run_in_threadpool(queue.store.get, job_id)
            if record is None:
                raise ApiError(500, f"job {job_id} disappeared from the queue before it ended", type="server_error",
                               code="job_lost")
            if record.final:
                if record.state == "done":
                    return record
                raise _job_error(record)
            if await request.is_disconnected():
                await run_in_threadpool(queue.cancel, job_id, "client_disconnected")
                log_event("client_disconnected", cancelled=True, job_id=job_id)
                return None
            if time.monotonic() > deadline:
                await run_in_threadpool(queue.cancel, job_id, "deadline")
                raise ApiError(504, f"the request took longer than the server's --timeout ({timeout_s:g} s) and was "
                                    f"cancelled (job {job_id}); for long work use POST {JOBS_ROUTE}",
                               type="server_error", code="timeout")
            await asyncio.sleep(delay)
            delay = min(POLL_S, delay * 1.5)
    except QueueUnavailable as exc:
        raise _unavailable(exc, job_id) from None


# --- running it ----------------------------------------------------------------------------------------------

def run_server(config: ServeConfig, keys, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn's graceful shutdown cancels queued and running jobs)."""
    import uvicorn

    configure_logging()
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(config, keys, on_fatal=on_fatal)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                           timeout_graceful_shutdown=10))
    server.run()
    if failed:
        exc = failed[0]
        if isinstance(exc, Sd35fp8Error):
            raise exc
        raise ServerStartFailed(f"the model could not be loaded ({type(exc).__name__}: {exc})",
                                fix="run `sd35fp8 generate --model MODEL --prompt test` to see the full error") from exc
    return 0


