"""Running the gateway: inside `pulse run` beside the gRPC server, or alone
(`pulse gateway`) against a remote gRPC address."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import uvicorn
from google.protobuf import descriptor, descriptor_pool

from server.gateway.app import create_app
from server.gateway.broker_hooks import BrokerHooks
from server.gateway.connections import ConnectionLimits, protocol_class

log = logging.getLogger("pulse.gateway")


class _InProcessServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The host process owns SIGINT/SIGTERM and stops us explicitly.
        yield


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on `port`, or on a free one if it is taken."""
    for candidate in (port, 0) if port else (0,):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError:
            sock.close()
            log.warning("HTTP port %d is taken; using a free one instead", candidate)
            continue
        sock.listen(1024)
        sock.setblocking(False)
        return sock
    raise OSError(f"cannot listen on {host}")


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
) -> AsyncIterator[int]:
    """Serve HTTP until the context ends; yields the bound port.

    A connection must send its request head within `header_timeout_s` (408
    otherwise); beyond `max_connections` open ones, new connections are
    answered 503. On exit, open event streams end with a "shutting down"
    error event, and requests still running after `shutdown_grace_s` are
    cancelled. `broker_hooks` adds the MQTT broker's authn/authz routes.
    """
    channel = grpc.aio.insecure_channel(grpc_target)
    stopping = asyncio.Event()
    app = create_app(
        channel,
        services(service_names),
        max_body_bytes=max_body_bytes,
        cors_origins=cors_origins,
        stopping=stopping,
        broker_hooks=broker_hooks,
    )
    sock = _bind(host, port)
    bound = int(sock.getsockname()[1])
    limits = ConnectionLimits(header_timeout_s=header_timeout_s, max_connections=max_connections)
    server = _InProcessServer(
        uvicorn.Config(
            app,
            http=protocol_class(limits),
            log_level="warning",
            lifespan="off",
            access_log=False,
            # uvicorn counts whole seconds.
            timeout_graceful_shutdown=math.ceil(shutdown_grace_s),
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="gateway")
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
            await asyncio.sleep(0.02)
        log.info("HTTP gateway listening on %s:%d", host, bound)
        yield bound
    finally:
        stopping.set()
        server.should_exit = True
        await task
        sock.close()
        await channel.close(None)
