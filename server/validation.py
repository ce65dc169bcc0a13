"""Input rules shared by every service: ids, names, tags, JSON documents
(size, depth, and what jsonb can hold), timestamps. Each check appends field
violations, so one answer lists everything wrong with a request."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from google.protobuf import timestamp_pb2

from server.errors import FieldViolation, InvalidArgument

ID_MAX = 128
NAME_MAX = 256
MODEL_MAX = 128
TAGS_MAX = 64
TAG_KEY_MAX = 128
TAG_VALUE_MAX = 256
METADATA_MAX_BYTES = 16 * 1024
#: Containers (objects and arrays) a stored JSON document may nest.
DOCUMENT_MAX_DEPTH = 10

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ID_RULE = (
    f"1 to {ID_MAX} characters: letters, digits, '.', '_', ':' or '-', "
    "starting with a letter or digit"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TAG_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


def check_id(field: str, value: str, out: list[FieldViolation]) -> None:
    if not value:
        out.append(FieldViolation(field, f"is required ({ID_RULE})"))
    elif len(value) > ID_MAX:
        out.append(FieldViolation(field, f"is {len(value)} characters; at most {ID_MAX}"))
    elif not ID_PATTERN.fullmatch(value):
        out.append(FieldViolation(field, f"{value[:40]!r} is not a valid id ({ID_RULE})"))


def raise_if(violations: list[FieldViolation]) -> None:
    """INVALID_ARGUMENT listing every violation, if there are any."""
    if violations:
        raise InvalidArgument(violations)


def require_id(field: str, value: str) -> str:
    """`value` if it is a valid id, else INVALID_ARGUMENT naming `field`."""
    out: list[FieldViolation] = []
    check_id(field, value, out)
    raise_if(out)
    return value


def check_text(field: str, value: str, limit: int, out: list[FieldViolation]) -> None:
    if len(value) > limit:
        out.append(FieldViolation(field, f"is {len(value)} characters; at most {limit}"))
    elif _CONTROL.search(value):
        out.append(FieldViolation(field, "must not contain control characters"))


def check_tags(field: str, tags: Mapping[str, str], out: list[FieldViolation]) -> None:
    if len(tags) > TAGS_MAX:
        out.append(FieldViolation(field, f"has {len(tags)} entries; at most {TAGS_MAX}"))
        return
    for key, value in tags.items():
        if not TAG_KEY_PATTERN.fullmatch(key):
            out.append(
                FieldViolation(
                    f"{field}[{key[:40]!r}]",
                    f"tag keys are 1 to {TAG_KEY_MAX} characters: letters, digits, "
                    "'.', '_', '/' or '-', starting with a letter or digit",
                )
            )
        check_text(f"{field}[{key[:40]!r}]", value, TAG_VALUE_MAX, out)


# Why a JSON document was refused; the evaluator counts rejections by these.
TOO_LARGE = "too_large"
TOO_DEEP = "too_deep"
INVALID_VALUE = "invalid_value"

_NOT_FINITE = "numbers must be finite (JSON has no NaN or Infinity)"


class DocumentProblem(NamedTuple):
    reason: str
    description: str


class _Bad(Exception):
    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.problem = DocumentProblem(reason, description)


def document_problem(
    doc: Mapping[str, Any], *, max_bytes: int, max_depth: int = DOCUMENT_MAX_DEPTH
) -> tuple[str, None] | tuple[None, DocumentProblem]:
    """Either the compact JSON text of `doc` or why it cannot be stored.

    A stored document must fit PostgreSQL jsonb: no NUL characters and no
    unpaired surrogates in strings or keys (jsonb refuses both, and one such
    value would fail a whole batch), and only finite numbers (JSON has no NaN
    or Infinity). The size is measured as compact, ASCII-escaped JSON, so it
    is the same count in characters and bytes.
    """
    try:
        _walk(doc, 0, max_depth)
    except _Bad as bad:
        return None, bad.problem
    text = json.dumps(doc, separators=(",", ":"))
    if len(text) > max_bytes:
        return None, DocumentProblem(
            TOO_LARGE, f"is {len(text)} bytes as JSON; at most {max_bytes}"
        )
    return text, None


def check_document(
    field: str,
    doc: Mapping[str, Any],
    max_bytes: int,
    out: list[FieldViolation],
    *,
    max_depth: int = DOCUMENT_MAX_DEPTH,
) -> None:
    """Append a violation for `doc` if it cannot be stored as a JSON document."""
    _, problem = document_problem(doc, max_bytes=max_bytes, max_depth=max_depth)
    if problem is not None:
        out.append(FieldViolation(field, problem.description))


def _string_problem(value: str) -> str | None:
    """Why `value` cannot be stored as jsonb or text, or None."""
    if "\x00" in value:
        return "strings and keys must not contain NUL characters"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "strings and keys must be valid Unicode (no lone surrogates)"
    return None


def _walk(value: Any, depth: int, max_depth: int) -> None:
    """Raise _Bad for values jsonb cannot hold or nesting over `max_depth`;
    `depth` is the number of containers around `value`. It stops at the
    limit, so a hostile document cannot make it recurse deeply."""
    kind = type(value)
    if kind is dict or kind is list:
        if depth >= max_depth:
            raise _Bad(TOO_DEEP, f"is nested deeper than {max_depth} levels")
        if kind is dict:
            for key, item in value.items():
                _walk_string(key)
                _walk(item, depth + 1, max_depth)
        else:
            for item in value:
                _walk(item, depth + 1, max_depth)
    elif kind is str:
        _walk_string(value)
    elif kind is float and not math.isfinite(value):
        raise _Bad(INVALID_VALUE, _NOT_FINITE)


def _walk_string(value: str) -> None:
    problem = _string_problem(value)
    if problem is not None:
        raise _Bad(INVALID_VALUE, problem)


# Timestamps a caller may send: what protobuf's Timestamp and PostgreSQL's
# timestamptz can both hold, 0001-01-01 to 9999-12-31.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def check_timestamp(field: str, ts: timestamp_pb2.Timestamp, out: list[FieldViolation]) -> None:
    if not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS:
        out.append(
            FieldViolation(
                f"{field}.seconds",
                f"{ts.seconds} is outside 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z",
            )
        )
    if not 0 <= ts.nanos <= 999_999_999:
        out.append(FieldViolation(f"{field}.nanos", f"{ts.nanos} is outside 0 .. 999999999"))


#: How far ahead a credential's expiry may be set.
EXPIRY_MAX_S = 10 * 366 * 86_400


def check_expiry(field: str, ts: timestamp_pb2.Timestamp, out: list[FieldViolation]) -> None:
    """An expiry: a valid timestamp, in the future, at most 10 years ahead."""
    before = len(out)
    check_timestamp(field, ts, out)
    if len(out) > before:
        return
    now = time.time()
    if ts.seconds <= now:
        out.append(FieldViolation(field, "must be in the future"))
    elif ts.seconds > now + EXPIRY_MAX_S:
        out.append(FieldViolation(field, "must be at most 10 years from now"))
