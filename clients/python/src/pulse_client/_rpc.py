"""The single path every RPC takes, for the async and the sync client.

Service wrappers (``_devices.py`` and later ones) never call a stub directly:
they hand the stub's multi-callable to :meth:`AsyncRpc.unary` /
:meth:`AsyncRpc.stream` (or the sync :class:`Rpc` twins), which attach the
bearer token and the default deadline and turn gRPC errors into PulseErrors.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Final, Generic, Literal, Self, TypeAlias, TypeVar

import grpc
import grpc.aio

from ._errors import from_rpc_error

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncRpc",
    "AsyncStream",
    "ChannelOptions",
    "Rpc",
    "Stream",
    "Timeout",
    "Token",
    "channel_credentials",
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")

Token: TypeAlias = str | Callable[[], str]
"""A bearer token, or a function returning the current one (called per RPC)."""

ChannelOptions: TypeAlias = Sequence[tuple[str, str | int]]
"""gRPC channel arguments, e.g. ``[("grpc.max_receive_message_length", 8 << 20)]``."""


class _Default(enum.Enum):
    TIMEOUT = enum.auto()


DEFAULT_TIMEOUT: Final = _Default.TIMEOUT
"""Use the client's default timeout (distinct from None, which means no deadline)."""

Timeout: TypeAlias = float | Literal[_Default.TIMEOUT] | None

_Metadata: TypeAlias = tuple[tuple[str, str], ...]


def channel_credentials(
    secure: bool, root_certificates: bytes | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials for the channel, or None for plaintext.

    Passing root certificates implies TLS: nobody hands over a CA bundle for a
    plaintext connection, so silently ignoring it would only hide a mistake.
    """
    if not secure and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


class _CallSettings:
    """Per-call metadata and deadline, shared by the async and sync helpers."""

    def __init__(self, *, token: Token | None, timeout: float | None) -> None:
        self._token = token
        self.timeout = timeout

    def _metadata(self, extra: Sequence[tuple[str, str]]) -> _Metadata:
        token = self._token() if callable(self._token) else self._token
        if not token:
            return tuple(extra)
        return (("authorization", f"Bearer {token}"), *extra)

    def _deadline(self, timeout: Timeout) -> float | None:
        return self.timeout if timeout is DEFAULT_TIMEOUT else timeout


class AsyncRpc(_CallSettings):
    """Invokes ``grpc.aio`` multi-callables on behalf of the async client."""

    def __init__(
        self, channel: grpc.aio.Channel, *, token: Token | None, timeout: float | None
    ) -> None:
        super().__init__(token=token, timeout=timeout)
        self.channel = channel

    async def unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        # Passed to gRPC as the call's deadline so the server sees it too,
        # which an asyncio.timeout around the await would not do.
        timeout: Timeout = DEFAULT_TIMEOUT,  # noqa: ASYNC109
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Resp:
        """Runs a unary call; raises a PulseError (chained to the RpcError) on failure."""
        try:
            return await method(
                request, timeout=self._deadline(timeout), metadata=self._metadata(metadata)
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def stream(
        self,
        method: grpc.aio.UnaryStreamMultiCallable[Req, Resp],
        request: Req,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncStream[Resp]:
        """Starts a server-streaming call and returns its responses as an async iterator.

        Unlike :meth:`unary`, the default is no deadline: streams such as watches
        are meant to stay open far longer than a request/response timeout.
        """
        call = method(request, timeout=timeout, metadata=self._metadata(metadata))
        return AsyncStream(call)


class AsyncStream(Generic[T]):
    """Responses of a server-streaming call, with errors raised as PulseErrors.

    Use as ``async with stream: async for item in stream: ...`` so that leaving
    the block early cancels the call; :meth:`cancel` does the same explicitly
    and ends the iteration cleanly.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall[Any, T]) -> None:
        self._call = call
        self._responses: AsyncIterator[T] = call.__aiter__()
        self._cancelled = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        if self._cancelled:
            raise StopAsyncIteration
        try:
            return await self._responses.__anext__()
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        except asyncio.CancelledError:
            # grpc.aio reports a cancelled call as CancelledError; swallow it only
            # when we cancelled the call and the reading task is not itself being
            # cancelled, so real task cancellation still propagates.
            task = asyncio.current_task()
            if self._cancelled and task is not None and task.cancelling() == 0:
                raise StopAsyncIteration from None
            raise

    def cancel(self) -> None:
        """Cancels the call; iteration then stops without an error."""
        self._cancelled = True
        self._call.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()


class Rpc(_CallSettings):
    """Invokes blocking multi-callables on behalf of the sync client."""

    def __init__(
        self, channel: grpc.Channel, *, token: Token | None, timeout: float | None
    ) -> None:
        super().__init__(token=token, timeout=timeout)
        self.channel = channel

    def unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Resp:
        """Runs a unary call; raises a PulseError (chained to the RpcError) on failure."""
        try:
            return method(
                request, timeout=self._deadline(timeout), metadata=self._metadata(metadata)
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def stream(
        self,
        method: grpc.UnaryStreamMultiCallable[Req, Resp],
        request: Req,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Stream[Resp]:
        """Starts a server-streaming call; see :meth:`AsyncRpc.stream`."""
        call = method(request, timeout=timeout, metadata=self._metadata(metadata))
        return Stream(call)


class Stream(Generic[T]):
    """Responses of a blocking server-streaming call; see :class:`AsyncStream`."""

    def __init__(self, call: grpc.CallIterator[T]) -> None:
        # grpc-stubs leave RpcContext.cancel unannotated; binding it to a typed
        # attribute keeps strict mode from flagging every call to it.
        self._cancel_call: Callable[[], object] = call.cancel
        self._responses: Iterator[T] = iter(call)
        self._cancelled = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        if self._cancelled:
            raise StopIteration
        try:
            return next(self._responses)
        except grpc.RpcError as error:
            # A call we cancelled ends with CANCELLED; that is our own doing,
            # not a failure to report.
            code = getattr(error, "code", None)
            if self._cancelled and callable(code) and code() is grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc_error(error) from error

    def cancel(self) -> None:
        """Cancels the call; iteration then stops without an error."""
        self._cancelled = True
        self._cancel_call()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()
