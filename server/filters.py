"""Device filters: the saved query behind a dynamic device group.

One filter has four faces, all defined here so they cannot drift apart:

* ``parse_filter`` turns the protobuf-JSON dict a client sent into a
  ``DeviceFilter``, reporting every violation at once with a field path;
* ``canonical_json`` / ``canonical_text`` give the normalised form that is
  stored, so two groups with equivalent filters written differently compare
  equal;
* ``compile_filter`` turns it into a parameterised SQL boolean over the
  ``devices d`` / ``device_state s`` aliases;
* ``matches`` evaluates the same semantics in plain Python, as the reference
  the SQL is tested against.

The language is described for users in docs/filters.md. This module is pure:
no I/O and no database driver, so it can be used (and fuzzed) anywhere.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

from server.twin.delta import values_equal
from server.twin.sync import sync_status

__all__ = [
    "DECOMMISSIONED",
    "DEFAULT_TWIN_STALE_AFTER",
    "FIELDS",
    "MAX_ID_LENGTH",
    "MAX_LIST_ITEMS",
    "MAX_MODEL_LENGTH",
    "MAX_PREFIX_LENGTH",
    "MAX_TAG_KEY_LENGTH",
    "MAX_TAG_SELECTORS",
    "MAX_TAG_VALUE_LENGTH",
    "MAX_TWIN_CONDITIONS",
    "MAX_TWIN_PATH_LENGTH",
    "MAX_TWIN_PATH_SEGMENTS",
    "MAX_TWIN_VALUE_LENGTH",
    "CompiledFilter",
    "ConnectivityStatus",
    "DeviceFilter",
    "DeviceRow",
    "FieldViolation",
    "FilterError",
    "TagOperator",
    "TagSelector",
    "TwinCondition",
    "TwinDocument",
    "TwinOperator",
    "TwinSyncStatus",
    "VersionRange",
    "canonical_json",
    "canonical_text",
    "compile_filter",
    "format_timestamp",
    "join_twin_path",
    "matches",
    "normalise_filter",
    "parse_filter",
    "prefix_upper_bound",
    "split_twin_path",
    "twin_paths",
    "twin_sync_status",
]

# Limits are counted in Unicode code points. They bound the work one stored
# filter can cost on every membership read, and keep any single value well
# below what the registry itself accepts, so no filter is refused merely for
# naming a real device, site or tag.
MAX_ID_LENGTH = 128
MAX_PREFIX_LENGTH = 128
MAX_MODEL_LENGTH = 128
MAX_TAG_KEY_LENGTH = 128
MAX_TAG_VALUE_LENGTH = 256
MAX_LIST_ITEMS = 100
MAX_TAG_SELECTORS = 32
MAX_TWIN_CONDITIONS = 32
# A twin document is at most 10 levels deep (server/validation.py), so no
# longer path can name anything.
MAX_TWIN_PATH_SEGMENTS = 10
MAX_TWIN_PATH_LENGTH = 512
MAX_TWIN_VALUE_LENGTH = 1024
# Versions are bigint columns.
_MAX_VERSION = 2**63 - 1

DECOMMISSIONED = "DECOMMISSIONED"

#: The twin's sync rule's default (PULSE_TWIN_STALE_AFTER_S); callers pass the
#: configured value.
DEFAULT_TWIN_STALE_AFTER = timedelta(seconds=300)


class ConnectivityStatus(StrEnum):
    ONLINE = "ONLINE"
    STALE = "STALE"
    OFFLINE = "OFFLINE"
    UNKNOWN = "UNKNOWN"


class TagOperator(StrEnum):
    EXISTS = "EXISTS"
    DOES_NOT_EXIST = "DOES_NOT_EXIST"
    EQUALS = "EQUALS"
    NOT_EQUALS = "NOT_EQUALS"
    IN = "IN"
    NOT_IN = "NOT_IN"


class TwinDocument(StrEnum):
    DESIRED = "DESIRED"
    REPORTED = "REPORTED"


class TwinOperator(StrEnum):
    EXISTS = "EXISTS"
    DOES_NOT_EXIST = "DOES_NOT_EXIST"
    EQUALS = "EQUALS"
    NOT_EQUALS = "NOT_EQUALS"
    LESS = "LESS"
    LESS_OR_EQUAL = "LESS_OR_EQUAL"
    GREATER = "GREATER"
    GREATER_OR_EQUAL = "GREATER_OR_EQUAL"
    IN = "IN"


class TwinSyncStatus(StrEnum):
    SYNCED = "SYNCED"
    PENDING = "PENDING"
    STALE = "STALE"


_TWIN_NO_VALUES = frozenset({TwinOperator.EXISTS, TwinOperator.DOES_NOT_EXIST})
_TWIN_ONE_VALUE = frozenset({TwinOperator.EQUALS, TwinOperator.NOT_EQUALS})
_TWIN_ORDERING = {
    TwinOperator.LESS: "<",
    TwinOperator.LESS_OR_EQUAL: "<=",
    TwinOperator.GREATER: ">",
    TwinOperator.GREATER_OR_EQUAL: ">=",
}

_NO_VALUES = frozenset({TagOperator.EXISTS, TagOperator.DOES_NOT_EXIST})
_ONE_VALUE = frozenset({TagOperator.EQUALS, TagOperator.NOT_EQUALS})
_SOME_VALUES = frozenset({TagOperator.IN, TagOperator.NOT_IN})

# Every accepted top-level field, in the order they are documented and checked.
FIELDS = (
    "status",
    "statuses",
    "site_id",
    "site_ids",
    "tags",
    "tag_selectors",
    "include_decommissioned",
    "device_id_prefix",
    "name_prefix",
    "last_seen_before",
    "last_seen_after",
    "models",
    "twin_conditions",
    "sync_statuses",
    "desired_version",
    "reported_version",
)
_SELECTOR_FIELDS = ("key", "operator", "values")
_TWIN_CONDITION_FIELDS = ("document", "path", "operator", "values")
_RANGE_FIELDS = ("min", "max")


class FieldViolation(NamedTuple):
    """One problem in a request: where (``field``) and what (``description``).

    Shaped like google.rpc.BadRequest.FieldViolation so the server can copy it
    across unchanged.
    """

    field: str
    description: str


class FilterError(ValueError):
    """A filter was rejected; ``violations`` lists every problem found."""

    def __init__(self, violations: Iterable[FieldViolation]) -> None:
        self.violations: list[FieldViolation] = list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


@dataclass(frozen=True, order=True)
class TagSelector:
    """A Kubernetes-style label selector over the device's tag map."""

    key: str
    operator: TagOperator
    values: tuple[str, ...] = ()


