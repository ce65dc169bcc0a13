"""Running the evaluator: standalone (`pulse evaluator`) or inside `pulse run`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from evaluator import handlers
from evaluator.broker import EmbeddedBroker
from evaluator.runtime import Evaluator
from server.config import Settings
from server.db import Database, create_pool


@contextlib.asynccontextmanager
async def mqtt_broker(mqtt_url: str | None) -> AsyncIterator[str]:
    """`mqtt_url`, or an embedded broker for as long as the context lasts."""
    if mqtt_url:
        yield mqtt_url
        return
    broker = EmbeddedBroker()
    url = await broker.start()
    try:
        yield url
    finally:
        await broker.stop()


@contextlib.asynccontextmanager
async def running_evaluator(
    settings: Settings, dsn: str, mqtt_url: str
) -> AsyncIterator[Evaluator]:
    """An evaluator consuming in the background until the context ends."""
    db = Database(await create_pool(dsn, size=settings.db_pool_size))
    evaluator = Evaluator(
        mqtt_url,
        handlers.build(db, settings),
        client_id=settings.evaluator_id,
        shared_group=settings.mqtt_shared_group,
    )
    task = asyncio.create_task(evaluator.run(), name="evaluator")
    try:
        yield evaluator
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await db.close()
