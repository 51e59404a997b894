"""API keys and per-key rate limits for ``sd35fp8 serve`` — keys hashed at rest, compared in constant time.

Why hashed: a keys file that leaks (a backup, a screenshot, a ``git add .``) must not hand out working keys.
Each key is stored as ``LABEL sha256:SALT:DIGEST`` where ``DIGEST = sha256(SALT + key)`` and the salt is
random per key. API keys are long random strings (``sk-sd35fp8-`` + 32 random bytes), so one salted
sha256 is enough; slow password hashes (bcrypt, argon2) exist for short human passwords and would cost
tens of milliseconds on *every* request here.

Why constant time: ``==`` on strings stops at the first differing byte, so response times leak how much
of a guess was right. :meth:`KeyStore.identify` hashes the candidate with every stored salt and compares
each digest with :func:`hmac.compare_digest`, never stopping early.

Keys come from a file of hashes (``--keys-file``, written by ``sd35fp8 api-key``) and/or the
``SD35FP8_API_KEYS`` environment variable (comma-separated keys or hash lines, as a secrets manager
injects them; plain keys are hashed at start-up and the plain text is dropped).

Example:
    >>> key = new_api_key()
    >>> store = KeyStore([hash_api_key(key, "alice")])
    >>> store.identify(key), store.identify("sk-wrong")
    ('alice', None)
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Sd35fp8Error

KEY_PREFIX = "sk-sd35fp8-"
HASH_SCHEME = "sha256"


@dataclass(frozen=True)
class KeyHash:
    """One stored key: a label (safe to log, used for rate limits) and its salted digest."""

    label: str
    salt: str
    digest: str

    def line(self) -> str:
        return f"{self.label} {HASH_SCHEME}:{self.salt}:{self.digest}"

    def matches(self, key: str) -> bool:
        candidate = hashlib.sha256(bytes.fromhex(self.salt) + key.encode()).hexdigest()
        return hmac.compare_digest(candidate, self.digest)


def new_api_key() -> str:
    """A fresh random API key (shown once; only its hash is stored)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str, label: str = "default") -> KeyHash:
    if not key or any(c.isspace() for c in key) or "," in key:
        raise Sd35fp8Error("an API key must be non-empty, without spaces or commas",
                           fix="make one with: sd35fp8 api-key --keys-file keys.txt")
    salt = secrets.token_hex(16)
    return KeyHash(label, salt, hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest())


def parse_key_line(line: str, *, source: str = "keys file") -> KeyHash:
    """``LABEL sha256:SALT:DIGEST`` (or just ``sha256:SALT:DIGEST``, labelled by its digest's start)."""
    parts = line.split()
    label, stored = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0] if parts else "")
    scheme, _, rest = stored.partition(":")
    salt, _, digest = rest.partition(":")
    try:
        ok = scheme == HASH_SCHEME and len(digest) == 64 and bytes.fromhex(salt) and bytes.fromhex(digest)
    except ValueError:
        ok = False
    if len(parts) > 2 or not ok:
        raise Sd35fp8Error(f"{source}: a line is not 'LABEL sha256:SALT:DIGEST' (line not shown: it may be a key)",
                           fix="write key hashes with: sd35fp8 api-key --keys-file FILE --label NAME")
    return KeyHash(label or f"key-{digest[:8]}", salt, digest)


