"""``ErrorReason``: why a call failed, as the server's ``ErrorInfo.reason`` says.

The API defines the reasons as the proto enum ``pulse.device.v1.ErrorReason``
(``error_reason.proto``) and, as AIP-193 has it, sends the value's *name* in
``google.rpc.ErrorInfo.reason``. This is that enum as a :class:`enum.StrEnum`
whose members are those names, so a reason prints as itself, compares equal to
the string on the wire (``error.reason == "DEVICE_NOT_FOUND"`` keeps working)
and can be matched exhaustively. ``number`` gives the proto enum's number.

The members mirror the proto enum one for one (``tests/client`` checks it):
a value added to ``error_reason.proto`` is added here too.
"""

from __future__ import annotations

import enum

from pulse.device.v1 import error_reason_pb2

__all__ = ["ErrorReason"]


class ErrorReason(enum.StrEnum):
    """Why a call failed: ``PulseError.reason``.

    ``ERROR_REASON_UNSPECIFIED`` is the empty string: what an error without an
    ``ErrorInfo`` has, and what a reason newer than this client reads as (its
    text stays in ``PulseError.reason_name``). See ``error_reason.proto`` for
    when the server uses each reason and with which status code.
    """

    ERROR_REASON_UNSPECIFIED = ""
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    REQUEST_UNDECODABLE = "REQUEST_UNDECODABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    TENANT_NOT_FOUND = "TENANT_NOT_FOUND"
    DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"
    GROUP_NOT_FOUND = "GROUP_NOT_FOUND"
    DEVICE_ALREADY_EXISTS = "DEVICE_ALREADY_EXISTS"
    SITE_ALREADY_EXISTS = "SITE_ALREADY_EXISTS"
    GROUP_ALREADY_EXISTS = "GROUP_ALREADY_EXISTS"
    VERSION_MISMATCH = "VERSION_MISMATCH"
    PRECONDITION_REQUIRED = "PRECONDITION_REQUIRED"
    DEVICE_DECOMMISSIONED = "DEVICE_DECOMMISSIONED"
    GROUP_NOT_STATIC = "GROUP_NOT_STATIC"
    GROUP_NOT_DYNAMIC = "GROUP_NOT_DYNAMIC"
    TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
    TOO_MANY_REQUESTS = "TOO_MANY_REQUESTS"
    SERVER_SHUTTING_DOWN = "SERVER_SHUTTING_DOWN"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"
    TRANSACTION_CONFLICT = "TRANSACTION_CONFLICT"
    WATCH_FEED_FAILED = "WATCH_FEED_FAILED"
    CREDENTIAL_NOT_FOUND = "CREDENTIAL_NOT_FOUND"
    CREDENTIAL_LIMIT_REACHED = "CREDENTIAL_LIMIT_REACHED"
    BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"
    IDENTITY_PROVIDER_UNAVAILABLE = "IDENTITY_PROVIDER_UNAVAILABLE"
    ROLLOUT_NOT_FOUND = "ROLLOUT_NOT_FOUND"
    ROLLOUT_ALREADY_EXISTS = "ROLLOUT_ALREADY_EXISTS"
    ROLLOUT_STATE_CONFLICT = "ROLLOUT_STATE_CONFLICT"

    @classmethod
    def parse(cls, name: str) -> ErrorReason:
        """The member named ``name`` (an ``ErrorInfo.reason``), or
        ``ERROR_REASON_UNSPECIFIED`` for "" and for a name this client does not
        know."""
        member = cls.__members__.get(name)
        return cls.ERROR_REASON_UNSPECIFIED if member is None else member

    @classmethod
    def from_number(cls, number: int) -> ErrorReason:
        """The member for a proto enum number; unknown numbers are unspecified."""
        descriptor = error_reason_pb2.ErrorReason.DESCRIPTOR.values_by_number.get(number)
        return cls.ERROR_REASON_UNSPECIFIED if descriptor is None else cls.parse(descriptor.name)

    @property
    def number(self) -> error_reason_pb2.ErrorReason.ValueType:
        """The value's number in the proto enum ``pulse.device.v1.ErrorReason``."""
        return error_reason_pb2.ErrorReason.Value(self.name)
