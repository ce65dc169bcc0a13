"""uvicorn's httptools protocol with the two connection limits it lacks.

* A deadline for the request head. uvicorn's keep-alive timer only starts
  after a response, so a client that connects and never finishes its request
  line and headers would hold the connection forever; after
  `header_timeout_s` it gets 408 and is closed.
* A cap on open connections. uvicorn's `limit_concurrency` accepts a
  connection and keeps it until its headers arrive before answering 503, so
  it bounds nothing while heads are incomplete; here a connection over
  `max_connections` is answered 503 with `Retry-After` as soon as it is
  accepted, and never reaches the HTTP parser or the app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import ClassVar, cast

import grpc
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.gateway import status

log = logging.getLogger("pulse.gateway")

# How long a refused connection is drained before it is closed. Closing a
# socket that still has unread request bytes sends a reset, which can destroy
# the 503 before the client reads it; a client that reads the answer closes
# its end well within this.
_REFUSED_LINGER_S = 2.0
_RETRY_AFTER_S = 1
_WARN_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_connections: int = 1000


def _error_response(http: int, code: grpc.StatusCode, message: str, *headers: bytes) -> bytes:
    body = status.error_body(code, message, [])
    body["error"]["code"] = http
    content = json.dumps(body, separators=(",", ":")).encode()
    head = [
        STATUS_LINE[http].rstrip(b"\r\n"),
        b"content-type: application/json",
        b"content-length: " + str(len(content)).encode(),
        b"connection: close",
        *headers,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + content


class _Refused(asyncio.Protocol):
    """A connection over the cap: answered 503, then drained until the client
    closes its end or the linger ends."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        transport.write(
            _error_response(
                503,
                grpc.StatusCode.UNAVAILABLE,
                f"the server has {self._limit} open connections, its limit; retry shortly",
                f"retry-after: {_RETRY_AFTER_S}".encode(),
            )
        )
        if transport.can_write_eof():
            transport.write_eof()
        self._linger = asyncio.get_running_loop().call_later(_REFUSED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not served; reading it only avoids a reset

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()


class LimitedHttpProtocol(HttpToolsProtocol):
    """Subclassed per gateway by `protocol_class`, which sets `limits`."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _last_warning: ClassVar[float] = 0.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limit = self.limits.max_connections
        if len(self.connections) >= limit:
            self._warn_refused(limit)
            refused = _Refused(limit)
            transport.set_protocol(refused)
            refused.connection_made(transport)
            return
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Bytes between requests (even bare CRLFs, which start no message)
        # cancel uvicorn's keep-alive timer; the head deadline replaces it.
        if self.cycle is None or self.cycle.response_complete:
            self._await_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_head()

    def on_headers_complete(self) -> None:
        self._head_received()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_received()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timed_out
            )

    def _head_received(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head is late while a response is still being sent:
            # finish that response, then close.
            self.cycle.keep_alive = False
            return
        self.transport.write(
            _error_response(
                408,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request head did not arrive within {self.limits.header_timeout_s:g} s",
            )
        )
        self.transport.close()

    @classmethod
    def _warn_refused(cls, limit: int) -> None:
        now = time.monotonic()
        if now - cls._last_warning >= _WARN_EVERY_S:
            cls._last_warning = now
            log.warning("refusing HTTP connections: %d are open, the limit", limit)


def protocol_class(limits: ConnectionLimits) -> type[LimitedHttpProtocol]:
    """A protocol class for `uvicorn.Config(http=...)`, which instantiates it
    without arguments of ours."""
    return type("GatewayHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})
