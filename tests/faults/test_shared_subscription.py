"""Two evaluators sharing a subscription store a device's newest report.

With PULSE_MQTT_SHARED_GROUP set, evaluators subscribe to
`$share/{group}/pulse/+/+/#` and the broker hands each message to one of
them (Mosquitto: in turn). One device's consecutive reports then land in two
processes that write them concurrently, in whatever order their batches
commit; the report's `seq` makes the newest one win regardless: a report
whose seq is not above the stored one is refused (`out_of_order`), on the
locked row.

One device publishes 1,000 reports (seq 1..1000) as fast as QoS 1 lets it
(20 awaiting their PUBACK at a time); the stored report must be seq 1000's.
Mosquitto's log shows which evaluator each report went to and that each
acknowledged its share, so the test also proves that both took part (the
database alone could not tell).
"""

from __future__ import annotations

import re

import pytest

from server.db import Database
from tests.faults.conftest import (
    EvaluatorFactory,
    Mosquitto,
    ReportFlood,
    flooding,
    lost_devices,
    seed_fleet,
    until_all_last,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

REPORTS = 1000
GROUP = "faults"
_OUT_OF_ORDER = re.compile(r"rejected twin/reported .*: out_of_order")


async def test_two_evaluators_sharing_a_subscription_store_the_newest_report(
    mosquitto: Mosquitto, evaluators: EvaluatorFactory, dsn: str, db: Database
) -> None:
    fleet = await seed_fleet(dsn, 1)
    first = evaluators(mosquitto.url, "faults-shared-a", shared_group=GROUP)
    second = evaluators(mosquitto.url, "faults-shared-b", shared_group=GROUP)
    await first.start()
    await second.start()
    log = mosquitto.log
    flood = ReportFlood(mosquitto.port, fleet, REPORTS, window=20)
    async with flooding(flood):
        pass

    await wait_for(
        lambda: log.refresh().acked[first.client_id] + log.acked[second.client_id] == REPORTS,
        what="the evaluators acknowledging every report",
    )
    await until_all_last(db, flood, "report 1000 being stored")
    shares = {e.client_id: log.sent[e.client_id] for e in (first, second)}
    refused = {e.client_id: len(_OUT_OF_ORDER.findall(e.log_text())) for e in (first, second)}
    print(
        f"\nshared subscription: {REPORTS} reports, delivered {shares}, "
        f"acknowledged { {e.client_id: log.acked[e.client_id] for e in (first, second)} }, "
        f"out_of_order lines logged (at most 20 per 10 s each) {refused}"
    )
    assert await lost_devices(db, flood) == []
    assert sum(shares.values()) == REPORTS
    assert all(shares.values()), shares
    assert log.acked[first.client_id] == shares[first.client_id]
    assert log.acked[second.client_id] == shares[second.client_id]
