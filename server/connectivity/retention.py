"""Retention of the event logs (connection events, group membership events):
the one way events are ever removed.

Run by the tables' owner (`pulse retention`, e.g. daily from cron or a
Kubernetes CronJob), never by the API: the service roles have no DELETE
grant, and the append-only trigger refuses anyone but the owner. Deletes go
in batches, each its own short transaction, so locks stay brief and vacuum
can reclaim space while the job runs.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Literal

import asyncpg

log = logging.getLogger(__name__)

BATCH = 10_000
Log = Literal["connection_events", "membership_events"]
LOGS: tuple[Log, ...] = ("connection_events", "membership_events")


async def purge(
    dsn: str,
    *,
    older_than_days: int,
    batch: int = BATCH,
    now: datetime | None = None,
    log_table: Log = "connection_events",
) -> int:
    """Delete the events of `log_table` older than `older_than_days`; return
    how many. `dsn` must log in as the owner of the table.

    A watch resuming from a cursor older than what is kept misses what was
    removed: keep more than the longest a watcher may stay away."""
    if log_table not in LOGS:
        raise ValueError(f"not an event log: {log_table!r}")
    if older_than_days < 1:
        raise ValueError("retention must keep at least one day of events")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=older_than_days)
    con = await asyncpg.connect(dsn)
    total = 0
    try:
        while True:
            # The BRIN index on occurred_at finds the old rows; the key
            # lookup deletes them; LIMIT bounds each transaction.
            status = await con.execute(
                f"""
                DELETE FROM {log_table} WHERE event_id IN (
                    SELECT event_id FROM {log_table} WHERE occurred_at < $1 LIMIT $2
                )
                """,
                cutoff,
                batch,
            )
            deleted = int(status.rsplit(" ", 1)[-1])
            total += deleted
            if deleted < batch:
                break
    finally:
        await con.close()
    log.info("retention: deleted %d %s older than %s", total, log_table, cutoff.isoformat())
    return total
