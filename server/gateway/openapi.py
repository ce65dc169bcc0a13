"""An OpenAPI 3.1 document for the gateway, generated from the same
descriptors as the routes (so it cannot drift from them)."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor
from pulse.device.v1 import http_options_pb2

from server.gateway.routes import Route
from server.gateway.transcode import FD, MAX_JSON_DEPTH, json_values, marked_field

_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Any": {"type": "object"},
    "google.protobuf.Empty": {"type": "object"},
}

_SCALARS: dict[int, dict[str, Any]] = {
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte"},
    FD.TYPE_DOUBLE: {"type": "number"},
    FD.TYPE_FLOAT: {"type": "number"},
}
_INT_FORMAT = {
    FD.TYPE_INT32: "int32",
    FD.TYPE_SINT32: "int32",
    FD.TYPE_SFIXED32: "int32",
    FD.TYPE_UINT32: "int64",
    FD.TYPE_FIXED32: "int64",
    FD.TYPE_INT64: "int64",
    FD.TYPE_SINT64: "int64",
    FD.TYPE_SFIXED64: "int64",
    FD.TYPE_UINT64: "int64",
    FD.TYPE_FIXED64: "int64",
}
_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "integer"},
                "status": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object"}},
            },
        },
        "detail": {"type": "string", "description": "error.message again, as upstream wrote it."},
    },
}


_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying, when the server said.",
        "schema": {"type": "integer", "minimum": 0},
    }
}
# Every operation may be refused for load or while the server is unavailable.
_BACK_OFF_RESPONSES = {
    "429": {
        "description": "Too many requests (RESOURCE_EXHAUSTED).",
        "headers": _RETRY_AFTER,
        "content": _ERROR_CONTENT,
    },
    "503": {
        "description": "Unavailable: the API server cannot be reached, the gateway is at its "
        "connection limit, or it is shutting down.",
        "headers": _RETRY_AFTER,
        "content": _ERROR_CONTENT,
    },
}


def _header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "description": description, "schema": {"type": "string"}}


def _version_headers(route: Route, operation: dict[str, Any]) -> None:
    """The headers and answers the http_options field options drive: ETag
    and If-None-Match (304) on versioned responses, If-Match (409, 428) on
    writes that take a version, Last-Event-ID on resumable streams."""
    request, response = route.method.input_type, route.method.output_type
    parameters, responses = operation["parameters"], operation["responses"]
    if_match = marked_field(request, http_options_pb2.if_match)
    if if_match is not None:
        parameters.append(
            _header(
                "If-Match",
                f"The ETag (or version) last read; fills `{if_match.name}` unless the "
                "request sets it.",
            )
        )
        responses["409"] = {
            "description": "The resource changed since that version (reason VERSION_MISMATCH).",
            "content": _ERROR_CONTENT,
        }
        # A version is required only where the request can waive it with
        # `force` (the twin's writes); group edits take it optionally.
        if "force" in request.fields_by_name:
            responses["428"] = {
                "description": "A version is required and neither If-Match nor "
                f"`{if_match.name}` gave one (reason PRECONDITION_REQUIRED).",
                "content": _ERROR_CONTENT,
            }
    versioned = marked_field(response, http_options_pb2.etag) is not None
    if versioned and not route.streaming:
        for answer in responses.values():
            if answer.get("description") == "OK":
                answer["headers"] = {
                    "ETag": {
                        "description": '`"<version>"`: send it back as If-Match.',
                        "schema": {"type": "string"},
                    }
                }
    resume = marked_field(request, http_options_pb2.resume_cursor)
    if resume is not None and route.streaming:
        parameters.append(
            _header(
                "Last-Event-ID",
                f"The `id` of the last event received; resumes after it (fills `{resume.name}`).",
            )
        )


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {"Error": _ERROR}

    def ref(self, message: descriptor.Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        name = message.full_name
        if name not in self.components:
            self.components[name] = {}  # placeholder against recursion
            properties = {f.name: self.field(f) for f in message.fields}
            for f in message.fields:
                alias = str(f.GetOptions().Extensions[http_options_pb2.json_alias])
                if alias:
                    properties[alias] = {**self.field(f), "readOnly": True}
            self.components[name] = {
                "type": "object",
                "properties": properties,
                "additionalProperties": False,
            }
        return {"$ref": f"#/components/schemas/{name}"}

    def field(self, field: FD) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        if field.is_repeated:
            return {"type": "array", "items": self.single(field)}
        return self.single(field)

    def single(self, field: FD) -> dict[str, Any]:
        if field.message_type is not None:
            return self.ref(field.message_type)
        if field.enum_type is not None:
            spelled = json_values(field.enum_type)
            return {
                "type": "string",
                "enum": [spelled.get(v.name, v.name) for v in field.enum_type.values],
            }
        if field.type in _INT_FORMAT:
            return {"type": "integer", "format": _INT_FORMAT[field.type]}
        return dict(_SCALARS.get(field.type, {"type": "string"}))


def _query_parameters(route: Route, schemas: _Schemas) -> list[dict[str, Any]]:
    if route.body == "*":
        return []
    in_path = {field.split(".")[0] for _, field in route.variables}
    params = []
    for field in route.method.input_type.fields:
        if field.name in in_path or field.name == route.body:
            continue
        if field.message_type is not None and field.message_type.full_name not in _WELL_KNOWN:
            # Nested messages travel as dotted names (filter.site_ids=...).
            for sub in field.message_type.fields:
                if sub.message_type is None or sub.message_type.full_name in _WELL_KNOWN:
                    params.append(
                        {
                            "name": f"{field.name}.{sub.name}",
                            "in": "query",
                            "schema": schemas.field(sub),
                        }
                    )
            continue
        params.append({"name": field.name, "in": "query", "schema": schemas.field(field)})
    return params


def _response_schema(route: Route, schemas: _Schemas) -> dict[str, Any]:
    schema = schemas.ref(route.method.output_type)
    upstream = route.upstream
    if upstream is None or not (upstream.echo or upstream.constants):
        return schema
    # Upstream's extra keys (upstream.py), beside the message's own.
    name = route.method.output_type.full_name
    own = schemas.components.get(name, {}).get("properties", {})
    extra = {key: {"readOnly": True} for key in [*upstream.echo, *upstream.constants]}
    return {"type": "object", "properties": {**own, **extra}}


def _path_key(route: Route) -> str:
    """The template with `{device.device_id}` written `{device_id}`: OpenAPI
    tools expect plain parameter names, and it merges with the GET path."""
    path = route.template
    for _, field in route.variables:
        path = path.replace("{" + field + "}", "{" + field.rsplit(".", 1)[-1] + "}")
    return path


def document(routes: list[Route]) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, Any] = {}
    for route in routes:
        parameters = [
            {
                "name": field.rsplit(".", 1)[-1],
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
            }
            for _, field in route.variables
        ]
        parameters += _query_parameters(route, schemas)
        response_schema = _response_schema(route, schemas)
        content = (
            {"text/event-stream": {"schema": {"type": "string"}}}
            if route.streaming
            else {"application/json": {"schema": response_schema}}
        )
        operation: dict[str, Any] = {
            "operationId": f"{route.method.containing_service.name}_{route.method.name}",
            "summary": route.method.name,
            "parameters": parameters,
            "responses": {
                str(route.upstream.status if route.upstream else 200): {
                    "description": "OK",
                    "content": content,
                },
                **_BACK_OFF_RESPONSES,
                "default": {"description": "Error", "content": _ERROR_CONTENT},
            },
            "security": [{"bearer": []}],
        }
        _version_headers(route, operation)
        if route.upstream is not None:
            operation["responses"]["422"] = {
                "description": "The request is invalid (upstream's status for it; 400 elsewhere).",
                "content": _ERROR_CONTENT,
            }
        if route.body:
            body_schema = (
                schemas.ref(route.method.input_type)
                if route.body == "*"
                else schemas.field(route.method.input_type.fields_by_name[route.body])
            )
            operation["requestBody"] = {
                "required": True,
                "description": f"JSON nested at most {MAX_JSON_DEPTH} levels deep.",
                "content": {"application/json": {"schema": body_schema}},
            }
        paths.setdefault(_path_key(route), {})[route.http_method.lower()] = operation
    # operationIds must be unique; additional bindings share a method.
    seen: dict[str, int] = {}
    for methods in paths.values():
        for op in methods.values():
            n = seen.get(op["operationId"], 0)
            seen[op["operationId"]] = n + 1
            if n:
                op["operationId"] += f"_{n + 1}"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Pulse Device Management",
            "version": "v1",
            "description": "Every /customer path is also served under /api/v1/customer.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
