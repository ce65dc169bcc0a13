"""Device filter language: parsing, canonical form, SQL compilation, semantics.

The database half of the story (SQL selects exactly what ``matches`` accepts)
is a separate test; here the SQL is checked for shape and for never carrying
a value in its text.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from server.filters import (
    FIELDS,
    MAX_ID_LENGTH,
    MAX_LIST_ITEMS,
    MAX_MODEL_LENGTH,
    MAX_PREFIX_LENGTH,
    MAX_TAG_KEY_LENGTH,
    MAX_TAG_SELECTORS,
    MAX_TAG_VALUE_LENGTH,
    CompiledFilter,
    ConnectivityStatus,
    DeviceFilter,
    DeviceRow,
    FieldViolation,
    FilterError,
    TagOperator,
    TagSelector,
    TwinCondition,
    TwinDocument,
    TwinOperator,
    canonical_json,
    canonical_text,
    compile_filter,
    format_timestamp,
    matches,
    normalise_filter,
    parse_filter,
    prefix_upper_bound,
    split_twin_path,
)
from tests.unit.filter_strategies import (
    INJECTION_STRINGS,
    device_filters,
    device_rows,
    equivalent_filter_dicts,
    filter_dicts,
    hostile_text,
    json_values,
)

UPSTREAM = {"status": "ONLINE", "tags": ["production"], "site_id": "site-01"}


def violations(data: Any, **kwargs: str) -> list[FieldViolation]:
    with pytest.raises(FilterError) as info:
        parse_filter(data, **kwargs)
    return info.value.violations


def device(**overrides: Any) -> DeviceRow:
    fields: dict[str, Any] = {
        "device_id": "dev-1",
        "name": "Boiler",
        "site_id": "site-01",
        "model": "m1",
        "tags": {"env": "prod", "production": ""},
        "lifecycle": "ACTIVE",
        "status": "ONLINE",
        "last_seen_at": datetime(2024, 1, 1, tzinfo=UTC),
    }
    fields.update(overrides)
    return DeviceRow(**fields)


def f(**data: object) -> DeviceFilter:
    return parse_filter(data)


# --------------------------------------------------------------------------
# Parsing


def test_upstream_form_parses_into_the_long_form() -> None:
    assert parse_filter(UPSTREAM) == DeviceFilter(
        statuses=(ConnectivityStatus.ONLINE,),
        site_ids=("site-01",),
        tag_selectors=(TagSelector("production", TagOperator.EXISTS),),
    )


def test_every_field_parses() -> None:
    parsed = parse_filter(
        {
            "statuses": ["STALE", "OFFLINE"],
            "site_ids": ["b", "a"],
            "tags": ["x", "y"],
            "tag_selectors": [
                {"key": "env", "operator": "IN", "values": ["prod", "dev"]},
                {"key": "tier", "operator": "DOES_NOT_EXIST"},
            ],
            "include_decommissioned": True,
            "device_id_prefix": "dev-",
            "name_prefix": "Boil",
            "last_seen_before": "2024-05-01T12:00:00Z",
            "last_seen_after": "2024-04-01T00:00:00+02:00",
            "models": ["m2", ""],
        }
    )
    assert parsed == DeviceFilter(
        statuses=(ConnectivityStatus.OFFLINE, ConnectivityStatus.STALE),
        site_ids=("a", "b"),
        any_tag_keys=("x", "y"),
        tag_selectors=(
            TagSelector("env", TagOperator.IN, ("dev", "prod")),
            TagSelector("tier", TagOperator.DOES_NOT_EXIST),
        ),
        include_decommissioned=True,
        device_id_prefix="dev-",
        name_prefix="Boil",
        last_seen_before=datetime(2024, 5, 1, 12, tzinfo=UTC),
        last_seen_after=datetime(2024, 3, 31, 22, tzinfo=UTC),
        models=("", "m2"),
    )


def test_null_and_empty_values_mean_absent() -> None:
    data: dict[str, object] = {name: None for name in FIELDS}
    data.update(statuses=[], site_id="", site_ids=[], tags=[], device_id_prefix="", models=[])
    assert parse_filter(data) == DeviceFilter()


too_long = "x" * 129

INVALID: list[tuple[object, list[tuple[str, str]]]] = [
    # Shape and unknown fields.
    ([], [("filter", "must be an object, got array")]),
    ({"colour": "red"}, [("filter.colour", "unknown field")]),
    ({"Status": "ONLINE"}, [("filter.Status", "unknown field")]),
    ({"x" * 100: 1}, [("filter", "unknown field")]),
    (
        {"tag_selectors": [{"key": "a", "operator": "EXISTS", "value": "b"}]},
        [("filter.tag_selectors[0].value", "unknown field")],
    ),
    ({"tag_selectors": ["env"]}, [("filter.tag_selectors[0]", "must be an object, got string")]),
    ({"tag_selectors": {"key": "a"}}, [("filter.tag_selectors", "must be an array, got object")]),
    # Statuses.
    ({"status": 1}, [("filter.status", "got number")]),
    ({"status": "online"}, [("filter.status", "unknown status 'online'")]),
    ({"status": ""}, [("filter.status", "unknown status ''")]),
    ({"statuses": "ONLINE"}, [("filter.statuses", "must be an array, got string")]),
    (
        {"statuses": ["ONLINE", "ASLEEP", True]},
        [
            ("filter.statuses[1]", "unknown status 'ASLEEP'; expected one of ONLINE"),
            ("filter.statuses[2]", "got boolean"),
        ],
    ),
    # Tag selectors.
    (
        {"tag_selectors": [{"key": "a", "operator": "LIKE"}]},
        [("filter.tag_selectors[0].operator", "unknown operator 'LIKE'")],
    ),
    (
        {"tag_selectors": [{"key": "a"}]},
        [("filter.tag_selectors[0].operator", "is required")],
    ),
    (
        {"tag_selectors": [{"operator": "EXISTS"}]},
        [("filter.tag_selectors[0].key", "is required")],
    ),
    (
        {"tag_selectors": [{"key": "", "operator": "EXISTS"}]},
        [("filter.tag_selectors[0].key", "must not be empty")],
    ),
    (
        {"tag_selectors": [{"key": "a", "operator": "IN"}]},
        [("filter.tag_selectors[0].values", "IN needs at least one value, got none")],
    ),
    (
        {"tag_selectors": [{"key": "a", "operator": "NOT_IN", "values": []}]},
        [("filter.tag_selectors[0].values", "NOT_IN needs at least one value")],
    ),
    (
        {"tag_selectors": [{"key": "a", "operator": "EQUALS", "values": ["x", "y"]}]},
        [("filter.tag_selectors[0].values", "EQUALS takes exactly one value, got 2")],
    ),
    (
        {"tag_selectors": [{"key": "a", "operator": "NOT_EQUALS"}]},
        [("filter.tag_selectors[0].values", "NOT_EQUALS takes exactly one value, got 0")],
    ),
    (
        {"tag_selectors": [{"key": "a", "operator": "EXISTS", "values": ["x"]}]},
        [("filter.tag_selectors[0].values", "must be empty for EXISTS, got 1")],
    ),
    (
        {"tag_selectors": [{"key": "a", "operator": "DOES_NOT_EXIST", "values": [""]}]},
        [("filter.tag_selectors[0].values", "must be empty for DOES_NOT_EXIST")],
    ),
    (
        {"tag_selectors": [{"key": "a", "operator": "IN", "values": "x"}]},
        [("filter.tag_selectors[0].values", "must be an array, got string")],
    ),
    (
        {"tag_selectors": [{"key": "a", "operator": "IN", "values": ["x", 7]}]},
        [("filter.tag_selectors[0].values[1]", "must be a string, got number")],
    ),
    (
        {"tag_selectors": [{"key": ["a"], "operator": 3}]},
        [
            ("filter.tag_selectors[0].key", "must be a string, got array"),
            ("filter.tag_selectors[0].operator", "got number"),
        ],
    ),
    # Lengths.
    ({"site_id": too_long}, [("filter.site_id", "at most 128 characters long, got 129")]),
    ({"site_ids": ["ok", too_long]}, [("filter.site_ids[1]", "at most 128 characters")]),
    ({"tags": [too_long]}, [("filter.tags[0]", "at most 128 characters")]),
    ({"models": [too_long]}, [("filter.models[0]", "at most 128 characters")]),
    ({"device_id_prefix": too_long}, [("filter.device_id_prefix", "at most 128")]),
    ({"name_prefix": too_long}, [("filter.name_prefix", "at most 128")]),
    (
        {"tag_selectors": [{"key": too_long, "operator": "EXISTS"}]},
        [("filter.tag_selectors[0].key", "at most 128 characters")],
    ),
    (
        {"tag_selectors": [{"key": "k", "operator": "EQUALS", "values": ["v" * 257]}]},
        [("filter.tag_selectors[0].values[0]", "at most 256 characters long, got 257")],
    ),
    # Counts.
    ({"site_ids": ["s"] * 101}, [("filter.site_ids", "at most 100 items, got 101")]),
    ({"statuses": ["ONLINE"] * 101}, [("filter.statuses", "at most 100 items")]),
    ({"tags": ["t"] * 101}, [("filter.tags", "at most 100 items")]),
    ({"models": ["m"] * 101}, [("filter.models", "at most 100 items")]),
    (
        {"tag_selectors": [{"key": "k", "operator": "EXISTS"}] * 33},
        [("filter.tag_selectors", "at most 32 items, got 33")],
    ),
    (
        {"tag_selectors": [{"key": "k", "operator": "IN", "values": ["v"] * 101}]},
        [
            ("filter.tag_selectors[0].values", "at most 100 items"),
        ],
    ),
    # Empty strings where a value is required.
    ({"site_ids": [""]}, [("filter.site_ids[0]", "must not be empty")]),
    ({"tags": ["a", ""]}, [("filter.tags[1]", "must not be empty")]),
    # Control characters and lone surrogates.
    ({"site_id": "site\n01"}, [("filter.site_id", "control characters, found U+000A at index 4")]),
    ({"name_prefix": "a\x00"}, [("filter.name_prefix", "found U+0000 at index 1")]),
    ({"device_id_prefix": "\x7f"}, [("filter.device_id_prefix", "found U+007F")]),
    ({"models": ["m\x85"]}, [("filter.models[0]", "found U+0085")]),
    ({"tags": ["\ud800"]}, [("filter.tags[0]", "found U+D800")]),
    (
        {"tag_selectors": [{"key": "k", "operator": "EQUALS", "values": ["a\tb"]}]},
        [("filter.tag_selectors[0].values[0]", "found U+0009")],
    ),
    # Booleans.
    ({"include_decommissioned": "true"}, [("filter.include_decommissioned", "must be a boolean")]),
    ({"include_decommissioned": 1}, [("filter.include_decommissioned", "got number")]),
    # Timestamps.
    ({"last_seen_before": "yesterday"}, [("filter.last_seen_before", "RFC 3339")]),
    ({"last_seen_before": 1714564800}, [("filter.last_seen_before", "got number")]),
    ({"last_seen_after": "2024-05-01T12:00:00"}, [("filter.last_seen_after", "time zone")]),
    ({"last_seen_after": "2024-05-01"}, [("filter.last_seen_after", "RFC 3339")]),
    ({"last_seen_after": "2024-05-01 12:00:00Z"}, [("filter.last_seen_after", "RFC 3339")]),
    ({"last_seen_after": "2024-02-30T00:00:00Z"}, [("filter.last_seen_after", "out of range")]),
    ({"last_seen_after": "2024-05-01T24:00:00Z"}, [("filter.last_seen_after", "RFC 3339")]),
    ({"last_seen_after": "2016-12-31T23:59:60Z"}, [("filter.last_seen_after", "leap second")]),
    ({"last_seen_after": "2024-05-01T12:00:00+24:00"}, [("filter.last_seen_after", "offset")]),
    ({"last_seen_after": "2024-05-01T12:00:00.1234567891Z"}, [("filter.last_seen_after", "RFC")]),
    ({"last_seen_after": "٢٠٢٤-05-01T12:00:00Z"}, [("filter.last_seen_after", "RFC 3339")]),
    (
        {"last_seen_before": "9999-12-31T23:59:59.9999999Z"},
        [("filter.last_seen_before", "outside the supported range")],
    ),
    (
        {"last_seen_after": "0001-01-01T00:30:00+01:00"},
        [("filter.last_seen_after", "outside the supported range")],
    ),
]


@pytest.mark.parametrize(("data", "expected"), INVALID)
def test_invalid_filter_is_rejected_at_the_right_field(
    data: object, expected: list[tuple[str, str]]
) -> None:
    found = violations(data)
    assert [v.field for v in found] == [path for path, _ in expected], found
    for violation, (_, fragment) in zip(found, expected, strict=True):
        assert fragment in violation.description, violation


def test_all_violations_are_reported_together() -> None:
    found = violations(
        {
            "statuses": ["NOPE"],
            "bogus": 1,
            "site_ids": [""],
            "tag_selectors": [
                {"key": "ok", "operator": "EXISTS"},
                {"key": "k", "operator": "IN"},
                {"key": "k", "operator": "EQUALS", "values": ["a", "b"]},
            ],
            "include_decommissioned": "yes",
            "name_prefix": "\x01",
            "last_seen_before": "soon",
            "models": [None],
        }
    )
    assert [v.field for v in found] == [
        "filter.bogus",
        "filter.statuses[0]",
        "filter.site_ids[0]",
        "filter.tag_selectors[1].values",
        "filter.tag_selectors[2].values",
        "filter.include_decommissioned",
        "filter.name_prefix",
        "filter.last_seen_before",
        "filter.models[0]",
    ]


def test_field_prefix_is_prepended_to_every_path() -> None:
    data = {"statuses": ["X"], "tag_selectors": [{"key": "k", "operator": "IN"}]}
    nested = violations(data, field_prefix="group.filter")
    assert [v.field for v in nested] == [
        "group.filter.statuses[0]",
        "group.filter.tag_selectors[0].values",
    ]
    bare = violations(data, field_prefix="")
    assert [v.field for v in bare] == ["statuses[0]", "tag_selectors[0].values"]


def test_filter_error_is_a_value_error_naming_field_and_problem() -> None:
    with pytest.raises(ValueError, match=r"filter\.statuses\[0\]: unknown status 'X'"):
        parse_filter({"statuses": ["X"]})


def test_values_at_the_limits_are_accepted() -> None:
    parsed = parse_filter(
        {
            "site_ids": ["s" * MAX_ID_LENGTH] + [str(i) for i in range(MAX_LIST_ITEMS - 1)],
            "tags": ["k" * MAX_TAG_KEY_LENGTH, "other"],
            "models": ["m" * MAX_MODEL_LENGTH],
            "device_id_prefix": "d" * MAX_PREFIX_LENGTH,
            "name_prefix": "n" * MAX_PREFIX_LENGTH,
            "tag_selectors": [
                {"key": f"k{i}", "operator": "IN", "values": ["v" * MAX_TAG_VALUE_LENGTH, "w"]}
                for i in range(MAX_TAG_SELECTORS)
            ],
            # Unicode that is not a control character is fine anywhere.
            "site_id": "Zürich \u200d 💡",
        }
    )
    assert len(parsed.site_ids) == MAX_LIST_ITEMS + 1
    assert len(parsed.tag_selectors) == MAX_TAG_SELECTORS


def test_timestamps_are_converted_to_utc_and_rounded_to_keep_strict_bounds() -> None:
    parsed = parse_filter(
        {
            "last_seen_before": "2024-05-01T14:00:00.000000001+02:00",
            "last_seen_after": "2024-05-01t12:00:00.000001999z",
        }
    )
    assert parsed.last_seen_before == datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC)
    assert parsed.last_seen_after == datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC)


@given(st.integers(0, 10**9 - 1), st.integers(0, 10**6 - 1))
@example(nanos=999, seen_micros=0)
@example(nanos=1000, seen_micros=1)
@example(nanos=1001, seen_micros=1)
def test_sub_microsecond_bounds_keep_their_exact_meaning(nanos: int, seen_micros: int) -> None:
    # Devices are seen with microsecond resolution; a bound given in
    # nanoseconds must select exactly the devices the exact comparison would.
    text = f"2024-05-01T12:00:00.{nanos:09d}Z"
    row = device(last_seen_at=datetime(2024, 5, 1, 12, 0, 0, seen_micros, tzinfo=UTC))
    seen_nanos = seen_micros * 1000
    assert matches(f(last_seen_before=text), row) == (seen_nanos < nanos)
    assert matches(f(last_seen_after=text), row) == (seen_nanos > nanos)


@given(json_values((*FIELDS, "key", "operator", "values")))
def test_arbitrary_json_is_either_a_filter_or_a_filter_error(data: object) -> None:
    try:
        parsed = parse_filter(data)  # type: ignore[arg-type]
    except FilterError as exc:
        assert exc.violations
        assert all(v.field.startswith("filter") and v.description for v in exc.violations)
    else:
        assert parsed == normalise_filter(parsed)


# --------------------------------------------------------------------------
# Canonical form


def test_canonical_json_of_the_upstream_form() -> None:
    assert canonical_json(parse_filter(UPSTREAM)) == {
        "statuses": ["ONLINE"],
        "site_ids": ["site-01"],
        "tag_selectors": [{"key": "production", "operator": "EXISTS"}],
    }


def test_differently_written_equal_filters_have_one_canonical_text() -> None:
    one = {
        "status": "ONLINE",
        "statuses": ["STALE", "ONLINE"],
        "tags": ["production"],
        "tag_selectors": [
            {"key": "env", "operator": "IN", "values": ["prod"]},
            {"key": "tier", "operator": "NOT_IN", "values": ["b", "a", "b"]},
        ],
        "include_decommissioned": False,
        "last_seen_after": "2024-05-01T14:00:00+02:00",
        "models": ["m2", "m1", "m2"],
        "name_prefix": "",
    }
    other = {
        "models": ["m1", "m2"],
        "last_seen_after": "2024-05-01T12:00:00.000Z",
        "tag_selectors": [
            {"key": "tier", "operator": "NOT_IN", "values": ["a", "b"]},
            {"key": "production", "operator": "EXISTS", "values": []},
            {"key": "env", "operator": "EQUALS", "values": ["prod"]},
            {"key": "production", "operator": "EXISTS"},
        ],
        "statuses": ["ONLINE", "STALE"],
    }
    assert canonical_text(parse_filter(one)) == canonical_text(parse_filter(other))
    assert canonical_text(parse_filter(one)) == (
        '{"last_seen_after":"2024-05-01T12:00:00Z","models":["m1","m2"],'
        '"statuses":["ONLINE","STALE"],"tag_selectors":['
        '{"key":"env","operator":"EQUALS","values":["prod"]},'
        '{"key":"production","operator":"EXISTS"},'
        '{"key":"tier","operator":"NOT_IN","values":["a","b"]}]}'
    )


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ({"tags": ["a", "b"]}, {"tag_selectors": [{"key": "a", "operator": "EXISTS"}]}),
        (
            {"tags": ["a", "b"]},
            {
                "tag_selectors": [
                    {"key": "a", "operator": "EXISTS"},
                    {"key": "b", "operator": "EXISTS"},
                ]
            },
        ),
        (
            {"tag_selectors": [{"key": "a", "operator": "NOT_IN", "values": ["x"]}]},
            {"tag_selectors": [{"key": "a", "operator": "DOES_NOT_EXIST"}]},
        ),
        ({"include_decommissioned": True}, {}),
        ({"status": "ONLINE"}, {"statuses": ["ONLINE", "STALE"]}),
        ({"models": [""]}, {}),
        ({"last_seen_before": "2024-01-01T00:00:00Z"}, {"last_seen_after": "2024-01-01T00:00:00Z"}),
        ({"device_id_prefix": "a"}, {"name_prefix": "a"}),
    ],
)
def test_different_filters_have_different_canonical_text(
    one: dict[str, object], other: dict[str, object]
) -> None:
    assert canonical_text(parse_filter(one)) != canonical_text(parse_filter(other))


@given(equivalent_filter_dicts())
def test_equivalent_spellings_give_identical_canonical_text(
    pair: tuple[dict[str, object], dict[str, object]],
) -> None:
    one, other = (parse_filter(d) for d in pair)
    assert canonical_text(one) == canonical_text(other)
    assert one == other


@given(filter_dicts())
def test_canonical_json_round_trips(data: dict[str, object]) -> None:
    parsed = parse_filter(data)
    canonical = canonical_json(parsed)
    assert parse_filter(canonical) == parsed
    # What is stored is the text; it must parse back to the same filter too.
    assert parse_filter(json.loads(canonical_text(parsed))) == parsed
    assert canonical_json(parse_filter(canonical)) == canonical


def test_hand_built_filters_canonicalise_like_parsed_ones() -> None:
    hand_built = DeviceFilter(
        statuses=(ConnectivityStatus.STALE, ConnectivityStatus.ONLINE, ConnectivityStatus.STALE),
        any_tag_keys=("production",),
        tag_selectors=(TagSelector("env", TagOperator.NOT_IN, ("x",)),),
        last_seen_after=datetime(2024, 5, 1, 16, tzinfo=timezone(timedelta(hours=2))),
    )
    parsed = parse_filter(
        {
            "statuses": ["ONLINE", "STALE"],
            "tags": ["production"],
            "tag_selectors": [{"key": "env", "operator": "NOT_EQUALS", "values": ["x"]}],
            "last_seen_after": "2024-05-01T14:00:00Z",
        }
    )
    assert canonical_text(hand_built) == canonical_text(parsed)
    assert normalise_filter(hand_built) == parsed


def test_hand_built_selector_with_wrong_value_count_is_refused() -> None:
    with pytest.raises(ValueError, match="exactly one value"):
        canonical_json(DeviceFilter(tag_selectors=(TagSelector("k", TagOperator.EQUALS),)))
    with pytest.raises(ValueError, match="timezone-aware"):
        compile_filter(DeviceFilter(last_seen_after=datetime(2024, 1, 1)), first_param=1)


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2024, 5, 1, 12, tzinfo=UTC), "2024-05-01T12:00:00Z"),
        (datetime(2024, 5, 1, 12, 0, 0, 120000, tzinfo=UTC), "2024-05-01T12:00:00.120Z"),
        (datetime(2024, 5, 1, 12, 0, 0, 120001, tzinfo=UTC), "2024-05-01T12:00:00.120001Z"),
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00Z"),
    ],
)
def test_format_timestamp(moment: datetime, text: str) -> None:
    assert format_timestamp(moment) == text


# --------------------------------------------------------------------------
# SQL

# Everything the compiler may write. A value leaking into the text would
# need a quote, a digit outside a placeholder or a word not listed here.
SQL_TOKEN = re.compile(
    r"""
    \s+
    | \$[1-9][0-9]*
    | ::text\[\]::jsonb\[\] | ::text::jsonb | ::text::numeric | ::text\[\] | ::timestamptz
    | ::text | ::numeric | ::interval | ::bigint
    | d\.(?:lifecycle|site_id|model|device_id|name|tags)
    | s\.(?:status|last_seen_at|desired_version|reported_version|desired_updated_at
           |reported_updated_at|desired|reported)
    | COLLATE\ "C"
    | (?:AND|OR|NOT|IS|NULL|ANY|TRUE|CASE|WHEN|THEN|ELSE|END|false|starts_with|jsonb_typeof
         |coalesce|now)\b
    | <> | >= | <= | = | < | > | - | \?\| | \? | @> | -> | \#>> | \( | \) | ,
    """,
    re.VERBOSE,
)


def assert_sql_is_only_fixed_tokens(sql: str) -> None:
    pos = 0
    while pos < len(sql):
        token = SQL_TOKEN.match(sql, pos)
        assert token is not None, f"unexpected SQL text at {pos}: {sql[pos : pos + 30]!r}"
        pos = token.end()


def param_atoms(params: list[object]) -> set[str]:
    """Every string the parameters carry, looking inside tag and twin JSON."""
    atoms: set[str] = set()

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                atoms.add(key)
                walk(inner)
        elif isinstance(value, str):
            atoms.add(value)

    for param in params:
        for item in param if isinstance(param, list) else [param]:
            if isinstance(item, str):
                atoms.add(item)
                try:
                    walk(json.loads(item))
                except json.JSONDecodeError:
                    continue
    return atoms


def filter_strings(parsed: DeviceFilter) -> set[str]:
    strings = {*parsed.site_ids, *parsed.any_tag_keys, *parsed.models}
    strings |= {parsed.device_id_prefix, parsed.name_prefix} - {""}
    for selector in parsed.tag_selectors:
        strings |= {selector.key, *selector.values}
    for condition in parsed.twin_conditions:
        strings |= set(condition.path)
        strings |= {v for v in condition.decoded_values() if isinstance(v, str)}
    return strings


@given(filter_dicts(hostile_text), st.integers(1, 50))
def test_values_never_reach_the_sql_text(data: dict[str, object], first_param: int) -> None:
    parsed = parse_filter(data)
    compiled = compile_filter(parsed, first_param=first_param)
    assert_sql_is_only_fixed_tokens(compiled.sql)
    for payload in INJECTION_STRINGS:
        assert payload not in compiled.sql
    assert "'" not in compiled.sql
    numbers = [int(n) for n in re.findall(r"\$([0-9]+)", compiled.sql)]
    assert sorted(numbers) == list(range(first_param, first_param + len(compiled.params)))
    # ...and the values did go somewhere: into the parameters.
    assert filter_strings(parsed) <= param_atoms(compiled.params)


@given(device_filters(), st.integers(1, 50))
def test_sql_placeholders_match_params(parsed: DeviceFilter, first_param: int) -> None:
    compiled = compile_filter(parsed, first_param=first_param)
    numbers = re.findall(r"\$([0-9]+)", compiled.sql)
    assert len(set(numbers)) == len(numbers) == len(compiled.params)
    assert {int(n) for n in numbers} == set(range(first_param, first_param + len(numbers)))
    for param in compiled.params:
        assert param is not None
        if isinstance(param, datetime):
            assert param.tzinfo is not None


def test_compiled_upstream_example() -> None:
    compiled = compile_filter(parse_filter(UPSTREAM), first_param=2)
    assert compiled == CompiledFilter(
        "(d.lifecycle <> $2::text"
        " AND s.status IS NOT NULL AND s.status = ANY($3::text[])"
        " AND d.site_id IS NOT NULL AND d.site_id = ANY($4::text[])"
        " AND d.tags ? $5::text)",
        ["DECOMMISSIONED", ["ONLINE"], ["site-01"], "production"],
    )


@pytest.mark.parametrize(
    ("data", "sql", "params"),
    [
        ({"include_decommissioned": True}, "TRUE", []),
        ({}, "d.lifecycle <> $1::text", ["DECOMMISSIONED"]),
        (
            {"models": ["", "m"], "include_decommissioned": True},
            "d.model = ANY($1::text[])",
            [["", "m"]],
        ),
        (
            {"device_id_prefix": "dev%", "include_decommissioned": True},
            '(d.device_id COLLATE "C" >= $1::text AND d.device_id COLLATE "C" < $2::text)',
            ["dev%", "dev&"],
        ),
        (
            {"device_id_prefix": "\U0010ffff", "include_decommissioned": True},
            'd.device_id COLLATE "C" >= $1::text',
            ["\U0010ffff"],
        ),
        (
            {"name_prefix": "a_b", "include_decommissioned": True},
            'starts_with(d.name COLLATE "C", $1::text)',
            ["a_b"],
        ),
        (
            {"tags": ["b", "a"], "include_decommissioned": True},
            "d.tags ?| $1::text[]",
            [["a", "b"]],
        ),
        (
            {
                "tag_selectors": [{"key": "k", "operator": "DOES_NOT_EXIST"}],
                "include_decommissioned": True,
            },
            "NOT (d.tags ? $1::text)",
            ["k"],
        ),
        (
            {
                "tag_selectors": [{"key": 'k"', "operator": "EQUALS", "values": ["v'"]}],
                "include_decommissioned": True,
            },
            "d.tags @> $1::text::jsonb",
            ['{"k\\"":"v\'"}'],
        ),
        (
            {
                "tag_selectors": [{"key": "k", "operator": "NOT_EQUALS", "values": [""]}],
                "include_decommissioned": True,
            },
            "NOT (d.tags @> $1::text::jsonb)",
            ['{"k":""}'],
        ),
        (
            {
                "tag_selectors": [{"key": "k", "operator": "IN", "values": ["b", "a"]}],
                "include_decommissioned": True,
            },
            "d.tags @> ANY($1::text[]::jsonb[])",
            [['{"k":"a"}', '{"k":"b"}']],
        ),
        (
            {
                "tag_selectors": [{"key": "k", "operator": "NOT_IN", "values": ["b", "a"]}],
                "include_decommissioned": True,
            },
            "NOT (d.tags @> ANY($1::text[]::jsonb[]))",
            [['{"k":"a"}', '{"k":"b"}']],
        ),
        (
            {"last_seen_after": "2024-01-01T00:00:00Z", "include_decommissioned": True},
            "(s.last_seen_at IS NOT NULL AND s.last_seen_at > $1::timestamptz)",
            [datetime(2024, 1, 1, tzinfo=UTC)],
        ),
        (
            {"last_seen_before": "2024-01-01T00:00:00Z", "include_decommissioned": True},
            "(s.last_seen_at IS NOT NULL AND s.last_seen_at < $1::timestamptz)",
            [datetime(2024, 1, 1, tzinfo=UTC)],
        ),
    ],
)
def test_each_condition_compiles_to_its_sql(
    data: dict[str, object], sql: str, params: list[object]
) -> None:
    assert compile_filter(parse_filter(data), first_param=1) == CompiledFilter(sql, params)


def test_first_param_must_be_positive() -> None:
    with pytest.raises(ValueError, match="first_param"):
        compile_filter(DeviceFilter(), first_param=0)


@pytest.mark.parametrize(
    ("prefix", "bound"),
    [
        ("dev", "dew"),
        ("dev%", "dev&"),
        ("a\U0010ffff", "b"),
        ("a\U0010ffff\U0010ffff", "b"),
        ("\U0010ffff", None),
        ("\ud7ff", "\ue000"),
        ("", None),
    ],
)
def test_prefix_upper_bound(prefix: str, bound: str | None) -> None:
    assert prefix_upper_bound(prefix) == bound


# Code points next to the edges the bound arithmetic has to step over.
edgy_text = st.text(
    alphabet=st.sampled_from(
        ["a", "b", "\x7f", "\x80", "\ud7ff", "\ue000", "\uffff", "\U00010000", "\U0010ffff"]
    ),
    max_size=4,
)


@given(edgy_text, edgy_text)
def test_prefix_range_is_exactly_starts_with(prefix: str, text: str) -> None:
    # Python orders str by code point, which is the byte order of UTF-8 and
    # hence of the "C" collation the SQL range is evaluated in.
    upper = prefix_upper_bound(prefix)
    in_range = prefix <= text and (upper is None or text < upper)
    assert in_range == text.startswith(prefix)


# --------------------------------------------------------------------------
# Semantics (the reference the SQL is tested against)


def test_upstream_example_semantics() -> None:
    upstream = parse_filter(UPSTREAM)
    assert matches(upstream, device())
    assert not matches(upstream, device(status="OFFLINE"))
    assert not matches(upstream, device(site_id="site-02"))
    assert not matches(upstream, device(site_id=None))
    assert not matches(upstream, device(tags={"env": "prod"}))
    assert matches(upstream, device(tags={"production": "yes"}))


def test_empty_filter_matches_active_devices_only() -> None:
    assert matches(DeviceFilter(), device())
    assert not matches(DeviceFilter(), device(lifecycle="DECOMMISSIONED"))
    assert matches(f(include_decommissioned=True), device(lifecycle="DECOMMISSIONED"))
    assert not matches(f(include_decommissioned=False), device(lifecycle="DECOMMISSIONED"))


def selector(key: str, operator: str, *values: str) -> DeviceFilter:
    entry: dict[str, object] = {"key": key, "operator": operator, "values": list(values)}
    return f(tag_selectors=[entry])


@pytest.mark.parametrize(
    ("flt", "tags", "expected"),
    [
        (selector("env", "EXISTS"), {"env": ""}, True),
        (selector("env", "EXISTS"), {"Env": "prod"}, False),
        (selector("env", "DOES_NOT_EXIST"), {}, True),
        (selector("env", "DOES_NOT_EXIST"), {"env": ""}, False),
        (selector("env", "EQUALS", "prod"), {"env": "prod"}, True),
        (selector("env", "EQUALS", "prod"), {"env": "PROD"}, False),
        (selector("env", "EQUALS", "prod"), {}, False),
        (selector("env", "EQUALS", ""), {"env": ""}, True),
        (selector("env", "NOT_EQUALS", "prod"), {"env": "dev"}, True),
        (selector("env", "NOT_EQUALS", "prod"), {"env": "prod"}, False),
        # Kubernetes: the negative operators also select devices without the key.
        (selector("env", "NOT_EQUALS", "prod"), {}, True),
        (selector("env", "IN", "prod", "dev"), {"env": "dev"}, True),
        (selector("env", "IN", "prod", "dev"), {"env": "test"}, False),
        (selector("env", "IN", "prod", "dev"), {}, False),
        (selector("env", "NOT_IN", "prod", "dev"), {"env": "test"}, True),
        (selector("env", "NOT_IN", "prod", "dev"), {"env": "prod"}, False),
        (selector("env", "NOT_IN", "prod", "dev"), {}, True),
        (f(tags=["a", "b"]), {"b": ""}, True),
        (f(tags=["a", "b"]), {"c": ""}, False),
        (
            f(
                tag_selectors=[
                    {"key": "env", "operator": "EQUALS", "values": ["prod"]},
                    {"key": "tier", "operator": "EXISTS"},
                ]
            ),
            {"env": "prod"},
            False,
        ),
    ],
)
def test_tag_semantics(flt: DeviceFilter, tags: dict[str, str], expected: bool) -> None:
    assert matches(flt, device(tags=tags)) is expected


@pytest.mark.parametrize(
    ("prefix", "device_id", "expected"),
    [
        ("dev", "dev-1", True),
        ("dev-1", "dev-1", True),
        ("Dev", "dev-1", False),
        ("dev%", "dev-1", False),
        ("dev%", "dev%1", True),
        ("dev_", "dev-1", False),
        ("dev_", "dev_1", True),
        ("dev-10", "dev-1", False),
    ],
)
def test_device_id_prefix_is_literal_and_case_sensitive(
    prefix: str, device_id: str, expected: bool
) -> None:
    assert matches(f(device_id_prefix=prefix), device(device_id=device_id)) is expected


def test_name_prefix_is_literal() -> None:
    assert matches(f(name_prefix="Boil%"), device(name="Boil%er"))
    assert not matches(f(name_prefix="Boil%"), device(name="Boiler"))
    assert not matches(f(name_prefix="_oil"), device(name="Boiler"))
    assert not matches(f(name_prefix="boil"), device(name="Boiler"))


def test_last_seen_bounds_are_strict_and_never_match_unseen_devices() -> None:
    t = "2024-01-01T00:00:00Z"
    at = datetime(2024, 1, 1, tzinfo=UTC)
    tick = timedelta(microseconds=1)
    assert not matches(f(last_seen_before=t), device(last_seen_at=at))
    assert matches(f(last_seen_before=t), device(last_seen_at=at - tick))
    assert not matches(f(last_seen_after=t), device(last_seen_at=at))
    assert matches(f(last_seen_after=t), device(last_seen_at=at + tick))
    assert not matches(f(last_seen_before=t), device(last_seen_at=None))
    assert not matches(f(last_seen_after=t), device(last_seen_at=None))


def test_list_conditions_or_inside_and_across() -> None:
    flt = f(statuses=["ONLINE", "STALE"], models=["", "m2"], site_ids=["site-01", "site-02"])
    assert matches(flt, device(status="STALE", model="", site_id="site-02"))
    assert not matches(flt, device(status="OFFLINE", model="", site_id="site-02"))
    assert not matches(flt, device(status="STALE", model="m1", site_id="site-02"))
    assert not matches(flt, device(status="STALE", model="", site_id=None))


@given(equivalent_filter_dicts(), device_rows())
def test_equivalent_spellings_select_the_same_devices(
    pair: tuple[dict[str, object], dict[str, object]], row: DeviceRow
) -> None:
    one, other = pair
    # matches() evaluates a filter as written, so this checks that
    # normalisation (folding, IN -> EQUALS, ...) never changes the meaning.
    assert matches(_as_written(one), row) == matches(parse_filter(one), row)
    assert matches(_as_written(other), row) == matches(parse_filter(other), row)
    assert matches(parse_filter(one), row) == matches(parse_filter(other), row)


def _as_written(data: dict[str, object]) -> DeviceFilter:
    """A filter as written, bypassing normalisation, for the equivalence test."""
    parsed = parse_filter(data)
    raw_selectors = data.get("tag_selectors") or []
    assert isinstance(raw_selectors, list)
    selectors = tuple(
        TagSelector(s["key"], TagOperator(s["operator"]), tuple(s.get("values") or ()))
        for s in raw_selectors
    )
    raw_tags = data.get("tags") or []
    assert isinstance(raw_tags, list)
    raw_conditions = data.get("twin_conditions") or []
    assert isinstance(raw_conditions, list)
    conditions = tuple(
        TwinCondition(
            TwinDocument(c["document"]),
            split_twin_path(c["path"]),
            TwinOperator(c["operator"]),
            tuple(json.dumps(v) for v in c.get("values") or ()),
        )
        for c in raw_conditions
    )
    return DeviceFilter(
        twin_conditions=conditions,
        sync_statuses=parsed.sync_statuses,
        desired_version=parsed.desired_version,
        reported_version=parsed.reported_version,
        statuses=parsed.statuses,
        site_ids=parsed.site_ids,
        any_tag_keys=tuple(raw_tags),
        tag_selectors=selectors,
        include_decommissioned=parsed.include_decommissioned,
        device_id_prefix=parsed.device_id_prefix,
        name_prefix=parsed.name_prefix,
        last_seen_before=parsed.last_seen_before,
        last_seen_after=parsed.last_seen_after,
        models=parsed.models,
    )
