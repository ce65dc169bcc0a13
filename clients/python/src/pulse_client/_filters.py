"""Typed builders for ``DeviceFilter`` messages, twin conditions included.

    from pulse_client import desired, key, reported, where

    f = where(
        reported("fw.version") < "2.4",
        reported(key("net", "wlan.0")).eq("up"),   # a key that contains a dot
        desired("fw.target").exists(),
        statuses=["ONLINE"],
        sync_statuses=["PENDING", "STALE"],
    )

``reported(path)`` and ``desired(path)`` name a value inside one of the twin's
documents; comparing it (``<``, ``<=``, ``>``, ``>=``) or calling ``eq``,
``ne``, ``is_in``, ``exists`` or ``missing`` on it gives a
``filter_pb2.TwinCondition``. ``where`` puts conditions and any other
DeviceFilter field (as keyword arguments, checked by mypy) into one
``filter_pb2.DeviceFilter``, accepted wherever a ``FilterLike`` is.

``==`` and ``!=`` are deliberately not conditions: they compare two
``TwinPath`` objects, as Python expects. Use ``eq`` and ``ne``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, NoReturn, TypeAlias, TypedDict, Unpack

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from pulse.device.v1 import filter_pb2, status_pb2, twin_pb2

__all__ = [
    "FilterFields",
    "TwinPath",
    "desired",
    "key",
    "reported",
    "version_range",
    "where",
]

_Condition = filter_pb2.TwinCondition
_Document = filter_pb2.TwinCondition.Document
_Operator = filter_pb2.TwinCondition.Operator

Ordered: TypeAlias = int | float | str
"""What ``<``, ``<=``, ``>`` and ``>=`` compare with (never a bool)."""

Scalar: TypeAlias = str | int | float | bool | None
"""What ``eq``, ``ne`` and ``is_in`` compare with."""

StatusName: TypeAlias = Literal["ONLINE", "STALE", "OFFLINE", "UNKNOWN"]
SyncStatusName: TypeAlias = Literal["SYNCED", "PENDING", "STALE"]
_Status: TypeAlias = StatusName | status_pb2.ConnectivityStatus.ValueType
_SyncStatus: TypeAlias = SyncStatusName | twin_pb2.Twin.SyncStatus.ValueType
_Time: TypeAlias = datetime | timestamp_pb2.Timestamp | str


class VersionBounds(TypedDict, total=False):
    """A version range as a mapping; both bounds are inclusive."""

    min: int
    max: int


class FilterFields(TypedDict, total=False):
    """The DeviceFilter fields :func:`where` takes as keyword arguments.

    Enums go by name (``"ONLINE"``) or by their generated constant; times as
    timezone-aware datetimes, Timestamps or RFC 3339 strings; messages either
    as messages or in their protobuf-JSON form.
    """

    status: _Status
    statuses: Sequence[_Status]
    tags: Sequence[str]
    site_id: str
    site_ids: Sequence[str]
    include_decommissioned: bool
    device_id_prefix: str
    name_prefix: str
    last_seen_before: _Time
    last_seen_after: _Time
    models: Sequence[str]
    tag_selectors: Sequence[filter_pb2.TagSelector | Mapping[str, object]]
    twin_conditions: Sequence[filter_pb2.TwinCondition | Mapping[str, object]]
    sync_statuses: Sequence[_SyncStatus]
    desired_version: filter_pb2.VersionRange | VersionBounds
    reported_version: filter_pb2.VersionRange | VersionBounds


def key(first: str, /, *rest: str) -> str:
    """A twin path from raw object keys: each key's ``\\`` becomes ``\\\\`` and
    ``.`` becomes ``\\.``, and the keys are joined with dots.

    ``key("net", "wlan.0")`` is ``net.wlan\\.0``: the key ``wlan.0`` inside
    ``net``, where ``reported("net.wlan.0")`` would mean three keys.

    Raises:
        TypeError: A key is not a string.
        ValueError: A key is empty (the server has no way to name it).
    """
    keys = (first, *rest)
    for i, segment in enumerate(keys):
        if not isinstance(segment, str):
            raise TypeError(f"key() takes strings, got {type(segment).__name__} at {i}")
        if not segment:
            raise ValueError(f"key() got an empty key at {i}; twin paths cannot name one")
    return ".".join(k.replace("\\", "\\\\").replace(".", "\\.") for k in keys)


@dataclass(frozen=True, repr=False)
class TwinPath:
    """A value inside the desired or the reported twin document.

    Build one with :func:`desired` or :func:`reported`. ``path`` is the dotted
    path as the server reads it (a literal dot in a key is ``\\.``, a
    backslash ``\\\\``; :func:`key` writes those escapes).
    """

    document: filter_pb2.TwinCondition.Document.ValueType
    path: str

    def __post_init__(self) -> None:
        if self.document not in (_Document.DESIRED, _Document.REPORTED):
            raise ValueError(f"document must be DESIRED or REPORTED, got {self.document}")
        if not isinstance(self.path, str):
            raise TypeError(f"a twin path is a string, got {type(self.path).__name__}")
        if not self.path:
            raise ValueError("a twin path must not be empty")

    def __repr__(self) -> str:
        return f"{_Document.Name(self.document).lower()}({self.path!r})"

    def __lt__(self, value: Ordered) -> filter_pb2.TwinCondition:
        """The value is a number below ``value``, or a string before it (by code point)."""
        return self._condition(_Operator.LESS, [_ordered(value, "<")])

    def __le__(self, value: Ordered) -> filter_pb2.TwinCondition:
        """As ``<``, or equal."""
        return self._condition(_Operator.LESS_OR_EQUAL, [_ordered(value, "<=")])

    def __gt__(self, value: Ordered) -> filter_pb2.TwinCondition:
        """The value is a number above ``value``, or a string after it."""
        return self._condition(_Operator.GREATER, [_ordered(value, ">")])

    def __ge__(self, value: Ordered) -> filter_pb2.TwinCondition:
        """As ``>``, or equal."""
        return self._condition(_Operator.GREATER_OR_EQUAL, [_ordered(value, ">=")])

    def eq(self, value: Scalar) -> filter_pb2.TwinCondition:
        """The value equals ``value`` (typed: ``1`` is not ``"1"`` and not ``True``)."""
        return self._condition(_Operator.EQUALS, [_scalar(value, "eq")])

    def ne(self, value: Scalar) -> filter_pb2.TwinCondition:
        """The path is missing, or its value differs from ``value``."""
        return self._condition(_Operator.NOT_EQUALS, [_scalar(value, "ne")])

    def is_in(self, value: Scalar, /, *values: Scalar) -> filter_pb2.TwinCondition:
        """The value equals any of the values given (at least one)."""
        return self._condition(_Operator.IN, [_scalar(v, "is_in") for v in (value, *values)])

    def exists(self) -> filter_pb2.TwinCondition:
        """The path exists (its value may be null)."""
        return self._condition(_Operator.EXISTS, [])

    def missing(self) -> filter_pb2.TwinCondition:
        """The path does not exist (DOES_NOT_EXIST)."""
        return self._condition(_Operator.DOES_NOT_EXIST, [])

    def _condition(
        self, operator: filter_pb2.TwinCondition.Operator.ValueType, values: list[struct_pb2.Value]
    ) -> filter_pb2.TwinCondition:
        return _Condition(document=self.document, path=self.path, operator=operator, values=values)


def reported(path: str) -> TwinPath:
    """A value in the reported document, e.g. ``reported("fw.version")``.

    ``path`` is used as is; build it with :func:`key` when a key may hold a
    dot or a backslash.
    """
    return TwinPath(_Document.REPORTED, path)


def desired(path: str) -> TwinPath:
    """A value in the desired document; see :func:`reported`."""
    return TwinPath(_Document.DESIRED, path)


def version_range(min: int | None = None, max: int | None = None) -> filter_pb2.VersionRange:
    """A ``VersionRange`` for ``desired_version``/``reported_version``; both
    bounds inclusive, either may be left out."""
    bounds = {"min": min, "max": max}
    for name, bound in bounds.items():
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
            raise TypeError(f"version_range() {name} must be an int, got {type(bound).__name__}")
    return filter_pb2.VersionRange(min=min, max=max)


def where(
    *conditions: filter_pb2.TwinCondition | filter_pb2.TagSelector,
    **fields: Unpack[FilterFields],
) -> filter_pb2.DeviceFilter:
    """One DeviceFilter: the keyword fields, then the conditions appended.

    TwinConditions go to ``twin_conditions`` and TagSelectors to
    ``tag_selectors``, after any given as keyword arguments. All conditions
    AND together.

    Raises:
        TypeError: A condition is neither message (``==`` on a TwinPath gives
            a bool: use ``eq``).
        ValueError: A naive datetime (give it a time zone).
        google.protobuf.json_format.ParseError: A field value protobuf-JSON
            does not accept (unknown enum name, ...).
    """
    result = json_format.ParseDict(
        {name: _json_ready(value) for name, value in fields.items()}, filter_pb2.DeviceFilter()
    )
    for i, condition in enumerate(conditions):
        if isinstance(condition, filter_pb2.TwinCondition):
            result.twin_conditions.append(condition)
        elif isinstance(condition, filter_pb2.TagSelector):
            result.tag_selectors.append(condition)
        else:
            _not_a_condition(i, condition)
    return result


def _not_a_condition(index: int, value: object) -> NoReturn:
    hint = ""
    if isinstance(value, bool):
        hint = " (== and != compare TwinPath objects; use .eq() and .ne())"
    elif isinstance(value, TwinPath):
        hint = f" (say what to check, e.g. {value!r}.exists())"
    raise TypeError(
        f"where() takes TwinCondition and TagSelector messages,"
        f" got {type(value).__name__} at {index}{hint}"
    )


def _json_ready(value: object) -> object:
    """``value`` in the protobuf-JSON form ParseDict reads."""
    if isinstance(value, Message):
        return json_format.MessageToDict(value, preserving_proto_field_name=True)
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError(f"{value.isoformat()} is a naive datetime; give it a time zone")
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(value)
        return stamp.ToJsonString()
    if isinstance(value, Mapping):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_json_ready(v) for v in value]
    return value


def _number(value: int | float) -> struct_pb2.Value:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"twin condition values must be finite numbers, got {value}")
        return struct_pb2.Value(number_value=value)
    # Numbers travel as doubles: refuse an int that would arrive as another one.
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if number != value:
        raise ValueError(f"{value} is not exactly representable as a double")
    return struct_pb2.Value(number_value=number)


def _ordered(value: object, op: str) -> struct_pb2.Value:
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _number(value)
    raise TypeError(f"{op} compares a number or a string, not {type(value).__name__}")


def _scalar(value: object, method: str) -> struct_pb2.Value:
    if value is None:
        return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    if isinstance(value, int | float):
        return _number(value)
    raise TypeError(
        f"{method}() compares a string, number, bool or None, not {type(value).__name__}"
    )
