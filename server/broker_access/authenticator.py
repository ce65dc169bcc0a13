"""Checking an MQTT CONNECT against the credentials in the database: the one
implementation behind the embedded broker and the HTTP hooks.

A CONNECT costs one indexed read (is the credential still active?), a write
of its last-used time at most once a minute, and, the first time a secret is
seen, one scrypt check (~50 ms, in a thread). A secret that has passed is
remembered as its SHA-256, so a fleet reconnecting after a broker restart
costs reads, not scrypt; the read is never cached, so a revoked credential is
refused on the next CONNECT. Live connections are re-checked
with `still_active` (the embedded broker calls it every second).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import uuid
from collections.abc import Iterable

from server.broker_access.rules import (
    DeviceIdentity,
    Identity,
    ServiceIdentity,
    client_id_problem,
    parse_username,
)
from server.credentials import hashing, store
from server.db import Database

log = logging.getLogger("pulse.broker_access")

_REMEMBERED_MAX = 200_000


class Refused(Exception):
    """A CONNECT that must be refused; `reason` is a short counter label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Authenticator:
    def __init__(self, db: Database) -> None:
        self._db = db
        # username -> SHA-256 of the secret that last passed scrypt for it.
        self._verified: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.refused: collections.Counter[str] = collections.Counter()
        self.accepted = 0

    async def authenticate(
        self, username: str | None, password: str | bytes | None, client_id: str
    ) -> Identity:
        """The identity these CONNECT fields prove, or Refused saying why."""
        try:
            identity = await self._authenticate(username, password, client_id)
        except Refused as refusal:
            self.refused[refusal.reason] += 1
            raise
        self.accepted += 1
        return identity

    async def _authenticate(
        self, username: str | None, password: str | bytes | None, client_id: str
    ) -> Identity:
        if not username or password is None:
            raise Refused("anonymous", "a username and password are required")
        secret = password.decode(errors="replace") if isinstance(password, bytes) else password
        identity = parse_username(username)
        if identity is None:
            raise Refused("bad_username", f"no identity has the username {username[:80]!r}")
        problem = client_id_problem(identity, client_id)
        if problem is not None:
            raise Refused("client_id", problem)
        if isinstance(identity, ServiceIdentity):
            async with self._db.admin() as con:
                stored = await store.service_secret(con, identity.name)
            if stored is None:
                raise Refused("unknown_credential", f"no service credential {identity.name!r}")
            await self._check_secret(username, secret, stored)
            return identity
        async with self._db.tenant(identity.tenant_id, readonly=True) as con:
            found = await store.stored_secret(
                con, identity.tenant_id, identity.device_id, identity.credential_id
            )
        if found is None:
            raise Refused("unknown_credential", "no such credential")
        await self._check_secret(username, secret, found.secret_hash)
        # Checked after the secret, so that only its holder learns its state.
        if found.revoked:
            raise Refused("revoked", "the credential was revoked")
        if not found.active:
            raise Refused("expired", "the credential has expired")
        if not found.device_active:
            raise Refused("decommissioned", "the device is decommissioned")
        if not found.used_recently:
            async with self._db.tenant(identity.tenant_id) as con:
                await store.touch(
                    con, identity.tenant_id, identity.device_id, identity.credential_id
                )
        return identity

    async def _check_secret(self, username: str, secret: str, stored: str) -> None:
        digest = hashlib.sha256(f"{stored}\0{secret}".encode()).digest()
        known = self._verified.get(username)
        if known is not None and hmac.compare_digest(known, digest):
            self._verified.move_to_end(username)
            return
        if not await hashing.verify(secret, stored):
            raise Refused("bad_secret", "wrong secret")
        self._verified[username] = digest
        if len(self._verified) > _REMEMBERED_MAX:
            self._verified.popitem(last=False)

    async def still_active(self, identities: Iterable[Identity]) -> set[Identity]:
        """Those of `identities` whose credential still works."""
        by_tenant: dict[uuid.UUID, list[DeviceIdentity]] = collections.defaultdict(list)
        services: list[ServiceIdentity] = []
        for identity in identities:
            if isinstance(identity, DeviceIdentity):
                by_tenant[identity.tenant_id].append(identity)
            else:
                services.append(identity)
        active: set[Identity] = set()
        for tenant_id, devices in by_tenant.items():
            async with self._db.tenant(tenant_id, readonly=True) as con:
                keys = await store.still_active(
                    con, tenant_id, [(d.device_id, d.credential_id) for d in devices]
                )
            active.update(d for d in devices if (d.device_id, d.credential_id) in keys)
        if services:
            async with self._db.admin() as con:
                for service in services:
                    if await store.service_secret(con, service.name) is not None:
                        active.add(service)
        return active
