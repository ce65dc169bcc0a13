"""Delivery order for append-only event logs written by concurrent transactions
(the connectivity log, membership events): positions and the horizon.

Events are delivered in (xact, event_id) order, and only below a horizon H
before which no event can be committed any more (docs/connectivity.md,
"Out-of-order commits"). Taking H as the snapshot's xmin would be correct but
would make every stream wait for the oldest write transaction in the whole
cluster, whatever it does. Only a log's writers matter, and each takes the
log's writer lock, shared, before it has an xid, so:

  1. `writers`, at t1: B = the next xid to be assigned, and the xids of the
     writers holding the lock. A writer not among them either finished
     before t1 or had no xid yet, and then gets one >= B.
  2. The read, with a snapshot at t2 > t1: H = min(B, the xids of those
     writers still running at t2). Below H, every writer has finished
     (committed: visible at t2; aborted: no events), so nothing can ever
     be inserted behind a reader that moves up to H.
"""

from __future__ import annotations

from typing import NamedTuple

from server.db import Connection


class Position(NamedTuple):
    """A place in a tenant's delivery order: (inserting transaction, event id).

    `Position(h, 0)` stands for "everything from transactions older than h".
    """

    xact: int
    event_id: int


START = Position(0, 0)

_WRITERS = """
WITH locks AS MATERIALIZED (
    SELECT locktype, virtualtransaction, classid, objid, objsubid, transactionid, granted
    FROM pg_locks WHERE locktype IN ('advisory', 'transactionid')
)
SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS bound,
       ARRAY(SELECT t.transactionid::text::bigint
             FROM locks a JOIN locks t USING (virtualtransaction)
             WHERE a.locktype = 'advisory' AND a.classid = $1::oid AND a.objid = $2::oid
               AND a.objsubid = $3 AND t.locktype = 'transactionid' AND t.granted) AS writers
"""

HORIZON_SQL = """
(SELECT least($1::bigint, min(x::text::bigint))
 FROM pg_snapshot_xip(pg_current_snapshot()) x
 WHERE x::xid::text::bigint = ANY($2::bigint[]))
"""
"""The horizon at the statement's snapshot; binds $1 (bound) and $2 (writers)."""


def pending_sql(table: str) -> str:
    """Whether `table` holds events of the tenant bound as $3 at or beyond
    `h.horizon`: events committed but held back by the horizon.

    max() walks the (tenant_id, xact, event_id) index backwards; an EXISTS on
    xact >= horizon was planned as a scan of the whole table once it had
    statistics (found by bench/membership.py).
    """
    return (
        f"coalesce((SELECT max(x.xact) FROM {table} x WHERE x.tenant_id = $3) >= h.horizon, false)"
    )


class WriterLock(NamedTuple):
    """An advisory lock as pg_locks shows it."""

    classid: int
    objid: int
    #: 1: taken by one bigint key; 2: by two integer keys.
    objsubid: int

    @classmethod
    def of_bigint(cls, key: int) -> WriterLock:
        return cls(key >> 32, key & 0xFFFFFFFF, 1)


async def writers(con: Connection, lock: WriterLock) -> tuple[int, list[int]]:
    """Step 1: (bound, xids of the writers holding `lock`), to bind as $1 and $2
    of a later statement that computes HORIZON_SQL."""
    row = await con.fetchrow(_WRITERS, *lock)
    assert row is not None
    return int(row["bound"]), list(row["writers"])


async def horizon(con: Connection, lock: WriterLock) -> int:
    """The current horizon: no event can be committed before Position(horizon, 0)."""
    bound, xids = await writers(con, lock)
    value = await con.fetchval(f"SELECT {HORIZON_SQL}", bound, xids)
    return int(value)
