"""The MQTT contract with devices, written once: topics and payloads.

Topics are `pulse/{tenant_id}/{device_id}/{kind}`. Devices publish the kinds
in KINDS; the service publishes `twin/desired`, retained. The server builds
desired messages, the evaluator parses what devices send, and the simulator
speaks the device side: all of them through this module.

Devices of the upstream platform (OpsConductor-Pulse) speak its dialect
(`Dialect.UPSTREAM`, docs/upstream-devices.md) for the twin only:

- `tenant/{tenant}/device/{device}/shadow/reported` (device):
  `{"reported": {...}, "version": n}`, our `twin/reported` with `version` as
  `desired_version` and no seq;
- `tenant/{tenant}/device/{device}/shadow/desired` (service, retained):
  `{"desired": {...}, "version": n, "timestamp": "...Z"}`.

`{tenant}` is the tenant's external id or its UUID (`server.tenants.tenant_uuid`
maps either to the tenant).

- `status` (device, retained): `online`, `offline`; anything else (the last
  will sends `lost`) is a lost connection; or the JSON form
  `{"status": "online" | "offline" | <will>, "seq": s}`;
- `heartbeat`, `telemetry` (device): anything; they count as activity (a
  JSON object may carry `"seq": s`);
- `twin/reported` (device): `{"state": {...}, "desired_version": n}`, with an
  optional `"seq": s`;
- `twin/desired` (service, retained): `{"state": {...}, "version": n}`.

`seq` is optional: an integer 0 <= s < 2**63 that grows with every message a
device sends (docs/device-ordering.md), so that messages processed out of
order by several evaluators cannot undo newer ones.
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, NoReturn, TypeGuard

from server.tenants import BadTenantId, tenant_uuid
from server.validation import ID_PATTERN

PREFIX = "pulse"
SUBSCRIPTION = f"{PREFIX}/+/+/#"
KINDS = frozenset({"heartbeat", "status", "twin/reported", "telemetry"})
OUTBOUND = frozenset({"twin/desired"})

UPSTREAM_PREFIX = "tenant"
#: What the evaluator subscribes to beside SUBSCRIPTION: upstream's reports.
UPSTREAM_SUBSCRIPTION = f"{UPSTREAM_PREFIX}/+/device/+/shadow/reported"
# Upstream's shadow topics and the kinds they are here, both ways.
_UPSTREAM_KINDS = {"shadow/reported": "twin/reported", "shadow/desired": "twin/desired"}
_UPSTREAM_SHADOWS = {kind: shadow for shadow, kind in _UPSTREAM_KINDS.items()}


class Dialect(enum.Enum):
    """Whose topics and payloads a message uses."""

    PULSE = "pulse"
    #: The upstream platform's twin topics (docs/upstream-devices.md).
    UPSTREAM = "upstream"


ONLINE = b"online"
OFFLINE = b"offline"
LOST = b"lost"

# Why a reported message was refused; the evaluator counts rejections by these.
MALFORMED_JSON = "malformed_json"
NOT_OBJECT = "not_object"
BAD_STATE = "bad_state"
BAD_VERSION = "bad_version"
BAD_SEQ = "bad_seq"

#: Device sequence numbers fit PostgreSQL's bigint.
SEQ_LIMIT = 2**63


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
    #: The dialect of its topic, and so of its payload.
    dialect: Dialect = Dialect.PULSE


class DeviceTopic(NamedTuple):
    """A device topic read: whose, which kind (ours), in which dialect."""

    tenant_id: uuid.UUID
    device_id: str
    kind: str
    dialect: Dialect


class BadTopic(ValueError):
    pass


class BadPayload(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse(topic: str) -> tuple[uuid.UUID, str, str]:
    """(tenant_id, device_id, kind) of a device topic of either dialect, or
    BadTopic saying why; `parse_topic` also says which dialect."""
    tenant_id, device_id, kind, _ = parse_topic(topic)
    return tenant_id, device_id, kind


def parse_topic(topic: str) -> DeviceTopic:
    """A device topic of either dialect, upstream's shadow topics as our
    `twin/...` kinds, or BadTopic saying why."""
    if topic.startswith(UPSTREAM_PREFIX + "/"):
        return _parse_upstream(topic)
    parts = topic.split("/", 3)
    if len(parts) != 4 or parts[0] != PREFIX:
        raise BadTopic("not pulse/{tenant}/{device}/{kind}")
    _, tenant, device, kind = parts
    try:
        tenant_id = uuid.UUID(tenant)
    except ValueError:
        raise BadTopic(f"tenant {tenant[:40]!r} is not a UUID") from None
    _check_device(device)
    if kind not in KINDS and kind not in OUTBOUND:
        raise BadTopic(f"unknown kind {kind[:40]!r}")
    return DeviceTopic(tenant_id, device, kind, Dialect.PULSE)


def _parse_upstream(topic: str) -> DeviceTopic:
    parts = topic.split("/")
    kind = _UPSTREAM_KINDS.get("/".join(parts[4:]))
    if len(parts) != 6 or parts[2] != "device" or kind is None:
        raise BadTopic("not tenant/{tenant}/device/{device}/shadow/{reported,desired}")
    tenant, device = parts[1], parts[3]
    try:
        tenant_id = tenant_uuid(tenant)
    except BadTenantId as error:
        raise BadTopic(str(error)) from None
    _check_device(device)
    return DeviceTopic(tenant_id, device, kind, Dialect.UPSTREAM)


def _check_device(device: str) -> None:
    if not ID_PATTERN.fullmatch(device):
        raise BadTopic(f"device id {device[:40]!r} is not valid")


def topic(tenant_id: uuid.UUID, device_id: str, kind: str) -> str:
    return f"{PREFIX}/{tenant_id}/{device_id}/{kind}"


def upstream_tenant(tenant_id: uuid.UUID, external_id: str | None) -> str:
    """The tenant segment the service publishes upstream topics under: the
    tenant's external id if it has one, else its UUID."""
    return str(tenant_id) if external_id is None else external_id


