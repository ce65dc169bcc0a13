"""Membership watches that resume by themselves (``client.groups.watch_membership``).

A stream that ends with UNAVAILABLE (the server restarting, a network
break) is opened again from the last cursor received, after a growing
pause, so the caller sees one unbroken sequence of ENTERED / LEFT events
with nothing missed or repeated. Before the first cursor (while the current
members are still being sent) there is nothing to resume from: the error is
raised, and the caller starts over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from pulse.device.v1 import groups_pb2

from ._errors import Unavailable
from ._rpc import AsyncStream, Stream

__all__ = ["AsyncMembershipWatch", "MembershipWatch"]

Event = groups_pb2.WatchGroupMembershipResponse

_FIRST_PAUSE_S = 0.1
_LONGEST_PAUSE_S = 5.0


def request(group_id: str, cursor: str) -> groups_pb2.WatchGroupMembershipRequest:
    return groups_pb2.WatchGroupMembershipRequest(group_id=group_id, resume_cursor=cursor)


class _Resumption:
    """The cursor and reconnection state both watches share."""

    def __init__(self, resume_cursor: str) -> None:
        #: The last cursor received: where this watch would resume.
        self.cursor = resume_cursor
        #: How many times the stream was opened again after UNAVAILABLE.
        self.reconnects = 0
        self._pause = _FIRST_PAUSE_S
        self._closed = False

    def _took(self, message: Event) -> bool:
        """Note a message; whether it is an event to hand out (not a bookmark)."""
        self._pause = _FIRST_PAUSE_S
        if message.cursor:
            self.cursor = message.cursor
        return message.event_type != Event.EVENT_TYPE_UNSPECIFIED

    def _lost(self, error: Unavailable) -> float:
        """The pause before opening the stream again; raises `error` when
        there is no cursor to resume from."""
        if not self.cursor:
            raise error
        pause = self._pause
        self._pause = min(pause * 2, _LONGEST_PAUSE_S)
        self.reconnects += 1
        return pause


class AsyncMembershipWatch(_Resumption):
    """ENTERED / LEFT events of one group, across reconnections.

    Bookmarks are not yielded; :attr:`cursor` follows every message, so a
    caller can store it and resume in another process
    (``watch_membership(group_id, resume_cursor=...)``).
    """

    def __init__(
        self, open_stream: Callable[[str], AsyncStream[Event]], resume_cursor: str = ""
    ) -> None:
        super().__init__(resume_cursor)
        self._open = open_stream
        self._stream: AsyncStream[Event] | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        while not self._closed:
            if self._stream is None:
                self._stream = self._open(self.cursor)
            try:
                message = await self._stream.__anext__()
            except Unavailable as error:
                self._stream = None
                await asyncio.sleep(self._lost(error))
                continue
            if self._took(message):
                return message
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Stops the watch; iteration then ends without an error."""
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()


class MembershipWatch(_Resumption):
    """Blocking twin of :class:`AsyncMembershipWatch`."""

    def __init__(
        self, open_stream: Callable[[str], Stream[Event]], resume_cursor: str = ""
    ) -> None:
        super().__init__(resume_cursor)
        self._open = open_stream
        self._stream: Stream[Event] | None = None

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Event:
        while not self._closed:
            if self._stream is None:
                self._stream = self._open(self.cursor)
            try:
                message = next(self._stream)
            except Unavailable as error:
                self._stream = None
                time.sleep(self._lost(error))
                continue
            if self._took(message):
                return message
        raise StopIteration

    def cancel(self) -> None:
        """Stops the watch; iteration then ends without an error."""
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()