@dataclass(frozen=True, order=True)
class TwinCondition:
    """A condition on the value at ``path`` in one of the twin's documents.

    ``path`` holds the keys, unescaped. ``values`` hold each value as compact
    JSON text with integral numbers written as integers, so that equal
    values are equal strings (``True`` and ``1`` are equal in Python, and
    ``1.0`` and ``1`` are one number here) and conditions sort and hash
    whatever the values' types.
    """

    document: TwinDocument
    path: tuple[str, ...]
    operator: TwinOperator
    values: tuple[str, ...] = ()

    def decoded_values(self) -> list[Any]:
        return [json.loads(v) for v in self.values]


@dataclass(frozen=True)
class VersionRange:
    """Inclusive bounds on a version; ``None`` is unbounded."""

    min: int | None = None
    max: int | None = None

    @property
    def unbounded(self) -> bool:
        return self.min is None and self.max is None

    def holds(self, version: int) -> bool:
        return (self.min is None or version >= self.min) and (
            self.max is None or version <= self.max
        )


@dataclass(frozen=True)
class DeviceFilter:
    """A parsed filter. Conditions AND; the values of one list condition OR.

    Empty tuples, empty prefixes and ``None`` timestamps mean "no condition".
    ``parse_filter`` returns these already normalised (see ``normalise_filter``),
    so equal filters are equal dataclasses.
    """

    statuses: tuple[ConnectivityStatus, ...] = ()
    site_ids: tuple[str, ...] = ()
    # The upstream ``tags`` shorthand: the device has at least one of these keys.
    any_tag_keys: tuple[str, ...] = ()
    tag_selectors: tuple[TagSelector, ...] = ()
    include_decommissioned: bool = False
    device_id_prefix: str = ""
    name_prefix: str = ""
    last_seen_before: datetime | None = None
    last_seen_after: datetime | None = None
    models: tuple[str, ...] = ()
    twin_conditions: tuple[TwinCondition, ...] = ()
    sync_statuses: tuple[TwinSyncStatus, ...] = ()
    desired_version: VersionRange = VersionRange()
    reported_version: VersionRange = VersionRange()

    @property
    def reads_twin(self) -> bool:
        """Whether evaluating it needs the twin's documents and versions."""
        return bool(
            self.twin_conditions
            or self.sync_statuses
            or not self.desired_version.unbounded
            or not self.reported_version.unbounded
        )


@dataclass(frozen=True)
class DeviceRow:
    """The columns a filter looks at, for the Python reference evaluation."""

    device_id: str
    name: str
    site_id: str | None
    model: str
    tags: Mapping[str, str]
    lifecycle: str
    status: str
    last_seen_at: datetime | None
    desired: Mapping[str, Any] = field(default_factory=dict)
    reported: Mapping[str, Any] = field(default_factory=dict)
    desired_version: int = 0
    reported_version: int = 0
    desired_updated_at: datetime | None = None
    reported_updated_at: datetime | None = None


@dataclass(frozen=True)
class CompiledFilter:
    """A boolean SQL expression over ``d`` and ``s`` plus its parameters.

    ``params[i]`` binds ``$(first_param + i)``. The expression is parenthesised
    when it has more than one term, so it can be embedded next to AND/OR/NOT,
    and it is never NULL, so ``NOT (sql)`` is exactly the complement.
    """

    sql: str
    params: list[object] = field(default_factory=list)


# Run in the transaction before a statement with a compiled filter: plan it
# for its actual parameters every time. With asyncpg's statement cache the
# same SQL text runs again and again, and after five runs PostgreSQL may
# switch to a generic plan, which for a filter means guessing every
# selectivity: 240 ms instead of 7 ms for the groups benchmark's selective
# page evaluated whole, 290 ms instead of 2.5 ms read from the maintained
# membership (docs/groups.md).
CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"


# --------------------------------------------------------------------------
# Parsing


# C0, DEL, C1 (Unicode category Cc) and lone surrogates (Cs): the former are
# invisible in UIs and logs, the latter cannot be encoded to UTF-8 and would
# only fail later, inside the database driver.
_FORBIDDEN_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))",
    re.ASCII,
)

