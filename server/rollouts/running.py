"""The rollout engine as a part of a process: `pulse rollouts`, `pulse run`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from server.config import Settings
from server.db import Database, create_pool
from server.rollouts.engine import RolloutEngine

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def running_engine(settings: Settings, dsn: str) -> AsyncIterator[RolloutEngine]:
    """A rollout engine on a pool of its own, working until the context ends."""
    db = Database(await create_pool(dsn, size=settings.db_pool_size), name="rollouts")
    engine = RolloutEngine(db, stale_after=timedelta(seconds=settings.twin_stale_after_s))
    task = asyncio.create_task(engine.run(), name="rollout engine")
    log.info("rollout engine running")
    try:
        yield engine
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await db.close()
