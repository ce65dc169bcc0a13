"""The embedded broker delivering to a subscriber that acknowledges QoS 1/2
only once it has stored the message (as the evaluator does, with paho's
manual acknowledgements): a bound on the unacknowledged deliveries per
session, redelivery to a persistent session after its connection was lost,
session expiry, keep-alive, and the refusal of MQTT 5 (the evaluator then
falls back to 3.1.1).

Connections are lost through `Link`, a relay that fails like a network, so
that the broker sees a real reset (or silence) and no DISCONNECT.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from evaluator.broker import EmbeddedBroker, SessionState
from server.broker_access.authenticator import Authenticator
from server.db import Database
from tests.broker.conftest import MqttLogin, ServiceLoginFactory

pytestmark = pytest.mark.timeout(30)

DATA = "pulse/delivery-test/data"
SENTINEL = "pulse/delivery-test/sentinel"
LIMIT = 50
COUNT = 500
#: Long enough for the broker to have sent anything it was going to send.
QUIET_S = 0.3


@contextlib.asynccontextmanager
async def embedded(**options: Any) -> AsyncIterator[tuple[EmbeddedBroker, int]]:
    broker = EmbeddedBroker(**options)
    url = await broker.start()
    try:
        yield broker, int(url.rsplit(":", 1)[1])
    finally:
        await broker.stop()


async def eventually(condition: Callable[[], bool], deadline_s: float = 5.0) -> None:
    """Wait for `condition`, failing past the deadline."""
    async with asyncio.timeout(deadline_s):
        while not condition():  # noqa: ASYNC110 (nothing to wait on: broker or paho state)
            await asyncio.sleep(0.01)


def new_client_id() -> str:
    return f"delivery-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Delivery:
    topic: str
    payload: bytes
    mid: int
    qos: int
    dup: bool


class Subscriber:
    """An MQTT 3.1.1 client that acknowledges QoS 1/2 deliveries only when
    told (paho's manual ack) and records them in order of arrival."""

    def __init__(
        self,
        port: int,
        client_id: str,
        *,
        login: MqttLogin | None = None,
        clean_session: bool = False,
        keepalive: int = 60,
    ) -> None:
        self.client = aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier=client_id,
            username=login.username if login else None,
            password=login.password if login else None,
            clean_session=clean_session,
            keepalive=keepalive,
            timeout=5,
        )
        self.deliveries: list[Delivery] = []
        self.acknowledged = 0
        self.session_present: bool | None = None
        paho = self.paho
        paho.manual_ack_set(True)
        on_connect = paho.on_connect
        assert on_connect is not None

        # aiomqtt drops the CONNACK flags, session-present among them.
        def remember_session(*args: Any) -> None:
            self.session_present = bool(args[2].session_present)
            on_connect(*args)

        paho.on_connect = remember_session
        # Recorded right away, instead of aiomqtt's queue.
        paho.on_message = self._on_message

    @property
    def paho(self) -> PahoClient:
        return self.client._client

    def _on_message(self, _client: PahoClient, _userdata: Any, message: MQTTMessage) -> None:
        self.deliveries.append(
            Delivery(
                message.topic, bytes(message.payload), message.mid, message.qos, bool(message.dup)
            )
        )

    def on(self, topic: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.topic == topic]

    def payloads(self, topic: str) -> list[bytes]:
        return [d.payload for d in self.on(topic)]

    @property
    def unacknowledged(self) -> int:
        return sum(1 for d in self.deliveries[self.acknowledged :] if d.qos > 0)

    def ack_all(self) -> None:
        for delivery in self.deliveries[self.acknowledged :]:
            if delivery.qos > 0:
                self.paho.ack(delivery.mid, delivery.qos)
        self.acknowledged = len(self.deliveries)

    async def receive_all(self, count: int, *, limit: int = LIMIT) -> None:
        """Acknowledge as deliveries come until `count` arrived on DATA,
        checking that no more than `limit` are ever unacknowledged."""
        async with asyncio.timeout(10):
            while len(self.on(DATA)) < count:
                assert self.unacknowledged <= limit
                self.ack_all()
                await asyncio.sleep(0.005)
        assert self.unacknowledged <= limit
        self.ack_all()

    async def lost(self) -> None:
        """Wait until the client noticed its connection is gone."""
        await eventually(lambda: not self.paho.is_connected())

    async def __aenter__(self) -> Subscriber:
        await self.client.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Leaving does not fail on a connection that is already gone.
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(exc_type, exc, tb)
        # aiomqtt keeps why it was lost without anyone asking (asyncio would
        # complain of an exception never retrieved).
        lost = self.client._disconnected
        if lost.done() and not lost.cancelled():
            lost.exception()


