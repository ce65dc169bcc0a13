"""Liveness and readiness over HTTP, for orchestrators and load balancers.

`/healthz` answers 200 while the process's event loop runs: restart it only
when this fails. `/readyz` answers 200 when every check of the process
passes, 503 with the failing checks' reasons otherwise: send it no traffic
meanwhile. Each check has a deadline, so a hung dependency reads as not
ready instead of hanging the probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from server import migrate
from server.http_server import bind, serving
from server.observability import metrics

log = logging.getLogger(__name__)

#: A check: None when it passes, else why not.
Check = Callable[[], Awaitable[str | None]]

CHECK_TIMEOUT_S = 2.0


class Readiness:
    """The named checks /readyz runs, all at once."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check

    async def report(self) -> tuple[bool, dict[str, str]]:
        names = list(self._checks)
        results = await asyncio.gather(*(self._run(self._checks[n]) for n in names))
        outcome = {name: result or "ok" for name, result in zip(names, results, strict=True)}
        return all(result is None for result in results), outcome

    @staticmethod
    async def _run(check: Check) -> str | None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                return await check()
        except TimeoutError:
            return f"no answer within {CHECK_TIMEOUT_S:g}s"


class DatabaseProbe:
    """Whether the database answers and has every migration this build
    expects, on a connection of its own: a busy pool must not read as a
    database that is down."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._con: asyncpg.Connection[Any] | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> asyncpg.Connection[Any]:
        if self._con is None or self._con.is_closed():
            self._con = await asyncpg.connect(self._dsn, timeout=CHECK_TIMEOUT_S)
        return self._con

    async def _pending(self) -> list[str] | str:
        """The migrations the database lacks, or why it did not answer."""
        async with self._lock:
            try:
                return await migrate.pending(await self._connection())
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                self._drop()
                return f"database unreachable: {error or type(error).__name__}"

    async def reachable(self) -> str | None:
        answer = await self._pending()
        return answer if isinstance(answer, str) else None

    async def migrations_current(self) -> str | None:
        missing = await self._pending()
        if isinstance(missing, str):
            return missing
        return f"migrations not applied: {', '.join(missing)}" if missing else None

    def _drop(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            con.terminate()

    async def close(self) -> None:
        async with self._lock:
            if self._con is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._con.close(), CHECK_TIMEOUT_S)
            self._drop()

    def add_to(self, readiness: Readiness) -> None:
        readiness.add("database", self.reachable)
        readiness.add("migrations", self.migrations_current)


def grpc_serving(channel: grpc.aio.Channel) -> Check:
    """The gRPC server behind `channel` reports SERVING (a gateway's check)."""
    stub = health_pb2_grpc.HealthStub(channel)

    async def check() -> str | None:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            return f"gRPC server: {error.code().name} {error.details() or ''}".strip()
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"gRPC server: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return None

    return check


def event_set(event: asyncio.Event, failing: str) -> Check:
    """Passes while `event` is set (a connection that is up)."""

    async def check() -> str | None:
        return None if event.is_set() else failing

    return check


def routes(readiness: Readiness) -> list[Route]:
    """/healthz, /readyz and /metrics."""

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        ready, checks = await readiness.report()
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    async def scrape(request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", scrape, methods=["GET"]),
    ]


@contextlib.asynccontextmanager
async def serving_ops(
    host: str, port: int, readiness: Readiness, *, reuse_port: bool = False
) -> AsyncIterator[int]:
    """/healthz, /readyz and /metrics on a port of their own (processes with
    no HTTP gateway), until the context ends; yields the bound port."""
    sock = bind(host, port, what="operations", reuse_port=reuse_port)
    bound = int(sock.getsockname()[1])
    async with serving(Starlette(routes=routes(readiness)), sock, shutdown_grace_s=1):
        log.info("metrics and health on http://%s:%d (/metrics, /healthz, /readyz)", host, bound)
        yield bound
