"""Job records in Redis: what the API, the workers and ``sd35fp8 batch`` share about every job.

Celery delivers *messages* (``job id → some worker``); this module keeps the *truth about each job* in Redis,
next to the broker, so that any API process can answer ``GET /v1/images/jobs/{id}`` and the rules hold however
often a message is delivered:

* **Idempotent by job id.** A worker *claims* a job before running it (one Lua script: the state must not be
  final, and a lease key ``lease:{id}`` must be free — ``SET NX PX``). The lease is renewed while the job runs;
  a worker killed with ``kill -9`` stops renewing it, so when Celery re-delivers the message (late acks + the
  Redis transport's visibility timeout), the next worker finds the lease expired and takes over. A second
  delivery while the first worker is alive finds the lease held (``busy``); one after the job finished finds a
  final state and does nothing. :meth:`JobStore.finish` writes a result only once, and never for a worker
  whose lease another worker has taken — so a job is never *done* twice, whatever Celery does.
* **Per-key caps and queue size**, checked atomically when a job is created (nothing is enqueued beyond them).
* **Results with a TTL**: PNG bytes and the record expire ``result_ttl`` seconds after the job ends.
* **Cluster metrics**: jobs by state, per-worker busy seconds and images, queue-wait and run-time histograms
  (bucket counters in Redis, so every API process exports the same numbers; see :mod:`.metrics`).

Every Redis call has a connect and a read timeout; a Redis that is away raises
:class:`~sd35fp8_helpers.errors.QueueUnavailable` (the API answers 503) instead of hanging.

Keys (all under ``sd35fp8:``): ``job:{id}`` (hash), ``result:{id}`` (list of PNGs), ``lease:{id}``,
``queued`` / ``running`` (sets of ids), ``inflight:{identity}`` (set of ids), ``worker:{name}`` (hash, expires
unless the worker heartbeats), ``workerstats:{name}`` (hash), ``model`` (hash: what the workers serve),
``hist:{name}`` (histogram buckets), ``finished:{state}`` (counters), ``rl:{identity}`` (rate-limit bucket,
expires when full again).
"""

from __future__ import annotations

import functools
import json
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from ..errors import QueueUnavailable

PREFIX = "sd35fp8:"
STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = frozenset({"done", "failed", "cancelled"})
DEFAULT_RESULT_TTL_S = 3600
"""How long a finished job's record and images stay readable: long enough to fetch, short enough that Redis
(memory-resident) never fills with PNGs nobody asked for again."""
DEFAULT_LEASE_S = 15.0
"""A worker holds a running job's lease this long, renewed every third of it. After ``kill -9`` the job can
be taken over once the lease has run out (and Celery has re-delivered the message)."""
WORKER_TTL_S = 10.0
"""A worker's registration expires this long after its last heartbeat (every :data:`HEARTBEAT_S`)."""
HEARTBEAT_S = 2.0
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
HISTOGRAMS = {"queue_wait": QUEUE_WAIT_BUCKETS, "run": RUN_BUCKETS}

T = TypeVar("T")


def redact_url(url: str) -> str:
    """``redis://:secret@host:6379/0`` → ``redis://***@host:6379/0``: safe for logs and error messages.

    Example:
        >>> redact_url("redis://user:pw@10.0.0.5:6379/0"), redact_url("redis://127.0.0.1:6379/0")
        ('redis://***@10.0.0.5:6379/0', 'redis://127.0.0.1:6379/0')
    """
    parts = urllib.parse.urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class ServedModel:
    """What the workers on a broker serve, as they registered it: all the API needs to check a request
    (model name, native size, default steps, size multiple, largest side) without loading any weights."""

    model: str
    native: int
    default_steps: int
    multiple: int
    max_side: int
    precision: str = "bf16"
    guidance_scale: float = 4.5

    def default_guidance(self) -> float:
        return self.guidance_scale

    def defaults(self) -> tuple[int, int]:
        return self.native, self.default_steps

    def limits(self) -> tuple[int, int]:
        return self.multiple, self.max_side