class Link:
    """A TCP relay to the broker that fails like a network: `cut` resets
    both sides (RST, no DISCONNECT: a crash, a killed process), `freeze`
    stops relaying and closes nothing (a connection dead without a FIN)."""

    def __init__(self, broker_port: int) -> None:
        self._broker_port = broker_port
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: list[asyncio.StreamWriter] = []
        self._pumps: list[asyncio.Task[None]] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Link:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._broker_port)
        self._writers += [writer, up_writer]
        self._pumps += [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                data = await reader.read(65536)
                await self._flowing.wait()
                if not data:
                    writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

    def freeze(self) -> None:
        self._flowing.clear()

    def cut(self) -> None:
        for writer in self._writers:
            sock = writer.get_extra_info("socket")
            if sock is not None and sock.fileno() >= 0:
                # Closing with a zero linger sends a reset.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._writers.clear()


@contextlib.asynccontextmanager
async def publisher(port: int, login: MqttLogin | None = None) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=login.identifier if login else new_client_id(),
        username=login.username if login else None,
        password=login.password if login else None,
        timeout=5,
    ) as client:
        yield client


async def publish_numbered(client: aiomqtt.Client, numbers: Sequence[int], qos: int = 1) -> None:
    for number in numbers:
        await client.publish(DATA, str(number).encode(), qos=qos)


def numbered(numbers: Sequence[int]) -> list[bytes]:
    return [str(number).encode() for number in numbers]


# -- the bound on unacknowledged deliveries ------------------------------------


async def check_bounded(
    broker: EmbeddedBroker,
    port: int,
    qos: int,
    *,
    subscriber_login: MqttLogin | None = None,
    publisher_login: MqttLogin | None = None,
    limit: int = LIMIT,
    count: int = COUNT,
) -> None:
    client_id = subscriber_login.identifier if subscriber_login else new_client_id()
    async with (
        Subscriber(port, client_id, login=subscriber_login) as sub,
        publisher(port, publisher_login) as pub,
    ):
        await sub.client.subscribe(DATA, qos=qos)
        # A QoS 0 subscription is outside the bound: the sentinel, published
        # after the data, shows that all of it went through the broker.
        await sub.client.subscribe(SENTINEL, qos=0)
        await publish_numbered(pub, range(count), qos)
        await pub.publish(SENTINEL, b"end", qos=0)

        await eventually(lambda: sub.payloads(SENTINEL) == [b"end"])
        held = SessionState(connected=True, unacknowledged=limit, queued=count - limit)
        await eventually(lambda: broker.session(client_id) == held)
        await asyncio.sleep(QUIET_S)
        assert sub.payloads(DATA) == numbered(range(limit))

        await sub.receive_all(count, limit=limit)
        assert sub.payloads(DATA) == numbered(range(count))
        assert not any(d.dup for d in sub.deliveries)
        assert {d.qos for d in sub.on(DATA)} == {qos}
        await eventually(lambda: broker.session(client_id) == SessionState(True, 0, 0))


@pytest.mark.parametrize("qos", [1, 2])
async def test_unacknowledged_deliveries_are_bounded_per_session(qos: int) -> None:
    async with embedded(max_inflight=LIMIT) as (broker, port):
        await check_bounded(broker, port, qos)


async def test_the_bound_holds_with_access_control(
    db: Database, service_login: ServiceLoginFactory
) -> None:
    async with embedded(authenticator=Authenticator(db), max_inflight=5) as (broker, port):
        await check_bounded(
            broker,
            port,
            1,
            subscriber_login=await service_login(),
            publisher_login=await service_login(),
            limit=5,
            count=40,
        )


