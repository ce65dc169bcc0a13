"""Error reasons are one enum, pulse.device.v1.ErrorReason: the server raises
its values, ErrorInfo carries their names, and the client reads them back as
pulse_client.ErrorReason."""

from __future__ import annotations

import inspect
from typing import get_args

import grpc
import grpc.aio
import pulse_client as pc
import pytest
from pulse.device.v1 import error_reason_pb2
from pulse.device.v1.error_reason_pb2 import ErrorReason

from server import errors

PROTO_NAMES = list(ErrorReason.keys())


def _domain_errors() -> list[errors.DomainError]:
    """One of each DomainError subclass in server.errors, with every reason
    the server raises it with."""
    return [
        errors.InvalidArgument.single("device.device_id", "is required"),
        errors.InvalidArgument(
            [errors.FieldViolation("request", "does not parse")],
            reason=ErrorReason.REQUEST_UNDECODABLE,
        ),
        *(errors.NotFound(kind, "X-1") for kind in get_args(errors.NotFoundKind)),
        *(errors.AlreadyExists(kind, "X-1") for kind in get_args(errors.AlreadyExistsKind)),
        *(
            errors.FailedPrecondition("no", reason=reason, subject="devices/X-1")
            for reason in (
                ErrorReason.VERSION_MISMATCH,
                ErrorReason.PRECONDITION_REQUIRED,
                ErrorReason.DEVICE_DECOMMISSIONED,
                ErrorReason.GROUP_NOT_STATIC,
                ErrorReason.GROUP_NOT_DYNAMIC,
                ErrorReason.CREDENTIAL_LIMIT_REACHED,
            )
        ),
        errors.Unauthenticated("token has expired"),
        errors.PermissionDenied("needs the admin role"),
        errors.PermissionDenied("no such tenant", reason=ErrorReason.TENANT_NOT_FOUND),
        errors.ResourceExhausted(
            "too many streams", reason=ErrorReason.TOO_MANY_STREAMS, retry_after_s=1
        ),
        errors.ResourceExhausted(
            "too many calls", reason=ErrorReason.TOO_MANY_REQUESTS, retry_after_s=0.5
        ),
        errors.ServerShuttingDown("cursor-1"),
        errors.BrokerUnavailable("no answer within 5 s"),
        errors.IdentityProviderUnavailable("connection refused"),
    ]


def _through_the_client(error: errors.DomainError) -> pc.PulseError:
    """What the client makes of the status the error interceptor would send."""
    status = error.to_status()
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    rpc_error = grpc.aio.AioRpcError(
        error.code, grpc.aio.Metadata(), trailing, status.message, None
    )
    return pc.from_rpc_error(rpc_error)


def test_every_domain_error_class_is_covered() -> None:
    defined = {
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.DomainError) and cls is not errors.DomainError
    }
    assert defined <= {type(e) for e in _domain_errors()}


@pytest.mark.parametrize("error", _domain_errors(), ids=lambda e: e.reason_name)
def test_domain_error_reasons_round_trip_as_the_enum(error: errors.DomainError) -> None:
    assert error.reason_name == ErrorReason.Name(error.reason)
    received = _through_the_client(error)
    assert received.code is error.code
    assert received.reason is pc.ErrorReason[ErrorReason.Name(error.reason)]
    assert received.reason.number == error.reason
    assert received.reason_name == received.reason == error.reason_name
    assert (received.domain, received.metadata) == (errors.DOMAIN, error.metadata)
    if isinstance(error, errors.FailedPrecondition):
        assert [v.type for v in received.precondition_violations] == [error.reason_name]


@pytest.mark.parametrize("name", PROTO_NAMES[1:])
def test_every_reason_round_trips(name: str) -> None:
    error = errors.DomainError("why", reason=ErrorReason.Value(name))
    assert _through_the_client(error).reason is pc.ErrorReason[name]


def test_kinds_keep_their_wire_names() -> None:
    for kind, reason in errors.NOT_FOUND_REASONS.items():
        assert ErrorReason.Name(reason) == f"{kind.upper()}_NOT_FOUND"
    for existing, reason in errors.ALREADY_EXISTS_REASONS.items():
        assert ErrorReason.Name(reason) == f"{existing.upper()}_ALREADY_EXISTS"
    assert errors.NotFound("group", "G-1").metadata == {"group": "G-1"}


def test_a_domain_error_needs_a_real_reason() -> None:
    with pytest.raises(ValueError):
        errors.DomainError("why", reason=ErrorReason.ERROR_REASON_UNSPECIFIED)
    with pytest.raises(ValueError):
        errors.DomainError("why", reason=ErrorReason.ValueType(999))


def test_the_client_enum_mirrors_the_proto_enum() -> None:
    assert [member.name for member in pc.ErrorReason] == PROTO_NAMES
    for member in pc.ErrorReason:
        assert member.number == ErrorReason.Value(member.name)
        assert pc.ErrorReason.from_number(member.number) is member
        expected = "" if member.number == error_reason_pb2.ERROR_REASON_UNSPECIFIED else member.name
        assert member == member.value == expected


def test_client_reason_parsing() -> None:
    assert pc.ErrorReason.parse("VERSION_MISMATCH") is pc.ErrorReason.VERSION_MISMATCH
    for unknown in ("", "SOMETHING_NEWER", "version_mismatch"):
        assert pc.ErrorReason.parse(unknown) is pc.ErrorReason.ERROR_REASON_UNSPECIFIED
    assert pc.ErrorReason.from_number(10_000) is pc.ErrorReason.ERROR_REASON_UNSPECIFIED
    newer = pc.NotFound("gone", reason="WIDGET_NOT_FOUND")
    assert (newer.reason, newer.reason_name) == (
        pc.ErrorReason.ERROR_REASON_UNSPECIFIED,
        "WIDGET_NOT_FOUND",
    )
    typed = pc.NotFound("gone", reason=pc.ErrorReason.DEVICE_NOT_FOUND)
    assert (typed.reason, typed.reason_name) == (
        pc.ErrorReason.DEVICE_NOT_FOUND,
        "DEVICE_NOT_FOUND",
    )
    assert str(typed) == "NOT_FOUND: gone [DEVICE_NOT_FOUND]"
