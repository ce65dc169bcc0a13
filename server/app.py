"""The gRPC server: services, health, reflection, interceptors, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from pulse.device.v1 import (
    connectivity_pb2,
    connectivity_pb2_grpc,
    devices_pb2,
    devices_pb2_grpc,
    groups_pb2,
    groups_pb2_grpc,
    rollouts_pb2,
    rollouts_pb2_grpc,
    twin_pb2,
    twin_pb2_grpc,
)

from server import reflection
from server.admission import AdmissionInterceptor, Limits
from server.auth import TokenVerifier
from server.broker_access.mirror import AccessMirror
from server.config import Settings
from server.connectivity.service import ConnectivityService
from server.connectivity.watch import ConnectivityHub, connectivity_hub
from server.db import Database, create_pool
from server.groups.maintainer import MembershipMaintainer
from server.groups.membership_watch import MembershipWatches
from server.groups.service import DeviceGroupService
from server.interceptors import chain
from server.listener import Listener
from server.pagination import PageTokens
from server.registry.service import DeviceRegistryService
from server.rollouts.service import RolloutService
from server.tenants import TenantDirectory
from server.twin.notify import ChangeNotifier
from server.twin.service import TwinService

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    devices_pb2.DESCRIPTOR.services_by_name["DeviceRegistryService"].full_name,
    groups_pb2.DESCRIPTOR.services_by_name["DeviceGroupService"].full_name,
    twin_pb2.DESCRIPTOR.services_by_name["TwinService"].full_name,
    connectivity_pb2.DESCRIPTOR.services_by_name["ConnectivityService"].full_name,
    rollouts_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name,
]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    db: Database
    background_db: Database
    health: HealthServicer
    listener: Listener
    admission: AdmissionInterceptor
    watches: ConnectivityHub
    notifier: ChangeNotifier
    memberships: MembershipWatches
    maintainer: MembershipMaintainer
    grace_s: float
    stopped: bool = False

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls at once, end open streams with UNAVAILABLE, give
        running calls `grace` seconds (the shutdown_grace_s setting) to finish,
        then announce the last twin changes and close the pool. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        await self.health.enter_graceful_shutdown()
        # Connectivity watches end first: they tell each client its cursor.
        await self.watches.close()
        await self.memberships.close()
        await self.admission.close()
        await self.server.stop(self.grace_s if grace is None else grace)
        await self.notifier.flush()
        await self.maintainer.stop()
        await self.listener.stop()
        await self.background_db.close()
        await self.db.close()

    @contextlib.asynccontextmanager
    async def stopping(self) -> AsyncIterator[None]:
        """Stops the server when the context ends, however it ends."""
        try:
            yield
        finally:
            await self.stop()


def verifier_for(settings: Settings) -> TokenVerifier:
    return TokenVerifier(
        secret=settings.secret,
        audience=settings.jwt_audience,
        public_key_file=settings.jwt_public_key_file,
        jwks_url=settings.jwks_url,
        issuer=settings.auth_issuer,
        claims=settings.auth_claims,
    )


class _GenericHandlersOnly:
    """Registers services through generic handlers only.

    The generated `add_*_to_server` functions also register each method
    individually. grpc.aio then keeps one accept task per registered method
    and waits on all of them for every incoming call: with the ~30 methods
    here each call paid an `asyncio.wait` over ~30 futures, and GetDevice
    managed 1,170 calls/s beside 4,980 for a one-method echo server. One
    generic handler per service is one accept task for the whole server.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        pass


