"""Liveness: device messages and silence become status changes and connection events.

Every device message is a signal (`read`): a status message says `online`,
`offline` or, for anything else, that the broker published the device's
last-will; any other message is activity. A message may carry the device's
sequence number, which orders its signal against the device's others
(docs/device-ordering.md). Signals are gathered for `flush_s`; each device's
are then reduced to their net effect, at most two signals (`net_signals`),
and written in at most two statements, one transaction (`plan_rounds`),
which move last_seen_at and, where the status changes, insert the event in
the same statement (server/connectivity/transitions.py). A sweep every
`sweep_interval_s` turns ONLINE devices silent for longer than
`stale_after_s` STALE, one statement for the whole fleet.

Flapping is damped by a hold-down: a device that got a connection event less
than `flap_hold_s` ago, and whose signals would change its status again,
keeps them pending (reduced, with their messages unsettled) until the
hold-down is over. A device flapping a hundred times a second thus writes
about one event per hold-down, and its stored status is never behind its
last signal by more than the hold-down and a flush.

A message is settled (`DeviceMessage.settle`) once the transaction that
applied its signal, or the signal it was folded into, has committed; on a
database error the signals go back to the queue with their settle hooks.

Retained messages are skipped (and settled at once): the broker re-sends
them on every (re)subscription, so they repeat what this evaluator already
processed live (its persistent session queues what it missed while away),
and a retained `online` from a device that has since gone silent is not a
sign of life.

The sweep waits until the evaluator has been connected to the broker for the
whole threshold: silence it did not hear because it was disconnected is its
own outage, not the devices'.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from evaluator.runtime import Publisher
from server import transient, wire
from server.connectivity.model import Signal
from server.connectivity.transitions import (
    Applied,
    DeviceSignal,
    Transition,
    apply,
    fleet,
    sweep,
)
from server.db import Database
from server.observability import metrics

log = logging.getLogger("pulse.evaluator.liveness")

Key = tuple[uuid.UUID, str]

_STATUS_SIGNALS = {wire.ONLINE: Signal.ONLINE, wire.OFFLINE: Signal.OFFLINE}


def read(message: wire.DeviceMessage) -> tuple[Signal, int | None]:
    """The signal of a message and its seq, if it carries one."""
    if message.dialect is wire.Dialect.UPSTREAM:
        # Upstream's reports have no seq, and the twin ingest reads none in
        # them: activity in arrival order, as a report without seq is.
        return Signal.ACTIVITY, None
    if message.kind != "status":
        return Signal.ACTIVITY, wire.activity_seq(message.payload)
    status, seq = wire.parse_status(message.payload)
    return _STATUS_SIGNALS.get(status, Signal.WILL), seq


class Net(NamedTuple):
    """One device's signals reduced to their net effect."""

    #: At most two, to be applied in this order.
    signals: list[DeviceSignal]
    #: Status signals with a seq that one received before them already beats.
    out_of_order: int
    #: Status changes among the signals that the net effect skips.
    folded: int


def _rank(signal: DeviceSignal) -> tuple[int, int]:
    # A will carries the seq of its session's online and comes after it.
    assert signal.seq is not None
    return signal.seq, int(signal.signal is Signal.WILL)


def _implied(signal: DeviceSignal) -> str | None:
    """The status a signal sets when it decides, None if it never does by itself."""
    if signal.signal is Signal.ACTIVITY:
        return "ONLINE" if signal.seq is None else None
    return "ONLINE" if signal.signal is Signal.ONLINE else "OFFLINE"


def _changes(signals: Sequence[DeviceSignal]) -> int:
    count, last = 0, None
    for signal in signals:
        status = _implied(signal)
        if status is None:
            continue
        if last is not None and status != last:
            count += 1
        last = status
    return count


