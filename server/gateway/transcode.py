"""HTTP requests to request messages and response messages to JSON.

JSON uses the proto field names (snake_case), prints fields left at their
defaults (so `in_sync: false` and `total: 0` are present, as the upstream web
app expects), and renders 64-bit integers as JSON numbers rather than the
proto3 JSON strings, because the upstream clients compare versions as numbers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf import descriptor, json_format
from google.protobuf.message import Message
from pulse.device.v1 import http_options_pb2

FD = descriptor.FieldDescriptor
# The upb runtime's descriptor classes differ from the pure-Python ones the
# stubs describe; both have the attributes used here.
Desc = Any
_INT64 = {FD.TYPE_INT64, FD.TYPE_UINT64, FD.TYPE_SINT64, FD.TYPE_FIXED64, FD.TYPE_SFIXED64}
_INTS = _INT64 | {FD.TYPE_INT32, FD.TYPE_UINT32, FD.TYPE_SINT32, FD.TYPE_FIXED32, FD.TYPE_SFIXED32}
_FLOATS = {FD.TYPE_DOUBLE, FD.TYPE_FLOAT}
_SAFE_INT = 2**53
_FIELD_MASK = "google.protobuf.FieldMask"
_JSON_VALUES = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
# Deepest JSON body accepted, counting objects and arrays ({"a": 1} is 1).
# Twin documents and metadata may hold 10 levels inside their field, so this
# leaves ample room; it stays well under protobuf's recursion limit of 100
# messages, which a JSON level costs two of (Struct, then Value).
MAX_JSON_DEPTH = 32


def _camel(path: str) -> str:
    return ".".join(
        part.split("_")[0] + "".join(w.capitalize() for w in part.split("_")[1:])
        for part in path.strip().split(".")
    )


class BadRequest(ValueError):
    """The HTTP request cannot be turned into the RPC's request message."""


class BadHeader(BadRequest):
    """A header the request message is filled from is malformed."""


def _option(field: FD, ext: Any) -> bool:
    options: Any = field.GetOptions()
    return bool(options.Extensions[ext])


def marked_field(message: Desc, ext: Any) -> FD | None:
    """The first field of `message` carrying the boolean option `ext`."""
    fields: list[FD] = list(message.fields)
    return next((f for f in fields if _option(f, ext)), None)


def _field_named(message: Desc, name: str) -> FD | None:
    """The field called `name` or whose json_name is `name` (so a query may
    say `offset` for a field declared with that JSON name)."""
    field = message.fields_by_name.get(name)
    if field is None:
        field = next((f for f in message.fields if f.json_name == name), None)
    return cast(FD | None, field)


def _field_at(message: Desc, path: str) -> tuple[list[str], FD]:
    parts = path.split(".")
    current = message
    field = None
    for n, name in enumerate(parts):
        field = _field_named(current, name)
        if field is None:
            raise BadRequest(f"unknown field {path!r}")
        parts[n] = field.name
        if n < len(parts) - 1:
            if field.message_type is None:
                raise BadRequest(f"{'.'.join(parts[: n + 1])!r} has no field {parts[n + 1]!r}")
            current = field.message_type
    assert field is not None
    return parts, field


def _scalar(field: FD, raw: str, where: str) -> object:
    try:
        if field.type == FD.TYPE_BOOL:
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return raw.lower() == "true"
        if field.type in _INTS:
            return int(raw)
        if field.type in _FLOATS:
            return float(raw)
    except ValueError:
        raise BadRequest(f"{where}: {raw[:40]!r} is not a valid {_type_name(field)}") from None
    if field.message_type is not None and field.message_type.full_name == _FIELD_MASK:
        # Accept the proto field names users see everywhere else
        # (update_mask=query_filter); proto3 JSON spells paths in camelCase.
        return ",".join(_camel(path) for path in raw.split(",") if path)
    if field.message_type is not None and field.message_type.full_name not in (
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
    ):
        raise BadRequest(f"{where} is a message; send it in the body")
    return raw  # strings, bytes, enums by name, well-known types in JSON form


def _type_name(field: FD) -> str:
    if field.type == FD.TYPE_BOOL:
        return "boolean"
    if field.type in _INTS:
        return "integer"
    if field.type in _FLOATS:
        return "number"
    return "value"