def _server_options(settings: Settings) -> list[tuple[str, Any]]:
    idle_ms = int(settings.grpc_max_connection_idle_s * 1000)
    return [
        # Without this, a second server silently shares a busy port on Linux;
        # workers (`pulse serve --workers N`) share theirs on purpose.
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ("grpc.max_connection_idle_ms", idle_ms),
        # Watchers sit idle for long stretches: clients may keep their
        # connections alive with pings, but no more often than every 10 s;
        # a client pinging faster is sent GOAWAY after two strikes.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        # The server pings quiet connections to find dead peers.
        ("grpc.keepalive_time_ms", 120_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Streams per connection; calls past it wait in the client. With a
        # limit set, a burst grpc.aio cannot take in fast enough is refused
        # (REFUSED_STREAM: UNAVAILABLE, retryable, not processed) instead of
        # being cancelled (CANCELLED, which no client retries).
        ("grpc.max_concurrent_streams", 1000),
    ]


async def start(
    settings: Settings, dsn: str, *, mirror: AccessMirror | None = None
) -> RunningServer:
    """Serve on settings.grpc_host:grpc_port (0: a free port). A port that
    cannot be bound raises RuntimeError and leaves nothing running. `mirror`
    is told of device credentials as they are issued and revoked (Mosquitto's
    dynamic security)."""
    db = Database(await create_pool(dsn, size=settings.db_pool_size), name="server")
    # The maintainer's and the notifier's work as other roles has a pool of
    # its own: on the calls' pool it would drop the session scopes that let
    # their reads and writes skip a round trip, and wait behind the calls.
    try:
        background_db = Database(await create_pool(dsn, size=2), name="server-background")
    except BaseException:
        await db.close()
        raise
    listener = Listener(dsn)
    try:
        await listener.start()
        tokens = PageTokens(settings.secret)
        watches = connectivity_hub(
            db, listener, tokens, stale_after=timedelta(seconds=settings.twin_stale_after_s)
        )
        notifier = ChangeNotifier(background_db)
        memberships = MembershipWatches(db, listener, tokens)
        admission = AdmissionInterceptor(
            verifier_for(settings),
            TenantDirectory(db),
            Limits(
                max_concurrent_calls=settings.grpc_max_concurrent_calls,
                max_streams_per_caller=settings.grpc_max_streams_per_caller,
                max_streams_per_tenant=settings.grpc_max_streams_per_tenant,
            ),
        )
        server = grpc.aio.server(options=_server_options(settings), interceptors=chain(admission))
        health = HealthServicer()
        target: Any = _GenericHandlersOnly(server)
        devices_pb2_grpc.add_DeviceRegistryServiceServicer_to_server(
            DeviceRegistryService(
                db, tokens, mirror, stale_after=timedelta(seconds=settings.twin_stale_after_s)
            ),
            target,
        )
        groups_pb2_grpc.add_DeviceGroupServiceServicer_to_server(
            DeviceGroupService(
                db,
                tokens,
                memberships=memberships,
                stale_after=timedelta(seconds=settings.twin_stale_after_s),
            ),
            target,
        )
        twin_pb2_grpc.add_TwinServiceServicer_to_server(
            TwinService(
                db,
                listener,
                notifier,
                stale_after=timedelta(seconds=settings.twin_stale_after_s),
            ),
            target,
        )
        connectivity_pb2_grpc.add_ConnectivityServiceServicer_to_server(
            ConnectivityService(db, tokens, watches), target
        )
        rollouts_pb2_grpc.add_RolloutServiceServicer_to_server(
            RolloutService(
                db, tokens, listener, stale_after=timedelta(seconds=settings.twin_stale_after_s)
            ),
            target,
        )
        health_pb2_grpc.add_HealthServicer_to_server(health, target)
        reflection.enable(
            [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name], target
        )
        port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
        await server.start()
        maintainer = MembershipMaintainer(
            background_db, stale_after=timedelta(seconds=settings.twin_stale_after_s)
        )
        maintainer.start()
    except BaseException:
        await listener.stop()
        await background_db.close()
        await db.close()
        raise
    for name in ["", *SERVICE_NAMES]:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC server listening on %s:%d", settings.grpc_host, port)
    return RunningServer(
        server=server,
        port=port,
        db=db,
        background_db=background_db,
        health=health,
        listener=listener,
        admission=admission,
        watches=watches,
        notifier=notifier,
        memberships=memberships,
        maintainer=maintainer,
        grace_s=settings.shutdown_grace_s,
    )


async def wait_for_signal(*, or_failed: asyncio.Event | None = None) -> None:
    """Return on the first SIGINT or SIGTERM, or once `or_failed` is set (a
    part of the process stopped for good: better to exit than to stay up
    doing nothing)."""
    stop = or_failed or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
