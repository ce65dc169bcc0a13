"""Twin conditions, sync status and version ranges in the filter language:
the reference semantics by example, paths and their escaping, the
canonical form and the errors. The SQL is checked against this reference in
tests/groups/test_twin_filters.py and tests/groups/test_membership.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.filters import (
    DeviceRow,
    FilterError,
    canonical_json,
    join_twin_path,
    matches,
    parse_filter,
    split_twin_path,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def device(reported: dict[str, Any] | None = None, **fields: Any) -> DeviceRow:
    base: dict[str, Any] = {
        "device_id": "d",
        "name": "",
        "site_id": None,
        "model": "",
        "tags": {},
        "lifecycle": "ACTIVE",
        "status": "ONLINE",
        "last_seen_at": None,
        "reported": reported or {},
    }
    base.update(fields)
    return DeviceRow(**base)


def cond(path: str, operator: str, *values: Any, document: str = "REPORTED") -> dict[str, Any]:
    return {"twin_conditions": [{"document": document, "path": path, "operator": operator,
                                 "values": list(values)}]}  # fmt: skip


def selects(data: dict[str, Any], row: DeviceRow) -> bool:
    return matches(parse_filter(data), row, now=NOW)


def test_values_are_typed_and_numbers_compare_by_value() -> None:
    assert selects(cond("v", "EQUALS", 1), device({"v": 1.0}))
    assert not selects(cond("v", "EQUALS", 1), device({"v": "1"}))
    assert not selects(cond("v", "EQUALS", 1), device({"v": True}))
    assert not selects(cond("v", "EQUALS", True), device({"v": 1}))
    assert selects(cond("v", "EQUALS", None), device({"v": None}))
    assert not selects(cond("v", "EQUALS", None), device({}))
    assert selects(cond("v", "IN", "a", 2), device({"v": 2}))
    assert not selects(cond("v", "IN", "a", 2), device({"v": ["a"]}))


def test_not_equals_and_does_not_exist_match_a_missing_path() -> None:
    assert selects(cond("mode", "NOT_EQUALS", "eco"), device({}))
    assert selects(cond("mode", "NOT_EQUALS", "eco"), device({"mode": "boost"}))
    assert not selects(cond("mode", "NOT_EQUALS", "eco"), device({"mode": "eco"}))
    assert selects(cond("mode", "DOES_NOT_EXIST"), device({"other": 1}))
    assert selects(cond("mode", "EXISTS"), device({"mode": None}))


def test_ordering_compares_numbers_with_numbers_and_strings_by_code_point() -> None:
    assert selects(cond("fw", "LESS", "2.4"), device({"fw": "2.3.9"}))
    assert selects(cond("fw", "LESS", "2.4"), device({"fw": "2.10"}))  # not a version order
    assert not selects(cond("fw", "LESS", "2.4"), device({"fw": 2.3}))
    assert selects(cond("t", "GREATER_OR_EQUAL", 40), device({"t": 40.0}))
    assert not selects(cond("t", "GREATER", 40), device({"t": "50"}))
    assert selects(cond("t", "LESS_OR_EQUAL", 0.1), device({"t": 0.1}))
    assert selects(cond("t", "LESS", 2**53 + 1), device({"t": 2**53}))
    assert not selects(cond("s", "GREATER", "Z"), device({"s": "A"}))
    assert selects(cond("s", "GREATER", "Z"), device({"s": "a"}))


def test_paths_walk_objects_only() -> None:
    doc = {"fw": {"version": "2.4"}, "list": [{"x": 1}], "a.b": {"c": 1}, "0": "zero"}
    assert selects(cond("fw.version", "EXISTS"), device(doc))
    assert not selects(cond("fw.version.major", "EXISTS"), device(doc))
    assert not selects(cond("list.0.x", "EXISTS"), device(doc))
    assert not selects(cond("list.x", "EXISTS"), device(doc))
    assert selects(cond("0", "EQUALS", "zero"), device(doc))
    assert selects(cond("a\\.b.c", "EQUALS", 1), device(doc))
    assert not selects(cond("a.b.c", "EXISTS"), device(doc))


def test_desired_and_reported_are_different_documents() -> None:
    row = device({"mode": "eco"}, desired={"mode": "boost"})
    assert selects(cond("mode", "EQUALS", "boost", document="DESIRED"), row)
    assert not selects(cond("mode", "EQUALS", "boost"), row)


@given(st.lists(st.text(min_size=1, max_size=5, alphabet="ab.\\~ "), min_size=1, max_size=5))
def test_path_escaping_round_trips(keys: list[str]) -> None:
    assert split_twin_path(join_twin_path(keys)) == tuple(keys)


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("", "must not be empty"),
        ("a.", "must not end with a dot"),
        (".a", "empty key before index 0; keys are separated by one dot"),
        ("a\\", "unknown escape at index 1: only \\. (a dot) and \\\\ (a backslash) are escapes"),
        ("a.b.c.d.e.f.g.h.i.j.k", "must have at most 10 keys, got 11"),
    ],
)
def test_bad_paths_say_what_is_wrong(path: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        split_twin_path(path)
    assert str(info.value) == problem


def test_sync_status_follows_the_twin_rule() -> None:
    synced = parse_filter({"sync_statuses": ["SYNCED"]})
    pending = parse_filter({"sync_statuses": ["PENDING"]})
    stale = parse_filter({"sync_statuses": ["STALE"]})
    in_sync = device({"m": 1}, desired={"m": 1.0}, desired_version=2, reported_version=2)
    assert matches(synced, in_sync, now=NOW)
    behind = device({"m": 1}, desired={"m": 2}, desired_version=3, reported_version=2,
                    desired_updated_at=NOW - timedelta(seconds=10))  # fmt: skip
    assert matches(pending, behind, now=NOW)
    assert matches(stale, behind, now=NOW + timedelta(seconds=400))
    assert not matches(stale, behind, now=NOW + timedelta(seconds=400), stale_after=timedelta(1))
    offline = device({"m": 1}, desired={"m": 2}, status="OFFLINE")
    assert matches(stale, offline, now=NOW)
    # Acknowledged the version but reports other values: not synced.
    wrong = device({"m": 1}, desired={"m": 2}, desired_version=2, reported_version=2)
    assert not matches(synced, wrong, now=NOW)


def test_version_ranges_are_inclusive() -> None:
    row = device(desired_version=3, reported_version=1)
    assert selects({"desired_version": {"min": "3", "max": 3}}, row)
    assert not selects({"desired_version": {"min": 4}}, row)
    assert selects({"reported_version": {"max": 1}}, row)
    assert not selects({"reported_version": {"min": 2, "max": 1}}, row)


def test_canonical_form_folds_spellings() -> None:
    one = parse_filter(
        {
            "twin_conditions": [
                {"document": "REPORTED", "path": "t", "operator": "IN", "values": [2.0, 2]},
                {"document": "DESIRED", "path": "a\\.b", "operator": "EXISTS", "values": []},
            ],
            "sync_statuses": ["STALE", "PENDING", "STALE"],
            "desired_version": {"min": "1"},
            "reported_version": {},
        }
    )
    assert canonical_json(one) == {
        "twin_conditions": [
            {"document": "DESIRED", "path": "a\\.b", "operator": "EXISTS"},
            {"document": "REPORTED", "path": "t", "operator": "EQUALS", "values": [2]},
        ],
        "sync_statuses": ["PENDING", "STALE"],
        "desired_version": {"min": 1},
    }
    assert parse_filter(canonical_json(one)) == one


def test_every_problem_is_reported_with_its_path() -> None:
    with pytest.raises(FilterError) as info:
        parse_filter(
            {
                "twin_conditions": [
                    {"document": "BOTH", "path": "x", "operator": "IN"},
                    {"document": "DESIRED", "path": "x", "operator": "LESS", "values": [None]},
                    {"document": "DESIRED", "path": "x", "operator": "EQUALS", "values": [{}]},
                    {"document": "DESIRED", "path": "x", "operator": "EXISTS", "values": [1]},
                ],
                "sync_statuses": ["LATE"],
                "reported_version": {"min": -1, "max": True},
            }
        )
    t = "filter.twin_conditions"
    sync = "SYNCED, PENDING, STALE"
    assert [tuple(v) for v in info.value.violations] == [
        (f"{t}[0].document", "unknown document 'BOTH'; expected one of DESIRED, REPORTED"),
        ("filter.twin_conditions[0].values", "IN needs at least one value, got none"),
        ("filter.twin_conditions[1].values[0]", "LESS compares a number or a string, got null"),
        (f"{t}[2].values[0]", "must be a string, number, boolean or null, got object"),
        ("filter.twin_conditions[3].values", "must be empty for EXISTS, got 1"),
        ("filter.sync_statuses[0]", f"unknown sync status 'LATE'; expected one of {sync}"),
        ("filter.reported_version.min", "must be an integer from 0 to 9223372036854775807"),
        ("filter.reported_version.max", "must be an integer from 0 to 9223372036854775807"),
    ]  # fmt: skip
