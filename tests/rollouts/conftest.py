"""Fixtures for the rollout tests: rollout engines in this process (fast
tunings), the twin evaluator and simulated devices acknowledging over MQTT.

Every engine works on every tenant's rollouts, as in production, so each
test starts and ends with none in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import pytest

from server.db import Database, create_pool
from server.rollouts.engine import RolloutEngine, Tuning
from tests.helpers import drop_rollouts
from tests.twin.conftest import mqtt, retained_cleanup, start_evaluator  # noqa: F401

FAST = Tuning(
    # Passes over the written devices take several ticks in most tests.
    judge_batch=5,
    check_interval=timedelta(milliseconds=100),
    enrol_interval=timedelta(milliseconds=200),
    poll_s=0.02,
)

EngineFactory = Callable[[], Awaitable[RolloutEngine]]


@pytest.fixture
async def start_engine(dsn: str) -> AsyncIterator[EngineFactory]:
    """Start rollout engines on demand, each on its own pool; all stop after the test."""
    tasks: list[asyncio.Task[None]] = []
    pools: list[Database] = []

    async def start() -> RolloutEngine:
        db = Database(await create_pool(dsn, size=4))
        pools.append(db)
        engine = RolloutEngine(db, tuning=FAST)
        tasks.append(asyncio.create_task(engine.run()))
        return engine

    try:
        yield start
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for db in pools:
            await db.close()


@pytest.fixture
async def engine(start_engine: EngineFactory) -> RolloutEngine:
    return await start_engine()


@pytest.fixture(autouse=True)
async def no_other_rollouts(db: Database) -> AsyncIterator[None]:
    """Each test's engines see only that test's rollouts."""
    await drop_rollouts(db)
    yield
    await drop_rollouts(db)
