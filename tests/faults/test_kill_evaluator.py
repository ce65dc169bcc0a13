"""An evaluator process killed with SIGKILL loses no device report.

The evaluator acknowledges a QoS 1 message to the broker only after the
statement storing it committed, and keeps a persistent MQTT session under a
fixed client id. So a kill -9 (no cleanup, no DISCONNECT) leaves every
message it had not stored with the broker, which hands them, and whatever
arrived while no evaluator was connected, to the next process with the same
PULSE_EVALUATOR_ID. Evidence, all from outside the evaluator:

- the database: every device's stored report is its last one ("lost: 0");
- Mosquitto's log: every report was acknowledged exactly once by the
  evaluator's client id; the reports the killed process held
  unacknowledged were delivered again (DUP) to its successor.

The second test kills the evaluator while the database is stalled and it
holds every report of the flood (fewer than its window): none is stored or
acknowledged, so every last report must come from the broker redelivering
it. An evaluator that acknowledged on receipt would lose all of them.
"""

from __future__ import annotations

import pytest

from server.db import Database
from tests.faults.conftest import (
    EvaluatorFactory,
    Mosquitto,
    ReportFlood,
    Stall,
    flooding,
    lost_devices,
    seed_fleet,
    stored_count,
    until_all_last,
    wait_for,
    waiting_on_device_state,
)

pytestmark = pytest.mark.timeout(90)

DEVICES = 50
REPORTS = 200


async def test_an_evaluator_killed_mid_flood_loses_no_report(
    mosquitto: Mosquitto, evaluators: EvaluatorFactory, dsn: str, db: Database
) -> None:
    fleet = await seed_fleet(dsn, DEVICES)
    evaluator = evaluators(mosquitto.url, "faults-kill")
    assert (await evaluator.start()).protocol == "5"
    log = mosquitto.log
    # Devices wait halfway until the kill: it happens mid-flood whatever the
    # relative speeds, and the rest of the flood finds no evaluator.
    flood = ReportFlood(mosquitto.port, fleet, REPORTS, hold_at=REPORTS // 2)
    async with flooding(flood):

        async def some_stored() -> bool:
            return await stored_count(db, fleet) >= 10 * DEVICES

        await wait_for(some_stored, what="the first reports being stored")
        await evaluator.kill()
        stored_at_kill = await stored_count(db, fleet)
        published_at_kill = flood.published
        held_at_kill = log.refresh().unacknowledged(evaluator.client_id)
        assert 0 < stored_at_kill < flood.total
        flood.go.set()
        # Part of the flood reaches the broker while no evaluator is there.
        await wait_for(
            lambda: flood.published >= published_at_kill + flood.total // 4,
            what="a quarter of the flood published to the broker alone",
        )
        resumed = await evaluator.start()
        assert resumed.session == "resumed", resumed
    assert flood.done  # every report PUBACKed by the broker

    acked = await wait_for(
        lambda: log.refresh().acked[evaluator.client_id] >= flood.total,
        what="the evaluator acknowledging every report",
    )

    await until_all_last(db, flood, "every device's last report being stored")
    lost = await lost_devices(db, flood)
    print(
        f"\nkill mid-flood: {flood.total} reports, stored at kill {stored_at_kill}, "
        f"published at kill {published_at_kill}, held unacknowledged at kill {held_at_kill} "
        f"(peaks per connection {log.peaks[evaluator.client_id]}), "
        f"sent {log.sent[evaluator.client_id]}, "
        f"redelivered {log.redelivered[evaluator.client_id]}, "
        f"acknowledged {log.acked[evaluator.client_id]} ({acked:.1f}s after the flood), "
        f"lost: {len(lost)}"
    )
    assert lost == []
    # Each report acknowledged once (the broker forgets it on the first), so
    # every report was stored or refused for good by one of the processes.
    # (How often each was sent is no invariant: a send Mosquitto logged just
    # as the connection died is sent again without the DUP flag.)
    assert log.acked[evaluator.client_id] == flood.total


STALL_DEVICES = 40
STALL_REPORTS = 20  # 800 in all, within the evaluator's window of 1000


async def test_an_evaluator_killed_while_the_database_stalls_loses_no_report(
    mosquitto: Mosquitto,
    evaluators: EvaluatorFactory,
    dsn: str,
    db: Database,
    stall: Stall,
) -> None:
    fleet = await seed_fleet(dsn, STALL_DEVICES)
    evaluator = evaluators(mosquitto.url, "faults-kill-stalled")
    await evaluator.start()
    log = mosquitto.log
    await stall.hold()
    flood = ReportFlood(mosquitto.port, fleet, STALL_REPORTS)
    async with flooding(flood):
        pass
    await wait_for(
        lambda: log.refresh().sent[evaluator.client_id] == flood.total,
        what="the broker handing the evaluator every report",
    )
    await wait_for(
        lambda: waiting_on_device_state(db), what="the evaluator's write waiting on the lock"
    )
    assert log.refresh().acked[evaluator.client_id] == 0
    assert await stored_count(db, fleet) == 0

    await evaluator.kill()
    await stall.release()
    resumed = await evaluator.start()
    assert resumed.session == "resumed", resumed

    caught_up = await until_all_last(db, flood, "every device's last report being stored")
    await wait_for(
        lambda: log.refresh().acked[evaluator.client_id] == flood.total,
        what="the evaluator acknowledging every report",
    )
    lost = await lost_devices(db, flood)
    print(
        f"\nkill while stalled: {flood.total} reports held by the killed evaluator, "
        f"sent {log.sent[evaluator.client_id]}, "
        f"redelivered {log.redelivered[evaluator.client_id]}, "
        f"stored {caught_up:.1f}s after the restart, lost: {len(lost)}"
    )
    assert lost == []
    assert log.redelivered[evaluator.client_id] == flood.total
