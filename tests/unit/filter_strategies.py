"""Hypothesis strategies for device filters and device rows.

Shared by the filter unit tests and the database property test, which stores
rows from ``device_rows()`` and checks that ``compile_filter`` selects exactly
the rows ``matches`` accepts. Filters and rows draw on one small vocabulary
so that a good share of filters select some rows and reject others; the
vocabulary is full of LIKE metacharacters, case twins and code points at the
edges of the prefix-range arithmetic.

A filter is first drawn as a ``FilterSpec`` (what it means) and then rendered
into a request dict (how a client might spell it: shorthands, duplicates,
reordering, time zone offsets, one-value IN instead of EQUALS, ...). Two
renderings of one spec are equivalent filters, which is what the canonical
form tests need.

For a database test note: rows are not unique by ``device_id`` (use
``st.lists(device_rows(), unique_by=lambda r: r.device_id)``), and the site
ids they use (``SITE_IDS``) must exist in ``sites`` first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from hypothesis import strategies as st

from server.filters import (
    ConnectivityStatus,
    DeviceFilter,
    DeviceRow,
    TagOperator,
    TwinOperator,
    TwinSyncStatus,
    join_twin_path,
    parse_filter,
)

T = TypeVar("T")

# Attack strings long and specific enough never to occur in the SQL the
# compiler writes, so "the payload is not in the SQL text" is a real check.
INJECTION_STRINGS: tuple[str, ...] = (
    "'; DROP TABLE devices; --",
    "' OR '1'='1",
    "x' OR 1=1; --",
    '"; DELETE FROM devices WHERE ""="',
    "\\'; SELECT pg_sleep(10); --",
    "robert'); DROP TABLE devices;--",
    "$1; SELECT $2",
    "$$ OR TRUE $$",
    "E'\\x27' OR TRUE",
    "/* comment */ OR TRUE",
    "') OR ('x'='x",
    "\\\\'%_%\\",
    "ünïcødé ☃ 设备 💩",
    "\u202eevil-rtl",
)

# Short metacharacter strings: they may well occur in the SQL text (as an
# operator or a cast), so they are only checked by the token whitelist.
TRICKY_STRINGS: tuple[str, ...] = ("%", "_", "\\", "'", '"', "$1", "?", "?|", "@>", "(", ";", "--")

DEVICE_IDS: tuple[str, ...] = (
    "dev-1",
    "dev-10",
    "dev-2",
    "dev_1",
    "dev%1",
    "Dev-1",
    "sensor-ä",
    "sensor-a",
    "z\U0010ffff",
    "z\U0010ffffa",
    "\ud7ffx",
    "\ue000",
    "%",
    "_x",
)
ID_PREFIXES: tuple[str, ...] = (
    "d",
    "dev",
    "dev-",
    "dev-1",
    "dev_",
    "dev%",
    "Dev",
    "sensor-",
    "z",
    "z\U0010ffff",
    "\U0010ffff",
    "\ud7ff",
    "%",
    "_",
)
NAMES: tuple[str, ...] = ("Boiler", "boiler 2", "Boiler_3", "Boil%er", "pump", "", "Ünit")
NAME_PREFIXES: tuple[str, ...] = ("Boil", "boil", "Boiler_", "Boil%", "p", "Ü", "%", "_")
SITE_IDS: tuple[str, ...] = ("site-01", "site-02", "site_03", "Site-01")
MODELS: tuple[str, ...] = ("", "m1", "m2", "M1", "m%")
TAG_KEYS: tuple[str, ...] = ("env", "production", "tier", "Env", "k%", "a.b", "über")
TAG_VALUES: tuple[str, ...] = ("", "prod", "staging", "PROD", "x'y", "%")
LIFECYCLES: tuple[str, ...] = ("ACTIVE", "DECOMMISSIONED")
# Twin documents: keys with dots, backslashes, digits (which `#>` would read
# as array indexes) and SQL metacharacters; values of every JSON type, with
# numbers that are equal in another spelling (1, 1.0) and look-alikes across
# types (1, "1", true).
TWIN_KEYS: tuple[str, ...] = ("fw", "version", "mode", "a.b", "x\\y", "0", "temp", "'k")
TWIN_SCALARS: tuple[object, ...] = (
    "2.3",
    "2.4",
    "2.10",
    "eco",
    "",
    "1",
    "'; DROP TABLE devices; --",
    1,
    1.0,
    2.5,
    -3,
    0,
    2**53 + 1,
    1e-7,
    True,
    False,
    None,
)
# Far from now, so that sync status (PENDING or STALE after 300 s) does not
# depend on when the test runs.
TWIN_TIMES: tuple[datetime | None, ...] = (
    None,
    datetime(2020, 1, 1, tzinfo=UTC),
    datetime(2100, 1, 1, tzinfo=UTC),
)
STATUSES: tuple[str, ...] = tuple(s.value for s in ConnectivityStatus)

# Instants a microsecond apart, so strict bounds are exercised at equality.
INSTANTS: tuple[datetime, ...] = (
    datetime(2024, 1, 1, tzinfo=UTC),
    datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(2023, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2024, 6, 1, 12, 30, 0, 500000, tzinfo=UTC),
    datetime(2030, 1, 1, 0, 0, 0, 123000, tzinfo=UTC),
)

INSTANTS_TEXT: tuple[str, ...] = ("2024-01-01T00:00:00Z", "2024-01-01T00:00:00", "yesterday")

# Text a client could legitimately send: no control characters (Cc) and no
# lone surrogates (Cs), which the parser rejects.
safe_text: st.SearchStrategy[str] = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=12
)

instants: st.SearchStrategy[datetime] = st.one_of(
    st.sampled_from(INSTANTS),
    st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
)


def mixed(vocabulary: Sequence[str], text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Mostly the shared vocabulary, sometimes anything ``text`` gives."""
    return st.one_of(st.sampled_from(vocabulary), st.sampled_from(vocabulary), text)


