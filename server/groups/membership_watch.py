"""WatchGroupMembership: membership events as a `server.watch_hub` source,
after the group's current members when the stream starts without a cursor.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from pulse.device.v1 import groups_pb2
from pulse.device.v1.error_reason_pb2 import ErrorReason

from server import event_log
from server.db import Connection, Database
from server.errors import DomainError, InvalidArgument, ServerShuttingDown
from server.event_log import Position
from server.groups import membership_store
from server.groups.membership_store import MembershipEvent
from server.listener import Listener
from server.pagination import PageTokens
from server.watch_hub import BatchRead, WatchHub

Response = groups_pb2.WatchGroupMembershipResponse
#: A membership stream is narrowed to one group: its id.
GroupId = str
MembershipHub = WatchHub[GroupId, MembershipEvent, Response]

_CURSOR_KIND = "membership-watch"
_SNAPSHOT_PAGE = 1000


class GroupDeleted(DomainError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, group_id: str) -> None:
        super().__init__(
            f"group {group_id!r} was deleted; its membership stream has ended",
            reason=ErrorReason.GROUP_NOT_FOUND,
            metadata={"group": group_id},
        )


class _Read(BatchRead[MembershipEvent]):
    __slots__ = ()
    batch: membership_store.Batch

    def accepts(self, narrowing: GroupId, event: MembershipEvent) -> bool:
        return event.group_id == narrowing

    def failure(self, narrowing: GroupId) -> DomainError | None:
        return GroupDeleted(narrowing) if narrowing in self.batch.missing_groups else None


class MembershipSource:
    channel = membership_store.CHANNEL

    def __init__(self, tokens: PageTokens) -> None:
        self._tokens = tokens

    def keys(self, narrowing: GroupId) -> frozenset[str]:
        return frozenset({narrowing})

    def key(self, event: MembershipEvent) -> str:
        return event.group_id

    async def horizon(self, con: Connection, tenant_id: uuid.UUID) -> int:
        return await membership_store.horizon(con, tenant_id)

    async def read(
        self,
        con: Connection,
        tenant_id: uuid.UUID,
        after: Position,
        narrowings: Sequence[GroupId],
        *,
        limit: int,
        single: bool,
    ) -> _Read:
        batch = await membership_store.read_after(
            con, tenant_id, after, sorted(set(narrowings)), limit=limit
        )
        return _Read(batch)

    def seal(self, tenant_id: uuid.UUID, group_id: str, position: Position) -> str:
        return self._tokens.seal(
            kind=_CURSOR_KIND, tenant_id=tenant_id, request=group_id, key=list(position)
        )

    def open_cursor(self, tenant_id: uuid.UUID, group_id: str, cursor: str) -> Position:
        """The position a cursor of this group's stream names; INVALID_ARGUMENT
        for anything else (another group's cursor included)."""
        key = self._tokens.open(
            cursor, kind=_CURSOR_KIND, tenant_id=tenant_id, request=group_id, field="resume_cursor"
        )
        if len(key) != 2 or not all(isinstance(k, int) and k >= 0 for k in key):
            raise InvalidArgument.single("resume_cursor", "is malformed")
        xact, event_id = key
        assert isinstance(xact, int) and isinstance(event_id, int)
        return Position(xact, event_id)

    def response(self, tenant_id: uuid.UUID, event: MembershipEvent) -> Response:
        occurred_at = Timestamp()
        occurred_at.FromDatetime(event.occurred_at)
        return Response(
            event_type=Response.EventType.Value(event.event_type),
            device_id=event.device_id,
            cause=Response.Cause.Value(event.cause),
            cursor=self.seal(tenant_id, event.group_id, event.position),
            occurred_at=occurred_at,
        )

    def bookmark(self, tenant_id: uuid.UUID, narrowing: GroupId, position: Position) -> Response:
        return Response(cursor=self.seal(tenant_id, narrowing, position))

    def shutting_down(
        self, tenant_id: uuid.UUID, narrowing: GroupId, position: Position
    ) -> ServerShuttingDown:
        return ServerShuttingDown(self.seal(tenant_id, narrowing, position))


class MembershipWatches:
    """Every WatchGroupMembership stream of this server process."""

    def __init__(self, db: Database, listener: Listener, tokens: PageTokens) -> None:
        self.db = db
        self.source = MembershipSource(tokens)
        self.hub: MembershipHub = WatchHub(db, listener, self.source, feed="membership")

    async def close(self) -> None:
        await self.hub.close()

    async def watch(
        self, tenant_id: uuid.UUID, group_id: str, resume: Position | None
    ) -> AsyncIterator[Response]:
        if resume is None:
            snapshot = _Snapshot(self.db, tenant_id, group_id)
            async for member in snapshot.members():
                yield member
            resume = snapshot.position
        async for message in self.hub.watch(tenant_id, resume, group_id):
            yield message


class _Snapshot:
    """The group's members at a position of its event log."""

    def __init__(self, db: Database, tenant_id: uuid.UUID, group_id: str) -> None:
        self._db = db
        self._tenant_id = tenant_id
        self._group_id = group_id
        self.position = Position(0, 0)

    async def members(self) -> AsyncIterator[Response]:
        lock = membership_store.tenant_lock(self._tenant_id)
        # event_log's order: the writers first, then a later snapshot.
        async with self._db.tenant(self._tenant_id, readonly=True) as con:
            bound, writers = await event_log.writers(con, lock)
        async with self._db.tenant(self._tenant_id, readonly=True, snapshot=True) as con:
            horizon = await con.fetchval(f"SELECT {event_log.HORIZON_SQL}", bound, writers)
            self.position = Position(int(horizon), 0)
            after = ""
            while True:
                page = await membership_store.members_after(
                    con, self._tenant_id, self._group_id, after, limit=_SNAPSHOT_PAGE
                )
                for device_id in page:
                    yield Response(
                        event_type=Response.ENTERED,
                        device_id=device_id,
                        cause=Response.CURRENT_MEMBER,
                    )
                if len(page) < _SNAPSHOT_PAGE:
                    return
                after = page[-1]
