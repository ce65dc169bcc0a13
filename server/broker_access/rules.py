"""The MQTT access rules, written once. Every broker integration (the embedded
broker, the HTTP hooks, Mosquitto's dynamic security roles) asks these
functions; docs/device-identity.md shows the same table.

- a device connects with username `{tenant}/{device}/{credential}` and client
  id `{tenant}/{device}`; it may publish to
  `pulse/{tenant}/{device}/{heartbeat,status,twin/reported,telemetry}` and
  subscribe to (and receive) `pulse/{tenant}/{device}/twin/desired`; in
  upstream's dialect (docs/upstream-devices.md) it may publish to
  `tenant/{t}/device/{device}/shadow/reported` and subscribe to (and receive)
  `tenant/{t}/device/{device}/shadow/desired`, where `{t}` is any tenant id
  that maps to its tenant (`server.tenants.tenant_uuid`: its UUID or its
  external id); nothing else;
- a service (evaluator, simulator, ...) connects with username `pulse-{name}`
  and any client id not shaped like a device's; it may publish, subscribe
  (shared or not) and receive anything under `pulse/` and `tenant/`;
- anyone else, anonymous included, is refused.

A device's client id is fixed so that no device can take another's session
over, and a device-shaped client id is refused to services so no mistake
mixes them; nobody without a service credential can take a service's.
"""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass

from server import wire
from server.credentials.hashing import CREDENTIAL_ID
from server.validation import ID_PATTERN

SERVICE_PREFIX = "pulse-"
SERVICE_NAME = re.compile(r"[a-z][a-z0-9-]{0,39}")

#: The topics a device publishes to; see server/wire.py for their payloads.
DEVICE_PUBLISHES = wire.KINDS
DEVICE_RECEIVES = "twin/desired"
#: What a device publishes in upstream's dialect; it receives DEVICE_RECEIVES.
DEVICE_PUBLISHES_UPSTREAM = "twin/reported"
#: The topic trees services may use: both dialects'.
SERVICE_ROOTS = (wire.PREFIX, wire.UPSTREAM_PREFIX)


class Action(enum.Enum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    #: The broker delivering a message on a topic to the identity.
    RECEIVE = "receive"


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    tenant_id: uuid.UUID
    device_id: str
    credential_id: str

    @property
    def username(self) -> str:
        return device_username(self.tenant_id, self.device_id, self.credential_id)

    @property
    def client_id(self) -> str:
        return device_client_id(self.tenant_id, self.device_id)

    def topic(self, kind: str) -> str:
        return wire.topic(self.tenant_id, self.device_id, kind)


@dataclass(frozen=True, slots=True)
class ServiceIdentity:
    name: str

    @property
    def username(self) -> str:
        return service_username(self.name)


Identity = DeviceIdentity | ServiceIdentity


def device_username(tenant_id: uuid.UUID, device_id: str, credential_id: str) -> str:
    return f"{tenant_id}/{device_id}/{credential_id}"


def device_client_id(tenant_id: uuid.UUID, device_id: str) -> str:
    return f"{tenant_id}/{device_id}"


def service_username(name: str) -> str:
    return SERVICE_PREFIX + name


def parse_username(username: str) -> Identity | None:
    """The identity a username claims, or None for one no identity can have."""
    if username.startswith(SERVICE_PREFIX):
        name = username[len(SERVICE_PREFIX) :]
        return ServiceIdentity(name) if SERVICE_NAME.fullmatch(name) else None
    parts = username.split("/")
    if len(parts) != 3:
        return None
    tenant, device, credential = parts
    try:
        tenant_id = uuid.UUID(tenant)
    except ValueError:
        return None
    if str(tenant_id) != tenant or not ID_PATTERN.fullmatch(device):
        return None
    if not CREDENTIAL_ID.fullmatch(credential):
        return None
    return DeviceIdentity(tenant_id, device, credential)


def in_namespace(username: str) -> bool:
    """Whether `username` is one of ours, well formed or not: a service's or
    one starting with a tenant UUID. Brokers chaining several authenticators
    leave the others to them."""
    return username.startswith(SERVICE_PREFIX) or _starts_with_uuid(username)


def client_id_problem(identity: Identity, client_id: str) -> str | None:
    """Why `identity` may not connect with `client_id`, or None if it may."""
    if isinstance(identity, DeviceIdentity):
        if client_id != identity.client_id:
            return f"a device must connect with client id {identity.client_id!r}"
        return None
    if _looks_like_device_client_id(client_id):
        return "a service may not use a device's client id"
    return None


def _looks_like_device_client_id(client_id: str) -> bool:
    return _starts_with_uuid(client_id) and bool(client_id.partition("/")[2])


def _starts_with_uuid(name: str) -> bool:
    try:
        uuid.UUID(name.partition("/")[0])
    except ValueError:
        return False
    return True


def strip_shared(topic_filter: str) -> str:
    """The filter a shared subscription (`$share/{group}/{filter}`) is for."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else ""
    return topic_filter


def allowed(identity: Identity, action: Action, topic: str) -> bool:
    """Whether `identity` may `action` on `topic` (a topic filter for SUBSCRIBE)."""
    if isinstance(identity, ServiceIdentity):
        target = strip_shared(topic) if action is Action.SUBSCRIBE else topic
        return any(target.startswith(root + "/") for root in SERVICE_ROOTS)
    if action is Action.PUBLISH:
        return any(topic == identity.topic(kind) for kind in DEVICE_PUBLISHES) or _own_upstream(
            identity, topic, DEVICE_PUBLISHES_UPSTREAM
        )
    # An exact filter only: a wildcard, even one a broker would narrow, is
    # refused, so what a device can read never depends on broker matching.
    return topic == identity.topic(DEVICE_RECEIVES) or _own_upstream(
        identity, topic, DEVICE_RECEIVES
    )


def _own_upstream(identity: DeviceIdentity, topic: str, kind: str) -> bool:
    """Whether `topic` is the device's own upstream topic for `kind`. A
    wildcard is no tenant id or device id, so a filter with one is not."""
    try:
        found = wire.parse_topic(topic)
    except wire.BadTopic:
        return False
    return found == (identity.tenant_id, identity.device_id, kind, wire.Dialect.UPSTREAM)
