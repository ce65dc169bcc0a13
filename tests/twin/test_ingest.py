"""Reported state over MQTT, through the evaluator, into PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import asyncpg
import pytest
from pulse.device.v1 import twin_pb2
from pulse_client import AsyncPulseClient, struct_to_dict

from evaluator.twin_ingest import TwinIngest
from server import wire
from server.db import Database
from server.twin import store
from tests.conftest import Tenant, TenantFactory
from tests.helpers import eventually
from tests.twin.conftest import EvaluatorFactory, RunningEvaluator, create_devices


def reported(state: Any, version: Any) -> bytes:
    return json.dumps({"state": state, "desired_version": version}).encode()


async def send(mqtt: aiomqtt.Client, tenant_id: uuid.UUID, device_id: str, payload: bytes) -> None:
    await mqtt.publish(wire.topic(tenant_id, device_id, "twin/reported"), payload, qos=1)


def snapshot(twin: twin_pb2.Twin) -> tuple[object, ...]:
    return (
        struct_to_dict(twin.reported),
        twin.reported_version,
        twin.revision,
        twin.reported_update_time.ToDatetime(),
    )


async def test_a_report_lands_in_the_twin(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt: aiomqtt.Client,
    start_evaluator: EvaluatorFactory,
) -> None:
    running = await start_evaluator()
    await create_devices(client, "D1")
    await client.twin.update_desired("D1", {"mode": "eco"}, expected_version=0)
    await send(mqtt, tenant.tenant_id, "D1", reported({"mode": "eco", "temp": 20.5}, 1))

    async def landed() -> bool:
        return (await client.twin.get("D1")).reported_version == 1

    await eventually(landed, what="the report")
    twin = await client.twin.get("D1")
    assert struct_to_dict(twin.reported) == {"mode": "eco", "temp": 20.5}
    assert twin.HasField("reported_update_time")
    assert [d for d, _ in running.rejections(tenant.tenant_id)] == []


async def test_bad_messages_are_counted_and_change_nothing(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt: aiomqtt.Client,
    start_evaluator: EvaluatorFactory,
) -> None:
    running = await start_evaluator()
    await create_devices(client, "D1", "GONE")
    await client.devices.decommission("GONE")
    await client.twin.update_desired("D1", {"a": 1}, expected_version=0)
    await client.twin.update_desired("D1", {"a": 2}, expected_version=1)
    await send(mqtt, tenant.tenant_id, "D1", reported({"a": 2}, 2))
    await eventually(lambda: running.ingest.counts[store.APPLIED] >= 1, what="the first report")
    before = snapshot(await client.twin.get("D1"))

    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(10):
        deep = {"n": deep}
    bad = [
        ("D1", b"{not json", "malformed_json"),
        ("D1", b"\xff\xfe", "malformed_json"),
        ("D1", b'{"state": {"x": NaN}, "desired_version": 2}', "malformed_json"),
        ("D1", b"[1, 2]", "not_object"),
        ("D1", b'"text"', "not_object"),
        ("D1", reported([1, 2], 2), "bad_state"),
        ("D1", reported("on", 2), "bad_state"),
        ("D1", json.dumps({"state": {}}).encode(), "bad_version"),
        ("D1", reported({}, -1), "bad_version"),
        ("D1", reported({}, "2"), "bad_version"),
        ("D1", reported({}, True), "bad_version"),
        ("D1", reported({"blob": "x" * (32 * 1024)}, 2), "too_large"),
        ("D1", b" " * (70 * 1024), "too_large"),
        ("D1", reported(deep, 2), "too_deep"),
        ("D1", b"[" * 20_000, "malformed_json"),  # RecursionError, not a crash
        ("D1", reported({"x": "a\x00b"}, 2), "invalid_value"),
        ("D1", b'{"state": {"x": "\\ud800"}, "desired_version": 2}', "invalid_value"),
        ("D1", b'{"state": {"x": 1e999}, "desired_version": 2}', "invalid_value"),
        ("D1", reported({"a": 1}, 1), "stale_version"),
        ("D1", reported({"a": 3}, 3), "future_version"),
        ("NOPE", reported({"a": 1}, 0), "unknown_device"),
        ("GONE", reported({"a": 1}, 0), "decommissioned"),
    ]
    for device_id, payload, _ in bad:
        await send(mqtt, tenant.tenant_id, device_id, payload)
    stranger = uuid.uuid4()
    await send(mqtt, stranger, "D1", reported({"a": 2}, 2))

    expected = [(device_id, reason) for device_id, _, reason in bad]
    await eventually(
        lambda: len(running.rejections(tenant.tenant_id)) >= len(expected),
        what="every rejection",
    )
    assert running.rejections(tenant.tenant_id) == expected
    await eventually(lambda: running.rejections(stranger) == [("D1", "unknown_tenant")])
    assert snapshot(await client.twin.get("D1")) == before
    assert (await client.twin.get("GONE")).reported_version == 0

    # The pipeline is still healthy, and a good report still lands.
    await send(mqtt, tenant.tenant_id, "D1", reported({"a": 2, "b": 1}, 2))

    async def landed() -> bool:
        return struct_to_dict((await client.twin.get("D1")).reported) == {"a": 2, "b": 1}

    await eventually(landed, what="the good report after the bad ones")


async def test_an_older_version_never_rolls_back(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt: aiomqtt.Client,
    start_evaluator: EvaluatorFactory,
) -> None:
    running = await start_evaluator()
    await create_devices(client, "D1")
    for n in range(3):
        await client.twin.update_desired("D1", {"v": n + 1}, expected_version=n)
    # Out of order, in one burst (so most likely one batch), then alone.
    for version in (3, 1, 2):
        await send(mqtt, tenant.tenant_id, "D1", reported({"v": version}, version))
    await eventually(lambda: running.ingest.accepted + running.ingest.rejected >= 3)
    await send(mqtt, tenant.tenant_id, "D1", reported({"v": 2}, 2))
    await eventually(lambda: len(running.rejections(tenant.tenant_id)) >= 1)
    twin = await client.twin.get("D1")
    assert (struct_to_dict(twin.reported), twin.reported_version) == ({"v": 3}, 3)
    assert twin.sync_status == twin_pb2.Twin.SYNCED
    # The same version again with other values is a legitimate update.
    await send(mqtt, tenant.tenant_id, "D1", reported({"v": 3, "note": "drift"}, 3))

    async def updated() -> bool:
        return "note" in struct_to_dict((await client.twin.get("D1")).reported)

    await eventually(updated, what="the same-version update")


async def test_a_batch_is_one_statement_per_tenant(
    client: AsyncPulseClient,
    db: Database,
    tenant: Tenant,
    make_tenant: TenantFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Driven without a broker, so the batch boundaries are certain: every
    message is queued before the writer first runs."""
    other = await make_tenant()
    await create_devices(client, *[f"D{n}" for n in range(50)])
    async with db.tenant(tenant.tenant_id) as con:
        await con.execute("UPDATE device_state SET desired_version = 10")
    statements = 0
    original = store.ingest_reported

    async def counting(*args: Any, **kwargs: Any) -> store.IngestResult:
        nonlocal statements
        statements += 1
        return await original(*args, **kwargs)

    monkeypatch.setattr(store, "ingest_reported", counting)
    ingest = TwinIngest(db)
    for n in range(200):
        version = n // 50 + 1  # four rounds over the 50 devices
        for tenant_id in (tenant.tenant_id, other.tenant_id):
            await ingest.handle(
                wire.DeviceMessage(
                    tenant_id=tenant_id,
                    device_id=f"D{n % 50}",
                    kind="twin/reported",
                    payload=reported({"round": version}, version),
                    received_at=datetime.now(UTC),
                )
            )
    writer = asyncio.create_task(ingest.run(publisher=None))  # type: ignore[arg-type]
    try:
        await eventually(lambda: ingest.accepted + ingest.rejected == 400)
    finally:
        writer.cancel()
    assert statements == 2
    assert ingest.counts == {
        store.APPLIED: 50,
        store.SUPERSEDED: 150,
        "unknown_device": 200,
    }
    twin = await client.twin.get("D7")
    assert (struct_to_dict(twin.reported), twin.reported_version) == ({"round": 4}, 4)


