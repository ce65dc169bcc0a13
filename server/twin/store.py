"""All SQL for device twins: the API's reads and writes, the evaluator's
batched ingest of reported state, and the desired-state outbox.

Tenant functions run on a tenant-scoped connection (`Database.tenant`) and
also name the tenant, so the primary key is used and RLS is a second fence.
The outbox functions run on the owner's connection (`Database.admin`): the
outbox queue spans tenants (see migrations/0003_twin.sql).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pulse.device.v1.error_reason_pb2 import ErrorReason

from server import wire
from server.db import Connection, Database
from server.errors import FailedPrecondition, NotFound

# Any constant works, as long as every drainer uses the same one and the
# migration lock's differs.
_OUTBOX_LOCK = 0x7477696E6F7574  # "twinout"


def channel(tenant_id: uuid.UUID) -> str:
    """The NOTIFY channel announcing twin changes of one tenant.

    Payload: `device_id:revision` items joined by "," (server/twin/notify.py).
    """
    return f"twin_{tenant_id.hex}"


async def notify(con: Connection, notices: Sequence[tuple[str, str]]) -> None:
    """Send (channel, payload) notifications in one round trip, outside any
    data transaction (autocommit on a plain pool connection).

    Notifications are hints that something committed, so this transaction
    commits asynchronously: PostgreSQL holds a database-wide lock from a
    notifying transaction's commit until its WAL flush, and waiting for the
    disk under that lock would queue every writer behind every other.
    """
    await con.execute(
        """
        WITH async AS (SELECT set_config('synchronous_commit', 'off', true)),
             sent AS (SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS n(c, p))
        SELECT (SELECT count(*) FROM async) + (SELECT count(*) FROM sent)
        """,
        [c for c, _ in notices],
        [p for _, p in notices],
    )


@dataclass(frozen=True, slots=True)
class TwinRecord:
    device_id: str
    desired: dict[str, Any]
    reported: dict[str, Any]
    desired_version: int
    reported_version: int
    desired_updated_at: datetime | None
    reported_updated_at: datetime | None
    status: str
    revision: int


_TWIN_COLUMNS = """
    s.device_id, s.desired, s.reported, s.desired_version, s.reported_version,
    s.desired_updated_at, s.reported_updated_at, s.status, s.twin_revision AS revision
