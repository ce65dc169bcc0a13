"""TwinService: parse and check the request, call the store, convert."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import struct_pb2
from pulse.device.v1 import twin_pb2, twin_pb2_grpc
from pulse.device.v1.error_reason_pb2 import ErrorReason

from server import protoconv
from server import validation as v
from server.auth import current_principal
from server.db import Database
from server.errors import FailedPrecondition, FieldViolation, InvalidArgument
from server.listener import Listener
from server.twin import convert, documents, store
from server.twin.merge_patch import apply_merge_patch
from server.twin.notify import ChangeNotifier
from server.twin.watch import watch

Context = grpc.aio.ServicerContext[Any, Any]

WATCH_MAX_DEVICES = 100


def _expected_version(device_id: str, has_expected: bool, expected: int, force: bool) -> int | None:
    """The version to check, or None for a forced write; refuses a write
    that names no version and does not ask to be unconditional."""
    if has_expected:
        if expected < 0:
            raise InvalidArgument.single("expected_version", "must not be negative")
        return expected
    if force:
        return None
    raise FailedPrecondition(
        "name the desired_version you read in expected_version (or set force to "
        "overwrite whatever is stored)",
        reason=ErrorReason.PRECONDITION_REQUIRED,
        metadata={"device": device_id},
        subject=f"devices/{device_id}/twin",
    )


class TwinService(twin_pb2_grpc.TwinServiceServicer):
    def __init__(
        self, db: Database, listener: Listener, notifier: ChangeNotifier, *, stale_after: timedelta
    ) -> None:
        self._db = db
        self._listener = listener
        self._notifier = notifier
        self._stale_after = stale_after

    def _render(
        self, record: store.TwinRecord, fields: frozenset[str] | None = None
    ) -> twin_pb2.Twin:
        now = datetime.now(UTC)
        if fields is None:
            return convert.twin(record, now=now, stale_after=self._stale_after)
        return convert.partial_twin(record, fields, now=now, stale_after=self._stale_after)

    async def GetTwin(self, request: twin_pb2.GetTwinRequest, context: Context) -> twin_pb2.Twin:
        tenant = current_principal().tenant_id
        device_id = v.require_id("device_id", request.device_id)
        async with self._db.tenant(tenant, readonly=True) as con:
            record = await store.get_twin(con, tenant, device_id)
        return self._render(record)

    async def GetTwinDelta(
        self, request: twin_pb2.GetTwinDeltaRequest, context: Context
    ) -> twin_pb2.TwinDelta:
        tenant = current_principal().tenant_id
        device_id = v.require_id("device_id", request.device_id)
        async with self._db.tenant(tenant, readonly=True) as con:
            record = await store.get_twin(con, tenant, device_id)
        return convert.twin_delta(record)

    async def UpdateDesired(
        self, request: twin_pb2.UpdateDesiredRequest, context: Context
    ) -> twin_pb2.Twin:
        tenant = current_principal().tenant_id
        device_id = v.require_id("device_id", request.device_id)
        if not request.HasField("desired"):
            # A forgotten field must not wipe the document.
            raise InvalidArgument.single("desired", "is required; {} clears the document")
        desired = documents.from_struct("desired", request.desired)
        expected = _expected_version(
            device_id, request.HasField("expected_version"), request.expected_version, request.force
        )
        fields = _read_mask(request)
        # One conditional UPDATE: it needs no transaction around it.
        async with self._db.one_statement(tenant) as con:
            record = await store.write_desired(
                con, tenant, device_id, desired, expected_version=expected
            )
        self._notifier.changed(tenant, [(device_id, record.revision)])
        return self._render(record, fields)

    async def PatchDesired(
        self, request: twin_pb2.PatchDesiredRequest, context: Context
    ) -> twin_pb2.Twin:
        tenant = current_principal().tenant_id
        device_id = v.require_id("device_id", request.device_id)
        patch = _patch(request.patch)
        expected = _expected_version(
            device_id, request.HasField("expected_version"), request.expected_version, request.force
        )
        fields = _read_mask(request)
        # The row lock makes read, merge and write one step: a concurrent
        # writer waits for this transaction instead of slipping in between.
        async with self._db.tenant(tenant) as con:
            current, version = await store.lock_desired(con, tenant, device_id)
            if expected is not None and expected != version:
                raise store.version_mismatch(device_id, expected, version)
            merged = apply_merge_patch(current, patch)
            assert isinstance(merged, dict)  # an object patch always yields an object
            documents.checked("patch", merged)
            record = await store.write_desired(
                con, tenant, device_id, merged, expected_version=version
            )
        self._notifier.changed(tenant, [(device_id, record.revision)])
        return self._render(record, fields)

    async def WatchTwin(
        self, request: twin_pb2.WatchTwinRequest, context: Context
    ) -> AsyncIterator[twin_pb2.Twin]:
        tenant = current_principal().tenant_id
        device_ids, resume = _watch_request(request)
        async for message in watch(
            self._db, self._listener, tenant, device_ids, resume, self._render
        ):
            yield message


def _patch(message: struct_pb2.Struct) -> dict[str, Any]:
    # Only converted here: the limits apply to the merged document, since a
    # patch may delete more than it adds.
    return protoconv.struct_to_dict("patch", message)


def _watch_request(request: twin_pb2.WatchTwinRequest) -> tuple[list[str], dict[str, int]]:
    out: list[FieldViolation] = []
    ids = list(request.device_ids)
    if not ids:
        out.append(FieldViolation("device_ids", "name at least one device"))
    elif len(ids) > WATCH_MAX_DEVICES:
        out.append(
            FieldViolation("device_ids", f"names {len(ids)} devices; at most {WATCH_MAX_DEVICES}")
        )
    elif len(set(ids)) != len(ids):
        out.append(FieldViolation("device_ids", "names a device more than once"))
    for n, device_id in enumerate(ids[:WATCH_MAX_DEVICES]):
        v.check_id(f"device_ids[{n}]", device_id, out)
    resume = dict(request.resume_revisions)
    for device_id, revision in resume.items():
        if device_id not in ids:
            out.append(
                FieldViolation(f"resume_revisions[{device_id[:40]!r}]", "is not one of device_ids")
            )
        elif revision < 0:
            out.append(
                FieldViolation(f"resume_revisions[{device_id[:40]!r}]", "must not be negative")
            )
    if request.HasField("resume_revision"):
        if len(ids) != 1:
            out.append(FieldViolation("resume_revision", "only for a watch of exactly one device"))
        elif request.resume_revision < 0:
            out.append(FieldViolation("resume_revision", "must not be negative"))
        else:
            resume[ids[0]] = request.resume_revision
    if out:
        raise InvalidArgument(out)
    return ids, resume


def _read_mask(
    request: twin_pb2.UpdateDesiredRequest | twin_pb2.PatchDesiredRequest,
) -> frozenset[str] | None:
    """The Twin fields a write's answer is to carry; None: all of them."""
    if not request.HasField("read_mask") or not request.read_mask.paths:
        return None
    fields = frozenset(request.read_mask.paths)
    unknown = sorted(fields - convert.TWIN_FIELDS)
    if unknown:
        raise InvalidArgument.single(
            "read_mask",
            f"names no field of Twin: {', '.join(unknown)} "
            f"(fields: {', '.join(sorted(convert.TWIN_FIELDS))})",
        )
    return fields
