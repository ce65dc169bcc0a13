"""The embedded broker enforcing the access rules, seen from real MQTT clients.

"Receives nothing" is shown without waiting: after the forbidden message the
same connection sends an allowed one (the sentinel), and the subscriber must
get the sentinel first. The broker handles one connection's packets in order,
so a forbidden message that got through would arrive before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiomqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode
from pulse_client import AsyncPulseClient

from evaluator.broker import EmbeddedBroker
from server.auth import Role
from server.broker_access.authenticator import Authenticator
from server.credentials import store
from server.db import Database
from tests.broker.conftest import (
    DeviceLoginFactory,
    MqttLogin,
    ServiceLoginFactory,
    closed_within,
    lost,
)
from tests.conftest import ClientFactory, TenantFactory

pytestmark = pytest.mark.timeout(60)

#: The CONNACK return codes of MQTT 3.1.1 (paho reports them as MQTT 5 reason codes).
BAD_USERNAME_OR_PASSWORD = "Bad user name or password"
NOT_AUTHORIZED = "Not authorized"
EVALUATOR_CLIENT_ID = "pulse-evaluator"
#: The broker rechecks every 2 s; a revoked connection must be gone within this.
CLOSE_DEADLINE_S = 5.0


@dataclass
class Broker:
    embedded: EmbeddedBroker
    port: int
    authenticator: Authenticator | None

    def client(
        self,
        login: MqttLogin | None = None,
        *,
        identifier: str | None = None,
        password: str | None = None,
        clean_session: bool | None = None,
        will: aiomqtt.Will | None = None,
    ) -> aiomqtt.Client:
        """A client presenting `login` (or no credentials); `identifier` and
        `password` override the login's."""
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            username=login.username if login else None,
            password=password if password is not None else (login.password if login else None),
            identifier=identifier or (login.identifier if login else f"anon-{uuid.uuid4().hex}"),
            clean_session=clean_session,
            will=will,
            timeout=5,
        )


async def _started(authenticator: Authenticator | None) -> tuple[EmbeddedBroker, int]:
    embedded = EmbeddedBroker(authenticator=authenticator)
    url = await embedded.start()
    return embedded, int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
async def broker(db: Database) -> AsyncIterator[Broker]:
    """An embedded broker checking the test database's credentials."""
    authenticator = Authenticator(db)
    embedded, port = await _started(authenticator)
    try:
        yield Broker(embedded, port, authenticator)
    finally:
        await embedded.stop()


@pytest.fixture(scope="module")
async def open_broker() -> AsyncIterator[Broker]:
    """An embedded broker without access control."""
    embedded, port = await _started(None)
    try:
        yield Broker(embedded, port, None)
    finally:
        await embedded.stop()


async def next_message(client: aiomqtt.Client, timeout: float = 5.0) -> aiomqtt.Message:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        return await anext(client.messages)


async def until(client: aiomqtt.Client, sentinel: bytes) -> AsyncIterator[aiomqtt.Message]:
    """The messages `client` receives up to the one whose payload is `sentinel`."""
    async with asyncio.timeout(5):
        async for message in client.messages:
            yield message
            if message.payload == sentinel:
                return


async def topics_until(
    client: aiomqtt.Client, sentinel: bytes, *, live_only: bool = False
) -> list[str]:
    """The topics of the messages `client` receives, up to the one whose
    payload is `sentinel` (included); `live_only` skips retained messages
    (other tests' on this broker, sent on subscribing to `pulse/#`)."""
    return [m.topic.value async for m in until(client, sentinel) if not (live_only and m.retain)]


async def refused(broker: Broker, client: aiomqtt.Client) -> str:
    """The reason `client` was refused, by the broker's CONNACK."""
    with pytest.raises(aiomqtt.MqttCodeError) as caught:
        async with client:
            pass
    rc = caught.value.rc
    assert isinstance(rc, ReasonCode), f"not refused by CONNACK: {caught.value}"
    return str(rc)


async def service_subscribed_to_all(  # the evaluator's view
    broker: Broker, service_login: ServiceLoginFactory, stack: contextlib.AsyncExitStack
) -> aiomqtt.Client:
    service = await stack.enter_async_context(broker.client(await service_login()))
    await service.subscribe("pulse/#", qos=1)
    return service


# -- CONNECT -------------------------------------------------------------------