default_text: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(INJECTION_STRINGS), st.sampled_from(TRICKY_STRINGS), safe_text
)
# For the SQL text checks: nearly every value is hostile.
hostile_text: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(INJECTION_STRINGS),
    st.sampled_from(INJECTION_STRINGS),
    st.sampled_from(TRICKY_STRINGS),
    safe_text,
)


@dataclass(frozen=True)
class SelectorSpec:
    key: str
    operator: TagOperator
    values: frozenset[str]


@dataclass(frozen=True)
class TwinSpec:
    document: str
    path: tuple[str, ...]
    operator: TwinOperator
    values: tuple[object, ...]


@dataclass(frozen=True)
class FilterSpec:
    """What a filter means, independent of spelling."""

    statuses: frozenset[str] = frozenset()
    site_ids: frozenset[str] = frozenset()
    any_tag_keys: frozenset[str] = frozenset()
    selectors: tuple[SelectorSpec, ...] = ()
    include_decommissioned: bool = False
    device_id_prefix: str = ""
    name_prefix: str = ""
    last_seen_before: datetime | None = None
    last_seen_after: datetime | None = None
    models: frozenset[str] = frozenset()
    twin_conditions: tuple[TwinSpec, ...] = ()
    sync_statuses: frozenset[str] = frozenset()
    desired_version: tuple[int | None, int | None] = (None, None)
    reported_version: tuple[int | None, int | None] = (None, None)


def _maybe(strategy: st.SearchStrategy[T], default: T) -> st.SearchStrategy[T]:
    # Each condition is left out three times in four: every one present
    # narrows the group, and filters that select nothing would test little.
    return st.one_of(st.just(default), st.just(default), st.just(default), strategy)


def _small_set(elements: st.SearchStrategy[str]) -> st.SearchStrategy[frozenset[str]]:
    return _maybe(st.frozensets(elements, min_size=1, max_size=4), frozenset())


@st.composite
def selector_specs(draw: st.DrawFn, text: st.SearchStrategy[str] = default_text) -> SelectorSpec:
    key = draw(mixed(TAG_KEYS, text))
    operator = draw(st.sampled_from(list(TagOperator)))
    values: frozenset[str] = frozenset()
    if operator in (TagOperator.EQUALS, TagOperator.NOT_EQUALS):
        values = frozenset({draw(mixed(TAG_VALUES, text))})
    elif operator in (TagOperator.IN, TagOperator.NOT_IN):
        values = draw(st.frozensets(mixed(TAG_VALUES, text), min_size=1, max_size=4))
    return SelectorSpec(key, operator, values)


_ORDERED = (
    TwinOperator.LESS,
    TwinOperator.LESS_OR_EQUAL,
    TwinOperator.GREATER,
    TwinOperator.GREATER_OR_EQUAL,
)


