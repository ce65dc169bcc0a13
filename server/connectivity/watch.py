"""WatchConnectionEvents: the connectivity log as a `server.watch_hub` source.

Narrowing by device id is the hub's index; by event type and group, the
read's. A group is re-read with every batch (`load_group`), so an edit of
its filter or members applies from the next event on, and a group deleted
while watched ends its streams with NOT_FOUND.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

from pulse.device.v1 import connectivity_pb2

from server import filters
from server.connectivity import convert, cursor, store
from server.connectivity.model import CHANNEL, EventRecord, Position
from server.connectivity.narrowing import GroupView, Narrowing, load_group
from server.db import Connection, Database
from server.errors import DomainError, NotFound, ServerShuttingDown
from server.listener import Listener
from server.pagination import PageTokens
from server.watch_hub import BATCH_SIZE, QUEUE_SIZE, BatchRead, WatchHub

Response = connectivity_pb2.WatchConnectionEventsResponse
ConnectivityHub = WatchHub[Narrowing, EventRecord, Response]


class _Read(BatchRead[EventRecord]):
    __slots__ = ("missing", "views")

    def __init__(
        self, batch: store.Batch, views: dict[str, GroupView], missing: dict[str, NotFound]
    ) -> None:
        super().__init__(batch)
        self.views = views
        self.missing = missing

    def accepts(self, narrowing: Narrowing, event: EventRecord) -> bool:
        return narrowing.accepts(event, self.views.get(narrowing.group_id or ""))

    def failure(self, narrowing: Narrowing) -> DomainError | None:
        return self.missing.get(narrowing.group_id or "")


class ConnectivitySource:
    channel = CHANNEL

    def __init__(self, tokens: PageTokens, stale_after: timedelta) -> None:
        self._tokens = tokens
        #: The twin sync rule's threshold, for group filters on sync status.
        self._stale_after = stale_after

    def keys(self, narrowing: Narrowing) -> frozenset[str]:
        return narrowing.device_ids

    def key(self, event: EventRecord) -> str:
        return event.device_id

    async def horizon(self, con: Connection, tenant_id: uuid.UUID) -> int:
        return await store.horizon(con)

    async def read(
        self,
        con: Connection,
        tenant_id: uuid.UUID,
        after: Position,
        narrowings: Sequence[Narrowing],
        *,
        limit: int,
        single: bool,
    ) -> _Read:
        views: dict[str, GroupView] = {}
        missing: dict[str, NotFound] = {}
        for group_id in sorted({n.group_id for n in narrowings if n.group_id is not None}):
            try:
                views[group_id] = await load_group(
                    con, tenant_id, group_id, stale_after=self._stale_after
                )
            except NotFound as error:
                missing[group_id] = error
        one = narrowings[0] if single else Narrowing()
        batch = await store.read_after(
            con,
            tenant_id,
            after,
            limit=limit,
            device_ids=sorted(one.device_ids),
            event_types=sorted(one.event_types),
            with_devices=bool(views),
            static_groups=[g for g, v in views.items() if v.static],
            with_twins=any(v.reads_twin for v in views.values()),
        )
        return _Read(batch, views, missing)

    def response(self, tenant_id: uuid.UUID, event: EventRecord) -> Response:
        return Response(
            event=convert.event(event), cursor=cursor.seal(self._tokens, tenant_id, event.position)
        )

    def bookmark(self, tenant_id: uuid.UUID, narrowing: Narrowing, position: Position) -> Response:
        return Response(cursor=cursor.seal(self._tokens, tenant_id, position))

    def shutting_down(
        self, tenant_id: uuid.UUID, narrowing: Narrowing, position: Position
    ) -> ServerShuttingDown:
        return ServerShuttingDown(cursor.seal(self._tokens, tenant_id, position))


def connectivity_hub(
    db: Database,
    listener: Listener,
    tokens: PageTokens,
    *,
    queue_size: int = QUEUE_SIZE,
    batch_size: int = BATCH_SIZE,
    stale_after: timedelta = filters.DEFAULT_TWIN_STALE_AFTER,
) -> ConnectivityHub:
    """Every WatchConnectionEvents stream of this server process."""
    return WatchHub(
        db,
        listener,
        ConnectivitySource(tokens, stale_after),
        feed="connectivity",
        queue_size=queue_size,
        batch_size=batch_size,
    )
