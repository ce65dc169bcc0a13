"""Whether a call may run at all: it decodes, its token is valid, its role may
call the method, its tenant exists, and the process has room for it.

One interceptor, closest to the handler and inside the error mapper (so its
refusals become rich statuses), because grpc.aio's interceptor dispatch costs
per interceptor and these checks always run together.

Limits. Unary calls are counted per process; beyond the limit a call is
refused at once with RESOURCE_EXHAUSTED and a retry delay, rather than
queueing for the database pool until the caller's deadline runs out.
Streams hold a call open for as long as the watcher likes, so they are
counted per caller (tenant and token subject) and per tenant: one client
cannot take the memory every other watcher needs. At shutdown every open
stream ends with UNAVAILABLE (SERVER_SHUTTING_DOWN), telling its client to
reconnect elsewhere, instead of holding the process open.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pulse.device.v1.error_reason_pb2 import ErrorReason

from server.auth import Principal, TokenVerifier, reset_principal, set_principal
from server.decoding import Undecodable
from server.errors import PermissionDenied, ResourceExhausted, ServerShuttingDown, Unauthenticated
from server.interceptors import (
    AroundInterceptor,
    Context,
    Streaming,
    Unary,
    current_call,
    metadata_value,
)
from server.permissions import REQUIRED_ROLE, is_open
from server.tenants import TenantDirectory

#: What a refused caller is told to wait before trying again.
RETRY_AFTER_S = 1.0
#: How long close() waits for cancelled streams to send their last status.
_CLOSE_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrent_calls: int = 1000
    max_streams_per_caller: int = 100
    max_streams_per_tenant: int = 1000


class AdmissionInterceptor(AroundInterceptor):
    def __init__(self, verifier: TokenVerifier, tenants: TenantDirectory, limits: Limits) -> None:
        super().__init__()
        self._verifier = verifier
        self._tenants = tenants
        self._limits = limits
        self._calls = 0
        self._per_caller: Counter[tuple[uuid.UUID, str]] = Counter()
        self._per_tenant: Counter[uuid.UUID] = Counter()
        self._streams: set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def _authorize(self, method: str, context: Context) -> Principal:
        header = metadata_value(context, "authorization")
        if not header:
            raise Unauthenticated("missing bearer token in the authorization metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        principal = await self._verifier.verify(token.strip())
        required = REQUIRED_ROLE.get(method)
        if required is None:
            raise PermissionDenied(f"{method} is not open to any role")
        if principal.role < required:
            raise PermissionDenied(
                f"{method} needs the {required.name.lower()} role; "
                f"the token has {principal.role.name.lower()}"
            )
        await self._tenants.require(principal.tenant_id)
        record = current_call.get()
        if record is not None:
            record.tenant, record.caller = str(principal.tenant_id), principal.subject
        return principal

    def _admit(self, request: Any) -> None:
        if isinstance(request, Undecodable):
            raise request.error()
        if self._closing:
            raise ServerShuttingDown()

    async def around_unary(self, inner: Unary, request: Any, context: Context, method: str) -> Any:
        self._admit(request)
        if is_open(method):
            return await inner(request, context)
        if self._calls >= self._limits.max_concurrent_calls:
            raise ResourceExhausted(
                f"the server is serving {self._calls} calls, its limit; retry shortly",
                reason=ErrorReason.TOO_MANY_REQUESTS,
                retry_after_s=RETRY_AFTER_S,
            )
        self._calls += 1
        try:
            token = set_principal(await self._authorize(method, context))
            try:
                return await inner(request, context)
            finally:
                reset_principal(token)
        finally:
            self._calls -= 1

    async def around_stream(
        self, inner: Streaming, request: Any, context: Context, method: str
    ) -> AsyncIterator[Any]:
        self._admit(request)
        if is_open(method):
            async for item in inner(request, context):
                yield item
            return
        principal = await self._authorize(method, context)
        self._check_stream_room(principal)
        # The generator's context is the stream's own, so the principal
        # needs no reset.
        set_principal(principal)
        caller = (principal.tenant_id, principal.subject)
        task = asyncio.current_task()
        assert task is not None
        self._per_caller[caller] += 1
        self._per_tenant[principal.tenant_id] += 1
        self._streams.add(task)
        try:
            async for item in inner(request, context):
                yield item
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # Cancelled by close(), not by the client: tell the client why.
            task.uncancel()
            raise ServerShuttingDown() from None
        finally:
            self._streams.discard(task)
            _decrement(self._per_caller, caller)
            _decrement(self._per_tenant, principal.tenant_id)

    def _check_stream_room(self, principal: Principal) -> None:
        caller = (principal.tenant_id, principal.subject)
        if self._per_caller[caller] >= self._limits.max_streams_per_caller:
            raise ResourceExhausted(
                f"this caller has {self._per_caller[caller]} open streams, its limit; "
                "close one, or watch several devices in one stream",
                reason=ErrorReason.TOO_MANY_STREAMS,
                retry_after_s=RETRY_AFTER_S,
            )
        if self._per_tenant[principal.tenant_id] >= self._limits.max_streams_per_tenant:
            raise ResourceExhausted(
                f"this tenant has {self._per_tenant[principal.tenant_id]} open streams, its limit",
                reason=ErrorReason.TOO_MANY_STREAMS,
                retry_after_s=RETRY_AFTER_S,
            )

    async def close(self) -> None:
        """Refuse new calls and end every open stream with SERVER_SHUTTING_DOWN."""
        self._closing = True
        streams = list(self._streams)
        for task in streams:
            task.cancel()
        if streams:
            await asyncio.wait(streams, timeout=_CLOSE_WAIT_S)


def _decrement(counter: Counter[Any], key: Any) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
