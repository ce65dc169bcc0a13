"""The evaluator's MQTT loop: one persistent-session connection that
reconnects and resubscribes by itself, and dispatches device messages to the
capability handlers (twin ingest, liveness, ...).

Handlers must be quick in `handle` (append to a batch); the slow part (SQL)
happens in their own `run` loop, so a burst of messages costs one round trip
per batch rather than one per message.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

import aiomqtt

from server import mqtt_url, wire

log = logging.getLogger("pulse.evaluator")

_BACKOFF_MAX_S = 10.0


class Handler(Protocol):
    #: The message kinds this handler receives; "*" for every device message.
    kinds: frozenset[str]

    async def handle(self, message: wire.DeviceMessage) -> None: ...

    async def run(self, publisher: Publisher) -> None:
        """Background work (flushing batches, sweeps) until cancelled."""


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None: ...


class Evaluator:
    def __init__(
        self,
        broker: str | mqtt_url.BrokerAddress,
        handlers: Sequence[Handler],
        *,
        client_id: str = "pulse-evaluator",
        shared_group: str | None = None,
    ) -> None:
        self._broker = mqtt_url.parse(broker) if isinstance(broker, str) else broker
        self._handlers = list(handlers)
        self._client_id = client_id
        # With a shared subscription several evaluators split the stream
        # (the broker's own load balancing) instead of each seeing it all.
        self._subscription = (
            f"$share/{shared_group}/{wire.SUBSCRIPTION}" if shared_group else wire.SUBSCRIPTION
        )
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.received = 0

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Publish once connected; raises aiomqtt.MqttError if the connection drops."""
        await self._connected.wait()
        assert self._client is not None
        await self._client.publish(topic, payload, qos=qos, retain=retain)

    @property
    def connected(self) -> asyncio.Event:
        return self._connected

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            for handler in self._handlers:
                tasks.create_task(handler.run(self))
            tasks.create_task(self._consume_forever())

    async def _consume_forever(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with aiomqtt.Client(
                    **self._broker.client_options(),
                    identifier=self._client_id,
                    # A persistent session: the broker keeps our QoS 1
                    # messages while we are away and replays them.
                    clean_session=False,
                    keepalive=30,
                ) as client:
                    await client.subscribe(self._subscription, qos=1)
                    self._client = client
                    self._connected.set()
                    log.info("evaluator connected to %s", self._broker.safe_url)
                    backoff = 0.5
                    async for message in client.messages:
                        await self._dispatch(message)
            except aiomqtt.MqttError as error:
                log.warning("MQTT connection lost (%s); retrying in %.1fs", error, backoff)
            finally:
                self._connected.clear()
                self._client = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        self.received += 1
        try:
            tenant_id, device_id, kind = wire.parse(message.topic.value)
        except wire.BadTopic as error:
            self.rejected["bad_topic"] += 1
            log.warning("rejected message on %r: %s", message.topic.value[:200], error)
            return
        if kind in wire.OUTBOUND:
            return
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        device_message = wire.DeviceMessage(
            tenant_id=tenant_id,
            device_id=device_id,
            kind=kind,
            payload=bytes(payload),
            received_at=datetime.now(UTC),
            retain=message.retain,
        )
        for handler in self._handlers:
            if kind in handler.kinds or "*" in handler.kinds:
                await handler.handle(device_message)
