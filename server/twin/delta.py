"""Structured delta between a device twin's desired and reported documents.

Both documents are JSON objects made of plain JSON types (dict with str keys,
list, str, int, float, bool, None), as produced by ``json.loads`` or by
``MessageToDict`` on a protobuf ``Struct``. The delta says what the device
still has to do to reach the desired state:

* ``added``: path -> desired value, for keys present only in desired.
* ``removed``: path -> reported value, for keys present only in reported.
* ``changed``: path -> ``{"old_value": reported, "new_value": desired}``.
* ``unchanged_count``: leaf values equal on both sides.
* ``in_sync``: true iff the three maps above are empty.

Rules:

* Objects present on both sides are compared key by key, at every depth.
  Any other pair of values (scalar, array, or an object facing a non-object)
  is compared as a whole and yields at most one ``changed`` entry at its path.
* Arrays are atomic: a device applies a list setting (an allow-list, a
  schedule) as one value, and index-based diffs of shifted lists are noise.
* Numbers compare by numeric value, so ``1 == 1.0``: protobuf ``Struct``
  stores every number as a double, so a document that went through gRPC
  loses the int/float distinction and must not look out of sync because of
  it. Comparison is exact (no tolerance).
* Booleans are not numbers: ``true`` never equals ``1`` and ``false`` never
  equals ``0``, at any depth, including inside arrays (Python's
  ``True == 1`` is deliberately not inherited).
* ``null`` is an ordinary value: a desired key set to ``null`` that reported
  lacks is ``added`` with value ``None``. (JSON merge patch, RFC 7386, reads
  ``null`` as "delete"; a twin delta does not.)
* ``unchanged_count`` counts equal scalars and equal arrays as one each; an
  object contributes the count of its own equal leaves, so an object that
  is empty on both sides contributes nothing.
* NaN and infinities are not JSON; NaN never equals anything, so a document
  holding one is never in sync at that path.
* Output maps are sorted by path, so the result does not depend on the
  insertion order of either document.

Paths: segments are escaped as in JSON Pointer (RFC 6901: ``~`` -> ``~0``,
``/`` -> ``~1``) and joined with ``/``. Unlike a JSON Pointer there is no
leading slash, so a top-level key is its own (escaped) name: ``led``,
``telemetry/interval_s``, ``a~1b`` for the top-level key ``a/b``. This keeps
the flat keys upstream clients already read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, TypedDict, TypeVar

JSONValue: TypeAlias = "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"
JSONObject: TypeAlias = "dict[str, JSONValue]"

# The hot helpers take Any: they branch on a cached ``type()`` which mypy
# cannot narrow on, and cast() would cost a call per node.
_Object: TypeAlias = "dict[str, Any]"

_V = TypeVar("_V", bound=JSONValue)

# Exact types on purpose: ``bool`` subclasses ``int`` and must stay apart.
_NUMBER_TYPES = frozenset((int, float))


class ValueChange(TypedDict):
    old_value: JSONValue
    new_value: JSONValue


class DeltaDict(TypedDict):
    added: dict[str, JSONValue]
    removed: dict[str, JSONValue]
    changed: dict[str, ValueChange]
    unchanged_count: int
    in_sync: bool


class DeltaMismatchError(ValueError):
    """The delta was not computed against the document it is applied to."""


@dataclass(frozen=True, slots=True)
class Delta:
    """Result of :func:`compute_delta`; values are shared with its inputs."""

    added: Mapping[str, JSONValue]
    removed: Mapping[str, JSONValue]
    changed: Mapping[str, ValueChange]
    unchanged_count: int

    @property
    def in_sync(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def to_dict(self) -> DeltaDict:
        return {
            "added": dict(self.added),
            "removed": dict(self.removed),
            "changed": {
                path: {"old_value": c["old_value"], "new_value": c["new_value"]}
                for path, c in self.changed.items()
            },
            "unchanged_count": self.unchanged_count,
            "in_sync": self.in_sync,
        }


# --- paths -----------------------------------------------------------------


def escape_segment(segment: str) -> str:
    # "~" first, or the "~" introduced by "~1" would be escaped again.
    if "~" in segment:
        segment = segment.replace("~", "~0")
    return segment.replace("/", "~1") if "/" in segment else segment


def unescape_segment(segment: str) -> str:
    # "~1" first, or "~01" (a literal "~1") would decode to "/".
    return segment.replace("~1", "/").replace("~0", "~")


def join_path(segments: Iterable[str]) -> str:
    return "/".join(escape_segment(s) for s in segments)


def split_path(path: str) -> list[str]:
    """Inverse of :func:`join_path`; every path has at least one segment."""
    return [unescape_segment(s) for s in path.split("/")]


# --- equality ----------------------------------------------------------------


def values_equal(a: JSONValue, b: JSONValue) -> bool:
    """Deep JSON equality with the module's number and boolean rules."""
    return _equal(a, b)


def _equal(a: Any, b: Any) -> bool:
    kind = type(a)
    if kind is not type(b):
        return kind in _NUMBER_TYPES and type(b) in _NUMBER_TYPES and a == b
    if kind is dict:
        return a.keys() == b.keys() and all(_equal(v, b[k]) for k, v in a.items())
    if kind is list:
        # Python's own == rejects most unequal arrays in C before the strict
        # element walk, which is only needed to keep true apart from 1.
        if a != b:
            return False
        return all(map(_equal, a, b))
    return bool(a == b)


