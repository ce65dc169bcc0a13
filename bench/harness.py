"""Shared bench plumbing: a database to measure against, a closed-loop load
driver, and subprocess servers."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from server import migrate
from server.db import Database, create_pool
from server.embedded import EmbeddedPostgres
from server.tenants import ensure_tenant

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """A new migrated database on DATABASE_URL's server, or an embedded one."""
    embedded = None
    url = os.environ.get("DATABASE_URL")
    if not url:
        embedded = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pulse-bench-")) / "pg")
        url = await embedded.start()
    name = f"pulse_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        from tests.conftest import with_database

        dsn = with_database(url, name)
        await migrate.apply(dsn)
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
        if embedded is not None:
            await embedded.stop()


async def seed_tenant(
    dsn: str,
    device_ids: Sequence[str],
    *,
    tags: dict[str, str] | None = None,
    desired_version: int = 0,
) -> uuid.UUID:
    """A new tenant holding these devices (named after their ids) and their state rows."""
    tenant = uuid.uuid4()
    db = Database(await create_pool(dsn, size=1))
    try:
        async with db.admin() as con:
            await ensure_tenant(con, tenant, "bench")
        async with db.tenant(tenant) as con:
            await con.execute(
                """
                WITH d AS (
                    INSERT INTO devices (tenant_id, device_id, name, tags)
                    SELECT $1, id, id, $3 FROM unnest($2::text[]) id
                    RETURNING tenant_id, device_id
                )
                INSERT INTO device_state (tenant_id, device_id, desired_version)
                SELECT tenant_id, device_id, $4 FROM d
                """,
                tenant,
                list(device_ids),
                tags or {},
                desired_version,
            )
    finally:
        await db.close()
    return tenant


@dataclass(frozen=True)
class Result:
    name: str
    rate: float  # calls per second
    p50_ms: float
    p99_ms: float

    def row(self, baseline: float | None = None) -> str:
        ratio = f"{self.rate / baseline:6.0%}" if baseline else "      "
        return (
            f"  {self.name:<34} {self.rate:9,.0f}/s  p50 {self.p50_ms:6.2f} ms"
            f"  p99 {self.p99_ms:6.2f} ms  {ratio}"
        )


async def timed_round(
    call: Callable[[int], Awaitable[object]], concurrency: int, seconds: float
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        i = n
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t0)
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return len(latencies) / (time.perf_counter() - start), sorted(latencies)


async def closed_loop(
    name: str,
    call: Callable[[int], Awaitable[object]],
    *,
    concurrency: int = 64,
    seconds: float = 3.0,
    warmup: float = 1.0,
    rounds: int = 3,
) -> Result:
    """`concurrency` workers calling back to back; medians over `rounds` rounds."""
    await timed_round(call, concurrency, warmup)
    rates, p50s, p99s = [], [], []
    for _ in range(rounds):
        rate, latencies = await timed_round(call, concurrency, seconds)
        rates.append(rate)
        p50s.append(latencies[len(latencies) // 2] * 1000)
        p99s.append(latencies[int(len(latencies) * 0.99)] * 1000)
    return Result(name, statistics.median(rates), statistics.median(p50s), statistics.median(p99s))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def listening(
    port: int, process: asyncio.subprocess.Process, *, timeout_s: float = 10.0
) -> bool:
    """Wait until something accepts TCP connections on 127.0.0.1:`port`;
    False if `process` exited first or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if process.returncode is not None or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        else:
            writer.close()
            await writer.wait_closed()
            return True


@asynccontextmanager
async def subprocess_server(
    module: str, port: int, env: dict[str, str], args: Sequence[str] = ()
) -> AsyncIterator[None]:
    """Run `python -m module [args]` until it accepts TCP connections on `port`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        cwd=ROOT,
        env={**os.environ, **env, "PORT": str(port)},
    )
    try:
        if not await listening(port, proc, timeout_s=30):
            raise RuntimeError(f"{module} did not start")
        yield
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)


def run(main: Callable[[], Awaitable[None]]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())  # type: ignore[arg-type]
    else:
        uvloop.run(main())  # type: ignore[arg-type]
