"""Exceptions raised by the Pulse client.

Every failed RPC raises a subclass of :class:`PulseError`, picked first by the
status code and then, when the server's ``google.rpc.ErrorInfo`` reason (an
:class:`ErrorReason`) has a dedicated class, by that reason::

    PulseError
     ├── Cancelled
     ├── Unknown
     ├── InvalidArgument
     ├── DeadlineExceeded
     ├── NotFound
     ├── AlreadyExists
     ├── PermissionDenied
     ├── ResourceExhausted
     ├── FailedPrecondition
     │    └── VersionConflict        (ErrorReason.VERSION_MISMATCH)
     ├── Aborted
     ├── OutOfRange
     ├── Unimplemented
     ├── Internal
     ├── Unavailable
     ├── DataLoss
     └── Unauthenticated
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

# googleapis-common-protos ships .pyi files but no py.typed marker, so mypy
# only reads them when told to follow untyped imports for google.rpc.
from google.rpc import (  # type: ignore[import-untyped, unused-ignore]
    error_details_pb2,
    status_pb2,
)

from ._reasons import ErrorReason

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "ErrorReason",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PreconditionViolation",
    "PulseError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "VersionConflict",
    "from_rpc_error",
]

# The key under which gRPC carries a serialized google.rpc.Status; parsed here
# directly because grpcio-status is deliberately not a client dependency.
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field, from a ``google.rpc.BadRequest`` detail."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class PreconditionViolation:
    """One failed precondition, from a ``google.rpc.PreconditionFailure`` detail."""

    type: str
    subject: str
    description: str


_BY_CODE: dict[grpc.StatusCode, type[PulseError]] = {}


class PulseError(Exception):
    """Base class of every error returned by the Pulse service.

    Attributes:
        code: The gRPC status code.
        message: The status message from the server.
        reason: ``ErrorInfo.reason`` as an :class:`ErrorReason` (e.g.
            ``ErrorReason.DEVICE_NOT_FOUND``, which also equals the string
            ``"DEVICE_NOT_FOUND"``); ``ERROR_REASON_UNSPECIFIED`` (equal to "")
            when there is no ErrorInfo or its reason is newer than this client.
        reason_name: ``ErrorInfo.reason`` exactly as sent, known or not, or "".
        domain: ``ErrorInfo.domain`` (e.g. ``pulse.device.v1``), or "".
        metadata: ``ErrorInfo.metadata``: structured facts about the failure.
        field_violations: The ``BadRequest`` field violations, if any.
        precondition_violations: The ``PreconditionFailure`` violations, if any.
        details: Every status detail, unpacked into its message type when that
            type is known to the protobuf runtime, else left as ``Any``.
    """

    grpc_status_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        # Only classes that name their own code are the canonical class for it;
        # domain subclasses inherit the code and are chosen by reason instead.
        code = cls.__dict__.get("grpc_status_code")
        if code is None:
            return
        if code in _BY_CODE:
            raise TypeError(f"{code} is already mapped to {_BY_CODE[code].__name__}")
        _BY_CODE[code] = cls

    def __init__(
        self,
        message: str = "",
        *,
        code: grpc.StatusCode | None = None,
        reason: ErrorReason | str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        precondition_violations: Iterable[PreconditionViolation] = (),
        details: Iterable[Message] = (),
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.grpc_status_code
        self.message: str = message
        # A reason from a newer server maps to ERROR_REASON_UNSPECIFIED but
        # keeps its text in reason_name.
        self.reason_name: str = str(reason)
        self.reason: ErrorReason = ErrorReason.parse(self.reason_name)
        self.domain: str = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[FieldViolation] = list(field_violations)
        self.precondition_violations: list[PreconditionViolation] = list(precondition_violations)
        self.details: list[Message] = list(details)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason_name:
            text += f" [{self.reason_name}]"
        if self.field_violations:
            text += " (" + "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
            text += ")"
        return text

    def __reduce__(self) -> tuple[object, ...]:
        # Exception's default pickling replays only ``args``, which would drop
        # every keyword-only attribute when errors cross process boundaries.
        return (_restore, (type(self), self.__dict__.copy()))


def _restore(cls: type[PulseError], state: dict[str, object]) -> PulseError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class Cancelled(PulseError):
    """The call was cancelled, typically by the caller."""

    grpc_status_code = grpc.StatusCode.CANCELLED


class Unknown(PulseError):
    """The server failed in a way it could not classify."""

    grpc_status_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(PulseError):
    """The request is malformed; see ``field_violations``."""

    grpc_status_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(PulseError):
    """The call did not finish before its deadline."""

    grpc_status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(PulseError):
    """The named resource does not exist in the caller's tenant."""

    grpc_status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(PulseError):
    """A resource with the same id already exists."""

    grpc_status_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(PulseError):
    """The caller is authenticated but not allowed to do this."""

    grpc_status_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(PulseError):
    """A quota or rate limit was hit."""

    grpc_status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(PulseError):
    """The system is not in the state the call requires; see ``precondition_violations``."""

    grpc_status_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(PulseError):
    """The call was aborted by a concurrency conflict; it may be retried."""

    grpc_status_code = grpc.StatusCode.ABORTED


