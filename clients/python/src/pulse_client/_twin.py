"""Device twins (``pulse.device.v1.TwinService``): desired and reported state.

Every desired write names the version it read (``expected_version``); a
stale one raises :class:`~pulse_client.VersionConflict` carrying the current
version. :meth:`AsyncTwins.modify_desired` wraps the read-modify-write loop
with bounded, jittered retries, so a caller cannot lose a concurrent update
by accident.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2
from pulse.device.v1 import twin_pb2, twin_pb2_grpc

from ._devices import JsonValue
from ._errors import VersionConflict
from ._rpc import AsyncRpc, AsyncStream, Rpc, Stream

__all__ = [
    "AsyncTwins",
    "Modify",
    "RetryPolicy",
    "Twins",
    "struct_to_dict",
]

Modify = Callable[[dict[str, Any]], Mapping[str, JsonValue] | None]
"""Receives a private copy of the desired document; returns the new one, or
None to write the (mutated) copy itself."""

_EXACT_INT = 2**53


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How :meth:`AsyncTwins.modify_desired` retries on a version conflict.

    Attempt ``n`` (from 1) that conflicts sleeps a random time between 0 and
    ``min(max_delay, initial_delay * 2 ** (n - 1))`` seconds ("full jitter"),
    so writers that collided spread out instead of colliding again.

    Attributes:
        max_attempts: Reads-and-writes before giving up with the last
            VersionConflict.
        initial_delay: The first backoff ceiling, in seconds.
        max_delay: The largest backoff ceiling, in seconds.
    """

    # Measured with 16 writers incrementing one counter (the test suite):
    # shorter first delays make them collide more and finish later.
    max_attempts: int = 64
    initial_delay: float = 0.025
    max_delay: float = 1.0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max_delay, self.initial_delay * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct (``twin.desired``, ``twin.reported``) as plain Python values.

    Struct stores every number as a double; integral ones within 2**53 come
    back as int, as the server treats them.
    """
    return {key: _plain(item) for key, item in value.fields.items()}


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if math.isfinite(number) and number.is_integer() and abs(number) <= _EXACT_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    return None


def _struct(values: Mapping[str, JsonValue]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def update_desired_request(
    device_id: str,
    desired: Mapping[str, JsonValue],
    expected_version: int | None,
    force: bool,
    fields: Iterable[str] | None = None,
) -> twin_pb2.UpdateDesiredRequest:
    request = twin_pb2.UpdateDesiredRequest(
        device_id=device_id, desired=_struct(desired), force=force
    )
    if expected_version is not None:
        request.expected_version = expected_version
    if fields is not None:
        request.read_mask.paths.extend(fields)
    return request


def patch_desired_request(
    device_id: str,
    patch: Mapping[str, JsonValue],
    expected_version: int | None,
    force: bool,
    fields: Iterable[str] | None = None,
) -> twin_pb2.PatchDesiredRequest:
    request = twin_pb2.PatchDesiredRequest(device_id=device_id, patch=_struct(patch), force=force)
    if expected_version is not None:
        request.expected_version = expected_version
    if fields is not None:
        request.read_mask.paths.extend(fields)
    return request


def watch_request(
    device_ids: str | Iterable[str], resume_revisions: Mapping[str, int] | None
) -> twin_pb2.WatchTwinRequest:
    ids = [device_ids] if isinstance(device_ids, str) else list(device_ids)
    return twin_pb2.WatchTwinRequest(device_ids=ids, resume_revisions=resume_revisions or {})


def _modified(twin: twin_pb2.Twin, fn: Modify) -> Mapping[str, JsonValue]:
    document = struct_to_dict(twin.desired)
    result = fn(document)
    return document if result is None else result


class AsyncTwins:
    """Device twins of the caller's tenant (``client.twin``)."""

    def __init__(self, rpc: AsyncRpc) -> None:
        self._rpc = rpc
        self._stub = twin_pb2_grpc.TwinServiceStub(rpc.channel)

    async def get(self, device_id: str) -> twin_pb2.Twin:
        """The device's twin: documents, versions, sync status and delta."""
        request = twin_pb2.GetTwinRequest(device_id=device_id)
        return await self._rpc.unary(self._stub.GetTwin, request)

    async def get_delta(self, device_id: str) -> twin_pb2.TwinDelta:
        """Only the structured delta between desired and reported."""
        request = twin_pb2.GetTwinDeltaRequest(device_id=device_id)
        return await self._rpc.unary(self._stub.GetTwinDelta, request)

    async def update_desired(
        self,
        device_id: str,
        desired: Mapping[str, JsonValue],
        *,
        expected_version: int | None = None,
        force: bool = False,
        fields: Iterable[str] | None = None,
    ) -> twin_pb2.Twin:
        """Replaces the desired document if it is still at ``expected_version``.

        Args:
            device_id: The device.
            desired: The whole new desired document.
            expected_version: The ``desired_version`` you read. Required unless
                ``force``.
            force: Overwrite whatever is stored (only when ``expected_version``
                is None).
            fields: Only these fields of the answer, e.g.
                ``["desired_version", "revision"]``; None: the whole twin. A
                write that needs only its new version spares the server the
                delta.

        Raises:
            VersionConflict: Someone wrote first; ``current_version`` says
                which version is stored now.
            FailedPrecondition: No version and no ``force`` (reason
                PRECONDITION_REQUIRED), or the device is decommissioned.
        """
        request = update_desired_request(device_id, desired, expected_version, force, fields)
        return await self._rpc.unary(self._stub.UpdateDesired, request)

    async def patch_desired(
        self,
        device_id: str,
        patch: Mapping[str, JsonValue],
        *,
        expected_version: int | None = None,
        force: bool = False,
        fields: Iterable[str] | None = None,
    ) -> twin_pb2.Twin:
        """Applies a JSON merge patch (RFC 7386: None removes a key) atomically
        on the server; version rules as for :meth:`update_desired`."""
        request = patch_desired_request(device_id, patch, expected_version, force, fields)
        return await self._rpc.unary(self._stub.PatchDesired, request)

    async def modify_desired(
        self, device_id: str, fn: Modify, *, retry: RetryPolicy | None = None
    ) -> twin_pb2.Twin:
        """Reads the desired document, applies ``fn`` and writes the result
        with the version read; on a conflict, starts over.

        ``fn`` may run several times, each time on a fresh copy of the
        current document, so it must not have other side effects.

        Raises:
            VersionConflict: Still conflicting after ``retry.max_attempts``.
        """
        policy = retry or RetryPolicy()
        for attempt in range(1, policy.max_attempts + 1):
            twin = await self.get(device_id)
            desired = _modified(twin, fn)
            try:
                return await self.update_desired(
                    device_id, desired, expected_version=twin.desired_version
                )
            except VersionConflict:
                if attempt == policy.max_attempts:
                    raise
            await asyncio.sleep(policy.delay(attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def watch(
        self,
        device_ids: str | Iterable[str],
        *,
        resume_revisions: Mapping[str, int] | None = None,
    ) -> AsyncStream[twin_pb2.Twin]:
        """Streams the devices' twins: the current ones, then every change.

        Args:
            device_ids: One device id or up to 100.
            resume_revisions: Per device, the ``revision`` of the last twin
                you received; only newer twins are sent for it.
        """
        request = watch_request(device_ids, resume_revisions)
        return self._rpc.stream(self._stub.WatchTwin, request)


class Twins:
    """Blocking twin of :class:`AsyncTwins` (``PulseClient.twin``)."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._stub = twin_pb2_grpc.TwinServiceStub(rpc.channel)

    def get(self, device_id: str) -> twin_pb2.Twin:
        """The device's twin; see :meth:`AsyncTwins.get`."""
        request = twin_pb2.GetTwinRequest(device_id=device_id)
        return self._rpc.unary(self._stub.GetTwin, request)

    def get_delta(self, device_id: str) -> twin_pb2.TwinDelta:
        """Only the structured delta; see :meth:`AsyncTwins.get_delta`."""
        request = twin_pb2.GetTwinDeltaRequest(device_id=device_id)
        return self._rpc.unary(self._stub.GetTwinDelta, request)

    def update_desired(
        self,
        device_id: str,
        desired: Mapping[str, JsonValue],
        *,
        expected_version: int | None = None,
        force: bool = False,
        fields: Iterable[str] | None = None,
    ) -> twin_pb2.Twin:
        """Replaces the desired document; see :meth:`AsyncTwins.update_desired`."""
        request = update_desired_request(device_id, desired, expected_version, force, fields)
        return self._rpc.unary(self._stub.UpdateDesired, request)

    def patch_desired(
        self,
        device_id: str,
        patch: Mapping[str, JsonValue],
        *,
        expected_version: int | None = None,
        force: bool = False,
        fields: Iterable[str] | None = None,
    ) -> twin_pb2.Twin:
        """Applies a JSON merge patch; see :meth:`AsyncTwins.patch_desired`."""
        request = patch_desired_request(device_id, patch, expected_version, force, fields)
        return self._rpc.unary(self._stub.PatchDesired, request)

    def modify_desired(
        self, device_id: str, fn: Modify, *, retry: RetryPolicy | None = None
    ) -> twin_pb2.Twin:
        """Read, apply ``fn``, write, retry; see :meth:`AsyncTwins.modify_desired`."""
        policy = retry or RetryPolicy()
        for attempt in range(1, policy.max_attempts + 1):
            twin = self.get(device_id)
            desired = _modified(twin, fn)
            try:
                return self.update_desired(
                    device_id, desired, expected_version=twin.desired_version
                )
            except VersionConflict:
                if attempt == policy.max_attempts:
                    raise
            time.sleep(policy.delay(attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def watch(
        self,
        device_ids: str | Iterable[str],
        *,
        resume_revisions: Mapping[str, int] | None = None,
    ) -> Stream[twin_pb2.Twin]:
        """Streams the devices' twins; see :meth:`AsyncTwins.watch`."""
        request = watch_request(device_ids, resume_revisions)
        return self._rpc.stream(self._stub.WatchTwin, request)
