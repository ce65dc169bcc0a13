"""The two log formats, line by line."""

from __future__ import annotations

import json
import logging
import sys

from server.observability import logs


def record(message: str, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("pulse.rpc", logging.INFO, __file__, 1, message, (), None)
    made.__dict__.update(extra)
    return made


def test_text_lines_end_with_their_fields_quoted_where_needed() -> None:
    line = logs.TextFormatter().format(
        record("call", code="OK", caller="alice smith", empty="", request_id="r-1")
    )
    assert line.endswith(
        " INFO pulse.rpc: call code=OK caller='alice smith' empty='' request_id=r-1"
    )


def test_a_traceback_stays_below_the_line_with_the_fields() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord(
            "pulse", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    failed.__dict__["code"] = "INTERNAL"
    head, *rest = logs.TextFormatter().format(failed).splitlines()
    assert head.endswith("failed code=INTERNAL")
    assert rest[-1] == "ValueError: boom"


def test_json_lines_are_one_object_with_the_fields() -> None:
    line = logs.json_formatter().format(record("call", code="NOT_FOUND", duration_ms=1.5))
    event = json.loads(line)
    assert event["message"] == "call"
    assert event["level"] == "INFO"
    assert event["logger"] == "pulse.rpc"
    assert event["code"] == "NOT_FOUND"
    assert event["duration_ms"] == 1.5
    assert event["time"].endswith("+00:00")