async def test_reports_sent_while_the_evaluator_is_down_are_not_lost(
    client: AsyncPulseClient,
    tenant: Tenant,
    mqtt: aiomqtt.Client,
    start_evaluator: EvaluatorFactory,
) -> None:
    first: RunningEvaluator = await start_evaluator()
    await create_devices(client, *[f"D{n}" for n in range(20)])
    await first.stop()  # as if it crashed: its persistent session stays
    for n in range(20):
        await send(mqtt, tenant.tenant_id, f"D{n}", reported({"n": n}, 0))
    second = await start_evaluator(first.client_id)

    async def all_landed() -> bool:
        twins = [await client.twin.get(f"D{n}") for n in range(20)]
        return all(struct_to_dict(t.reported) == {"n": n} for n, t in enumerate(twins))

    await eventually(all_landed, what="the queued reports")
    assert second.ingest.counts[store.APPLIED] >= 20


async def test_a_document_postgresql_refuses_costs_only_its_own_message(
    client: AsyncPulseClient,
    db: Database,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The checks reject everything jsonb is known to refuse; should one slip
    through anyway, the batch is retried message by message."""
    await create_devices(client, "A", "B", "C")
    original = store.ingest_reported

    async def refusing(con: Any, tenant_id: uuid.UUID, reports: Any) -> store.IngestResult:
        if any("poison" in r.document for r in reports):
            raise asyncpg.DataError("unsupported Unicode escape sequence")
        return await original(con, tenant_id, reports)

    monkeypatch.setattr(store, "ingest_reported", refusing)
    ingest = TwinIngest(db)
    for device_id, state in (("A", {"ok": 1}), ("B", {"poison": 1}), ("C", {"ok": 3})):
        await ingest.handle(
            wire.DeviceMessage(
                tenant_id=tenant.tenant_id,
                device_id=device_id,
                kind="twin/reported",
                payload=reported(state, 0),
                received_at=datetime.now(UTC),
            )
        )
    writer = asyncio.create_task(ingest.run(publisher=None))  # type: ignore[arg-type]
    try:
        await eventually(lambda: ingest.accepted + ingest.rejected == 3)
    finally:
        writer.cancel()
    assert [(r.device_id, r.reason) for r in ingest.rejections] == [("B", "invalid_value")]
    assert struct_to_dict((await client.twin.get("A")).reported) == {"ok": 1}
    assert struct_to_dict((await client.twin.get("C")).reported) == {"ok": 3}
    assert struct_to_dict((await client.twin.get("B")).reported) == {}
