"""Domain errors and how they travel as gRPC statuses.

Stores and rules raise these; the error interceptor turns them into a status
with `google.rpc` details (ErrorInfo always; BadRequest field violations for
invalid input; PreconditionFailure for failed preconditions). Anything else
that escapes a handler is a bug: INTERNAL, logged with its traceback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "pulse.device.v1"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """An error the caller can act on, with a stable UPPER_SNAKE reason."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, reason: str, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=DOMAIN, metadata=self.metadata
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

    def __init__(self, violations: Sequence[FieldViolation], *, reason: str = "INVALID_ARGUMENT"):
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

    def __init__(self, kind: str, ident: str):
        super().__init__(
            f"{kind} {ident!r} not found",
            reason=f"{kind.upper()}_NOT_FOUND",
            metadata={kind: ident},
        )


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, kind: str, ident: str):
        super().__init__(
            f"{kind} {ident!r} already exists",
            reason=f"{kind.upper()}_ALREADY_EXISTS",
            metadata={kind: ident},
        )


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        metadata: Mapping[str, str] | None = None,
        subject: str = "",
    ):
        super().__init__(message, reason=reason, metadata=metadata)
        self.subject = subject

    def details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=self.reason, subject=self.subject, description=self.message
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [*super().details(), packed]


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str):
        super().__init__(message, reason="UNAUTHENTICATED")


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, message: str, *, reason: str = "PERMISSION_DENIED"):
        super().__init__(message, reason=reason)


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
