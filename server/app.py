"""The gRPC server: services, health, reflection, interceptors, lifecycle."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from pulse.device.v1 import (
    connectivity_pb2,
    connectivity_pb2_grpc,
    devices_pb2,
    devices_pb2_grpc,
    groups_pb2,
    groups_pb2_grpc,
    twin_pb2,
    twin_pb2_grpc,
)

from server.auth import TokenVerifier
from server.config import Settings
from server.connectivity.service import ConnectivityService
from server.connectivity.watch import WatchHub
from server.db import Database, create_pool
from server.groups.service import DeviceGroupService
from server.interceptors import chain
from server.listener import Listener
from server.pagination import PageTokens
from server.registry.service import DeviceRegistryService
from server.twin.service import TwinService

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    devices_pb2.DESCRIPTOR.services_by_name["DeviceRegistryService"].full_name,
    groups_pb2.DESCRIPTOR.services_by_name["DeviceGroupService"].full_name,
    twin_pb2.DESCRIPTOR.services_by_name["TwinService"].full_name,
    connectivity_pb2.DESCRIPTOR.services_by_name["ConnectivityService"].full_name,
]
SHUTDOWN_GRACE_S = 5.0


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    db: Database
    health: HealthServicer
    listener: Listener
    watches: WatchHub | None = None

    async def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Report NOT_SERVING, refuse new calls, let running ones finish, close the pool."""
        await self.health.enter_graceful_shutdown()
        if self.watches is not None:
            # Watch streams never finish by themselves: end them now with a
            # status that tells clients to resume elsewhere.
            await self.watches.close()
        await self.server.stop(grace)
        await self.listener.stop()
        await self.db.close()


def verifier_for(settings: Settings) -> TokenVerifier:
    return TokenVerifier(
        secret=settings.secret,
        audience=settings.jwt_audience,
        public_key_file=settings.jwt_public_key_file,
        jwks_url=settings.jwks_url,
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


async def start(settings: Settings, dsn: str) -> RunningServer:
    db = Database(await create_pool(dsn, size=settings.db_pool_size))
    listener = Listener(dsn)
    await listener.start()
    server = grpc.aio.server(
        interceptors=chain(verifier_for(settings)),
        # Without this, a second server silently shares a busy port on Linux.
        options=[("grpc.so_reuseport", 0)],
    )
    tokens = PageTokens(settings.secret)
    watches = WatchHub(db, listener, tokens)
    health = HealthServicer()
    target: Any = _GenericHandlersOnly(server)
    devices_pb2_grpc.add_DeviceRegistryServiceServicer_to_server(
        DeviceRegistryService(db, tokens), target
    )
    groups_pb2_grpc.add_DeviceGroupServiceServicer_to_server(DeviceGroupService(db, tokens), target)
    twin_pb2_grpc.add_TwinServiceServicer_to_server(TwinService(db, listener), target)
    connectivity_pb2_grpc.add_ConnectivityServiceServicer_to_server(
        ConnectivityService(db, tokens, watches), target
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, target)
    reflection.enable_server_reflection(
        [
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    await server.start()
    for name in ["", *SERVICE_NAMES]:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC server listening on %s:%d", settings.grpc_host, port)
    return RunningServer(
        server=server, port=port, db=db, health=health, listener=listener, watches=watches
    )


async def wait_for_signal() -> None:
    """Return on the first SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
