"""JSON-line logs with a request id; never a key, never a prompt unless asked.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import traceback
from typing import Any

log = logging.getLogger("sd35fp8.serve")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")



# --- logging -------------------------------------------------------------------------------------------------

class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, event, request id and the event's fields (never headers)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                "event": getattr(record, "event", None) or record.getMessage(),
                "request_id": request_id_var.get(), **getattr(record, "fields", {})}
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


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, event, extra={"event": event, "fields": {k: v for k, v in fields.items() if v is not None}})