"""


def _twin(row: Any) -> TwinRecord:
    return TwinRecord(
        device_id=row["device_id"],
        desired=row["desired"],
        reported=row["reported"],
        desired_version=row["desired_version"],
        reported_version=row["reported_version"],
        desired_updated_at=row["desired_updated_at"],
        reported_updated_at=row["reported_updated_at"],
        status=row["status"],
        revision=row["revision"],
    )


async def get_twin(con: Connection, tenant_id: uuid.UUID, device_id: str) -> TwinRecord:
    row = await con.fetchrow(
        f"SELECT {_TWIN_COLUMNS} FROM device_state s WHERE s.tenant_id = $1 AND s.device_id = $2",
        tenant_id,
        device_id,
    )
    if row is None:
        raise NotFound("device", device_id)
    return _twin(row)


async def get_twins(
    con: Connection, tenant_id: uuid.UUID, device_ids: Sequence[str]
) -> list[TwinRecord]:
    """The twins of those of `device_ids` that exist, in device_id order."""
    rows = await con.fetch(
        f"""
        SELECT {_TWIN_COLUMNS} FROM device_state s
        WHERE s.tenant_id = $1 AND s.device_id = any($2::text[])
        ORDER BY s.device_id
        """,
        tenant_id,
        list(device_ids),
    )
    return [_twin(r) for r in rows]


def version_mismatch(device_id: str, expected: int, current: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"desired state of device {device_id!r} is at version {current}, not {expected}; "
        "read it again and retry",
        reason=ErrorReason.VERSION_MISMATCH,
        metadata={
            "device": device_id,
            "expected_version": str(expected),
            "current_version": str(current),
        },
        subject=f"devices/{device_id}/twin",
    )


def _decommissioned(device_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"device {device_id!r} is decommissioned and its twin cannot be changed",
        reason=ErrorReason.DEVICE_DECOMMISSIONED,
        metadata={"device": device_id},
        subject=f"devices/{device_id}",
    )


async def write_desired(
    con: Connection,
    tenant_id: uuid.UUID,
    device_id: str,
    desired: dict[str, Any],
    *,
    expected_version: int | None,
) -> TwinRecord:
    """Replace the desired document if its version is still `expected_version`
    (None: whatever it is), in one conditional UPDATE that also queues the
    publication (the outbox row commits with it, or not at all).

    Raises NotFound, or FailedPrecondition (VERSION_MISMATCH with the current
    version, DEVICE_DECOMMISSIONED).
    """
    row = await con.fetchrow(
        f"""
        WITH s AS (
            UPDATE device_state s
            SET desired = $3,
                desired_version = s.desired_version + 1,
                desired_updated_at = now(),
                twin_revision = s.twin_revision + 1
            FROM devices d
            WHERE s.tenant_id = $1 AND s.device_id = $2
              AND ($4::bigint IS NULL OR s.desired_version = $4::bigint)
              AND d.tenant_id = s.tenant_id AND d.device_id = s.device_id
              AND d.lifecycle = 'ACTIVE'
            RETURNING s.*
        ), queued AS (
            INSERT INTO twin_outbox (tenant_id, device_id, desired_version)
            SELECT tenant_id, device_id, desired_version FROM s
        )
        SELECT {_TWIN_COLUMNS} FROM s
        """,
        tenant_id,
        device_id,
        desired,
        expected_version,
    )
    if row is not None:
        return _twin(row)
    # Only failures pay for this second read. The version it reports is the
    # one that made the write fail, or a later one.
    found = await con.fetchrow(
        """
        SELECT s.desired_version, d.lifecycle
        FROM devices d JOIN device_state s USING (tenant_id, device_id)
        WHERE d.tenant_id = $1 AND d.device_id = $2
        """,
        tenant_id,
        device_id,
    )
    if found is None:
        raise NotFound("device", device_id)
    if found["lifecycle"] != "ACTIVE":
        raise _decommissioned(device_id)
    assert expected_version is not None
    raise version_mismatch(device_id, expected_version, found["desired_version"])


@dataclass(frozen=True, slots=True)
class DesiredWrite:
    device_id: str
    desired: dict[str, Any]
    expected_version: int


async def write_desired_many(
    con: Connection, tenant_id: uuid.UUID, writes: Sequence[DesiredWrite]
) -> dict[str, tuple[int, int]]:
    """`write_desired` for a batch (a rollout's), in one statement: the same
    conditional UPDATE, and an outbox row for each device written.

    (desired version, twin revision) of each device written; one left out
    was not: it does not exist, is decommissioned, or its version moved on.
    """
    rows = await con.fetch(
        """
        WITH w AS (
            SELECT * FROM unnest($2::text[], $3::jsonb[], $4::bigint[])
                AS w(device_id, desired, expected_version)
        ), s AS (
            UPDATE device_state s
            SET desired = w.desired,
                desired_version = s.desired_version + 1,
                desired_updated_at = now(),
                twin_revision = s.twin_revision + 1
            FROM w, devices d
            WHERE s.tenant_id = $1 AND s.device_id = ANY($2::text[])
              AND s.device_id = w.device_id AND s.desired_version = w.expected_version
              AND d.tenant_id = s.tenant_id AND d.device_id = s.device_id
              AND d.lifecycle = 'ACTIVE'
            RETURNING s.tenant_id, s.device_id, s.desired_version, s.twin_revision
        ), queued AS (
            INSERT INTO twin_outbox (tenant_id, device_id, desired_version)
            SELECT tenant_id, device_id, desired_version FROM s
        )
        SELECT device_id, desired_version, twin_revision FROM s
        """,
        tenant_id,
        [w.device_id for w in writes],
        [w.desired for w in writes],
        [w.expected_version for w in writes],
    )
    return {r["device_id"]: (r["desired_version"], r["twin_revision"]) for r in rows}


async def lock_desired(
    con: Connection, tenant_id: uuid.UUID, device_id: str
) -> tuple[dict[str, Any], int]:
    """The desired document and version, row-locked until the transaction
    ends, so a read-modify-write in the same transaction cannot interleave
    with another writer."""
    row = await con.fetchrow(
        """
        SELECT s.desired, s.desired_version, d.lifecycle
        FROM device_state s JOIN devices d USING (tenant_id, device_id)
        WHERE s.tenant_id = $1 AND s.device_id = $2
        FOR UPDATE OF s
        """,
        tenant_id,
        device_id,
    )
    if row is None:
        raise NotFound("device", device_id)
    if row["lifecycle"] != "ACTIVE":
        raise _decommissioned(device_id)
    return row["desired"], row["desired_version"]


@dataclass(frozen=True, slots=True)
class LockedDesired:
    device_id: str
    desired: dict[str, Any]
    desired_version: int
    lifecycle: str


async def lock_desired_many(
    con: Connection, tenant_id: uuid.UUID, device_ids: Sequence[str]
) -> dict[str, LockedDesired]:
    """`lock_desired` for many devices in one statement, locked in key order
    (as the ingest locks them); devices that do not exist are left out."""
    rows = await con.fetch(
        """
        SELECT s.device_id, s.desired, s.desired_version, d.lifecycle
        FROM device_state s JOIN devices d USING (tenant_id, device_id)
        WHERE s.tenant_id = $1 AND s.device_id = ANY($2::text[])
        ORDER BY s.device_id
        FOR UPDATE OF s
        """,
        tenant_id,
        list(device_ids),
    )
    return {r["device_id"]: LockedDesired(**dict(r.items())) for r in rows}


# --- reported state (the evaluator's ingest) ------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    """One device message: its reported document, already checked and
    serialised as JSON text, the desired version it applied, and the
    device's sequence number if it sent one (docs/device-ordering.md)."""

    device_id: str
    document: str
    desired_version: int
    seq: int | None = None


# Outcomes of ingest_reported, one per report. The first three are accepted.
APPLIED = "applied"
UNCHANGED = "unchanged"  # same version and document as stored
SUPERSEDED = "superseded"  # a later report of the same batch won
UNKNOWN_TENANT = "unknown_tenant"
UNKNOWN_DEVICE = "unknown_device"
DECOMMISSIONED = "decommissioned"
STALE_VERSION = "stale_version"  # older than the stored reported version
FUTURE_VERSION = "future_version"  # a desired version that was never written
OUT_OF_ORDER = "out_of_order"  # its seq is not above one already applied
ACCEPTED = frozenset({APPLIED, UNCHANGED, SUPERSEDED})


@dataclass(frozen=True, slots=True)
class IngestResult:
    #: Each report's outcome, in order.
    outcomes: list[str]
    #: (device_id, new revision) of each twin changed, for watchers.
    changed: list[tuple[str, int]]


async def ingest_reported(
    con: Connection, tenant_id: uuid.UUID, reports: Sequence[Report]
) -> IngestResult:
    """Store a batch of one tenant's reports in one statement.

    Per device one report wins: the one with the highest seq among those
    that carry one, else (as before seqs) the highest version, the latest
    among equals. Only acceptable reports compete: the device is active, the
    version is neither below the stored reported version (never roll back)
    nor above the desired version (never acknowledge what was not asked),
    and a seq is above the stored `reported_seq` (never let an older message
    win). The winner stores its seq even when its document and version are
    what is stored already: an older, different report processed later must
    still lose. Reports without a seq never touch `reported_seq`.

    The rows are locked in key order and every check is made again on the
    locked row, so concurrent ingests cannot roll each other back.
    """
    rows = await con.fetch(
        """
        WITH m AS (
            SELECT * FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[])
                WITH ORDINALITY AS m(device_id, document, version, seq, ord)
        ), c AS (
            SELECT m.ord, m.device_id, m.document, m.version, m.seq, d.lifecycle,
                   s.reported_version AS stored_version, s.desired_version,
                   s.reported_seq AS stored_seq,
                   d.lifecycle = 'ACTIVE'
                       AND m.version >= s.reported_version AND m.version <= s.desired_version
                       AND (m.seq IS NULL OR s.reported_seq IS NULL OR m.seq > s.reported_seq)
                       AS acceptable
            FROM m
            LEFT JOIN devices d ON d.tenant_id = $1 AND d.device_id = m.device_id
            LEFT JOIN device_state s ON s.tenant_id = $1 AND s.device_id = m.device_id
        ), o AS (
            -- The highest acceptable seq that arrived before each report:
            -- one at or below it would have been refused had the batch been
            -- written a message at a time, so it is out of order, not
            -- merely superseded.
            SELECT c.*, max(c.seq) FILTER (WHERE c.acceptable) OVER (
                       PARTITION BY c.device_id ORDER BY c.ord
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier_seq
            FROM c
        ), best AS (
            -- Reports with a seq before those without: a device that sends
            -- one has said which report is its newest, and one without in
            -- the same batch is from before it did (a firmware update) or
            -- from something that does not know the device's order. Equal
            -- seqs: the first (a redelivery of it is out of order).
            SELECT DISTINCT ON (device_id) ord, device_id, document::jsonb AS document,
                   version, seq
            FROM c
            WHERE acceptable
            ORDER BY device_id, seq DESC NULLS LAST,
                     CASE WHEN seq IS NULL THEN version END DESC,
                     CASE WHEN seq IS NULL THEN ord END DESC, ord
        ), locked AS (
            SELECT b.ord, s.device_id,
                   b.version <> s.reported_version OR b.document <> s.reported AS changed,
                   b.seq IS NULL OR s.reported_seq IS NULL OR b.seq > s.reported_seq AS in_order
            FROM best b
            JOIN device_state s ON s.tenant_id = $1 AND s.device_id = b.device_id
            ORDER BY s.device_id
            FOR NO KEY UPDATE OF s
        ), u AS (
            UPDATE device_state s
            SET reported = b.document,
                reported_version = b.version,
                reported_updated_at = CASE WHEN l.changed THEN now()
                                           ELSE s.reported_updated_at END,
                twin_revision = s.twin_revision + CASE WHEN l.changed THEN 1 ELSE 0 END,
                reported_seq = coalesce(b.seq, s.reported_seq)
            FROM best b JOIN locked l ON l.ord = b.ord
            WHERE s.tenant_id = $1 AND s.device_id = b.device_id
              AND b.version >= s.reported_version AND b.version <= s.desired_version
              AND (b.seq IS NULL OR s.reported_seq IS NULL OR b.seq > s.reported_seq)
              AND (l.changed OR b.seq IS NOT NULL)
            RETURNING b.ord, s.device_id, CASE WHEN l.changed THEN s.twin_revision END AS revision
        )
        SELECT o.ord, o.device_id, o.lifecycle, o.version, o.stored_version, o.desired_version,
               o.seq, o.stored_seq, o.earlier_seq,
               b.ord IS NOT NULL AS chosen, l.in_order, u.revision,
               EXISTS (SELECT 1 FROM tenants) AS tenant_known
        FROM o
        LEFT JOIN best b ON b.ord = o.ord
        LEFT JOIN locked l ON l.ord = o.ord
        LEFT JOIN u ON u.ord = o.ord
        ORDER BY o.ord
        """,
        tenant_id,
        [r.device_id for r in reports],
        [r.document for r in reports],
        [r.desired_version for r in reports],
        [r.seq for r in reports],
    )
    return IngestResult(
        outcomes=[_outcome(row) for row in rows],
        changed=[
            (row["device_id"], row["revision"]) for row in rows if row["revision"] is not None
        ],
    )


def _outcome(row: Any) -> str:
    if row["lifecycle"] is None:
        return UNKNOWN_DEVICE if row["tenant_known"] else UNKNOWN_TENANT
    if row["lifecycle"] != "ACTIVE":
        return DECOMMISSIONED
    if row["version"] > row["desired_version"]:
        return FUTURE_VERSION
    seq = row["seq"]
    # Before the version check: an older message is usually an older version
    # as well, and the seq says why it lost.
    if seq is not None and row["stored_seq"] is not None and seq <= row["stored_seq"]:
        return OUT_OF_ORDER
    if row["version"] < row["stored_version"]:
        return STALE_VERSION
    if row["chosen"]:
        if row["revision"] is not None:
            return APPLIED
        if row["in_order"] is False:
            # A concurrent ingest stored a newer seq while this one waited.
            return OUT_OF_ORDER
        # Equal to what is stored, or overtaken by a concurrent ingest.
        return UNCHANGED
    if seq is not None and row["earlier_seq"] is not None and seq <= row["earlier_seq"]:
        return OUT_OF_ORDER
    return SUPERSEDED


# --- the desired-state outbox (the evaluator's publisher) -------------------


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int
    tenant_id: uuid.UUID
    device_id: str
    #: The W3C traceparent of the write that queued it, when it was traced.
    traceparent: str | None = None


async def claim_outbox(con: Connection, *, limit: int) -> list[OutboxEntry]:
    """The oldest queued entries, for the caller's open transaction on the
    owner's connection. Empty unless this transaction holds the drain lock:
    one drainer at a time, so two publishers never reorder a device's
    retained message."""
    rows = await con.fetch(
        """
        WITH lock AS (SELECT pg_try_advisory_xact_lock($1) AS held)
        SELECT o.id, o.tenant_id, o.device_id, o.traceparent
        FROM lock, twin_outbox o
        WHERE lock.held
        ORDER BY o.id
        LIMIT $2
        """,
        _OUTBOX_LOCK,
        limit,
    )
    return [OutboxEntry(r["id"], r["tenant_id"], r["device_id"], r["traceparent"]) for r in rows]


async def outbox_backlog(con: Connection) -> tuple[int, float]:
    """(rows queued, seconds since the oldest was committed), on the owner's
    connection: what the outbox metrics show."""
    row = await con.fetchrow(
        "SELECT count(*) AS depth,"
        " coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0) AS age"
        " FROM twin_outbox"
    )
    assert row is not None
    return int(row["depth"]), float(row["age"])


async def delete_outbox(con: Connection, ids: Sequence[int]) -> None:
    await con.execute("DELETE FROM twin_outbox WHERE id = any($1::bigint[])", list(ids))


async def tenants_with_devices(db: Database) -> list[uuid.UUID]:
    """Every tenant that has a device, read as pulse_evaluator (the only role
    that sees all tenants' device_state)."""
    async with db.transaction("BEGIN READ ONLY; SET LOCAL ROLE pulse_evaluator") as con:
        rows = await con.fetch("SELECT DISTINCT tenant_id FROM device_state ORDER BY tenant_id")
    return [r["tenant_id"] for r in rows]


async def requeue_desired(
    con: Connection, tenant_id: uuid.UUID, *, after: str, limit: int
) -> list[str]:
    """Queue the next `limit` devices (by id, after `after`) that have a
    desired document for publishing again; return their ids."""
    rows = await con.fetch(
        """
        WITH page AS (
            SELECT tenant_id, device_id, desired_version
            FROM device_state
            WHERE tenant_id = $1 AND device_id > $2 AND desired_version > 0
            ORDER BY device_id
            LIMIT $3
        ), queued AS (
            INSERT INTO twin_outbox (tenant_id, device_id, desired_version)
            SELECT tenant_id, device_id, desired_version FROM page
        )
        SELECT device_id FROM page ORDER BY device_id
        """,
        tenant_id,
        after,
        limit,
    )
    return [r["device_id"] for r in rows]


async def outbox_last_id(con: Connection) -> int:
    """The newest outbox row's id (0 when empty), on the owner's connection."""
    return int(await con.fetchval("SELECT coalesce(max(id), 0) FROM twin_outbox"))


async def outbox_holds_up_to(con: Connection, outbox_id: int) -> bool:
    """Whether any outbox row at or below `outbox_id` is still queued."""
    return bool(
        await con.fetchval("SELECT EXISTS (SELECT 1 FROM twin_outbox WHERE id <= $1)", outbox_id)
    )


@dataclass(frozen=True, slots=True)
class Desired:
    device_id: str
    document: dict[str, Any]
    version: int
    #: When this version was written.
    written_at: datetime
    #: The tenant's id at the edge (tenants.external_id), if it has one.
    tenant_external_id: str | None

    def payload(self) -> bytes:
        """The MQTT message devices receive on their twin/desired topic."""
        return wire.desired(self.document, self.version)

    def upstream_payload(self) -> bytes:
        """The message upstream's devices receive on their shadow/desired topic."""
        return wire.upstream_desired(self.document, self.version, self.written_at)


async def current_desired(
    con: Connection, tenant_id: uuid.UUID, device_ids: Sequence[str]
) -> list[Desired]:
    """The desired documents of those of `device_ids` still active."""
    rows = await con.fetch(
        """
        SELECT s.device_id, s.desired, s.desired_version,
               coalesce(s.desired_updated_at, now()) AS written_at, t.external_id
        FROM device_state s
        JOIN devices d USING (tenant_id, device_id)
        JOIN tenants t USING (tenant_id)
        WHERE s.tenant_id = $1 AND s.device_id = any($2::text[]) AND d.lifecycle = 'ACTIVE'
        """,
        tenant_id,
        list(device_ids),
    )
    return [
        Desired(
            r["device_id"], r["desired"], r["desired_version"], r["written_at"], r["external_id"]
        )
        for r in rows
    ]
