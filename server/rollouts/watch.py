"""WatchRollout's loop: the rollout, then each device whose state changed,
and the rollout again whenever it changed, until it has nothing left to do.

Every write of a rollout's device states happens in a transaction holding
the rollout's row lock and numbers the changed rows from one sequence
(`change_seq`), so per rollout the numbers grow in commit order: "changed
after c" misses nothing committed later and repeats nothing. The rollout
and its changes are read in one snapshot, so the counts sent agree with the
devices sent before them. Writers announce a commit on the tenant's channel
(`store.channel`); the loop subscribes before its first read, re-reads on
an announcement of its rollout or a gap, and on its own every RESYNC_S
seconds (an announcement is lost if a writer dies right after committing).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from pulse.device.v1 import rollouts_pb2

from server.db import Database
from server.errors import InvalidArgument
from server.listener import GAP, Listener, Subscription
from server.pagination import PageTokens
from server.rollouts import convert, rules, store

Response = rollouts_pb2.WatchRolloutResponse

RESYNC_S = 5.0
_BATCH = 500
_QUEUE = 256
_CURSOR_KIND = "rollout-watch"


class Cursors:
    """A stream's cursors: sealed change numbers, bound to tenant and rollout."""

    def __init__(self, tokens: PageTokens) -> None:
        self._tokens = tokens

    def seal(self, tenant_id: uuid.UUID, rollout_id: str, change: int) -> str:
        return self._tokens.seal(
            kind=_CURSOR_KIND, tenant_id=tenant_id, request=rollout_id, key=[change]
        )

    def open(self, tenant_id: uuid.UUID, rollout_id: str, cursor: str) -> int:
        key = self._tokens.open(
            cursor,
            kind=_CURSOR_KIND,
            tenant_id=tenant_id,
            request=rollout_id,
            field="resume_cursor",
        )
        if len(key) != 1 or not isinstance(key[0], int) or key[0] < 0:
            raise InvalidArgument.single("resume_cursor", "is malformed")
        return key[0]


def _done(rollout: store.RolloutRecord) -> bool:
    return rollout.state in rules.ENDED and rollout.counts.applied == 0


async def watch(
    db: Database,
    listener: Listener,
    cursors: Cursors,
    tenant_id: uuid.UUID,
    rollout_id: str,
    after: int | None,
) -> AsyncIterator[Response]:
    """The stream; `after` is the change a resume cursor names (None: from
    now, starting with the rollout). NotFound for an unknown rollout."""
    subscription = await listener.subscribe(store.channel(tenant_id), maxsize=_QUEUE)
    try:
        sent: rollouts_pb2.Rollout | None = None
        while True:
            async with db.tenant(tenant_id, readonly=True, snapshot=True) as con:
                rollout = await store.get(con, tenant_id, rollout_id)
                if after is None:
                    after = await store.last_change(con, tenant_id, rollout_id)
                    changes = []
                else:
                    changes = await store.changed_after(
                        con, tenant_id, rollout_id, after, limit=_BATCH
                    )
            for device in changes:
                assert device.change_seq is not None
                after = device.change_seq
                yield Response(
                    device=convert.device(device),
                    cursor=cursors.seal(tenant_id, rollout_id, after),
                )
            if len(changes) == _BATCH:
                continue  # the counts are only sent with the changes they count
            progress = convert.rollout(rollout)
            if progress != sent:
                sent = progress
                yield Response(rollout=progress, cursor=cursors.seal(tenant_id, rollout_id, after))
            if _done(rollout):
                return
            await _announced(subscription, rollout_id)
    finally:
        subscription.close()


async def _announced(subscription: Subscription, rollout_id: str) -> None:
    """Until this rollout's change is announced, a gap, or RESYNC_S."""
    while True:
        try:
            payload = await asyncio.wait_for(subscription.get(), RESYNC_S)
        except TimeoutError:
            return
        for item in [payload, *subscription.drain()]:
            if item in (GAP, rollout_id):
                return
