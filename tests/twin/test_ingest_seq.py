"""Reported state with device sequence numbers: whatever order the reports
are processed in (one batch, many batches, two evaluators at once), the
newest one by seq is what stays stored."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pulse_client import AsyncPulseClient

from evaluator.twin_ingest import TwinIngest
from server import wire
from server.db import Database, create_pool
from server.twin import store
from tests.conftest import Tenant
from tests.helpers import eventually
from tests.twin.conftest import create_devices


def report(device_id: str, n: int, *, seq: int | None = None, version: int = 0) -> store.Report:
    return store.Report(device_id, json.dumps({"n": n}), version, seq)


async def ingest(db: Database, tenant_id: uuid.UUID, reports: Sequence[store.Report]) -> list[str]:
    async with db.tenant(tenant_id) as con:
        return (await store.ingest_reported(con, tenant_id, reports)).outcomes


async def stored(db: Database, tenant_id: uuid.UUID, device_id: str) -> dict[str, Any]:
    async with db.tenant(tenant_id) as con:
        row = await con.fetchrow(
            "SELECT reported, reported_version, reported_seq, twin_revision, reported_updated_at"
            " FROM device_state WHERE device_id = $1",
            device_id,
        )
    assert row is not None
    return dict(row)


def message(tenant_id: uuid.UUID, device_id: str, payload: bytes) -> wire.DeviceMessage:
    return wire.DeviceMessage(tenant_id, device_id, "twin/reported", payload, datetime.now(UTC))


async def test_shuffled_in_one_batch_the_highest_seq_wins(
    client: AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await create_devices(client, "A")
    seqs = list(range(1, 21))
    random.Random(7).shuffle(seqs)
    outcomes = await ingest(db, tenant.tenant_id, [report("A", s, seq=s) for s in seqs])
    row = await stored(db, tenant.tenant_id, "A")
    assert (row["reported"], row["reported_seq"]) == ({"n": 20}, 20)
    # Those that arrived after a newer one would have been refused one at a
    # time: out of order; the others were merely superseded.
    for i, (seq, outcome) in enumerate(zip(seqs, outcomes, strict=True)):
        if seq == 20:
            assert outcome == store.APPLIED
        elif any(earlier > seq for earlier in seqs[:i]):
            assert outcome == store.OUT_OF_ORDER
        else:
            assert outcome == store.SUPERSEDED


async def test_shuffled_across_batches_the_highest_seq_wins(
    client: AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await create_devices(client, "A")
    async with db.tenant(tenant.tenant_id) as con:
        await con.execute("UPDATE device_state SET desired_version = 30")
    # Versions grow with seq, as a device's acknowledgements do.
    seqs = list(range(1, 31))
    random.Random(11).shuffle(seqs)
    outcomes = []
    for batch in (seqs[0:7], seqs[7:8], seqs[8:20], seqs[20:]):
        outcomes += await ingest(
            db, tenant.tenant_id, [report("A", s, seq=s, version=s) for s in batch]
        )
    row = await stored(db, tenant.tenant_id, "A")
    assert (row["reported"], row["reported_version"], row["reported_seq"]) == ({"n": 30}, 30, 30)
    newest_before = [max(seqs[:i], default=0) for i in range(len(seqs))]
    late = sum(1 for s, before in zip(seqs, newest_before, strict=True) if s < before)
    assert outcomes.count(store.OUT_OF_ORDER) == late
    assert store.STALE_VERSION not in outcomes  # the seq says why they lost


async def test_two_evaluators_at_once_end_with_the_highest_seq(
    client: AsyncPulseClient, db: Database, dsn: str, tenant: Tenant
) -> None:
    devices = [f"C{n:02d}" for n in range(30)]
    await create_devices(client, *devices)
    messages = [
        message(tenant.tenant_id, d, wire.reported({"n": s}, 0, seq=s))
        for d in devices
        for s in range(1, 41)
    ]
    random.Random(3).shuffle(messages)
    other = Database(await create_pool(dsn, size=4))
    first, second = TwinIngest(db, batch_max=50), TwinIngest(other, batch_max=50)
    for i, m in enumerate(messages):
        await (first if i % 2 else second).handle(m)
    writers = [asyncio.create_task(i.run(publisher=None)) for i in (first, second)]  # type: ignore[arg-type]
    try:
        await eventually(
            lambda: sum(i.accepted + i.rejected for i in (first, second)) == len(messages),
            what="every report",
        )
    finally:
        for writer in writers:
            writer.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        await other.close()
    for device_id in devices:
        row = await stored(db, tenant.tenant_id, device_id)
        assert (row["reported"], row["reported_seq"]) == ({"n": 40}, 40), device_id
    counts = first.counts + second.counts
    assert counts[store.OUT_OF_ORDER] > 0
    assert set(counts) <= {store.APPLIED, store.SUPERSEDED, store.UNCHANGED, store.OUT_OF_ORDER}


async def test_an_unchanged_document_still_records_its_seq(
    client: AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    """Equal document, higher seq, then an older different report: the older
    one must lose, so the seq is stored without a revision."""
    await create_devices(client, "A")
    assert await ingest(db, tenant.tenant_id, [report("A", 1, seq=1)]) == [store.APPLIED]
    before = await stored(db, tenant.tenant_id, "A")
    assert await ingest(db, tenant.tenant_id, [report("A", 1, seq=3)]) == [store.UNCHANGED]
    after = await stored(db, tenant.tenant_id, "A")
    assert after["reported_seq"] == 3
    assert (after["twin_revision"], after["reported_updated_at"]) == (
        before["twin_revision"],
        before["reported_updated_at"],
    )
    assert await ingest(db, tenant.tenant_id, [report("A", 2, seq=2)]) == [store.OUT_OF_ORDER]
    assert (await stored(db, tenant.tenant_id, "A"))["reported"] == {"n": 1}


async def test_reports_without_seq_leave_it_alone(
    client: AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await create_devices(client, "A")
    await ingest(db, tenant.tenant_id, [report("A", 1, seq=5)])
    assert await ingest(db, tenant.tenant_id, [report("A", 2)]) == [store.APPLIED]
    row = await stored(db, tenant.tenant_id, "A")
    assert (row["reported"], row["reported_seq"]) == ({"n": 2}, 5)
    # The stored seq still refuses older numbered reports.
    assert await ingest(db, tenant.tenant_id, [report("A", 3, seq=4)]) == [store.OUT_OF_ORDER]


async def test_in_a_mixed_batch_the_numbered_report_wins(
    client: AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await create_devices(client, "A")
    outcomes = await ingest(
        db, tenant.tenant_id, [report("A", 1), report("A", 2, seq=9), report("A", 3)]
    )
    assert outcomes == [store.SUPERSEDED, store.APPLIED, store.SUPERSEDED]
    row = await stored(db, tenant.tenant_id, "A")
    assert (row["reported"], row["reported_seq"]) == ({"n": 2}, 9)


async def test_a_bad_seq_refuses_the_report(
    client: AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await create_devices(client, "A")
    ingest_ = TwinIngest(db)
    for bad in ('"1"', "true", "-1", str(2**63), "1.0", "null"):
        payload = b'{"state": {"n": 1}, "desired_version": 0, "seq": ' + bad.encode() + b"}"
        await ingest_.handle(message(tenant.tenant_id, "A", payload))
    assert ingest_.counts == {wire.BAD_SEQ: 6}
    assert [r.reason for r in ingest_.rejections] == [wire.BAD_SEQ] * 6
    assert (await stored(db, tenant.tenant_id, "A"))["reported"] == {}


async def test_the_seq_is_checked_again_on_the_locked_row(
    client: AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    """A concurrent ingest commits a newer seq while this one waits for the
    row: this one's snapshot did not see it, the locked row does."""
    await create_devices(client, "A")
    async with db.tenant(tenant.tenant_id) as con:
        assert await store.ingest_reported(con, tenant.tenant_id, [report("A", 5, seq=5)])
        older = asyncio.create_task(ingest(db, tenant.tenant_id, [report("A", 3, seq=3)]))
        await asyncio.sleep(0.3)
        assert not older.done()  # waiting for the row lock
    assert await older == [store.OUT_OF_ORDER]
    row = await stored(db, tenant.tenant_id, "A")
    assert (row["reported"], row["reported_seq"]) == ({"n": 5}, 5)
