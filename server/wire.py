"""The MQTT contract with devices, written once: topics and payloads.

Topics are `pulse/{tenant_id}/{device_id}/{kind}`. Devices publish the kinds
in KINDS; the service publishes `twin/desired`, retained. The server builds
desired messages, the evaluator parses what devices send, and the simulator
speaks the device side: all of them through this module.

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

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, TypeGuard

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


def reported(state: dict[str, Any], desired_version: int, *, seq: int | None = None) -> bytes:
    return _dumps(_with_seq({"state": state, "desired_version": desired_version}, seq))


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


def _versioned(payload: bytes, version_key: str) -> tuple[dict[str, Any], int]:
    return _envelope(_object(payload), version_key)


def _envelope(message: dict[str, Any], version_key: str) -> tuple[dict[str, Any], int]:
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


def parse_reported_seq(payload: bytes) -> tuple[dict[str, Any], int, int | None]:
    """(state, desired_version, seq or None) of a twin/reported message, or
    BadPayload. A seq that is there but not a sequence number refuses the
    report (BAD_SEQ): applied without its seq, it could roll back a newer
    report, which is what the seq is there to prevent."""
    message = _object(payload)
    state, version = _envelope(message, "desired_version")
    if "seq" not in message:
        return state, version, None
    seq = message["seq"]
    if not _valid_seq(seq):
        raise BadPayload(BAD_SEQ, '"seq" must be an integer from 0 to 2**63 - 1')
    return state, version, seq


def parse_desired(payload: bytes) -> tuple[dict[str, Any], int]:
    """(state, version) of a twin/desired message, or BadPayload."""
    return _versioned(payload, "version")
