"""The upstream platform's routes, where its shapes differ from what the
annotations and field options already give (docs/upstream.md).

Everything expressible in the protos is there: the paths (`google.api.http`),
lower-case enum values (`json_value`), `created_at` and the like
(`json_alias`), string ids (`json_string`), `offset` (`json_name`). What is
left is HTTP-only: the success status, query defaults of upstream's
endpoints, and response keys upstream wrote that no message carries. This
table declares them, per route, and nothing else special-cases a route.

On these routes a request the server refuses as invalid answers 422, as
upstream's framework (FastAPI) did; malformed headers stay 400, as upstream
wrote them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

UPSTREAM_PREFIX = "/api/v1"


@dataclass(frozen=True, slots=True)
class Upstream:
    #: The status of a successful answer.
    status: int = 200
    #: Request field path -> value (as a query parameter would give it), set
    #: when the request does not set the field.
    defaults: Mapping[str, str] = field(default_factory=dict)
    #: Response key -> the request field whose value it repeats.
    echo: Mapping[str, str] = field(default_factory=dict)
    #: Response key -> a fixed value.
    constants: Mapping[str, Any] = field(default_factory=dict)

    def respond(self, request: Message, body: dict[str, Any]) -> dict[str, Any]:
        for key, path in self.echo.items():
            body[key] = _value(request, path)
        body.update(self.constants)
        return body


def _value(message: Message, path: str) -> Any:
    value: Any = message
    for name in path.split("."):
        value = getattr(value, name)
    if isinstance(value, Sequence) and not isinstance(value, str):
        # A repeated field bound to one path segment (`/devices/{device_ids}`).
        return value[0] if len(value) == 1 else list(value)
    return value


_MEMBERS = Upstream(defaults={"page_size": "1000", "include_total": "true"})
_DELETE_GROUP = Upstream(echo={"group_id": "group_id"}, constants={"deleted": True})

#: (HTTP method, path template as annotated) -> what upstream's route does.
ROUTES: Mapping[tuple[str, str], Upstream] = {
    ("GET", "/customer/devices/{device_id}/twin"): Upstream(),
    ("PATCH", "/customer/devices/{device_id}/twin/desired"): Upstream(),
    ("GET", "/customer/devices/{device_id}/twin/delta"): Upstream(),
    ("GET", "/customer/devices/{device_id}/connections"): Upstream(
        defaults={"limit": "50", "offset": "0", "include_total": "true"},
        echo={"device_id": "device_id", "limit": "limit", "offset": "skip"},
    ),
    ("GET", "/customer/device-groups"): Upstream(defaults={"page_size": "1000"}),
    ("POST", "/customer/device-groups"): Upstream(status=201),
    ("POST", "/customer/device-groups/dynamic"): Upstream(
        status=201, defaults={"group.group_type": "DYNAMIC"}
    ),
    ("PATCH", "/customer/device-groups/{group.group_id}"): Upstream(),
    ("PATCH", "/customer/device-groups/{group.group_id}/dynamic"): Upstream(),
    ("DELETE", "/customer/device-groups/{group_id}"): _DELETE_GROUP,
    ("DELETE", "/customer/device-groups/{group_id}/dynamic"): _DELETE_GROUP,
    ("GET", "/customer/device-groups/{group_id}/members"): _MEMBERS,
    ("GET", "/customer/device-groups/{group_id}/devices"): _MEMBERS,
    ("PUT", "/customer/device-groups/{group_id}/devices/{device_ids}"): Upstream(
        echo={"group_id": "group_id", "device_id": "device_ids"},
        constants={"action": "added"},
    ),
    ("DELETE", "/customer/device-groups/{group_id}/devices/{device_ids}"): Upstream(
        echo={"group_id": "group_id", "device_id": "device_ids"},
        constants={"action": "removed"},
    ),
}
