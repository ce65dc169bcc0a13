"""Desired state to devices: drains the twin outbox to retained MQTT messages
on `pulse/{tenant}/{device}/twin/desired` and, unless switched off
(PULSE_UPSTREAM_DESIRED), on upstream's
`tenant/{external id or tenant}/device/{device}/shadow/desired` in upstream's
payload (docs/upstream-devices.md): every device gets both, since nothing
tells which dialect a device speaks.

Every committed desired write leaves an outbox row (same transaction, see
migrations/0003_twin.sql), and only committed rows are visible here, so a
write is never announced before it commits. Rows are deleted only after the
broker acknowledged the publications (QoS 1, every topic), in the
transaction that claimed them, so a crash, a lost broker or a lost database
between commit and publication leaves them queued, and the next drain (at
the latest the one when the evaluator starts again) publishes them. The
price is at-least-once: a device may see the same version twice and must
ignore versions it has already applied.

The drain publishes each device's *current* desired document, once per
batch however many writes queued it, since a retained topic only keeps the
latest anyway. One drainer at a time holds the outbox (an advisory lock in
`store.claim_outbox`), so with several evaluators two of them can never
publish one device's versions out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator

import aiomqtt
from opentelemetry import trace

from evaluator.runtime import Publisher
from server import transient, wire
from server.db import Database
from server.observability import metrics, tracing
from server.twin import store

log = logging.getLogger("pulse.evaluator.twin")
_tracer = trace.get_tracer("pulse.evaluator")

# How often the backlog is counted for the outbox metrics.
_BACKLOG_EVERY_S = 1.0
# The broker's failures, which the drain waits out like the database's.
_BROKER_ERRORS = (aiomqtt.MqttError, TimeoutError)


class TwinPublisher:
    """The evaluator handler that publishes desired state; it consumes no
    device messages."""

    kinds: frozenset[str] = frozenset()

    def __init__(
        self,
        db: Database,
        *,
        poll_s: float = 0.1,
        batch: int = 500,
        publish_timeout_s: float = 10.0,
        upstream: bool = True,
    ) -> None:
        """Args:
        db: The evaluator's pool; the drain needs two connections at once.
        poll_s: How often an empty outbox is looked at again.
        batch: Most outbox rows drained per transaction.
        publish_timeout_s: Longest a batch may wait for the broker before its
            transaction is rolled back (and the rows retried later).
        upstream: Publish on upstream's desired topic too.
        """
        self._db = db
        self._poll_s = poll_s
        self._batch = batch
        self._publish_timeout_s = publish_timeout_s
        self._upstream = upstream
        #: Desired documents published (one per device per batch, whatever
        #: the number of topics).
        self.published = 0

    async def handle(self, message: wire.DeviceMessage) -> None:
        return None

    async def run(self, publisher: Publisher) -> None:
        measured_at = 0.0
        while True:
            if time.monotonic() - measured_at >= _BACKLOG_EVERY_S:
                measured_at = time.monotonic()
                await self._measure_backlog()
            drained = await transient.retry_forever(
                lambda: self.drain_once(publisher),
                log=log,
                what="desired-state publishing",
                also=_BROKER_ERRORS,
            )
            if drained < self._batch:
                await asyncio.sleep(self._poll_s)

    async def drain_once(self, publisher: Publisher) -> int:
        """Publish one batch of queued desired writes; return how many rows
        it drained."""
        async with self._db.admin() as con, con.transaction():
            entries = await store.claim_outbox(con, limit=self._batch)
            if not entries:
                return 0
            by_tenant: dict[uuid.UUID, set[str]] = {}
            for entry in entries:
                by_tenant.setdefault(entry.tenant_id, set()).add(entry.device_id)
            documents: list[tuple[uuid.UUID, store.Desired]] = []
            for tenant_id, device_ids in by_tenant.items():
                async with self._db.tenant(tenant_id, readonly=True) as tenant_con:
                    found = await store.current_desired(tenant_con, tenant_id, sorted(device_ids))
                documents.extend((tenant_id, desired) for desired in found)
            messages = [m for t, desired in documents for m in self._messages(t, desired)]
            with _publish_spans(entries, documents):
                async with asyncio.timeout(self._publish_timeout_s):
                    await _publish_all(publisher, messages)
            await store.delete_outbox(con, [entry.id for entry in entries])
        self.published += len(documents)
        metrics.OUTBOX_PUBLISHED.inc(len(documents))
        return len(entries)

    async def _measure_backlog(self) -> None:
        try:
            async with self._db.admin() as con:
                depth, age_s = await store.outbox_backlog(con)
        except transient.TRANSIENT:
            return  # the drain says what is wrong with the database
        metrics.OUTBOX_DEPTH.set(depth)
        metrics.OUTBOX_AGE_SECONDS.set(age_s)

    def _messages(self, tenant_id: uuid.UUID, desired: store.Desired) -> list[tuple[str, bytes]]:
        """(topic, payload) of each publication of one desired document."""
        ours = (wire.topic(tenant_id, desired.device_id, "twin/desired"), desired.payload())
        if not self._upstream:
            return [ours]
        tenant = wire.upstream_tenant(tenant_id, desired.tenant_external_id)
        topic = wire.upstream_topic(tenant, desired.device_id, "twin/desired")
        return [ours, (topic, desired.upstream_payload())]


@contextlib.contextmanager
def _publish_spans(
    entries: list[store.OutboxEntry], documents: list[tuple[uuid.UUID, store.Desired]]
) -> Iterator[None]:
    """With tracing on, a span per traced write's publication, in the trace
    of the call that wrote it (the newest such write of each device)."""
    parents = {(e.tenant_id, e.device_id): e.traceparent for e in entries if e.traceparent}
    if not parents:
        yield
        return
    spans = []
    for tenant_id, desired in documents:
        context = tracing.continued(parents.get((tenant_id, desired.device_id)))
        if context is not None:
            span = _tracer.start_span(
                "publish twin/desired",
                context=context,
                kind=trace.SpanKind.PRODUCER,
                attributes={
                    "pulse.tenant_id": str(tenant_id),
                    "pulse.device_id": desired.device_id,
                    "pulse.desired_version": desired.version,
                },
            )
            spans.append(span)
    try:
        yield
    except BaseException as error:
        for span in spans:
            span.record_exception(error)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
        raise
    finally:
        for span in spans:
            span.end()


async def _publish_all(publisher: Publisher, messages: list[tuple[str, bytes]]) -> None:
    """Publish concurrently (each waits for its PUBACK); on the first failure
    cancel the rest and raise that failure itself, not an ExceptionGroup, so
    the caller can tell a broker problem from a bug."""
    pending = [
        asyncio.ensure_future(publisher.publish(topic, payload, qos=1, retain=True))
        for topic, payload in messages
    ]
    try:
        await asyncio.gather(*pending)
    except BaseException:
        for task in pending:
            task.cancel()
        # Only reaps the cancelled tasks; the original error is re-raised.
        await asyncio.gather(*pending, return_exceptions=True)
        raise
