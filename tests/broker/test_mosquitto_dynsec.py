"""Mosquitto 2 with the dynamic-security plugin, kept in step by
MosquittoDynsec: the access rules as devices and services see them from the
outside, issuing, revoking, rotating, expiring and reconciling.

The module starts its own Mosquitto on a free port (never the shared one), set
up with the commands `pulse` prints, and its own server with the mirror; the
API clients of conftest reach that server because `target` is overridden
here. Skipped, saying what is missing, without mosquitto, mosquitto_ctrl or
the plugin."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pulse_client as pc
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from bench.harness import free_port, listening
from server import config, wire
from server.app import RunningServer, start
from server.broker_access.dynsec import (
    MosquittoDynsec,
    device_role,
    find_plugin,
    mosquitto_conf,
    setup_commands,
)
from server.broker_access.rules import DeviceIdentity
from server.credentials import hashing
from server.db import Database
from server.mqtt_url import BrokerAddress
from tests.broker.conftest import (
    DeviceLogin,
    DeviceLoginFactory,
    MqttLogin,
    ServiceLoginFactory,
    closed_within,
    lost,
)
from tests.conftest import ClientFactory, Tenant, TenantFactory
from tests.helpers import eventually

ADMIN = "dynsec-admin"
#: Revocation must close a live connection within this, as the API promises.
CLOSE_WITHIN_S = 5.0
# CONNACK refusals: 4/5 in MQTT 3.1.1, which paho reports as 134/135.
REFUSED = {4, 5, 134, 135}


def _executable(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which(name, path=path)


class Mosquitto:
    """A Mosquitto of this module's own, which tests may stop and restart."""

    def __init__(self, binary: str, folder: Path, plugin: str, admin_password: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.config_file = folder / "dynamic-security.json"
        self.log = folder / "mosquitto.log"
        self.conf = folder / "mosquitto.conf"
        self.admin = BrokerAddress("127.0.0.1", self.port, ADMIN, admin_password)
        lines = [
            mosquitto_conf(
                port=self.port, bind="127.0.0.1", config_file=str(self.config_file), plugin=plugin
            ),
            "persistence false",
            f"log_dest file {self.log}",
        ]
        if os.geteuid() == 0:
            # As root Mosquitto would switch to the `mosquitto` user, who
            # cannot write the plugin's file in our temporary folder.
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            self.binary,
            "-c",
            str(self.conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        if not await listening(self.port, self._process):
            pytest.fail(f"mosquitto did not start:\n{self.log_tail()}")

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else "(no log)"

    def client(self, username: str | None, password: str | None, identifier: str) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            username=username,
            password=password,
            identifier=identifier,
            timeout=5,
        )

    def login(self, login: MqttLogin, *, identifier: str | None = None) -> aiomqtt.Client:
        return self.client(login.username, login.password, identifier or login.identifier)


async def _ctrl(ctrl: str, command: list[str]) -> None:
    process = await asyncio.create_subprocess_exec(
        ctrl, *command[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    # mosquitto_ctrl exits 0 even when the broker refuses it.
    if process.returncode != 0 or "rror" in text:
        pytest.fail(f"{command[1:4]} failed: {text}")


@pytest.fixture(scope="module")
async def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mosquitto]:
    binary, ctrl, plugin = _executable("mosquitto"), _executable("mosquitto_ctrl"), find_plugin()
    missing = [
        what
        for what, found in [
            ("the mosquitto binary", binary),
            ("mosquitto_ctrl", ctrl),
            ("mosquitto_dynamic_security.so", plugin),
        ]
        if found is None
    ]
    if missing:
        pytest.skip(f"Mosquitto with dynamic security is not installed: no {', '.join(missing)}")
    assert binary is not None and ctrl is not None and plugin is not None
    password = secrets.token_urlsafe(16)
    broker = Mosquitto(binary, tmp_path_factory.mktemp("mosquitto-dynsec"), plugin, password)
    init, after = setup_commands(
        config_file=str(broker.config_file), admin_user=ADMIN, port=broker.port, password=password
    )
    await _ctrl(ctrl, init)
    await broker.start()
    try:
        for command in after:
            await _ctrl(ctrl, command)
        yield broker
    finally:
        await broker.stop()


@pytest.fixture(scope="module")
async def mirror(mosquitto: Mosquitto, db: Database) -> AsyncIterator[MosquittoDynsec]:
    # No sweeps to speak of: what the tests see here is the mirror's own doing
    # (or the reconciliation at start), not a sweep that happened to pass.
    dynsec = MosquittoDynsec(mosquitto.admin, db=db, sweep_s=3600)
    await dynsec.start()
    assert dynsec.connected.is_set()
    try:
        yield dynsec
    finally:
        await dynsec.stop()


@pytest.fixture(scope="module")
async def mirrored(
    settings: config.Settings, dsn: str, mirror: MosquittoDynsec
) -> AsyncIterator[RunningServer]:
    server = await start(settings, dsn, mirror=mirror)
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


@pytest.fixture(scope="module")
def target(mirrored: RunningServer) -> str:
    """The mirrored server, for conftest's `connect`, `client` and `device_login`."""
    return f"127.0.0.1:{mirrored.port}"


class Subscriber:
    """An MQTT client collecting what it receives."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.received: list[tuple[str, bytes]] = []
        self._arrived = asyncio.Event()

    async def collect(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            self.received.append(
                (message.topic.value, payload if isinstance(payload, bytes) else b"")
            )
            self._arrived.set()

    async def until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """What arrived up to and including (`topic`, `payload`), taken out.
        A marker published after other messages by the same client arrives
        after them, so this is also everything those messages delivered."""
        async with asyncio.timeout(5):
            while (topic, payload) not in self.received:
                self._arrived.clear()
                await self._arrived.wait()
        end = self.received.index((topic, payload)) + 1
        taken, self.received = self.received[:end], self.received[end:]
        return taken


@contextlib.asynccontextmanager
async def subscribed(client: aiomqtt.Client, *filters: str) -> AsyncIterator[Subscriber]:
    async with client:
        for topic_filter in filters:
            granted = await client.subscribe(topic_filter, qos=1)
            assert _granted(granted), f"{topic_filter} refused"
        subscriber = Subscriber(client)
        task = asyncio.create_task(subscriber.collect())
        try:
            yield subscriber
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


def _code(code: int | ReasonCode | None) -> int:
    return code.value if isinstance(code, ReasonCode) else int(code or 0)


def _granted(result: Sequence[int | ReasonCode]) -> bool:
    (code,) = result
    return _code(code) < 0x80


@pytest.fixture
async def service(
    mosquitto: Mosquitto, mirror: MosquittoDynsec, service_login: ServiceLoginFactory
) -> AsyncIterator[Subscriber]:
    """A service subscribed to everything, as the evaluator is."""
    login = await service_login("pulse-evaluator")
    await mirror.ensure_service(login.name, login.password)
    async with subscribed(mosquitto.login(login), "pulse/#") as subscriber:
        yield subscriber


def _marker() -> bytes:
    return f"marker-{uuid.uuid4().hex}".encode()


async def assert_refused(
    mosquitto: Mosquitto, username: str | None, password: str | None, identifier: str
) -> None:
    with pytest.raises(aiomqtt.MqttCodeError) as info:
        async with mosquitto.client(username, password, identifier):
            pass
    assert _code(info.value.rc) in REFUSED


async def assert_connects(mosquitto: Mosquitto, login: MqttLogin) -> None:
    async with mosquitto.login(login):
        pass


# -- logins -------------------------------------------------------------------


async def test_anonymous_and_wrong_secrets_are_refused(
    mosquitto: Mosquitto, device_login: DeviceLoginFactory
) -> None:
    login = await device_login("D1")
    await assert_refused(mosquitto, None, None, login.identifier)
    await assert_refused(mosquitto, login.username, "not-the-secret", login.identifier)
    await assert_refused(mosquitto, "nobody", "nothing", "someone")
    await assert_connects(mosquitto, login)


async def test_a_device_connects_only_with_its_client_id(
    mosquitto: Mosquitto, device_login: DeviceLoginFactory
) -> None:
    login = await device_login("D1")
    other = await device_login("D2")
    await assert_connects(mosquitto, login)
    for identifier in [other.identifier, "pulse-evaluator", "D1", f"{login.identifier}x"]:
        await assert_refused(mosquitto, login.username, login.password, identifier)


async def test_the_service_client_id_cannot_be_taken(
    mosquitto: Mosquitto,
    service: Subscriber,
    device_login: DeviceLoginFactory,
    service_login: ServiceLoginFactory,
) -> None:
    device = await device_login("D1")
    unmirrored = await service_login()  # in the database, never given to Mosquitto
    await assert_refused(mosquitto, None, None, "pulse-evaluator")
    await assert_refused(mosquitto, device.username, device.password, "pulse-evaluator")
    await assert_refused(mosquitto, unmirrored.username, unmirrored.password, "pulse-evaluator")
    # Had any of those taken the session over, the service would hear nothing.
    marker = _marker()
    async with mosquitto.login(device) as client:
        await client.publish(device.topic("heartbeat"), marker, qos=1)
    assert await service.until(device.topic("heartbeat"), marker) == [
        (device.topic("heartbeat"), marker)
    ]


# -- what a device may do -----------------------------------------------------


async def test_a_device_publishes_on_its_own_topics_only(
    mosquitto: Mosquitto,
    service: Subscriber,
    device_login: DeviceLoginFactory,
    tenant: Tenant,
) -> None:
    login = await device_login("D1")
    own = [login.topic(kind) for kind in sorted(wire.KINDS)]
    forbidden = [
        wire.topic(tenant.tenant_id, "D2", "heartbeat"),
        wire.topic(tenant.tenant_id, "D2", "twin/reported"),
        wire.topic(uuid.uuid4(), "D1", "heartbeat"),
        login.topic("twin/desired"),
        login.topic("other"),
        f"pulse/{tenant.tenant_id}/D1",
        "elsewhere",
    ]
    marker = _marker()
    async with mosquitto.login(login) as client:
        for topic in forbidden:
            await client.publish(topic, b"forbidden", qos=1)
        for topic in own:
            await client.publish(topic, b"allowed", qos=1)
        await client.publish(login.topic("heartbeat"), marker, qos=1)
    received = await service.until(login.topic("heartbeat"), marker)
    assert received == [*((topic, b"allowed") for topic in own), (login.topic("heartbeat"), marker)]


async def test_a_device_hears_its_desired_topic_only(
    mosquitto: Mosquitto,
    device_login: DeviceLoginFactory,
    service_login: ServiceLoginFactory,
    mirror: MosquittoDynsec,
    tenant: Tenant,
) -> None:
    login = await device_login("D1")
    publisher = await service_login()
    await mirror.ensure_service(publisher.name, publisher.password)
    desired = login.topic("twin/desired")
    async with mosquitto.login(login) as client:
        for topic_filter in [
            "pulse/#",
            "#",
            f"pulse/{tenant.tenant_id}/+/twin/desired",
            login.topic("heartbeat"),
            wire.topic(tenant.tenant_id, "D2", "twin/desired"),
            f"$share/g/{desired}",
        ]:
            assert not _granted(await client.subscribe(topic_filter, qos=1)), topic_filter
        assert _granted(await client.subscribe(desired, qos=1))
        device = Subscriber(client)
        task = asyncio.create_task(device.collect())
        marker = _marker()
        try:
            async with mosquitto.login(publisher) as service:
                for topic in [
                    login.topic("heartbeat"),
                    wire.topic(tenant.tenant_id, "D2", "twin/desired"),
                    wire.topic(uuid.uuid4(), "D1", "twin/desired"),
                ]:
                    await service.publish(topic, b"not for D1", qos=1)
                await service.publish(desired, marker, qos=1)
            assert await device.until(desired, marker) == [(desired, marker)]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_services_may_share_a_subscription(
    mosquitto: Mosquitto,
    mirror: MosquittoDynsec,
    service_login: ServiceLoginFactory,
    device_login: DeviceLoginFactory,
) -> None:
    login = await service_login()
    await mirror.ensure_service(login.name, login.password)
    device = await device_login("D1")
    marker = _marker()
    async with subscribed(mosquitto.login(login), f"$share/evaluators/{wire.SUBSCRIPTION}") as sub:
        async with mosquitto.login(device) as client:
            await client.publish(device.topic("telemetry"), marker, qos=1)
        assert await sub.until(device.topic("telemetry"), marker) == [
            (device.topic("telemetry"), marker)
        ]


# -- revocation, rotation, expiry ---------------------------------------------


async def test_revoking_refuses_and_disconnects(
    mosquitto: Mosquitto, client: pc.AsyncPulseClient, device_login: DeviceLoginFactory
) -> None:
    login = await device_login("D1")
    async with lost(mosquitto.login(login)) as connection:
        await client.devices.revoke_credential("D1", login.credential_id)
        await closed_within(connection, CLOSE_WITHIN_S)
    await assert_refused(mosquitto, login.username, login.password, login.identifier)


async def test_the_second_credential_keeps_working_after_the_first_is_revoked(
    mosquitto: Mosquitto,
    client: pc.AsyncPulseClient,
    device_login: DeviceLoginFactory,
    service: Subscriber,
) -> None:
    first = await device_login("D1")
    second = await device_login("D1")
    await assert_connects(mosquitto, first)
    await client.devices.revoke_credential("D1", first.credential_id)
    await assert_refused(mosquitto, first.username, first.password, first.identifier)
    marker = _marker()
    async with mosquitto.login(second) as connection:
        await connection.publish(second.topic("status"), marker, qos=1)
    assert await service.until(second.topic("status"), marker) == [(second.topic("status"), marker)]


async def test_decommissioning_deletes_the_clients_and_then_the_role(
    mosquitto: Mosquitto,
    client: pc.AsyncPulseClient,
    mirror: MosquittoDynsec,
    db: Database,
    device_login: DeviceLoginFactory,
    tenant: Tenant,
) -> None:
    first = await device_login("D1")
    second = await device_login("D1")
    role = device_role(tenant.tenant_id, "D1")
    assert role in await mirror.roles()
    async with lost(mosquitto.login(first)) as connection:
        await client.devices.decommission("D1")
        await closed_within(connection, CLOSE_WITHIN_S)
    clients = await mirror.clients()
    assert first.username not in clients and second.username not in clients

    assert role in (await mirror.reconcile(db)).deleted_roles
    assert role not in await mirror.roles()


async def test_an_expired_credential_is_deleted_by_the_sweep(
    mosquitto: Mosquitto, client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await client.devices.create("D1")
    expire_time = datetime.now(UTC) + timedelta(seconds=3)
    cred = await client.devices.create_credential("D1", expire_time=expire_time)
    login = DeviceLogin(
        username=cred.username,
        password=cred.secret,
        identifier=f"{tenant.tenant_id}/D1",
        tenant_id=tenant.tenant_id,
        device_id="D1",
        credential_id=cred.credential_id,
    )
    sweeping = MosquittoDynsec(mosquitto.admin, db=db, sweep_s=0.5)
    await sweeping.start()
    try:
        async with lost(mosquitto.login(login)) as connection:
            # Expiry (3 s) plus a sweep (0.5 s), with room to spare.
            await closed_within(connection, 10)
    finally:
        await sweeping.stop()
    assert datetime.now(UTC) >= expire_time
    await assert_refused(mosquitto, login.username, login.password, login.identifier)


# -- the broker or the mirror away --------------------------------------------


async def test_a_revocation_missed_while_the_mirror_was_away_is_reconciled(
    mosquitto: Mosquitto,
    client: pc.AsyncPulseClient,
    mirror: MosquittoDynsec,
    device_login: DeviceLoginFactory,
) -> None:
    login = await device_login("D1")
    await mirror.stop()
    try:
        await client.devices.revoke_credential("D1", login.credential_id)
        # Only the mirror can tell Mosquitto; nobody has.
        await assert_connects(mosquitto, login)
    finally:
        await mirror.start()
    # start() reconciles before it returns.
    await assert_refused(mosquitto, login.username, login.password, login.identifier)


async def test_a_client_without_a_credential_row_gets_a_grace_period(
    mosquitto: Mosquitto, mirror: MosquittoDynsec, db: Database, tenant: Tenant
) -> None:
    # What a mirror sees while a credential's transaction has yet to commit,
    # or after it rolled back: a client with no row behind it.
    ghost = DeviceIdentity(tenant.tenant_id, "ghost", hashing.new_credential_id())
    await mirror.created(ghost, "ghost-secret")
    patient = MosquittoDynsec(mosquitto.admin, missing_grace_s=60)
    await patient.start()
    try:
        result = await patient.reconcile(db)
    finally:
        await patient.stop()
    assert ghost.username in result.waiting
    assert ghost.username in await mirror.clients()
    hasty = MosquittoDynsec(mosquitto.admin, missing_grace_s=0)
    await hasty.start()
    try:
        result = await hasty.reconcile(db)
    finally:
        await hasty.stop()
    assert ghost.username in result.deleted_clients
    assert ghost.username not in await mirror.clients()


async def test_with_the_broker_down_no_credential_is_issued(
    mosquitto: Mosquitto,
    client: pc.AsyncPulseClient,
    mirror: MosquittoDynsec,
    device_login: DeviceLoginFactory,
) -> None:
    first = await device_login("D1")
    await mosquitto.stop()
    try:
        await eventually(
            lambda: not mirror.connected.is_set(), timeout=5, what="the mirror seeing it"
        )
        with pytest.raises(pc.Unavailable) as info:
            await client.devices.create_credential("D1")
        assert info.value.reason is pc.ErrorReason.BROKER_UNAVAILABLE
        [listed] = await client.devices.list_credentials("D1")
        assert listed.credential_id == first.credential_id
    finally:
        await mosquitto.start()
    await eventually(mirror.connected.is_set, timeout=20, what="the mirror reconnecting")
    await assert_connects(mosquitto, await device_login("D1"))


async def test_a_wrong_admin_password_stops_the_mirror_starting(mosquitto: Mosquitto) -> None:
    wrong = MosquittoDynsec(mosquitto.admin.as_user(ADMIN, "wrong"))
    with pytest.raises(PermissionError, match=ADMIN):
        await wrong.start()


async def test_another_tenants_device_is_kept_apart(
    mosquitto: Mosquitto,
    service: Subscriber,
    device_login: DeviceLoginFactory,
    make_tenant: TenantFactory,
    connect: ClientFactory,
) -> None:
    other = await make_tenant()
    theirs = await device_login("D1", api=await connect(other.token()), tenant=other)
    ours = await device_login("D1")
    assert theirs.identifier != ours.identifier
    await assert_refused(mosquitto, theirs.username, theirs.password, ours.identifier)
    marker = _marker()
    async with mosquitto.login(theirs) as connection:
        await connection.publish(ours.topic("heartbeat"), b"forged", qos=1)
        await connection.publish(theirs.topic("heartbeat"), marker, qos=1)
    assert await service.until(theirs.topic("heartbeat"), marker) == [
        (theirs.topic("heartbeat"), marker)
    ]
