"""Watch streams: a tenant's log of events fanned out inside one server process.

The connectivity log (server/connectivity/watch.py) and membership events
(server/groups/membership_watch.py) are watched through this hub; each is a
`Source`: what to read after a position, which watchers want an event, and
the stream messages. Shape, per process and source:

    Listener (one LISTEN connection) --tenant id--> WatchHub._pump
        --wake--> _Feed (one per watched tenant: one reader for all its streams)
        --offer--> _Watcher queues (bounded) --> each stream's generator

A notification only says "tenant T committed events"; the feed then reads
them from the database after its own position (`Source.read`), once for
all of the tenant's watchers, and offers each event to the watchers that want
it, indexed by key (device id, group id) so a narrowed watcher costs
nothing for other keys' events. Positions are (transaction, event id) pairs delivered only
once final, so events committing out of id order are still delivered, in an
order no later commit can land behind.

A stream is either *live* (its feed offers it events) or *catching up* (it
reads the database itself, from its own position, in batches). It starts
catching up from its resume cursor, and goes live once it has reached the
feed's position: the check and the switch happen with no await in between,
and an offered event at or before the switch point is dropped, so nothing is
missed or repeated. A watcher whose queue fills (a slow or stuck client)
drops its queue and falls back to catching up, so it costs at most
`queue_size` queued events, never blocks the feed or the other watchers, and
its catch-up reads are limited to half the pool. A LISTEN connection that
drops (PostgreSQL restarted) turns into a GAP: every feed re-reads from its
position, so nothing committed meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from prometheus_client import Counter
from pulse.device.v1.error_reason_pb2 import ErrorReason

from server.db import Connection, Database
from server.errors import DomainError, ServerShuttingDown
from server.event_log import Position
from server.listener import GAP, Listener, Subscription
from server.observability import metrics
from server.transient import TRANSIENT

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
BATCH_SIZE = 500
# While committed events wait behind an older transaction, the feed polls,
# backing off: there is no notification for "that transaction finished".
POLL_MIN_S = 0.005
POLL_MAX_S = 1.0
RETRY_MIN_S = 0.05
RETRY_MAX_S = 2.0
# A live stream sends a bookmark this often if its position moved past what
# it last sent (other keys' events), so a narrowed watcher resumes without
# re-reading them.
BOOKMARK_IDLE_S = 15.0
_SUBSCRIPTION_SIZE = 10_000
RESPONSE_CACHE = 4096


class FeedFailed(DomainError):
    """The tenant's feed stopped on a bug; the server log has the traceback."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self) -> None:
        super().__init__(
            "internal error in the watch feed; the server log has the details",
            reason=ErrorReason.WATCH_FEED_FAILED,
        )


class Event(Protocol):
    @property
    def position(self) -> Position: ...


N = TypeVar("N")  # a stream's narrowing
E = TypeVar("E", bound=Event)
M = TypeVar("M", bound=Message)
N_contra = TypeVar("N_contra", contravariant=True)
M_co = TypeVar("M_co", bound=Message, covariant=True)
E_co = TypeVar("E_co", bound=Event, covariant=True)


class Read(Protocol[N_contra, E]):
    """One read of a tenant's log: its events and what decides who gets them."""

    @property
    def events(self) -> Sequence[E]: ...

    @property
    def limit(self) -> int: ...

    @property
    def end(self) -> Position:
        """How far the read has seen: its last event at the limit, else its horizon."""

    @property
    def pending(self) -> bool:
        """Committed events wait behind an older writer still running: read again soon."""

    def accepts(self, narrowing: N_contra, event: E) -> bool:
        """Whether a stream narrowed by `narrowing` gets `event`."""

    def failure(self, narrowing: N_contra) -> DomainError | None:
        """Why a stream so narrowed must end (its group was deleted), if it must."""


class _StoreBatch(Protocol[E_co]):
    """What the stores' reads return: events after a position, as far as final."""

    @property
    def events(self) -> Sequence[E_co]: ...

    @property
    def limit(self) -> int: ...

    @property
    def end(self) -> Position: ...

    @property
    def pending(self) -> bool: ...


class BatchRead(Generic[E]):
    """A Read over a store's batch; sources add `accepts` and `failure`."""

    __slots__ = ("batch",)

    def __init__(self, batch: _StoreBatch[E]) -> None:
        self.batch = batch

    @property
    def events(self) -> Sequence[E]:
        return self.batch.events

    @property
    def limit(self) -> int:
        return self.batch.limit

    @property
    def end(self) -> Position:
        return self.batch.end

    @property
    def pending(self) -> bool:
        return self.batch.pending


