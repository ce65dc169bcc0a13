"""Tests for the structured twin delta (server/twin/delta.py)."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.twin.delta import (
    Delta,
    DeltaMismatchError,
    JSONObject,
    JSONValue,
    apply_delta,
    compute_delta,
    copy_value,
    escape_segment,
    flat_delta,
    join_path,
    split_path,
    unescape_segment,
    values_equal,
)

# --- an independent model of the rules, used as the oracle ---------------------


def canon(value: Any) -> Any:
    """Hashable form under which two values are equal iff the rules say so."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", Fraction(value))
    if isinstance(value, str):
        return ("string", value)
    if value is None:
        return ("null",)
    if isinstance(value, list):
        return ("array", tuple(canon(v) for v in value))
    assert isinstance(value, dict)
    return ("object", frozenset((k, canon(v)) for k, v in value.items()))


def same(a: Any, b: Any) -> bool:
    return bool(canon(a) == canon(b))


def pointer(segments: tuple[str, ...]) -> str:
    return "/".join(s.replace("~", "~0").replace("/", "~1") for s in segments)


def leaves(doc: JSONObject, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaf paths (scalars and arrays; objects are traversed) of a document."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(leaves(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def lookup(doc: JSONObject, segments: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = doc
    for segment in segments:
        if not isinstance(node, dict) or segment not in node:
            return False, None
        node = node[segment]
    return True, node


def as_struct(value: Any) -> Any:
    """What a protobuf Struct round trip does: every number becomes a double."""
    if isinstance(value, bool) or not isinstance(value, int | float | list | dict):
        return value
    if isinstance(value, list):
        return [as_struct(v) for v in value]
    if isinstance(value, dict):
        return {k: as_struct(v) for k, v in value.items()}
    return float(value)


def shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    return value


# --- strategies ------------------------------------------------------------------

# A small alphabet makes desired and reported share keys, and exercises escaping.
keys = st.text(alphabet="ab~/01", max_size=3) | st.text(max_size=4)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    # Within 2**53 so that a Struct round trip (as_struct) keeps the value.
    | st.integers(-(2**53), 2**53)
    | st.integers(-3, 3).map(float)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
documents = st.dictionaries(keys, values, max_size=6)


@st.composite
def variant_of(draw: st.DrawFn, doc: JSONObject) -> JSONObject:
    """A reported document derived from desired, the way devices drift."""
    out: JSONObject = {}
    for key, value in doc.items():
        action = draw(st.sampled_from(["keep", "drop", "replace", "struct", "bool-as-int", "dive"]))
        if action == "keep":
            out[key] = copy_value(value)
        elif action == "replace":
            out[key] = draw(values)
        elif action == "struct":
            out[key] = as_struct(value)
        elif action == "bool-as-int":
            out[key] = int(value) if isinstance(value, bool) else copy_value(value)
        elif action == "dive":
            out[key] = draw(variant_of(value)) if isinstance(value, dict) else draw(values)
    for key, value in draw(st.dictionaries(keys, values, max_size=2)).items():
        out.setdefault(key, value)
    return out


@st.composite
def doc_pairs(draw: st.DrawFn) -> tuple[JSONObject, JSONObject]:
    desired = draw(documents)
    reported = draw(documents) if draw(st.integers(0, 4)) == 0 else draw(variant_of(desired))
    return desired, reported


# --- examples --------------------------------------------------------------------


def test_nested_add_remove_change() -> None:
    desired: JSONObject = {
        "led": "on",
        "telemetry": {"interval_s": 30, "filters": {"low": 1, "high": 9}},
        "wifi": {"ssid": "plant-4"},
    }
    reported: JSONObject = {
        "led": "off",
        "telemetry": {"interval_s": 30, "filters": {"low": 2}, "debug": True},
        "legacy": 5,
    }
    delta = compute_delta(desired, reported)
    assert delta.to_dict() == {
        "added": {"telemetry/filters/high": 9, "wifi": {"ssid": "plant-4"}},
        "removed": {"legacy": 5, "telemetry/debug": True},
        "changed": {
            "led": {"old_value": "off", "new_value": "on"},
            "telemetry/filters/low": {"old_value": 2, "new_value": 1},
        },
        "unchanged_count": 1,
        "in_sync": False,
    }


def test_type_change_is_one_changed_entry() -> None:
    delta = compute_delta({"a": {"b": 1, "c": 2}, "d": 3}, {"a": 7, "d": {"e": 3}})
    assert delta.changed == {
        "a": {"old_value": 7, "new_value": {"b": 1, "c": 2}},
        "d": {"old_value": {"e": 3}, "new_value": 3},
    }
    assert not delta.added and not delta.removed


def test_arrays_compare_whole() -> None:
    delta = compute_delta({"ch": [1, 2, 3], "same": [{"x": 1}]}, {"ch": [1, 3], "same": [{"x": 1}]})
    assert delta.changed == {"ch": {"old_value": [1, 3], "new_value": [1, 2, 3]}}
    assert delta.unchanged_count == 1


def test_keys_with_slash_and_tilde_are_escaped() -> None:
    desired: JSONObject = {"a/b": {"c~d": 1}, "a": {"b": 2}, "~1": 3}
    delta = compute_delta(desired, {})
    assert set(delta.added) == {"a~1b", "a", "~01"}
    nested = compute_delta(desired, {"a/b": {}, "a": {}})
    assert set(nested.added) == {"a~1b/c~0d", "a/b", "~01"}
    assert split_path("a~1b/c~0d") == ["a/b", "c~d"]


def test_int_and_float_of_same_value_are_equal() -> None:
    delta = compute_delta(
        {"n": 1, "xs": [1, 2], "o": {"v": 0}}, {"n": 1.0, "xs": [1.0, 2.0], "o": {"v": -0.0}}
    )
    assert delta.in_sync
    assert delta.unchanged_count == 3


def test_int_and_float_compare_exactly() -> None:
    big = 2**53 + 1
    assert not compute_delta({"n": big}, {"n": float(big)}).in_sync
    assert not compute_delta({"n": 1}, {"n": 1.0000001}).in_sync


@pytest.mark.parametrize(
    ("desired", "reported"),
    [
        (True, 1),
        (False, 0),
        (True, 1.0),
        ([True], [1]),
        ([{"x": False}], [{"x": 0}]),
        ([[1, True]], [[1, 1]]),
    ],
)
def test_booleans_are_not_numbers(desired: JSONValue, reported: JSONValue) -> None:
    delta = compute_delta({"v": desired}, {"v": reported})
    assert delta.changed == {"v": {"old_value": reported, "new_value": desired}}
    assert not values_equal(desired, reported)
    assert flat_delta({"v": desired}, {"v": reported}) == {"v": desired}


def test_nested_boolean_against_number_is_changed() -> None:
    delta = compute_delta({"o": {"x": True}}, {"o": {"x": 1}})
    assert delta.changed == {"o/x": {"old_value": 1, "new_value": True}}


def test_null_is_a_value() -> None:
    delta = compute_delta({"a": None, "b": None, "c": 1}, {"b": None, "c": None})
    assert delta.added == {"a": None}
    assert delta.changed == {"c": {"old_value": None, "new_value": 1}}
    assert delta.unchanged_count == 1


def test_empty_objects_count_no_leaves() -> None:
    assert compute_delta({"a": {}}, {"a": {}}).to_dict()["unchanged_count"] == 0
    assert compute_delta({"a": {}}, {"a": {}}).in_sync
    assert compute_delta({"a": {}}, {"a": {"x": 1}}).removed == {"a/x": 1}


def test_output_is_sorted_by_path() -> None:
    delta = compute_delta({"z": 1, "b": 1, "m": {"y": 1, "a": 1}}, {})
    assert list(delta.added) == ["b", "m", "z"]
    delta = compute_delta({"m": {"y": 1, "a": 1}, "z": 2, "b": 2}, {"m": {}, "z": 1, "b": 1})
    assert list(delta.added) == ["m/a", "m/y"]
    assert list(delta.changed) == ["b", "z"]


def test_flat_delta_is_top_level_only() -> None:
    desired: JSONObject = {"led": "on", "t": {"i": 30, "j": 1}, "same": 1, "new": None}
    reported: JSONObject = {"led": "off", "t": {"i": 30, "j": 2}, "same": 1.0, "gone": 1}
    assert flat_delta(desired, reported) == {"led": "on", "new": None, "t": {"i": 30, "j": 1}}
    assert list(flat_delta({"b": 1, "a": 1}, {})) == ["a", "b"]


def test_to_dict_is_json_and_detached() -> None:
    delta = compute_delta({"a": 1, "b": [1]}, {"a": 2, "c": 3})
    shape = delta.to_dict()
    assert json.loads(json.dumps(shape)) == shape
    shape["added"].clear()
    assert delta.added == {"b": [1]}


def test_apply_delta_does_not_touch_inputs() -> None:
    desired: JSONObject = {"a": {"b": [1, 2]}, "c": 1}
    reported: JSONObject = {"a": {"b": [1]}, "d": {"e": 1}}
    delta = compute_delta(desired, reported)
    result = apply_delta(reported, delta)
    assert result == desired
    assert reported == {"a": {"b": [1]}, "d": {"e": 1}}
    inner = result["a"]
    assert isinstance(inner, dict)
    array = inner["b"]
    assert isinstance(array, list)
    array.append(3)
    assert desired == {"a": {"b": [1, 2]}, "c": 1}


@pytest.mark.parametrize(
    ("document", "delta"),
    [
        ({"a": 1}, Delta(added={"a": 2}, removed={}, changed={}, unchanged_count=0)),
        ({"a": 1}, Delta(added={}, removed={"a": 2}, changed={}, unchanged_count=0)),
        ({}, Delta(added={}, removed={"a": 2}, changed={}, unchanged_count=0)),
        (
            {"a": 1},
            Delta(
                added={},
                removed={},
                changed={"a": {"old_value": 5, "new_value": 6}},
                unchanged_count=0,
            ),
        ),
        ({"a": 1}, Delta(added={"a/b": 2}, removed={}, changed={}, unchanged_count=0)),
        ({}, Delta(added={"x/y": 2}, removed={}, changed={}, unchanged_count=0)),
    ],
)
def test_apply_delta_rejects_a_delta_for_another_document(
    document: JSONObject, delta: Delta
) -> None:
    with pytest.raises(DeltaMismatchError):
        apply_delta(document, delta)


def test_path_helpers() -> None:
    assert escape_segment("a/b~c") == "a~1b~0c"
    assert unescape_segment("~01") == "~1"
    assert unescape_segment("~10") == "/0"
    assert join_path(["a/b", "", "~"]) == "a~1b//~0"
    assert split_path("") == [""]


# --- properties ------------------------------------------------------------------


@given(doc_pairs())
def test_applying_the_delta_reaches_desired(pair: tuple[JSONObject, JSONObject]) -> None:
    desired, reported = pair
    before = copy_value(reported)
    result = apply_delta(reported, compute_delta(desired, reported))
    assert same(result, desired)
    assert reported == before


@given(documents)
def test_a_document_is_in_sync_with_itself(doc: JSONObject) -> None:
    for other in (doc, copy_value(doc), as_struct(doc)):
        delta = compute_delta(doc, other)
        assert delta.in_sync
        assert delta.to_dict()["in_sync"]
        assert (delta.added, delta.removed, delta.changed) == ({}, {}, {})
        assert delta.unchanged_count == len(leaves(doc))


@given(doc_pairs(), st.randoms(use_true_random=False))
def test_key_order_does_not_matter(pair: tuple[JSONObject, JSONObject], rng: random.Random) -> None:
    desired, reported = pair
    expected = compute_delta(desired, reported)
    actual = compute_delta(shuffled(desired, rng), shuffled(reported, rng))
    assert actual == expected
    for name in ("added", "removed", "changed"):
        assert list(getattr(actual, name)) == list(getattr(expected, name))
        assert list(getattr(expected, name)) == sorted(getattr(expected, name))


@given(doc_pairs())
def test_every_entry_is_true_and_every_difference_has_an_entry(
    pair: tuple[JSONObject, JSONObject],
) -> None:
    desired, reported = pair
    delta = compute_delta(desired, reported)
    for path, value in delta.added.items():
        segments = tuple(split_path(path))
        assert lookup(desired, segments) == (True, value)
        assert not lookup(reported, segments)[0]
        assert isinstance(lookup(reported, segments[:-1])[1], dict)
    for path, value in delta.removed.items():
        segments = tuple(split_path(path))
        assert lookup(reported, segments) == (True, value)
        assert not lookup(desired, segments)[0]
        assert isinstance(lookup(desired, segments[:-1])[1], dict)
    for path, change in delta.changed.items():
        segments = tuple(split_path(path))
        assert lookup(desired, segments) == (True, change["new_value"])
        assert lookup(reported, segments) == (True, change["old_value"])
        assert not same(change["old_value"], change["new_value"])
        assert not (isinstance(change["old_value"], dict) and isinstance(change["new_value"], dict))

    # Each leaf is either equal on both sides (and counted) or under an entry.
    entry_paths = {tuple(split_path(p)) for p in [*delta.added, *delta.removed, *delta.changed]}

    def covered(segments: tuple[str, ...]) -> bool:
        return any(segments[:n] in entry_paths for n in range(1, len(segments) + 1))

    equal_leaves = 0
    for segments, value in leaves(desired).items():
        if not covered(segments):
            found, old = lookup(reported, segments)
            assert found and same(old, value), segments
            equal_leaves += 1
    assert delta.unchanged_count == equal_leaves
    for segments in leaves(reported):
        assert covered(segments) or lookup(desired, segments)[0], segments
    assert delta.in_sync == (not entry_paths)
    assert delta.in_sync == same(desired, reported)


@given(doc_pairs())
def test_flat_delta_lists_the_top_level_keys_that_differ(
    pair: tuple[JSONObject, JSONObject],
) -> None:
    desired, reported = pair
    flat = flat_delta(desired, reported)
    expected = {k: v for k, v in desired.items() if k not in reported or not same(v, reported[k])}
    assert flat == expected
    assert list(flat) == sorted(flat)
    delta = compute_delta(desired, reported)
    touched = {split_path(p)[0] for p in [*delta.added, *delta.removed, *delta.changed]}
    assert set(flat) == touched & desired.keys()


@given(values, values)
def test_values_equal_matches_the_model(a: JSONValue, b: JSONValue) -> None:
    assert values_equal(a, b) == same(a, b)
    assert values_equal(a, a)
    assert values_equal(a, as_struct(a))


@given(st.lists(st.text(alphabet="ab~/01", max_size=4) | st.text(max_size=4), min_size=1))
def test_paths_round_trip(segments: list[str]) -> None:
    path = join_path(segments)
    assert split_path(path) == segments
    assert path.count("/") == len(segments) - 1


def test_mapping_inputs_are_not_modified() -> None:
    desired: defaultdict[str, JSONValue] = defaultdict(int, {"a": 1, "b": {"c": 2}})
    reported: defaultdict[str, JSONValue] = defaultdict(int, {"b": {"c": 2}, "d": 3})
    delta = compute_delta(MappingProxyType(desired), reported)
    assert delta.to_dict()["added"] == {"a": 1}
    assert delta.removed == {"d": 3}
    assert set(reported) == {"b", "d"}
