"""Reports queued for the evaluator survive a restart of a Mosquitto with
persistence.

The evaluator's session (clean start off, session expiry) is the broker's
to keep while the evaluator is away; `pulse broker-config mosquitto` sets
Mosquitto up with `persistence true`, so a broker restarted meanwhile still
holds the session and its queued QoS 1 messages. Here the evaluator is
killed, devices publish, Mosquitto is stopped (SIGTERM: it saves its
database) and started again on the same port, and the evaluator restarted
with the same client id must resume the session and store every device's
last report, each delivered to it exactly once.
"""

from __future__ import annotations

import pytest

from server.db import Database
from tests.faults.conftest import (
    EvaluatorFactory,
    MosquittoFactory,
    ReportFlood,
    flooding,
    lost_devices,
    seed_fleet,
    stored_count,
    until_all_last,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

DEVICES = 20
REPORTS = 20


async def test_queued_reports_survive_a_broker_restart_with_persistence(
    mosquitto_factory: MosquittoFactory, evaluators: EvaluatorFactory, dsn: str, db: Database
) -> None:
    broker = await mosquitto_factory(persistence=True)
    fleet = await seed_fleet(dsn, DEVICES)
    evaluator = evaluators(broker.url, "faults-broker-restart")
    await evaluator.start()  # the session exists from now on
    await evaluator.kill()
    flood = ReportFlood(broker.port, fleet, REPORTS)
    async with flooding(flood):
        pass
    await broker.stop()
    await broker.start()
    resumed = await evaluator.start()
    assert resumed.session == "resumed", resumed
    await until_all_last(db, flood, "every device's last report being stored")
    log = broker.log
    await wait_for(
        lambda: log.refresh().acked[evaluator.client_id] == flood.total,
        what="the evaluator acknowledging every report",
    )
    assert await lost_devices(db, flood) == []
    assert await stored_count(db, fleet) == flood.total
    assert log.sent[evaluator.client_id] == flood.total