_E = TypeVar("_E", ConnectivityStatus, TagOperator, TwinDocument, TwinOperator, TwinSyncStatus)
_T = TypeVar("_T")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Checker:
    """Accumulates violations so that one response can list them all."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def add(self, path: str, description: str) -> None:
        self.violations.append(FieldViolation(path, description))

    def string(self, value: object, path: str, *, max_length: int, allow_empty: bool) -> str | None:
        if not isinstance(value, str):
            self.add(path, f"must be a string, got {_json_type(value)}")
            return None
        ok = True
        if not value and not allow_empty:
            self.add(path, "must not be empty")
            ok = False
        if len(value) > max_length:
            self.add(path, f"must be at most {max_length} characters long, got {len(value)}")
            ok = False
        bad = _FORBIDDEN_CHARS.search(value)
        if bad is not None:
            self.add(
                path,
                f"must not contain control characters, found U+{ord(bad.group()):04X}"
                f" at index {bad.start()}",
            )
            ok = False
        return value if ok else None

    def array(self, value: object, path: str, *, max_items: int) -> list[object] | None:
        if not isinstance(value, list | tuple):
            self.add(path, f"must be an array, got {_json_type(value)}")
            return None
        if len(value) > max_items:
            self.add(path, f"must have at most {max_items} items, got {len(value)}")
            return None
        return list(value)

    def strings(self, value: object, path: str, *, max_length: int, allow_empty: bool) -> list[str]:
        items = self.array(value, path, max_items=MAX_LIST_ITEMS)
        if items is None:
            return []
        out: list[str] = []
        for i, item in enumerate(items):
            s = self.string(item, f"{path}[{i}]", max_length=max_length, allow_empty=allow_empty)
            if s is not None:
                out.append(s)
        return out

    def each(
        self,
        value: object,
        path: str,
        parse: Callable[[object, str], _T | None],
        *,
        max_items: int = MAX_LIST_ITEMS,
    ) -> list[_T]:
        """``parse`` applied to every item of the array ``value``, keeping the
        items that parsed (the others added their violations)."""
        parsed = (
            parse(item, f"{path}[{i}]")
            for i, item in enumerate(self.array(value, path, max_items=max_items) or [])
        )
        return [item for item in parsed if item is not None]

    def enum(self, value: object, path: str, enum: type[_E], what: str) -> _E | None:
        allowed = ", ".join(member.value for member in enum)
        if not isinstance(value, str):
            self.add(path, f"must be a {what} name (one of {allowed}), got {_json_type(value)}")
            return None
        try:
            return enum(value)
        except ValueError:
            shown = value if len(value) <= 40 else value[:40] + "..."
            self.add(path, f"unknown {what} {shown!r}; expected one of {allowed}")
            return None

    def timestamp(self, value: object, path: str, *, round_up: bool) -> datetime | None:
        if not isinstance(value, str):
            self.add(path, f"must be an RFC 3339 timestamp string, got {_json_type(value)}")
            return None
        try:
            return _parse_timestamp(value, round_up=round_up)
        except ValueError as exc:
            self.add(path, str(exc))
            return None

    def selector(self, value: object, path: str) -> TagSelector | None:
        if not isinstance(value, Mapping):
            self.add(path, f"must be an object, got {_json_type(value)}")
            return None
        before = len(self.violations)
        self.unknown_keys(value, path, _SELECTOR_FIELDS)
        key: str | None = None
        raw_key = value.get("key")
        if raw_key is None:
            self.add(_join(path, "key"), "is required")
        else:
            key = self.string(
                raw_key, _join(path, "key"), max_length=MAX_TAG_KEY_LENGTH, allow_empty=False
            )
        operator: TagOperator | None = None
        raw_operator = value.get("operator")
        if raw_operator is None:
            self.add(_join(path, "operator"), "is required")
        else:
            operator = self.enum(raw_operator, _join(path, "operator"), TagOperator, "operator")
        values_path = _join(path, "values")
        raw_values = value.get("values")
        values: list[str] = []
        values_given = 0
        if raw_values is not None:
            values = self.strings(
                raw_values, values_path, max_length=MAX_TAG_VALUE_LENGTH, allow_empty=True
            )
            if isinstance(raw_values, list | tuple):
                values_given = len(raw_values)
            else:
                # Already reported as not an array; a count would only repeat it.
                operator = None
        if operator in _NO_VALUES and values_given:
            self.add(values_path, f"must be empty for {operator}, got {values_given}")
        elif operator in _ONE_VALUE and values_given != 1:
            self.add(values_path, f"{operator} takes exactly one value, got {values_given}")
        elif operator in _SOME_VALUES and not values_given:
            self.add(values_path, f"{operator} needs at least one value, got none")
        if len(self.violations) > before or key is None or operator is None:
            return None
        return TagSelector(key, operator, tuple(values))

    def twin_condition(self, value: object, path: str) -> TwinCondition | None:
        if not isinstance(value, Mapping):
            self.add(path, f"must be an object, got {_json_type(value)}")
            return None
        before = len(self.violations)
        self.unknown_keys(value, path, _TWIN_CONDITION_FIELDS)
        document = operator = None
        raw = value.get("document")
        if raw is None:
            self.add(_join(path, "document"), "is required")
        else:
            document = self.enum(raw, _join(path, "document"), TwinDocument, "document")
        raw = value.get("operator")
        if raw is None:
            self.add(_join(path, "operator"), "is required")
        else:
            operator = self.enum(raw, _join(path, "operator"), TwinOperator, "operator")
        keys: tuple[str, ...] | None = None
        raw = value.get("path")
        if raw is None:
            self.add(_join(path, "path"), "is required")
        else:
            text = self.string(
                raw, _join(path, "path"), max_length=MAX_TWIN_PATH_LENGTH, allow_empty=False
            )
            if text is not None:
                try:
                    keys = split_twin_path(text)
                except ValueError as exc:
                    self.add(_join(path, "path"), str(exc))
        values_path = _join(path, "values")
        raw_values = value.get("values")
        values: list[str] = []
        if raw_values is not None:
            items = self.array(raw_values, values_path, max_items=MAX_LIST_ITEMS)
            if items is None:
                operator = None  # already reported; a count would only repeat it
            for i, item in enumerate(items or []):
                text = self.twin_value(item, f"{values_path}[{i}]", operator)
                if text is not None:
                    values.append(text)
            given = len(items or [])
        else:
            given = 0
        if operator in _TWIN_NO_VALUES and given:
            self.add(values_path, f"must be empty for {operator}, got {given}")
        elif operator is TwinOperator.IN and not given:
            self.add(values_path, "IN needs at least one value, got none")
        elif (operator in _TWIN_ORDERING or operator in _TWIN_ONE_VALUE) and given != 1:
            self.add(values_path, f"{operator} takes exactly one value, got {given}")
        if len(self.violations) > before or document is None or operator is None or not keys:
            return None
        return TwinCondition(document, keys, operator, tuple(values))

    def twin_value(self, value: object, path: str, operator: TwinOperator | None) -> str | None:
        """The value as canonical JSON text, if the operator can compare it."""
        ordered = operator in _TWIN_ORDERING
        allowed = "a number or a string" if ordered else "a string, number, boolean or null"
        if isinstance(value, bool) or value is None:
            if ordered:
                self.add(path, f"{operator} compares {allowed}, got {_json_type(value)}")
                return None
            return json.dumps(value)
        if isinstance(value, int | float):
            if not math.isfinite(value):
                self.add(path, "must be a finite number")
                return None
            return _number_json(value)
        if isinstance(value, str):
            text = self.string(value, path, max_length=MAX_TWIN_VALUE_LENGTH, allow_empty=True)
            return None if text is None else json.dumps(text, ensure_ascii=False)
        self.add(path, f"must be {allowed}, got {_json_type(value)}")
        return None

    def version_range(self, value: object, path: str) -> VersionRange:
        if not isinstance(value, Mapping):
            self.add(path, f"must be an object, got {_json_type(value)}")
            return VersionRange()
        self.unknown_keys(value, path, _RANGE_FIELDS)
        bounds: dict[str, int] = {}
        for name in _RANGE_FIELDS:
            raw = value.get(name)
            if raw is None:
                continue
            # proto3 JSON writes int64 as a string; accept both.
            number: int | None = None
            if isinstance(raw, str) and re.fullmatch("[0-9]{1,19}", raw, re.ASCII):
                number = int(raw)
            elif isinstance(raw, int) and not isinstance(raw, bool):
                number = raw
            elif isinstance(raw, float) and raw.is_integer():
                number = int(raw)
            if number is None or not 0 <= number <= _MAX_VERSION:
                self.add(_join(path, name), f"must be an integer from 0 to {_MAX_VERSION}")
            else:
                bounds[name] = number
        return VersionRange(bounds.get("min"), bounds.get("max"))

    def unknown_keys(self, keys: Iterable[object], path: str, known: tuple[str, ...]) -> None:
        for key in keys:
            if isinstance(key, str) and key in known:
                continue
            # Echo the key in the path only when it is printable and short,
            # since the path ends up in error responses and logs.
            if isinstance(key, str) and len(key) <= 64 and not _FORBIDDEN_CHARS.search(key):
                self.add(_join(path, key), f"unknown field; expected one of {', '.join(known)}")
            else:
                self.add(
                    path, f"unknown field {str(key)[:64]!r}; expected one of {', '.join(known)}"
                )


def _parse_timestamp(text: str, *, round_up: bool) -> datetime:
    hint = "must be an RFC 3339 timestamp with a time zone, e.g. 2024-05-01T12:00:00Z"
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise ValueError(hint)
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    if second == 60:
        raise ValueError("leap seconds (:60) are not supported")
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"{hint} ({exc})") from None
    nanos = int((m.group(7) or "").ljust(9, "0"))
    micros, rest = divmod(nanos, 1000)
    # Stored times have microsecond resolution and both bounds are strict, so
    # rounding "before" up and "after" down keeps exactly the same matches.
    if rest and round_up:
        micros += 1
    if not m.group(8):
        offset_hours, offset_minutes = int(m.group(10)), int(m.group(11))
        if offset_hours > 23 or offset_minutes > 59:
            raise ValueError(f"{hint} (bad UTC offset)")
        offset = timedelta(hours=offset_hours, minutes=offset_minutes)
        if m.group(9) == "-":
            offset = -offset
    else:
        offset = timedelta()
    try:
        return moment + timedelta(microseconds=micros) - offset
    except OverflowError:
        raise ValueError("is outside the supported range (years 0001 to 9999 UTC)") from None


def split_twin_path(text: str) -> tuple[str, ...]:
    """The keys of a dotted path; ``\\.`` is a literal dot, ``\\\\`` a backslash.

    Raises ValueError saying what is wrong.
    """
    keys: list[str] = []
    current: list[str] = []
    chars = iter(enumerate(text))
    for i, ch in chars:
        if ch == "\\":
            nxt = next(chars, None)
            if nxt is None or nxt[1] not in ".\\":
                raise ValueError(
                    f"unknown escape at index {i}: only \\. (a dot) and \\\\ (a backslash)"
                    " are escapes"
                )
            current.append(nxt[1])
        elif ch == ".":
            if not current:
                raise ValueError(f"empty key before index {i}; keys are separated by one dot")
            keys.append("".join(current))
            current = []
        else:
            current.append(ch)
    if not current:
        raise ValueError("must not end with a dot" if keys else "must not be empty")
    keys.append("".join(current))
    if len(keys) > MAX_TWIN_PATH_SEGMENTS:
        raise ValueError(f"must have at most {MAX_TWIN_PATH_SEGMENTS} keys, got {len(keys)}")
    return tuple(keys)


def join_twin_path(keys: Iterable[str]) -> str:
    """Inverse of ``split_twin_path``."""
    return ".".join(k.replace("\\", "\\\\").replace(".", "\\.") for k in keys)


def twin_paths(documents: Iterable[Mapping[str, Any]], *, limit: int) -> list[str]:
    """The sorted paths (as ``join_twin_path`` writes them) to every
    non-object value in ``documents``, at most ``limit`` of them. Keys a
    filter cannot name (empty, or with control characters) are left out."""
    found: set[str] = set()

    def walk(value: Mapping[str, Any], keys: tuple[str, ...]) -> None:
        for key, inner in value.items():
            if not key or _FORBIDDEN_CHARS.search(key):
                continue
            here = (*keys, key)
            if isinstance(inner, Mapping) and inner and len(here) < MAX_TWIN_PATH_SEGMENTS:
                walk(inner, here)
            else:
                found.add(join_twin_path(here))

    for document in documents:
        walk(document, ())
    return sorted(found)[:limit]


def _number_json(value: int | float) -> str:
    # Integral doubles (gRPC sends every number as one) are written as
    # integers, so 2.0 and 2 are one canonical value.
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return str(int(value))
    return json.dumps(value)


def parse_filter(data: Mapping[str, object], *, field_prefix: str = "filter") -> DeviceFilter:
    """Validate a protobuf-JSON filter dict; raise FilterError listing every problem.

    JSON ``null`` for a field means the field is absent, as in proto3 JSON.
    """
    check = _Checker()
    if not isinstance(data, Mapping):
        got = _json_type(data)
        raise FilterError([FieldViolation(field_prefix, f"must be an object, got {got}")])
    check.unknown_keys(data, field_prefix, FIELDS)

    def path(name: str) -> str:
        return _join(field_prefix, name)

    statuses: list[ConnectivityStatus] = []
    if data.get("status") is not None:
        status = check.enum(data["status"], path("status"), ConnectivityStatus, "status")
        if status is not None:
            statuses.append(status)
    if data.get("statuses") is not None:
        statuses += check.each(
            data["statuses"],
            path("statuses"),
            lambda item, at: check.enum(item, at, ConnectivityStatus, "status"),
        )

    site_ids: list[str] = []
    if data.get("site_id") is not None:
        site = check.string(
            data["site_id"], path("site_id"), max_length=MAX_ID_LENGTH, allow_empty=True
        )
        # An empty string is proto3's "unset" for a singular string field.
        if site:
            site_ids.append(site)
    if data.get("site_ids") is not None:
        site_ids += check.strings(
            data["site_ids"], path("site_ids"), max_length=MAX_ID_LENGTH, allow_empty=False
        )

    any_tag_keys: list[str] = []
    if data.get("tags") is not None:
        any_tag_keys = check.strings(
            data["tags"], path("tags"), max_length=MAX_TAG_KEY_LENGTH, allow_empty=False
        )

    selectors: list[TagSelector] = []
    if data.get("tag_selectors") is not None:
        selectors = check.each(
            data["tag_selectors"],
            path("tag_selectors"),
            check.selector,
            max_items=MAX_TAG_SELECTORS,
        )

    include_decommissioned = False
    raw_include = data.get("include_decommissioned")
    if raw_include is not None:
        if isinstance(raw_include, bool):
            include_decommissioned = raw_include
        else:
            check.add(
                path("include_decommissioned"), f"must be a boolean, got {_json_type(raw_include)}"
            )

    prefixes: dict[str, str] = {}
    for name in ("device_id_prefix", "name_prefix"):
        if data.get(name) is not None:
            prefix = check.string(
                data[name], path(name), max_length=MAX_PREFIX_LENGTH, allow_empty=True
            )
            prefixes[name] = prefix or ""

    before: datetime | None = None
    if data.get("last_seen_before") is not None:
        before = check.timestamp(data["last_seen_before"], path("last_seen_before"), round_up=True)
    after: datetime | None = None
    if data.get("last_seen_after") is not None:
        after = check.timestamp(data["last_seen_after"], path("last_seen_after"), round_up=False)

    models: list[str] = []
    if data.get("models") is not None:
        # "" is a real model value: the column's default for devices that
        # never reported one, so it stays selectable.
        models = check.strings(
            data["models"], path("models"), max_length=MAX_MODEL_LENGTH, allow_empty=True
        )

    twin_conditions: list[TwinCondition] = []
    if data.get("twin_conditions") is not None:
        twin_conditions = check.each(
            data["twin_conditions"],
            path("twin_conditions"),
            check.twin_condition,
            max_items=MAX_TWIN_CONDITIONS,
        )

    sync_statuses: list[TwinSyncStatus] = []
    if data.get("sync_statuses") is not None:
        sync_statuses = check.each(
            data["sync_statuses"],
            path("sync_statuses"),
            lambda item, at: check.enum(item, at, TwinSyncStatus, "sync status"),
        )

    ranges: dict[str, VersionRange] = {}
    for name in ("desired_version", "reported_version"):
        if data.get(name) is not None:
            ranges[name] = check.version_range(data[name], path(name))

    if check.violations:
        raise FilterError(check.violations)
    return normalise_filter(
        DeviceFilter(
            twin_conditions=tuple(twin_conditions),
            sync_statuses=tuple(sync_statuses),
            desired_version=ranges.get("desired_version", VersionRange()),
            reported_version=ranges.get("reported_version", VersionRange()),
            statuses=tuple(statuses),
            site_ids=tuple(site_ids),
            any_tag_keys=tuple(any_tag_keys),
            tag_selectors=tuple(selectors),
            include_decommissioned=include_decommissioned,
            device_id_prefix=prefixes.get("device_id_prefix", ""),
            name_prefix=prefixes.get("name_prefix", ""),
            last_seen_before=before,
            last_seen_after=after,
            models=tuple(models),
        )
    )


# --------------------------------------------------------------------------
# Canonical form


def _sorted_unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(values)))


def _normalise_selector(selector: TagSelector) -> TagSelector:
    op = TagOperator(selector.operator)
    values = selector.values
    if op in _NO_VALUES:
        if values:
            raise ValueError(f"{op} selector on {selector.key!r} must have no values")
        return TagSelector(selector.key, op)
    if op in _ONE_VALUE:
        if len(values) != 1:
            raise ValueError(f"{op} selector on {selector.key!r} needs exactly one value")
        return TagSelector(selector.key, op, values)
    unique = _sorted_unique(values)
    if not unique:
        raise ValueError(f"{op} selector on {selector.key!r} needs at least one value")
    if len(unique) == 1:
        # A one-value set is the same test as (in)equality; folding it makes
        # the two spellings canonicalise alike.
        op = TagOperator.EQUALS if op is TagOperator.IN else TagOperator.NOT_EQUALS
    return TagSelector(selector.key, op, unique)


def _twin_value_key(text: str) -> tuple[int, object]:
    """A total order over canonical JSON scalars: null, false, true, numbers, strings."""
    value = json.loads(text)
    if value is None:
        return (0, 0)
    if isinstance(value, bool):
        return (1, int(value))
    if isinstance(value, int | float):
        return (2, Decimal(text))
    return (3, value)


def _normalise_twin_condition(c: TwinCondition) -> TwinCondition:
    op = TwinOperator(c.operator)
    document = TwinDocument(c.document)
    values = tuple(_canonical_value(v) for v in c.values)
    if op is TwinOperator.IN:
        unique = tuple(sorted(set(values), key=_twin_value_key))
        if not unique:
            raise ValueError(f"IN condition on {join_twin_path(c.path)!r} needs a value")
        # One value in a set is an equality; folding makes the spellings alike.
        return TwinCondition(
            document, c.path, TwinOperator.EQUALS if len(unique) == 1 else op, unique
        )
    expected = 0 if op in _TWIN_NO_VALUES else 1
    if len(values) != expected:
        raise ValueError(f"{op} condition on {join_twin_path(c.path)!r} needs {expected} values")
    return TwinCondition(document, c.path, op, values)


def _canonical_value(text: str) -> str:
    value = json.loads(text)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _number_json(value)
    return json.dumps(value, ensure_ascii=False)


def normalise_filter(f: DeviceFilter) -> DeviceFilter:
    """The canonical representative of ``f``'s spelling.

    Lists are deduplicated and sorted; a single ``any_tag_keys`` entry becomes
    an EXISTS selector; one-value IN/NOT_IN become EQUALS/NOT_EQUALS; selectors
    are deduplicated and sorted; timestamps are moved to UTC. This is a
    syntactic normal form: filters that are merely logically equivalent (say,
    a redundant selector) may still differ. Raises ValueError for a selector
    with the wrong number of values, which only a hand-built filter can have.
    """
    selectors = [_normalise_selector(s) for s in f.tag_selectors]
    any_tag_keys = _sorted_unique(f.any_tag_keys)
    if len(any_tag_keys) == 1:
        selectors.append(TagSelector(any_tag_keys[0], TagOperator.EXISTS))
        any_tag_keys = ()
    return replace(
        f,
        statuses=tuple(sorted({ConnectivityStatus(s) for s in f.statuses})),
        site_ids=_sorted_unique(f.site_ids),
        any_tag_keys=any_tag_keys,
        tag_selectors=tuple(sorted(set(selectors))),
        last_seen_before=_to_utc(f.last_seen_before),
        last_seen_after=_to_utc(f.last_seen_after),
        models=_sorted_unique(f.models),
        twin_conditions=tuple(sorted({_normalise_twin_condition(c) for c in f.twin_conditions})),
        sync_statuses=tuple(sorted({TwinSyncStatus(s) for s in f.sync_statuses})),
    )


def _to_utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("filter timestamps must be timezone-aware")
    return moment.astimezone(UTC)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with 0, 3 or 6 fraction digits, like protobuf's JSON."""
    m = moment.astimezone(UTC)
    # strftime("%Y") does not zero-pad years below 1000 on every platform.
    text = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    if m.microsecond % 1000 == 0:
        if m.microsecond:
            text += f".{m.microsecond // 1000:03d}"
    else:
        text += f".{m.microsecond:06d}"
    return text + "Z"