class KeyStore:
    """The accepted keys, as hashes. ``identify(key)`` → the key's label, or None (unknown key)."""

    def __init__(self, hashes: list[KeyHash]) -> None:
        self.hashes = list(hashes)

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def load(cls, keys_file: str | Path | None = None, env_value: str | None = None) -> "KeyStore":
        hashes: list[KeyHash] = []
        if keys_file:
            path = Path(keys_file)
            if not path.is_file():
                raise Sd35fp8Error(f"keys file {path} does not exist",
                                   fix=f"create it with: sd35fp8 api-key --keys-file {path}")
            for raw in path.read_text().splitlines():
                if raw.strip() and not raw.lstrip().startswith("#"):
                    hashes.append(parse_key_line(raw, source=str(path)))
        for n, item in enumerate(x.strip() for x in (env_value or "").split(",")):
            if item:  # a hash line as written by `api-key`, or a plain key (hashed here, then forgotten)
                hashes.append(parse_key_line(item, source="SD35FP8_API_KEYS") if f" {HASH_SCHEME}:" in f" {item}"
                              else hash_api_key(item, f"env-{n}"))
        return cls(hashes)

    def identify(self, key: str | None) -> str | None:
        """The label of ``key`` or None. Checks every stored hash (no early exit: constant time per store)."""
        found = None
        for h in self.hashes:
            if h.matches(key or "") and found is None:
                found = h.label
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (None when absent or another scheme)."""
    scheme, _, token = (authorization or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


@dataclass
class TokenBucket:
    """``rate_per_min`` requests a minute on average, bursts up to ``burst``; :meth:`take` → seconds to wait.

    A token bucket rather than a fixed window: a client that paces itself is never refused, and one that
    bursts is told exactly when the next token arrives (the ``Retry-After`` header).
    """

    rate_per_min: float
    burst: int
    tokens: float = field(init=False)
    stamp: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self) -> float:
        """0.0 when a token was taken, else the seconds until one will be there."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate_per_min / 60)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) * 60 / self.rate_per_min


MAX_RATE_IDENTITIES = 10_000
"""Most buckets a :class:`RateLimiter` keeps. Identities are not a closed set — with ``--no-auth`` they are
client addresses, with JWTs every ``sub`` a token issuer ever signed — so without a bound, a client that
varies its identity grows the server's memory without limit."""


class RateLimiter:
    """One :class:`TokenBucket` per identity (thread-safe), at most ``max_identities`` of them.

    ``rate_per_min <= 0`` turns limiting off. The buckets are kept least-recently-used first; a new identity
    beyond the bound evicts the oldest one. That costs nothing in the common case: a bucket unused for
    ``burst * 60 / rate`` seconds has refilled and is the same as a new one. Only a flood of distinct
    identities inside that time could evict a half-empty bucket — giving that identity a fresh burst, a
    bounded leniency instead of unbounded memory. (With ``--broker``, buckets live in Redis and expire there
    once full: :meth:`~sd35fp8_helpers.serving.jobstore.JobStore.rate_wait`.)

    Example:
        >>> limiter = RateLimiter(60, burst=1, max_identities=2)
        >>> [limiter.retry_after(who) for who in ("a", "a", "b", "c")], len(limiter)
        ([0, 1, 0, 0], 2)
    """

    def __init__(self, rate_per_min: float, burst: int | None = None, *,
                 max_identities: int = MAX_RATE_IDENTITIES) -> None:
        self.rate_per_min = rate_per_min
        self.burst = burst or max(1, math.ceil(rate_per_min))
        self.max_identities = max_identities
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def retry_after(self, label: str) -> int:
        """0 when ``label`` may go ahead now (a token is taken), else whole seconds to wait (>= 1)."""
        if self.rate_per_min <= 0:
            return 0
        with self._lock:
            bucket = self._buckets.get(label)
            if bucket is None:
                bucket = self._buckets[label] = TokenBucket(self.rate_per_min, self.burst)
                while len(self._buckets) > self.max_identities:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(label)
            wait = bucket.take()
        return 0 if wait == 0 else max(1, math.ceil(wait))


class Authenticator:
    """Bearer token → identity: an API key's label, or ``jwt:SUB`` for a JWT (when the server verifies JWTs).

    Raises :class:`~sd35fp8_helpers.serving.jwt_auth.TokenRejected` with the reason a JWT failed; an unknown
    or missing key gets one message whatever was wrong (a guesser learns nothing).
    """

    MISSING = "missing or invalid API key: send 'Authorization: Bearer YOUR_KEY'"

    def __init__(self, keys: KeyStore, jwt=None) -> None:
        self.keys = keys
        self.jwt = jwt  # a JwtVerifier, or None

    def identify(self, authorization: str | None) -> str:
        from .jwt_auth import TokenRejected, looks_like_jwt

        token = bearer_token(authorization)
        if self.jwt is not None and looks_like_jwt(token):
            return self.jwt.identify(token)
        label = self.keys.identify(token)
        if label is None:
            raise TokenRejected(self.MISSING)
        return label
