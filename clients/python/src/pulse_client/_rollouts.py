"""Rollouts (``pulse.device.v1.RolloutService``): one desired-state patch, fleet-wide.

A rollout applies one merge patch to the desired documents of a group's
devices (static or dynamic) or of an inline filter's, at a controlled rate,
with an optional canary phase and an automatic abort, and reports each
device's progress. Requests are built once, by the module-level builders, and
sent by the thin async (``AsyncRollouts``) and sync (``Rollouts``) wrappers,
which differ only in how they call the RPC helper.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import TypeAlias

from google.protobuf import struct_pb2
from pulse.device.v1 import rollouts_pb2, rollouts_pb2_grpc

from ._devices import JsonValue
from ._groups import FilterLike, device_filter
from ._pages import AsyncPager, Pager
from ._rpc import AsyncRpc, AsyncStream, Rpc, Stream

__all__ = ["AsyncRollouts", "Rollouts"]

DeviceState: TypeAlias = rollouts_pb2.RolloutDevice.State.ValueType
"""A RolloutDevice.State value, such as ``rollouts_pb2.RolloutDevice.FAILED``."""


def _struct(values: Mapping[str, JsonValue]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def create_rollout_request(
    *,
    group_id: str | None,
    filter: FilterLike | None,
    patch: Mapping[str, JsonValue],
    max_per_minute: int,
    canary_count: int,
    device_timeout: timedelta | None,
    abort_threshold_percent: float | None,
    abort_min_count: int,
    failure_path: str,
    continuous: bool,
    description: str,
    rollout_id: str,
) -> rollouts_pb2.CreateRolloutRequest:
    if (group_id is None) == (filter is None):
        # The target is a oneof, which keeps only the field set last and would
        # silently drop the other; the server refuses neither. Failing here
        # names the mistake.
        raise ValueError("create() needs exactly one of group_id, filter")
    strategy = rollouts_pb2.RolloutStrategy(
        max_per_minute=max_per_minute, canary_count=canary_count
    )
    if device_timeout is not None:
        strategy.device_timeout.FromTimedelta(device_timeout)
    rollout = rollouts_pb2.Rollout(
        rollout_id=rollout_id,
        patch=_struct(patch),
        strategy=strategy,
        abort_min_count=abort_min_count,
        failure_path=failure_path,
        continuous=continuous,
        description=description,
    )
    if group_id is not None:
        rollout.target_group_id = group_id
    if filter is not None:
        # CopyFrom keeps the field present even for the empty filter (every device).
        rollout.target_filter.CopyFrom(device_filter(filter))
        rollout.target_filter.SetInParent()
    if abort_threshold_percent is not None:
        rollout.abort_threshold_percent = abort_threshold_percent
    return rollouts_pb2.CreateRolloutRequest(rollout=rollout)


def list_rollouts_request(
    target_group_id: str, page_size: int, page_token: str
) -> rollouts_pb2.ListRolloutsRequest:
    return rollouts_pb2.ListRolloutsRequest(
        target_group_id=target_group_id, page_size=page_size, page_token=page_token
    )


def list_devices_request(
    rollout_id: str, states: Iterable[DeviceState], page_size: int, page_token: str
) -> rollouts_pb2.ListRolloutDevicesRequest:
    return rollouts_pb2.ListRolloutDevicesRequest(
        rollout_id=rollout_id, states=list(states), page_size=page_size, page_token=page_token
    )


def _rollouts_of(response: rollouts_pb2.ListRolloutsResponse) -> Sequence[rollouts_pb2.Rollout]:
    return response.rollouts


def _devices_of(
    response: rollouts_pb2.ListRolloutDevicesResponse,
) -> Sequence[rollouts_pb2.RolloutDevice]:
    return response.devices


class AsyncRollouts:
    """Rollouts of the caller's tenant (``client.rollouts``)."""

    def __init__(self, rpc: AsyncRpc) -> None:
        self._rpc = rpc
        self._stub = rollouts_pb2_grpc.RolloutServiceStub(rpc.channel)

    async def create(
        self,
        *,
        group_id: str | None = None,
        filter: FilterLike | None = None,
        patch: Mapping[str, JsonValue],
        max_per_minute: int = 0,
        canary_count: int = 0,
        device_timeout: timedelta | None = None,
        abort_threshold_percent: float | None = None,
        abort_min_count: int = 0,
        failure_path: str = "",
        continuous: bool = False,
        description: str = "",
        rollout_id: str = "",
    ) -> rollouts_pb2.Rollout:
        """Starts a rollout of ``patch`` to a group's devices or a filter's.

        Args:
            group_id: Target this group (static or dynamic; a dynamic group's
                filter is re-read whenever devices are started).
            filter: Target the devices this filter selects; ``{}`` selects
                every active device.
            patch: An RFC 7386 merge patch of the desired document (None
                removes a key).
            max_per_minute: Most devices started in any minute; 0 starts
                them as fast as the engine writes.
            canary_count: Devices started first; the rest start only once
                all of them SUCCEEDED.
            device_timeout: How long a device has, from the write, to report
                the patch applied; None leaves the server default (15 min).
            abort_threshold_percent: Abort once failed and timed-out devices
                are more than this percentage of those with an outcome; None
                never aborts.
            abort_min_count: Outcomes needed before the abort rule applies.
            failure_path: A path in the reported document (as in a twin
                condition) whose non-null value marks the device FAILED.
            continuous: Also target devices that enter the target later,
                until cancelled; False targets the devices in it now.
            description: Free text.
            rollout_id: The id to use; empty lets the server assign one.

        Raises:
            ValueError: Not exactly one of ``group_id`` and ``filter`` given.
        """
        request = create_rollout_request(
            group_id=group_id,
            filter=filter,
            patch=patch,
            max_per_minute=max_per_minute,
            canary_count=canary_count,
            device_timeout=device_timeout,
            abort_threshold_percent=abort_threshold_percent,
            abort_min_count=abort_min_count,
            failure_path=failure_path,
            continuous=continuous,
            description=description,
            rollout_id=rollout_id,
        )
        return await self._rpc.unary(self._stub.CreateRollout, request)

    async def get(self, rollout_id: str) -> rollouts_pb2.Rollout:
        """Returns one rollout with its per-state device counts; NotFound if absent."""
        request = rollouts_pb2.GetRolloutRequest(rollout_id=rollout_id)
        return await self._rpc.unary(self._stub.GetRollout, request)

    def list(
        self, *, target_group_id: str = "", page_size: int = 0
    ) -> AsyncPager[rollouts_pb2.Rollout]:
        """Rollouts newest first, fetched lazily page by page.

        Args:
            target_group_id: Only the rollouts that target this group; empty
                for all.
            page_size: Rollouts per page; 0 lets the server choose.
        """

        async def fetch(token: str) -> rollouts_pb2.ListRolloutsResponse:
            return await self.list_page(list_rollouts_request(target_group_id, page_size, token))

        return AsyncPager(fetch, _rollouts_of)

    async def list_page(
        self, request: rollouts_pb2.ListRolloutsRequest
    ) -> rollouts_pb2.ListRolloutsResponse:
        """One raw ListRollouts call, for callers that handle page tokens themselves."""
        return await self._rpc.unary(self._stub.ListRollouts, request)

    def list_devices(
        self, rollout_id: str, *, states: Iterable[DeviceState] = (), page_size: int = 0
    ) -> AsyncPager[rollouts_pb2.RolloutDevice]:
        """The rollout's devices in device_id order, fetched lazily page by page.

        Args:
            rollout_id: The rollout.
            states: Only devices in these states
                (``rollouts_pb2.RolloutDevice.FAILED``, ...); empty for all.
            page_size: Devices per page; 0 lets the server choose.
        """
        wanted = list(states)

        async def fetch(token: str) -> rollouts_pb2.ListRolloutDevicesResponse:
            return await self.list_devices_page(
                list_devices_request(rollout_id, wanted, page_size, token)
            )

        return AsyncPager(fetch, _devices_of)

    async def list_devices_page(
        self, request: rollouts_pb2.ListRolloutDevicesRequest
    ) -> rollouts_pb2.ListRolloutDevicesResponse:
        """One raw ListRolloutDevices call, for callers that handle page tokens themselves."""
        return await self._rpc.unary(self._stub.ListRolloutDevices, request)

    async def pause(self, rollout_id: str) -> rollouts_pb2.Rollout:
        """Stops starting devices; those already written are still followed.

        Only a RUNNING rollout can be paused.
        """
        request = rollouts_pb2.PauseRolloutRequest(rollout_id=rollout_id)
        return await self._rpc.unary(self._stub.PauseRollout, request)

    async def resume(self, rollout_id: str) -> rollouts_pb2.Rollout:
        """Starts devices again; the rate counts from the resume."""
        request = rollouts_pb2.ResumeRolloutRequest(rollout_id=rollout_id)
        return await self._rpc.unary(self._stub.ResumeRollout, request)

    async def cancel(self, rollout_id: str) -> rollouts_pb2.Rollout:
        """Ends a running or paused rollout for good.

        No device is started any more (PENDING ones stay so); devices already
        written keep their desired state and are followed to their outcome.
        """
        request = rollouts_pb2.CancelRolloutRequest(rollout_id=rollout_id)
        return await self._rpc.unary(self._stub.CancelRollout, request)

    def watch(
        self, rollout_id: str, *, resume_cursor: str = ""
    ) -> AsyncStream[rollouts_pb2.WatchRolloutResponse]:
        """The rollout's progress: the rollout (state, counts) first and after
        every change, and each device whose state changed. It ends once the
        rollout has ended and no device waits for an outcome. Every message
        carries a ``cursor``; pass the last one as ``resume_cursor`` to
        continue after it."""
        request = rollouts_pb2.WatchRolloutRequest(
            rollout_id=rollout_id, resume_cursor=resume_cursor
        )
        return self._rpc.stream(self._stub.WatchRollout, request)


