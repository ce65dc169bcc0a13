"""Liveness: device messages and silence become status changes and connection events.

Every device message is a signal (`classify`): a status message says
`online`, `offline` or, for anything else, that the broker published the
device's last-will; any other message is activity. Signals are gathered for
`flush_s` and written in one statement per round (`plan_rounds`), which moves
last_seen_at and, where the status changes, inserts the event in the same
statement (server/connectivity/transitions.py). A sweep every
`sweep_interval_s` turns ONLINE devices silent for longer than
`stale_after_s` STALE, one statement for the whole fleet.

Retained messages are skipped: the broker re-sends them on every
(re)subscription, so they repeat what this evaluator already processed live
(its persistent session queues what it missed while away), and a retained
`online` from a device that has since gone silent is not a sign of life.

The sweep waits until the evaluator has been connected to the broker for the
whole threshold: silence it did not hear because it was disconnected is its
own outage, not the devices'.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from evaluator.runtime import Publisher
from server import transient, wire
from server.connectivity.model import Signal
from server.connectivity.transitions import (
    DeviceSignal,
    Transition,
    apply_signals,
    fleet,
    sweep,
)
from server.db import Database

log = logging.getLogger("pulse.evaluator.liveness")

# Past this many pending signals (the database is unreachable), runs of
# activity are merged so memory follows the number of devices, not messages.
_COMPACT_AT = 50_000


def classify(message: wire.DeviceMessage) -> Signal:
    if message.kind != "status":
        return Signal.ACTIVITY
    status = wire.status(message.payload)
    if status == wire.ONLINE:
        return Signal.ONLINE
    if status == wire.OFFLINE:
        return Signal.OFFLINE
    return Signal.WILL


def _collapse(signals: Sequence[DeviceSignal]) -> dict[tuple[object, str], list[DeviceSignal]]:
    """Each device's signals in arrival order, with runs of activity merged
    into the latest one (only the newest last_seen matters)."""
    by_device: dict[tuple[object, str], list[DeviceSignal]] = {}
    for signal in signals:
        queue = by_device.setdefault((signal.tenant_id, signal.device_id), [])
        if queue and queue[-1].signal is Signal.ACTIVITY and signal.signal is Signal.ACTIVITY:
            if signal.at >= queue[-1].at:
                queue[-1] = signal
        else:
            queue.append(signal)
    return by_device


def plan_rounds(signals: Sequence[DeviceSignal]) -> list[list[DeviceSignal]]:
    """Split signals into statements holding at most one signal per device,
    keeping each device's signals in order: round k has each device's k-th."""
    rounds: list[list[DeviceSignal]] = []
    for queue in _collapse(signals).values():
        for k, signal in enumerate(queue):
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(signal)
    return rounds


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
    ) -> None:
        self._db = db
        self.stale_after_s = stale_after_s
        self._sweep_interval_s = sweep_interval_s
        self._flush_s = flush_s
        self._pending: list[DeviceSignal] = []
        self._wake = asyncio.Event()
        # Flushes and sweeps of one process take turns: they would otherwise
        # only deadlock each other on shared rows and retry.
        self._writing = asyncio.Lock()
        self.transitions = 0
        self.sweeps = 0

    async def handle(self, message: wire.DeviceMessage) -> None:
        if message.retain:
            return
        self._pending.append(
            DeviceSignal(
                tenant_id=message.tenant_id,
                device_id=message.device_id,
                signal=classify(message),
                at=message.received_at,
            )
        )
        if len(self._pending) >= _COMPACT_AT:
            self._pending = [s for queue in _collapse(self._pending).values() for s in queue]
        self._wake.set()

    async def run(self, publisher: Publisher) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._flush_forever())
            tasks.create_task(self._sweep_forever(publisher))

    async def flush(self) -> list[Transition]:
        """Write the pending signals now; return the events inserted.

        On a transient database error the unwritten signals go back to the
        front of the queue, in order, and the error is raised.
        """
        async with self._writing:
            return await self._flush_locked()

    async def _flush_locked(self) -> list[Transition]:
        batch, self._pending = self._pending, []
        rounds = plan_rounds(batch)
        done: list[Transition] = []
        for i, round_ in enumerate(rounds):
            try:
                async with fleet(self._db) as con:
                    done += await apply_signals(con, round_)
            except BaseException:
                unwritten = [s for later in rounds[i:] for s in later]
                # Rounds regroup signals by device, so put them back in a
                # per-device order that plans into the same rounds again.
                self._pending = unwritten + self._pending
                raise
        self.transitions += len(done)
        return done

    async def sweep_once(self, now: datetime | None = None) -> int:
        """Flush pending signals, then mark silent devices STALE; return how many."""
        async with self._writing:
            await self._flush_locked()
            async with fleet(self._db) as con:
                count = await sweep(
                    con, now=now or datetime.now(UTC), stale_after_s=self.stale_after_s
                )
        self.sweeps += 1
        self.transitions += count
        return count

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            # Linger so that a burst of messages becomes one statement.
            await asyncio.sleep(self._flush_s)
            self._wake.clear()
            await transient.retry_forever(self.flush, log=log, what="liveness flush")

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
