"""Settings of ``sd35fp8 serve`` in one place: the named limits and :class:`ServeConfig`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..constants import DEFAULT_MODEL
from ..errors import Sd35fp8Error
from .engine import check_precision
from .jobstore import DEFAULT_RESULT_TTL_S
from .jwt_auth import JwtConfig

# --- named limits and defaults --------------------------------------------------------------------------
MAX_IMAGES = 4
"""Largest ``n`` per request: each image is a full generation, so n multiplies the time a request holds the GPU."""
MAX_PROMPT_CHARS = 2000
"""Longer prompts are refused. CLIP reads 77 tokens and T5 256 (diffusers' default), so more text only costs."""
MAX_STEPS = 100
"""An upper bound on ``steps``: without one, a single request could hold the worker for hours."""
MAX_BODY_BYTES = 64 * 1024
"""A request body past this is refused with 413 as soon as that many bytes arrived (a valid request is < 3 KB)."""
DEFAULT_QUEUE_SIZE = 8
DEFAULT_BROKER_QUEUE_SIZE = 1000
"""With ``--broker`` the waiting jobs are in Redis (a few hundred bytes each), shared by every worker."""
DEFAULT_RATE_PER_MIN = 60.0
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_PORT = 8000
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
POLL_S = 0.1  # how often a waiting request checks for a client disconnect or its deadline
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # accepted from clients; anything else is replaced
SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
IMAGES_ROUTE = "/v1/images/generations"
JOBS_ROUTE = "/v1/images/jobs"

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
    max_in_flight: int | None = None
    broker: str | None = field(default=None, repr=False)  # may hold a password
    result_ttl_s: int = DEFAULT_RESULT_TTL_S
    jwt: JwtConfig | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.queue_size < 1:
            raise Sd35fp8Error(f"--queue-size {self.queue_size} must be >= 1",
                               fix="use the number of requests allowed to wait, e.g. --queue-size 8")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise Sd35fp8Error(f"--max-in-flight {self.max_in_flight} must be >= 1",
                               fix="the number of jobs one key may have queued or running, e.g. --max-in-flight 4")
        if self.result_ttl_s < 1:
            raise Sd35fp8Error(f"--result-ttl {self.result_ttl_s} must be >= 1 second", fix="e.g. --result-ttl 3600")
        if self.broker is not None and not self.broker.startswith(("redis://", "rediss://", "unix://")):
            from .jobstore import redact_url

            raise Sd35fp8Error(f"--broker {redact_url(self.broker)!r} is not a Redis URL",
                               fix="use redis://HOST:PORT/0 (e.g. redis://127.0.0.1:6379/0)")
        if self.timeout_s <= 0:
            raise Sd35fp8Error(f"--timeout {self.timeout_s} must be > 0 seconds", fix="e.g. --timeout 300")
        if self.memory_strategy:
            from ..memory.strategies import get_strategy

            get_strategy(self.memory_strategy)  # raises InvalidPlanInput naming the valid ones

    @property
    def in_flight_cap(self) -> int:
        """Jobs one identity may have queued or running: ``--max-in-flight``, else half the queue (at least 1),
        so that one key can never fill the whole queue and lock every other user out."""
        return self.max_in_flight or max(1, math.ceil(self.queue_size / 2))