def _json_depth(value: object) -> int:
    """Nesting depth of decoded JSON, without recursion (the value is
    untrusted)."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                break
            stack.extend((child, depth) for child in _children(item))
    return deepest


def _children(container: dict[str, Any] | list[Any]) -> Iterable[object]:
    return container.values() if isinstance(container, dict) else container


def _decode_body(body: bytes) -> object:
    too_deep = BadRequest(f"the body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        parsed = json.loads(body) if body.strip() else {}
    except RecursionError:
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    if _json_depth(parsed) > MAX_JSON_DEPTH:
        raise too_deep
    return parsed


def _put(data: dict[str, Any], parts: list[str], value: object, repeated: bool) -> None:
    node = data
    for name in parts[:-1]:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise BadRequest(f"{'.'.join(parts)} conflicts with another value")
        node = child
    if repeated:
        existing = node.setdefault(parts[-1], [])
        if not isinstance(existing, list):
            raise BadRequest(f"{'.'.join(parts)} conflicts with another value")
        existing.append(value)
    elif parts[-1] in node:
        raise BadRequest(f"{'.'.join(parts)} is given more than once")
    else:
        node[parts[-1]] = value


def build_request(
    request_class: type[Message],
    *,
    body_field: str,
    body: bytes,
    path_params: Mapping[str, str],
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    infer_update_mask: bool = False,
    defaults: Mapping[str, str] | None = None,
) -> Message:
    """The request message for an HTTP request. Query parameters that name no
    field are ignored, as HTTP frameworks do (cache busters such as `_=1`);
    `defaults` fill fields the request leaves unset."""
    message_desc = request_class.DESCRIPTOR
    data: dict[str, Any] = {}
    if body_field:
        parsed = _decode_body(body)
        if body_field == "*":
            if not isinstance(parsed, dict):
                raise BadRequest("the body must be a JSON object")
            data = parsed
        else:
            data[body_field] = parsed
    for path, raw in path_params.items():
        parts, field = _field_at(message_desc, path)
        _put(data, parts, _scalar(field, raw, path), repeated=field.is_repeated)
    for key, raw in query:
        try:
            parts, field = _field_at(message_desc, key)
        except BadRequest:
            continue
        if body_field == "*":
            raise BadRequest(f"query parameter {key!r} is not accepted; use the body")
        if parts[0] == body_field:
            raise BadRequest(f"{key} belongs in the body")
        if key in path_params:
            raise BadRequest(f"{key} is already given in the path")
        _put(data, parts, _scalar(field, raw, key), repeated=field.is_repeated)
    for key, raw in (defaults or {}).items():
        parts, field = _field_at(message_desc, key)
        if not _holds(data, parts):
            _put(data, parts, _scalar(field, raw, key), repeated=field.is_repeated)
    if infer_update_mask:
        _implied_update_mask(message_desc, data, body_field, set(path_params))
    _fill_from_header(message_desc, data, http_options_pb2.if_match, headers.get("if-match"))
    _fill_from_header(
        message_desc, data, http_options_pb2.resume_cursor, headers.get("last-event-id")
    )
    message = request_class()
    try:
        _enum_names(message_desc, data)
        json_format.ParseDict(data, message)
    except json_format.ParseError as e:
        raise BadRequest(str(e)) from None
    except Exception as e:
        # Everything ParseDict reads came from the client, so whatever else
        # it raises (RecursionError, TypeError on odd shapes, ...) is still
        # a bad request, never a server error.
        raise BadRequest(f"the request does not fit {message_desc.name}: {e}") from None
    return message


def _holds(data: dict[str, Any], parts: list[str]) -> bool:
    node: Any = data
    for name in parts:
        if not isinstance(node, dict) or name not in node:
            return False
        node = node[name]
    return True


def _enum_names(message: Desc, data: Any) -> None:
    """Rewrite json_value spellings (`"dynamic"`) in `data` to the enum value
    names ParseDict reads, in place; anything else is left for ParseDict to
    judge."""
    if not isinstance(data, dict) or message.full_name.startswith("google.protobuf."):
        return
    for key, value in data.items():
        field = _field_named(message, key)
        if field is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            if isinstance(value, dict):
                for k in value:
                    value[k] = _enum_item(entry, value[k])
        elif field.is_repeated and isinstance(value, list):
            data[key] = [_enum_item(field, item) for item in value]
        else:
            data[key] = _enum_item(field, value)


def _enum_item(field: FD, value: Any) -> Any:
    if field.enum_type is not None and isinstance(value, str):
        return _enum_by_spelling(field.enum_type).get(value, value)
    if field.message_type is not None:
        _enum_names(field.message_type, value)
    return value


@functools.cache
def _enum_by_spelling(enum: Desc) -> dict[str, str]:
    return {text: name for name, text in json_values(enum).items()}


def _implied_update_mask(
    message: Desc, data: dict[str, Any], body_field: str, path_fields: set[str]
) -> None:
    """AIP-134: a PATCH without update_mask updates the fields it sends."""
    field = message.fields_by_name.get("update_mask")
    if field is None or field.message_type is None or "update_mask" in data:
        return
    if field.message_type.full_name != _FIELD_MASK or not body_field:
        return
    if body_field == "*":
        sent = [k for k in data if k not in path_fields and k != "update_mask"]
    else:
        body = data.get(body_field)
        identifying = {p.split(".", 1)[1] for p in path_fields if p.startswith(body_field + ".")}
        sent = [k for k in body if k not in identifying] if isinstance(body, dict) else []
    if sent:
        data["update_mask"] = ",".join(_camel(k) for k in sent)


def _fill_from_header(message: Desc, data: dict[str, Any], ext: Any, header: str | None) -> None:
    field = marked_field(message, ext)
    if field is None or header is None or field.name in data:
        return
    value = header.strip().removeprefix("W/").strip('"')
    if ext is http_options_pb2.if_match:
        # "<version>", or "<version>-<digest>" as earlier releases tagged.
        value = value.split("-", 1)[0]
    try:
        data[field.name] = _scalar(field, value, field.name)
    except BadRequest as e:
        raise BadHeader(str(e)) from None


def read_mask(request: Message) -> frozenset[str] | None:
    """The response fields a request's `read_mask` asks for; None: all."""
    mask = getattr(request, "read_mask", None)
    return frozenset(mask.paths) if mask is not None and mask.paths else None


