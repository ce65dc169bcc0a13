"""Typed Python client for Pulse Device Management.

``AsyncPulseClient`` (asyncio) and ``PulseClient`` (blocking) expose the same
services as attributes; failures raise :class:`PulseError` subclasses.
"""

from ._client import AsyncPulseClient
from ._connectivity import AsyncConnectivity, Connectivity
from ._devices import AsyncDevices, AsyncSites, Devices, JsonValue, Sites
from ._errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    ErrorReason,
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
from ._filters import FilterFields, TwinPath, desired, key, reported, version_range, where
from ._groups import AsyncGroups, FilterLike, Groups
from ._membership import AsyncMembershipWatch, MembershipWatch
from ._pages import AsyncPager, Page, Pager
from ._rollouts import AsyncRollouts, Rollouts
from ._rpc import AsyncStream, Stream, Token
from ._sync import PulseClient
from ._twin import AsyncTwins, Modify, RetryPolicy, Twins, struct_to_dict

__all__ = [
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