def upstream_topic(tenant: str, device_id: str, kind: str) -> str:
    """Upstream's topic for "twin/reported" or "twin/desired"; `tenant` is
    the tenant's external id or UUID."""
    return f"{UPSTREAM_PREFIX}/{tenant}/device/{device_id}/{_UPSTREAM_SHADOWS[kind]}"


def status(payload: bytes) -> bytes:
    """ONLINE, OFFLINE or LOST for a status payload."""
    return parse_status(payload)[0]


def _status_word(word: bytes) -> bytes:
    word = word.strip().lower()
    return word if word in (ONLINE, OFFLINE) else LOST


def parse_status(payload: bytes) -> tuple[bytes, int | None]:
    """(ONLINE, OFFLINE or LOST, seq or None) of a status payload: the plain
    word, or `{"status": word, "seq": s}`. Anything else is a will, as the
    plain form has always been read."""
    text = payload.strip()
    if text[:1] != b"{":
        return _status_word(text), None
    try:
        message = _object(text)
    except BadPayload:
        return LOST, None
    word = message.get("status")
    found = _status_word(word.encode()) if type(word) is str else LOST
    return found, _liveness_seq(message)


def activity_seq(payload: bytes) -> int | None:
    """The seq of a heartbeat or telemetry payload, or None.

    Called for every such message, so it only parses payloads that can hold
    one: the substring test runs at memory speed, and a payload that is not
    a JSON object (a counter, binary telemetry, ...) is plain activity.
    """
    if b'"seq"' not in payload or payload.lstrip()[:1] != b"{":
        return None
    try:
        message = _object(payload)
    except BadPayload:
        return None
    return _liveness_seq(message)


def _valid_seq(value: object) -> TypeGuard[int]:
    # bool is an int subclass; `true` is not a sequence number.
    return type(value) is int and 0 <= value < SEQ_LIMIT


def _liveness_seq(message: dict[str, Any]) -> int | None:
    # A bad seq on a status or heartbeat is read as no seq, not as a bad
    # message: the message still says the device is alive (or gone), and
    # dropping it over an optional field would lose that for good. Without
    # a seq it is applied in arrival order, as every message used to be.
    value = message.get("seq")
    return value if _valid_seq(value) else None


