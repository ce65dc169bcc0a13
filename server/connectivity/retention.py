"""Retention of the connectivity log: the one way events are ever removed.

Run by the table's owner (`pulse retention`, e.g. daily from cron or a
Kubernetes CronJob), never by the API: the service roles have no DELETE
grant, and the append-only trigger refuses anyone but the owner. Deletes go
in batches, each its own short transaction, so locks stay brief and vacuum
can reclaim space while the job runs.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import asyncpg

log = logging.getLogger(__name__)

BATCH = 10_000


async def purge(
    dsn: str, *, older_than_days: int, batch: int = BATCH, now: datetime | None = None
) -> int:
    """Delete events older than `older_than_days`; return how many. `dsn` must
    log in as the owner of connection_events."""
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
                """
                DELETE FROM connection_events WHERE event_id IN (
                    SELECT event_id FROM connection_events WHERE occurred_at < $1 LIMIT $2
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
    log.info("retention: deleted %d events older than %s", total, cutoff.isoformat())
    return total