async def test_connect_without_valid_credentials_is_refused(
    broker: Broker, device_login: DeviceLoginFactory, service_login: ServiceLoginFactory
) -> None:
    assert broker.authenticator is not None
    counts = broker.authenticator.refused
    d1 = await device_login("D1")
    svc = await service_login()
    before = counts.copy()

    assert await refused(broker, broker.client(identifier=d1.identifier)) == (
        BAD_USERNAME_OR_PASSWORD
    )
    assert await refused(broker, broker.client(d1, password="wrong")) == BAD_USERNAME_OR_PASSWORD
    assert await refused(broker, broker.client(svc, password="wrong")) == BAD_USERNAME_OR_PASSWORD
    unknown = MqttLogin(f"{d1.tenant_id}/D1/{'a' * 12}", d1.password, d1.identifier)
    assert await refused(broker, broker.client(unknown)) == BAD_USERNAME_OR_PASSWORD
    assert await refused(broker, broker.client(MqttLogin("nobody", "x", "c"))) == (
        BAD_USERNAME_OR_PASSWORD
    )

    counts.subtract(before)
    assert +counts == {"anonymous": 1, "bad_secret": 2, "unknown_credential": 1, "bad_username": 1}
    counts.update(before)
    # The right credentials do connect.
    async with broker.client(d1), broker.client(svc):
        pass


# -- PUBLISH -------------------------------------------------------------------


async def test_a_device_publishes_only_to_its_own_topics(
    broker: Broker,
    device_login: DeviceLoginFactory,
    service_login: ServiceLoginFactory,
    make_tenant: TenantFactory,
    connect: ClientFactory,
) -> None:
    d1 = await device_login("D1")
    d2 = await device_login("D2")
    other_tenant = await make_tenant()
    other_api = await connect(other_tenant.token(Role.ADMIN))
    d3 = await device_login("D3", api=other_api, tenant=other_tenant)
    before = broker.embedded.refused["publish"]
    forbidden = [
        d2.topic("telemetry"),
        d3.topic("telemetry"),
        d3.topic("heartbeat"),
        f"pulse/{d1.tenant_id}/D1/nonsense",
        "elsewhere/entirely",
    ]
    async with contextlib.AsyncExitStack() as stack:
        service = await service_subscribed_to_all(broker, service_login, stack)
        device = await stack.enter_async_context(broker.client(d1))
        for topic in forbidden:
            await device.publish(topic, b"forged", qos=1)
        await device.publish(d1.topic("telemetry"), b"sentinel", qos=1)
        assert await topics_until(service, b"sentinel", live_only=True) == [d1.topic("telemetry")]
    # Dropped and counted, and the device stayed connected (the sentinel came
    # through the same connection).
    assert broker.embedded.refused["publish"] - before == len(forbidden)


async def test_a_device_cannot_publish_its_desired_document(
    broker: Broker, device_login: DeviceLoginFactory, service_login: ServiceLoginFactory
) -> None:
    d1 = await device_login("D1")
    desired = d1.topic("twin/desired")
    async with contextlib.AsyncExitStack() as stack:
        service = await service_subscribed_to_all(broker, service_login, stack)
        async with broker.client(d1) as device:
            await device.subscribe(desired, qos=1)
            await device.publish(desired, b"forged", qos=1, retain=True)
            await device.publish(d1.topic("twin/reported"), b"sentinel", qos=1)
            assert await topics_until(service, b"sentinel", live_only=True) == [
                d1.topic("twin/reported")
            ]
            # Not delivered to the device either: its first message is the service's.
            await service.publish(desired, b"from the service", qos=1)
            message = await next_message(device)
            assert (message.topic.value, message.payload) == (desired, b"from the service")
        # Nor retained: a new subscription gets the service's next one first.
        async with broker.client(d1) as again:
            await again.subscribe(desired, qos=1)
            await service.publish(desired, b"sentinel", qos=1)
            assert (await next_message(again)).payload == b"sentinel"


async def test_a_will_on_another_devices_topic_is_refused(
    broker: Broker, device_login: DeviceLoginFactory
) -> None:
    d1 = await device_login("D1")
    d2 = await device_login("D2")
    forged = aiomqtt.Will(d2.topic("status"), b"forged")
    assert await refused(broker, broker.client(d1, will=forged)) == NOT_AUTHORIZED
    async with broker.client(d1, will=aiomqtt.Will(d1.topic("status"), b"offline")):
        pass


# -- SUBSCRIBE -----------------------------------------------------------------


