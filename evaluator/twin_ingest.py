"""Reported state from devices (`pulse/{tenant}/{device}/twin/reported`, or
upstream's `tenant/{tenant}/device/{device}/shadow/reported`) into
device_state, in batches.

A message is `{"state": {...}, "desired_version": n}` (upstream's:
`{"reported": {...}, "version": n}`): the device's whole reported document
and the desired version it last applied; both dialects are stored, refused
and counted alike. `handle` checks it on arrival (cheap, in the MQTT loop)
and queues it; `run` writes whatever has queued up, one statement per tenant
per batch (`store.ingest_reported`), so a burst costs a round trip per
tenant rather than per message. While a batch is being written the next one
accumulates; when the queue is full, `handle` waits, which slows the MQTT
loop down instead of growing memory.

A retained report is never applied (counted under `retained`): the broker
replays it on every resubscription, after newer reports may have landed.

A message that is refused (malformed, too large, unknown device, an older
version, ...) is counted under its reason in `counts`, logged with its tenant
and device, and never changes state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from evaluator.runtime import Publisher
from server import transient, wire
from server.db import Database
from server.observability import metrics
from server.twin import documents, store
from server.twin.notify import ChangeNotifier

log = logging.getLogger("pulse.evaluator.twin")

# Before parsing: a payload this large cannot hold a document within the
# limit (escaping at most doubles it, plus the envelope), so it is refused
# without spending time on it.
RAW_MAX = 2 * documents.MAX_BYTES + 1024

DATABASE_ERROR = "database_error"
RETAINED = "retained"

_FLUSH_AT_STOP_S = 2.0
# A device stuck in a loop can send thousands of bad messages a second; the
# log gets the first few of each window and a count of the rest.
_LOG_WINDOW_S = 10.0
_LOG_PER_WINDOW = 20


@dataclass(frozen=True, slots=True)
class Rejection:
    tenant_id: uuid.UUID
    device_id: str
    reason: str
    detail: str


# A queued report and the hook that lets the broker forget its message.
_Queued = tuple[uuid.UUID, store.Report, Callable[[], None]]


class _BadMessage(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_report(device_id: str, payload: bytes, dialect: wire.Dialect) -> store.Report:
    """The report in a message of `dialect`, or _BadMessage saying why not."""
    if len(payload) > RAW_MAX:
        raise _BadMessage(documents.TOO_LARGE, f"payload is {len(payload)} bytes")
    try:
        state, version, seq = wire.parse_reported_seq(payload, dialect)
    except wire.BadPayload as bad:
        raise _BadMessage(bad.reason, bad.detail) from None
    text, problem = documents.inspect(state)
    if problem is not None:
        raise _BadMessage(*problem)
    assert text is not None
    return store.Report(device_id=device_id, document=text, desired_version=version, seq=seq)


class TwinIngest:
    """The evaluator handler for `twin/reported` messages."""

    kinds = frozenset({"twin/reported"})

    def __init__(
        self,
        db: Database,
        *,
        batch_max: int = 5000,
        queue_max: int = 20000,
        concurrency: int = 4,
        keep_rejections: int = 1000,
    ) -> None:
        """Args:
        db: The evaluator's pool (RLS applies: one tenant scope per statement).
        batch_max: Most reports written in one round of statements.
        queue_max: Reports queued before `handle` waits.
        concurrency: Tenants of one batch written in parallel.
        keep_rejections: Recent rejections kept in `rejections` for inspection.
        """
        self._db = db
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._queue: list[_Queued] = []
        self._queued = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._slots = asyncio.Semaphore(concurrency)
        self._notifier = ChangeNotifier(db)
        #: Outcomes by reason: store.APPLIED, UNCHANGED, SUPERSEDED for
        #: accepted messages, anything else for refused ones.
        self.counts: collections.Counter[str] = collections.Counter()
        self.rejections: collections.deque[Rejection] = collections.deque(maxlen=keep_rejections)
        self._log_window_start = time.monotonic()
        self._log_lines = 0
        self._log_suppressed = 0

    @property
    def accepted(self) -> int:
        return sum(self.counts[reason] for reason in store.ACCEPTED)

    @property
    def rejected(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason not in store.ACCEPTED)

    async def handle(self, message: wire.DeviceMessage) -> None:
        if message.retain:
            # The broker re-sends a retained report on every resubscription:
            # it is old news, and applying it could roll back a newer report
            # of the same desired version. Counted, not logged.
            self.counts[RETAINED] += 1
            message.settle()
            return
        try:
            report = parse_report(message.device_id, message.payload, message.dialect)
        except _BadMessage as bad:
            self._reject(message.tenant_id, message.device_id, bad.reason, bad.detail)
            message.settle()
            return
        while len(self._queue) >= self._queue_max:
            self._room.clear()
            await self._room.wait()
        self._queue.append((message.tenant_id, report, message.settle))
        self._queued.set()

    async def run(self, publisher: Publisher) -> None:
        try:
            while True:
                await self._queued.wait()
                self._queued.clear()
                while self._queue:
                    batch = self._queue[: self._batch_max]
                    del self._queue[: self._batch_max]
                    self._room.set()
                    await self._write(batch)
        finally:
            # Watchers hear of the last batches now rather than at their next
            # resync; bounded, so a dead database cannot hold the stop up.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_FLUSH_AT_STOP_S):
                    await self._notifier.flush()

    async def _write(self, batch: list[_Queued]) -> None:
        by_tenant: dict[uuid.UUID, list[store.Report]] = {}
        for tenant_id, report, _ in batch:
            by_tenant.setdefault(tenant_id, []).append(report)
        if len(by_tenant) == 1:
            [(tenant_id, reports)] = by_tenant.items()
            await self._write_tenant(tenant_id, reports)
        else:
            async with asyncio.TaskGroup() as tasks:
                for tenant_id, reports in by_tenant.items():
                    tasks.create_task(self._write_tenant(tenant_id, reports))
        # Committed (or refused for good): the broker may forget them now.
        for _, _, settle in batch:
            settle()

    async def _write_tenant(self, tenant_id: uuid.UUID, reports: list[store.Report]) -> None:
        async with self._slots:
            try:
                outcomes = await self._outcomes(tenant_id, reports)
            except Exception:
                # A bug, not bad input: keep the evaluator (and the other
                # tenants' batches) running, and say loudly what was lost.
                log.exception(
                    "twin ingest failed for tenant %s; %d reports lost", tenant_id, len(reports)
                )
                outcomes = [DATABASE_ERROR] * len(reports)
        for report, outcome in zip(reports, outcomes, strict=True):
            if outcome in store.ACCEPTED:
                self.counts[outcome] += 1
            else:
                self._reject(
                    tenant_id,
                    report.device_id,
                    outcome,
                    f"desired_version {report.desired_version}",
                )

    async def _outcomes(self, tenant_id: uuid.UUID, reports: list[store.Report]) -> list[str]:
        try:
            result = await self._store(tenant_id, reports)
        except asyncpg.DataError:
            # Something the checks let through and PostgreSQL refuses: find
            # it by writing the reports one by one, so the others still land.
            return [await self._store_one(tenant_id, report) for report in reports]
        self._notifier.changed(tenant_id, result.changed)
        return result.outcomes

    async def _store(self, tenant_id: uuid.UUID, reports: list[store.Report]) -> store.IngestResult:
        """One statement; waits out a database that is down rather than
        dropping reports that the broker already considers delivered."""

        async def attempt() -> store.IngestResult:
            start = time.perf_counter()
            async with self._db.tenant(tenant_id) as con:
                result = await store.ingest_reported(con, tenant_id, reports)
            metrics.INGEST_COMMIT_SECONDS.labels("twin").observe(time.perf_counter() - start)
            metrics.INGEST_BATCH_SIZE.labels("twin").observe(len(reports))
            return result

        return await transient.retry_forever(attempt, log=log, what="twin ingest")

    async def _store_one(self, tenant_id: uuid.UUID, report: store.Report) -> str:
        try:
            result = await self._store(tenant_id, [report])
        except asyncpg.DataError as error:
            log.warning("twin ingest: PostgreSQL refused a document: %s", error)
            return documents.INVALID_VALUE
        self._notifier.changed(tenant_id, result.changed)
        return result.outcomes[0]

    def _reject(self, tenant_id: uuid.UUID, device_id: str, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        metrics.INGEST_REJECTED.labels("twin/reported", reason).inc()
        self.rejections.append(Rejection(tenant_id, device_id, reason, detail))
        now = time.monotonic()
        if now - self._log_window_start > _LOG_WINDOW_S:
            if self._log_suppressed:
                log.warning("... and %d more rejected twin/reported messages", self._log_suppressed)
            self._log_window_start, self._log_lines, self._log_suppressed = now, 0, 0
        if self._log_lines >= _LOG_PER_WINDOW:
            self._log_suppressed += 1
            return
        self._log_lines += 1
        log.warning(
            "rejected twin/reported from tenant %s device %s: %s (%s)",
            tenant_id,
            device_id,
            reason,
            detail,
        )
