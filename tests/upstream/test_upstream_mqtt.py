"""Devices speaking the upstream platform's MQTT dialect beside ours
(docs/upstream-devices.md), end to end: real MQTT clients acting as upstream
devices of a tenant whose external id is not a UUID, the evaluator, the API.

- an upstream report changes the twin as ours does (state, version,
  connectivity); a malformed one is refused, counted and changes nothing;
- desired writes reach upstream's retained topic under the tenant's external
  id, in upstream's payload, besides ours; with PULSE_UPSTREAM_DESIRED off,
  only ours;
- the brokers hold a device to its own upstream topics: the embedded one
  (the rules) and Mosquitto's dynamic security (the ACLs made from them);
- a broker that lost its retained messages gets upstream's copies back too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode
from pulse.device.v1 import devices_pb2, status_pb2, twin_pb2
from pulse_client import AsyncPulseClient, struct_to_dict

from evaluator.broker import EmbeddedBroker
from evaluator.liveness import Liveness
from evaluator.retained_repair import MARKER_TOPIC, RetainedRepair
from evaluator.runtime import Evaluator, Handler
from evaluator.simulator import SimulatedDevice
from evaluator.twin_ingest import TwinIngest
from evaluator.twin_publisher import TwinPublisher
from server import config, wire
from server.auth import Role
from server.broker_access.authenticator import Authenticator
from server.broker_access.dynsec import MosquittoDynsec
from server.broker_access.rules import DeviceIdentity, service_username
from server.credentials import hashing, services
from server.db import Database, create_pool
from server.mqtt_url import parse as parse_broker
from server.tenants import ensure_tenant, tenant_uuid
from server.twin import store
from tests.broker import test_mosquitto_dynsec as dynsec_tests
from tests.broker.conftest import MqttLogin
from tests.conftest import ClientFactory, Tenant, TenantFactory
from tests.helpers import clear_retained, eventually, unique_id

pytestmark = pytest.mark.timeout(90)

#: Mosquitto with dynamic security, this module's own (skipped without it).
mosquitto = dynsec_tests.mosquitto

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


@dataclass(frozen=True)
class Upstream:
    """A tenant known at the edge by a non-UUID id, and its admin API."""

    tenant: Tenant
    external_id: str
    api: AsyncPulseClient

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.tenant.tenant_id

    def shadow(self, device_id: str, which: str, *, by_uuid: bool = False) -> str:
        """The device's `shadow/{which}` topic, under the external id or the UUID."""
        tenant = str(self.tenant_id) if by_uuid else self.external_id
        return wire.upstream_topic(tenant, device_id, f"twin/{which}")


@pytest.fixture
async def upstream(
    db: Database, settings: config.Settings, connect: ClientFactory, mqtt_url: str
) -> AsyncIterator[Upstream]:
    external_id = unique_id("acme")
    tenant_id = tenant_uuid(external_id)
    async with db.admin() as con:
        await ensure_tenant(con, tenant_id, "Acme Industrial", external_id=external_id)
    tenant = Tenant(tenant_id, settings.secret, settings.jwt_audience)
    yield Upstream(tenant, external_id, await connect(tenant.token(Role.ADMIN)))
    for prefix in (f"tenant/{external_id}", f"tenant/{tenant_id}", f"pulse/{tenant_id}"):
        await clear_retained(mqtt_url, prefix)


@dataclass
class Running:
    evaluator: Evaluator
    ingest: TwinIngest

    def rejections(self, tenant_id: uuid.UUID) -> list[tuple[str, str]]:
        return [(r.device_id, r.reason) for r in self.ingest.rejections if r.tenant_id == tenant_id]