def net_signals(signals: Sequence[DeviceSignal]) -> Net:
    """One device's signals, in arrival order, reduced to at most two that
    leave its status, order and last_seen_at as applying every one of them
    in turn would (the model is tests/unit/test_liveness_plan.py):

    - without seq: the last status signal, then the last activity after it
      if that ends OFFLINE (after `online` it only moves last_seen_at);
    - with seq: the newest status signal (by seq; a will after the online of
      its session), then the newest activity if newer still: should the
      status signal lose to the stored order, that one may revive UNKNOWN or
      STALE;
    - both: the last signal without seq, which always decides, and the
      newest status signal with one, which decides if it wins, in the order
      they arrived in.

    The newest receipt time of the others rides on the last one (`seen`).
    """
    # Indexes of the last signal without seq, of the last status signal
    # without seq and of the newest status signal with seq; the newest
    # activity with seq itself.
    free: int | None = None
    free_status: int | None = None
    best: int | None = None
    activity: DeviceSignal | None = None
    seen: datetime | None = None
    top: int | None = None  # newest seq of a status signal so far
    top_online: int | None = None
    effective: list[DeviceSignal] = []
    out_of_order = 0
    for i, signal in enumerate(signals):
        if signal.signal is not Signal.WILL and (seen is None or signal.at > seen):
            seen = signal.at
        if signal.seen is not None and (seen is None or signal.seen > seen):
            seen = signal.seen
        seq = signal.seq
        if seq is None:
            free = i
            if signal.signal is not Signal.ACTIVITY:
                free_status = i
        elif signal.signal is Signal.ACTIVITY:
            if activity is None or seq > (activity.seq or 0):
                activity = signal
            continue
        else:
            # Refused whatever is stored: an earlier signal of this batch
            # that is newer either applies first or is itself refused.
            if signal.signal is Signal.WILL:
                lost = top_online is not None and seq < top_online
            else:
                lost = top is not None and seq <= top
            if lost:
                out_of_order += 1
                continue
            top = seq if top is None else max(top, seq)
            if signal.signal is Signal.ONLINE:
                top_online = seq if top_online is None else max(top_online, seq)
            if best is None or _rank(signal) > _rank(signals[best]):
                best = i
        effective.append(signal)

    net: list[DeviceSignal] = []
    if best is None:
        if free_status is not None:
            net.append(signals[free_status])
        if free is not None and free != free_status:
            # An activity without seq after the last status signal.
            if free_status is None or signals[free_status].signal is not Signal.ONLINE:
                net.append(signals[free])
        elif free_status is None and activity is not None:
            net.append(activity)
    elif free is None:
        net.append(signals[best])
        if activity is not None and (activity.seq or 0) > (signals[best].seq or 0):
            net.append(activity)
    else:
        net += [signals[min(free, best)], signals[max(free, best)]]

    if net:
        last = net[-1]
        carried = (
            seen if seen is not None and (last.signal is Signal.WILL or seen > last.at) else None
        )
        net = [_with_seen(s, None) for s in net[:-1]] + [_with_seen(last, carried)]
    return Net(net, out_of_order, max(0, _changes(effective) - _changes(net)))


def _with_seen(signal: DeviceSignal, seen: datetime | None) -> DeviceSignal:
    return signal if signal.seen == seen else dataclasses.replace(signal, seen=seen)


def _rounds(nets: Sequence[Sequence[DeviceSignal]]) -> list[list[DeviceSignal]]:
    """Statements holding at most one signal per device: round k has each
    device's k-th."""
    rounds: list[list[DeviceSignal]] = []
    for signals in nets:
        for k, signal in enumerate(signals):
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(signal)
    return rounds


def plan_rounds(signals: Sequence[DeviceSignal]) -> list[list[DeviceSignal]]:
    """Each device's net effect (`net_signals`), split into at most two
    statements, each holding at most one signal per device."""
    by_device: dict[Key, list[DeviceSignal]] = {}
    for signal in signals:
        by_device.setdefault((signal.tenant_id, signal.device_id), []).append(signal)
    return _rounds([net_signals(queue).signals for queue in by_device.values()])


