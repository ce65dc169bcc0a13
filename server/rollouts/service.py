"""RolloutService: check the request, call the store, convert. The work of
a rollout is the engine's (server/rollouts/engine.py)."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import grpc
from pulse.device.v1 import rollouts_pb2, rollouts_pb2_grpc

from server import filters, protoconv
from server import validation as v
from server.auth import current_principal
from server.db import Database
from server.errors import FieldViolation, InvalidArgument
from server.listener import Listener
from server.pagination import PageTokens, page_size
from server.rollouts import convert, rules, store, watch
from server.twin import documents

Context = grpc.aio.ServicerContext[Any, Any]
DeviceState = rollouts_pb2.RolloutDevice.State

DESCRIPTION_MAX = 1024
MAX_PER_MINUTE = 1_000_000
MAX_CANARIES = 10_000
MAX_ABORT_MIN_COUNT = 1_000_000
DEFAULT_DEVICE_TIMEOUT = timedelta(minutes=15)
MIN_DEVICE_TIMEOUT = timedelta(seconds=1)
MAX_DEVICE_TIMEOUT = timedelta(days=7)


def _target(
    r: rollouts_pb2.Rollout, out: list[FieldViolation]
) -> tuple[str | None, dict[str, Any] | None]:
    kind = r.WhichOneof("target")
    if kind == "target_group_id":
        v.check_id("rollout.target_group_id", r.target_group_id, out)
        return r.target_group_id, None
    if kind == "target_filter":
        parsed = protoconv.parse_request_filter(
            r.target_filter, field="rollout.target_filter", out=out
        )
        return None, filters.canonical_json(parsed) if parsed is not None else None
    out.append(
        FieldViolation(
            "rollout.target_group_id",
            "name a group, or give rollout.target_filter ({} targets every active device)",
        )
    )
    return None, None


def _patch(r: rollouts_pb2.Rollout, out: list[FieldViolation]) -> dict[str, Any]:
    if not r.HasField("patch") or not r.patch.fields:
        out.append(FieldViolation("rollout.patch", "is required: the merge patch to apply"))
        return {}
    try:
        patch = protoconv.struct_to_dict("rollout.patch", r.patch)
    except InvalidArgument as e:  # reported with the request's other problems
        out.extend(e.violations)
        return {}
    documents.check("rollout.patch", patch, out)
    return patch


def _timeout(r: rollouts_pb2.Rollout, out: list[FieldViolation]) -> timedelta:
    if not r.strategy.HasField("device_timeout"):
        return DEFAULT_DEVICE_TIMEOUT
    d = r.strategy.device_timeout
    if not (MIN_DEVICE_TIMEOUT.total_seconds() <= d.seconds <= MAX_DEVICE_TIMEOUT.total_seconds()):
        out.append(
            FieldViolation(
                "rollout.strategy.device_timeout", "must be from 1 second to 7 days (604800s)"
            )
        )
        return DEFAULT_DEVICE_TIMEOUT
    if not 0 <= d.nanos < 1_000_000_000:
        out.append(FieldViolation("rollout.strategy.device_timeout", "has invalid nanos"))
        return DEFAULT_DEVICE_TIMEOUT
    return d.ToTimedelta()


def _in_range(field: str, value: int, high: int, out: list[FieldViolation]) -> None:
    if not 0 <= value <= high:
        out.append(FieldViolation(field, f"must be from 0 to {high} (got {value})"))


def new_rollout(r: rollouts_pb2.Rollout, *, created_by: str) -> store.NewRollout:
    """CreateRollout's checked values; INVALID_ARGUMENT listing every problem."""
    out: list[FieldViolation] = []
    if r.rollout_id:
        v.check_id("rollout.rollout_id", r.rollout_id, out)
    v.check_text("rollout.description", r.description, DESCRIPTION_MAX, out)
    group_id, target_filter = _target(r, out)
    patch = _patch(r, out)
    s = r.strategy
    _in_range("rollout.strategy.max_per_minute", s.max_per_minute, MAX_PER_MINUTE, out)
    _in_range("rollout.strategy.canary_count", s.canary_count, MAX_CANARIES, out)
    timeout = _timeout(r, out)
    threshold: float | None = None
    if r.HasField("abort_threshold_percent"):
        threshold = r.abort_threshold_percent
        if not (math.isfinite(threshold) and 0 <= threshold <= 100):
            out.append(FieldViolation("rollout.abort_threshold_percent", "must be from 0 to 100"))
    _in_range("rollout.abort_min_count", r.abort_min_count, MAX_ABORT_MIN_COUNT, out)
    if r.failure_path:
        try:
            filters.split_twin_path(r.failure_path)
        except ValueError as e:
            out.append(FieldViolation("rollout.failure_path", str(e)))
        v.check_text("rollout.failure_path", r.failure_path, filters.MAX_TWIN_PATH_LENGTH, out)
    # Output only: refused rather than ignored, so that a caller copying a
    # rollout does not believe it chose them.
    given = [name for name in ("state", "state_reason", "created_by") if getattr(r, name)]
    if r.HasField("counts"):
        given.append("counts")
    out.extend(FieldViolation(f"rollout.{n}", "is output only; leave it unset") for n in given)
    v.raise_if(out)
    return store.NewRollout(
        rollout_id=r.rollout_id or str(uuid.uuid4()),
        description=r.description,
        target_group_id=group_id,
        target_filter=target_filter,
        patch=patch,
        max_per_minute=s.max_per_minute,
        canary_count=s.canary_count,
        device_timeout=timeout,
        abort_threshold_percent=threshold,
        abort_min_count=max(r.abort_min_count, 1),
        failure_path=r.failure_path,
        continuous=r.continuous,
        created_by=created_by,
    )