StartEvaluator = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_evaluator(dsn: str, mqtt_url: str) -> AsyncIterator[StartEvaluator]:
    """Start an evaluator (twin ingest, publisher, liveness); `upstream=False`
    publishes our desired topic only. Desired writes other tests queued
    without an evaluator are dropped first, so only this test's are published."""
    db = Database(await create_pool(dsn, size=6))
    async with db.admin() as con:
        await con.execute("DELETE FROM twin_outbox")
    tasks: list[asyncio.Task[None]] = []
    client_ids: list[str] = []

    async def start(*, upstream: bool = True) -> Running:
        ingest = TwinIngest(db, keep_rejections=100_000)
        handlers: list[Handler] = [
            ingest,
            TwinPublisher(db, poll_s=0.02, upstream=upstream),
            Liveness(db, stale_after_s=3600, flush_s=0.05),
        ]
        client_ids.append(unique_id("upstream-evaluator"))
        evaluator = Evaluator(mqtt_url, handlers, client_id=client_ids[-1], session_expiry_s=30)
        tasks.append(asyncio.create_task(evaluator.run()))
        await asyncio.wait_for(evaluator.connected.wait(), 10)
        return Running(evaluator, ingest)

    try:
        yield start
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await db.close()
        # Discards the persistent sessions, which would queue device messages.
        for client_id in client_ids:
            options = mqtt_url_options(mqtt_url)
            async with aiomqtt.Client(**options, identifier=client_id, clean_session=True):
                pass


def mqtt_url_options(url: str) -> dict[str, Any]:
    return parse_broker(url).client_options()


def as_device(
    url: str, tenant_id: uuid.UUID, device_id: str, cred: devices_pb2.DeviceCredential
) -> aiomqtt.Client:
    """An MQTT client connecting as the device, with its own credential."""
    options = parse_broker(url).as_user(cred.username, cred.secret).client_options()
    return aiomqtt.Client(**options, identifier=f"{tenant_id}/{device_id}", timeout=5)