def changes_status(status: str, signals: Sequence[DeviceSignal]) -> bool:
    """Whether applying the signals could change a device whose status is
    `status` (as far as this process knows): seq checks are taken to pass,
    since only the database can judge them."""
    for signal in signals:
        if signal.signal is Signal.ACTIVITY and signal.seq is not None:
            if status in ("UNKNOWN", "STALE"):
                return True
            continue
        if _implied(signal) != status:
            return True
    return False


class _Pending:
    """One device's signals waiting to be written, and the settle hooks of
    their messages, in arrival order."""

    __slots__ = ("settles", "signals")

    def __init__(self) -> None:
        self.signals: list[DeviceSignal] = []
        self.settles: list[Callable[[], None]] = []


class Liveness:
    """The evaluator's liveness handler: batched signals and the stale sweep."""

    kinds = frozenset({"*"})

    def __init__(
        self,
        db: Database,
        *,
        stale_after_s: float = 30.0,
        sweep_interval_s: float = 1.0,
        flush_s: float = 0.1,
        flap_hold_s: float = 1.0,
    ) -> None:
        """Args:
        db: The evaluator's pool (statements run as pulse_evaluator).
        stale_after_s: An ONLINE device silent this long becomes STALE.
        sweep_interval_s: How often the sweep runs.
        flush_s: How long signals gather before they are written.
        flap_hold_s: A device's hold-down after a connection event; 0: none.
            At most a quarter of stale_after_s: a held device's last_seen_at
            lags by up to the hold-down, and the sweep must not take that for
            silence.
        """
        self._db = db
        self.stale_after_s = stale_after_s
        self._sweep_interval_s = sweep_interval_s
        self._flush_s = flush_s
        self.flap_hold_s = max(0.0, min(flap_hold_s, stale_after_s / 4))
        self._pending: dict[Key, _Pending] = {}
        # Devices given an event by this process within the hold-down: when
        # (monotonic) and the status it set, oldest first, so expired ones
        # are dropped from the front and the map holds only the last
        # hold-down's worth of events.
        self._recent: dict[Key, tuple[float, str]] = {}
        # When the earliest held device may be written (monotonic).
        self._release_at: float | None = None
        self._wake = asyncio.Event()
        # Flushes and sweeps of one process take turns: they would otherwise
        # only deadlock each other on shared rows and retry.
        self._writing = asyncio.Lock()
        self.transitions = 0
        self.sweeps = 0
        #: Status changes folded away rather than written as events.
        self.coalesced = 0
        #: Signals with a seq that lost to a newer one (no event, no change).
        self.out_of_order = 0

    async def handle(self, message: wire.DeviceMessage) -> None:
        if message.retain:
            message.settle()
            return
        signal, seq = read(message)
        key = (message.tenant_id, message.device_id)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
        pending.signals.append(
            DeviceSignal(message.tenant_id, message.device_id, signal, message.received_at, seq)
        )
        pending.settles.append(message.settle)
        self._wake.set()

    async def run(self, publisher: Publisher) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._flush_forever())
            tasks.create_task(self._sweep_forever(publisher))

    async def flush(self) -> list[Transition]:
        """Write the pending signals now, but those of devices in their
        hold-down; return the events inserted.

        On a database error the signals go back to the queue, ahead of any
        that arrived meanwhile, unsettled, and the error is raised.
        """
        async with self._writing:
            return await self._flush_locked()

    async def _flush_locked(self) -> list[Transition]:
        now = time.monotonic()
        self._forget(now)
        batch, self._pending = self._pending, {}
        ready: list[_Pending] = []
        held: dict[Key, _Pending] = {}
        for key, pending in batch.items():
            net = net_signals(pending.signals)
            pending.signals = net.signals
            self.out_of_order += net.out_of_order
            self.coalesced += net.folded
            if self._holds(key, pending.signals, now):
                held[key] = pending
            else:
                ready.append(pending)
        try:
            applied = await self._write(_rounds([p.signals for p in ready]))
        except BaseException:
            self._requeue(batch)
            raise
        self._requeue(held)
        done = [t for result in applied for t in result.transitions]
        for transition in done:
            metrics.LIVENESS_TRANSITIONS.labels(transition.status).inc()
        self.out_of_order += sum(result.out_of_order for result in applied)
        self.transitions += len(done)
        self._remember(done)
        for pending in ready:
            for settle in pending.settles:
                settle()
        self._release_at = min(
            (self._recent[key][0] + self.flap_hold_s for key in held), default=None
        )
        return done

    async def _write(self, rounds: list[list[DeviceSignal]]) -> list[Applied]:
        if not rounds:
            return []
        # One transaction: a device's two signals commit together, so its
        # messages are settled after one commit. The second statement only
        # locks rows the first one holds already.
        start = time.perf_counter()
        async with fleet(self._db) as con:
            applied = [await apply(con, round_) for round_ in rounds]
        metrics.INGEST_COMMIT_SECONDS.labels("liveness").observe(time.perf_counter() - start)
        metrics.INGEST_BATCH_SIZE.labels("liveness").observe(sum(len(r) for r in rounds))
        return applied

    def _holds(self, key: Key, signals: Sequence[DeviceSignal], now: float) -> bool:
        recent = self._recent.get(key)
        return (
            recent is not None
            and now - recent[0] < self.flap_hold_s
            and changes_status(recent[1], signals)
        )

    def _remember(self, done: Sequence[Transition]) -> None:
        at = time.monotonic()
        for transition in done:
            key = (transition.tenant_id, transition.device_id)
            # Re-inserted at the end, so the map stays in time order.
            self._recent.pop(key, None)
            self._recent[key] = (at, transition.status)

    def _forget(self, now: float) -> None:
        expired = []
        for key, (at, _) in self._recent.items():
            if now - at < self.flap_hold_s:
                break
            expired.append(key)
        for key in expired:
            del self._recent[key]

    def _requeue(self, entries: dict[Key, _Pending]) -> None:
        for key, pending in entries.items():
            newer = self._pending.get(key)
            if newer is not None:
                pending.signals += newer.signals
                pending.settles += newer.settles
            self._pending[key] = pending

    async def sweep_once(self, now: datetime | None = None) -> int:
        """Flush pending signals, then mark silent devices STALE; return how many."""
        async with self._writing:
            await self._flush_locked()
            start = time.perf_counter()
            async with fleet(self._db) as con:
                count = await sweep(
                    con, now=now or datetime.now(UTC), stale_after_s=self.stale_after_s
                )
            metrics.SWEEP_SECONDS.observe(time.perf_counter() - start)
        metrics.LIVENESS_TRANSITIONS.labels("STALE").inc(count)
        self.sweeps += 1
        self.transitions += count
        return count

    async def _flush_forever(self) -> None:
        while True:
            await self._work()
            # Linger so that a burst of messages becomes one statement.
            await asyncio.sleep(self._flush_s)
            self._wake.clear()
            await transient.retry_forever(self.flush, log=log, what="liveness flush")

    async def _work(self) -> None:
        """Until a message arrives or the earliest hold-down is over."""
        if self._release_at is None:
            await self._wake.wait()
            return
        delay = self._release_at - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _sweep_forever(self, publisher: Publisher) -> None:
        connected = getattr(publisher, "connected", None)
        loop = asyncio.get_running_loop()
        up_since: float | None = None
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            if isinstance(connected, asyncio.Event) and not connected.is_set():
                up_since = None
                continue
            if up_since is None:
                up_since = loop.time()
            if loop.time() - up_since < self.stale_after_s:
                continue
            try:
                count = await self.sweep_once()
            except transient.TRANSIENT as error:
                log.warning("liveness sweep failed (%s); retrying next tick", error)
                continue
            if count:
                log.info("sweep: %d devices went stale", count)
