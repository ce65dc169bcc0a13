"""Simulated devices that speak MQTT the way real ones do, for the demo
(`pulse run`, `pulse simulate`) and for end-to-end tests.

A `SimulatedDevice`, per connection:
  - connects with a last will (`lost`, retained) on `pulse/{tenant}/{device}/status`,
    so the broker announces a connection lost without a goodbye;
  - publishes `online` (retained) there, subscribes to its `twin/desired`;
  - puts a `seq` in every message (docs/device-ordering.md): status as
    `{"status": ..., "seq": n}`, the will with its session's `online` seq;
  - sends a heartbeat to `pulse/{tenant}/{device}/heartbeat` every `heartbeat_s`;
  - applies each new desired document after `apply_delay_s` (only the latest
    if several arrive meanwhile; versions it has applied already are
    ignored, since publication is at-least-once) and reports back on
    `twin/reported`: `{"state": {...}, "desired_version": n}`, unless told
    to misbehave (below);
  - reconnects by itself if the broker goes away;
  - on `stop()` publishes `offline` (retained) and disconnects cleanly;
    `drop_connection()` instead cuts the TCP connection without a word, so
    the broker fires the will.

With `dialect=wire.Dialect.UPSTREAM` it is a device of the upstream platform
(docs/upstream-devices.md): it subscribes to
`tenant/{tenant}/device/{device}/shadow/desired` and reports
`{"reported": {...}, "version": n}` on `.../shadow/reported`, `{tenant}`
being `upstream_tenant` (the tenant's external id) or its UUID. It sends
nothing else, as upstream's twin has no status, will, heartbeat or seq: the
service hears of it through its reports only.

To test rollouts, a device can misbehave: its `behaviour` is
  - "apply" (the default): as above;
  - "ignore": it receives desired documents but neither applies nor reports
    them (it stays connected and keeps its heartbeat), so a rollout times
    out on it;
  - "fail": it acknowledges the desired version but reports a failure
    instead of applying it: its previous state unchanged plus `fail_message`
    at `fail_path` (default "firmware.error"; dotted keys as a rollout's
    `failure_path`, `\\.` a literal dot), e.g.
    `{"state": {..., "firmware": {..., "error": "simulated failure"}},
    "desired_version": n}`, or the same state and version in upstream's
    `{"reported": ..., "version": n}`.
`behaviour`, `fail_path` and `fail_message` may change while the device
runs; a desired document is handled as they stand when it arrives.
`running_fleet(behaviours={device_id: behaviour})` sets them per device, and
`pulse simulate --fail ID --ignore ID` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Literal, get_args

import aiomqtt

from server import filters, mqtt_url, wire

log = logging.getLogger("pulse.simulator")

_BACKOFF_MAX_S = 5.0

#: What a device does with a desired document (see the module docstring).
Behaviour = Literal["apply", "ignore", "fail"]
BEHAVIOURS: tuple[Behaviour, ...] = get_args(Behaviour)


class SimulatedDevice:
    def __init__(
        self,
        broker: str | mqtt_url.BrokerAddress,
        tenant_id: uuid.UUID,
        device_id: str,
        *,
        credential: tuple[str, str] | None = None,
        heartbeat_s: float = 5.0,
        apply_delay_s: float = 0.5,
        client_id: str | None = None,
        keepalive_s: int = 30,
        dialect: wire.Dialect = wire.Dialect.PULSE,
        upstream_tenant: str | None = None,
        behaviour: Behaviour = "apply",
        fail_path: str = "firmware.error",
        fail_message: str = "simulated failure",
    ) -> None:
        """Args:
        broker: The broker, mqtt://[user:password@]host:port.
        tenant_id, device_id: Who the device is; they make up its topics.
        credential: The device's own (username, secret); it then connects
            as the device, with the device's client id, instead of with the
            URL's (service) user.
        heartbeat_s: Seconds between heartbeats.
        apply_delay_s: How long "applying" a desired document takes.
        client_id: The MQTT client id; unique per broker, since a second
            connection with the same id takes the first one over.
        keepalive_s: MQTT keepalive; the broker fires the will when it hears
            nothing for 1.5 times this long.
        dialect: Whose topics and payloads the device speaks.
        upstream_tenant: The tenant id in upstream's topics (the tenant's
            external id); default its UUID.
        behaviour: "apply", "ignore" or "fail" desired documents (see the
            module docstring); an attribute, which may change at run time.
        fail_path: Where a "fail" report puts `fail_message`: a path into
            the reported state, as a rollout's `failure_path`.
        fail_message: The error value a "fail" report carries.
        """
        address = mqtt_url.parse(broker) if isinstance(broker, str) else broker
        self._broker = address.as_user(*credential) if credential else address
        self.tenant_id = tenant_id
        self.device_id = device_id
        self.heartbeat_s = heartbeat_s
        self.apply_delay_s = apply_delay_s
        if client_id is None:
            client_id = (
                f"{tenant_id}/{device_id}"
                if credential
                else f"sim-{tenant_id.hex[:12]}-{device_id}-{uuid.uuid4().hex[:6]}"
            )
        self.client_id = client_id
        self._keepalive_s = keepalive_s
        self.dialect = dialect
        self._upstream_tenant = upstream_tenant or str(tenant_id)
        self.behaviour = behaviour
        self.fail_path = fail_path
        self.fail_message = fail_message
        #: The state the device runs with and reports, and the desired
        #: version it last acknowledged (applied, or failed on).
        self.state: dict[str, Any] = {}
        self.applied_version = 0
        #: The newest desired version received, whatever became of it.
        self.received_version = 0
        self.heartbeats = 0
        # Every message carries a seq (docs/device-ordering.md), so that a
        # heartbeat still in flight when the device says `offline` cannot
        # bring it back online, whichever evaluator processes it.
        self._seq = wire.SeqClock()
        self._target: tuple[int, dict[str, Any]] | None = None
        self._work = asyncio.Event()
        self._changed = asyncio.Condition()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._dropped = False
        self.connected = asyncio.Event()

    @property
    def behaviour(self) -> Behaviour:
        """What the device does with the next desired document it receives."""
        return self._behaviour

    @behaviour.setter
    def behaviour(self, behaviour: Behaviour) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour must be one of {BEHAVIOURS}, not {behaviour!r}")
        self._behaviour = behaviour

    @property
    def fail_path(self) -> str:
        """Where behaviour "fail" reports `fail_message`."""
        return self._fail_path

    @fail_path.setter
    def fail_path(self, path: str) -> None:
        self._fail_keys = filters.split_twin_path(path)  # or ValueError
        self._fail_path = path

    def topic(self, kind: str) -> str:
        return wire.topic(self.tenant_id, self.device_id, kind)

    def twin_topic(self, kind: str) -> str:
        """Its "twin/reported" or "twin/desired" topic, in its dialect."""
        if self.dialect is wire.Dialect.UPSTREAM:
            return wire.upstream_topic(self._upstream_tenant, self.device_id, kind)
        return self.topic(kind)

    @property
    def _speaks_pulse(self) -> bool:
        return self.dialect is wire.Dialect.PULSE

    async def start(self, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Connect (in the background, reconnecting as needed) and return once
        online."""
        if self._task is not None and not self._task.done():
            raise RuntimeError(f"{self.device_id} is already running")
        self._stopping = self._dropped = False
        self._task = asyncio.create_task(self._run(), name=f"sim-{self.device_id}")
        connected = asyncio.create_task(self.connected.wait())
        await asyncio.wait(
            {connected, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not connected.done():
            connected.cancel()
            await self._cancel()
            raise TimeoutError(f"{self.device_id} could not connect to the broker")

    async def stop(self) -> None:
        """Say `offline` and disconnect cleanly (no will)."""
        self._stopping = True
        client = self._client
        if client is not None and self.connected.is_set() and self._speaks_pulse:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(
                    self.topic("status"),
                    wire.status_payload(wire.OFFLINE, seq=self._seq.next()),
                    qos=1,
                    retain=True,
                )
        await self._cancel()

    async def drop_connection(self) -> None:
        """Cut the connection without DISCONNECT, as a device losing power
        would; the broker then publishes the will. The device stays down
        until `start()`."""
        self._dropped = True
        client = self._client
        if client is not None:
            sock = client._client.socket()  # paho's socket: aiomqtt has no public handle
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await asyncio.wait_for(asyncio.shield(self._task), 5)
        await self._cancel()

    async def report(self) -> None:
        """Publish the current state and applied version now."""
        client = self._client
        if client is None:
            raise RuntimeError(f"{self.device_id} is not connected")
        await client.publish(self.twin_topic("twin/reported"), self._reported(), qos=1)

    async def wait_for_version(self, version: int, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Return once the device has reported `version` or later (applied,
        or failed on as behaviour "fail")."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.applied_version >= version)

    async def _cancel(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _reported(self) -> bytes:
        if self._speaks_pulse:
            return wire.reported(self.state, self.applied_version, seq=self._seq.next())
        return wire.upstream_reported(self.state, self.applied_version)

    async def _run(self) -> None:
        backoff = 0.2
        while not (self._stopping or self._dropped):
            # The will carries the seq of the session's `online`.
            session = self._seq.next()
            lost = wire.status_payload(wire.LOST, seq=session)
            will = aiomqtt.Will(self.topic("status"), lost, qos=1, retain=True)
            try:
                async with aiomqtt.Client(
                    **self._broker.client_options(),
                    identifier=self.client_id,
                    clean_session=True,
                    keepalive=self._keepalive_s,
                    will=will if self._speaks_pulse else None,
                ) as client:
                    self._client = client
                    await client.subscribe(self.twin_topic("twin/desired"), qos=1)
                    if self._speaks_pulse:
                        await client.publish(
                            self.topic("status"),
                            wire.status_payload(wire.ONLINE, seq=session),
                            qos=1,
                            retain=True,
                        )
                    self.connected.set()
                    backoff = 0.2
                    async with asyncio.TaskGroup() as tasks:
                        if self._speaks_pulse:
                            tasks.create_task(self._heartbeat(client))
                        tasks.create_task(self._apply(client))
                        await self._receive(client)
                        # The broker ended the stream; stop the helpers too.
                        raise aiomqtt.MqttError("connection closed")
            except* aiomqtt.MqttError as errors:
                if not (self._stopping or self._dropped):
                    log.info("%s: connection lost (%s); reconnecting", self.device_id, errors)
            finally:
                self.connected.clear()
                self._client = None
            if self._stopping or self._dropped:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _receive(self, client: aiomqtt.Client) -> None:
        desired_topic = self.twin_topic("twin/desired")
        async for message in client.messages:
            # A device trusts no broker to filter for it.
            if message.topic.value != desired_topic:
                continue
            payload = message.payload
            if not isinstance(payload, bytes | bytearray) or not payload:
                continue  # an empty retained message clears the topic
            try:
                state, version = wire.parse_desired(bytes(payload), self.dialect)
            except wire.BadPayload as error:
                log.warning("%s: ignoring a malformed desired message (%s)", self.device_id, error)
                continue
            self.received_version = max(self.received_version, version)
            if self.behaviour == "ignore":
                log.info("%s: ignoring desired version %d, as told", self.device_id, version)
                continue
            pending = self._target[0] if self._target else self.applied_version
            if version > max(pending, self.applied_version):
                if self.behaviour == "fail":
                    # No target is applied before this one (it replaces any
                    # pending), so this is the state the report will follow.
                    state = _with_value(self.state, self._fail_keys, self.fail_message)
                self._target = (version, state)
                self._work.set()

    async def _apply(self, client: aiomqtt.Client) -> None:
        while True:
            await self._work.wait()
            await asyncio.sleep(self.apply_delay_s)
            self._work.clear()
            if self._target is None:
                continue
            version, state = self._target
            self._target = None
            self.state, self.applied_version = state, version
            await client.publish(self.twin_topic("twin/reported"), self._reported(), qos=1)
            async with self._changed:
                self._changed.notify_all()

    async def _heartbeat(self, client: aiomqtt.Client) -> None:
        started = time.monotonic()
        while True:
            uptime = round(time.monotonic() - started, 1)
            await client.publish(
                self.topic("heartbeat"), wire.heartbeat(uptime, seq=self._seq.next()), qos=1
            )
            self.heartbeats += 1
            await asyncio.sleep(self.heartbeat_s)


def _with_value(state: dict[str, Any], keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of `state` with `value` at the path `keys`, making (or
    replacing with) objects along the way."""
    *parents, last = keys
    result = dict(state)
    node = result
    for key in parents:
        child = node.get(key)
        child = dict(child) if isinstance(child, dict) else {}
        node[key] = child
        node = child
    node[last] = value
    return result


def device_ids(count: int, prefix: str = "DEVICE-") -> list[str]:
    """`DEVICE-01`, `DEVICE-02`, ...: the demo tenant's naming."""
    return [f"{prefix}{n:02d}" for n in range(1, count + 1)]


@contextlib.asynccontextmanager
async def running_fleet(
    broker: str,
    tenant_id: uuid.UUID,
    device_ids: Iterable[str],
    *,
    credentials: Mapping[str, tuple[str, str]] | None = None,
    heartbeat_s: float = 5.0,
    apply_delay_s: float = 0.5,
    dialect: wire.Dialect = wire.Dialect.PULSE,
    upstream_tenant: str | None = None,
    behaviours: Mapping[str, Behaviour] | None = None,
) -> AsyncIterator[list[SimulatedDevice]]:
    """Simulated devices, online for as long as the context lasts and then
    stopped cleanly (`offline`). `credentials` maps a device id to its own
    (username, secret); devices without one connect as the URL's user.
    `behaviours` maps a device id to its behaviour (default "apply"); each
    must name a device of the fleet. `dialect` and `upstream_tenant` are
    SimulatedDevice's."""
    credentials = credentials or {}
    behaviours = behaviours or {}
    device_ids = list(device_ids)
    if unknown := sorted(set(behaviours) - set(device_ids)):
        raise ValueError(f"behaviours for devices not in the fleet: {', '.join(unknown)}")
    devices = [
        SimulatedDevice(
            broker,
            tenant_id,
            d,
            credential=credentials.get(d),
            heartbeat_s=heartbeat_s,
            apply_delay_s=apply_delay_s,
            dialect=dialect,
            upstream_tenant=upstream_tenant,
            behaviour=behaviours.get(d, "apply"),
        )
        for d in device_ids
    ]
    try:
        for device in devices:
            await device.start()
        log.info("simulating %d devices of tenant %s", len(devices), tenant_id)
        for device_id, behaviour in sorted(behaviours.items()):
            if behaviour != "apply":
                log.info("%s will %s desired state", device_id, behaviour)
        yield devices
    finally:
        for device in devices:
            await device.stop()
