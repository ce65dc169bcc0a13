"""Running the gateway: inside `pulse run` beside the gRPC server, or alone
(`pulse gateway`) against a remote gRPC address."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf import descriptor, descriptor_pool

from server.gateway.app import create_app
from server.gateway.broker_hooks import BrokerHooks
from server.gateway.connections import ConnectionLimits, protocol_class
from server.http_server import bind, serving
from server.observability import tracing
from server.observability.health import Readiness

log = logging.getLogger("pulse.gateway")


def services(names: Sequence[str]) -> list[descriptor.ServiceDescriptor]:
    pool = descriptor_pool.Default()
    return [pool.FindServiceByName(name) for name in names]


@contextlib.asynccontextmanager
async def running_gateway(
    grpc_target: str,
    service_names: Sequence[str],
    *,
    host: str,
    port: int,
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = 1 << 20,
    header_timeout_s: float = 10.0,
    max_connections: int = 1000,
    shutdown_grace_s: float = 5.0,
    broker_hooks: BrokerHooks | None = None,
    readiness: Readiness | None = None,
    reuse_port: bool = False,
) -> AsyncIterator[int]:
    """Serve HTTP until the context ends; yields the bound port.

    A connection must send its request head within `header_timeout_s` (408
    otherwise); beyond `max_connections` open ones, new connections are
    answered 503. On exit, open event streams end with a "shutting down"
    error event, and requests still running after `shutdown_grace_s` are
    cancelled. `broker_hooks` adds the MQTT broker's authn/authz routes;
    /readyz runs `readiness`'s checks and asks the gRPC server's health.
    `reuse_port`: one of several workers sharing `port` (SO_REUSEPORT).
    """
    channel = grpc.aio.insecure_channel(grpc_target)
    stopping = asyncio.Event()
    app = tracing.asgi(
        create_app(
            channel,
            services(service_names),
            max_body_bytes=max_body_bytes,
            cors_origins=cors_origins,
            stopping=stopping,
            broker_hooks=broker_hooks,
            readiness=readiness,
        )
    )
    sock = bind(host, port, reuse_port=reuse_port)
    bound = int(sock.getsockname()[1])
    limits = ConnectionLimits(header_timeout_s=header_timeout_s, max_connections=max_connections)
    try:
        async with serving(
            app, sock, shutdown_grace_s=shutdown_grace_s, http=protocol_class(limits)
        ):
            log.info("HTTP gateway listening on %s:%d", host, bound)
            try:
                yield bound
            finally:
                stopping.set()
    finally:
        await channel.close(None)
