"""What a twin document may hold, checked the same way for gRPC writes and
MQTT reports, before anything reaches the database: the shared JSON document
rules (`server.validation`) with the twin's own size limit."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from server import protoconv, validation
from server.errors import FieldViolation, InvalidArgument

MAX_BYTES = 32 * 1024
# Why a document was refused; the evaluator counts rejections by these.
TOO_LARGE = validation.TOO_LARGE
INVALID_VALUE = validation.INVALID_VALUE


def check(field: str, doc: dict[str, Any], out: list[FieldViolation]) -> None:
    """Append a violation for `doc` if it cannot be stored as a twin document."""
    validation.check_document(field, doc, MAX_BYTES, out)


def checked(field: str, doc: dict[str, Any]) -> dict[str, Any]:
    """`doc`, or InvalidArgument naming `field`."""
    out: list[FieldViolation] = []
    check(field, doc, out)
    if out:
        raise InvalidArgument(out)
    return doc


def inspect(doc: dict[str, Any]) -> tuple[str, None] | tuple[None, validation.DocumentProblem]:
    """For the ingest path: the same rules as `check` in one walk, giving
    either the compact JSON text to store or why the document is refused."""
    return validation.document_problem(doc, max_bytes=MAX_BYTES)


def from_struct(field: str, struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON values, checked as a twin document."""
    return checked(field, protoconv.struct_to_dict(field, struct))