@st.composite
def twin_specs(draw: st.DrawFn, text: st.SearchStrategy[str] = default_text) -> TwinSpec:
    path = tuple(draw(st.lists(mixed(TWIN_KEYS, text), min_size=1, max_size=3)))
    operator = draw(st.sampled_from(list(TwinOperator)))
    values: tuple[object, ...] = ()
    if operator in _ORDERED:
        values = (
            draw(
                st.one_of(
                    st.sampled_from([v for v in TWIN_SCALARS if not isinstance(v, bool | None)]),
                    text,
                )
            ),
        )
    elif operator is TwinOperator.IN:
        values = tuple(draw(st.lists(st.sampled_from(TWIN_SCALARS), min_size=1, max_size=4)))
    elif operator in (TwinOperator.EQUALS, TwinOperator.NOT_EQUALS):
        values = (draw(st.one_of(st.sampled_from(TWIN_SCALARS), text)),)
    return TwinSpec(draw(st.sampled_from(["DESIRED", "REPORTED"])), path, operator, values)


def _version_range() -> st.SearchStrategy[tuple[int | None, int | None]]:
    bound = st.one_of(st.none(), st.integers(0, 3))
    return _maybe(st.tuples(bound, bound), (None, None))


@st.composite
def filter_specs(draw: st.DrawFn, text: st.SearchStrategy[str] = default_text) -> FilterSpec:
    return FilterSpec(
        twin_conditions=tuple(draw(_maybe(st.lists(twin_specs(text), min_size=1, max_size=3), []))),
        sync_statuses=draw(_small_set(st.sampled_from([s.value for s in TwinSyncStatus]))),
        desired_version=draw(_version_range()),
        reported_version=draw(_version_range()),
        statuses=draw(_small_set(st.sampled_from(STATUSES))),
        site_ids=draw(_small_set(mixed(SITE_IDS, text))),
        any_tag_keys=draw(_small_set(mixed(TAG_KEYS, text))),
        selectors=tuple(draw(_maybe(st.lists(selector_specs(text), min_size=1, max_size=4), []))),
        include_decommissioned=draw(st.booleans()),
        device_id_prefix=draw(_maybe(mixed(ID_PREFIXES, text), "")),
        name_prefix=draw(_maybe(mixed(NAME_PREFIXES, text), "")),
        last_seen_before=draw(_maybe(instants, None)),
        last_seen_after=draw(_maybe(instants, None)),
        models=draw(_small_set(mixed(MODELS, text))),
    )


def _scrambled(draw: st.DrawFn, values: frozenset[str]) -> list[str]:
    """``values`` shuffled, with some of them repeated."""
    base = sorted(values)
    repeats = draw(st.lists(st.sampled_from(base), max_size=3)) if base else []
    return draw(st.permutations(base + repeats))


def _absent(draw: st.DrawFn, out: dict[str, object], key: str, empty: object) -> None:
    """Spell "no condition" one of the ways proto3 JSON allows."""
    choice = draw(st.integers(0, 2))
    if choice == 1:
        out[key] = empty
    elif choice == 2:
        out[key] = None


def _list_with_shorthand(
    draw: st.DrawFn,
    out: dict[str, object],
    values: frozenset[str],
    long: str,
    short: str,
    short_empty: str | None,
) -> None:
    if not values:
        _absent(draw, out, long, [])
        _absent(draw, out, short, short_empty)
        return
    listed = _scrambled(draw, values)
    if draw(st.booleans()):
        single = draw(st.sampled_from(sorted(values)))
        out[short] = single
        # The shorthand and the list are unioned, so the list may or may
        # not repeat it.
        if draw(st.booleans()):
            listed = [v for v in listed if v != single]
    if listed:
        out[long] = listed
    else:
        _absent(draw, out, long, [])


def _selector_dict(draw: st.DrawFn, spec: SelectorSpec) -> dict[str, object]:
    op = spec.operator
    values = sorted(spec.values)
    if op in (TagOperator.EQUALS, TagOperator.NOT_EQUALS):
        if draw(st.booleans()):
            # EQUALS v is IN [v] (NOT_EQUALS likewise), repeats allowed.
            op = TagOperator.IN if op is TagOperator.EQUALS else TagOperator.NOT_IN
            return {
                "key": spec.key,
                "operator": op.value,
                "values": values * draw(st.integers(1, 3)),
            }
        return {"key": spec.key, "operator": op.value, "values": values}
    if op in (TagOperator.IN, TagOperator.NOT_IN):
        if len(values) == 1 and draw(st.booleans()):
            op = TagOperator.EQUALS if op is TagOperator.IN else TagOperator.NOT_EQUALS
            return {"key": spec.key, "operator": op.value, "values": values}
        return {"key": spec.key, "operator": op.value, "values": _scrambled(draw, spec.values)}
    out: dict[str, object] = {"key": spec.key, "operator": op.value}
    _absent(draw, out, "values", [])
    return out


