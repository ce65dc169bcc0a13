"""The MQTT contract with devices, written once: topics and payloads.

Topics are `pulse/{tenant_id}/{device_id}/{kind}`. Devices publish the kinds
in KINDS; the service publishes `twin/desired`, retained. The server builds
desired messages, the evaluator parses what devices send, and the simulator
speaks the device side: all of them through this module.

- `status` (device, retained): `online`, `offline`; anything else (the last
  will sends `lost`) is a lost connection;
- `heartbeat`, `telemetry` (device): anything; they count as activity;
- `twin/reported` (device): `{"state": {...}, "desired_version": n}`;
- `twin/desired` (service, retained): `{"state": {...}, "version": n}`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from server.validation import ID_PATTERN

PREFIX = "pulse"
SUBSCRIPTION = f"{PREFIX}/+/+/#"
KINDS = frozenset({"heartbeat", "status", "twin/reported", "telemetry"})
OUTBOUND = frozenset({"twin/desired"})

ONLINE = b"online"
OFFLINE = b"offline"
LOST = b"lost"

# Why a reported message was refused; the evaluator counts rejections by these.
MALFORMED_JSON = "malformed_json"
NOT_OBJECT = "not_object"
BAD_STATE = "bad_state"
BAD_VERSION = "bad_version"


def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class DeviceMessage:
    tenant_id: uuid.UUID
    device_id: str
    kind: str
    payload: bytes
    received_at: datetime
    retain: bool = False
    #: Every handler the message is given to calls this exactly once, when
    #: what it does with the message has committed (or it decided to ignore
    #: the message); the evaluator acknowledges it to the broker only once
    #: all of them have.
    settle: Callable[[], None] = _nothing


class BadTopic(ValueError):
    pass


class BadPayload(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


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


def status(payload: bytes) -> bytes:
    """ONLINE, OFFLINE or LOST for a status payload."""
    text = payload.strip().lower()
    return text if text in (ONLINE, OFFLINE) else LOST


def _dumps(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def desired(document: dict[str, Any], version: int) -> bytes:
    return _dumps({"state": document, "version": version})


def reported(state: dict[str, Any], desired_version: int) -> bytes:
    return _dumps({"state": state, "desired_version": desired_version})


def heartbeat(uptime_s: float) -> bytes:
    return _dumps({"uptime_s": uptime_s})


def _no_constants(name: str) -> NoReturn:
    # json.loads accepts NaN and Infinity by default; JSON does not.
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads with any option builds a new decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def _object(payload: bytes) -> dict[str, Any]:
    try:
        message: Any = _DECODER.decode(payload.decode())
    except (ValueError, RecursionError) as error:
        # UnicodeDecodeError (not UTF-8) is a ValueError; RecursionError
        # comes from thousands of nested brackets.
        raise BadPayload(MALFORMED_JSON, str(error)[:200]) from None
    if type(message) is not dict:
        raise BadPayload(NOT_OBJECT, f"payload is a JSON {type(message).__name__}")
    return message


def _versioned(payload: bytes, version_key: str) -> tuple[dict[str, Any], int]:
    message = _object(payload)
    state = message.get("state")
    if type(state) is not dict:
        raise BadPayload(BAD_STATE, '"state" must be a JSON object')
    version = message.get(version_key)
    if type(version) is not int or version < 0 or version >= 2**63:
        raise BadPayload(BAD_VERSION, f'"{version_key}" must be a non-negative integer')
    return state, version


def parse_reported(payload: bytes) -> tuple[dict[str, Any], int]:
    """(state, desired_version) of a twin/reported message, or BadPayload."""
    return _versioned(payload, "desired_version")


def parse_desired(payload: bytes) -> tuple[dict[str, Any], int]:
    """(state, version) of a twin/desired message, or BadPayload."""
    return _versioned(payload, "version")
