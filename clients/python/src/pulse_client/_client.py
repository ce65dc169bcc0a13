"""The asyncio client."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

import grpc
import grpc.aio

from ._connectivity import AsyncConnectivity
from ._devices import AsyncDevices, AsyncSites
from ._errors import Unavailable
from ._groups import AsyncGroups
from ._rollouts import AsyncRollouts
from ._rpc import AsyncRpc, ChannelOptions, Token, channel_credentials
from ._twin import AsyncTwins

__all__ = ["AsyncPulseClient"]


class AsyncPulseClient:
    """Asyncio client for Pulse Device Management.

    Create it with :meth:`connect` and close it with :meth:`close` or by using
    it as ``async with``. Each service is an attribute (``devices``,
    ``sites``); every call raises a :class:`~pulse_client.PulseError` subclass
    on failure.

    Attributes:
        channel: The underlying ``grpc.aio`` channel, owned by the client.
        devices: Device registry calls.
        sites: Site calls.
        groups: Device groups, static and dynamic.
        twin: Device twin calls (desired and reported state).
        connectivity: Connection events: history and live watch streams.
        rollouts: Rollouts of one desired-state patch to a group or a filter.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        token: Token | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        """Wraps an existing channel, which :meth:`close` will close.

        Prefer :meth:`connect`; this is for channels built by hand (custom
        credentials or interceptors). Arguments are as for :meth:`connect`.
        """
        self.channel = channel
        self._rpc = AsyncRpc(channel, token=token, timeout=timeout)
        self.devices = AsyncDevices(self._rpc)
        self.sites = AsyncSites(self._rpc)
        self.groups = AsyncGroups(self._rpc)
        self.twin = AsyncTwins(self._rpc)
        self.connectivity = AsyncConnectivity(self._rpc)
        self.rollouts = AsyncRollouts(self._rpc)

    @classmethod
    async def connect(
        cls,
        target: str,
        *,
        token: Token | None = None,
        secure: bool = False,
        root_certificates: bytes | None = None,
        # Not just this coroutine's timeout: it becomes every call's default deadline.
        timeout: float | None = 30.0,  # noqa: ASYNC109
        options: ChannelOptions = (),
    ) -> Self:
        """Opens a channel to ``target`` and waits until it is connected.

        Args:
            target: The server address, e.g. ``"localhost:50051"``.
            token: The bearer JWT sent as ``authorization: Bearer <token>`` on
                every call, or a function returning it, called before each call
                so that a refreshed token is picked up. None sends no token.
            secure: Use TLS. Implied when ``root_certificates`` is given.
            root_certificates: PEM CA certificates to verify the server with;
                None uses the system roots.
            timeout: Seconds allowed for connecting and the default deadline of
                each unary call; None waits indefinitely.
            options: Extra gRPC channel arguments.

        Raises:
            Unavailable: The server could not be reached within ``timeout``.
        """
        credentials = channel_credentials(secure, root_certificates)
        if credentials is None:
            channel = grpc.aio.insecure_channel(target, options=options)
        else:
            channel = grpc.aio.secure_channel(target, credentials, options=options)
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout)
        except TimeoutError:
            await channel.close(None)
            raise Unavailable(f"could not connect to {target} within {timeout}s") from None
        except BaseException:
            await channel.close(None)
            raise
        return cls(channel, token=token, timeout=timeout)

    async def close(self) -> None:
        """Closes the channel, cancelling calls still in flight."""
        await self.channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
