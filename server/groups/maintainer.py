"""Keeps group memberships as rows and emits their ENTERED / LEFT events
(migrations/0008, server/groups/membership_store.py, docs/groups.md).

Triggers queue every change that may move a device in or out of a group, in
the writing transaction; this loop applies the queue one tenant at a time,
each tenant in one transaction under a per-tenant lock. Every server process
runs one: any number may, each tenant's events are still produced by one of
them at a time, in order. A crash rolls the transaction back and leaves the
changes queued for the next pass, here or in another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import timedelta

from server import transient
from server.connectivity.transitions import EVALUATOR_ROLE
from server.db import Database
from server.groups import membership_store

log = logging.getLogger(__name__)

_AFTER_BUG_S = 5.0


class MembershipMaintainer:
    def __init__(
        self, db: Database, *, stale_after: timedelta, poll_s: float = 0.05, batch: int = 5_000
    ) -> None:
        """Args:
        stale_after: The twin sync rule's threshold (PULSE_TWIN_STALE_AFTER_S),
            the one ListGroupMembers uses.
        poll_s: How often an empty queue is looked at again.
        batch: Most queued changes applied per tenant transaction.
        """
        self._db = db
        self._stale_after = stale_after
        self._poll_s = poll_s
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        # Tenants whose maintenance failed on a bug, and when: retried after _AFTER_BUG_S.
        self._failed: dict[uuid.UUID, float] = {}
        #: Membership events inserted by this maintainer.
        self.events = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="membership-maintainer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                busy = await transient.retry_forever(
                    self.run_once, log=log, what="group membership maintenance"
                )
            except Exception:
                # A bug: the server keeps serving, and the changes stay queued.
                log.exception("group membership maintenance failed; retrying")
                busy = False
                await asyncio.sleep(_AFTER_BUG_S)
            if not busy:
                await asyncio.sleep(self._poll_s)

    async def run_once(self) -> bool:
        """One pass over the tenants with work; whether it applied any (a
        tenant another process holds is left to it)."""
        async with self._db.transaction(
            f"BEGIN READ ONLY; SET LOCAL ROLE {EVALUATOR_ROLE}", readonly=True
        ) as con:
            tenants = await membership_store.pending_tenants(con)
        worked = False
        now = time.monotonic()
        for tenant_id in tenants:
            if now - self._failed.get(tenant_id, -_AFTER_BUG_S) < _AFTER_BUG_S:
                continue
            try:
                # One snapshot for the whole pass: the changes it claims are
                # exactly those whose effects its evaluation sees, so each is
                # named as the cause of what it did.
                async with self._db.tenant(tenant_id, snapshot=True) as con:
                    inserted = await membership_store.maintain(
                        con, tenant_id, stale_after=self._stale_after, limit=self._batch
                    )
            except transient.TRANSIENT:
                raise
            except Exception:
                # A bug that one tenant's data triggers must not stop the others.
                log.exception("group membership maintenance of tenant %s failed", tenant_id)
                self._failed[tenant_id] = now
                continue
            self._failed.pop(tenant_id, None)
            if inserted is not None:
                worked = True
                self.events += inserted
        return worked
