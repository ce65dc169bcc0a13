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
    #: When the evaluator received the message.
    at: datetime
    #: The device's sequence number, when its message carried one: then the
    #: signal is ordered against the others (docs/device-ordering.md).
    seq: int | None = None
    #: The newest receipt time of other messages folded into this signal
    #: (evaluator/liveness.py): last_seen_at moves to it as well, also when
    #: this signal is a will.
    seen: datetime | None = None


@dataclass(frozen=True, slots=True)
class Applied:
    #: The events inserted.
    transitions: list[Transition]
    #: Signals with a seq that lost to a newer one already applied.
    out_of_order: int


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
# status this statement actually replaces, and `decides` is judged against
# the newest liveness_seq / session_seq.
#
# A signal without seq decides the status as it always has. With seq
# (docs/device-ordering.md): online and offline only when newer than the
# status message applied last (liveness_seq); a will when it belongs to the
# current session (its seq, the seq of its session's online, is not below
# session_seq); activity only revives UNKNOWN or STALE, and only when newer
# than the last status message: ending OFFLINE takes an online. Every signal
# but a will moves last_seen_at, in order or not: it records when the
# device was last heard from, and only the status is a matter of order.
_APPLY_SIGNALS = f"""
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[],
                         $5::bigint[], $6::timestamptz[])
        AS i(tenant_id, device_id, signal, at, seq, seen)
), locked AS (
    SELECT s.tenant_id, s.device_id, s.status AS prev, s.last_seen_at AS prev_seen,
           i.signal, i.at, i.seq, i.seen,
           CASE WHEN i.seq IS NULL THEN true
                WHEN i.signal = 'will' THEN s.session_seq IS NULL OR i.seq >= s.session_seq
                WHEN i.signal = 'activity' THEN s.status IN ('UNKNOWN', 'STALE')
                     AND (s.liveness_seq IS NULL OR i.seq > s.liveness_seq)
                ELSE s.liveness_seq IS NULL OR i.seq > s.liveness_seq
           END AS decides
    FROM input i
    JOIN device_state s ON s.tenant_id = i.tenant_id AND s.device_id = i.device_id
    JOIN devices d ON d.tenant_id = i.tenant_id AND d.device_id = i.device_id
    WHERE d.lifecycle = 'ACTIVE'
    ORDER BY s.tenant_id, s.device_id
    FOR NO KEY UPDATE OF s
), decided AS (
    SELECT l.*,
           CASE WHEN NOT l.decides THEN l.prev
                WHEN l.signal IN ('offline', 'will') THEN 'OFFLINE'
                ELSE 'ONLINE' END AS next,
           -- Status messages with a seq that decide move the order on.
           l.decides AND l.seq IS NOT NULL AND l.signal <> 'activity' AS ordered
    FROM locked l
), updated AS (
    UPDATE device_state s
    SET status = d.next,
        -- The will is the broker speaking, not the device: not a sign of life.
        last_seen_at = greatest(s.last_seen_at,
                                CASE WHEN d.signal <> 'will' THEN d.at END, d.seen),
        liveness_seq = CASE WHEN d.ordered THEN greatest(s.liveness_seq, d.seq)
                            ELSE s.liveness_seq END,
        session_seq = CASE WHEN d.ordered AND d.signal = 'online' THEN d.seq
                           ELSE s.session_seq END
    FROM decided d
    WHERE s.tenant_id = d.tenant_id AND s.device_id = d.device_id
      AND (d.next <> d.prev OR d.signal <> 'will' OR d.seen IS NOT NULL OR d.ordered)
    RETURNING s.tenant_id, s.device_id, d.prev, d.next, d.signal, d.at, d.prev_seen
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
), lost AS (
    SELECT count(*) FILTER (WHERE NOT l.decides AND l.seq IS NOT NULL
                                  AND l.signal <> 'activity') AS out_of_order
    FROM locked l
)
-- One row even when nothing was inserted, to carry the count; the
-- notification subquery then finds no events and notifies nobody.
SELECT e.*, lost.out_of_order, {_NOTIFY} AS notified
FROM lost LEFT JOIN events e ON true
ORDER BY e.event_id
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
    return (await apply(con, signals)).transitions


async def apply(con: Connection, signals: Sequence[DeviceSignal]) -> Applied:
    """apply_signals, also counting the signals that lost to newer ones."""
    keys = {(s.tenant_id, s.device_id) for s in signals}
    if len(keys) != len(signals):
        raise ValueError("apply_signals takes at most one signal per device")
    rows = await con.fetch(
        _APPLY_SIGNALS,
        [s.tenant_id for s in signals],
        [s.device_id for s in signals],
        [s.signal.value for s in signals],
        [s.at for s in signals],
        [s.seq for s in signals],
        [s.seen for s in signals],
    )
    return Applied(
        transitions=[
            Transition(
                event_id=r["event_id"],
                tenant_id=r["tenant_id"],
                device_id=r["device_id"],
                event_type=r["event_type"],
                previous_status=r["previous_status"],
                status=r["status"],
            )
            for r in rows
            if r["event_id"] is not None
        ],
        out_of_order=rows[0]["out_of_order"] if rows else 0,
    )


async def sweep(con: Connection, *, now: datetime, stale_after_s: float) -> int:
    """Mark ONLINE devices silent since before `now - stale_after_s` STALE; return how many."""
    cutoff = now - timedelta(seconds=stale_after_s)
    count = await con.fetchval(_SWEEP, cutoff, now, stale_after_s)
    return int(count or 0)