async def next_message(client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(10):
        return await anext(client.messages)


def payload_of(message: aiomqtt.Message) -> dict[str, Any]:
    assert isinstance(message.payload, bytes)
    parsed: dict[str, Any] = json.loads(message.payload)
    return parsed


async def retained(url: str, topic: str) -> dict[str, Any] | None:
    """The retained message a subscriber to `topic` gets now, if any."""
    async with aiomqtt.Client(**mqtt_url_options(url), identifier=unique_id("test")) as client:
        await client.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    if message.retain and message.payload:
                        return payload_of(message)
    return None


async def drained(db: Database, tenant_id: uuid.UUID) -> None:
    """Wait until the tenant's desired writes are published (both topics
    acknowledged: the outbox rows go only then)."""

    async def empty() -> bool:
        async with db.admin() as con:
            return not await con.fetchval(
                "SELECT EXISTS (SELECT 1 FROM twin_outbox WHERE tenant_id = $1)", tenant_id
            )

    await eventually(empty, what="the outbox drain")


# -- the wire -------------------------------------------------------------------


def test_upstream_topics_parse_to_our_kinds_under_either_tenant_id() -> None:
    acme = tenant_uuid("acme-industrial")
    for tenant in ("acme-industrial", str(acme)):
        parsed = wire.parse_topic(f"tenant/{tenant}/device/D-1/shadow/reported")
        assert parsed == (acme, "D-1", "twin/reported", wire.Dialect.UPSTREAM)
    assert wire.parse(f"pulse/{acme}/D-1/twin/reported") == (acme, "D-1", "twin/reported")
    for bad in [
        "tenant/acme/device/D-1/shadow",
        "tenant/acme/device/D-1/shadow/reported/x",
        "tenant/acme/devices/D-1/shadow/reported",
        "tenant/acme/device/D-1/telemetry/x",
        "tenant/acme/device/bad id/shadow/reported",
        "tenant/ac\x01me/device/D-1/shadow/reported",
        f"tenant/{'x' * 129}/device/D-1/shadow/reported",
    ]:
        with pytest.raises(wire.BadTopic):
            wire.parse_topic(bad)


def test_upstream_payloads() -> None:
    upstream = wire.Dialect.UPSTREAM
    report = b'{"reported": {"mode": "eco"}, "version": 3, "seq": "anything"}'
    # Upstream's reports have no seq: one is not read, not refused.
    assert wire.parse_reported_seq(report, upstream) == ({"mode": "eco"}, 3, None)
    assert wire.parse_desired(b'{"desired": {}, "version": 2}', upstream) == ({}, 2)
    with pytest.raises(wire.BadPayload):
        wire.parse_reported_seq(b'{"state": {}, "desired_version": 1}', upstream)
    with pytest.raises(wire.BadPayload):
        wire.parse_reported_seq(wire.upstream_reported({}, 1))


def test_the_setting_is_on_unless_switched_off() -> None:
    base = {"PULSE_SECRET": "s" * 32}
    assert config.load(base).upstream_desired
    for off in ("0", "false", "off", "OFF"):
        assert not config.load({**base, "PULSE_UPSTREAM_DESIRED": off}).upstream_desired
    assert config.load({**base, "PULSE_UPSTREAM_DESIRED": "1"}).upstream_desired
    with pytest.raises(ValueError, match="PULSE_UPSTREAM_DESIRED"):
        config.load({**base, "PULSE_UPSTREAM_DESIRED": "maybe"})


# -- reports and desired state through the evaluator ----------------------------


async def test_an_upstream_device_reports_and_receives_its_desired_state(
    upstream: Upstream, db: Database, mqtt_url: str, start_evaluator: StartEvaluator
) -> None:
    await start_evaluator()
    api = upstream.api
    await api.devices.create("UP-1")
    cred = await api.devices.create_credential("UP-1")
    twin = await api.twin.update_desired("UP-1", {"mode": "eco"}, expected_version=0)
    await drained(db, upstream.tenant_id)
    # Ours too, and upstream's under the external id only.
    assert await retained(mqtt_url, wire.topic(upstream.tenant_id, "UP-1", "twin/desired")) == {
        "state": {"mode": "eco"},
        "version": 1,
    }
    assert await retained(mqtt_url, upstream.shadow("UP-1", "desired", by_uuid=True)) is None

    async with as_device(mqtt_url, upstream.tenant_id, "UP-1", cred) as device:
        await device.subscribe(upstream.shadow("UP-1", "desired"), qos=1)
        message = await next_message(device)
        assert message.topic.value == upstream.shadow("UP-1", "desired") and message.retain
        desired = payload_of(message)
        assert desired == {
            "desired": {"mode": "eco"},
            "version": 1,
            "timestamp": desired["timestamp"],
        }
        assert TIMESTAMP.fullmatch(desired["timestamp"])
        written = twin.desired_update_time.ToDatetime(tzinfo=UTC)
        assert desired["timestamp"] == written.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        await device.publish(
            upstream.shadow("UP-1", "reported"), wire.upstream_reported({"mode": "eco"}, 1), qos=1
        )

        async def synced(version: int) -> bool:
            twin = await api.twin.get("UP-1")
            return twin.reported_version == version and twin.sync_status == twin_pb2.Twin.SYNCED

        await eventually(lambda: synced(1), what="the upstream report")
        twin = await api.twin.get("UP-1")
        assert struct_to_dict(twin.reported) == {"mode": "eco"}
        # A report is activity, as ours is.
        await eventually(
            lambda: device_online(api, "UP-1"), what="the device's connectivity from its report"
        )

        # A write now reaches the connected device at once, not retained.
        await api.twin.update_desired("UP-1", {"mode": "away"}, expected_version=1)
        message = await next_message(device)
        assert not message.retain
        assert payload_of(message)["desired"] == {"mode": "away"}
        assert payload_of(message)["version"] == 2
        # The tenant's UUID in the topic works as well as its external id.
        await device.publish(
            upstream.shadow("UP-1", "reported", by_uuid=True),
            wire.upstream_reported({"mode": "away"}, 2),
            qos=1,
        )
        await eventually(lambda: synced(2), what="the report under the tenant's UUID")


async def device_online(api: AsyncPulseClient, device_id: str) -> bool:
    device = await api.devices.get(device_id)
    return bool(device.connectivity_status == status_pb2.ONLINE)


async def test_malformed_upstream_reports_are_refused_and_change_nothing(
    upstream: Upstream, mqtt_url: str, start_evaluator: StartEvaluator
) -> None:
    running = await start_evaluator()
    api = upstream.api
    await api.devices.create("UP-2")
    cred = await api.devices.create_credential("UP-2")
    await api.twin.update_desired("UP-2", {"mode": "eco"}, expected_version=0)
    before = await api.twin.get("UP-2")
    bad = [
        (b"not json", wire.MALFORMED_JSON),
        (b"[1, 2]", wire.NOT_OBJECT),
        (b'{"version": 1}', wire.BAD_STATE),
        (b'{"reported": [1], "version": 1}', wire.BAD_STATE),
        # Our payload on upstream's topic.
        (b'{"state": {"mode": "eco"}, "desired_version": 1}', wire.BAD_STATE),
        (b'{"reported": {}}', wire.BAD_VERSION),
        (b'{"reported": {}, "version": "1"}', wire.BAD_VERSION),
        (b'{"reported": {}, "version": 1.0}', wire.BAD_VERSION),
        (b'{"reported": {}, "version": -1}', wire.BAD_VERSION),
        (b'{"reported": {"t": NaN}, "version": 1}', wire.MALFORMED_JSON),
        # Well formed, but a version that was never written.
        (wire.upstream_reported({"mode": "eco"}, 7), store.FUTURE_VERSION),
    ]
    async with as_device(mqtt_url, upstream.tenant_id, "UP-2", cred) as device:
        for payload, _ in bad:
            await device.publish(upstream.shadow("UP-2", "reported"), payload, qos=1)
    await eventually(
        lambda: len(running.rejections(upstream.tenant_id)) == len(bad),
        what="every refusal",
    )
    assert running.rejections(upstream.tenant_id) == [("UP-2", reason) for _, reason in bad]
    after = await api.twin.get("UP-2")
    assert after.revision == before.revision
    assert (struct_to_dict(after.reported), after.reported_version) == ({}, 0)
    # A topic that is not a device's is counted too, and nothing stops.
    async with aiomqtt.Client(**mqtt_url_options(mqtt_url), identifier=unique_id("t")) as svc:
        rejected = running.evaluator.rejected["bad_topic"]
        bad_topic = f"tenant/{upstream.external_id}/device/bad id/shadow/reported"
        await svc.publish(bad_topic, wire.upstream_reported({}, 1), qos=1)
        await eventually(lambda: running.evaluator.rejected["bad_topic"] > rejected)
    assert not running.evaluator.failed.is_set()


async def test_with_the_setting_off_only_our_topic_is_published(
    upstream: Upstream,
    db: Database,
    mqtt_url: str,
    start_evaluator: StartEvaluator,
) -> None:
    await start_evaluator(upstream=False)
    await upstream.api.devices.create("UP-3")
    await upstream.api.twin.update_desired("UP-3", {"fan": 2}, expected_version=0)
    await drained(db, upstream.tenant_id)
    ours = wire.topic(upstream.tenant_id, "UP-3", "twin/desired")
    assert await retained(mqtt_url, ours) == {"state": {"fan": 2}, "version": 1}
    assert await retained(mqtt_url, upstream.shadow("UP-3", "desired")) is None
    assert await retained(mqtt_url, upstream.shadow("UP-3", "desired", by_uuid=True)) is None


async def test_a_tenant_without_external_id_gets_upstream_topics_under_its_uuid(
    tenant: Tenant,
    client: AsyncPulseClient,
    db: Database,
    mqtt_url: str,
    start_evaluator: StartEvaluator,
) -> None:
    await start_evaluator()
    await client.devices.create("UP-4")
    await client.twin.update_desired("UP-4", {"fan": 1}, expected_version=0)
    await drained(db, tenant.tenant_id)
    topic = wire.upstream_topic(str(tenant.tenant_id), "UP-4", "twin/desired")
    try:
        found = await retained(mqtt_url, topic)
        assert found is not None and (found["desired"], found["version"]) == ({"fan": 1}, 1)
    finally:
        await clear_retained(mqtt_url, f"tenant/{tenant.tenant_id}")
        await clear_retained(mqtt_url, f"pulse/{tenant.tenant_id}")


async def test_a_simulated_upstream_device_converges(
    upstream: Upstream, mqtt_url: str, start_evaluator: StartEvaluator
) -> None:
    await start_evaluator()
    api = upstream.api
    await api.devices.create("SIM-UP")
    cred = await api.devices.create_credential("SIM-UP")
    device = SimulatedDevice(
        mqtt_url,
        upstream.tenant_id,
        "SIM-UP",
        credential=(cred.username, cred.secret),
        apply_delay_s=0.1,
        dialect=wire.Dialect.UPSTREAM,
        upstream_tenant=upstream.external_id,
    )
    await device.start()
    try:
        await api.twin.update_desired("SIM-UP", {"mode": "eco"}, expected_version=0)
        await device.wait_for_version(1)

        async def synced() -> bool:
            twin = await api.twin.get("SIM-UP")
            return twin.sync_status == twin_pb2.Twin.SYNCED and twin.reported_version == 1

        await eventually(synced, what="the simulated device's report")
        assert device.state == {"mode": "eco"}
    finally:
        await device.stop()


# -- what the brokers allow ------------------------------------------------------


def _refused(granted: Any) -> bool:
    (code,) = granted
    return (code.value if isinstance(code, ReasonCode) else int(code)) >= 0x80


async def collect_until(client: aiomqtt.Client, sentinel: bytes) -> list[str]:
    """The topics `client` receives up to the message `sentinel` (included).
    One connection's messages arrive in order, so anything forbidden that got
    through would come before the sentinel sent after it."""
    topics: list[str] = []
    async with asyncio.timeout(10):
        async for message in client.messages:
            topics.append(message.topic.value)
            if message.payload == sentinel:
                return topics
    raise AssertionError("no sentinel")


async def test_the_embedded_broker_holds_a_device_to_its_own_upstream_topics(
    upstream: Upstream, db: Database, make_tenant: TenantFactory
) -> None:
    api = upstream.api
    for device_id in ("UP-5", "UP-6"):
        await api.devices.create(device_id)
    cred = await api.devices.create_credential("UP-5")
    other = await make_tenant()
    name = unique_id("svc").lower()
    secret = await services.issue(db, name)
    broker = EmbeddedBroker(authenticator=Authenticator(db))
    url = await broker.start()
    try:
        service_options = parse_broker(url).as_user(service_username(name), secret)
        async with (
            aiomqtt.Client(**service_options.client_options(), identifier=name) as service,
            as_device(url, upstream.tenant_id, "UP-5", cred) as device,
        ):
            await service.subscribe("tenant/#", qos=1)
            forbidden = [
                upstream.shadow("UP-6", "reported"),
                upstream.shadow("UP-6", "reported", by_uuid=True),
                wire.upstream_topic(str(other.tenant_id), "UP-5", "twin/reported"),
                wire.upstream_topic("someone-else", "UP-5", "twin/reported"),
                upstream.shadow("UP-5", "desired"),
            ]
            allowed = [
                upstream.shadow("UP-5", "reported"),
                upstream.shadow("UP-5", "reported", by_uuid=True),
            ]
            for topic in forbidden:
                await device.publish(topic, b"forbidden", qos=1)
            for topic in allowed:
                await device.publish(topic, wire.upstream_reported({}, 0), qos=1)
            sentinel = uuid.uuid4().hex.encode()
            await device.publish(allowed[0], sentinel, qos=1)
            assert await collect_until(service, sentinel) == [*allowed, allowed[0]]

            for topic_filter in [
                upstream.shadow("UP-6", "desired"),
                wire.upstream_topic(str(other.tenant_id), "UP-5", "twin/desired"),
                f"tenant/{upstream.external_id}/device/+/shadow/desired",
                f"tenant/{upstream.external_id}/#",
            ]:
                assert _refused(await device.subscribe(topic_filter, qos=1)), topic_filter
            for by_uuid in (False, True):
                own = upstream.shadow("UP-5", "desired", by_uuid=by_uuid)
                assert not _refused(await device.subscribe(own, qos=1))
                await service.publish(own, sentinel, qos=1)
                assert (await next_message(device)).topic.value == own
    finally:
        await broker.stop()


@pytest.fixture
async def dynsec_mirror(
    mosquitto: dynsec_tests.Mosquitto, db: Database
) -> AsyncIterator[MosquittoDynsec]:
    mirror = MosquittoDynsec(mosquitto.admin, db=db, sweep_s=3600)
    await mirror.start()
    try:
        yield mirror
    finally:
        await mirror.stop()


async def test_mosquitto_grants_a_device_its_upstream_topics_under_both_tenant_ids(
    upstream: Upstream,
    db: Database,
    mosquitto: dynsec_tests.Mosquitto,
    dynsec_mirror: MosquittoDynsec,
) -> None:
    tenant_id = upstream.tenant_id
    secrets = [hashing.new_secret(), hashing.new_secret()]
    first, second = (
        DeviceIdentity(tenant_id, "UP-7", hashing.new_credential_id()) for _ in secrets
    )
    # The device's role made as it was before upstream's topics, or before
    # the tenant had an external id: a mirror without the database knows none.
    blind = MosquittoDynsec(mosquitto.admin)
    await blind.start()
    try:
        await blind.created(first, secrets[0])
    finally:
        await blind.stop()
    # The next credential brings the role up to date.
    await dynsec_mirror.created(second, secrets[1])
    name = unique_id("svc").lower()
    service_secret = await services.issue(db, name)
    await dynsec_mirror.ensure_service(name, service_secret)
    service_login = MqttLogin(service_username(name), service_secret, name)
    device_login = MqttLogin(second.username, secrets[1], second.client_id)
    async with (
        dynsec_tests.subscribed(mosquitto.login(service_login), "tenant/#") as service,
        mosquitto.login(device_login) as device,
    ):
        forbidden = [
            upstream.shadow("UP-8", "reported"),
            wire.upstream_topic("someone-else", "UP-7", "twin/reported"),
            upstream.shadow("UP-7", "desired"),
        ]
        allowed = [
            upstream.shadow("UP-7", "reported"),
            upstream.shadow("UP-7", "reported", by_uuid=True),
        ]
        for topic in forbidden:
            await device.publish(topic, b"forbidden", qos=1)
        for topic in allowed:
            await device.publish(topic, b"allowed", qos=1)
        sentinel = uuid.uuid4().hex.encode()
        await device.publish(allowed[0], sentinel, qos=1)
        received = await service.until(allowed[0], sentinel)
        assert received == [*((t, b"allowed") for t in allowed), (allowed[0], sentinel)]
        assert _refused(await device.subscribe(upstream.shadow("UP-8", "desired"), qos=1))
        for by_uuid in (False, True):
            own = upstream.shadow("UP-7", "desired", by_uuid=by_uuid)
            assert not _refused(await device.subscribe(own, qos=1)), own


# -- after the broker lost its retained messages ---------------------------------


async def test_retained_repair_restores_upstreams_desired_topic_too(
    upstream: Upstream, dsn: str
) -> None:
    await upstream.api.devices.create("UP-9")
    await upstream.api.twin.update_desired("UP-9", {"mode": "eco"}, expected_version=0)
    db = Database(await create_pool(dsn, size=4))
    async with db.admin() as con:
        # Published long ago: only a repair publishes it again.
        await con.execute("DELETE FROM twin_outbox WHERE tenant_id = $1", upstream.tenant_id)
    broker = EmbeddedBroker()
    url = await broker.start()
    address = parse_broker(url)
    try:
        async with aiomqtt.Client(**address.client_options(), identifier=unique_id("m")) as c:
            # The marker of a broker whose desired state went out while
            # upstream's copies were switched off.
            marker = json.dumps({"set_by": "test", "upstream": False}).encode()
            await c.publish(MARKER_TOPIC, marker, qos=1, retain=True)
        repair = RetainedRepair(db, address, client_id=unique_id("repair"), poll_s=0.01)
        evaluator = Evaluator(
            address,
            [TwinPublisher(db, poll_s=0.02), repair],
            client_id=unique_id("evaluator"),
            session_expiry_s=30,
        )
        task = asyncio.create_task(evaluator.run())
        try:
            await eventually(lambda: repair.repairs == 1 and repair.checked.is_set())
            await drained(db, upstream.tenant_id)
            found = await retained(url, upstream.shadow("UP-9", "desired"))
            assert found is not None and (found["desired"], found["version"]) == (
                {"mode": "eco"},
                1,
            )
            # The marker now says upstream's copies are there: no more repairs.
            again = RetainedRepair(db, address, client_id=unique_id("repair"))
            check = asyncio.create_task(
                Evaluator(address, [again], client_id=unique_id("ev")).run()
            )
            try:
                await eventually(again.checked.is_set)
            finally:
                check.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await check
            assert again.repairs == 0
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await broker.stop()
        await db.close()