class OutOfRange(PulseError):
    """A value is past the valid range."""

    grpc_status_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(PulseError):
    """The server does not implement this method."""

    grpc_status_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(PulseError):
    """The server hit an internal error."""

    grpc_status_code = grpc.StatusCode.INTERNAL


class Unavailable(PulseError):
    """The service cannot be reached right now; retrying later may succeed."""

    grpc_status_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(PulseError):
    """Data was lost or corrupted."""

    grpc_status_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(PulseError):
    """The bearer token is missing, invalid or expired."""

    grpc_status_code = grpc.StatusCode.UNAUTHENTICATED


class VersionConflict(FailedPrecondition):
    """The expected version is stale; ``current_version`` is the server's version."""

    @property
    def current_version(self) -> int | None:
        """The version the server holds, or None if it did not say."""
        try:
            return int(self.metadata["current_version"])
        except (KeyError, ValueError):
            return None


# ErrorInfo reasons with a dedicated class. A reason class is only used when it
# subclasses the class of the status code, so ``except <code class>`` keeps
# catching it whatever the reason.
_BY_REASON: dict[ErrorReason, type[PulseError]] = {
    ErrorReason.VERSION_MISMATCH: VersionConflict,
}


def _error_class(code: grpc.StatusCode, reason: ErrorReason) -> type[PulseError]:
    by_code = _BY_CODE.get(code, Unknown)
    by_reason = _BY_REASON.get(reason)
    if by_reason is not None and issubclass(by_reason, by_code):
        return by_reason
    return by_code


def _unpack(detail: any_pb2.Any) -> Message:
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(detail.TypeName())
    except KeyError:
        return detail
    message = message_factory.GetMessageClass(descriptor)()
    try:
        unpacked = detail.Unpack(message)
    except DecodeError:
        unpacked = False
    # A detail that cannot be decoded stays packed rather than hiding the error.
    return message if unpacked else detail


def _status_details(metadata: object) -> status_pb2.Status | None:
    # Sync errors give a tuple of (key, value) namedtuples, aio errors a
    # grpc.aio.Metadata; both iterate as pairs.
    if not isinstance(metadata, Iterable):
        return None
    for entry in metadata:
        if not isinstance(entry, tuple) or len(entry) != 2:
            continue
        key, value = entry
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except DecodeError:
            return None
        return status
    return None


def _call_attr(error: grpc.RpcError, name: str) -> object:
    # grpc.RpcError itself declares no accessors; the concrete sync and aio
    # errors do, so anything else is treated as carrying no information.
    accessor = getattr(error, name, None)
    if not callable(accessor):
        return None
    try:
        return accessor()
    except Exception:
        return None


def from_rpc_error(error: grpc.RpcError) -> PulseError:
    """Converts a gRPC error (sync or ``grpc.aio``) into the matching PulseError.

    The caller should chain it: ``raise from_rpc_error(e) from e``.
    """
    code = _call_attr(error, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = _call_attr(error, "details")
    status = _status_details(_call_attr(error, "trailing_metadata"))

    details: Sequence[Message] = []
    reason = domain = ""
    info_metadata: Mapping[str, str] = {}
    fields: list[FieldViolation] = []
    preconditions: list[PreconditionViolation] = []
    if status is not None:
        if not message:
            message = status.message
        details = [_unpack(any_detail) for any_detail in status.details]
        for detail in details:
            if isinstance(detail, error_details_pb2.ErrorInfo) and not reason:
                reason, domain, info_metadata = detail.reason, detail.domain, detail.metadata
            elif isinstance(detail, error_details_pb2.BadRequest):
                fields.extend(
                    FieldViolation(v.field, v.description) for v in detail.field_violations
                )
            elif isinstance(detail, error_details_pb2.PreconditionFailure):
                preconditions.extend(
                    PreconditionViolation(v.type, v.subject, v.description)
                    for v in detail.violations
                )

    if code is grpc.StatusCode.OK:
        # An RpcError that claims OK is a transport oddity, not a success.
        code = grpc.StatusCode.UNKNOWN
    cls = _error_class(code, ErrorReason.parse(reason))
    return cls(
        message if isinstance(message, str) else "",
        code=code,
        reason=reason,
        domain=domain,
        metadata=info_metadata,
        field_violations=fields,
        precondition_violations=preconditions,
        details=details,
    )
