"""Fixtures for the twin tests: an evaluator running the twin handlers, MQTT
clients of the test's own, and a helper to wait for asynchronous effects.

Tests may share a broker with other test sessions (MQTT_URL), so every client
id is unique, assertions about rejections look only at the test's own
tenant, and retained messages a test leaves under its tenant are cleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiomqtt
import pytest
from pulse_client import AsyncPulseClient

from evaluator.runtime import Evaluator
from evaluator.twin_ingest import TwinIngest
from evaluator.twin_publisher import TwinPublisher
from server.db import Database, create_pool
from server.mqtt_url import parse as parse_broker
from tests.conftest import Tenant
from tests.helpers import clear_retained, unique_id


@contextlib.asynccontextmanager
async def mqtt_client(mqtt_url: str, **kwargs: object) -> AsyncIterator[aiomqtt.Client]:
    options = parse_broker(mqtt_url).client_options()
    async with aiomqtt.Client(**options, identifier=unique_id("test"), **kwargs) as client:  # type: ignore[arg-type]
        yield client


@pytest.fixture
async def retained_cleanup(mqtt_url: str, tenant: Tenant) -> AsyncIterator[None]:
    """Clears the tenant's retained topics (ours and upstream's) after the test."""
    yield
    await clear_retained(mqtt_url, f"pulse/{tenant.tenant_id}")
    await clear_retained(mqtt_url, f"tenant/{tenant.tenant_id}")


@pytest.fixture
async def mqtt(mqtt_url: str, retained_cleanup: None) -> AsyncIterator[aiomqtt.Client]:
    """A connected MQTT client of the test's own."""
    async with mqtt_client(mqtt_url) as client:
        yield client


@dataclass
class RunningEvaluator:
    evaluator: Evaluator
    ingest: TwinIngest
    publisher: TwinPublisher
    client_id: str
    task: asyncio.Task[None]

    async def stop(self) -> None:
        """Stop early, as a crash would: the persistent session stays."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def rejections(self, tenant_id: uuid.UUID) -> list[tuple[str, str]]:
        """(device_id, reason) of the tenant's rejected reports, in order."""
        return [(r.device_id, r.reason) for r in self.ingest.rejections if r.tenant_id == tenant_id]


EvaluatorFactory = Callable[..., Awaitable[RunningEvaluator]]


@pytest.fixture
async def start_evaluator(
    dsn: str, mqtt_url: str, retained_cleanup: None
) -> AsyncIterator[EvaluatorFactory]:
    """Start evaluators (twin handlers only) on demand; a client id passed
    again resumes that persistent session. All stop after the test, and
    their sessions are removed from the broker.

    Desired writes queued by earlier tests (which ran no evaluator) are
    dropped first, so this test publishes only under its own tenant."""
    db = Database(await create_pool(dsn, size=6))
    async with db.admin() as con:
        await con.execute("DELETE FROM twin_outbox")
    running: list[RunningEvaluator] = []
    client_ids: set[str] = set()

    async def start(client_id: str | None = None) -> RunningEvaluator:
        cid = client_id or unique_id("test-evaluator")
        client_ids.add(cid)
        ingest = TwinIngest(db, keep_rejections=100_000)
        publisher = TwinPublisher(db, poll_s=0.02)
        evaluator = Evaluator(mqtt_url, [ingest, publisher], client_id=cid, session_expiry_s=30)
        task = asyncio.create_task(evaluator.run())
        started = RunningEvaluator(evaluator, ingest, publisher, cid, task)
        running.append(started)
        await asyncio.wait_for(evaluator.connected.wait(), 10)
        return started

    try:
        yield start
    finally:
        for started in running:
            await started.stop()
        await db.close()
        # A clean-session connection discards the persistent session, which
        # would otherwise queue every device message for a client that never
        # comes back.
        for cid in client_ids:
            options = parse_broker(mqtt_url).client_options()
            async with aiomqtt.Client(**options, identifier=cid, clean_session=True):
                pass


async def create_devices(client: AsyncPulseClient, *device_ids: str) -> None:
    for device_id in device_ids:
        await client.devices.create(device_id)
