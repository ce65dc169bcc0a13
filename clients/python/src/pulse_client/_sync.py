"""The blocking client."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import grpc

from ._connectivity import Connectivity
from ._devices import Devices, Sites
from ._errors import Unavailable
from ._groups import Groups
from ._rollouts import Rollouts
from ._rpc import ChannelOptions, Rpc, Token, channel_credentials
from ._twin import Twins

__all__ = ["PulseClient"]


class PulseClient:
    """Blocking client for Pulse Device Management; mirrors :class:`AsyncPulseClient`.

    Attributes:
        channel: The underlying ``grpc`` channel, owned by the client.
        devices: Device registry calls.
        sites: Site calls.
        groups: Device groups, static and dynamic.
        twin: Device twin calls (desired and reported state).
        connectivity: Connection events: history and live watch streams.
        rollouts: Rollouts of one desired-state patch to a group or a filter.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        token: Token | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        """Wraps an existing channel, which :meth:`close` will close.

        Prefer :meth:`connect`; arguments are as for :meth:`connect`.
        """
        self.channel = channel
        self._rpc = Rpc(channel, token=token, timeout=timeout)
        self.devices = Devices(self._rpc)
        self.sites = Sites(self._rpc)
        self.groups = Groups(self._rpc)
        self.twin = Twins(self._rpc)
        self.connectivity = Connectivity(self._rpc)
        self.rollouts = Rollouts(self._rpc)

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        token: Token | None = None,
        secure: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = 30.0,
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
            channel = grpc.insecure_channel(target, options=options)
        else:
            channel = grpc.secure_channel(target, credentials, options=options)
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            channel.close()
            raise Unavailable(f"could not connect to {target} within {timeout}s") from None
        except BaseException:
            channel.close()
            raise
        return cls(channel, token=token, timeout=timeout)

    def close(self) -> None:
        """Closes the channel, cancelling calls still in flight."""
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
