"""``sd35fp8 worker``: one process per GPU that takes image jobs from the Redis queue, one at a time.

The life of a worker:

1. **Load once, warm up, then take work.** The pipeline is loaded and one short generation runs at the
   model's native size (``torch.compile`` included, with ``--precision fp8-compute``) *before* the worker
   subscribes to the queue — so the first user's job never pays the 10–60 s load or the compile.
2. **Register.** The worker writes what it serves (model, native size, default steps, size limits) to Redis;
   the API checks requests against it without loading any weights, and refuses to mix two models on one
   broker. A heartbeat every 2 s keeps the worker listed (``/readyz`` counts live workers).
3. **One job at a time** (Celery solo pool, concurrency 1, prefetch 1, late acks — see :mod:`.queue`). For
   each message: claim the job (lease), publish progress every step (``step i/n``, read by
   ``GET /v1/images/jobs/{id}``), stop at the next step when a cancel was asked, store the PNGs with the
   job's TTL, add the run to the cluster metrics. A job whose worker died is re-delivered by Celery and
   finished by another worker, exactly once (:mod:`.jobstore`).
4. **Redis away?** Progress is skipped, the result is kept in memory and stored as soon as Redis answers
   again (up to ``--store-wait`` seconds), and Celery reconnects the consumer by itself.

``--gpus all`` starts one such process per visible GPU (each sees only its card through
``CUDA_VISIBLE_DEVICES``) and waits for them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

from ..constants import DEFAULT_MODEL
from ..errors import InvalidGenerationInput, QueueUnavailable, Sd35fp8Error
from ..pipeline.generation import GenerationSettings
from .engine import ImageEngine, JobCancelled, check_precision
from .jobstore import DEFAULT_LEASE_S, HEARTBEAT_S, JobStore, ServedModel, redact_url
from .logs import log_event, request_id_var
from .queue import DEFAULT_VISIBILITY_TIMEOUT_S, QUEUE_NAME, celery_app, set_current_worker

STORE_WAIT_S = 120.0
"""How long a finished job's images are kept in memory waiting for Redis to come back before the worker gives
up (the message then stays unacknowledged and the job is re-delivered)."""


@dataclass
class WorkerConfig:
    """Everything ``sd35fp8 worker`` starts with; checked before the model loads."""

    broker: str
    model: str = DEFAULT_MODEL
    precision: str = "bf16"
    memory_strategy: str | None = None
    device: str | None = None
    name: str | None = None
    lease_s: float = DEFAULT_LEASE_S
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S
    threads: int | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    warmup: bool = True
    log_prompts: bool = False
    store_wait_s: float = STORE_WAIT_S

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if not self.broker.startswith(("redis://", "rediss://", "unix://")):
            raise Sd35fp8Error(f"--broker {redact_url(self.broker)!r} is not a Redis URL",
                               fix="use redis://HOST:PORT/0 (e.g. redis://127.0.0.1:6379/0)")
        if self.lease_s <= 0:
            raise Sd35fp8Error(f"--lease {self.lease_s} must be > 0 seconds", fix="e.g. --lease 15")
        if self.visibility_timeout_s <= self.lease_s:
            raise Sd35fp8Error(f"--visibility-timeout {self.visibility_timeout_s:g} must be longer than --lease "
                               f"{self.lease_s:g}: a re-delivered job must find a dead worker's lease expired",
                               fix=f"e.g. --visibility-timeout {max(60.0, 4 * self.lease_s):g}")
        if self.threads is not None and self.threads < 1:
            raise Sd35fp8Error(f"--threads {self.threads} must be >= 1", fix="e.g. --threads 1 per CPU worker")
        if self.memory_strategy:
            from ..memory.strategies import get_strategy

            get_strategy(self.memory_strategy)
        self.name = self.name or f"{socket.gethostname()}-{os.getpid()}"


class QueueWorker:
    """One pipeline, one Redis connection, one job at a time. :meth:`prepare` then :meth:`serve`."""

    def __init__(self, config: WorkerConfig, engine: ImageEngine | None = None) -> None:
        self.config = config
        self.name = config.name or ""
        self.engine = engine or ImageEngine(config.model, precision=config.precision, device=config.device,
                                            memory_strategy=config.memory_strategy)
        self.store = JobStore(config.broker)
        self.served: ServedModel | None = None
        self.current_job: str | None = None
        self.state = "loading"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._metrics = None

    # -- start-up ---------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load, warm up, register the model, start heartbeats (and the metrics endpoint). Raises
        :class:`~sd35fp8_helpers.errors.QueueUnavailable` if Redis cannot be reached."""
        self.store.ping()  # a wrong --broker fails in one line, before minutes of loading
        if self.config.threads:
            import torch

            torch.set_num_threads(self.config.threads)
        start = time.perf_counter()
        self.engine.pipeline()
        self.served = self.engine.served_model()
        loaded = time.perf_counter() - start
        if self.config.warmup:  # native size: torch.compile (fp8-compute) compiles for the size most jobs use
            native = self.served.native
            self.engine.render([GenerationSettings("warm-up", steps=2, height=native, width=native)])
        log_event("worker_warm", worker=self.name, model=self.config.model, precision=self.config.precision,
                  device=str(self.engine.device), load_s=round(loaded, 2),
                  warmup_s=round(time.perf_counter() - start - loaded, 2))
        self._register_model()
        set_current_worker(self)  # the Celery task runs this process's jobs on it
        self.state = "warm"  # "ready" once the Celery consumer is connected (see serve)
        self._beat_once()
        self._beat = threading.Thread(target=self._beat_loop, name="sd35fp8-heartbeat", daemon=True)
        self._beat.start()
        if self.config.metrics_port is not None:
            self._start_metrics(self.config.metrics_port)

    def _register_model(self) -> None:
        assert self.served is not None
        known = self.store.served_model()
        if known is not None and (known.model, known.precision) != (self.served.model, self.served.precision):
            others = [n for n, w in self.store.workers().items()
                      if (w.get("model"), w.get("precision")) == (known.model, known.precision)]
            if others:
                raise Sd35fp8Error(
                    f"this broker already serves {known.model!r} ({known.precision}) with worker(s) "
                    f"{', '.join(sorted(others))}; one queue serves one model",
                    fix="give the second model its own Redis database, e.g. --broker redis://HOST:PORT/1, "
                        "and its own `sd35fp8 serve --broker` on it")
        self.store.register_model(self.served)

    def _info(self) -> dict[str, object]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(self.engine.device),
                "model": self.config.model, "precision": self.config.precision, "state": self.state,
                "job": self.current_job or "", "seen": round(time.time(), 3)}

    def _beat_once(self) -> None:
        self.store.heartbeat(self.name, self._info())

    def _beat_loop(self) -> None:
        """Heartbeat, and renew the running job's lease (a third of the lease: two renewals may fail)."""
        period = min(HEARTBEAT_S, self.config.lease_s / 3)
        last_beat = 0.0
        while not self._stop.wait(period):
            try:
                job = self.current_job
                if job is not None:
                    self.store.renew(job, self.name, self.config.lease_s)
                if time.monotonic() - last_beat >= HEARTBEAT_S - 1e-3:
                    self._beat_once()
                    last_beat = time.monotonic()
            except QueueUnavailable:
                pass  # Redis away: Celery reconnects; leases and heartbeats resume when it is back

    def _start_metrics(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

        from .jobstore import RUN_BUCKETS

        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        busy = Gauge("sd35fp8_worker_busy", "1 while this worker runs a job", registry=registry)
        busy.set_function(lambda: int(self.current_job is not None))
        self._metrics = {
            "jobs": Counter("sd35fp8_worker_jobs_handled", "Jobs this worker ended, by outcome", ["outcome"],
                            registry=registry),
            "seconds": Histogram("sd35fp8_worker_job_seconds", "Run time of this worker's jobs",
                                 buckets=RUN_BUCKETS, registry=registry),
        }
        import torch

        if torch.cuda.is_available():
            gpu = Gauge("sd35fp8_gpu_memory_allocated_bytes", "CUDA memory held by tensors", registry=registry)
            gpu.set_function(torch.cuda.memory_allocated)
        start_http_server(port, addr=self.config.metrics_host, registry=registry)

    # -- one job ------------------------------------------------------------------------------------------------
    def run_job(self, job_id: str) -> tuple[str, float | None]:
        """Run job ``job_id`` if it is this worker's to run: ``(outcome, retry_in)``; ``retry_in`` is set when
        another live worker holds the job (the Celery task retries later, so the job cannot be lost)."""
        verdict = self.store.claim(job_id, self.name, self.config.lease_s)
        if verdict == "busy":
            log_event("job_skipped", job_id=job_id, worker=self.name, reason="another worker holds it")
            return "busy", self.config.lease_s
        if verdict == "cancel":
            self.store.finish(job_id, "cancelled", "", error="cancelled before it ran", error_code="cancelled")
            log_event("job_cancelled", job_id=job_id, worker=self.name, step=0)
            return "cancelled", None
        if verdict != "run":  # missing (expired) or already ended: idempotent by job id
            log_event("job_skipped", job_id=job_id, worker=self.name, reason=verdict)
            return verdict, None
        record = self.store.get(job_id)
        if record is None:
            return "missing", None
        token = request_id_var.set(record.request_id or job_id)
        self.current_job, self.state = job_id, "busy"
        start = time.perf_counter()
        try:
            log_event("job_started", job_id=job_id, worker=self.name, attempt=record.attempts,
                      queue_wait_s=round(record.queue_wait_s or 0.0, 4))
            return self._render(job_id, record, start), None
        finally:
            self.current_job, self.state = None, "ready"
            request_id_var.reset(token)

    def _render(self, job_id: str, record, start: float) -> str:
        settings = [GenerationSettings(**s) for s in record.settings]
        seen = {"step": 0}

        def on_progress(image: int, step: int, steps: int) -> bool:
            seen["step"] = step
            try:
                return self.store.progress(job_id, image, step, steps)
            except QueueUnavailable:
                return False  # keep generating; the result is stored when Redis is back

        images: list[bytes] = []
        try:
            results = self.engine.render(settings, on_progress=on_progress)
        except JobCancelled:
            state, code, error = "cancelled", "cancelled", "cancelled while running"
        except InvalidGenerationInput as exc:
            state, code, error = "failed", "invalid_value", exc.one_line
        except BaseException as exc:  # noqa: BLE001 - the job fails, the worker goes on
            from .service import is_oom

            if is_oom(exc):
                from ..memory.strategies import free_memory

                free_memory()
                state, code = "failed", "out_of_memory"
                error = "out of memory generating this job; ask for a smaller size or n"
            else:  # type and frames only: a message may quote the prompt
                state, code, error = "failed", "internal_error", f"internal error ({type(exc).__name__})"
                log_event("job_error", level=logging.ERROR, job_id=job_id, error_type=type(exc).__name__,
                          traceback="".join(traceback.format_tb(exc.__traceback__)))
        else:
            state, code, error = "done", "", ""
            for r in results:
                r.extra.update(worker=self.name, job_id=job_id)
                images.append(r.png_bytes())
        run_s = time.perf_counter() - start
        outcome = self._store_finish(job_id, state, images=images, error=error, error_code=code, run_s=run_s)
        fields = {"job_id": job_id, "worker": self.name, "seconds": round(run_s, 4)}
        if outcome != "ok":
            log_event("job_discarded", reason=outcome, **fields)  # another worker took over, or it had ended
            return outcome
        try:
            self.store.record_run(self.name, images=len(images), run_s=run_s, queue_wait_s=record.queue_wait_s)
        except QueueUnavailable:
            pass  # a metric lost during an outage; the job itself is stored
        if self._metrics:
            self._metrics["jobs"].labels(state).inc()
            self._metrics["seconds"].observe(run_s)
        extra = {"prompt": settings[0].prompt} if self.config.log_prompts else {}
        if state == "done":
            log_event("job_done", images=len(images), **fields, **extra)
        elif state == "cancelled":
            log_event("job_cancelled", step=seen["step"], reason=record.cancel_reason or None, **fields)
        else:
            log_event("job_failed", error_code=code, **fields)
        return state

    def _store_finish(self, job_id: str, state: str, **kwargs) -> str:
        """Store the outcome, waiting (up to ``store_wait_s``) for a Redis that is away."""
        deadline = time.monotonic() + self.config.store_wait_s
        while True:
            try:
                return self.store.finish(job_id, state, self.name, **kwargs)
            except QueueUnavailable:
                if time.monotonic() > deadline:
                    raise  # the message stays unacknowledged: Celery re-delivers the job
                time.sleep(0.5)

    # -- the Celery consumer ------------------------------------------------------------------------------------
    def serve(self) -> int:
        """Consume the queue until SIGTERM/SIGINT (a warm shutdown: the running job finishes first)."""
        app = celery_app(self.config.broker, self.config.visibility_timeout_s)
        worker = app.Worker(hostname=f"{self.name}@sd35fp8", pool_cls="solo", concurrency=1, queues=[QUEUE_NAME],
                            loglevel="WARNING", quiet=True, without_gossip=True, without_mingle=True,
                            without_heartbeat=True, optimization="fair")
        from celery.signals import worker_ready

        def on_ready(**_kwargs) -> None:
            self.state = "ready"
            self._beat_once()
            log_event("worker_ready", worker=self.name, broker=redact_url(self.config.broker), queue=QUEUE_NAME)

        worker_ready.connect(on_ready, weak=False)
        try:
            worker.start()
        finally:
            self.close()
        return worker.exitcode or 0

    def close(self) -> None:
        self._stop.set()
        try:
            self.store.forget_worker(self.name)
        except QueueUnavailable:
            pass
        log_event("worker_stopped", worker=self.name)


# --- one process per GPU ---------------------------------------------------------------------------------------

def visible_gpus(spec: str) -> list[int]:
    """``all`` → every CUDA device index, ``2`` → the first two, ``0,2`` → those. No GPU → a clear error."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise Sd35fp8Error(f"--gpus {spec}: no CUDA GPU is visible to this process",
                           fix="on a CPU machine start workers with --device cpu (one process each, e.g. "
                               "--threads 1); check `nvidia-smi` and CUDA_VISIBLE_DEVICES on a GPU machine")
    if spec == "all":
        return list(range(count))
    try:
        chosen = list(range(int(spec))) if spec.isdigit() else [int(x) for x in spec.split(",")]
    except ValueError:
        chosen = []
    if not chosen or any(not 0 <= g < count for g in chosen):
        raise Sd35fp8Error(f"--gpus {spec!r} does not name GPUs of this machine (it has {count}: 0..{count - 1})",
                           fix="use --gpus all, a count (--gpus 2) or indices (--gpus 0,1)")
    return chosen


def run_per_gpu(argv: Sequence[str], gpus: Sequence[int], name: str, metrics_port: int | None = None) -> int:
    """Start ``sd35fp8 worker ARGV --device cuda --name NAME-gpuI`` once per GPU (each sees only its own card
    through ``CUDA_VISIBLE_DEVICES``; metrics on ``metrics_port + i``), forward SIGTERM/SIGINT to them, and
    wait for all. Exit code: the first non-zero one of the children, else 0. A child that dies is not restarted
    here: its jobs are re-delivered to the others, and a supervisor (systemd ``Restart=on-failure``) restarts
    the group."""
    children = []
    for i, g in enumerate(gpus):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(g)}
        cmd = [sys.executable, "-m", "sd35fp8_helpers.cli", "worker", *argv, "--device", "cuda",
               "--name", f"{name}-gpu{g}"]
        if metrics_port is not None:
            cmd += ["--metrics-port", str(metrics_port + i)]
        children.append(subprocess.Popen(cmd, env=env))
    log_event("workers_started", gpus=list(gpus), pids=[c.pid for c in children])

    def forward(signum, _frame) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [c.wait() for c in children]
    return next((c for c in codes if c), 0)
