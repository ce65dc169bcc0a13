"""Rollout records to protos; no I/O."""

from __future__ import annotations

from google.protobuf import duration_pb2
from pulse.device.v1 import rollouts_pb2

from server import protoconv
from server.protoconv import timestamp
from server.rollouts import rules
from server.rollouts.store import DeviceRecord, RolloutRecord


def counts(c: rules.Counts) -> rollouts_pb2.RolloutCounts:
    return rollouts_pb2.RolloutCounts(
        pending=c.pending,
        applied=c.applied,
        succeeded=c.succeeded,
        failed=c.failed,
        timed_out=c.timed_out,
        skipped=c.skipped,
        superseded=c.superseded,
    )


def rollout(record: RolloutRecord) -> rollouts_pb2.Rollout:
    timeout = duration_pb2.Duration()
    timeout.FromTimedelta(record.device_timeout)
    message = rollouts_pb2.Rollout(
        rollout_id=record.rollout_id,
        description=record.description,
        patch=protoconv.struct(record.patch),
        strategy=rollouts_pb2.RolloutStrategy(
            max_per_minute=record.max_per_minute,
            canary_count=record.canary_count,
            device_timeout=timeout,
        ),
        abort_min_count=record.abort_min_count,
        failure_path=record.failure_path,
        continuous=record.continuous,
        state=rollouts_pb2.Rollout.State.Value(record.state),
        state_reason=record.state_reason,
        counts=counts(record.counts),
        created_by=record.created_by,
        create_time=timestamp(record.created_at),
        update_time=timestamp(record.updated_at),
        end_time=timestamp(record.ended_at),
    )
    if record.abort_threshold_percent is not None:
        message.abort_threshold_percent = record.abort_threshold_percent
    if record.target_group_id is not None:
        message.target_group_id = record.target_group_id
    else:
        assert record.target_filter is not None
        message.target_filter.CopyFrom(protoconv.filter_message(record.target_filter))
        # Present even when it is the empty filter (every active device).
        message.target_filter.SetInParent()
    return message


def device(record: DeviceRecord) -> rollouts_pb2.RolloutDevice:
    return rollouts_pb2.RolloutDevice(
        device_id=record.device_id,
        state=rollouts_pb2.RolloutDevice.State.Value(record.state),
        canary=record.canary,
        desired_version=record.desired_version,
        detail=record.detail,
        apply_time=timestamp(record.applied_at),
        end_time=timestamp(record.ended_at),
    )
