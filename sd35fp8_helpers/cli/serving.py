"""``serve`` and ``api-key``: the images API for a team, and the keys it accepts (hashed at rest)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..constants import DEFAULT_MODEL
from ..errors import Sd35fp8Error
from ..serving.config import (
    DEFAULT_PORT,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_RATE_PER_MIN,
    DEFAULT_TIMEOUT_S,
)
from ..vocabulary import PRECISIONS


def serve_arguments(p) -> None:
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
    p.add_argument("--memory-strategy", default=None, help="a strategy from `sd35fp8_helpers.memory.strategies` "
                                                           "(e.g. fp8_model_offload)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--log-prompts", action="store_true", help="write prompts into the logs (off: privacy)")


def serve(args) -> int:
    from ..constants import settings
    from ..serving.app import run_server
    from ..serving.auth import KeyStore
    from ..serving.config import ServeConfig

    config = ServeConfig(model=args.model, precision=args.precision, memory_strategy=args.memory_strategy,
                         device=args.device, queue_size=args.queue_size, rate_per_min=args.rate, burst=args.burst,
                         timeout_s=args.timeout, log_prompts=args.log_prompts, require_auth=not args.no_auth)
    keys = KeyStore.load(args.keys_file, settings().api_keys)
    if config.require_auth and not len(keys):
        raise Sd35fp8Error("no API keys configured, so every request would be refused",
                           fix="sd35fp8 api-key --keys-file keys.txt, then serve --keys-file keys.txt "
                               "(or set SD35FP8_API_KEYS, or pass --no-auth for a local experiment)")
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