def canonical_json(f: DeviceFilter) -> dict[str, object]:
    """The normalised filter as a protobuf-JSON dict, omitting defaults.

    The result is itself valid input: ``parse_filter(canonical_json(f))``
    equals ``normalise_filter(f)``.
    """
    n = normalise_filter(f)
    out: dict[str, object] = {}
    if n.statuses:
        out["statuses"] = [s.value for s in n.statuses]
    if n.site_ids:
        out["site_ids"] = list(n.site_ids)
    if n.any_tag_keys:
        out["tags"] = list(n.any_tag_keys)
    if n.tag_selectors:
        selectors: list[dict[str, object]] = []
        for s in n.tag_selectors:
            entry: dict[str, object] = {"key": s.key, "operator": s.operator.value}
            if s.values:
                entry["values"] = list(s.values)
            selectors.append(entry)
        out["tag_selectors"] = selectors
    if n.include_decommissioned:
        out["include_decommissioned"] = True
    if n.device_id_prefix:
        out["device_id_prefix"] = n.device_id_prefix
    if n.name_prefix:
        out["name_prefix"] = n.name_prefix
    if n.last_seen_before is not None:
        out["last_seen_before"] = format_timestamp(n.last_seen_before)
    if n.last_seen_after is not None:
        out["last_seen_after"] = format_timestamp(n.last_seen_after)
    if n.models:
        out["models"] = list(n.models)
    if n.twin_conditions:
        conditions: list[dict[str, object]] = []
        for c in n.twin_conditions:
            condition: dict[str, object] = {
                "document": c.document.value,
                "path": join_twin_path(c.path),
                "operator": c.operator.value,
            }
            if c.values:
                condition["values"] = c.decoded_values()
            conditions.append(condition)
        out["twin_conditions"] = conditions
    if n.sync_statuses:
        out["sync_statuses"] = [s.value for s in n.sync_statuses]
    for name, bounds in (
        ("desired_version", n.desired_version),
        ("reported_version", n.reported_version),
    ):
        if not bounds.unbounded:
            out[name] = {
                k: v for k, v in (("min", bounds.min), ("max", bounds.max)) if v is not None
            }
    return out


