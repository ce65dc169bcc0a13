"""JSON merge patch (RFC 7386) for twin documents.

An object patch merges into the target key by key: a ``null`` value deletes
the key, an object value merges recursively (into ``{}`` when the target
holds no object there), any other value replaces. A non-object patch
replaces the whole target, and arrays are always replaced, never merged.

Unlike a twin delta (see :mod:`server.twin.delta`), ``null`` here means
"delete", so a merge patch cannot set a key to ``null``.

Neither input is modified, and the result shares no containers with them,
so callers may mutate it freely.
"""

from __future__ import annotations

from typing import Any

from server.twin.delta import JSONValue, copy_value


def apply_merge_patch(target: JSONValue, patch: JSONValue) -> JSONValue:
    """Return ``target`` with the RFC 7386 merge ``patch`` applied."""
    merged: JSONValue = _merge(target, patch)
    return merged


def _merge(target: Any, patch: Any) -> Any:
    if type(patch) is not dict:
        return copy_value(patch)
    if type(target) is not dict:
        target = {}
    # Walk the target first so surviving keys keep their order.
    result: dict[str, Any] = {}
    for key, value in target.items():
        if key not in patch:
            result[key] = copy_value(value)
        elif patch[key] is not None:
            result[key] = _merge(value, patch[key])
    for key, value in patch.items():
        if value is not None and key not in target:
            result[key] = _merge(None, value)
    return result