class Source(Protocol[N_contra, E, M_co]):
    """A log that the hub serves."""

    #: NOTIFY channel; the payload is the tenant id of committed events.
    channel: str

    def keys(self, narrowing: N_contra) -> frozenset[str]:
        """The keys a stream wants events of; empty: every event."""

    def key(self, event: E) -> str: ...

    async def horizon(self, con: Connection, tenant_id: uuid.UUID) -> int: ...

    async def read(
        self,
        con: Connection,
        tenant_id: uuid.UUID,
        after: Position,
        narrowings: Sequence[N_contra],
        *,
        limit: int,
        single: bool,
    ) -> Read[N_contra, E]:
        """Events after `after` for any of `narrowings`; `single`: a stream
        catching up on its own, whose narrowing the read may apply itself."""

    def response(self, tenant_id: uuid.UUID, event: E) -> M_co: ...

    def bookmark(self, tenant_id: uuid.UUID, narrowing: N_contra, position: Position) -> M_co: ...

    def shutting_down(
        self, tenant_id: uuid.UUID, narrowing: N_contra, position: Position
    ) -> ServerShuttingDown:
        """The error that ends a stream at shutdown, naming where to resume."""


class WatcherState(NamedTuple):
    live: bool
    queued: int
    #: How often the stream fell behind and went back to the database.
    lags: int


class _Watcher(Generic[N, M]):
    __slots__ = (
        "error",
        "floor",
        "gaps",
        "lags",
        "live",
        "narrowing",
        "queue",
        "queue_size",
        "tick",
        "wake",
    )

    def __init__(self, narrowing: N, queue_size: int, gaps: Counter) -> None:
        self.narrowing = narrowing
        self.gaps = gaps
        self.queue: deque[tuple[Position, M]] = deque()
        self.queue_size = queue_size
        self.live = False
        # Offers at or before this position were already delivered by the
        # catch-up that preceded going live.
        self.floor = Position(0, 0)
        self.wake = asyncio.Event()
        self.error: DomainError | None = None
        self.lags = 0
        # Set by the hub's bookmark ticker: send a bookmark if the position moved.
        self.tick = False

    def go_live(self, position: Position) -> None:
        self.floor = position
        self.live = True

    def offer(self, position: Position, response: M) -> None:
        if position <= self.floor:
            return
        if len(self.queue) >= self.queue_size:
            # Too slow: what is queued is in the database too; drop it and
            # let the stream re-read from its own position.
            self.live = False
            self.queue.clear()
            self.lags += 1
            self.gaps.inc()
        else:
            self.queue.append((position, response))
        self.wake.set()

    def fail(self, error: DomainError) -> None:
        self.error = error
        self.live = False
        self.queue.clear()
        self.wake.set()


class _Feed(Generic[N, E, M]):
    """The reader of one tenant's events for every stream of it in this process."""

    def __init__(self, hub: WatchHub[N, E, M], tenant_id: uuid.UUID) -> None:
        self.hub = hub
        self.source = hub.source
        self.tenant_id = tenant_id
        self.head: Position | None = None
        self.ready = asyncio.Event()
        self.wake = asyncio.Event()
        self.watchers: set[_Watcher[N, M]] = set()
        self.by_key: dict[str, set[_Watcher[N, M]]] = {}
        self.broad: set[_Watcher[N, M]] = set()
        # The last responses built, by position: a stream catching up mostly
        # re-reads recent events, and reuses their protos and cursors.
        self.responses: OrderedDict[Position, M] = OrderedDict()
        self.task: asyncio.Task[None] | None = None

    def response(self, event: E) -> M:
        """The stream message of `event`, built once and shared."""
        response = self.responses.get(event.position)
        if response is None:
            response = self.source.response(self.tenant_id, event)
            self.responses[event.position] = response
            if len(self.responses) > RESPONSE_CACHE:
                self.responses.popitem(last=False)
        return response

    def add(self, watcher: _Watcher[N, M]) -> None:
        self.watchers.add(watcher)
        keys = self.source.keys(watcher.narrowing)
        for key in keys:
            self.by_key.setdefault(key, set()).add(watcher)
        if not keys:
            self.broad.add(watcher)

    def remove(self, watcher: _Watcher[N, M]) -> None:
        if watcher not in self.watchers:
            return
        self.watchers.discard(watcher)
        self.broad.discard(watcher)
        for key in self.source.keys(watcher.narrowing):
            subs = self.by_key.get(key)
            if subs is not None:
                subs.discard(watcher)
                if not subs:
                    del self.by_key[key]

    async def run(self) -> None:
        await self._start()
        poll: float | None = None
        while True:
            if poll is None:
                await self.wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(poll):
                        await self.wake.wait()
            self.wake.clear()
            try:
                batch = await self._read()
            except TRANSIENT as error:
                log.warning("watch feed of %s: read failed (%s); retrying", self.tenant_id, error)
                await self.hub.backoff(self)
                self.wake.set()
                continue
            self.hub.recovered(self)
            self._publish(batch)
            if len(batch.events) >= batch.limit:
                self.wake.set()
                poll = None
            elif batch.pending:
                # Progress resets the backoff; waiting on a long transaction grows it.
                poll = POLL_MIN_S if batch.events or poll is None else min(poll * 2, POLL_MAX_S)
            else:
                poll = None

    async def _start(self) -> None:
        """Start at the current horizon: streams replay anything older themselves."""
        while True:
            try:
                async with self.hub.db.tenant(self.tenant_id, readonly=True) as con:
                    self.head = Position(await self.source.horizon(con, self.tenant_id), 0)
                break
            except TRANSIENT as error:
                log.warning("watch feed of %s: start failed (%s); retrying", self.tenant_id, error)
                await self.hub.backoff(self)
        self.hub.recovered(self)
        self.ready.set()
        # Events committed after the horizon but before this feed existed get
        # no notification it could see: read once now.
        self.wake.set()

    async def _read(self) -> Read[N, E]:
        assert self.head is not None
        narrowings = [w.narrowing for w in self.watchers]
        async with self.hub.db.tenant(self.tenant_id, readonly=True) as con:
            return await self.source.read(
                con, self.tenant_id, self.head, narrowings, limit=self.hub.batch_size, single=False
            )

    def _publish(self, batch: Read[N, E]) -> None:
        # Synchronous from here to the head update: a stream switching to live
        # sees either none or all of this batch offered to it.
        assert self.head is not None
        for watcher in list(self.watchers):
            error = batch.failure(watcher.narrowing)
            if error is not None:
                watcher.fail(error)
        for event in batch.events:
            response: M | None = None
            targets = itertools.chain(self.by_key.get(self.source.key(event), ()), self.broad)
            for watcher in targets:
                if not watcher.live or not batch.accepts(watcher.narrowing, event):
                    continue
                if response is None:
                    response = self.response(event)
                watcher.offer(event.position, response)
        self.head = max(self.head, batch.end)


