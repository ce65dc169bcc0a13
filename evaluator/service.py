"""Running the evaluator: standalone (`pulse evaluator`) or inside `pulse run`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from evaluator import handlers
from evaluator.broker import EmbeddedBroker
from evaluator.runtime import Evaluator
from server import mqtt_url
from server.broker_access.authenticator import Authenticator
from server.config import Settings
from server.credentials import services
from server.db import Database, create_pool


@contextlib.asynccontextmanager
async def mqtt_broker(
    configured_url: str | None, db: Database, *, service: str
) -> AsyncIterator[str]:
    """The broker to connect to as service `service`: `configured_url` as
    given (MQTT_URL, carrying that service's credentials), or an embedded
    broker with access control for as long as the context lasts, and a
    credential issued for `service` now."""
    if configured_url:
        yield configured_url
        return
    broker = EmbeddedBroker(authenticator=Authenticator(db))
    url = await broker.start()
    try:
        yield (await services.issue_address(db, service, mqtt_url.parse(url))).url
    finally:
        await broker.stop()


@contextlib.asynccontextmanager
async def running_evaluator(
    settings: Settings, dsn: str, broker_url: str
) -> AsyncIterator[Evaluator]:
    """An evaluator consuming in the background until the context ends."""
    db = Database(await create_pool(dsn, size=settings.db_pool_size), name="evaluator")
    broker = mqtt_url.parse(broker_url, ca_file=settings.mqtt_ca_file)
    evaluator = Evaluator(
        broker,
        handlers.build(db, broker, settings),
        client_id=settings.evaluator_id,
        shared_group=settings.mqtt_shared_group,
        inflight_max=settings.evaluator_inflight,
        session_expiry_s=settings.evaluator_session_expiry_s,
    )
    task = asyncio.create_task(evaluator.run(), name="evaluator")
    try:
        yield evaluator
    finally:
        task.cancel()
        try:
            # Raises what stopped a failed evaluator: the process exits non-zero.
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await db.close()
