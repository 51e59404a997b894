"""``serve``, ``api-key``, ``worker`` and ``batch``: the images API for a team, the keys it accepts (hashed at
rest), the GPU workers behind its Redis queue, and prompt files fanned out over them."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from ..constants import DEFAULT_MODEL
from ..errors import Sd35fp8Error
from ..serving.config import (
    DEFAULT_BROKER_QUEUE_SIZE,
    DEFAULT_PORT,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_RATE_PER_MIN,
    DEFAULT_TIMEOUT_S,
)
from ..serving.jobstore import DEFAULT_LEASE_S, DEFAULT_RESULT_TTL_S
from ..serving.queue import DEFAULT_VISIBILITY_TIMEOUT_S
from ..vocabulary import PRECISIONS


def serve_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="tiny, a diffusers folder, or a hub repo id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--keys-file", default=None, help="file of API key hashes (write one with `sd35fp8 api-key`); "
                                                     "SD35FP8_API_KEYS adds more")
    p.add_argument("--no-auth", action="store_true", help="accept requests without a key (local experiments only)")
    p.add_argument("--queue-size", type=int, default=None,
                   help=f"requests allowed to wait (default {DEFAULT_QUEUE_SIZE}; with --broker {DEFAULT_BROKER_QUEUE_SIZE})")
    p.add_argument("--max-in-flight", type=int, default=None,
                   help="jobs one key may have queued or running (default: half the queue)")
    p.add_argument("--broker", default=None, help="Redis URL of the job queue (redis://HOST:PORT/0): jobs go to "
                                                 "`sd35fp8 worker` processes; default $SD35FP8_BROKER_URL, else "
                                                 "in-process")
    p.add_argument("--result-ttl", type=int, default=DEFAULT_RESULT_TTL_S,
                   help="seconds a finished job's images stay readable (with --broker)")
    p.add_argument("--jwt-secret-file", default=None, help="accept JWT bearer tokens signed HS256 with this secret "
                                                          "(or set SD35FP8_JWT_SECRET)")
    p.add_argument("--jwt-public-key", default=None, help="accept JWT bearer tokens signed RS256 (PEM public key)")
    p.add_argument("--jwt-audience", default=None, help="required 'aud' of JWTs")
    p.add_argument("--jwt-issuer", default=None, help="required 'iss' of JWTs")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE_PER_MIN, help="requests per minute per key (0: off)")
    p.add_argument("--burst", type=int, default=None, help="requests a key may send at once (default: --rate)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds before a request is cancelled")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    p.add_argument("--memory-strategy", default=None, help="a strategy from `sd35fp8_helpers.memory.strategies` "
                                                           "(e.g. fp8_model_offload)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--log-prompts", action="store_true", help="write prompts into the logs (off: privacy)")


def serve(args) -> int:
    from ..constants import settings
    from ..serving.app import run_server
    from ..serving.auth import KeyStore
    from ..serving.config import ServeConfig
    from ..serving.jwt_auth import JwtConfig

    env = settings()
    broker = args.broker or env.broker_url or None
    queue_size = args.queue_size if args.queue_size is not None else (
        DEFAULT_BROKER_QUEUE_SIZE if broker else DEFAULT_QUEUE_SIZE)
    jwt = JwtConfig.from_files(args.jwt_secret_file, args.jwt_public_key, env.jwt_secret,
                               audience=args.jwt_audience, issuer=args.jwt_issuer)
    config = ServeConfig(model=args.model, precision=args.precision, memory_strategy=args.memory_strategy,
                         device=args.device, queue_size=queue_size, rate_per_min=args.rate, burst=args.burst,
                         timeout_s=args.timeout, log_prompts=args.log_prompts, require_auth=not args.no_auth,
                         max_in_flight=args.max_in_flight, broker=broker, result_ttl_s=args.result_ttl, jwt=jwt)
    keys = KeyStore.load(args.keys_file, env.api_keys)
    if config.require_auth and not len(keys) and jwt is None:
        raise Sd35fp8Error("no API keys configured, so every request would be refused",
                           fix="sd35fp8 api-key --keys-file keys.txt, then serve --keys-file keys.txt "
                               "(or set SD35FP8_API_KEYS, or --jwt-secret-file, or pass --no-auth for a local "
                               "experiment)")
    if broker:
        from ..serving.jobstore import JobStore

        JobStore(broker).ping()  # an unreachable Redis fails here, in one line (later: 503 per request)
    else:
        from ..pipeline.loading import resolve_model

        resolve_model(config.model)  # a wrong name fails here, in one line, before the server starts
    return run_server(config, keys, args.host, args.port)


def api_key_arguments(p) -> None:
    p.add_argument("--keys-file", default=None, help="append the key's hash here (created with mode 600)")
    p.add_argument("--label", default="default", help="name for the key (shown in logs and used for rate limits)")


def api_key(args) -> int:
    from ..serving.auth import hash_api_key, new_api_key

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


def worker_arguments(p) -> None:
    p.add_argument("--broker", default=None, help="Redis URL of the job queue, e.g. redis://127.0.0.1:6379/0 "
                                                 "(default $SD35FP8_BROKER_URL)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="tiny, a diffusers folder, or a hub repo id")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    p.add_argument("--memory-strategy", default=None, help="a strategy from `sd35fp8_helpers.memory.strategies`")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    where.add_argument("--gpus", default=None, help="one worker process per GPU: all, a count (2) or indices (0,1)")
    p.add_argument("--name", default=None, help="worker name in metrics, logs and manifests (default HOST-PID)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU workers: cores / workers)")
    p.add_argument("--lease", type=float, default=DEFAULT_LEASE_S,
                   help="seconds a running job is held without a heartbeat before another worker may take it")
    p.add_argument("--visibility-timeout", type=float, default=DEFAULT_VISIBILITY_TIMEOUT_S,
                   help="seconds before an unacknowledged job (its worker died) goes back on the queue")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve this worker's Prometheus metrics here (with --gpus: PORT, PORT+1, … per GPU)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")
    p.add_argument("--no-warmup", action="store_true", help="take jobs without a warm-up generation first")
    p.add_argument("--log-prompts", action="store_true", help="write prompts into the logs (off: privacy)")


def worker(args) -> int:
    from ..constants import settings
    from ..serving.logs import configure_logging
    from ..serving.worker import QueueWorker, WorkerConfig, run_per_gpu, visible_gpus

    broker = args.broker or settings().broker_url
    if not broker:
        raise Sd35fp8Error("no job queue given", fix="pass --broker redis://HOST:PORT/0 (or set SD35FP8_BROKER_URL)")
    config = WorkerConfig(broker=broker, model=args.model, precision=args.precision,
                          memory_strategy=args.memory_strategy, device=args.device, name=args.name,
                          lease_s=args.lease, visibility_timeout_s=args.visibility_timeout, threads=args.threads,
                          metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                          warmup=not args.no_warmup, log_prompts=args.log_prompts)
    configure_logging()
    if args.gpus:
        gpus = visible_gpus(args.gpus)
        forwarded = [a for a in _argv_without(sys.argv[2:], ("--gpus", "--name", "--metrics-port"))]
        return run_per_gpu(forwarded, gpus, args.name or socket.gethostname(), args.metrics_port)
    from ..pipeline.loading import resolve_model

    resolve_model(config.model)  # a wrong name fails in one line, before loading
    w = QueueWorker(config)
    w.prepare()
    return w.serve()


def _argv_without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` minus ``options`` and their values (``--gpus all`` and ``--gpus=all`` alike)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in options:
            skip = True
            continue
        if a.split("=", 1)[0] in options:
            continue
        out.append(a)
    return out


def batch_arguments(p) -> None:
    p.add_argument("prompts", help="a .txt file (one prompt per line) or .jsonl ({\"prompt\": …, \"seed\": …})")
    p.add_argument("--broker", default=None, help="Redis URL of the job queue (default $SD35FP8_BROKER_URL)")
    p.add_argument("--out", required=True, help="folder for the PNGs and manifest.jsonl")
    p.add_argument("--seed", type=int, default=0, help="seed of the first line without one (then +1 per line)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's native size)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--timeout", type=float, default=None, help="stop waiting after this many seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def batch(args) -> int:
    from ..constants import settings
    from ..serving.batch import run_batch

    broker = args.broker or settings().broker_url
    if not broker:
        raise Sd35fp8Error("no job queue given", fix="pass --broker redis://HOST:PORT/0 (or set SD35FP8_BROKER_URL)")
    summary = run_batch(args.prompts, broker, args.out, seed=args.seed, steps=args.steps, size=args.size,
                        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                        timeout_s=args.timeout, progress=not args.no_progress)
    for line, message in summary.failed:
        print(f"sd35fp8 batch: line {line}: {message}", file=sys.stderr)
    print(summary.line())
    return 0 if summary.ok else 1