async def test_a_device_subscribes_only_to_its_desired_document(
    broker: Broker, device_login: DeviceLoginFactory, service_login: ServiceLoginFactory
) -> None:
    d1 = await device_login("D1")
    d2 = await device_login("D2")
    before = broker.embedded.refused["subscribe"]
    async with broker.client(await service_login()) as service:
        await service.publish(d2.topic("twin/desired"), b"d2 retained", qos=1, retain=True)
        await service.publish(d1.topic("twin/desired"), b"d1 retained", qos=1, retain=True)
        async with broker.client(d1) as device:
            refused_filters = [
                "pulse/#",
                "#",
                f"pulse/{d1.tenant_id}/+/twin/desired",
                d2.topic("twin/desired"),
                d1.topic("telemetry"),
                f"$share/g/{d1.topic('twin/desired')}",
            ]
            for a_filter in refused_filters:
                (code,) = await device.subscribe(a_filter, qos=1)
                assert isinstance(code, ReasonCode) and code.is_failure, a_filter
            (code,) = await device.subscribe(d1.topic("twin/desired"), qos=1)
            assert isinstance(code, ReasonCode) and not code.is_failure
            await service.publish(d2.topic("twin/desired"), b"d2 live", qos=1)
            await service.publish(d1.topic("telemetry"), b"telemetry", qos=1)
            await service.publish(d1.topic("twin/desired"), b"sentinel", qos=1)
            received = [(m.topic.value, m.payload) async for m in until(device, b"sentinel")]
            assert received == [
                (d1.topic("twin/desired"), b"d1 retained"),
                (d1.topic("twin/desired"), b"sentinel"),
            ]
    assert broker.embedded.refused["subscribe"] - before == len(refused_filters)


# -- client ids ----------------------------------------------------------------


async def test_the_evaluators_session_cannot_be_taken_over(
    broker: Broker, device_login: DeviceLoginFactory, service_login: ServiceLoginFactory
) -> None:
    evaluator = await service_login(identifier=EVALUATOR_CLIENT_ID)
    d1 = await device_login("D1")
    imposters = [
        broker.client(identifier=EVALUATOR_CLIENT_ID),
        broker.client(identifier=EVALUATOR_CLIENT_ID, clean_session=False),
        broker.client(MqttLogin("pulse-evaluator", "guess", EVALUATOR_CLIENT_ID)),
        broker.client(evaluator, password="guess"),
        broker.client(evaluator, password="guess", clean_session=False),
        broker.client(d1, identifier=EVALUATOR_CLIENT_ID),
    ]
    telemetry = d1.topic("telemetry")
    async with broker.client(d1) as device:
        async with broker.client(evaluator, clean_session=False) as live:
            await live.subscribe(f"pulse/{d1.tenant_id}/#", qos=1)
            for n, imposter in enumerate(imposters):
                assert await refused(broker, imposter) in {BAD_USERNAME_OR_PASSWORD, NOT_AUTHORIZED}
                # Still connected and still subscribed.
                await device.publish(telemetry, f"live {n}".encode(), qos=1)
                assert (await next_message(live)).payload == f"live {n}".encode()
        # Offline, the persistent session queues QoS 1 messages; the imposters
        # must not wipe it either.
        await device.publish(telemetry, b"while away", qos=1)
        for imposter in [
            broker.client(identifier=EVALUATOR_CLIENT_ID),
            broker.client(evaluator, password="guess"),
        ]:
            await refused(broker, imposter)
        async with broker.client(evaluator, clean_session=False) as back:
            assert (await next_message(back)).payload == b"while away"
            await device.publish(telemetry, b"after", qos=1)
            assert (await next_message(back)).payload == b"after"
    # Leave no persistent session behind.
    async with broker.client(evaluator, clean_session=True):
        pass


async def test_a_device_cannot_use_another_devices_client_id(
    broker: Broker, device_login: DeviceLoginFactory, service_login: ServiceLoginFactory
) -> None:
    d1 = await device_login("D1")
    d2 = await device_login("D2")
    async with contextlib.AsyncExitStack() as stack:
        service = await service_subscribed_to_all(broker, service_login, stack)
        victim = await stack.enter_async_context(broker.client(d2))
        assert await refused(broker, broker.client(d1, identifier=d2.identifier)) == NOT_AUTHORIZED
        # A service may not pose as a device either.
        svc = await service_login(identifier=d2.identifier)
        assert await refused(broker, broker.client(svc)) == NOT_AUTHORIZED
        await victim.publish(d2.topic("heartbeat"), b"sentinel", qos=1)
        assert await topics_until(service, b"sentinel", live_only=True) == [d2.topic("heartbeat")]


# -- credentials ending --------------------------------------------------------


async def test_revoking_a_credential_closes_its_connections(
    broker: Broker,
    device_login: DeviceLoginFactory,
    client: AsyncPulseClient,
) -> None:
    d1 = await device_login("D1")
    before = broker.embedded.refused["inactive"]
    async with lost(broker.client(d1)) as first, lost(broker.client(d1)) as second:
        # amqtt lets the second clean-session CONNECT replace the first's
        # session while the first connection stays open: both must close.
        await client.devices.revoke_credential("D1", d1.credential_id)
        waited = await asyncio.gather(
            closed_within(first, CLOSE_DEADLINE_S), closed_within(second, CLOSE_DEADLINE_S)
        )
    assert max(waited) < CLOSE_DEADLINE_S
    assert broker.embedded.refused["inactive"] - before == 2
    assert await refused(broker, broker.client(d1)) == NOT_AUTHORIZED


