"""An evaluator connecting to a broker without its retained messages (a new
Mosquitto, or one restarted without persistence) republishes every desired
document (evaluator/retained_repair.py) and keeps storing device reports.

Written after this failed: the repair's `INSERT INTO twin_outbox ...
RETURNING` ran as pulse_app, which may insert into twin_outbox but not read
it ("permission denied for table twin_outbox"); the exception ended
`Evaluator.run`'s task group, the evaluator's MQTT connection closed, and
`pulse evaluator` stayed up consuming nothing, its log silent until it was
stopped. The other fault tests start their brokers with the marker, so this
is the one that goes through the repair.
"""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from server import wire
from server.db import Database
from tests.faults.conftest import (
    DEADLINE_S,
    EvaluatorFactory,
    MosquittoFactory,
    ReportFlood,
    flooding,
    seed_fleet,
    until_all_last,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)


async def test_an_evaluator_on_a_fresh_broker_repairs_and_keeps_storing(
    mosquitto_factory: MosquittoFactory, evaluators: EvaluatorFactory, dsn: str, db: Database
) -> None:
    broker = await mosquitto_factory(marker=False)
    # Devices with a desired version, so the repair has documents to queue.
    fleet = await seed_fleet(dsn, 5, desired_version=1)
    evaluator = evaluators(broker.url, "faults-fresh")
    await evaluator.start()
    await wait_for(
        lambda: "queued the desired state of" in evaluator.log_text(),
        what="the evaluator finishing its retained-state repair",
    )
    flood = ReportFlood(broker.port, fleet, 10)
    async with flooding(flood):
        pass
    await until_all_last(db, flood, "every device's last report being stored")
    assert evaluator.running

    # And the devices' desired documents are back on the broker, retained.
    found: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="faults-fresh-check") as client:
        await client.subscribe(f"pulse/{fleet.tenant_id}/+/twin/desired", qos=1)
        async with asyncio.timeout(DEADLINE_S):
            async for message in client.messages:
                assert message.retain
                assert isinstance(message.payload, bytes)
                found[message.topic.value] = message.payload
                if len(found) == len(fleet.device_ids):
                    break
    assert found == {
        wire.topic(fleet.tenant_id, device_id, "twin/desired"): wire.desired({}, 1)
        for device_id in fleet.device_ids
    }
