"""Tests for JSON merge patch (server/twin/merge_patch.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.twin.delta import JSONObject, JSONValue, compute_delta, copy_value
from server.twin.merge_patch import apply_merge_patch

keys = st.text(alphabet="abc", max_size=2)
scalars_without_null = (
    st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=3)
)
values = st.recursive(
    st.none() | scalars_without_null,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=10,
)
null_free_values = st.recursive(
    scalars_without_null,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=10,
)
objects = st.dictionaries(keys, values, max_size=4)
null_free_objects = st.dictionaries(keys, null_free_values, max_size=4)


# RFC 7386, section 3 and appendix A, written out from the rules.
RFC_EXAMPLES: list[tuple[JSONValue, JSONValue, JSONValue]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    (
        {
            "title": "Goodbye!",
            "author": {"givenName": "John", "familyName": "Doe"},
            "tags": ["example", "sample"],
            "content": "This will be unchanged",
        },
        {
            "title": "Hello!",
            "phoneNumber": "+01-123-456-7890",
            "author": {"familyName": None},
            "tags": ["example"],
        },
        {
            "title": "Hello!",
            "author": {"givenName": "John"},
            "tags": ["example"],
            "content": "This will be unchanged",
            "phoneNumber": "+01-123-456-7890",
        },
    ),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC_EXAMPLES)
def test_rfc_7386_examples(target: JSONValue, patch: JSONValue, expected: JSONValue) -> None:
    assert apply_merge_patch(target, patch) == expected


def test_arrays_in_patches_keep_their_nulls() -> None:
    assert apply_merge_patch({}, {"a": [None, {"b": None}]}) == {"a": [None, {"b": None}]}


def test_surviving_keys_keep_their_order() -> None:
    result = apply_merge_patch({"x": 1, "y": 2, "z": 3}, {"y": 5, "a": 0, "x": None})
    assert list(result) == ["y", "z", "a"]  # type: ignore[arg-type]


def leaf_paths(doc: JSONObject, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            out.update(leaf_paths(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def lookup(doc: Any, segments: tuple[str, ...]) -> Any:
    for segment in segments:
        doc = doc[segment]
    return doc


@given(objects)
def test_empty_patch_is_identity(target: JSONObject) -> None:
    assert apply_merge_patch(target, {}) == target


@given(values, values)
def test_applying_twice_is_applying_once(target: JSONValue, patch: JSONValue) -> None:
    once = apply_merge_patch(target, patch)
    assert apply_merge_patch(once, patch) == once


@given(values, null_free_values)
def test_a_null_free_patch_sets_every_value_it_holds(target: JSONValue, patch: JSONValue) -> None:
    result = apply_merge_patch(target, patch)
    if not isinstance(patch, dict):
        assert result == patch
        return
    assert isinstance(result, dict)
    for segments, value in leaf_paths(patch).items():
        if value == {}:
            # An empty object merges into an object there and sets no key.
            assert isinstance(lookup(result, segments), dict)
        else:
            assert lookup(result, segments) == value
    if isinstance(target, dict):
        for key, value in target.items():
            if key not in patch:
                assert result[key] == value


@given(objects, st.data())
def test_null_removes_exactly_the_named_keys(target: JSONObject, data: st.DataObject) -> None:
    doomed = data.draw(st.sets(st.sampled_from(sorted(target)) | keys) if target else st.sets(keys))
    result = apply_merge_patch(target, dict.fromkeys(doomed))
    assert result == {k: v for k, v in target.items() if k not in doomed}


@given(values, values)
def test_inputs_are_neither_modified_nor_shared(target: JSONValue, patch: JSONValue) -> None:
    target_before, patch_before = copy_value(target), copy_value(patch)
    result = apply_merge_patch(target, patch)
    assert (target, patch) == (target_before, patch_before)
    _scribble(result)
    assert (target, patch) == (target_before, patch_before)


def _scribble(value: Any) -> None:
    if isinstance(value, dict):
        for child in value.values():
            _scribble(child)
        value["scribbled"] = True
    elif isinstance(value, list):
        for child in value:
            _scribble(child)
        value.append("scribbled")


@given(null_free_objects, objects)
def test_merging_a_full_desired_document_leaves_only_device_keys(
    desired: JSONObject, reported: JSONObject
) -> None:
    merged = apply_merge_patch(reported, desired)
    assert isinstance(merged, dict)
    delta = compute_delta(desired, merged)
    assert not delta.added
    assert not delta.changed
