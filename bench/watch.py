"""Watch streams under load: commit-to-delivery latency and the server's memory.

One tenant with 10,000 devices; 1,000 watchers each narrowed to its own 10
devices, plus 10 watchers of the whole tenant, all on one server (its own
process). 10,000 events arrive over 10 s: 100 transactions a second, 10
events each, through the evaluator's own statement. Every event reaches 11
watchers (110,000 deliveries). Measured in the same run:
  - commit to delivery through the server and the typed client, p50/p99
    (from just before COMMIT is sent, so the commit itself is included);
  - the floor: commit to a raw LISTEN in this process for the same
    transactions (PostgreSQL's own notification latency);
  - the server's resident memory idle (after start) and at its peak.

    .venv/bin/python -m bench.watch [--watchers 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from pulse_client import AsyncPulseClient

from bench.harness import ROOT, free_port, run, scratch_database
from server.auth import Role, mint_token
from server.connectivity.model import CHANNEL, Signal
from server.connectivity.transitions import DeviceSignal, apply_signals, fleet
from server.db import Database, create_pool
from server.tenants import ensure_tenant

PER_WATCHER = 10
BROAD_WATCHERS = 10
CHANNELS = 10


def _memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


@contextlib.asynccontextmanager
async def server(dsn: str, secret: str) -> AsyncIterator[tuple[str, int]]:
    """The real server (bench.serve) in its own process: (address, pid)."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "PULSE_SECRET": secret,
        "PULSE_DB_POOL_SIZE": "10",
        "PULSE_LOG_LEVEL": "WARNING",
        "PORT": str(port),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.serve", cwd=ROOT, env=env
    )
    try:
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def main(watchers: int, seconds: float) -> None:
    devices = [f"W-{n:05d}" for n in range(watchers * PER_WATCHER)]
    transactions = int(seconds * 100)
    per_tx = len(devices) // transactions
    async with scratch_database() as dsn:
        tenant = uuid.uuid4()
        db = Database(await create_pool(dsn, size=2))
        async with db.admin() as con:
            await ensure_tenant(con, tenant, "bench")
        async with db.tenant(tenant) as con:
            await con.execute(
                """
                WITH d AS (
                    INSERT INTO devices (tenant_id, device_id)
                    SELECT $1, unnest($2::text[]) RETURNING tenant_id, device_id
                )
                INSERT INTO device_state (tenant_id, device_id) SELECT * FROM d
                """,
                tenant,
                devices,
            )
        secret = secrets.token_hex(32)
        token = mint_token(secret.encode(), tenant_id=tenant, role=Role.VIEWER)
        received: list[tuple[int, float]] = []
        ready = 0
        all_ready = asyncio.Event()
        all_received = asyncio.Event()
        expected = sys.maxsize  # known once every event is committed
        total = watchers + BROAD_WATCHERS

        async def watch(client: AsyncPulseClient, device_ids: list[str]) -> None:
            nonlocal ready
            async with client.connectivity.watch(device_ids=device_ids) as stream:
                async for message in stream:
                    if message.HasField("event"):
                        received.append((message.event.id, time.time()))
                        if len(received) >= expected:
                            all_received.set()
                    else:
                        ready += 1
                        if ready == total:
                            all_ready.set()

        async with server(dsn, secret) as (address, pid):
            clients = [
                await AsyncPulseClient.connect(address, token=token, timeout=60)
                for _ in range(CHANNELS)
            ]
            idle_kib = _memory_kib(pid, "VmRSS")
            tasks = [
                asyncio.create_task(
                    watch(clients[w % CHANNELS], devices[w::watchers][:PER_WATCHER])
                )
                for w in range(watchers)
            ]
            tasks += [
                asyncio.create_task(watch(clients[w % CHANNELS], [])) for w in range(BROAD_WATCHERS)
            ]
            await asyncio.wait_for(all_ready.wait(), 120)

            # The floor: a bare LISTEN on the same commits.
            notified: list[float] = []
            listen = await asyncpg.connect(dsn)
            await listen.add_listener(CHANNEL, lambda *_: notified.append(time.time()))
            committed: dict[int, float] = {}
            commit_times: list[float] = []
            cpu_before = _cpu_s(pid), _cpu_s(os.getpid())
            start = time.perf_counter()
            for k in range(transactions):
                delay = start + k * seconds / transactions - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                batch = devices[k * per_tx : (k + 1) * per_tx]
                now = datetime.now(UTC)
                async with fleet(db) as con:
                    done = await apply_signals(
                        con, [DeviceSignal(tenant, d, Signal.ONLINE, now) for d in batch]
                    )
                    # Just before COMMIT is sent: latencies include the commit.
                    at = time.time()
                commit_times.append(at)
                for t in done:
                    committed[t.event_id] = at
            expected = len(committed) * (1 + BROAD_WATCHERS)
            if len(received) >= expected:
                all_received.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_received.wait(), 60)
            peak_kib = _memory_kib(pid, "VmHWM")
            cpu_server = _cpu_s(pid) - cpu_before[0]
            cpu_clients = _cpu_s(os.getpid()) - cpu_before[1]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in clients:
                await client.close()
            await listen.close()
        await db.close()

    latencies = [(at - committed[i]) * 1000 for i, at in received if i in committed]
    floor = [(n - c) * 1000 for n, c in zip(notified, commit_times, strict=False)]
    p50, p99 = statistics.median(latencies), _percentile(latencies, 0.99)
    f50, f99 = statistics.median(floor), _percentile(floor, 0.99)
    print(
        f"watch: {watchers:,} watchers x {PER_WATCHER} devices + {BROAD_WATCHERS} whole-tenant; "
        f"{len(committed):,} events in {transactions} transactions over {seconds:.0f}s"
    )
    print(f"  {'':<44} {'p50':>9} {'p99':>9}  {'p50 vs floor':>12}")
    print(f"  {'commit -> raw LISTEN (floor)':<44} {f50:7.2f}ms {f99:7.2f}ms")
    print(
        f"  {'commit -> watcher via pulse + typed client':<44} {p50:7.2f}ms {p99:7.2f}ms"
        f"  {p50 / f50:11.1f}x"
    )
    print(
        f"  deliveries {len(latencies):,} of {expected:,}; server memory idle "
        f"{idle_kib / 1024:.0f} MB, peak {peak_kib / 1024:.0f} MB "
        f"({peak_kib / idle_kib:.1f}x idle)"
    )
    print(
        f"  CPU while events flowed: server {cpu_server:.1f}s "
        f"({cpu_server / len(latencies) * 1e6:.0f} us per delivery), "
        f"watchers and writer (this process) {cpu_clients:.1f}s"
    )
    p99_ok = "met" if p99 < 250 else "NOT met"
    mem_ok = "met" if peak_kib < 300 * 1024 else "NOT met"
    print(f"  goals: p99 < 250 ms: {p99_ok}; peak memory < 300 MB: {mem_ok}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    run(lambda: main(args.watchers, args.seconds))
