"""An HTTP server (uvicorn) as a part of a process that owns its signals:
the gateway, and the operations endpoints (/metrics, /healthz, /readyz)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


class _InProcessServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The host process owns SIGINT/SIGTERM and stops us explicitly.
        yield


def bind(host: str, port: int, *, what: str = "HTTP", reuse_port: bool = False) -> socket.socket:
    """A listening socket on `port`, or on a free one if it is taken. With
    `reuse_port` (one of several worker processes) it shares `port` with the
    others, and there is no falling back."""
    for candidate in (port,) if reuse_port else (port, 0) if port else (0,):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, candidate))
        except OSError:
            sock.close()
            if reuse_port:
                raise
            log.warning("%s port %d is taken; using a free one instead", what, candidate)
            continue
        sock.listen(1024)
        sock.setblocking(False)
        return sock
    raise OSError(f"cannot listen on {host}")


@contextlib.asynccontextmanager
async def serving(
    app: Any, sock: socket.socket, *, shutdown_grace_s: float = 5.0, **options: Any
) -> AsyncIterator[None]:
    """Serve `app` on `sock` until the context ends; `options` go to uvicorn.Config."""
    server = _InProcessServer(
        uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            # uvicorn counts whole seconds.
            timeout_graceful_shutdown=math.ceil(shutdown_grace_s),
            **options,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http server")
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
            await asyncio.sleep(0.02)
        yield
    finally:
        server.should_exit = True
        await task
        sock.close()