async def test_qos_0_is_not_held_back() -> None:
    async with (
        embedded(max_inflight=1) as (_, port),
        Subscriber(port, new_client_id()) as sub,
        publisher(port) as pub,
    ):
        await sub.client.subscribe(DATA, qos=0)
        await publish_numbered(pub, range(20), qos=0)
        await eventually(lambda: sub.payloads(DATA) == numbered(range(20)))


# -- redelivery ------------------------------------------------------------------


async def test_a_cut_connection_gets_its_unacknowledged_deliveries_again() -> None:
    client_id = new_client_id()
    async with embedded(max_inflight=LIMIT) as (broker, port), publisher(port) as pub:
        async with Link(port) as link, Subscriber(link.port, client_id) as first:
            await first.client.subscribe(DATA, qos=1)
            await publish_numbered(pub, range(COUNT))
            await eventually(lambda: len(first.on(DATA)) == LIMIT)
            await eventually(lambda: broker.session(client_id) == SessionState(True, LIMIT, 450))
            link.cut()
            await first.lost()
            await eventually(lambda: broker.session(client_id) == SessionState(False, LIMIT, 450))

        # Published while the subscriber is away.
        await publish_numbered(pub, range(COUNT, COUNT + 100))
        await eventually(lambda: broker.session(client_id) == SessionState(False, LIMIT, 550))

        async with Subscriber(port, client_id) as second:
            assert second.session_present
            await second.receive_all(COUNT + 100)
            assert second.payloads(DATA) == numbered(range(COUNT + 100))
            # Sent before, and marked so [MQTT-4.4.0-1]; nothing else twice.
            assert [d.dup for d in second.on(DATA)] == [True] * LIMIT + [False] * (COUNT + 50)
            await eventually(lambda: broker.session(client_id) == SessionState(True, 0, 0))


async def test_a_connection_taken_over_hands_its_deliveries_to_the_new_one() -> None:
    """The subscriber reconnects before the broker noticed that its old
    connection is dead (no FIN came): the broker closes the old one."""
    client_id = new_client_id()
    async with (
        embedded(max_inflight=LIMIT) as (broker, port),
        publisher(port) as pub,
        Link(port) as link,
        Subscriber(link.port, client_id) as first,
    ):
        await first.client.subscribe(DATA, qos=1)
        await publish_numbered(pub, range(COUNT))
        await eventually(lambda: len(first.on(DATA)) == LIMIT)
        link.freeze()

        async with Subscriber(port, client_id) as second:
            assert second.session_present
            await second.receive_all(COUNT)
            assert second.payloads(DATA) == numbered(range(COUNT))
            assert [d.dup for d in second.on(DATA)] == [True] * LIMIT + [False] * (COUNT - LIMIT)
            # The session stays with the new connection: amqtt marked it
            # disconnected once the old one was closed, and queued.
            await eventually(lambda: broker.session(client_id) == SessionState(True, 0, 0))
            await pub.publish(DATA, b"later", qos=1)
            await eventually(lambda: second.payloads(DATA)[-1:] == [b"later"])
            second.ack_all()
        link.cut()
        await first.lost()


async def test_a_silent_connection_is_closed_after_one_and_a_half_keep_alives() -> None:
    client_id = new_client_id()
    async with (
        embedded() as (broker, port),
        Link(port) as link,
        Subscriber(link.port, client_id, keepalive=1) as sub,
    ):
        await sub.client.subscribe(DATA, qos=1)
        assert broker.session(client_id) == SessionState(True, 0, 0)
        link.freeze()
        await eventually(lambda: broker.session(client_id) == SessionState(False, 0, 0))
        link.cut()
        await sub.lost()


# -- session expiry --------------------------------------------------------------