async def test_decommissioning_closes_the_devices_connection(
    broker: Broker, device_login: DeviceLoginFactory, client: AsyncPulseClient
) -> None:
    d1 = await device_login("D1")
    async with lost(broker.client(d1)) as device:
        await client.devices.decommission("D1")
        await closed_within(device, CLOSE_DEADLINE_S)
    assert await refused(broker, broker.client(d1)) == NOT_AUTHORIZED


async def test_deleting_a_service_credential_closes_its_connection(
    broker: Broker, service_login: ServiceLoginFactory, db: Database
) -> None:
    svc = await service_login()
    async with lost(broker.client(svc)) as service:
        async with db.admin() as con:
            assert await store.delete_service(con, svc.name)
        await closed_within(service, CLOSE_DEADLINE_S)
    assert await refused(broker, broker.client(svc)) == BAD_USERNAME_OR_PASSWORD


async def test_rotation_revoking_the_old_credential_keeps_the_new_one(
    broker: Broker,
    device_login: DeviceLoginFactory,
    service_login: ServiceLoginFactory,
    client: AsyncPulseClient,
) -> None:
    old = await device_login("D1")
    new = await device_login("D1")
    # D2's connection witnesses a recheck: revoked after D1's old credential,
    # its closing means a recheck has seen both revocations.
    witness = await device_login("D2")
    assert await refused(broker, broker.client(old, password=new.password)) == (
        BAD_USERNAME_OR_PASSWORD
    )
    async with contextlib.AsyncExitStack() as stack:
        service = await service_subscribed_to_all(broker, service_login, stack)
        device = await stack.enter_async_context(broker.client(new))
        closing = await stack.enter_async_context(lost(broker.client(witness)))
        await client.devices.revoke_credential("D1", old.credential_id)
        await client.devices.revoke_credential("D2", witness.credential_id)
        await closed_within(closing, CLOSE_DEADLINE_S)
        await device.publish(new.topic("telemetry"), b"sentinel", qos=1)
        assert await topics_until(service, b"sentinel", live_only=True) == [new.topic("telemetry")]
    assert await refused(broker, broker.client(old)) == NOT_AUTHORIZED
    async with broker.client(new):
        pass


# -- retained messages ---------------------------------------------------------


async def test_retained_messages_go_only_to_matching_subscriptions(
    open_broker: Broker,
) -> None:
    """amqtt 0.12 sends, on every CONNECT, the retained messages matching any
    client's filters; a correctness bug even without access control."""
    prefix = f"pulse/{uuid.uuid4()}"
    desired = [f"{prefix}/D{n}/twin/desired" for n in range(3)]
    nothing = f"nothing/here/{uuid.uuid4().hex}"
    async with (
        open_broker.client() as publisher,
        open_broker.client() as watcher,
    ):
        await watcher.subscribe("pulse/+/+/twin/desired", qos=1)
        for topic in desired:
            await publisher.publish(topic, b"{}", qos=1, retain=True)
        # Delivered to the watcher means stored as retained by then.
        assert [(await next_message(watcher)).topic.value for _ in desired] == desired
        async with open_broker.client() as newcomer:
            await newcomer.subscribe(nothing, qos=1)
            await publisher.publish(nothing, b"sentinel", qos=1)
            assert await topics_until(newcomer, b"sentinel") == [nothing]
        for topic in desired:
            await publisher.publish(topic, b"", qos=1, retain=True)


async def test_a_device_gets_only_its_own_retained_desired_document(
    broker: Broker, device_login: DeviceLoginFactory, service_login: ServiceLoginFactory
) -> None:
    d1 = await device_login("D1")
    d2 = await device_login("D2")
    async with contextlib.AsyncExitStack() as stack:
        # A filter matching every desired document, as the evaluator's does.
        service = await service_subscribed_to_all(broker, service_login, stack)
        await service.publish(d2.topic("twin/desired"), b"d2", qos=1, retain=True)
        await service.publish(d1.topic("twin/desired"), b"retained", qos=1, retain=True)
        # Delivered to its own subscription means stored as retained by then.
        assert await topics_until(service, b"retained", live_only=True) == [
            d2.topic("twin/desired"),
            d1.topic("twin/desired"),
        ]
        device = await stack.enter_async_context(broker.client(d1))
        await device.subscribe(d1.topic("twin/desired"), qos=1)
        await service.publish(d1.topic("twin/desired"), b"sentinel", qos=1)
        received = [(m.topic.value, m.payload) async for m in until(device, b"sentinel")]
        assert received == [
            (d1.topic("twin/desired"), b"retained"),
            (d1.topic("twin/desired"), b"sentinel"),
        ]