def to_json(message: Message, only: frozenset[str] | None = None) -> dict[str, Any]:
    """The response as JSON, every field spelled out, or with `only` (a
    read_mask's fields) just those: a partial answer's other fields are not
    zero, they are absent."""
    out = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    data = cast(dict[str, Any], _http_json(message.DESCRIPTOR, out))
    if only is None:
        return data
    keep = set(only)
    for field in message.DESCRIPTOR.fields:
        alias = str(field.GetOptions().Extensions[http_options_pb2.json_alias])
        if alias and field.name in only:
            keep.add(alias)
    return {key: value for key, value in data.items() if key in keep}


def _http_json(message: Desc, data: Any) -> Any:
    """`data` (the proto3 JSON of one `message`) as the gateway writes it:
    64-bit integers as numbers, not proto3 JSON's strings (unless marked
    json_string); whole numbers in Struct/Value/ListValue as integers, not
    the doubles they are stored as (a document holding 21 reads back 21, not
    21.0); enum values in their json_value spelling; aliased fields also
    under their alias."""
    if message.full_name in _JSON_VALUES:
        return _integral(data)
    if not isinstance(data, dict):
        return data
    for field, rule in _output_rules(message):
        value = data.get(field.name)
        if rule.alias:
            data[rule.alias] = value
        if value is None or rule.convert is None:
            continue
        if rule.map_value:
            data[field.name] = {k: rule.convert(v) for k, v in value.items()}
        elif field.is_repeated:
            data[field.name] = [rule.convert(v) for v in value]
        else:
            data[field.name] = rule.convert(value)
        if rule.alias:
            data[rule.alias] = data[field.name]
    return data


@dataclass(frozen=True, slots=True)
class _OutputRule:
    convert: Callable[[Any], Any] | None
    map_value: bool = False
    alias: str = ""


@functools.cache
def _output_rules(message: Desc) -> tuple[tuple[FD, _OutputRule], ...]:
    """What _http_json does to each field of `message`, worked out once per
    message type: the gateway serves every response through it."""
    rules = []
    for field in message.fields:
        target, map_value = field, False
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target, map_value = field.message_type.fields_by_name["value"], True
        convert = _converter(target)
        alias = str(field.GetOptions().Extensions[http_options_pb2.json_alias])
        if convert is not None or alias:
            rules.append((field, _OutputRule(convert, map_value, alias)))
    return tuple(rules)


def _converter(field: FD) -> Callable[[Any], Any] | None:
    if field.type in _INT64:
        return None if _option(field, http_options_pb2.json_string) else _safe_int
    if field.enum_type is not None:
        spelled = json_values(field.enum_type)
        return (lambda name: spelled.get(name, name)) if spelled else None
    if field.message_type is None:
        return None
    nested = field.message_type
    if nested.full_name in _JSON_VALUES:
        return _integral
    if nested.full_name.startswith("google.protobuf."):
        return None
    return lambda value: _http_json(nested, value)


@functools.cache
def json_values(enum: Desc) -> dict[str, str]:
    """Enum value name to its json_value spelling, for values that have one."""
    spelled = {}
    for value in enum.values:
        text = str(value.GetOptions().Extensions[http_options_pb2.json_value])
        if text:
            spelled[value.name] = text
    return spelled


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _SAFE_INT:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _safe_int(value: object) -> object:
    if isinstance(value, str):
        n = int(value)
        return n if -_SAFE_INT < n < _SAFE_INT else value
    return value


def etag_of(message: Message, request: Message | None = None) -> str | None:
    """`"<version>"` for a response with a version field: upstream's form,
    which its clients send back in If-Match and compare across responses.
    None when the request's `read_mask` left the version out.

    It names the version, not the representation (a twin's reported state
    changes under the same desired version), so it is not used to answer
    If-None-Match with 304.
    """
    field = marked_field(message.DESCRIPTOR, http_options_pb2.etag)
    if field is None:
        return None
    only = None if request is None else read_mask(request)
    if only is not None and field.name not in only:
        return None
    return f'"{getattr(message, field.name)}"'


def cursor_of(message: Message) -> str | None:
    field = marked_field(message.DESCRIPTOR, http_options_pb2.stream_cursor)
    if field is None:
        return None
    value = getattr(message, field.name)
    return str(value) if value != "" else None
