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
  :func:`~sd35fp8_helpers.generation.check_settings` as everything else; a CUDA out-of-memory error in one
  job is a 503 for that job only (memory freed, the worker goes on).
* **Leaking keys and prompts**: keys are hashed at rest and compared in constant time
  (:mod:`~sd35fp8_helpers.serve_auth`); logs are JSON lines with a request id and never carry the
  ``Authorization`` header, the key, or (unless ``--log-prompts``) the prompt.

Endpoints: ``POST /v1/images/generations``, ``GET /healthz`` (process alive), ``GET /readyz`` (model
loaded), ``GET /metrics`` (Prometheus). The Gradio demo (:mod:`~sd35fp8_helpers.demo`) renders through the
same :class:`ImageEngine`.

Example (``sd35fp8 api-key --keys-file keys.txt`` prints a key once and stores its hash):
    $ sd35fp8 serve --model tiny --keys-file keys.txt --queue-size 8 --rate 60
    $ curl -s localhost:8000/v1/images/generations -H "Authorization: Bearer $KEY" \
        -H 'Content-Type: application/json' -d '{"prompt": "a fox", "size": "128x128"}'
    {"created": 1795530000, "data": [{"b64_json": "iVBORw0KGgo...", "seed": 1234}]}

:mod:`~sd35fp8_helpers.serve_client` starts one in the background for notebooks and tests.
"""
# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations
# (``request: Request``) at run time, and ``Request`` is imported inside :func:`create_app`.

import asyncio
import base64
import concurrent.futures
import contextlib
import contextvars
import functools
import json
import logging
import math
import os
import queue
import re
import secrets
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .constants import DEFAULT_MODEL
from .errors import InvalidGenerationInput, ServerStartFailed, Sd35fp8Error
from .generation import GenerationResult, GenerationSettings, generate, pipeline_limits
from .fp8 import PRECISIONS, apply_precision_

# --- named limits and defaults --------------------------------------------------------------------------
MAX_IMAGES = 4
"""Largest ``n`` per request: each image is a full generation, so n multiplies the time a request holds the GPU."""
MAX_PROMPT_CHARS = 2000
"""Longer prompts are refused. CLIP reads 77 tokens and T5 256 (diffusers' default), so more text only costs."""
MAX_STEPS = 100
"""An upper bound on ``steps``: without one, a single request could hold the worker for hours."""
MAX_BODY_BYTES = 64 * 1024
DEFAULT_QUEUE_SIZE = 8
DEFAULT_RATE_PER_MIN = 60.0
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_PORT = 8000
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_POLL_S = 0.1  # how often a waiting request checks for a client disconnect or its deadline
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # accepted from clients; anything else is replaced
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
_ROUTE = "/v1/images/generations"

log = logging.getLogger("sd35fp8.serve")
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


# --- the shared generation function (API worker and Gradio demo) -----------------------------------------

class JobCancelled(Exception):
    """Raised from the step callback when the client has gone or the deadline passed (control flow only)."""


class ImageEngine:
    """The resident pipeline(s) and the one function that turns settings into images.

    The API worker and the Gradio demo both call :meth:`render`; a lock makes sure only one generation
    uses a pipeline at a time, whoever asks. Pipelines are loaded on first use and kept, one per precision
    (the API uses only its start-up precision; the demo may ask for another).

    Example:
        >>> engine = ImageEngine("tiny", device="cpu")
        >>> engine.render([GenerationSettings("a cat", steps=2, height=64, width=64)])[0].image.size
        (64, 64)
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, precision: str = "bf16", device: str | None = None,
                 memory_strategy: str | None = None, pipe=None) -> None:
        _check_precision(precision)
        self.model = model
        self.precision = precision
        self.memory_strategy = memory_strategy
        self.device = device or (str(pipe.device) if pipe is not None else None)
        self._pipes: dict[str, Any] = {} if pipe is None else {precision: pipe}  # pipe: already loaded
        self._lock = threading.RLock()

    def pipeline(self, precision: str | None = None):
        """The pipeline for ``precision`` (default: the engine's), loaded and converted on first use."""
        precision = precision or self.precision
        pipe = self._pipes.get(precision)  # no lock once loaded: request checks never wait for a generation
        if pipe is not None:
            return pipe
        _check_precision(precision)
        with self._lock:
            if precision not in self._pipes:
                self._pipes[precision] = self._load(precision)
            return self._pipes[precision]

    def _load(self, precision: str):
        from .models import default_device, load_pipeline

        self.device = self.device or default_device()
        pipe = load_pipeline(self.model, device=self.device)
        apply_precision_(pipe, precision)  # "bf16" = as loaded (float32 on CPU)
        if self.memory_strategy:
            from .memory import get_strategy

            get_strategy(self.memory_strategy).apply(pipe, self.device)
        return pipe

    def limits(self, precision: str | None = None) -> tuple[int, int]:
        """(size multiple, largest side) of one pass, from the pipeline itself."""
        return pipeline_limits(self.pipeline(precision))

    def defaults(self, precision: str | None = None) -> tuple[int, int]:
        """(native side in px, default steps) of the served model: what a request without size/steps gets."""
        from .presets import LARGE, TINY

        pipe = self.pipeline(precision)
        source = getattr(pipe, "sd35fp8_source", None)
        steps = (TINY if source is not None and source.is_tiny else LARGE).default_steps
        return pipe.transformer.config.sample_size * pipe.vae_scale_factor, steps

    def render(self, settings: Sequence[GenerationSettings], *, precision: str | None = None,
               should_stop: Callable[[], bool] = lambda: False) -> list[GenerationResult]:
        """Generate one image per settings, in order; ``should_stop()`` is asked before each step.

        When it says True, :class:`JobCancelled` is raised from the pipeline's step callback, which ends
        the denoising loop at once (``pipe._interrupt`` would still run the VAE decode for nobody).
        """
        def on_step(_step: int, _total: int) -> None:
            if should_stop():
                raise JobCancelled()

        precision = precision or self.precision
        with self._lock:
            pipe = self.pipeline(precision)
            results = []
            for s in settings:
                on_step(0, s.steps)  # a job cancelled between two images stops here
                results.append(generate(pipe, s, on_step=on_step, progress=False, precision=precision))
            return results  # PNG metadata names the precision key, as `sd35fp8 generate` does


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise Sd35fp8Error(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                           fix="use --precision bf16 (as loaded), fp8-storage or fp8-compute")


# --- configuration, jobs, the worker -----------------------------------------------------------------------

@dataclass
class ServeConfig:
    """Everything ``sd35fp8 serve`` is started with. Checked here, so a typo fails before the model loads."""

    model: str = DEFAULT_MODEL
    precision: str = "bf16"
    memory_strategy: str | None = None
    device: str | None = None
    queue_size: int = DEFAULT_QUEUE_SIZE
    rate_per_min: float = DEFAULT_RATE_PER_MIN
    burst: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    log_prompts: bool = False
    require_auth: bool = True

    def __post_init__(self) -> None:
        _check_precision(self.precision)
        if self.queue_size < 1:
            raise Sd35fp8Error(f"--queue-size {self.queue_size} must be >= 1",
                               fix="use the number of requests allowed to wait, e.g. --queue-size 8")
        if self.timeout_s <= 0:
            raise Sd35fp8Error(f"--timeout {self.timeout_s} must be > 0 seconds", fix="e.g. --timeout 300")
        if self.memory_strategy:
            from .memory import get_strategy

            get_strategy(self.memory_strategy)  # raises InvalidPlanInput naming the valid ones


@dataclass
class Job:
    """One accepted request: its settings, a future for the worker's answer, and a cancel flag."""

    settings: list[GenerationSettings]
    request_id: str
    key: str
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str = ""

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self.cancelled.set()


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after


class ImageService:
    """One worker thread that owns the engine, fed by a bounded queue.

    ``queue_size`` jobs may wait while one runs; :meth:`submit` raises :class:`QueueFull` beyond that. The
    worker loads the pipeline first (``ready`` turns True), then takes jobs one at a time.
    """

    def __init__(self, engine: ImageEngine, config: ServeConfig, *,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.config = config
        self.metrics: Metrics | None = None  # set by create_app (the gauges read this service)
        self.on_fatal = on_fatal
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=config.queue_size)
        self.ready = False
        self.load_error: BaseException | None = None
        self.running: Job | None = None
        self._job_seconds = 1.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._run, name="sd35fp8-gpu-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job and every waiting one; end the worker."""
        if self.running is not None:
            self.running.cancel("server_stopping")
        with contextlib.suppress(queue.Empty):
            while True:
                job = self.queue.get_nowait()
                if job is not None:
                    job.cancel("server_stopping")
                    job.future.set_exception(JobCancelled())
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(max(1, math.ceil(self._job_seconds * (self.queue.qsize() + 1)))) from None

    def _run(self) -> None:
        try:
            self.engine.pipeline()  # the one load, in this thread, while /healthz already answers
            self.ready = True
            _log("model_loaded", model=self.engine.model, precision=self.engine.precision,
                 device=str(self.engine.device))
        except BaseException as exc:  # noqa: BLE001 - reported, then the server is told to exit
            self.load_error = exc
            _log("model_load_failed", level=logging.ERROR, error_type=type(exc).__name__,
                 error=exc.one_line if isinstance(exc, Sd35fp8Error) else "see the server's stderr")
            if self.on_fatal:
                self.on_fatal(exc)
            return
        while (job := self.queue.get()) is not None:
            self._do(job)

    def _do(self, job: Job) -> None:
        token = _request_id.set(job.request_id)
        self.running = job
        start = time.perf_counter()
        try:
            if job.cancelled.is_set():
                raise JobCancelled()
            results = self.engine.render(job.settings, should_stop=job.cancelled.is_set)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the request that caused it
            if _is_oom(exc):
                from .memory import free_memory

                free_memory()
            job.future.set_exception(exc)
            _log("job_failed", error_type=type(exc).__name__, reason=job.reason or None,
                 seconds=round(time.perf_counter() - start, 3))
        else:
            seconds = time.perf_counter() - start
            self._job_seconds = 0.7 * self._job_seconds + 0.3 * seconds
            if self.metrics:
                self.metrics.images.inc(len(results))
            job.future.set_result(results)
            s = job.settings[0]
            _log("generated", key=job.key, n=len(results), size=f"{s.width}x{s.height}", steps=s.steps,
                 seconds=round(seconds, 3), **({"prompt": s.prompt} if self.config.log_prompts else {}))
        finally:
            self.running = None
            _request_id.reset(token)


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


# --- metrics -------------------------------------------------------------------------------------------------

class Metrics:
    """The Prometheus series, in a registry of their own (two apps in one process never collide)."""

    def __init__(self, service: "ImageService") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, open fds
        self.latency = Histogram("sd35fp8_request_duration_seconds", "Time to answer an images request",
                                 ["status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("sd35fp8_images_generated", "Images generated and returned",
                              registry=self.registry)
        self.errors = Counter("sd35fp8_errors", "Requests answered with an error, by kind", ["kind"],
                              registry=self.registry)
        queue_depth = Gauge("sd35fp8_queue_depth", "Jobs waiting for the worker (the running one excluded)",
                            registry=self.registry)
        queue_depth.set_function(service.queue.qsize)
        running = Gauge("sd35fp8_jobs_running", "Jobs the worker is generating now (0 or 1)", registry=self.registry)
        running.set_function(lambda: int(service.running is not None))
        import torch

        if torch.cuda.is_available():
            gpu = Gauge("sd35fp8_gpu_memory_allocated_bytes", "CUDA memory held by tensors",
                        registry=self.registry)
            gpu.set_function(torch.cuda.memory_allocated)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --- logging -------------------------------------------------------------------------------------------------

class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, event, request id and the event's fields (never headers)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                "event": getattr(record, "event", None) or record.getMessage(),
                "request_id": _request_id.get(), **getattr(record, "fields", {})}
        if record.exc_info and record.exc_info[1] is not None:  # type and frames only: messages may hold input
            line["error_type"] = type(record.exc_info[1]).__name__
            line["traceback"] = "".join(traceback.format_tb(record.exc_info[2]))
        return json.dumps(line, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for our logger and uvicorn's (uvicorn's access log is off: ours has request ids)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    for name in ("sd35fp8.serve", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def _log(event: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, event, extra={"event": event, "fields": {k: v for k, v in fields.items() if v is not None}})


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
    from pydantic import BaseModel, ConfigDict

    class ImagesRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str
        model: str | None = None
        n: int = 1
        size: str | None = None
        response_format: str = "b64_json"
        seed: int | None = None
        steps: int | None = None
        guidance_scale: float = GenerationSettings.guidance_scale
        negative_prompt: str = ""
        user: str | None = None  # OpenAI's end-user id: accepted, not used

    return ImagesRequest


def parse_request(raw: bytes, engine: ImageEngine) -> list[GenerationSettings]:
    """Body bytes → one :class:`GenerationSettings` per image, or :class:`ApiError` (400) naming the field."""
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
        raise ApiError(400, f"{param}: {err['msg']}", param=param, code="invalid_type") from None
    if req.model not in (None, engine.model):
        raise ApiError(400, f"model={req.model!r} is not served here; this server serves {engine.model!r}",
                       param="model", code="model_not_found")
    if req.response_format != "b64_json":
        raise ApiError(400, f"response_format={req.response_format!r} is not supported: this server keeps no "
                            "images to link to; use 'b64_json'", param="response_format", code="invalid_value")
    if not 1 <= req.n <= MAX_IMAGES:
        raise ApiError(400, f"n={req.n} is out of range: 1 to {MAX_IMAGES} images per request",
                       param="n", code="invalid_value")
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"prompt is {len(req.prompt)} characters; the limit is {MAX_PROMPT_CHARS}",
                       param="prompt", code="invalid_value")
    if req.steps is not None and req.steps > MAX_STEPS:
        raise ApiError(400, f"steps={req.steps} is over this server's limit of {MAX_STEPS}",
                       param="steps", code="invalid_value")
    native, default_steps = engine.defaults()
    width = height = native
    if req.size is not None:
        match = _SIZE.match(req.size)
        if not match:
            raise ApiError(400, f"size={req.size!r} is not WIDTHxHEIGHT, e.g. '{native}x{native}'",
                           param="size", code="invalid_value")
        width, height = int(match[1]), int(match[2])
    seed = secrets.randbelow(2**31) if req.seed is None else req.seed
    settings = [GenerationSettings(req.prompt, req.negative_prompt, seed + i,
                                   default_steps if req.steps is None else req.steps,
                                   req.guidance_scale, height, width) for i in range(req.n)]
    from .generation import check_settings

    multiple, max_side = engine.limits()
    try:
        check_settings(settings[0], multiple=multiple, max_side=max_side)
    except InvalidGenerationInput as exc:
        param = "size" if exc.argument in ("height", "width") else exc.argument
        raise ApiError(400, exc.one_line, param=param, code="invalid_value") from None
    return settings


def _error_for(exc: BaseException) -> ApiError:
    """What the worker's exception means to the client."""
    if isinstance(exc, JobCancelled):
        return ApiError(503, "the server is stopping; the request was cancelled", type="server_error",
                        code="cancelled", retry_after=5)
    if _is_oom(exc):
        return ApiError(503, "out of memory generating this request; the server freed memory and keeps serving. "
                             "fix: ask for a smaller size or n, or start the server with a leaner "
                             "--memory-strategy", type="server_error", code="out_of_memory", retry_after=5)
    if isinstance(exc, InvalidGenerationInput):
        return ApiError(400, exc.one_line, param=exc.argument, code="invalid_value")
    return _internal_error(exc)


def _internal_error(exc: BaseException) -> ApiError:
    """A bug: logged with its type and frames (not its message, which may quote the input), answered 500."""
    _log("internal_error", level=logging.ERROR, error_type=type(exc).__name__,
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
        rid = sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = _request_id.set(rid)
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
            if scope["path"] == _ROUTE:
                self.metrics.latency.labels(str(status[0])).observe(seconds)
            _log("request", method=scope["method"], path=scope["path"], status=status[0],
                 seconds=round(seconds, 4), key=scope["state"].get("key"))
            _request_id.reset(token)


def create_app(config: ServeConfig, keys, *, engine: ImageEngine | None = None,
               on_fatal: Callable[[BaseException], None] | None = None):
    """The FastAPI app: routes, error shape, metrics; the worker starts (and loads the model) at start-up.

    ``keys`` is a :class:`~sd35fp8_helpers.serve_auth.KeyStore`; with ``config.require_auth=False`` it may be
    empty and clients are rate-limited by address.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    from .serve_auth import RateLimiter, bearer_token

    engine = engine or ImageEngine(config.model, precision=config.precision, device=config.device,
                                   memory_strategy=config.memory_strategy)
    service = ImageService(engine, config, on_fatal=on_fatal)
    metrics = service.metrics = Metrics(service)
    limiter = RateLimiter(config.rate_per_min, config.burst)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.start()
        _log("started", model=config.model, precision=config.precision, queue_size=config.queue_size,
             rate_per_min=config.rate_per_min, keys=len(keys), auth=config.require_auth)
        yield
        service.stop()
        _log("stopped")

    app = FastAPI(title="sd35fp8 images API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.metrics = metrics
    app.add_middleware(_RequestContext, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        metrics.errors.labels(exc.code).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

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
        body = {"ready": service.ready, "model": engine.model, "precision": engine.precision,
                "device": str(engine.device), "queue_size": config.queue_size}
        if service.load_error is not None:
            body["error"] = type(service.load_error).__name__
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post(_ROUTE)
    async def images(request: Request):
        if config.require_auth:
            label = keys.identify(bearer_token(request.headers.get("authorization")))
            if label is None:
                raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer YOUR_KEY'",
                               type="authentication_error", code="invalid_api_key")
        else:
            label = f"client-{request.client.host if request.client else 'unknown'}"
        request.state.key = label
        wait = limiter.retry_after(label)
        if wait:
            raise ApiError(429, f"rate limit of {config.rate_per_min:g} requests per minute reached for this key; "
                                f"retry after {wait} s", type="rate_limit_error", code="rate_limit_exceeded",
                           retry_after=wait)
        if not service.ready:
            raise ApiError(503, "the model is still loading (see GET /readyz)", type="server_error",
                           code="not_ready", retry_after=5)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
        settings = parse_request(raw, engine)
        job = Job(settings, request.state.request_id, label)
        try:
            service.submit(job)
        except QueueFull as full:
            raise ApiError(429, f"the server is busy: {config.queue_size} requests are already waiting; "
                                f"retry after {full.retry_after} s", type="server_busy", code="queue_full",
                           retry_after=full.retry_after) from None
        results = await _wait(job, request, config.timeout_s)
        if results is None:  # the client has gone: nobody reads this answer
            metrics.errors.labels("client_disconnected").inc()
            return Response(status_code=499)
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(r.png_bytes()).decode(), "seed": r.settings.seed}
                         for r in results]}

    return app


async def _wait(job: Job, request, timeout_s: float) -> list[GenerationResult] | None:
    """The job's results; cancels it (and returns None) when the client disconnects; 504 past the deadline."""
    future = asyncio.wrap_future(job.future)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waiting is not an error
    deadline = time.monotonic() + timeout_s
    while True:
        done, _ = await asyncio.wait({future}, timeout=_POLL_S)
        if done:
            try:
                return future.result()
            except BaseException as exc:  # noqa: BLE001 - mapped to an answer
                raise _error_for(exc) from None
        if await request.is_disconnected():
            job.cancel("client_disconnected")  # the step callback ends it within one step
            _log("client_disconnected", cancelled=True)
            return None
        if time.monotonic() > deadline:
            job.cancel("deadline")
            raise ApiError(504, f"the request took longer than the server's --timeout ({timeout_s:g} s) and was "
                                "cancelled", type="server_error", code="timeout")


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


# --- CLI ---------------------------------------------------------------------------------------------------

def _serve_args(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="tiny, a diffusers folder, or a hub repo id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--keys-file", default=None, help="file of API key hashes (write one with `sd35fp8 api-key`); "
                                                     "SD35FP8_API_KEYS adds more")
    p.add_argument("--no-auth", action="store_true", help="accept requests without a key (local experiments only)")
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, help="requests allowed to wait")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE_PER_MIN, help="requests per minute per key (0: off)")
    p.add_argument("--burst", type=int, default=None, help="requests a key may send at once (default: --rate)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds before a request is cancelled")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    p.add_argument("--memory-strategy", default=None, help="a strategy from `sd35fp8_helpers.memory` "
                                                           "(e.g. fp8_model_offload)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--log-prompts", action="store_true", help="write prompts into the logs (off: privacy)")


def _serve(args) -> int:
    from .constants import settings
    from .serve_auth import KeyStore

    config = ServeConfig(model=args.model, precision=args.precision, memory_strategy=args.memory_strategy,
                         device=args.device, queue_size=args.queue_size, rate_per_min=args.rate, burst=args.burst,
                         timeout_s=args.timeout, log_prompts=args.log_prompts, require_auth=not args.no_auth)
    keys = KeyStore.load(args.keys_file, settings().api_keys)
    if config.require_auth and not len(keys):
        raise Sd35fp8Error("no API keys configured, so every request would be refused",
                           fix="sd35fp8 api-key --keys-file keys.txt, then serve --keys-file keys.txt "
                               "(or set SD35FP8_API_KEYS, or pass --no-auth for a local experiment)")
    from .models import resolve_model

    resolve_model(config.model)  # a wrong name fails here, in one line, before the server starts
    return run_server(config, keys, args.host, args.port)


def _api_key_args(p) -> None:
    p.add_argument("--keys-file", default=None, help="append the key's hash here (created with mode 600)")
    p.add_argument("--label", default="default", help="name for the key (shown in logs and used for rate limits)")


def _api_key(args) -> int:
    from .serve_auth import hash_api_key, new_api_key

    key = new_api_key()
    line = hash_api_key(key, args.label).line()
    if args.keys_file:
        path = Path(args.keys_file)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")
        print(f"added key {args.label!r} to {path} (hash only). The key, shown once:", file=sys.stderr)
    else:
        print(f"hash line for a keys file:\n  {line}\nThe key, shown once:", file=sys.stderr)
    print(key)
    return 0


def register_cli(command) -> None:
    command("serve", "serve an OpenAI-style images API (/v1/images/generations) with keys, queue and metrics",
            _serve_args)(_serve)
    command("api-key", "make a new API key for `sd35fp8 serve`; store only its hash", _api_key_args)(_api_key)
