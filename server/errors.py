"""Domain errors and how they travel as gRPC statuses.

Stores and rules raise these; the error interceptor turns them into a status
with `google.rpc` details (ErrorInfo always; BadRequest field violations for
invalid input; PreconditionFailure for failed preconditions). Anything else
that escapes a handler is a bug: INTERNAL, logged with its traceback.

Every reason is a value of the API's `ErrorReason` enum
(protos/pulse/device/v1/error_reason.proto); `ErrorInfo.reason` is the value's
name, as AIP-193 has it, so clients can compare it with the enum they import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from pulse.device.v1.error_reason_pb2 import ErrorReason

DOMAIN = "pulse.device.v1"

#: What NotFound and AlreadyExists can name, and the reason each kind gets.
#: mypy holds callers to the Literal; the import-time check below holds the
#: tables to it, so a kind without a reason cannot reach a caller.
NotFoundKind = Literal["device", "group", "credential", "rollout"]
AlreadyExistsKind = Literal["device", "site", "group", "rollout"]
NOT_FOUND_REASONS: Final[Mapping[NotFoundKind, ErrorReason.ValueType]] = {
    "device": ErrorReason.DEVICE_NOT_FOUND,
    "group": ErrorReason.GROUP_NOT_FOUND,
    "credential": ErrorReason.CREDENTIAL_NOT_FOUND,
    "rollout": ErrorReason.ROLLOUT_NOT_FOUND,
}
ALREADY_EXISTS_REASONS: Final[Mapping[AlreadyExistsKind, ErrorReason.ValueType]] = {
    "device": ErrorReason.DEVICE_ALREADY_EXISTS,
    "site": ErrorReason.SITE_ALREADY_EXISTS,
    "group": ErrorReason.GROUP_ALREADY_EXISTS,
    "rollout": ErrorReason.ROLLOUT_ALREADY_EXISTS,
}


def _check_kinds(kinds: object, with_reason: Iterable[str]) -> None:
    if set(get_args(kinds)) != set(with_reason):
        raise RuntimeError(f"kinds {get_args(kinds)} but reasons for {sorted(with_reason)}")


_check_kinds(NotFoundKind, NOT_FOUND_REASONS)
_check_kinds(AlreadyExistsKind, ALREADY_EXISTS_REASONS)


def reason_name(reason: ErrorReason.ValueType) -> str:
    """What `ErrorInfo.reason` carries for `reason`: the enum value's name.

    Raises ValueError for ERROR_REASON_UNSPECIFIED, which is never sent, and
    for a number the enum does not have."""
    if reason == ErrorReason.ERROR_REASON_UNSPECIFIED:
        raise ValueError("a domain error needs a reason other than ERROR_REASON_UNSPECIFIED")
    return ErrorReason.Name(reason)


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """An error the caller can act on, with a stable `ErrorReason`."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: ErrorReason.ValueType,
        metadata: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.reason = reason
        # Checked here, so a bad reason fails where it is raised.
        self.reason_name = reason_name(reason)
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason_name, domain=DOMAIN, metadata=self.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(
            code=self.code.value[0], message=self.message, details=self.details()
        )


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        *,
        reason: ErrorReason.ValueType = ErrorReason.INVALID_ARGUMENT,
    ):
        self.violations = list(violations)
        message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message, reason=reason)

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return [*super().details(), packed]


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, kind: NotFoundKind, ident: str):
        super().__init__(
            f"{kind} {ident!r} not found",
            reason=NOT_FOUND_REASONS[kind],
            metadata={kind: ident},
        )


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, kind: AlreadyExistsKind, ident: str):
        super().__init__(
            f"{kind} {ident!r} already exists",
            reason=ALREADY_EXISTS_REASONS[kind],
            metadata={kind: ident},
        )


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(
        self,
        message: str,
        *,
        reason: ErrorReason.ValueType,
        metadata: Mapping[str, str] | None = None,
        subject: str = "",
    ):
        super().__init__(message, reason=reason, metadata=metadata)
        self.subject = subject

    def details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=self.reason_name, subject=self.subject, description=self.message
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [*super().details(), packed]


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str):
        super().__init__(message, reason=ErrorReason.UNAUTHENTICATED)


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(
        self, message: str, *, reason: ErrorReason.ValueType = ErrorReason.PERMISSION_DENIED
    ):
        super().__init__(message, reason=reason)


class ResourceExhausted(DomainError):
    """A limit was reached; the caller may retry after `retry_after_s`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, reason: ErrorReason.ValueType, retry_after_s: float):
        super().__init__(message, reason=reason)
        self.retry_after_s = retry_after_s

    def details(self) -> list[any_pb2.Any]:
        return [*super().details(), retry_info(self.retry_after_s)]


class ServerShuttingDown(DomainError):
    """The server is stopping: the call or stream should go to another replica."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, resume_cursor: str = "") -> None:
        metadata = {"cursor": resume_cursor} if resume_cursor else {}
        super().__init__(
            "the server is shutting down; reconnect"
            + (" with your last cursor" if resume_cursor else ""),
            reason=ErrorReason.SERVER_SHUTTING_DOWN,
            metadata=metadata,
        )

    def details(self) -> list[any_pb2.Any]:
        return [*super().details(), retry_info(1.0)]


def retry_info(seconds: float) -> any_pb2.Any:
    """A google.rpc.RetryInfo detail: how long to wait before retrying."""
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(int(seconds * 1e9))
    packed = any_pb2.Any()
    packed.Pack(info)
    return packed


def internal_status() -> status_pb2.Status:
    """What the caller sees of a bug: no internals, a pointer to the logs."""
    return status_pb2.Status(
        code=code_pb2.INTERNAL, message="internal error; the server log has the details"
    )


def unavailable_status() -> status_pb2.Status:
    """The database could not be reached: transient, so safe to retry."""
    return status_pb2.Status(
        code=code_pb2.UNAVAILABLE, message="the database is unavailable; retry shortly"
    )


class IdentityProviderUnavailable(DomainError):
    """The keys that verify tokens could not be fetched: no fault of the token."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"the identity provider's keys could not be fetched ({detail}); retry shortly",
            reason=ErrorReason.IDENTITY_PROVIDER_UNAVAILABLE,
        )

    def details(self) -> list[any_pb2.Any]:
        return [*super().details(), retry_info(2.0)]


class BrokerUnavailable(DomainError):
    """The broker's own access list could not be updated; nothing was stored."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"the MQTT broker's access control could not be updated ({detail}); retry shortly",
            reason=ErrorReason.BROKER_UNAVAILABLE,
        )

    def details(self) -> list[any_pb2.Any]:
        return [*super().details(), retry_info(2.0)]
