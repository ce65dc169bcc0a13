"""The evaluator's writes: status transitions and their events, fleet-wide.

Every function here is one statement across all tenants, run as the
`pulse_evaluator` role (migrations/0004): the status change, the event row and
the NOTIFY for watchers commit together or not at all, so there is never an
event without its transition or a transition without its event.

Two evaluators may run the same statement at once. Each transition is a
conditional UPDATE (`WHERE status <> new`); PostgreSQL re-checks that
condition against the newest row version after waiting for a concurrent
writer's lock, so the second writer finds nothing left to change and inserts
no event. Rows are locked in (tenant_id, device_id) order, the same in every
statement that locks more than one, so two flushes cannot deadlock each
other; the sweep locks in last_seen order, and a deadlock between it and a
flush is retried by the caller (server/transient.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.connectivity.model import CHANNEL, EVENT_WRITER_LOCK, Signal
from server.db import Connection, Database

EVALUATOR_ROLE = "pulse_evaluator"


def fleet(db: Database) -> AbstractAsyncContextManager[Connection]:
    """A transaction as pulse_evaluator: every tenant's device_state, no tenant scope.

    It announces itself as an event writer (EVENT_WRITER_LOCK) in its first
    round trip, before any write gives it a transaction id; every insert of
    events must happen in such a transaction, or watchers could miss it.
    """
    return db.transaction(
        f"BEGIN; SET LOCAL ROLE {EVALUATOR_ROLE}; "
        f"SELECT pg_advisory_xact_lock_shared({EVENT_WRITER_LOCK})"
    )


@dataclass(frozen=True, slots=True)
class DeviceSignal:
    tenant_id: uuid.UUID
    device_id: str
    signal: Signal
    at: datetime


@dataclass(frozen=True, slots=True)
class Transition:
    """An event a statement inserted (with the status change it records)."""

    event_id: int
    tenant_id: uuid.UUID
    device_id: str
    event_type: str
    previous_status: str
    status: str


# Announces the committed events to watch streams: one notification per
# tenant, sent at commit. A scalar subquery without correlation runs once, on
# the first row, so a statement that inserted nothing notifies nobody.
_NOTIFY = f"""
    (SELECT count(pg_notify('{CHANNEL}', t.tenant_id::text))
     FROM (SELECT DISTINCT tenant_id FROM events) t)
"""

# One signal per device (the caller splits repeats into rounds). The locked
# CTE reads each row's current status under a row lock taken in key order;
# a concurrent writer's change is waited for and re-read, so `prev` is the
# status this statement actually replaces.
_APPLY_SIGNALS = f"""
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[])
        AS i(tenant_id, device_id, signal, at)
), locked AS (
    SELECT s.tenant_id, s.device_id, s.status AS prev, s.last_seen_at AS prev_seen,
           i.signal, i.at,
           CASE WHEN i.signal IN ('offline', 'will') THEN 'OFFLINE' ELSE 'ONLINE' END AS next
    FROM input i
    JOIN device_state s ON s.tenant_id = i.tenant_id AND s.device_id = i.device_id
    JOIN devices d ON d.tenant_id = i.tenant_id AND d.device_id = i.device_id
    WHERE d.lifecycle = 'ACTIVE'
    ORDER BY s.tenant_id, s.device_id
    FOR NO KEY UPDATE OF s
), updated AS (
    UPDATE device_state s
    SET status = l.next,
        -- The will is the broker speaking, not the device: not a sign of life.
        last_seen_at = CASE WHEN l.signal = 'will' THEN s.last_seen_at
                            ELSE greatest(s.last_seen_at, l.at) END
    FROM locked l
    WHERE s.tenant_id = l.tenant_id AND s.device_id = l.device_id
      AND (l.next <> l.prev OR l.signal <> 'will')
    RETURNING s.tenant_id, s.device_id, l.prev, l.next, l.signal, l.at, l.prev_seen
), events AS (
    INSERT INTO connection_events
        (tenant_id, device_id, event_type, occurred_at, previous_status, status, trigger, details)
    SELECT u.tenant_id, u.device_id,
           CASE u.signal WHEN 'offline' THEN 'DISCONNECTED'
                         WHEN 'will' THEN 'CONNECTION_LOST'
                         ELSE 'CONNECTED' END,
           u.at, u.prev, u.next,
           CASE WHEN u.signal = 'online' THEN 'status_online'
                WHEN u.signal = 'offline' THEN 'status_offline'
                WHEN u.signal = 'will' THEN 'last_will'
                WHEN u.prev = 'UNKNOWN' THEN 'first_seen'
                ELSE 'heartbeat_resumed' END,
           jsonb_strip_nulls(jsonb_build_object('last_seen_at', u.prev_seen))
    FROM updated u
    WHERE u.next <> u.prev
    RETURNING event_id, tenant_id, device_id, event_type, previous_status, status
)
SELECT e.*, {_NOTIFY} AS notified FROM events e ORDER BY e.event_id
"""

# The sweep. The partial index on ONLINE devices' last_seen_at makes the
# WHERE clause an index range holding exactly the devices that go stale, so
# an idle sweep reads one index page. A heartbeat flushed concurrently moves
# last_seen_at; the re-check after its lock then excludes the row.
_SWEEP = f"""
WITH stale AS (
    UPDATE device_state s SET status = 'STALE'
    WHERE s.status = 'ONLINE' AND s.last_seen_at < $1
    RETURNING s.tenant_id, s.device_id, s.last_seen_at
), events AS (
    INSERT INTO connection_events
        (tenant_id, device_id, event_type, occurred_at, previous_status, status, trigger, details)
    SELECT tenant_id, device_id, 'CONNECTION_LOST', $2, 'ONLINE', 'STALE', 'heartbeat_timeout',
           jsonb_build_object('last_seen_at', last_seen_at, 'threshold_s', $3::float8)
    FROM stale
    RETURNING tenant_id
)
SELECT count(*) AS n, {_NOTIFY} AS notified FROM events
"""


async def apply_signals(con: Connection, signals: Sequence[DeviceSignal]) -> list[Transition]:
    """Apply at most one signal per device; return the events inserted.

    Signals of unknown or decommissioned devices change nothing.
    """
    keys = {(s.tenant_id, s.device_id) for s in signals}
    if len(keys) != len(signals):
        raise ValueError("apply_signals takes at most one signal per device")
    rows = await con.fetch(
        _APPLY_SIGNALS,
        [s.tenant_id for s in signals],
        [s.device_id for s in signals],
        [s.signal.value for s in signals],
        [s.at for s in signals],
    )
    return [
        Transition(
            event_id=r["event_id"],
            tenant_id=r["tenant_id"],
            device_id=r["device_id"],
            event_type=r["event_type"],
            previous_status=r["previous_status"],
            status=r["status"],
        )
        for r in rows
    ]


async def sweep(con: Connection, *, now: datetime, stale_after_s: float) -> int:
    """Mark ONLINE devices silent since before `now - stale_after_s` STALE; return how many."""
    cutoff = now - timedelta(seconds=stale_after_s)
    count = await con.fetchval(_SWEEP, cutoff, now, stale_after_s)
    return int(count or 0)