def _dumps(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _with_seq(value: dict[str, Any], seq: int | None) -> dict[str, Any]:
    if seq is not None:
        if not _valid_seq(seq):
            raise ValueError(f"seq must be an integer from 0 to 2**63 - 1, not {seq!r}")
        value["seq"] = seq
    return value


def desired(document: dict[str, Any], version: int) -> bytes:
    return _dumps({"state": document, "version": version})


def upstream_desired(document: dict[str, Any], version: int, written_at: datetime) -> bytes:
    """Upstream's desired message; `written_at` is when that version was
    written, so a republished version carries the same timestamp."""
    timestamp = written_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return _dumps({"desired": document, "version": version, "timestamp": timestamp})


def reported(state: dict[str, Any], desired_version: int, *, seq: int | None = None) -> bytes:
    return _dumps(_with_seq({"state": state, "desired_version": desired_version}, seq))


def upstream_reported(state: dict[str, Any], version: int) -> bytes:
    return _dumps({"reported": state, "version": version})


def heartbeat(uptime_s: float, *, seq: int | None = None) -> bytes:
    return _dumps(_with_seq({"uptime_s": uptime_s}, seq))


def status_payload(word: bytes, *, seq: int | None = None) -> bytes:
    """A status message: ONLINE, OFFLINE or LOST (or any will text) as the
    plain word, or with a seq as `{"status": ..., "seq": s}`. A last will
    carries the seq of the `online` its session publishes first."""
    if seq is None:
        return word
    return _dumps(_with_seq({"status": word.decode()}, seq))


class SeqClock:
    """Sequence numbers for one device, as docs/device-ordering.md asks:
    strictly increasing, also across restarts, without storing anything.

    Microseconds since the epoch, or one more than the last number when the
    clock has not moved on (two in one microsecond, a clock stepped back).
    After a restart it starts above every number used before, unless the
    device used more than one per microsecond or its clock went back; a
    device without a trustworthy clock persists a counter instead.
    """

    __slots__ = ("_last",)

    def __init__(self, last: int = -1) -> None:
        self._last = last

    def next(self) -> int:
        self._last = max(self._last + 1, time.time_ns() // 1000)
        return self._last


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


# Per dialect, the keys of a twin message's document and of its version.
_REPORTED_KEYS = {
    Dialect.PULSE: ("state", "desired_version"),
    Dialect.UPSTREAM: ("reported", "version"),
}
_DESIRED_KEYS = {Dialect.PULSE: ("state", "version"), Dialect.UPSTREAM: ("desired", "version")}


def _envelope(message: dict[str, Any], keys: tuple[str, str]) -> tuple[dict[str, Any], int]:
    state_key, version_key = keys
    state = message.get(state_key)
    if type(state) is not dict:
        raise BadPayload(BAD_STATE, f'"{state_key}" must be a JSON object')
    version = message.get(version_key)
    if type(version) is not int or version < 0 or version >= 2**63:
        raise BadPayload(BAD_VERSION, f'"{version_key}" must be a non-negative integer')
    return state, version


def parse_reported_seq(
    payload: bytes, dialect: Dialect = Dialect.PULSE
) -> tuple[dict[str, Any], int, int | None]:
    """(state, desired_version, seq or None) of a twin/reported message of
    `dialect`, or BadPayload. A seq that is there but not a sequence number
    refuses the report (BAD_SEQ): applied without its seq, it could roll back
    a newer report, which is what the seq is there to prevent. Upstream's
    reports have no seq: a "seq" in one is not read."""
    message = _object(payload)
    state, version = _envelope(message, _REPORTED_KEYS[dialect])
    if dialect is Dialect.UPSTREAM or "seq" not in message:
        return state, version, None
    seq = message["seq"]
    if not _valid_seq(seq):
        raise BadPayload(BAD_SEQ, '"seq" must be an integer from 0 to 2**63 - 1')
    return state, version, seq


def parse_desired(payload: bytes, dialect: Dialect = Dialect.PULSE) -> tuple[dict[str, Any], int]:
    """(state, version) of a desired message of `dialect`, or BadPayload."""
    return _envelope(_object(payload), _DESIRED_KEYS[dialect])