async def test_a_session_expires_when_its_client_stays_away() -> None:
    client_id = new_client_id()
    async with embedded(session_expiry_s=1.0) as (broker, port), publisher(port) as pub:
        async with Subscriber(port, client_id) as sub:
            assert sub.session_present is False
            await sub.client.subscribe(DATA, qos=1)

        # Back within the expiry: the session is there with what was queued.
        await publish_numbered(pub, range(3))
        await eventually(lambda: broker.session(client_id) == SessionState(False, 0, 3))
        async with Subscriber(port, client_id) as sub:
            assert sub.session_present is True
            await sub.receive_all(3)
            assert sub.payloads(DATA) == numbered(range(3))
            # A connected session does not expire, however long it stays.
            await asyncio.sleep(1.5)
            await publish_numbered(pub, [3])
            await sub.receive_all(4)
            assert sub.payloads(DATA) == numbered(range(4))

        # Away longer: the session is deleted with what was queued for it.
        await publish_numbered(pub, range(10, 13))
        await eventually(lambda: broker.session(client_id) == SessionState(False, 0, 3))
        await eventually(lambda: broker.session(client_id) is None)
        async with Subscriber(port, client_id) as sub:
            assert sub.session_present is False
            # Its subscription went with it.
            await sub.client.subscribe(DATA, qos=1)
            await pub.publish(DATA, b"fresh", qos=1)
            await sub.receive_all(1)
            assert sub.payloads(DATA) == [b"fresh"]


# -- MQTT 5 ----------------------------------------------------------------------

#: What paho reports for CONNACK return code 1 (unacceptable protocol version)
#: to an MQTT 5 CONNECT: the MQTT 5 reason code 0x84.
UNSUPPORTED_PROTOCOL_VERSION = ReasonCode(PacketTypes.CONNACK, "Unsupported protocol version")


def mqtt5_properties() -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    properties.ReceiveMaximum = 100
    return properties


async def refusal(client: aiomqtt.Client) -> ReasonCode:
    """The CONNACK refusal `client` gets, failing if none comes quickly (the
    client's own timeout is longer)."""
    with pytest.raises(MqttConnectError) as refused:
        async with asyncio.timeout(3), client:
            pass
    rc = refused.value.rc
    assert isinstance(rc, ReasonCode)
    return rc


@pytest.mark.parametrize("variant", ["bare", "evaluator-like", "with-will"])
async def test_an_mqtt5_connect_is_refused_at_once(variant: str) -> None:
    # amqtt parsed these as 3.1.1: with credentials (the evaluator's) it then
    # waited for bytes that never came, with a will it closed the connection
    # without a CONNACK (which aiomqtt too waits on until its timeout).
    variants: dict[str, dict[str, Any]] = {
        "bare": {},
        "evaluator-like": {
            "username": "someone",
            "password": "secret",
            "clean_start": False,
            "properties": mqtt5_properties(),
        },
        "with-will": {"will": aiomqtt.Will("pulse/delivery-test/will", b"gone", 1)},
    }
    options = variants[variant]
    async with embedded() as (_, port):
        client = aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier=new_client_id(),
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=10,
            **options,
        )
        rc = await refusal(client)
    assert rc == UNSUPPORTED_PROTOCOL_VERSION
    assert (rc.value, str(rc)) == (0x84, "Unsupported protocol version")


async def test_an_mqtt5_connect_is_refused_with_access_control(
    db: Database, service_login: ServiceLoginFactory
) -> None:
    login = await service_login()
    async with embedded(authenticator=Authenticator(db)) as (_, port):
        client = aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier=login.identifier,
            username=login.username,
            password=login.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=mqtt5_properties(),
            timeout=10,
        )
        assert await refusal(client) == UNSUPPORTED_PROTOCOL_VERSION
        # The same client in 3.1.1, as the evaluator falls back to.
        async with Subscriber(port, login.identifier, login=login) as sub:
            assert sub.session_present is False


async def test_an_mqtt5_connect_gets_connack_1_and_the_connection_closed() -> None:
    def string(value: bytes) -> bytes:
        return len(value).to_bytes(2, "big") + value

    properties = b"\x05\x11" + (3600).to_bytes(4, "big")  # session expiry interval
    variable_header = string(b"MQTT") + b"\x05" + b"\xc0" + (60).to_bytes(2, "big") + properties
    body = variable_header + string(b"c1") + string(b"user") + string(b"pass")
    async with embedded() as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"\x10" + bytes([len(body)]) + body)
            async with asyncio.timeout(3):
                # Up to the end of the stream: the broker closes it.
                assert await reader.read() == b"\x20\x02\x00\x01"
        finally:
            writer.close()