class WatchHub(Generic[N, E, M]):
    """Every watch stream of one source in this server process."""

    def __init__(
        self,
        db: Database,
        listener: Listener,
        source: Source[N, E, M],
        *,
        feed: str,
        queue_size: int = QUEUE_SIZE,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        """`feed` names the source in metrics."""
        self.db = db
        self._gaps = metrics.WATCH_GAPS.labels(feed)
        self.source = source
        self.batch_size = batch_size
        self._listener = listener
        self._queue_size = queue_size
        self._feeds: dict[str, _Feed[N, E, M]] = {}
        self._watchers: set[_Watcher[N, M]] = set()
        self._subscription: Subscription | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._ticker_task: asyncio.Task[None] | None = None
        self._subscribing = asyncio.Lock()
        self._closing = False
        self._delays: dict[int, float] = {}
        # Catch-up reads may take half the pool; feeds always find a connection.
        self._catch_up = asyncio.Semaphore(max(1, db.pool.get_max_size() // 2))

    # -- plumbing shared with feeds

    async def backoff(self, owner: object) -> None:
        """Sleep before retrying a failed read, doubling per consecutive failure."""
        delay = self._delays.get(id(owner), RETRY_MIN_S)
        self._delays[id(owner)] = min(delay * 2, RETRY_MAX_S)
        await asyncio.sleep(delay)

    def recovered(self, owner: object) -> None:
        self._delays.pop(id(owner), None)

    # -- lifecycle

    def watcher_states(self) -> list[WatcherState]:
        """Every stream's state, for metrics and tests."""
        return [WatcherState(w.live, len(w.queue), w.lags) for w in self._watchers]

    async def close(self) -> None:
        """End every stream with UNAVAILABLE (SERVER_SHUTTING_DOWN) and stop reading."""
        self._closing = True
        for watcher in list(self._watchers):
            watcher.fail(ServerShuttingDown())
        tasks = [f.task for f in self._feeds.values() if f.task is not None]
        for task in (self._pump_task, self._ticker_task):
            if task is not None:
                tasks.append(task)
        for feed in self._feeds.values():
            feed.ready.set()  # release streams still waiting for a feed to start
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._subscription is not None:
            self._subscription.close()

    async def _ensure_listening(self) -> None:
        async with self._subscribing:
            if self._subscription is None:
                self._subscription = await self._listener.subscribe(
                    self.source.channel, maxsize=_SUBSCRIPTION_SIZE
                )
                self._pump_task = asyncio.create_task(
                    self._pump(self._subscription), name=f"watch-pump-{self.source.channel}"
                )
                self._ticker_task = asyncio.create_task(self._tick(), name="watch-bookmarks")

    async def _tick(self) -> None:
        """Every BOOKMARK_IDLE_S, let each stream send a bookmark if its
        position moved: one timer for all streams instead of one per wait."""
        while True:
            await asyncio.sleep(BOOKMARK_IDLE_S)
            for watcher in self._watchers:
                watcher.tick = True
                watcher.wake.set()

    async def _pump(self, subscription: Subscription) -> None:
        async for payload in subscription:
            if payload == GAP:
                # Some notifications may be lost: every feed re-reads.
                for each in self._feeds.values():
                    each.wake.set()
                continue
            feed = self._feeds.get(payload)
            if feed is not None:
                feed.wake.set()

    def _join(self, tenant_id: uuid.UUID, watcher: _Watcher[N, M]) -> _Feed[N, E, M]:
        key = str(tenant_id)
        feed = self._feeds.get(key)
        if feed is None:
            feed = _Feed(self, tenant_id)
            self._feeds[key] = feed
            feed.task = asyncio.create_task(feed.run(), name=f"watch-feed-{key}")
            feed.task.add_done_callback(self._feed_done)
        feed.add(watcher)
        self._watchers.add(watcher)
        return feed

    def _feed_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug, not an outage (those are retried): end the tenant's streams
        # rather than leave them waiting on a reader that is gone.
        log.error("watch feed failed", exc_info=task.exception())
        for feed in list(self._feeds.values()):
            if feed.task is task:
                del self._feeds[str(feed.tenant_id)]
                feed.ready.set()
                for watcher in list(feed.watchers):
                    watcher.fail(FeedFailed())

    def _leave(self, feed: _Feed[N, E, M], watcher: _Watcher[N, M]) -> None:
        feed.remove(watcher)
        self._watchers.discard(watcher)
        self.recovered(watcher)
        if not feed.watchers and self._feeds.get(str(feed.tenant_id)) is feed:
            del self._feeds[str(feed.tenant_id)]
            if feed.task is not None:
                feed.task.cancel()
            self.recovered(feed)

    # -- streams

    async def watch(
        self, tenant_id: uuid.UUID, resume: Position | None, narrowing: N
    ) -> AsyncIterator[M]:
        """The stream's messages: replay after `resume` (None: from now), then live.

        One generator for the whole stream: every layer of generators costs
        each message a resumption.
        """
        if self._closing:
            raise ServerShuttingDown()
        await self._ensure_listening()
        watcher: _Watcher[N, M] = _Watcher(narrowing, self._queue_size, self._gaps)
        feed = self._join(tenant_id, watcher)
        try:
            await feed.ready.wait()
            self._raise_if_failed(watcher, tenant_id, resume)
            assert feed.head is not None
            position = feed.head if resume is None else resume
            if resume is None:
                watcher.go_live(position)
            sent: Position | None = None  # the position of the last cursor sent
            replayed = False
            while True:
                self._raise_if_failed(watcher, tenant_id, position)
                if not watcher.live:
                    batch = await self._catch_up_read(feed, watcher, position)
                    for event in batch.events:
                        position = event.position
                        if batch.accepts(narrowing, event):
                            sent = position
                            yield feed.response(event)
                    position = max(position, batch.end)
                    if position >= feed.head:  # no await between this check and the switch
                        watcher.go_live(position)
                    continue
                if watcher.queue:
                    position, message = watcher.queue.popleft()
                    sent = position
                    yield message
                    continue
                # Live with an empty queue: every wanted event up to the
                # feed's head has been sent, so the stream's position is the head.
                position = max(position, feed.head)
                if not replayed or (watcher.tick and sent != position):
                    replayed = True
                    sent = position
                    yield self.source.bookmark(tenant_id, narrowing, position)
                watcher.tick = False
                watcher.wake.clear()
                await watcher.wake.wait()
        finally:
            self._leave(feed, watcher)

    def _raise_if_failed(
        self, watcher: _Watcher[N, M], tenant_id: uuid.UUID, position: Position | None
    ) -> None:
        """End the stream with the watcher's error; a shutdown names where to resume."""
        if watcher.error is None:
            return
        if isinstance(watcher.error, ServerShuttingDown) and position is not None:
            raise self.source.shutting_down(tenant_id, watcher.narrowing, position)
        raise watcher.error

    async def _catch_up_read(
        self, feed: _Feed[N, E, M], watcher: _Watcher[N, M], position: Position
    ) -> Read[N, E]:
        while True:
            self._raise_if_failed(watcher, feed.tenant_id, position)
            try:
                async with (
                    self._catch_up,
                    self.db.tenant(feed.tenant_id, readonly=True) as con,
                ):
                    batch = await self.source.read(
                        con,
                        feed.tenant_id,
                        position,
                        [watcher.narrowing],
                        limit=self.batch_size,
                        single=True,
                    )
                self.recovered(watcher)
                error = batch.failure(watcher.narrowing)
                if error is not None:
                    raise error
                return batch
            except TRANSIENT as error:
                log.warning("watch catch-up read failed (%s); retrying", error)
                await self.backoff(watcher)
