"""Device topics: `pulse/{tenant_id}/{device_id}/{kind}`.

`kind` is one of KINDS: `heartbeat`, `status` (online/offline and the
last-will), `twin/reported`, `telemetry`. The service publishes to
`pulse/{tenant_id}/{device_id}/twin/desired`, which the evaluator ignores.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from server.validation import ID_PATTERN

PREFIX = "pulse"
SUBSCRIPTION = f"{PREFIX}/+/+/#"
KINDS = frozenset({"heartbeat", "status", "twin/reported", "telemetry"})
OUTBOUND = frozenset({"twin/desired"})


@dataclass(frozen=True, slots=True)
class DeviceMessage:
    tenant_id: uuid.UUID
    device_id: str
    kind: str
    payload: bytes
    received_at: datetime
    retain: bool = False


class BadTopic(ValueError):
    pass


def parse(topic: str) -> tuple[uuid.UUID, str, str]:
    """(tenant_id, device_id, kind) of a device topic, or BadTopic saying why."""
    parts = topic.split("/", 3)
    if len(parts) != 4 or parts[0] != PREFIX:
        raise BadTopic("not pulse/{tenant}/{device}/{kind}")
    _, tenant, device, kind = parts
    try:
        tenant_id = uuid.UUID(tenant)
    except ValueError:
        raise BadTopic(f"tenant {tenant[:40]!r} is not a UUID") from None
    if not ID_PATTERN.fullmatch(device):
        raise BadTopic(f"device id {device[:40]!r} is not valid")
    if kind not in KINDS and kind not in OUTBOUND:
        raise BadTopic(f"unknown kind {kind[:40]!r}")
    return tenant_id, device, kind


def topic(tenant_id: uuid.UUID, device_id: str, kind: str) -> str:
    return f"{PREFIX}/{tenant_id}/{device_id}/{kind}"