def _twin_value(draw: st.DrawFn, value: object) -> object:
    # gRPC sends every number as a double: 2 and 2.0 spell one value.
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        return draw(st.sampled_from([value, float(value)]))
    return value


def twin_condition_dict(draw: st.DrawFn, spec: TwinSpec) -> dict[str, object]:
    op = spec.operator
    values = [_twin_value(draw, v) for v in spec.values]
    if op is TwinOperator.EQUALS and draw(st.booleans()):
        op = TwinOperator.IN  # EQUALS v is IN [v], repeats allowed
        values = values * draw(st.integers(1, 3))
    elif op is TwinOperator.IN:
        values = draw(st.permutations(values + draw(st.lists(st.sampled_from(values), max_size=2))))
    out: dict[str, object] = {
        "document": spec.document,
        "path": join_twin_path(spec.path),
        "operator": op.value,
    }
    if values:
        out["values"] = values
    else:
        _absent(draw, out, "values", [])
    return out


def _range_dict(draw: st.DrawFn, bounds: tuple[int | None, int | None]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, bound in zip(("min", "max"), bounds, strict=True):
        if bound is not None:
            # proto3 JSON writes int64 as a string.
            out[name] = draw(st.sampled_from([bound, str(bound)]))
        elif draw(st.booleans()):
            out[name] = None
    return out


def render_timestamp(draw: st.DrawFn, moment: datetime, *, bound: str) -> str:
    """Some RFC 3339 spelling of ``moment``, as a ``bound`` ("before"/"after").

    Sub-microsecond digits are only added where the parser's rounding (up
    for "before", down for "after") brings them back to ``moment``.
    """
    offset_minutes = draw(st.sampled_from([0, 0, 60, -300, 330, -(23 * 60 + 59), 14 * 60]))
    local = moment.astimezone(UTC) + timedelta(minutes=offset_minutes)
    nanos = local.microsecond * 1000
    if bound == "before" and draw(st.booleans()):
        local -= timedelta(microseconds=1)
        nanos = local.microsecond * 1000 + draw(st.integers(1, 999))
    elif bound == "after" and draw(st.booleans()):
        nanos += draw(st.integers(1, 999))
    digits = f"{nanos:09d}"
    if nanos % 1000 == 0:
        if nanos == 0:
            width = draw(st.sampled_from([0, 1, 3, 9]))
        elif nanos % 1_000_000 == 0:
            width = draw(st.sampled_from([3, 6, 9]))
        else:
            width = draw(st.sampled_from([6, 9]))
        fraction = "." + digits[:width] if width else ""
    else:
        fraction = "." + digits
    text = f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
    text += draw(st.sampled_from("Tt"))
    text += f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}{fraction}"
    if offset_minutes == 0 and draw(st.booleans()):
        return text + draw(st.sampled_from("Zz"))
    sign = "-" if offset_minutes < 0 else "+"
    hours, minutes = divmod(abs(offset_minutes), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


@st.composite
def render(draw: st.DrawFn, spec: FilterSpec) -> dict[str, object]:
    """One of the many request dicts that mean ``spec``."""
    out: dict[str, object] = {}
    # An enum has no empty spelling; a string's default is "".
    _list_with_shorthand(draw, out, spec.statuses, "statuses", "status", None)
    _list_with_shorthand(draw, out, spec.site_ids, "site_ids", "site_id", "")

    selectors = [_selector_dict(draw, s) for s in spec.selectors]
    selectors += draw(st.lists(st.sampled_from(selectors), max_size=2)) if selectors else []
    if len(spec.any_tag_keys) == 1 and draw(st.booleans()):
        # One-key "tags" is the same test as an EXISTS selector.
        (key,) = spec.any_tag_keys
        selectors.append({"key": key, "operator": "EXISTS"})
        if draw(st.booleans()):
            out["tags"] = [key]
    elif spec.any_tag_keys:
        out["tags"] = _scrambled(draw, spec.any_tag_keys)
    else:
        _absent(draw, out, "tags", [])
    if selectors:
        out["tag_selectors"] = draw(st.permutations(selectors))
    else:
        _absent(draw, out, "tag_selectors", [])

    if spec.include_decommissioned:
        out["include_decommissioned"] = True
    else:
        _absent(draw, out, "include_decommissioned", False)
    for name, prefix in (
        ("device_id_prefix", spec.device_id_prefix),
        ("name_prefix", spec.name_prefix),
    ):
        if prefix:
            out[name] = prefix
        else:
            _absent(draw, out, name, "")
    for name, bound, moment in (
        ("last_seen_before", "before", spec.last_seen_before),
        ("last_seen_after", "after", spec.last_seen_after),
    ):
        if moment is not None:
            out[name] = render_timestamp(draw, moment, bound=bound)
        elif draw(st.booleans()):
            out[name] = None
    if spec.models:
        out["models"] = _scrambled(draw, spec.models)
    else:
        _absent(draw, out, "models", [])
    conditions = [twin_condition_dict(draw, c) for c in spec.twin_conditions]
    if conditions:
        conditions += draw(st.lists(st.sampled_from(conditions), max_size=2))
        out["twin_conditions"] = draw(st.permutations(conditions))
    else:
        _absent(draw, out, "twin_conditions", [])
    if spec.sync_statuses:
        out["sync_statuses"] = _scrambled(draw, spec.sync_statuses)
    else:
        _absent(draw, out, "sync_statuses", [])
    for name, bounds in (
        ("desired_version", spec.desired_version),
        ("reported_version", spec.reported_version),
    ):
        if bounds != (None, None) or draw(st.booleans()):
            out[name] = _range_dict(draw, bounds)
    order = draw(st.permutations(list(out)))
    return {k: out[k] for k in order}


def filter_dicts(
    text: st.SearchStrategy[str] = default_text,
) -> st.SearchStrategy[dict[str, object]]:
    """Valid request dicts, in every spelling the language allows."""
    return filter_specs(text).flatmap(render)


def equivalent_filter_dicts(
    text: st.SearchStrategy[str] = default_text,
) -> st.SearchStrategy[tuple[dict[str, object], dict[str, object]]]:
    """Two independently spelled request dicts with the same meaning."""
    return filter_specs(text).flatmap(lambda spec: st.tuples(render(spec), render(spec)))


def device_filters(text: st.SearchStrategy[str] = default_text) -> st.SearchStrategy[DeviceFilter]:
    """Parsed filters (hence normalised)."""
    return filter_dicts(text).map(parse_filter)


@st.composite
def device_rows(draw: st.DrawFn, text: st.SearchStrategy[str] = safe_text) -> DeviceRow:
    """Devices over the filters' vocabulary; ``site_id`` only from SITE_IDS."""
    desired = draw(twin_documents(text))
    return DeviceRow(
        device_id=draw(mixed(DEVICE_IDS, text)),
        name=draw(st.one_of(st.sampled_from(NAMES), text)),
        site_id=draw(st.one_of(st.none(), st.sampled_from(SITE_IDS))),
        model=draw(st.sampled_from(MODELS)),
        tags=draw(st.dictionaries(mixed(TAG_KEYS, text), st.sampled_from(TAG_VALUES), max_size=4)),
        lifecycle=draw(st.sampled_from(("ACTIVE", *LIFECYCLES))),
        status=draw(st.sampled_from(STATUSES)),
        last_seen_at=draw(st.one_of(st.none(), instants)),
        desired=desired,
        # Often the same document, so that some twins are in sync.
        reported=draw(st.one_of(st.just(desired), twin_documents(text))),
        desired_version=draw(st.integers(0, 3)),
        reported_version=draw(st.integers(0, 3)),
        desired_updated_at=draw(st.sampled_from(TWIN_TIMES)),
        reported_updated_at=draw(st.sampled_from(TWIN_TIMES)),
    )


def twin_documents(
    text: st.SearchStrategy[str] = safe_text,
) -> st.SearchStrategy[dict[str, object]]:
    """Small twin documents over TWIN_KEYS, with nested objects and arrays."""
    scalars = st.one_of(st.sampled_from(TWIN_SCALARS), text)
    values = st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=2),
            st.dictionaries(mixed(TWIN_KEYS, text), inner, max_size=3),
        ),
        max_leaves=6,
    )
    return st.dictionaries(mixed(TWIN_KEYS, text), values, max_size=4)


def json_values(keys: Sequence[str]) -> st.SearchStrategy[object]:
    """Arbitrary JSON, with object keys often drawn from ``keys``, for fuzzing."""
    scalars: st.SearchStrategy[object] = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=8),
        st.sampled_from(STATUSES + tuple(o.value for o in TagOperator) + INSTANTS_TEXT),
    )

    def extend(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
        lists: st.SearchStrategy[object] = st.lists(children, max_size=4)
        objects: st.SearchStrategy[object] = st.dictionaries(
            st.one_of(st.sampled_from(list(keys)), st.text(max_size=6)), children, max_size=5
        )
        return st.one_of(lists, objects)

    return st.recursive(scalars, extend, max_leaves=20)
