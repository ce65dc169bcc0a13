"""What every gateway route shares on the HTTP side: reading a body within
the size limit, and answering an error in the AIP-193 JSON form."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.gateway import status


def error_response(
    http: int, code: grpc.StatusCode, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = status.error_body(code, message, [])
    body["error"]["code"] = http
    return JSONResponse(body, status_code=http, headers=headers)


async def read_body(request: Request, max_bytes: int) -> bytes | None:
    """The body, or None when it is larger than `max_bytes`; stops reading
    as soon as it is, whatever Content-Length claimed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
