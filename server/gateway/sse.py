"""Streamed replies as server-sent events.

Each message is an event whose `id` is its resume cursor; a failed stream
ends with an `event: error` carrying the same JSON body as an HTTP error.
When the gateway stops, every open stream gets such an error (UNAVAILABLE,
"shutting down") and ends at once, so a browser left open cannot hold the
shutdown up; EventSource reconnects by itself and resumes with
Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message

from server.gateway import status, transcode

HEARTBEAT_S = 15.0
SHUTTING_DOWN = "the server is shutting down; reconnect shortly"


def _event(message: Message) -> str:
    data = json.dumps(transcode.to_json(message), separators=(",", ":"))
    cursor = transcode.cursor_of(message)
    return (f"id: {cursor}\n" if cursor else "") + f"data: {data}\n\n"


def _error_event(body: dict[str, Any]) -> str:
    return f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


def shutdown_event() -> str:
    body = status.error_body(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, [])
    return _error_event(body)


async def events(
    call: Any,
    responses: AsyncIterator[Message],
    pending: asyncio.Future[Message],
    stopping: asyncio.Event,
) -> AsyncIterator[str]:
    """Messages as server-sent events, with a comment line as heartbeat so
    proxies keep an idle stream open."""
    stop = asyncio.ensure_future(stopping.wait())
    try:
        while True:
            waiting: set[asyncio.Future[Any]] = {pending, stop}
            done, _ = await asyncio.wait(
                waiting, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED
            )
            if stop in done:
                yield shutdown_event()
                return
            if not done:
                yield ": keep-alive\n\n"
                continue
            try:
                message = pending.result()
            except StopAsyncIteration:
                return
            except grpc.aio.AioRpcError as e:
                yield _error_event(status.from_rpc_error(e).body)
                return
            yield _event(message)
            pending = asyncio.ensure_future(responses.__anext__())
    finally:
        stop.cancel()
        pending.cancel()
        call.cancel()
