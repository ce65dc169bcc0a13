"""ConnectivityService: parse and check the request, call the store or the hub, convert."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from pulse.device.v1 import connectivity_pb2, connectivity_pb2_grpc

from server import validation as v
from server.auth import current_principal
from server.connectivity import convert, cursor, store
from server.connectivity.narrowing import Narrowing, load_group
from server.connectivity.watch import ConnectivityHub
from server.db import Database
from server.errors import FieldViolation, InvalidArgument, NotFound
from server.pagination import PageTokens, page_size

Context = grpc.aio.ServicerContext[Any, Any]

MAX_WATCH_DEVICES = 1000
# Upstream's bounds for `limit`, and a bound for `offset` paging, whose cost
# grows with the offset.
MAX_LIMIT = 200
MAX_SKIP = 100_000
_LIST_KIND = "connection-events"


def _event_types(field: str, values: Sequence[int], out: list[FieldViolation]) -> list[str]:
    names = []
    for i, value in enumerate(values):
        name = convert.EVENT_TYPE_NAMES.get(value)
        if name is None:
            out.append(
                FieldViolation(
                    f"{field}[{i}]", "must be CONNECTED, DISCONNECTED or CONNECTION_LOST"
                )
            )
        else:
            names.append(name)
    return sorted(set(names))


def _time(field: str, request: Any, out: list[FieldViolation]) -> datetime | None:
    """The timestamp in `request.<field>`, if set and in range."""
    if not request.HasField(field):
        return None
    ts: timestamp_pb2.Timestamp = getattr(request, field)
    before = len(out)
    v.check_timestamp(field, ts, out)
    return ts.ToDatetime(tzinfo=UTC) if len(out) == before else None


def _list_size(
    request: connectivity_pb2.ListConnectionEventsRequest, out: list[FieldViolation]
) -> int:
    if not request.HasField("limit"):
        return page_size(request.page_size)
    if not 1 <= request.limit <= MAX_LIMIT:
        out.append(FieldViolation("limit", f"must be 1 to {MAX_LIMIT}, not {request.limit}"))
    elif request.page_size and request.limit != request.page_size:
        out.append(
            FieldViolation(
                "limit",
                f"is the upstream name of page_size; got {request.limit} and {request.page_size}",
            )
        )
    return request.limit


def _skip(request: connectivity_pb2.ListConnectionEventsRequest, out: list[FieldViolation]) -> int:
    if not 0 <= request.skip <= MAX_SKIP:
        out.append(FieldViolation("offset", f"must be 0 to {MAX_SKIP}, not {request.skip}"))
    elif request.skip and request.page_token:
        out.append(FieldViolation("offset", "pages either by offset or by page_token, not both"))
    return request.skip


class ConnectivityService(connectivity_pb2_grpc.ConnectivityServiceServicer):
    def __init__(self, db: Database, tokens: PageTokens, hub: ConnectivityHub) -> None:
        self._db = db
        self._tokens = tokens
        self._hub = hub

    async def ListConnectionEvents(
        self, request: connectivity_pb2.ListConnectionEventsRequest, context: Context
    ) -> connectivity_pb2.ListConnectionEventsResponse:
        tenant = current_principal().tenant_id
        out: list[FieldViolation] = []
        device_id = request.device_id or None
        if device_id is not None:
            v.check_id("device_id", device_id, out)
        types = _event_types("event_types", request.event_types, out)
        start = _time("start_time", request, out)
        end = _time("end_time", request, out)
        if start is not None and end is not None and start >= end:
            out.append(FieldViolation("end_time", "must be after start_time"))
        size = _list_size(request, out)
        skip = _skip(request, out)
        v.raise_if(out)
        listing = self._tokens.listing(_LIST_KIND, tenant, device_id, start, end, types)
        key = listing.start(request.page_token)
        before = _list_key(key) if key is not None else None
        selection = store.EventSelection(
            device_id=device_id, start_time=start, end_time=end, event_types=types
        )
        async with self._db.tenant(tenant, readonly=True) as con:
            rows = await store.list_events(
                con, tenant, selection, before=before, skip=skip, limit=size + 1
            )
            # An empty first page may mean the device does not exist.
            missing = not rows and device_id is not None and before is None
            if missing and not await store.device_exists(con, tenant, device_id or ""):
                raise NotFound("device", device_id or "")
            total = (
                await store.count_events(con, tenant, selection) if request.include_total else None
            )
        records, token = listing.page(
            rows, size, key=lambda e: [e.occurred_at.isoformat(), e.event_id]
        )
        response = connectivity_pb2.ListConnectionEventsResponse(
            events=[convert.event(r) for r in records], next_page_token=token
        )
        if total is not None:
            response.total = min(total, 2**31 - 1)
        return response

    async def WatchConnectionEvents(
        self, request: connectivity_pb2.WatchConnectionEventsRequest, context: Context
    ) -> AsyncIterator[connectivity_pb2.WatchConnectionEventsResponse]:
        tenant = current_principal().tenant_id
        out: list[FieldViolation] = []
        if len(request.device_ids) > MAX_WATCH_DEVICES:
            out.append(
                FieldViolation(
                    "device_ids", f"has {len(request.device_ids)} ids; at most {MAX_WATCH_DEVICES}"
                )
            )
        else:
            for i, device_id in enumerate(request.device_ids):
                v.check_id(f"device_ids[{i}]", device_id, out)
        types = _event_types("event_types", request.event_types, out)
        if request.group_id:
            v.check_id("group_id", request.group_id, out)
        v.raise_if(out)
        resume = None
        if request.resume_cursor:
            resume = cursor.open_cursor(self._tokens, tenant, request.resume_cursor)
        narrowing = Narrowing(
            device_ids=frozenset(request.device_ids),
            event_types=frozenset(types),
            group_id=request.group_id or None,
        )
        if narrowing.group_id is not None:
            # Fail fast on an unknown group, before the stream starts.
            async with self._db.tenant(tenant, readonly=True) as con:
                await load_group(con, tenant, narrowing.group_id)
        async for message in self._hub.watch(tenant, resume, narrowing):
            yield message


def _list_key(key: list[object]) -> tuple[datetime, int]:
    try:
        at, event_id = key
        if not isinstance(at, str) or not isinstance(event_id, int):
            raise TypeError(key)
        return datetime.fromisoformat(at), event_id
    except (TypeError, ValueError) as e:
        raise InvalidArgument.single("page_token", "is malformed") from e
