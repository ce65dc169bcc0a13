"""Log output: key=value text for people (the default) or one JSON object
per line (PULSE_LOG_FORMAT=json) for a log pipeline.

Every line written while a call is served carries its request id (the
caller's x-request-id, or one made up), so one call's lines can be found
together, and with tracing on its trace and span ids. Fields passed as
`extra=` become key=value pairs or JSON members.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from server.observability import tracing

FORMATS = ("text", "json")

#: The request id of the call the current task serves.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STANDARD = frozenset(RESERVED_ATTRS) | {"taskName", "request_id"}


class _CallIdsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        ids = tracing.current_ids()
        if ids is not None:
            record.trace_id, record.span_id = ids
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`, the request id last."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _extras(record)
        rid = getattr(record, "request_id", None)
        if rid:
            fields["request_id"] = rid
        if not fields:
            return line
        head, newline, rest = line.partition("\n")
        pairs = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        return f"{head} {pairs}{newline}{rest}"


def _text(value: Any) -> str:
    text = str(value)
    return repr(text) if not text or any(c in text for c in ' ="\n') else text


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s %(request_id)s",
        rename_fields={"levelname": "level", "name": "logger"},
        # ISO 8601 in UTC, first.
        timestamp="time",
    )


def configure(level: str, fmt: str = "text") -> None:
    """Send the root logger's records to stderr in `fmt` ("text" or "json")."""
    if fmt not in FORMATS:
        raise ValueError(f"PULSE_LOG_FORMAT must be text or json (got {fmt!r})")
    handler = logging.StreamHandler()
    handler.setFormatter(json_formatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_CallIdsFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