def _states(values: list[DeviceState.ValueType]) -> list[str]:
    out: list[FieldViolation] = []
    names = []
    for i, value in enumerate(values):
        if value == DeviceState.STATE_UNSPECIFIED or value not in DeviceState.values():
            out.append(
                FieldViolation(f"states[{i}]", f"must be one of {', '.join(rules.DEVICE_STATES)}")
            )
        else:
            names.append(DeviceState.Name(value))
    v.raise_if(out)
    return sorted(set(names))


class RolloutService(rollouts_pb2_grpc.RolloutServiceServicer):
    def __init__(
        self,
        db: Database,
        tokens: PageTokens,
        listener: Listener,
        *,
        stale_after: timedelta = filters.DEFAULT_TWIN_STALE_AFTER,
    ) -> None:
        self._db = db
        self._tokens = tokens
        self._listener = listener
        self._cursors = watch.Cursors(tokens)
        # The twin sync rule's threshold, for targets filtering on sync status.
        self._stale_after = stale_after

    async def CreateRollout(
        self, request: rollouts_pb2.CreateRolloutRequest, context: Context
    ) -> rollouts_pb2.Rollout:
        principal = current_principal()
        new = new_rollout(request.rollout, created_by=principal.subject)
        async with self._db.tenant(principal.tenant_id) as con:
            record = await store.create(
                con, principal.tenant_id, new, stale_after=self._stale_after
            )
        return convert.rollout(record)

    async def GetRollout(
        self, request: rollouts_pb2.GetRolloutRequest, context: Context
    ) -> rollouts_pb2.Rollout:
        tenant = current_principal().tenant_id
        rollout_id = v.require_id("rollout_id", request.rollout_id)
        async with self._db.tenant(tenant, readonly=True) as con:
            record = await store.get(con, tenant, rollout_id)
        return convert.rollout(record)

    async def ListRollouts(
        self, request: rollouts_pb2.ListRolloutsRequest, context: Context
    ) -> rollouts_pb2.ListRolloutsResponse:
        tenant = current_principal().tenant_id
        if request.target_group_id:
            v.require_id("target_group_id", request.target_group_id)
        size = page_size(request.page_size)
        listing = self._tokens.listing("rollouts", tenant, request.target_group_id)
        start = listing.start(request.page_token)
        after = (datetime.fromisoformat(str(start[0])), str(start[1])) if start else None
        async with self._db.tenant(tenant, readonly=True) as con:
            rows = await store.list_rollouts(
                con, tenant, after=after, limit=size + 1, group_id=request.target_group_id
            )
        rows, token = listing.page(
            rows, size, key=lambda r: [r.created_at.isoformat(), r.rollout_id]
        )
        return rollouts_pb2.ListRolloutsResponse(
            rollouts=[convert.rollout(r) for r in rows], next_page_token=token
        )

    async def ListRolloutDevices(
        self, request: rollouts_pb2.ListRolloutDevicesRequest, context: Context
    ) -> rollouts_pb2.ListRolloutDevicesResponse:
        tenant = current_principal().tenant_id
        rollout_id = v.require_id("rollout_id", request.rollout_id)
        states = _states(list(request.states))
        size = page_size(request.page_size)
        listing = self._tokens.listing("rollout-devices", tenant, rollout_id, states)
        start = listing.start(request.page_token)
        after = "" if start is None else str(start[0])
        async with self._db.tenant(tenant, readonly=True) as con:
            await store.get(con, tenant, rollout_id)
            rows = await store.list_devices(
                con, tenant, rollout_id, states=states, after=after, limit=size + 1
            )
        rows, token = listing.page(rows, size, key=lambda d: [d.device_id])
        return rollouts_pb2.ListRolloutDevicesResponse(
            devices=[convert.device(d) for d in rows], next_page_token=token
        )

    async def PauseRollout(
        self, request: rollouts_pb2.PauseRolloutRequest, context: Context
    ) -> rollouts_pb2.Rollout:
        return await self._change(
            request.rollout_id,
            allowed_from=frozenset({rules.RUNNING}),
            to=rules.PAUSED,
            reason=f"paused by {current_principal().subject}",
            wanted="only a RUNNING rollout can be paused",
        )

    async def ResumeRollout(
        self, request: rollouts_pb2.ResumeRolloutRequest, context: Context
    ) -> rollouts_pb2.Rollout:
        return await self._change(
            request.rollout_id,
            allowed_from=frozenset({rules.PAUSED}),
            to=rules.RUNNING,
            reason="",
            wanted="only a PAUSED rollout can be resumed",
        )

    async def CancelRollout(
        self, request: rollouts_pb2.CancelRolloutRequest, context: Context
    ) -> rollouts_pb2.Rollout:
        principal = current_principal()
        return await self._change(
            request.rollout_id,
            allowed_from=frozenset({rules.RUNNING, rules.PAUSED}),
            to=rules.CANCELLED,
            reason=f"cancelled by {principal.subject}",
            wanted="it has ended already",
        )

    async def _change(
        self,
        rollout_id: str,
        *,
        allowed_from: frozenset[str],
        to: str,
        reason: str,
        wanted: str,
    ) -> rollouts_pb2.Rollout:
        tenant = current_principal().tenant_id
        rollout_id = v.require_id("rollout_id", rollout_id)
        async with self._db.tenant(tenant) as con:
            record = await store.change_state(
                con,
                tenant,
                rollout_id,
                allowed_from=allowed_from,
                to=to,
                reason=reason,
                wanted=wanted,
            )
        await store.announce(self._db, tenant, rollout_id)
        return convert.rollout(record)

    async def WatchRollout(
        self, request: rollouts_pb2.WatchRolloutRequest, context: Context
    ) -> AsyncIterator[rollouts_pb2.WatchRolloutResponse]:
        tenant = current_principal().tenant_id
        rollout_id = v.require_id("rollout_id", request.rollout_id)
        after = None
        if request.resume_cursor:
            after = self._cursors.open(tenant, rollout_id, request.resume_cursor)
        async for message in watch.watch(
            self._db, self._listener, self._cursors, tenant, rollout_id, after
        ):
            yield message