@dataclass
class JobRecord:
    """One job as Redis holds it (``job:{id}``), decoded."""

    id: str
    state: str
    identity: str = ""
    request_id: str = ""
    settings: list[dict[str, Any]] = field(default_factory=list)
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    worker: str = ""
    step: int = 0
    steps: int = 0
    image: int = 0
    attempts: int = 0
    completions: int = 0
    cancel_requested: bool = False
    cancel_reason: str = ""
    cancel_step: int | None = None
    error: str = ""
    error_code: str = ""
    result_ttl: int = DEFAULT_RESULT_TTL_S
    source: str = "api"
    run_s: float | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def queue_wait_s(self) -> float | None:
        return None if self.started is None else max(0.0, self.started - self.created)

    @classmethod
    def from_hash(cls, job_id: str, raw: dict[bytes, bytes]) -> "JobRecord":
        h = {k.decode(): v.decode() for k, v in raw.items()}

        def num(name: str, kind: Callable[[str], Any] = float, default: Any = None) -> Any:
            return kind(h[name]) if h.get(name) not in (None, "") else default

        return cls(id=job_id, state=h.get("state", "queued"), identity=h.get("identity", ""),
                   request_id=h.get("request_id", ""), settings=json.loads(h.get("settings", "[]")),
                   created=num("created", float, 0.0), started=num("started"), finished=num("finished"),
                   worker=h.get("worker", ""), step=num("step", int, 0), steps=num("steps", int, 0),
                   image=num("image", int, 0), attempts=num("attempts", int, 0),
                   completions=num("completions", int, 0), cancel_requested=h.get("cancel") == "1",
                   cancel_reason=h.get("cancel_reason", ""), cancel_step=num("cancel_step", int),
                   error=h.get("error", ""),
                   error_code=h.get("error_code", ""), result_ttl=num("result_ttl", int, DEFAULT_RESULT_TTL_S),
                   source=h.get("source", "api"), run_s=num("run_s"))

    def public(self) -> dict[str, Any]:
        """The JSON the jobs API returns (no identity, no prompt echo beyond the settings the caller sent)."""
        out: dict[str, Any] = {"id": self.id, "object": "image.job", "status": self.state,
                               "created": self.created, "n": len(self.settings),
                               "progress": {"image": self.image, "step": self.step, "steps": self.steps}}
        for name in ("started", "finished"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.cancel_step is not None:
            out["progress"]["cancel_asked_at_step"] = self.cancel_step
        if self.worker:
            out["worker"] = self.worker
        if self.queue_wait_s is not None:
            out["queue_wait_s"] = round(self.queue_wait_s, 4)
        if self.run_s is not None:
            out["run_s"] = round(self.run_s, 4)
        return out


# --- Lua: every state change is one atomic script -----------------------------------------------------------

_CREATE = """
-- KEYS: job, inflight, queued     ARGV: id, max_in_flight, max_queued, then field/value pairs
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do  -- forget ids whose job ended or expired
  local state = redis.call('HGET', ARGV[4] .. member, 'state')
  if (not state) or state == 'done' or state == 'failed' or state == 'cancelled' then
    redis.call('SREM', KEYS[2], member)
  end
end
if tonumber(ARGV[2]) > 0 and redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 'key_busy' end
if tonumber(ARGV[3]) > 0 and redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[3]) then return 'queue_full' end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 'ok'
"""

_CLAIM = """
-- KEYS: job, lease, queued, running     ARGV: id, worker, lease_ms, now
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'done' or state == 'failed' or state == 'cancelled' then return state end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 'cancel' end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 'busy' end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[2], 'started', ARGV[4], 'step', 0, 'image', 0)
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return 'run'
"""

_RENEW = """
-- KEYS: lease     ARGV: worker, lease_ms   (a lease that ran out while nobody else took it is taken back)
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""

_FINISH = """
-- KEYS: job, lease, result, queued, running, counters prefix     ARGV: id, state, worker ('' = not a worker:
-- a cancel from the API), now, error, error_code, run_s, inflight prefix, then the PNGs
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'done' or state == 'failed' or state == 'cancelled' then return 'already:' .. state end
local holder = redis.call('GET', KEYS[2])
if ARGV[3] ~= '' and holder and holder ~= ARGV[3] then return 'lost_lease' end  -- another worker took over
-- a cancel finishes a running job only when no live worker holds it (that one stops at its next step)
if ARGV[3] == '' and state == 'running' and holder then return 'running' end
local ttl = tonumber(redis.call('HGET', KEYS[1], 'result_ttl') or '3600')
for i = 9, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
if #ARGV >= 9 then redis.call('EXPIRE', KEYS[3], ttl) end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished', ARGV[4], 'error', ARGV[5], 'error_code', ARGV[6])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'run_s', ARGV[7]) end
if ARGV[2] == 'done' then redis.call('HINCRBY', KEYS[1], 'completions', 1) end
redis.call('EXPIRE', KEYS[1], ttl)
if holder and holder == ARGV[3] then redis.call('DEL', KEYS[2]) end
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
redis.call('SREM', ARGV[8] .. redis.call('HGET', KEYS[1], 'identity'), ARGV[1])
redis.call('INCR', KEYS[6] .. ARGV[2])
return 'ok'
"""

_RATE = """
-- token bucket. KEYS: bucket     ARGV: rate_per_s, burst, now_s
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(redis.call('HGET', KEYS[1], 't') or burst)
local stamp = tonumber(redis.call('HGET', KEYS[1], 's') or now)
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 's', tostring(now))
-- the bucket is full again after this long: then it equals a fresh one, so Redis may forget it
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return tostring(wait)
"""


class JobStore:
    """The Redis side of the job queue. One per process; thread-safe (redis-py pools connections).

    Example (needs a Redis server; :func:`~sd35fp8_helpers.serving.redis_server.start_redis` starts one)::

        store = JobStore("redis://127.0.0.1:6379/0")
        store.create("job1", [{"prompt": "a fox", "seed": 1}], identity="alice")
        store.get("job1").state   # 'queued'
    """

    def __init__(self, url: str, *, socket_timeout: float = 3.0, connect_timeout: float = 1.0) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.safe_url = redact_url(url)
        # One immediate retry: after a Redis restart every pooled connection is dead once, then fine. More
        # retries with backoff (redis-py's default) would make a request wait seconds for a Redis that is away.
        self.redis = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout,
                                          retry=Retry(NoBackoff(), 1), health_check_interval=5)
        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError,
                                                         redis.exceptions.TimeoutError)
        self._create = self.redis.register_script(_CREATE)
        self._claim = self.redis.register_script(_CLAIM)
        self._renew = self.redis.register_script(_RENEW)
        self._finish = self.redis.register_script(_FINISH)
        self._rate = self.redis.register_script(_RATE)

    # -- plumbing ------------------------------------------------------------------------------------------
    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn``; a Redis that is away becomes :class:`QueueUnavailable` (the URL without its password)."""
        try:
            return fn()
        except self._errors as exc:
            reason = str(exc).replace(self.url, self.safe_url) or type(exc).__name__
            raise QueueUnavailable(self.safe_url, reason.splitlines()[0][:200]) from None

    @staticmethod
    def key(*parts: str) -> str:
        return PREFIX + ":".join(parts)

    def ping(self) -> bool:
        return bool(self.call(self.redis.ping))

    # -- jobs ------------------------------------------------------------------------------------------------
    def create(self, job_id: str, settings: Sequence[dict[str, Any]], *, identity: str, request_id: str = "",
               max_in_flight: int = 0, max_queued: int = 0, result_ttl: int = DEFAULT_RESULT_TTL_S,
               source: str = "api") -> str:
        """Record a queued job: ``'ok'``, ``'exists'`` (same id already known: do not enqueue twice),
        ``'key_busy'`` (``identity`` has ``max_in_flight`` jobs queued or running) or ``'queue_full'``.
        Caps of 0 mean no cap."""
        fields = {"state": "queued", "identity": identity, "request_id": request_id,
                  "settings": json.dumps(list(settings)), "created": repr(time.time()),
                  "steps": str(settings[0].get("steps", 0)) if settings else "0",
                  "result_ttl": str(int(result_ttl)), "source": source}
        argv = [job_id, max_in_flight, max_queued, self.key("job", "")]
        for k, v in fields.items():
            argv += [k, v]
        keys = [self.key("job", job_id), self.key("inflight", identity), self.key("queued")]
        return self.call(lambda: self._create(keys=keys, args=argv)).decode()

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.call(lambda: self.redis.hgetall(self.key("job", job_id)))
        return JobRecord.from_hash(job_id, raw) if raw else None

    def get_many(self, job_ids: Iterable[str]) -> dict[str, JobRecord | None]:
        ids = list(job_ids)

        def read() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.key("job", job_id))
            return pipe.execute()

        return {i: (JobRecord.from_hash(i, raw) if raw else None) for i, raw in zip(ids, self.call(read))}

    def results(self, job_id: str) -> list[bytes]:
        return self.call(lambda: self.redis.lrange(self.key("result", job_id), 0, -1))

    def forget(self, job_id: str) -> None:
        """Delete an ended job's record and images (``batch`` does, to run a failed line again)."""
        self.call(lambda: self.redis.delete(self.key("job", job_id), self.key("result", job_id)))

    def cancel(self, job_id: str, reason: str = "cancelled") -> str:
        """Ask for a job to stop. A queued job is cancelled at once (no worker will run it); a running one at
        its worker's next denoising step. Returns the state after the call (``'running'`` = stopping)."""
        def go() -> str:
            key = self.key("job", job_id)
            if not self.redis.exists(key):
                return "missing"
            pipe = self.redis.pipeline(transaction=True)  # the flag and the step it was seen at, atomically
            pipe.hset(key, mapping={"cancel": "1", "cancel_reason": reason})
            pipe.hget(key, "step")
            step = pipe.execute()[1]
            self.redis.hsetnx(key, "cancel_step", step or b"0")
            outcome = self._finish_call(job_id, "cancelled", "", error=f"cancelled: {reason}",
                                        error_code="cancelled")
            return outcome.removeprefix("already:") if outcome != "ok" else "cancelled"

        return self.call(go)

    def claim(self, job_id: str, worker: str, lease_s: float) -> str:
        """``'run'`` (this worker holds the lease now), ``'busy'`` (another live worker holds it),
        ``'cancel'`` (cancel asked before it ran), ``'missing'`` or a final state (nothing to do)."""
        keys = [self.key("job", job_id), self.key("lease", job_id), self.key("queued"), self.key("running")]
        return self.call(lambda: self._claim(keys=keys, args=[job_id, worker, int(lease_s * 1000),
                                                               repr(time.time())])).decode()

    def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        return bool(self.call(lambda: self._renew(keys=[self.key("lease", job_id)],
                                                  args=[worker, int(lease_s * 1000)])))

    def progress(self, job_id: str, image: int, step: int, steps: int) -> bool:
        """Publish step ``step``/``steps`` of image ``image``; True when a cancel was asked (stop now)."""
        def go() -> bool:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(self.key("job", job_id), mapping={"image": image, "step": step, "steps": steps})
            pipe.hget(self.key("job", job_id), "cancel")
            pipe.publish(self.key("progress", job_id), f"{image}:{step}/{steps}")
            return pipe.execute()[1] == b"1"

        return self.call(go)

    def finish(self, job_id: str, state: str, worker: str, *, images: Sequence[bytes] = (), error: str = "",
               error_code: str = "", run_s: float | None = None) -> str:
        """End a job (``done`` / ``failed`` / ``cancelled``) as ``worker``: ``'ok'``, ``'lost_lease'`` (another
        worker holds the job now: nothing written), or ``'already:STATE'`` (it had ended: nothing written)."""
        return self.call(lambda: self._finish_call(job_id, state, worker, images=images, error=error,
                                                   error_code=error_code, run_s=run_s))

    def _finish_call(self, job_id: str, state: str, worker: str, *, images: Sequence[bytes] = (), error: str = "",
                     error_code: str = "", run_s: float | None = None) -> str:
        keys = [self.key("job", job_id), self.key("lease", job_id), self.key("result", job_id), self.key("queued"),
                self.key("running"), self.key("finished", "")]
        args = [job_id, state, worker, repr(time.time()), error, error_code,
                "" if run_s is None else repr(run_s), self.key("inflight", ""), *images]
        return self._finish(keys=keys, args=args).decode()

    def counts(self) -> dict[str, int]:
        """Jobs queued and running now, and jobs that ended, by final state (since Redis started)."""
        def go() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.scard(self.key("queued"))
            pipe.scard(self.key("running"))
            for state in sorted(FINAL_STATES):
                pipe.get(self.key("finished", state))
            return pipe.execute()

        queued, running, *ended = self.call(go)
        return {"queued": queued, "running": running,
                **{s: int(v or 0) for s, v in zip(sorted(FINAL_STATES), ended)}}

    # -- rate limits -------------------------------------------------------------------------------------------
    def rate_wait(self, identity: str, rate_per_min: float, burst: int) -> float:
        """Take a token from ``identity``'s bucket: 0.0, or the seconds until one is there. Shared by every API
        process on this Redis; a bucket's key expires once it would be full again, so state stays bounded."""
        return float(self.call(lambda: self._rate(keys=[self.key("rl", identity)],
                                                  args=[rate_per_min / 60, burst, repr(time.time())])))

    # -- workers -----------------------------------------------------------------------------------------------
    def register_model(self, served: ServedModel) -> None:
        self.call(lambda: self.redis.hset(self.key("model"), mapping={k: str(v) for k, v in asdict(served).items()}))

    def served_model(self) -> ServedModel | None:
        raw = self.call(lambda: self.redis.hgetall(self.key("model")))
        if not raw:
            return None
        h = {k.decode(): v.decode() for k, v in raw.items()}
        return ServedModel(h["model"], int(h["native"]), int(h["default_steps"]), int(h["multiple"]),
                           int(h["max_side"]), h.get("precision", "bf16"), float(h.get("guidance_scale", 4.5)))

    def heartbeat(self, name: str, info: dict[str, Any]) -> None:
        key = self.key("worker", name)

        def go() -> None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(key, mapping={k: str(v) for k, v in info.items()})
            pipe.pexpire(key, int(WORKER_TTL_S * 1000))
            pipe.execute()

        self.call(go)

    def forget_worker(self, name: str) -> None:
        self.call(lambda: self.redis.delete(self.key("worker", name)))

    def workers(self) -> dict[str, dict[str, str]]:
        """Live workers (registered and heartbeating): name → their last heartbeat's fields."""
        def go() -> dict[str, dict[str, str]]:
            names = [k.decode().removeprefix(PREFIX + "worker:") for k in self.redis.scan_iter(self.key("worker", "*"))]
            pipe = self.redis.pipeline(transaction=False)
            for n in names:
                pipe.hgetall(self.key("worker", n))
            return {n: {k.decode(): v.decode() for k, v in raw.items()}
                    for n, raw in zip(names, pipe.execute()) if raw}

        return self.call(go)

    def record_run(self, worker: str, *, images: int, run_s: float, queue_wait_s: float | None) -> None:
        """Add one finished job to the worker's counters and to the cluster's histograms."""
        def go() -> None:
            pipe = self.redis.pipeline(transaction=False)
            stats = self.key("workerstats", worker)
            pipe.hincrbyfloat(stats, "busy_seconds", run_s)
            pipe.hincrby(stats, "images", images)
            pipe.hincrby(stats, "jobs", 1)
            pipe.expire(stats, 7 * 24 * 3600)
            for name, value in (("run", run_s), ("queue_wait", queue_wait_s)):
                if value is None:
                    continue
                key = self.key("hist", name)
                for le in HISTOGRAMS[name]:
                    if value <= le:
                        pipe.hincrby(key, repr(float(le)), 1)
                pipe.hincrby(key, "count", 1)
                pipe.hincrbyfloat(key, "sum", value)
            pipe.execute()

        self.call(go)

    def worker_stats(self) -> dict[str, dict[str, float]]:
        def go() -> dict[str, dict[str, float]]:
            names = [k.decode().removeprefix(PREFIX + "workerstats:")
                     for k in self.redis.scan_iter(self.key("workerstats", "*"))]
            pipe = self.redis.pipeline(transaction=False)
            for n in names:
                pipe.hgetall(self.key("workerstats", n))
            return {n: {k.decode(): float(v) for k, v in raw.items()} for n, raw in zip(names, pipe.execute())}

        return self.call(go)

    def histogram(self, name: str) -> tuple[list[tuple[float, int]], int, float]:
        """(cumulative buckets, count, sum) of ``queue_wait`` or ``run``, as the workers recorded them."""
        raw = {k.decode(): v.decode() for k, v in self.call(lambda: self.redis.hgetall(self.key("hist", name))).items()}
        buckets = [(le, int(raw.get(repr(float(le)), 0))) for le in HISTOGRAMS[name]]
        return buckets, int(raw.get("count", 0)), float(raw.get("sum", 0.0))


@functools.lru_cache(maxsize=8)
def job_store(url: str) -> JobStore:
    """One :class:`JobStore` per broker URL per process (its connection pool is shared by every caller)."""
    return JobStore(url)
