"""gRPC statuses as HTTP responses (AIP-193's HTTP form)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from pulse.device.v1.error_reason_pb2 import ErrorReason

# The standard gRPC -> HTTP table (google/rpc/code.proto).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

# Reasons whose HTTP meaning is more precise than their gRPC code's: a stale
# version is a conflict (what the upstream web app handles), a write without
# a version is "precondition required".
REASON_STATUS = {
    ErrorReason.Name(ErrorReason.VERSION_MISMATCH): 409,
    ErrorReason.Name(ErrorReason.PRECONDITION_REQUIRED): 428,
}


def error_body(code: grpc.StatusCode, message: str, details: list[Any]) -> dict[str, Any]:
    """AIP-193's `error` object, and the message again as `detail`, the
    string the upstream platform's clients (FastAPI's form) show."""
    return {
        "error": {
            "code": HTTP_STATUS.get(code, 500),
            "status": code.name,
            "message": message,
            "details": details,
        },
        "detail": message,
    }


class HttpError(NamedTuple):
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def from_rpc_error(error: grpc.aio.AioRpcError) -> HttpError:
    """HTTP status, JSON body (details included) and headers for a failed
    call. A RetryInfo detail becomes `Retry-After`, so HTTP clients back off
    from a 429 or 503 as long as the server asked gRPC clients to."""
    code = error.code()
    details: list[Any] = []
    headers: dict[str, str] = {}
    http = HTTP_STATUS.get(code, 500)
    trailing: Any = error.trailing_metadata() or ()
    for key, value in trailing:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for any_detail in status.details:
            details.append(json_format.MessageToDict(any_detail, preserving_proto_field_name=True))
            if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_detail.Unpack(info)
                http = REASON_STATUS.get(info.reason, http)
            elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                any_detail.Unpack(retry)
                delay = retry.retry_delay.ToTimedelta().total_seconds()
                headers["Retry-After"] = str(max(0, math.ceil(delay)))
    body = error_body(code, error.details() or code.name, details)
    body["error"]["code"] = http
    return HttpError(http, body, headers)
