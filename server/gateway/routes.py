"""Routes read from the `google.api.http` annotations of the served services.

Nothing here knows any particular RPC: a newly annotated method appears in the
gateway (and its OpenAPI document) without gateway code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message

from server.gateway.upstream import ROUTES as UPSTREAM_ROUTES
from server.gateway.upstream import Upstream

_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_.]*)(?:=([^}]*))?\}")
_VERBS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True, slots=True)
class Route:
    http_method: str
    template: str
    pattern: re.Pattern[str]
    #: Path variables in template order: (regex group, request field path).
    variables: tuple[tuple[str, str], ...]
    #: "" (no body), "*" (the whole request) or a top-level request field.
    body: str
    grpc_method: str  # /package.Service/Method
    method: descriptor.MethodDescriptor
    request_class: type[Message]
    response_class: type[Message]
    #: Set for the routes the upstream platform's clients call.
    upstream: Upstream | None = None

    @property
    def streaming(self) -> bool:
        return bool(self.method.server_streaming)

    def match(self, path: str) -> dict[str, str] | None:
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        return {field: found.group(group) for group, field in self.variables}

    @property
    def specificity(self) -> tuple[int, int]:
        """Literal text first, so /groups/dynamic wins over /groups/{id}."""
        literal = _VARIABLE.sub("", self.template)
        return (len(literal), -len(self.variables))


def _compile(template: str) -> tuple[re.Pattern[str], tuple[tuple[str, str], ...]]:
    variables: list[tuple[str, str]] = []
    out = []
    last = 0
    for n, var in enumerate(_VARIABLE.finditer(template)):
        out.append(re.escape(template[last : var.start()]))
        group = f"v{n}"
        # `{name=**}` may span segments; a plain `{name}` is one segment.
        segment = ".+" if var.group(2) == "**" else "[^/]+"
        out.append(f"(?P<{group}>{segment})")
        variables.append((group, var.group(1)))
        last = var.end()
    out.append(re.escape(template[last:]))
    return re.compile("".join(out)), tuple(variables)


def _bindings(rule: http_pb2.HttpRule) -> list[tuple[str, str, str]]:
    found = []
    for r in [rule, *rule.additional_bindings]:
        kind = r.WhichOneof("pattern")
        if kind in _VERBS:
            found.append((kind.upper(), str(getattr(r, kind)), r.body))
    return found


def routes_for(services: list[descriptor.ServiceDescriptor]) -> list[Route]:
    routes = []
    for service in services:
        for method in service.methods:
            options: Any = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            for verb, template, body in _bindings(rule):
                pattern, variables = _compile(template)
                routes.append(
                    Route(
                        http_method=verb,
                        template=template,
                        pattern=pattern,
                        variables=variables,
                        body=body,
                        grpc_method=f"/{service.full_name}/{method.name}",
                        method=method,
                        request_class=message_factory.GetMessageClass(method.input_type),
                        response_class=message_factory.GetMessageClass(method.output_type),
                        upstream=UPSTREAM_ROUTES.get((verb, template)),
                    )
                )
    routes.sort(key=lambda r: r.specificity, reverse=True)
    return routes
