"""Pins the public surface of pulse_client and the status-code -> exception table."""

from __future__ import annotations

import grpc
import grpc.aio
import pulse_client as pc
import pytest

PUBLIC = [
    "Aborted",
    "AlreadyExists",
    "AsyncConnectivity",
    "AsyncDevices",
    "AsyncGroups",
    "AsyncMembershipWatch",
    "AsyncPager",
    "AsyncPulseClient",
    "AsyncRollouts",
    "AsyncSites",
    "AsyncStream",
    "AsyncTwins",
    "Cancelled",
    "Connectivity",
    "DataLoss",
    "DeadlineExceeded",
    "Devices",
    "ErrorReason",
    "FailedPrecondition",
    "FieldViolation",
    "FilterFields",
    "FilterLike",
    "Groups",
    "Internal",
    "InvalidArgument",
    "JsonValue",
    "MembershipWatch",
    "Modify",
    "NotFound",
    "OutOfRange",
    "Page",
    "Pager",
    "PermissionDenied",
    "PreconditionViolation",
    "PulseClient",
    "PulseError",
    "ResourceExhausted",
    "RetryPolicy",
    "Rollouts",
    "Sites",
    "Stream",
    "Token",
    "TwinPath",
    "Twins",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "VersionConflict",
    "desired",
    "from_rpc_error",
    "key",
    "reported",
    "struct_to_dict",
    "version_range",
    "where",
]


def test_public_surface_is_pinned() -> None:
    assert pc.__all__ == PUBLIC
    assert sorted(PUBLIC) == PUBLIC
    for name in PUBLIC:
        assert hasattr(pc, name), name


def _code_classes() -> dict[grpc.StatusCode, type[pc.PulseError]]:
    classes = [getattr(pc, name) for name in pc.__all__]
    errors = [c for c in classes if isinstance(c, type) and issubclass(c, pc.PulseError)]
    return {c.grpc_status_code: c for c in errors if "grpc_status_code" in vars(c)}


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK], ids=lambda c: c.name
)
def test_every_status_code_has_its_class(code: grpc.StatusCode) -> None:
    cls = _code_classes()[code]
    assert cls.grpc_status_code is code
    assert cls.__doc__ and "\n" not in cls.__doc__.strip()
    error = pc.from_rpc_error(
        grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "why", None)
    )
    assert type(error) is cls
    assert (error.code, error.message, error.reason_name) == (code, "why", "")
    assert error.reason is pc.ErrorReason.ERROR_REASON_UNSPECIFIED
    assert cls("direct").code is code


def test_one_class_per_code() -> None:
    assert len(_code_classes()) == len(grpc.StatusCode) - 1
    assert pc.VersionConflict.grpc_status_code is grpc.StatusCode.FAILED_PRECONDITION
