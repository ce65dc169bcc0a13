"""Typed Python client for Pulse Device Management.

``AsyncPulseClient`` (asyncio) and ``PulseClient`` (blocking) expose the same
services as attributes; failures raise :class:`PulseError` subclasses.
"""

from ._client import AsyncPulseClient
from ._devices import AsyncDevices, AsyncSites, Devices, JsonValue, Sites
from ._errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    PreconditionViolation,
    PulseError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    VersionConflict,
    from_rpc_error,
)
from ._pages import AsyncPager, Page, Pager
from ._rpc import AsyncStream, Stream, Token
from ._sync import PulseClient

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncDevices",
    "AsyncPager",
    "AsyncPulseClient",
    "AsyncSites",
    "AsyncStream",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "Devices",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "JsonValue",
    "NotFound",
    "OutOfRange",
    "Page",
    "Pager",
    "PermissionDenied",
    "PreconditionViolation",
    "PulseClient",
    "PulseError",
    "ResourceExhausted",
    "Sites",
    "Stream",
    "Token",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "VersionConflict",
    "from_rpc_error",
]
