"""Desired state survives a broker that lost its retained messages.

Devices learn their desired state from retained `twin/desired` messages, which
a broker restarted without persistence (or a new cluster) no longer has: a
device subscribing then gets an old version or nothing, and no write is
coming to correct it. So the evaluator keeps a retained marker of its own on
`pulse/retained-marker` and looks for it on every connection: the broker
sends it right after the subscription, before the probe this module publishes
next. A probe that comes back first means the retained store is gone; every
device with a desired document is then queued in the twin outbox again, a
page at a time, each page only after the drainer took the previous one, so
desired writes made meanwhile wait behind one page at most and the drainer's
single-publisher ordering still holds. Then the marker is published again.

A marker lost for another reason (deleted by hand) costs one needless
republish; devices ignore versions they already applied.

The drainer publishes each requeued document on upstream's
`shadow/desired` topic as well (unless PULSE_UPSTREAM_DESIRED is off), so a
repair restores both. The marker says whether the retained state includes
upstream's copies (`"upstream": false` when it was published without them):
an evaluator that publishes them and finds a marker saying they are missing
requeues everything too, since the writes made while they were switched
off left upstream's topics behind. A marker from before upstream's topics
existed says nothing and is taken as including them: upstream's copies of
such a fleet appear with each device's next desired write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import uuid
from datetime import UTC, datetime

import aiomqtt

from evaluator.runtime import Publisher
from server import mqtt_url, transient, wire
from server.db import Database
from server.twin import store

log = logging.getLogger("pulse.evaluator.twin")

MARKER_TOPIC = f"{wire.PREFIX}/retained-marker"

_BACKOFF_MAX_S = 10.0


class RetainedRepair:
    """The evaluator handler that republishes desired state after the broker
    lost it; it consumes no device messages and keeps a connection of its own."""

    kinds: frozenset[str] = frozenset()

    def __init__(
        self,
        db: Database,
        broker: mqtt_url.BrokerAddress,
        *,
        client_id: str,
        page: int = 500,
        check_timeout_s: float = 10.0,
        poll_s: float = 0.05,
        upstream: bool = True,
    ) -> None:
        """`upstream`: the drainer publishes on upstream's topics too."""
        self._db = db
        self._broker = broker
        self._client_id = f"{client_id}-retained-check"
        self._page = page
        self._check_timeout_s = check_timeout_s
        self._poll_s = poll_s
        self._upstream = upstream
        #: Times the retained store was found empty and desired state requeued.
        self.repairs = 0
        #: Devices queued again by those repairs.
        self.requeued = 0
        #: Set after each completed check of a connection (found or repaired).
        self.checked = asyncio.Event()

    async def handle(self, message: wire.DeviceMessage) -> None:
        message.settle()

    async def run(self, publisher: Publisher) -> None:
        backoff = 0.5
        while True:
            try:
                async with aiomqtt.Client(
                    **self._broker.client_options(), identifier=self._client_id
                ) as client:
                    await self._check(client)
                    backoff = 0.5
                    # Held open: the next connection, after the broker came
                    # back, checks again.
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as error:
                log.info("retained-state check: %s; retrying in %.1fs", error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _check(self, client: aiomqtt.Client) -> None:
        self.checked.clear()
        probe = uuid.uuid4().hex.encode()
        await client.subscribe(MARKER_TOPIC, qos=1)
        await client.publish(MARKER_TOPIC, probe, qos=1)
        marker: bytes | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._check_timeout_s):
                async for message in client.messages:
                    if message.retain:
                        marker = message.payload if isinstance(message.payload, bytes) else b""
                        break
                    if message.payload == probe:
                        break
        if marker is None:
            log.info(
                "no retained marker on the broker (new, or restarted without persistence):"
                " republishing desired state"
            )
            await self.requeue_all()
            await self._set_marker(client)
        elif _with_upstream(marker) != self._upstream:
            if self._upstream:
                log.info(
                    "upstream's desired topics were left behind while switched off:"
                    " republishing desired state"
                )
                await self.requeue_all()
            await self._set_marker(client)
        await client.unsubscribe(MARKER_TOPIC)
        self.checked.set()

    async def _set_marker(self, client: aiomqtt.Client) -> None:
        marker = {
            "set_by": self._client_id,
            "at": datetime.now(UTC).isoformat(),
            "upstream": self._upstream,
        }
        await client.publish(MARKER_TOPIC, json.dumps(marker).encode(), qos=1, retain=True)

    async def requeue_all(self) -> int:
        """Queue every device's desired document for publishing again, paced
        by the drainer; return how many devices."""
        self.repairs += 1
        total = 0
        tenants = await transient.retry_forever(
            lambda: store.tenants_with_devices(self._db), log=log, what="retained repair"
        )
        for tenant_id in tenants:
            after = ""
            while True:
                device_ids = await transient.retry_forever(
                    functools.partial(self._requeue_page, tenant_id, after),
                    log=log,
                    what="retained repair",
                )
                if not device_ids:
                    break
                total += len(device_ids)
                self.requeued += len(device_ids)
                after = device_ids[-1]
                await self._drained()
        log.info("queued the desired state of %d devices for publishing again", total)
        return total

    async def _requeue_page(self, tenant_id: uuid.UUID, after: str) -> list[str]:
        async with self._db.tenant(tenant_id) as con:
            return await store.requeue_desired(con, tenant_id, after=after, limit=self._page)

    async def _drained(self) -> None:
        """Wait until the drainer took every row queued so far."""

        async def last_id() -> int:
            async with self._db.admin() as con:
                return await store.outbox_last_id(con)

        async def drained(up_to: int) -> bool:
            async with self._db.admin() as con:
                return not await store.outbox_holds_up_to(con, up_to)

        up_to = await transient.retry_forever(last_id, log=log, what="retained repair")
        while True:
            if await transient.retry_forever(
                functools.partial(drained, up_to), log=log, what="retained repair"
            ):
                return
            await asyncio.sleep(self._poll_s)


def _with_upstream(marker: bytes) -> bool:
    """Whether the retained state a marker vouches for includes upstream's
    copies; a marker that does not say (set before there were any, or by
    hand) is taken to."""
    try:
        said = json.loads(marker)
    except ValueError:
        return True
    return not isinstance(said, dict) or said.get("upstream") is not False
