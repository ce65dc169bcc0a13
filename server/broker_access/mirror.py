"""Brokers that keep their own list of clients (Mosquitto's dynamic security)
are told about credentials as they are issued and revoked. The embedded
broker and the HTTP hooks ask the database instead and need no mirror."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from server.broker_access.rules import DeviceIdentity


class AccessMirror(Protocol):
    async def created(self, identity: DeviceIdentity, secret: str) -> None:
        """Called before the credential commits: raising BrokerUnavailable
        leaves nothing stored, so the broker never misses a credential."""

    async def revoked(self, identities: Sequence[DeviceIdentity]) -> None:
        """Called after the revocation commits; should disconnect them."""


class NoMirror:
    async def created(self, identity: DeviceIdentity, secret: str) -> None:
        return None

    async def revoked(self, identities: Sequence[DeviceIdentity]) -> None:
        return None
