"""A stalled database holds the evaluator to its window, and loses nothing
once it is back.

While its writes are blocked (the test holds `LOCK TABLE device_state IN
EXCLUSIVE MODE`, which the twin ingest and liveness statements wait on),
the evaluator acknowledges nothing, so the broker sends it at most its MQTT 5
receive maximum (PULSE_EVALUATOR_INFLIGHT, 1000) and keeps the rest of a
10,000-report burst itself. Proved from outside the evaluator:

- Mosquitto's log: reports sent to the evaluator during the stall, at most
  the window; none acknowledged;
- the database: nothing stored during the stall;
- the evaluator's RSS (psutil, sampled every 20 ms): within a bound that an
  evaluator holding the whole burst would exceed. Each report carries 4 KiB
  of padding: measured on a 2-core machine, the RSS grows by 5-8 MB during
  the stall with the window of 1,000, and by 62 MB when the window is
  opened to 65,535 (the evaluator then holds all 10,000); the bound, 32 MB,
  sits between the two;
- after the lock is released: every device's last report is stored, every
  report acknowledged exactly once, none redelivered.

Once acknowledgements flow again, Mosquitto 2.0.x sends the backlog past the
receive maximum; the evaluator stops reading its socket while it holds more
than its window, so the bound holds while it catches up too.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from server.db import Database
from tests.faults.conftest import (
    EvaluatorFactory,
    Mosquitto,
    ReportFlood,
    Stall,
    flooding,
    lost_devices,
    rss_sampler,
    seed_fleet,
    stored_count,
    until_all_last,
    wait_for,
    waiting_on_device_state,
)

pytestmark = pytest.mark.timeout(90)

DEVICES = 100
REPORTS = 100
INFLIGHT = 1000
PAD = 4096
MB = 1 << 20
#: RSS growth allowed over the idle evaluator's during the stall: measured
#: +5-8 MB holding the window of 1,000, +62 MB holding all 10,000 reports.
RSS_BOUND = 32 * MB
#: After the window filled, the broker is given this long to show that it
#: sends no more (it would have sent the rest at once).
QUIET_S = 0.5


async def test_a_stalled_database_bounds_what_the_evaluator_holds(
    mosquitto: Mosquitto,
    evaluators: EvaluatorFactory,
    dsn: str,
    db: Database,
    stall: Stall,
) -> None:
    fleet = await seed_fleet(dsn, DEVICES)
    evaluator = evaluators(mosquitto.url, "faults-stall", inflight=INFLIGHT)
    await evaluator.start()
    log = mosquitto.log
    client = evaluator.client_id
    baseline = evaluator.rss()
    samples: list[int] = []

    await stall.hold()
    flood = ReportFlood(mosquitto.port, fleet, REPORTS, pad=PAD)
    with rss_sampler(evaluator, samples):
        async with flooding(flood):
            pass
        await wait_for(
            lambda: log.refresh().sent[client] >= INFLIGHT,
            what="the broker filling the evaluator's window",
        )
        await wait_for(
            lambda: waiting_on_device_state(db), what="the evaluator's write waiting on the lock"
        )
        await asyncio.sleep(QUIET_S)
        sent_during_stall = log.refresh().sent[client]
        acked_during_stall = log.acked[client]
        stored_during_stall = await stored_count(db, fleet)
    peak = max(samples)

    released, cpu_before = time.monotonic(), evaluator.cpu_s()
    catching_up: list[int] = []
    with rss_sampler(evaluator, catching_up):
        await stall.release()
        await until_all_last(db, flood, "every device's last report being stored")
    caught_up, cpu = time.monotonic() - released, evaluator.cpu_s() - cpu_before
    await wait_for(
        lambda: log.refresh().acked[client] == flood.total,
        what="the evaluator acknowledging every report",
    )
    lost = await lost_devices(db, flood)
    print(
        f"\nstall: {flood.total} reports of {len(flood.payload(1))} bytes; during the stall "
        f"the broker sent {sent_during_stall}, acknowledged {acked_during_stall}, "
        f"stored {stored_during_stall}; RSS baseline {baseline / MB:.1f} MB, "
        f"peak {peak / MB:.1f} MB (+{(peak - baseline) / MB:.1f} MB, {len(samples)} samples); "
        f"caught up {caught_up:.1f}s after the release, using {cpu:.1f}s of CPU (RSS peak "
        f"{max(catching_up) / MB:.1f} MB, most reports unacknowledged at once "
        f"{log.peaks[client]}); lost: {len(lost)}"
    )
    assert sent_during_stall <= INFLIGHT
    assert acked_during_stall == 0
    assert stored_during_stall == 0
    assert peak - baseline < RSS_BOUND
    assert lost == []
    assert log.acked[client] == flood.total
    assert log.sent[client] == flood.total
    assert log.redelivered[client] == 0
    # Mosquitto 2.0.x sends past the receive maximum once acknowledgements
    # flow while messages are queued (db__message_delete_outgoing moves queued
    # messages into flight on each PUBACK); the evaluator then stops reading
    # its socket until it is back under its window, so its memory stays
    # bounded while it catches up too.
    assert max(catching_up) - baseline < RSS_BOUND
