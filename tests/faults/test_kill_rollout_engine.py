"""`pulse rollouts` killed with SIGKILL mid-rollout: its unfinished
transaction rolls back whole, so after a restart every device is written
exactly once and none is skipped.

A device's desired version says how often it was written (each write adds
one); the rollout's rows say which devices the engine believes it wrote.
Both must agree, for every device, across the kill.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.db import Database
from tests.conftest import FleetFactory
from tests.faults.conftest import ROOT, end_process, pulse_env, wait_for
from tests.helpers import drop_rollouts
from tests.rollouts.helpers import create_rollout, writes

pytestmark = pytest.mark.timeout(120)

DEVICES = 5_000


class EngineProcess:
    """`pulse rollouts` in a subprocess, its output appended to a log file."""

    def __init__(self, dsn: str, folder: Path) -> None:
        self.log_path = folder / "rollouts.log"
        data = folder / "pulse-data"
        data.mkdir()
        self.env = pulse_env(
            {
                "DATABASE_URL": dsn,
                "PULSE_DATA_DIR": str(data),
                "PULSE_SECRET": secrets.token_hex(32),
                "PULSE_LOG_LEVEL": "INFO",
            }
        )
        self.process: asyncio.subprocess.Process | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self) -> None:
        runs = self.log_text().count("rollout engine running")
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *[sys.executable, "-c", "from launcher.cli import main; main()", "rollouts"],
                cwd=ROOT,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        await wait_for(
            lambda: self.log_text().count("rollout engine running") > runs,
            what="pulse rollouts starting",
        )

    async def end(self, how: signal.Signals) -> None:
        process, self.process = self.process, None
        await end_process(process, how)


@pytest.fixture
async def engine_process(dsn: str, db: Database, tmp_path: Path) -> AsyncIterator[EngineProcess]:
    await drop_rollouts(db)
    process = EngineProcess(dsn, tmp_path)
    try:
        yield process
    finally:
        await process.end(signal.SIGKILL)
        print(f"\n=== pulse rollouts: log ===\n{process.log_text()[-6000:]}")
        await drop_rollouts(db)


async def _applied(db: Database, tenant_id: uuid.UUID, rollout_id: str) -> dict[str, int]:
    """device_id -> the version written, of the devices the rollout wrote."""
    async with db.tenant(tenant_id, readonly=True) as con:
        rows = await con.fetch(
            "SELECT device_id, desired_version FROM rollout_devices "
            "WHERE rollout_id = $1 AND state = 'APPLIED'",
            rollout_id,
        )
    return {r["device_id"]: r["desired_version"] for r in rows}


async def test_an_engine_killed_mid_rollout_writes_no_device_twice_and_skips_none(
    engine_process: EngineProcess, db: Database, seed_fleet_tenant: FleetFactory
) -> None:
    device_ids = [f"KILL-{n:04d}" for n in range(DEVICES)]
    tenant_id = await seed_fleet_tenant(device_ids, desired_version=1)
    # At 30,000 a minute the 5,000 devices take 10 s: the kill lands mid-rollout.
    rollout_id = await create_rollout(db, tenant_id, max_per_minute=30_000)
    await engine_process.start()

    async def underway() -> bool:
        return len(await _applied(db, tenant_id, rollout_id)) >= DEVICES // 10

    await wait_for(underway, what="a tenth of the fleet written")
    await engine_process.end(signal.SIGKILL)
    at_kill = await _applied(db, tenant_id, rollout_id)
    assert len(at_kill) < DEVICES, "the rollout finished before the kill"
    # What committed before the kill is consistent already.
    written = await writes(db, tenant_id)
    assert {d for d, v in written.items() if v == 2} == set(at_kill)

    await engine_process.start()

    async def finished() -> bool:
        return len(await _applied(db, tenant_id, rollout_id)) == DEVICES

    await wait_for(finished, what="every device written after the restart", timeout=90)
    assert await writes(db, tenant_id) == dict.fromkeys(device_ids, 2)
    assert await _applied(db, tenant_id, rollout_id) == dict.fromkeys(device_ids, 2)