# --- delta -------------------------------------------------------------------


def compute_delta(desired: Mapping[str, JSONValue], reported: Mapping[str, JSONValue]) -> Delta:
    """Compare the desired and reported documents at every nesting level."""
    added: dict[str, Any] = {}
    removed: dict[str, Any] = {}
    changed: dict[str, ValueChange] = {}
    # The walk looks keys up with [] and KeyError; on a defaultdict-like
    # mapping that would insert, so anything but a plain dict is copied.
    if type(desired) is not dict:
        desired = dict(desired)
    if type(reported) is not dict:
        reported = dict(reported)
    unchanged = _walk(desired, reported, "", added, removed, changed)
    return Delta(
        added=_sorted(added),
        removed=_sorted(removed),
        changed=_sorted(changed),
        unchanged_count=unchanged,
    )


def _sorted(entries: dict[str, Any]) -> dict[str, Any]:
    return {path: entries[path] for path in sorted(entries)} if len(entries) > 1 else entries


def _walk(
    desired: Mapping[str, Any],
    reported: Mapping[str, Any],
    prefix: str,
    added: dict[str, Any],
    removed: dict[str, Any],
    changed: dict[str, ValueChange],
) -> int:
    # Paths are only built for keys that are recorded or descended into, so
    # the common case, an equal leaf, allocates nothing.
    unchanged = 0
    missing = 0
    for key, new in desired.items():
        try:
            old = reported[key]
        except KeyError:
            added[prefix + escape_segment(key)] = new
            missing += 1
            continue
        kind = type(new)
        if kind is type(old):
            if kind is dict:
                unchanged += _walk(
                    new, old, prefix + escape_segment(key) + "/", added, removed, changed
                )
                continue
            if new == old:
                if kind is not list:
                    unchanged += 1
                    continue
                # Python's == already matched the arrays; only elements it
                # may have matched too loosely (true vs 1, nested values)
                # need the strict comparison. Inlined, and indexed rather
                # than zipped, because this is the hot spot of most walks.
                for i in range(len(new)):
                    x = new[i]
                    t = type(x)
                    if (t is not type(old[i]) or t is dict or t is list) and not _equal(x, old[i]):
                        break
                else:
                    unchanged += 1
                    continue
        elif kind in _NUMBER_TYPES and type(old) in _NUMBER_TYPES and new == old:
            unchanged += 1
            continue
        changed[prefix + escape_segment(key)] = {"old_value": old, "new_value": new}
    # When every reported key was matched, none can be missing from desired.
    if len(reported) != len(desired) - missing:
        for key, old in reported.items():
            if key not in desired:
                removed[prefix + escape_segment(key)] = old
    return unchanged


def flat_delta(
    desired: Mapping[str, JSONValue], reported: Mapping[str, JSONValue]
) -> dict[str, JSONValue]:
    """Legacy flat form: top-level desired keys whose value differs from reported.

    Keys are raw (unescaped) key names; values are the desired ones. Keys only
    in reported are not reported, as older clients expect.
    """
    out: dict[str, JSONValue] = {}
    for key in sorted(desired):
        new = desired[key]
        if key not in reported or not _equal(new, reported[key]):
            out[key] = new
    return out


# --- applying ----------------------------------------------------------------


def apply_delta(reported: Mapping[str, JSONValue], delta: Delta) -> JSONObject:
    """Return a new document: ``reported`` with ``delta`` applied.

    Inputs are not modified and the result shares no containers with them.
    Raises :class:`DeltaMismatchError` when the delta does not fit: a removed
    or changed path whose current value differs from the one recorded, or an
    added path that already exists.
    """
    result: _Object = _copy(dict(reported))
    for path, old in delta.removed.items():
        parent, key = _parent(result, path)
        if key not in parent or not _equal(parent[key], old):
            raise DeltaMismatchError(f"removed path {path!r} does not hold the recorded value")
        del parent[key]
    for path, change in delta.changed.items():
        parent, key = _parent(result, path)
        if key not in parent or not _equal(parent[key], change["old_value"]):
            raise DeltaMismatchError(f"changed path {path!r} does not hold the recorded value")
        parent[key] = _copy(change["new_value"])
    for path, new in delta.added.items():
        parent, key = _parent(result, path)
        if key in parent:
            raise DeltaMismatchError(f"added path {path!r} already exists")
        parent[key] = _copy(new)
    return result


def _parent(document: _Object, path: str) -> tuple[_Object, str]:
    *ancestors, key = split_path(path)
    node: Any = document
    for segment in ancestors:
        node = node.get(segment)
        if type(node) is not dict:
            raise DeltaMismatchError(f"path {path!r} has no parent object")
    return node, key


def copy_value(value: _V) -> _V:
    """Deep copy of a JSON value, several times faster than copy.deepcopy."""
    copied: _V = _copy(value)
    return copied


def _copy(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _copy(v) for k, v in value.items()}
    if kind is list:
        return [_copy(v) for v in value]
    return value
