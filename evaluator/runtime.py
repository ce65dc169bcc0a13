"""The evaluator's MQTT loop: one persistent-session connection that
reconnects and resubscribes by itself, and dispatches device messages to the
capability handlers (twin ingest, liveness, ...).

Handlers must be quick in `handle` (append to a batch); the slow part (SQL)
happens in their own `run` loop, so a burst of messages costs one round trip
per batch rather than one per message.

**Acknowledged after commit.** A QoS 1 message is acknowledged to the broker
only once every handler that received it has called `message.settle()`,
which each does after the statement storing the message's effect committed
(or on deciding to ignore it). A process that dies leaves its unacknowledged
messages with the broker, which delivers them again when the session
resumes; handlers are idempotent, so a redelivery changes nothing twice.
paho-mqtt does the acknowledging (`manual_ack`), reached through aiomqtt's
`Client._client`: aiomqtt 2.5 has no option for it (aiomqtt issue #345).

**Persistent session.** MQTT 5 with clean start off and a session expiry, so
messages published while the evaluator is away are kept for it; the broker
sends at most `inflight_max` unacknowledged messages at a time (the MQTT 5
receive maximum), so when the database stalls the evaluator holds a bounded
window and the broker keeps the rest. A broker that refuses MQTT 5 (the
embedded amqtt) gets MQTT 3.1.1 with clean session off; it then bounds the
window itself (the embedded broker's `max_inflight`, Mosquitto's
`max_inflight_messages`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from server import mqtt_url, wire
from server.observability import metrics

log = logging.getLogger("pulse.evaluator")

_BACKOFF_MAX_S = 10.0
_PUBLISHES_EXPECTED = 4096
# CONNACK codes for "this protocol version is not supported": MQTT 3.1.1's
# 1 and MQTT 5's 0x84.
_UNSUPPORTED_PROTOCOL = frozenset({1, 0x84})


class Handler(Protocol):
    #: The message kinds this handler receives; "*" for every device message.
    kinds: frozenset[str]

    async def handle(self, message: wire.DeviceMessage) -> None:
        """Take the message; call `message.settle()` once its effect committed."""

    async def run(self, publisher: Publisher) -> None:
        """Background work (flushing batches, sweeps) until cancelled."""


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None: ...


class _AckWindow:
    """The messages of one connection received and not yet acknowledged.

    A message is acknowledged as soon as every handler settled it, not in
    arrival order as MQTT 3.1.1 and 5 ask of a receiver: a device whose
    messages are held back (the liveness hold-down of a flapping device)
    would otherwise hold up the acknowledgements of every message behind it
    and, with the window full, the whole fleet. Brokers match a PUBACK by
    packet id (Mosquitto and the embedded broker are tested with it). A
    window whose connection ended acknowledges nothing more: the broker
    delivers those messages again on the next connection.
    """

    __slots__ = ("_client", "_reading", "open", "unacknowledged")

    def __init__(self, client: Any, reading: _Reading) -> None:
        self._client = client  # paho's Client
        self._reading = reading
        self.unacknowledged = 0
        self.open = True

    def add(self, mid: int, qos: int, handlers: int) -> _Delivery:
        self.unacknowledged += 1
        return _Delivery(self, mid, qos, handlers)

    def ack(self, mid: int, qos: int) -> None:
        self.unacknowledged -= 1
        if self.open:
            self._client.ack(mid, qos)
            self._reading.release()

    def unheld(self) -> None:
        """A message that needs no acknowledgement from us was dispatched."""
        self._reading.release()


class _Reading:
    """Reads the connection's socket when it is readable, unless more than
    `limit` messages read from it are not yet acknowledged (QoS 0: not yet
    dispatched).

    The broker should never send that many (the receive maximum), but
    Mosquitto 2.0.11 does once acknowledgements flow while messages are
    queued: it then sent a whole backlog at once, which aiomqtt's unbounded
    queue took in. Unread, the rest stays in TCP buffers and the broker.
    This replaces aiomqtt's reader (registered by its `_on_socket_open`,
    which offers no way to pause it) with the same loop.

    It pauses only once armed, after the SUBSCRIBE was answered: a resumed
    session's queued messages may come before the SUBACK, and with reading
    paused the SUBACK would never be read (nothing is consumed until then).
    """

    def __init__(self, client: aiomqtt.Client, limit: int) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._fd = -1
        self._limit = limit
        self.held = 0
        self.armed = False
        self.paused = False
        #: How often reading was paused (the broker sent past the window).
        self.pauses = 0
        paho = client._client
        aiomqtt_open = paho.on_socket_open
        aiomqtt_message = paho.on_message
        assert aiomqtt_open is not None and aiomqtt_message is not None

        def on_socket_open(paho_client: Any, userdata: Any, sock: Any) -> None:
            aiomqtt_open(paho_client, userdata, sock)
            # paho calls this from the thread that connects; aiomqtt's reader
            # is added through call_soon_threadsafe, and ours replaces it
            # right after.
            self._loop.call_soon_threadsafe(self._open, sock.fileno())

        def on_message(paho_client: Any, userdata: Any, message: Any) -> None:
            self.held += 1
            if self.held > self._limit and self.armed:
                self._pause()
            aiomqtt_message(paho_client, userdata, message)

        paho.on_socket_open = on_socket_open
        paho.on_message = on_message

    def _open(self, fd: int) -> None:
        self._fd = fd
        self._loop.add_reader(fd, self._read)

    def _read(self) -> None:
        paho = self._client._client
        try:
            paho.loop_read()
            # TLS sockets can hold decoded bytes that select() does not see.
            sock = paho.socket()
            while sock is not None and getattr(sock, "pending", lambda: 0)() > 0:
                paho.loop_read()
        except Exception as exc:
            disconnected = self._client._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)

    def arm(self) -> None:
        self.armed = True
        if self.held > self._limit:
            self._pause()

    def _pause(self) -> None:
        if not self.paused and self._fd >= 0:
            if not self.pauses:
                log.warning(
                    "the broker sent more than the receive maximum; reading paused until"
                    " acknowledgements catch up (said once per connection)"
                )
            self.paused = True
            self.pauses += 1
            self._loop.remove_reader(self._fd)

    def release(self) -> None:
        """One message read is done with."""
        self.held -= 1
        if self.paused and self.held <= self._limit:
            self.paused = False
            sock = self._client._client.socket()
            if sock is not None and sock.fileno() == self._fd:
                self._loop.add_reader(self._fd, self._read)


class _Delivery:
    __slots__ = ("mid", "qos", "waiting", "window")

    def __init__(self, window: _AckWindow, mid: int, qos: int, handlers: int) -> None:
        self.window = window
        self.mid = mid
        self.qos = qos
        self.waiting = handlers

    def settle(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.window.ack(self.mid, self.qos)


def _nothing() -> None:
    return None


def _refused(code: int | ReasonCode) -> bool:
    """Whether a SUBACK return code (MQTT 3.1.1) or reason code (5) refuses."""
    if isinstance(code, ReasonCode):
        return code.is_failure
    return code >= 0x80


class Evaluator:
    def __init__(
        self,
        broker: str | mqtt_url.BrokerAddress,
        handlers: Sequence[Handler],
        *,
        client_id: str = "pulse-evaluator",
        shared_group: str | None = None,
        inflight_max: int = 1000,
        session_expiry_s: int = 86400,
        ack_after_commit: bool = True,
    ) -> None:
        """Args:
        broker: The broker's URL or address, with the evaluator's credentials.
        handlers: The capabilities, each given the message kinds it names.
        client_id: The session's name; keep it across restarts so that the
            broker hands over what arrived meanwhile.
        shared_group: Several evaluators with the same group split the device
            topics between them ($share) instead of each seeing them all.
        inflight_max: Most messages delivered and not yet acknowledged.
        session_expiry_s: How long the broker keeps the session of an
            evaluator that is away (MQTT 5).
        ack_after_commit: False acknowledges on receipt, as aiomqtt does by
            default: only for measuring what acknowledging after commit costs.
        """
        self._broker = mqtt_url.parse(broker) if isinstance(broker, str) else broker
        self._handlers = list(handlers)
        self._client_id = client_id
        share = f"$share/{shared_group}/" if shared_group else ""
        # Apart, so that a benchmark can narrow ours to its own tenant.
        self._subscription = share + wire.SUBSCRIPTION
        self._upstream_subscription = share + wire.UPSTREAM_SUBSCRIPTION
        self._inflight_max = inflight_max
        self._session_expiry_s = session_expiry_s
        self._ack_after_commit = ack_after_commit
        self._protocol = aiomqtt.ProtocolVersion.V5
        # Until a connection succeeded, a failed one may be the protocol's.
        self._protocol_known = False
        self._protocol_tries = 0
        self._routes: dict[str, list[Handler]] = {
            kind: [h for h in self._handlers if kind in h.kinds or "*" in h.kinds]
            for kind in wire.KINDS
        }
        self._client: aiomqtt.Client | None = None
        self._window: _AckWindow | None = None
        self._connected = asyncio.Event()
        self._mqtt_up = metrics.MQTT_CONNECTED.labels(client_id)
        self._mqtt_connects = metrics.MQTT_CONNECTS.labels(client_id)
        self.failed = asyncio.Event()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.received = 0
        #: Whether the broker still had this evaluator's session at the last
        #: connection (CONNACK session-present).
        self.session_present = False

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Publish once connected; raises aiomqtt.MqttError if the connection drops."""
        await self._connected.wait()
        assert self._client is not None
        await self._client.publish(topic, payload, qos=qos, retain=retain)

    @property
    def connected(self) -> asyncio.Event:
        return self._connected

    @property
    def unacknowledged(self) -> int:
        """Messages received and not yet acknowledged to the broker."""
        return self._window.unacknowledged if self._window is not None else 0

    async def run(self) -> None:
        """Consume until cancelled. A handler that fails (a bug: transient
        errors are retried inside) stops everything, says so at once and
        sets `failed`, so that the process exits instead of staying up
        disconnected."""
        try:
            async with asyncio.TaskGroup() as tasks:
                for handler in self._handlers:
                    tasks.create_task(handler.run(self))
                tasks.create_task(self._consume_forever())
        except Exception:
            log.critical("the evaluator stopped", exc_info=True)
            self.failed.set()
            raise

    def _new_client(self) -> tuple[aiomqtt.Client, _Reading]:
        options: dict[str, Any] = {}
        if self._protocol is aiomqtt.ProtocolVersion.V5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._session_expiry_s
            properties.ReceiveMaximum = min(self._inflight_max, 65535)
            options.update(clean_start=False, properties=properties)
        else:
            options.update(clean_session=False)
        client = aiomqtt.Client(
            **self._broker.client_options(),
            identifier=self._client_id,
            protocol=self._protocol,
            keepalive=30,
            **options,
        )
        # A publisher's batch (two topics per device with upstream
        # compatibility) waits for its PUBACKs at once by design; aiomqtt's
        # default warns, once per publish, from the eleventh on.
        client.pending_calls_threshold = _PUBLISHES_EXPECTED
        paho = client._client
        if self._ack_after_commit:
            paho.manual_ack_set(True)
        # aiomqtt drops the CONNACK flags; session-present is in them.
        on_connect = paho.on_connect
        assert on_connect is not None

        def remember_session(*args: Any) -> None:
            self.session_present = bool(args[2].session_present)
            on_connect(*args)

        paho.on_connect = remember_session
        return client, _Reading(client, self._inflight_max)

    async def _consume_forever(self) -> None:
        backoff = 0.5
        while True:
            try:
                client, reading = self._new_client()
                async with client:
                    await self._subscribe(client)
                    reading.arm()
                    self._window = _AckWindow(client._client, reading)
                    self._client = client
                    self._connected.set()
                    self._mqtt_up.set(1)
                    self._mqtt_connects.inc()
                    self._protocol_known = True
                    log.info(
                        "evaluator connected to %s (MQTT %s, session %s)",
                        self._broker.safe_url,
                        "5" if self._protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1",
                        "resumed" if self.session_present else "new",
                    )
                    backoff = 0.5
                    async for message in client.messages:
                        await self._dispatch(message)
            except MqttConnectError as error:
                code = getattr(error.rc, "value", error.rc)
                if code in _UNSUPPORTED_PROTOCOL and self._try_other_protocol():
                    continue
                log.warning("MQTT connection refused (%s); retrying in %.1fs", error, backoff)
            except aiomqtt.MqttError as error:
                # Some brokers close the connection on an MQTT 5 CONNECT
                # without a CONNACK saying why.
                if not self._protocol_known and self._try_other_protocol():
                    continue
                log.warning("MQTT connection lost (%s); retrying in %.1fs", error, backoff)
            finally:
                self._connected.clear()
                self._mqtt_up.set(0)
                self._client = None
                if self._window is not None:
                    self._window.open = False
                    self._window = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        """Both dialects' filters in one SUBSCRIBE. A refused filter (a
        broker whose ACLs predate upstream's topics) is said loudly, since
        those devices' messages would otherwise vanish without a trace."""
        filters = [self._subscription, self._upstream_subscription]
        codes: Sequence[int | ReasonCode] = await client.subscribe([(f, 1) for f in filters])
        for topic_filter, code in zip(filters, codes, strict=True):
            if _refused(code):
                log.error("the broker refused the evaluator's subscription to %r", topic_filter)

    def _try_other_protocol(self) -> bool:
        """Switch between MQTT 5 and 3.1.1; False once both were just tried
        (then the failure is not the protocol's: back off as usual)."""
        self._protocol_tries += 1
        if self._protocol_tries % 2 == 0:
            return False
        self._protocol = (
            aiomqtt.ProtocolVersion.V311
            if self._protocol is aiomqtt.ProtocolVersion.V5
            else aiomqtt.ProtocolVersion.V5
        )
        log.info("trying MQTT %s", "5" if self._protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1")
        return True

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        self.received += 1
        window = self._window
        try:
            tenant_id, device_id, kind, dialect = wire.parse_topic(message.topic.value)
        except wire.BadTopic as error:
            self.rejected["bad_topic"] += 1
            metrics.INGEST_MESSAGES.labels("bad_topic").inc()
            metrics.INGEST_REJECTED.labels("bad_topic", "bad_topic").inc()
            log.warning("rejected message on %r: %s", message.topic.value[:200], error)
            handlers: list[Handler] = []
        else:
            metrics.INGEST_MESSAGES.labels(kind).inc()
            handlers = self._routes.get(kind, [])
        settle = _nothing
        if self._ack_after_commit and message.qos > 0 and window is not None:
            settle = window.add(message.mid, message.qos, max(len(handlers), 1)).settle
            if not handlers:
                settle()  # nothing will store it
        elif window is not None:
            window.unheld()
        if not handlers:
            return
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        device_message = wire.DeviceMessage(
            tenant_id=tenant_id,
            device_id=device_id,
            kind=kind,
            payload=bytes(payload),
            received_at=datetime.now(UTC),
            retain=message.retain,
            settle=settle,
            dialect=dialect,
        )
        for handler in handlers:
            await handler.handle(device_message)
