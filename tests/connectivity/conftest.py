"""Fixtures for the connectivity tests: writing events the way the evaluator
does, collecting watch streams, and evaluators running the liveness handler.

Tests may share a database server and a broker with other test sessions, so
every tenant, device and MQTT client id is unique, and the persistent MQTT
sessions and retained topics a test creates are removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiomqtt
import pulse_client as pc
import pytest
from pulse.device.v1 import connectivity_pb2

from evaluator.liveness import Liveness
from evaluator.runtime import Evaluator
from server.connectivity.model import Signal
from server.connectivity.transitions import DeviceSignal, Transition, apply_signals, fleet
from server.db import Database, create_pool
from server.mqtt_url import parse as parse_broker
from tests.helpers import eventually, unique_id

Message = connectivity_pb2.WatchConnectionEventsResponse


@pytest.fixture(scope="session")
async def fleet_db(dsn: str) -> AsyncIterator[Database]:
    """A pool of the evaluator's kind (the owner login, entering pulse_evaluator)."""
    database = Database(await create_pool(dsn, size=3))
    try:
        yield database
    finally:
        await database.close()


async def emit(
    db: Database, tenant_id: uuid.UUID, device_ids: Sequence[str], signal: Signal
) -> list[Transition]:
    """Apply one signal to each device in one transaction, as a liveness flush does."""
    now = datetime.now(UTC)
    async with fleet(db) as con:
        return await apply_signals(
            con, [DeviceSignal(tenant_id, d, signal, now) for d in device_ids]
        )


async def flap(
    db: Database, tenant_id: uuid.UUID, device_ids: Sequence[str], rounds: int
) -> list[Transition]:
    """`rounds` transactions, alternately taking every device online and offline;
    each round is one event per device."""
    out: list[Transition] = []
    for i in range(rounds):
        out += await emit(
            db, tenant_id, device_ids, Signal.ONLINE if i % 2 == 0 else Signal.OFFLINE
        )
    return out


async def create_devices(client: pc.AsyncPulseClient, device_ids: Sequence[str]) -> None:
    for device_id in device_ids:
        await client.devices.create(device_id)


@dataclass
class Collector:
    """Reads a watch stream in the background, keeping every message."""

    stream: pc.AsyncStream[Message]
    messages: list[Message] = field(default_factory=list)
    error: BaseException | None = None
    task: asyncio.Task[None] | None = None

    @classmethod
    def start(cls, stream: pc.AsyncStream[Message]) -> Collector:
        collector = cls(stream)
        collector.task = asyncio.create_task(collector._read())
        return collector

    async def _read(self) -> None:
        try:
            async for message in self.stream:
                self.messages.append(message)
        except pc.PulseError as error:
            self.error = error

    @property
    def events(self) -> list[connectivity_pb2.ConnectionEvent]:
        return [m.event for m in self.messages if m.HasField("event")]

    @property
    def ids(self) -> list[int]:
        return [e.id for e in self.events]

    @property
    def cursor(self) -> str:
        return self.messages[-1].cursor if self.messages else ""

    async def wait_ready(self) -> None:
        """Until the first bookmark: the replay is over and the stream is live."""
        await eventually(
            lambda: any(not m.HasField("event") for m in self.messages) or self.error is not None,
            what="the end of the replay",
        )
        if self.error is not None:
            raise self.error

    async def wait_events(self, count: int, *, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        await eventually(
            lambda: len(self.events) >= count or self.error is not None,
            timeout=timeout,
            what=f"{count} events (got {len(self.events)})",
        )
        if self.error is not None:
            raise self.error

    async def stop(self) -> None:
        self.stream.cancel()
        if self.task is not None:
            await self.task

    async def wait_done(self) -> None:
        if self.task is not None:
            await asyncio.wait_for(self.task, 15)


@dataclass
class RunningEvaluator:
    evaluator: Evaluator
    liveness: Liveness
    client_id: str
    task: asyncio.Task[None]


EvaluatorFactory = Callable[..., Awaitable[RunningEvaluator]]


@pytest.fixture
async def start_evaluator(fleet_db: Database, mqtt_url: str) -> AsyncIterator[EvaluatorFactory]:
    """Start evaluators running only the liveness handler. All stop after the
    test, and their persistent sessions are removed from the broker."""
    running: list[RunningEvaluator] = []

    async def start(
        *, stale_after_s: float = 30.0, sweep_interval_s: float = 0.1
    ) -> RunningEvaluator:
        liveness = Liveness(
            fleet_db, stale_after_s=stale_after_s, sweep_interval_s=sweep_interval_s, flush_s=0.02
        )
        client_id = unique_id("test-liveness")
        evaluator = Evaluator(mqtt_url, [liveness], client_id=client_id, session_expiry_s=30)
        task = asyncio.create_task(evaluator.run())
        started = RunningEvaluator(evaluator, liveness, client_id, task)
        running.append(started)
        await asyncio.wait_for(evaluator.connected.wait(), 10)
        return started

    try:
        yield start
    finally:
        broker = parse_broker(mqtt_url).client_options()
        for started in running:
            started.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await started.task
            # A clean session discards the persistent one, which would
            # otherwise queue every device message for a client that is gone.
            async with aiomqtt.Client(**broker, identifier=started.client_id, clean_session=True):
                pass
