"""What a twin document may hold, checked the same way for gRPC writes and
MQTT reports, before anything reaches the database.

Beyond the size and depth limits (`server.validation.check_document`), a
document must be storable as PostgreSQL jsonb: no NUL characters and no
unpaired surrogates in strings or keys (jsonb refuses both, and one such
value would fail a whole ingest batch), and only finite numbers (JSON has no
NaN or Infinity).
"""

from __future__ import annotations

import json
import math
from typing import Any

from google.protobuf import struct_pb2

from server import validation
from server.errors import FieldViolation, InvalidArgument

MAX_BYTES = 32 * 1024
MAX_DEPTH = validation.METADATA_MAX_DEPTH
# Integral doubles up to here convert to int exactly.
_EXACT_INT = 2**53


# Why a document was refused; the evaluator counts rejections by these.
TOO_LARGE = "too_large"
TOO_DEEP = "too_deep"
INVALID_VALUE = "invalid_value"


class _Bad(Exception):
    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description


_NOT_FINITE = "numbers must be finite (JSON has no NaN or Infinity)"


def check(field: str, doc: dict[str, Any], out: list[FieldViolation]) -> None:
    """Append a violation for `doc` if it cannot be stored as a twin document."""
    before = len(out)
    validation.check_document(field, doc, MAX_BYTES, out)
    if len(out) > before:
        return
    try:
        _walk(doc, 0)
    except _Bad as bad:
        out.append(FieldViolation(field, bad.description))


def checked(field: str, doc: dict[str, Any]) -> dict[str, Any]:
    """`doc`, or InvalidArgument naming `field`."""
    out: list[FieldViolation] = []
    check(field, doc, out)
    if out:
        raise InvalidArgument(out)
    return doc


def inspect(doc: dict[str, Any]) -> tuple[str, None] | tuple[None, tuple[str, str]]:
    """For the ingest path: the same rules as `check` in one walk, giving
    either the compact JSON text to store or (reason, description).

    The size is measured as `check_document` measures it (compact JSON,
    ASCII-escaped, in bytes), so both paths accept exactly the same documents.
    """
    try:
        _walk(doc, 0)
    except _Bad as bad:
        return None, (bad.reason, bad.description)
    text = json.dumps(doc, separators=(",", ":"))
    # ensure_ascii (the default) makes characters and bytes the same count.
    if len(text) > MAX_BYTES:
        return None, (TOO_LARGE, f"is {len(text)} bytes as JSON; at most {MAX_BYTES}")
    return text, None


def _check_string(value: str) -> None:
    if "\x00" in value:
        raise _Bad(INVALID_VALUE, "strings and keys must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Bad(
                INVALID_VALUE, "strings and keys must be valid Unicode (no lone surrogates)"
            ) from None


def _walk(value: Any, depth: int) -> None:
    """Raise _Bad for values jsonb cannot hold or nesting over MAX_DEPTH;
    `depth` is the number of containers around `value`. It stops at the
    limit, so a hostile document cannot make it recurse deeply."""
    kind = type(value)
    if kind is dict or kind is list:
        if depth >= MAX_DEPTH:
            raise _Bad(TOO_DEEP, f"is nested deeper than {MAX_DEPTH} levels")
        if kind is dict:
            for key, item in value.items():
                _check_string(key)
                _walk(item, depth + 1)
        else:
            for item in value:
                _walk(item, depth + 1)
    elif kind is str:
        _check_string(value)
    elif kind is float and not math.isfinite(value):
        raise _Bad(INVALID_VALUE, _NOT_FINITE)


def from_struct(field: str, struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON values, checked as a twin document."""
    return checked(field, convert_struct(field, struct))


def convert_struct(field: str, struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON values, not yet checked against the limits.

    Struct keeps every number as a double; integral values within 2**53 come
    back as int, so a device is sent `21`, not `21.0`, for what an operator
    typed as 21. Raises InvalidArgument for what JSON cannot hold (NaN,
    Infinity) and stops converting below the depth limit.
    """
    try:
        return _from_struct(struct, 0)
    except _Bad as bad:
        raise InvalidArgument.single(field, bad.description) from None


def _from_struct(struct: struct_pb2.Struct, depth: int) -> dict[str, Any]:
    return {key: _from_value(value, depth + 1) for key, value in struct.fields.items()}


def _from_value(value: struct_pb2.Value, depth: int) -> Any:
    if depth > MAX_DEPTH:
        # Deeper than allowed anyway; stop before converting the rest.
        raise _Bad(TOO_DEEP, f"is nested deeper than {MAX_DEPTH} levels")
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise _Bad(INVALID_VALUE, _NOT_FINITE)
        if number.is_integer() and abs(number) <= _EXACT_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _from_struct(value.struct_value, depth)
    if kind == "list_value":
        return [_from_value(item, depth + 1) for item in value.list_value.values]
    # null_value, or a Value with no kind set (proto3 JSON reads it as null).
    return None
