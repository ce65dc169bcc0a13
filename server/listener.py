"""One LISTEN connection per process, fanning PostgreSQL notifications out to
in-process subscribers (the watch streams).

A notification is only a hint that something changed; the database stays the
source of truth. A subscriber that falls behind (its bounded queue fills) or
that may have missed notifications (the connection dropped, e.g. PostgreSQL
restarted) receives GAP instead and re-reads from its own cursor, so a slow
watcher costs bounded memory and nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any, Final

import asyncpg

from server.transient import CONNECTION_LOST, retry_forever

log = logging.getLogger(__name__)

GAP: Final = "<gap>"
"""Delivered instead of payloads when some may have been missed."""

# A LISTEN that fails for any of these means reconnecting.
_LISTEN_FAILED: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *CONNECTION_LOST)


class Subscription:
    def __init__(self, listener: Listener, channel: str, maxsize: int) -> None:
        self._listener = listener
        self.channel = channel
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize)

    def _offer(self, payload: str) -> None:
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self._signal_gap()

    def _signal_gap(self) -> None:
        # Drop the backlog: the subscriber re-reads from the database anyway.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(GAP)

    async def get(self) -> str:
        return await self._queue.get()

    def drain(self) -> list[str]:
        """Everything queued now, without waiting."""
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    def close(self) -> None:
        self._listener._unsubscribe(self)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while True:
            yield await self._queue.get()


class Listener:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._con: asyncpg.Connection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        # One connection runs one command at a time.
        self._lock = asyncio.Lock()
        self.ready = asyncio.Event()

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._supervise(), name="pg-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._con is not None and not self._con.is_closed():
            await self._con.close()

    async def subscribe(self, channel: str, *, maxsize: int = 1000) -> Subscription:
        """Receive `channel`'s payloads from now on. Returns once LISTEN is in
        effect, so a catch-up read from the database made after this call
        cannot miss a commit that lands in between."""
        sub = Subscription(self, channel, maxsize)
        new_channel = channel not in self._subscribers
        self._subscribers[channel].add(sub)
        if new_channel:
            await self._listen(channel)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.channel)
        if subs is not None:
            subs.discard(sub)

    async def _listen(self, channel: str) -> None:
        con = self._con
        if con is None or con.is_closed():
            return
        try:
            async with self._lock:
                await con.add_listener(channel, self._on_notify)
        except _LISTEN_FAILED:
            self._lost.set()

    def _on_notify(self, con: Any, pid: int, channel: str, payload: object) -> None:
        for sub in list(self._subscribers.get(channel, ())):
            sub._offer(str(payload))

    def _on_termination(self, con: Any) -> None:
        self._lost.set()

    async def _connect(self) -> None:
        con: asyncpg.Connection[Any] = await asyncpg.connect(self._dsn)
        con.add_termination_listener(self._on_termination)
        try:
            async with self._lock:
                for channel in list(self._subscribers):
                    await con.add_listener(channel, self._on_notify)
        except BaseException:
            # Retried with a new connection: this one must not linger.
            con.terminate()
            raise
        self._con = con
        self._lost.clear()
        self.ready.set()

    async def _supervise(self) -> None:
        while True:
            await self._lost.wait()
            self.ready.clear()
            log.warning("lost the LISTEN connection; reconnecting")
            # Any refusal, not only a transient one (a password being
            # rotated, a database being restored): watchers need this
            # connection back whatever kept it away.
            await retry_forever(
                self._connect, log=log, what="LISTEN reconnect", also=(asyncpg.PostgresError,)
            )
            # Notifications sent while we were away are gone: every
            # subscriber re-reads from its cursor.
            for subs in self._subscribers.values():
                for sub in subs:
                    sub._signal_gap()
