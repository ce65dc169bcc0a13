"""Conversions between protobuf well-known types and plain Python values,
shared by every service; no rules beyond what the types themselves need, no I/O.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from pulse.device.v1 import filter_pb2

from server import filters
from server.errors import FieldViolation, InvalidArgument
from server.validation import DOCUMENT_MAX_DEPTH, check_timestamp

# Integral doubles up to here convert to int exactly.
_EXACT_INT = 2**53


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """As Timestamp.FromDatetime (naive means UTC), in a quarter of its time:
    every answer carries several."""
    if value is None:
        return None
    since = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000
    )


def struct(doc: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(doc)
    return out


def value(item: Any) -> struct_pb2.Value:
    """A JSON value as a protobuf Value."""
    out = struct_pb2.Value()
    if item is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(item, bool):
        out.bool_value = item
    elif isinstance(item, int | float):
        out.number_value = item
    elif isinstance(item, str):
        out.string_value = item
    elif isinstance(item, dict):
        out.struct_value.update(item)
    elif isinstance(item, list):
        out.list_value.extend(item)
    else:
        raise TypeError(f"not a JSON value: {type(item).__name__}")
    return out


class _Bad(Exception):
    pass


def struct_to_dict(
    field: str, message: struct_pb2.Struct, *, max_depth: int = DOCUMENT_MAX_DEPTH
) -> dict[str, Any]:
    """A Struct as plain JSON values.

    Struct keeps every number as a double; integral values within 2**53 come
    back as int, so a device is sent `21`, not `21.0`, for what an operator
    typed as 21. Conversion stops with InvalidArgument naming `field` past
    `max_depth` containers, so a hostile message cannot make it recurse
    deeply; what jsonb cannot hold (NaN, NUL, ...) is left to
    `validation.check_document`, which every caller runs on the result.
    """
    try:
        return _from_struct(message, 1, max_depth)
    except _Bad as bad:
        raise InvalidArgument.single(field, str(bad)) from None


def _from_struct(message: struct_pb2.Struct, depth: int, max_depth: int) -> dict[str, Any]:
    if depth > max_depth:
        raise _Bad(f"is nested deeper than {max_depth} levels")
    return {key: _from_value(item, depth, max_depth) for key, item in message.fields.items()}


def _from_value(item: struct_pb2.Value, depth: int, max_depth: int) -> Any:
    kind = item.WhichOneof("kind")
    if kind == "number_value":
        number = item.number_value
        if number.is_integer() and abs(number) <= _EXACT_INT:
            return int(number)
        return number
    if kind == "string_value":
        return item.string_value
    if kind == "bool_value":
        return item.bool_value
    if kind == "struct_value":
        return _from_struct(item.struct_value, depth + 1, max_depth)
    if kind == "list_value":
        if depth + 1 > max_depth:
            raise _Bad(f"is nested deeper than {max_depth} levels")
        return [_from_value(v, depth + 1, max_depth) for v in item.list_value.values]
    # null_value, or a Value with no kind set (proto3 JSON reads it as null).
    return None


def parse_request_filter(
    message: filter_pb2.DeviceFilter, *, field: str, out: list[FieldViolation]
) -> filters.DeviceFilter | None:
    """The parsed filter, or None after adding its violations to `out`.

    The message goes through its protobuf-JSON form, the form parse_filter
    defines, so gRPC and HTTP callers meet the same rules and field paths.
    """
    before = len(out)
    for name in ("last_seen_after", "last_seen_before"):
        if message.HasField(name):
            check_timestamp(f"{field}.{name}", getattr(message, name), out)
    # protobuf's JSON printer refuses NaN and infinities in a Value.
    for i, condition in enumerate(message.twin_conditions):
        for j, item in enumerate(condition.values):
            if item.WhichOneof("kind") == "number_value" and not math.isfinite(item.number_value):
                out.append(
                    FieldViolation(
                        f"{field}.twin_conditions[{i}].values[{j}]", "must be a finite number"
                    )
                )
    if len(out) > before:
        return None
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    try:
        return filters.parse_filter(data, field_prefix=field)
    except filters.FilterError as e:
        out.extend(FieldViolation(v.field, v.description) for v in e.violations)
        return None


def filter_message(canonical: dict[str, object]) -> filter_pb2.DeviceFilter:
    """A stored (canonical JSON) filter as a DeviceFilter message."""
    return json_format.ParseDict(canonical, filter_pb2.DeviceFilter())
