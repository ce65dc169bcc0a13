"""The connectivity log (``pulse.device.v1.ConnectivityService``).

``list`` pages through past events, newest first; ``watch`` streams them as
they are committed. Every watch message carries a ``cursor``: keep the last
one and pass it as ``resume_cursor`` to a new watch to continue exactly where
the old stream stopped (nothing missed, nothing repeated)::

    cursor = ""
    while True:
        try:
            async with client.connectivity.watch(resume_cursor=cursor) as stream:
                async for message in stream:
                    cursor = message.cursor
                    if message.HasField("event"):
                        handle(message.event)
        except Unavailable:
            await asyncio.sleep(1)  # the server restarted; resume from cursor
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TypeAlias

from google.protobuf import timestamp_pb2
from pulse.device.v1 import connectivity_pb2, connectivity_pb2_grpc

from ._pages import AsyncPager, Pager
from ._rpc import AsyncRpc, AsyncStream, Rpc, Stream

__all__ = ["AsyncConnectivity", "Connectivity"]

EventType: TypeAlias = connectivity_pb2.ConnectionEventType.ValueType
"""A ConnectionEventType value, such as ``connectivity_pb2.CONNECTED``."""


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        # A naive time would silently be read as UTC; make the caller say so.
        raise ValueError("start_time and end_time must be timezone-aware datetimes")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def list_request(
    device_id: str,
    *,
    start_time: datetime | None,
    end_time: datetime | None,
    event_types: Iterable[EventType],
    page_size: int,
    page_token: str,
) -> connectivity_pb2.ListConnectionEventsRequest:
    return connectivity_pb2.ListConnectionEventsRequest(
        device_id=device_id,
        start_time=_timestamp(start_time),
        end_time=_timestamp(end_time),
        event_types=list(event_types),
        page_size=page_size,
        page_token=page_token,
    )


def watch_request(
    *,
    resume_cursor: str,
    device_ids: Iterable[str],
    event_types: Iterable[EventType],
    group_id: str,
) -> connectivity_pb2.WatchConnectionEventsRequest:
    return connectivity_pb2.WatchConnectionEventsRequest(
        resume_cursor=resume_cursor,
        device_ids=list(device_ids),
        event_types=list(event_types),
        group_id=group_id,
    )


def _events_of(
    response: connectivity_pb2.ListConnectionEventsResponse,
) -> Sequence[connectivity_pb2.ConnectionEvent]:
    return response.events


class AsyncConnectivity:
    """Connection events of the caller's tenant (``client.connectivity``)."""

    def __init__(self, rpc: AsyncRpc) -> None:
        self._rpc = rpc
        self._stub = connectivity_pb2_grpc.ConnectivityServiceStub(rpc.channel)

    def list(
        self,
        device_id: str = "",
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        event_types: Iterable[EventType] = (),
        page_size: int = 0,
    ) -> AsyncPager[connectivity_pb2.ConnectionEvent]:
        """Events newest first, fetched lazily page by page.

        Args:
            device_id: Only this device's events (NotFound if there is no such
                device); empty for the whole tenant.
            start_time: Only events at or after this (timezone-aware) time.
            end_time: Only events before this (timezone-aware) time.
            event_types: Only these types (``connectivity_pb2.CONNECTED``, ...).
            page_size: Events per page; 0 lets the server choose.
        """
        types = list(event_types)

        async def fetch(token: str) -> connectivity_pb2.ListConnectionEventsResponse:
            request = list_request(
                device_id,
                start_time=start_time,
                end_time=end_time,
                event_types=types,
                page_size=page_size,
                page_token=token,
            )
            return await self.list_page(request)

        return AsyncPager(fetch, _events_of)

    async def list_page(
        self, request: connectivity_pb2.ListConnectionEventsRequest
    ) -> connectivity_pb2.ListConnectionEventsResponse:
        """One raw ListConnectionEvents call, for callers that handle page tokens."""
        return await self._rpc.unary(self._stub.ListConnectionEvents, request)

    def watch(
        self,
        *,
        resume_cursor: str = "",
        device_ids: Iterable[str] = (),
        event_types: Iterable[EventType] = (),
        group_id: str = "",
    ) -> AsyncStream[connectivity_pb2.WatchConnectionEventsResponse]:
        """Events as they are committed, after a replay of those after ``resume_cursor``.

        A message without an event is a bookmark: it only moves the cursor.
        The first bookmark marks the end of the replay.

        Args:
            resume_cursor: The last cursor of an earlier stream; empty to start now.
            device_ids: Only these devices (at most 1000); empty for all.
            event_types: Only these types; empty for all.
            group_id: Only devices of this group, evaluated as events arrive.
        """
        request = watch_request(
            resume_cursor=resume_cursor,
            device_ids=device_ids,
            event_types=event_types,
            group_id=group_id,
        )
        return self._rpc.stream(self._stub.WatchConnectionEvents, request)


class Connectivity:
    """Blocking twin of :class:`AsyncConnectivity` (``client.connectivity``)."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._stub = connectivity_pb2_grpc.ConnectivityServiceStub(rpc.channel)

    def list(
        self,
        device_id: str = "",
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        event_types: Iterable[EventType] = (),
        page_size: int = 0,
    ) -> Pager[connectivity_pb2.ConnectionEvent]:
        """Events newest first; see :meth:`AsyncConnectivity.list`."""
        types = list(event_types)

        def fetch(token: str) -> connectivity_pb2.ListConnectionEventsResponse:
            request = list_request(
                device_id,
                start_time=start_time,
                end_time=end_time,
                event_types=types,
                page_size=page_size,
                page_token=token,
            )
            return self.list_page(request)

        return Pager(fetch, _events_of)

    def list_page(
        self, request: connectivity_pb2.ListConnectionEventsRequest
    ) -> connectivity_pb2.ListConnectionEventsResponse:
        """One raw ListConnectionEvents call, for callers that handle page tokens."""
        return self._rpc.unary(self._stub.ListConnectionEvents, request)

    def watch(
        self,
        *,
        resume_cursor: str = "",
        device_ids: Iterable[str] = (),
        event_types: Iterable[EventType] = (),
        group_id: str = "",
    ) -> Stream[connectivity_pb2.WatchConnectionEventsResponse]:
        """A blocking watch stream; see :meth:`AsyncConnectivity.watch`."""
        request = watch_request(
            resume_cursor=resume_cursor,
            device_ids=device_ids,
            event_types=event_types,
            group_id=group_id,
        )
        return self._rpc.stream(self._stub.WatchConnectionEvents, request)