def canonical_text(f: DeviceFilter) -> str:
    """``canonical_json`` as compact JSON with sorted keys: a stable identity."""
    return json.dumps(canonical_json(f), sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------
# SQL


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``.

    Order is by code point, which is byte order of UTF-8 and so the "C"
    collation's. None when no such string exists (the prefix is all U+10FFFF).
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last == 0x10FFFF:
            continue
        # Surrogates cannot occur in stored text, so the successor of U+D7FF
        # is U+E000.
        nxt = 0xE000 if last == 0xD7FF else last + 1
        return "".join(chars) + chr(nxt)
    return None


class _Compiler:
    def __init__(self, first_param: int) -> None:
        self.first_param = first_param
        self.params: list[object] = []
        self.terms: list[str] = []

    def bind(self, value: object) -> str:
        self.params.append(value)
        return f"${self.first_param + len(self.params) - 1}"

    def tag_term(self, selector: TagSelector) -> str:
        # Tag tests use jsonb operators the GIN (jsonb_ops) index serves.
        # jsonb operands are sent as text and cast in SQL so the result does
        # not depend on which jsonb codec the connection has registered.
        op = selector.operator
        if op is TagOperator.EXISTS:
            return f"d.tags ? {self.bind(selector.key)}::text"
        if op is TagOperator.DOES_NOT_EXIST:
            return f"NOT (d.tags ? {self.bind(selector.key)}::text)"
        pairs = [_tag_json(selector.key, v) for v in selector.values]
        if op is TagOperator.EQUALS:
            return f"d.tags @> {self.bind(pairs[0])}::text::jsonb"
        if op is TagOperator.NOT_EQUALS:
            return f"NOT (d.tags @> {self.bind(pairs[0])}::text::jsonb)"
        if op is TagOperator.IN:
            return f"d.tags @> ANY({self.bind(pairs)}::text[]::jsonb[])"
        return f"NOT (d.tags @> ANY({self.bind(pairs)}::text[]::jsonb[]))"

    def twin_term(self, c: TwinCondition) -> str:
        # Keys are walked with `jsonb -> text`, which reads object keys only
        # (`#>` would also index arrays by a numeric key). The state row may
        # be missing under the groups' outer join: every term is written to be
        # false then, never NULL.
        doc = "s.desired" if c.document is TwinDocument.DESIRED else "s.reported"
        op = c.operator
        if op in (TwinOperator.EQUALS, TwinOperator.NOT_EQUALS, TwinOperator.IN):
            # Containment of {"k1": {"k2": value}}: typed, numbers by value,
            # and the GIN jsonb_path_ops opclass would serve it.
            probes = [_nest(c.path, text) for text in c.values]
            if op is TwinOperator.IN:
                test = f"{doc} @> ANY({self.bind(probes)}::text[]::jsonb[])"
            else:
                test = f"{doc} @> {self.bind(probes[0])}::text::jsonb"
            term = f"{doc} IS NOT NULL AND {test}"
            return f"NOT ({term})" if op is TwinOperator.NOT_EQUALS else term

        def value() -> str:
            # Bound afresh at each use: every parameter appears once.
            return doc + "".join(f" -> {self.bind(key)}::text" for key in c.path)

        if op is TwinOperator.EXISTS:
            return f"({value()}) IS NOT NULL"
        if op is TwinOperator.DOES_NOT_EXIST:
            return f"({value()}) IS NULL"
        # CASE, not AND: PostgreSQL may evaluate AND's operands in any order,
        # and casting a string to numeric raises an error.
        bound = c.decoded_values()[0]
        sign = _TWIN_ORDERING[op]
        if isinstance(bound, str):
            kind = self.bind("string")
            extracted = f"({value()}) #>> {self.bind([])}::text[]"
            compare = f'({extracted}) COLLATE "C" {sign} {self.bind(bound)}::text'
        else:
            kind = self.bind("number")
            compare = f"({value()})::numeric {sign} {self.bind(c.values[0])}::text::numeric"
        return f"CASE WHEN jsonb_typeof({value()}) = {kind}::text THEN {compare} ELSE false END"

    def sync_term(self, wanted: tuple[TwinSyncStatus, ...], stale_after: timedelta) -> str:
        # server/twin/sync.py's rule; jsonb equality compares as the delta
        # does (objects by key, arrays in order, numbers by value).
        synced = "(s.reported_version = s.desired_version AND s.reported = s.desired)"

        def late() -> str:
            since = "coalesce(s.desired_updated_at, s.reported_updated_at)"
            return f"coalesce({since} < now() - {self.bind(stale_after)}::interval, false)"

        cases = []
        if TwinSyncStatus.SYNCED in wanted:
            cases.append(synced)
        if TwinSyncStatus.PENDING in wanted:
            online = f"s.status = {self.bind(ConnectivityStatus.ONLINE.value)}::text"
            cases.append(f"(NOT {synced} AND {online} AND NOT {late()})")
        if TwinSyncStatus.STALE in wanted:
            offline = f"s.status <> {self.bind(ConnectivityStatus.ONLINE.value)}::text"
            cases.append(f"(NOT {synced} AND ({offline} OR {late()}))")
        return f"s.status IS NOT NULL AND ({' OR '.join(cases)})"

    def range_term(self, column: str, bounds: VersionRange) -> str:
        parts = [f"{column} IS NOT NULL"]
        if bounds.min is not None:
            parts.append(f"{column} >= {self.bind(bounds.min)}::bigint")
        if bounds.max is not None:
            parts.append(f"{column} <= {self.bind(bounds.max)}::bigint")
        return " AND ".join(parts)


def _nest(path: tuple[str, ...], value_json: str) -> str:
    text = value_json
    for key in reversed(path):
        text = "{" + json.dumps(key, ensure_ascii=False) + ":" + text + "}"
    return text


def _tag_json(key: str, value: str) -> str:
    return json.dumps({key: value}, ensure_ascii=False, separators=(",", ":"))


def compile_filter(
    f: DeviceFilter,
    *,
    first_param: int,
    stale_after: timedelta = DEFAULT_TWIN_STALE_AFTER,
) -> CompiledFilter:
    """Compile to SQL over ``devices d`` joined with ``device_state s``.

    The SQL text is built only from fixed column names, operators and ``$n``
    placeholders; every value travels in ``params``, each bound exactly once,
    numbered consecutively from ``first_param``. Tenancy is not handled here.
    ``stale_after`` is the twin sync rule's threshold, measured from the
    transaction's ``now()``.
    """
    if first_param < 1:
        raise ValueError("first_param must be at least 1")
    n = normalise_filter(f)
    c = _Compiler(first_param)
    terms = c.terms
    if not n.include_decommissioned:
        terms.append(f"d.lifecycle <> {c.bind(DECOMMISSIONED)}::text")
    if n.statuses:
        # The IS NOT NULL guards keep the expression two-valued: a NULL
        # site or last-seen time (or a missing state row under an outer
        # join) must make the term false, not unknown, or NOT (...) would
        # drop the row from both the group and its complement.
        statuses = c.bind([s.value for s in n.statuses])
        terms.append(f"s.status IS NOT NULL AND s.status = ANY({statuses}::text[])")
    if n.site_ids:
        site_ids = c.bind(list(n.site_ids))
        terms.append(f"d.site_id IS NOT NULL AND d.site_id = ANY({site_ids}::text[])")
    if n.models:
        terms.append(f"d.model = ANY({c.bind(list(n.models))}::text[])")
    if n.device_id_prefix:
        # A half-open range instead of LIKE/starts_with so the (tenant_id,
        # device_id) primary key serves it; COLLATE "C" makes the range mean
        # "starts with" whatever the column's collation (it is "C" already,
        # which lets the planner use the index).
        low = f'd.device_id COLLATE "C" >= {c.bind(n.device_id_prefix)}::text'
        high = prefix_upper_bound(n.device_id_prefix)
        if high is None:
            terms.append(low)
        else:
            terms.append(f'{low} AND d.device_id COLLATE "C" < {c.bind(high)}::text')
    if n.name_prefix:
        # starts_with takes the value literally (no LIKE wildcards to escape);
        # "C" keeps it a code-point comparison under any column collation.
        terms.append(f'starts_with(d.name COLLATE "C", {c.bind(n.name_prefix)}::text)')
    if n.any_tag_keys:
        terms.append(f"d.tags ?| {c.bind(list(n.any_tag_keys))}::text[]")
    for selector in n.tag_selectors:
        terms.append(c.tag_term(selector))
    if n.last_seen_after is not None:
        after = c.bind(n.last_seen_after)
        terms.append(f"s.last_seen_at IS NOT NULL AND s.last_seen_at > {after}::timestamptz")
    if n.last_seen_before is not None:
        before = c.bind(n.last_seen_before)
        terms.append(f"s.last_seen_at IS NOT NULL AND s.last_seen_at < {before}::timestamptz")
    for condition in n.twin_conditions:
        terms.append(c.twin_term(condition))
    if n.sync_statuses:
        terms.append(c.sync_term(n.sync_statuses, stale_after))
    if not n.desired_version.unbounded:
        terms.append(c.range_term("s.desired_version", n.desired_version))
    if not n.reported_version.unbounded:
        terms.append(c.range_term("s.reported_version", n.reported_version))
    if not terms:
        return CompiledFilter("TRUE", [])
    if len(terms) == 1 and " AND " not in terms[0]:
        return CompiledFilter(terms[0], c.params)
    return CompiledFilter("(" + " AND ".join(terms) + ")", c.params)


# --------------------------------------------------------------------------
# Reference evaluation


def _selector_matches(selector: TagSelector, tags: Mapping[str, str]) -> bool:
    op = selector.operator
    present = selector.key in tags
    if op is TagOperator.EXISTS:
        return present
    if op is TagOperator.DOES_NOT_EXIST:
        return not present
    # As in Kubernetes, the negative operators also match a missing key.
    hit = present and tags[selector.key] in selector.values
    if op in (TagOperator.EQUALS, TagOperator.IN):
        return hit
    return not hit


_MISSING = object()


def _twin_lookup(document: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = document
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_equal(a: Any, b: Any) -> bool:
    # Numbers compare as the decimal numbers their JSON text writes, which is
    # what jsonb stores and compares; booleans are not numbers.
    if _is_number(a) and _is_number(b):
        return bool(Decimal(json.dumps(a)) == Decimal(json.dumps(b)))
    if type(a) is not type(b):
        return False
    return bool(a == b)


def _twin_matches(c: TwinCondition, device: DeviceRow) -> bool:
    document = device.desired if c.document is TwinDocument.DESIRED else device.reported
    value = _twin_lookup(document, c.path)
    op = TwinOperator(c.operator)
    if op is TwinOperator.EXISTS:
        return value is not _MISSING
    if op is TwinOperator.DOES_NOT_EXIST:
        return value is _MISSING
    wanted = c.decoded_values()
    if op in (TwinOperator.EQUALS, TwinOperator.IN):
        return value is not _MISSING and any(_json_equal(value, w) for w in wanted)
    if op is TwinOperator.NOT_EQUALS:
        return value is _MISSING or not _json_equal(value, wanted[0])
    bound = wanted[0]
    left: Any
    right: Any
    if isinstance(bound, str) and isinstance(value, str):
        left, right = value, bound
    elif _is_number(bound) and _is_number(value):
        left, right = Decimal(json.dumps(value)), Decimal(json.dumps(bound))
    else:
        return False
    if op is TwinOperator.LESS:
        return bool(left < right)
    if op is TwinOperator.LESS_OR_EQUAL:
        return bool(left <= right)
    if op is TwinOperator.GREATER:
        return bool(left > right)
    return bool(left >= right)


def twin_sync_status(device: DeviceRow, *, now: datetime, stale_after: timedelta) -> str:
    """The device's twin sync status, by the rule GetTwin reports."""
    return sync_status(
        desired_version=device.desired_version,
        reported_version=device.reported_version,
        in_sync=values_equal(dict(device.desired), dict(device.reported)),
        connectivity=device.status,
        desired_updated_at=device.desired_updated_at,
        reported_updated_at=device.reported_updated_at,
        now=now,
        stale_after=stale_after,
    ).value


def matches(
    f: DeviceFilter,
    device: DeviceRow,
    *,
    now: datetime | None = None,
    stale_after: timedelta = DEFAULT_TWIN_STALE_AFTER,
) -> bool:
    """Whether ``device`` is in the group; the semantics ``compile_filter`` must match.

    The filter is evaluated as written, without normalising it first, so
    comparing this with the compiled (normalised) SQL also checks that
    normalisation keeps the meaning. ``now`` (default: the current time) and
    ``stale_after`` decide between PENDING and STALE.
    """
    n = f
    if not all(_twin_matches(c, device) for c in n.twin_conditions):
        return False
    if not n.desired_version.holds(device.desired_version):
        return False
    if not n.reported_version.holds(device.reported_version):
        return False
    if n.sync_statuses:
        moment = now if now is not None else datetime.now(UTC)
        status = twin_sync_status(device, now=moment, stale_after=stale_after)
        if status not in n.sync_statuses:
            return False
    if not n.include_decommissioned and device.lifecycle == DECOMMISSIONED:
        return False
    if n.statuses and device.status not in n.statuses:
        return False
    if n.site_ids and (device.site_id is None or device.site_id not in n.site_ids):
        return False
    if n.models and device.model not in n.models:
        return False
    if not device.device_id.startswith(n.device_id_prefix):
        return False
    if not device.name.startswith(n.name_prefix):
        return False
    if n.any_tag_keys and not any(k in device.tags for k in n.any_tag_keys):
        return False
    if not all(_selector_matches(s, device.tags) for s in n.tag_selectors):
        return False
    seen = device.last_seen_at
    if n.last_seen_after is not None and (seen is None or not seen > n.last_seen_after):
        return False
    return n.last_seen_before is None or (seen is not None and seen < n.last_seen_before)
