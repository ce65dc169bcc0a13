"""The liveness sweep over a million devices, beside its baselines.

A fleet of 1,000,000 ONLINE devices (100 tenants x 10,000). Each round makes
1% of them (10,000) silent past the threshold, then measures, in one run:
  - the sweep through the evaluator's own code (`Liveness.sweep_once`: pool,
    BEGIN as pulse_evaluator, the statement, COMMIT), 10,000 transitions
    with their event rows and NOTIFYs;
  - the bare statement in its own transaction on a plain connection;
  - the upstream way: select the stale devices, then per device an UPDATE
    and an event INSERT, each its own round trip;
  - the idle sweep (nothing to change), both ways.
The table is vacuumed between rounds so every round starts alike. Medians.

    .venv/bin/python -m bench.sweep [--devices 1000000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.harness import run, scratch_database
from evaluator.liveness import Liveness
from server.connectivity.transitions import EVALUATOR_ROLE, sweep
from server.db import Database, create_pool
from server.tenants import ensure_tenant

TENANTS = 100
STALE_AFTER_S = 30.0
IDLE_REPEATS = 25


async def _seed(db: Database, tenants: list[uuid.UUID], per_tenant: int, base: datetime) -> None:
    for i, tenant in enumerate(tenants):
        async with db.admin() as con:
            await ensure_tenant(con, tenant, f"bench {i}")
        async with db.tenant(tenant) as con:
            await con.execute(
                """
                WITH d AS (
                    INSERT INTO devices (tenant_id, device_id)
                    SELECT $1, 'DEV-' || lpad(n::text, 6, '0') FROM generate_series(1, $2) n
                    RETURNING tenant_id, device_id
                )
                INSERT INTO device_state (tenant_id, device_id, status, last_seen_at)
                SELECT tenant_id, device_id, 'ONLINE', $3 FROM d
                """,
                tenant,
                per_tenant,
                base,
            )


async def _make_silent(con: asyncpg.Connection, fraction: int, base: datetime) -> None:
    """Every `fraction`-th device of each tenant: ONLINE again, last seen an
    hour before `base`; every other device was last seen at `base`, and the
    sweeps run at `base` too, so exactly these go stale."""
    async with con.transaction():
        await con.execute(f"SET LOCAL ROLE {EVALUATOR_ROLE}")
        await con.execute(
            f"""
            UPDATE device_state SET status = 'ONLINE', last_seen_at = $1
            WHERE right(device_id, 6)::int % {fraction} = 0
            """,
            base - timedelta(hours=1),
        )
    await con.execute("VACUUM ANALYZE device_state")


async def _bare(con: asyncpg.Connection, clock: datetime) -> int:
    """The statement alone in its own transaction, on a plain connection."""
    async with con.transaction():
        await con.execute(f"SET LOCAL ROLE {EVALUATOR_ROLE}")
        return await sweep(con, now=clock, stale_after_s=STALE_AFTER_S)


async def _row_by_row(con: asyncpg.Connection, cutoff: datetime) -> int:
    """Upstream's evaluator: one round trip per device, and per event."""
    rows = await con.fetch(
        "SELECT tenant_id, device_id, last_seen_at FROM device_state "
        "WHERE status = 'ONLINE' AND last_seen_at < $1",
        cutoff,
    )
    for row in rows:
        await con.execute(
            "UPDATE device_state SET status = 'STALE' WHERE tenant_id = $1 AND device_id = $2",
            row["tenant_id"],
            row["device_id"],
        )
        await con.execute(
            """
            INSERT INTO connection_events
                (tenant_id, device_id, event_type, previous_status, status, trigger, details)
            VALUES ($1, $2, 'CONNECTION_LOST', 'ONLINE', 'STALE', 'heartbeat_timeout',
                    jsonb_build_object('last_seen_at', $3::timestamptz))
            """,
            row["tenant_id"],
            row["device_id"],
            row["last_seen_at"],
        )
    return len(rows)


async def _timed(work: Awaitable[int]) -> tuple[float, int]:
    """Milliseconds `work` (a coroutine, not started yet) takes, and its result."""
    start = time.perf_counter()
    count = await work
    return (time.perf_counter() - start) * 1000, count


def _row(name: str, ms: float, count: int, baseline: float | None = None) -> str:
    ratio = f"{ms / baseline:7.2f}x" if baseline else "        "
    return f"  {name:<46} {ms:9.2f} ms  {count:>7,} rows  {ratio}"


async def main(devices: int, rounds: int) -> None:
    per_tenant = devices // TENANTS
    fraction = 100  # 1% go stale each round
    async with scratch_database() as dsn:
        db = Database(await create_pool(dsn, size=4))
        tenants = [uuid.uuid4() for _ in range(TENANTS)]
        started = time.perf_counter()
        # One fixed clock for the whole run: seeding and sweeping take minutes,
        # and only the devices made silent may be older than the threshold.
        clock = datetime.now(UTC)
        await _seed(db, tenants, per_tenant, clock)
        raw = await asyncpg.connect(dsn)
        await raw.execute("VACUUM ANALYZE")
        print(
            f"sweep: {TENANTS * per_tenant:,} ONLINE devices, {TENANTS} tenants, 1% stale per "
            f"round; seeded in {time.perf_counter() - started:.0f}s; medians of {rounds} rounds"
        )
        liveness = Liveness(db, stale_after_s=STALE_AFTER_S)
        evaluator, bare, rowwise, idle_eval, idle_bare = [], [], [], [], []
        counts: dict[str, int] = {}
        for _ in range(rounds):
            await _make_silent(raw, fraction, clock)
            ms, counts["evaluator"] = await _timed(liveness.sweep_once(clock))
            evaluator.append(ms)
            for _ in range(IDLE_REPEATS):
                idle_eval.append((await _timed(liveness.sweep_once(clock)))[0])

            await _make_silent(raw, fraction, clock)
            ms, counts["bare"] = await _timed(_bare(raw, clock))
            bare.append(ms)
            for _ in range(IDLE_REPEATS):
                idle_bare.append((await _timed(_bare(raw, clock)))[0])

            await _make_silent(raw, fraction, clock)
            cutoff = clock - timedelta(seconds=STALE_AFTER_S)
            ms, counts["rowwise"] = await _timed(_row_by_row(raw, cutoff))
            rowwise.append(ms)

        med = statistics.median
        base = med(evaluator)
        stale = counts["evaluator"]
        header = f"  {stale:,} devices going stale, with their events"
        print(f"{header:<50}time        rows   ratio")
        print(_row("evaluator: Liveness.sweep_once", base, counts["evaluator"]))
        print(_row("bare statement + COMMIT, plain connection", med(bare), counts["bare"], base))
        print(_row("row by row (upstream)", med(rowwise), counts["rowwise"], base))
        print("  idle sweep (nothing changed)")
        print(_row("evaluator: Liveness.sweep_once", med(idle_eval), 0))
        print(_row("bare statement + COMMIT, plain connection", med(idle_bare), 0, med(idle_eval)))
        busy_ok = "met" if base < 250 else "NOT met"
        idle_ok = "met" if med(idle_eval) < 5 else "NOT met"
        print(
            f"  goals: {stale:,} transitions < 250 ms: {busy_ok} ({base:.0f} ms); "
            f"idle < 5 ms: {idle_ok} ({med(idle_eval):.2f} ms); "
            f"row by row is {med(rowwise) / base:.0f}x slower"
        )
        await raw.close()
        await db.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    run(lambda: main(args.devices, args.rounds))