class Rollouts:
    """Blocking twin of :class:`AsyncRollouts` (``PulseClient.rollouts``)."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._stub = rollouts_pb2_grpc.RolloutServiceStub(rpc.channel)

    def create(
        self,
        *,
        group_id: str | None = None,
        filter: FilterLike | None = None,
        patch: Mapping[str, JsonValue],
        max_per_minute: int = 0,
        canary_count: int = 0,
        device_timeout: timedelta | None = None,
        abort_threshold_percent: float | None = None,
        abort_min_count: int = 0,
        failure_path: str = "",
        continuous: bool = False,
        description: str = "",
        rollout_id: str = "",
    ) -> rollouts_pb2.Rollout:
        """Starts a rollout; see :meth:`AsyncRollouts.create`."""
        request = create_rollout_request(
            group_id=group_id,
            filter=filter,
            patch=patch,
            max_per_minute=max_per_minute,
            canary_count=canary_count,
            device_timeout=device_timeout,
            abort_threshold_percent=abort_threshold_percent,
            abort_min_count=abort_min_count,
            failure_path=failure_path,
            continuous=continuous,
            description=description,
            rollout_id=rollout_id,
        )
        return self._rpc.unary(self._stub.CreateRollout, request)

    def get(self, rollout_id: str) -> rollouts_pb2.Rollout:
        """Returns one rollout with its per-state device counts; NotFound if absent."""
        request = rollouts_pb2.GetRolloutRequest(rollout_id=rollout_id)
        return self._rpc.unary(self._stub.GetRollout, request)

    def list(self, *, target_group_id: str = "", page_size: int = 0) -> Pager[rollouts_pb2.Rollout]:
        """Rollouts newest first; see :meth:`AsyncRollouts.list`."""

        def fetch(token: str) -> rollouts_pb2.ListRolloutsResponse:
            return self.list_page(list_rollouts_request(target_group_id, page_size, token))

        return Pager(fetch, _rollouts_of)

    def list_page(
        self, request: rollouts_pb2.ListRolloutsRequest
    ) -> rollouts_pb2.ListRolloutsResponse:
        """One raw ListRollouts call, for callers that handle page tokens themselves."""
        return self._rpc.unary(self._stub.ListRollouts, request)

    def list_devices(
        self, rollout_id: str, *, states: Iterable[DeviceState] = (), page_size: int = 0
    ) -> Pager[rollouts_pb2.RolloutDevice]:
        """The rollout's devices in device_id order; see :meth:`AsyncRollouts.list_devices`."""
        wanted = list(states)

        def fetch(token: str) -> rollouts_pb2.ListRolloutDevicesResponse:
            return self.list_devices_page(
                list_devices_request(rollout_id, wanted, page_size, token)
            )

        return Pager(fetch, _devices_of)

    def list_devices_page(
        self, request: rollouts_pb2.ListRolloutDevicesRequest
    ) -> rollouts_pb2.ListRolloutDevicesResponse:
        """One raw ListRolloutDevices call, for callers that handle page tokens themselves."""
        return self._rpc.unary(self._stub.ListRolloutDevices, request)

    def pause(self, rollout_id: str) -> rollouts_pb2.Rollout:
        """Stops starting devices; see :meth:`AsyncRollouts.pause`."""
        request = rollouts_pb2.PauseRolloutRequest(rollout_id=rollout_id)
        return self._rpc.unary(self._stub.PauseRollout, request)

    def resume(self, rollout_id: str) -> rollouts_pb2.Rollout:
        """Starts devices again; the rate counts from the resume."""
        request = rollouts_pb2.ResumeRolloutRequest(rollout_id=rollout_id)
        return self._rpc.unary(self._stub.ResumeRollout, request)

    def cancel(self, rollout_id: str) -> rollouts_pb2.Rollout:
        """Ends a running or paused rollout for good; see :meth:`AsyncRollouts.cancel`."""
        request = rollouts_pb2.CancelRolloutRequest(rollout_id=rollout_id)
        return self._rpc.unary(self._stub.CancelRollout, request)

    def watch(
        self, rollout_id: str, *, resume_cursor: str = ""
    ) -> Stream[rollouts_pb2.WatchRolloutResponse]:
        """Blocking :meth:`AsyncRollouts.watch`."""
        request = rollouts_pb2.WatchRolloutRequest(
            rollout_id=rollout_id, resume_cursor=resume_cursor
        )
        return self._rpc.stream(self._stub.WatchRollout, request)
