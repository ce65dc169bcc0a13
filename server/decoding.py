"""Request bytes that do not decode are the caller's mistake, not ours.

grpc.aio answers a request whose deserializer raises with UNKNOWN and the
Python exception's text. Every service's deserializer is wrapped instead, so
such a request reaches the interceptor chain as an `Undecodable`, which
answers INVALID_ARGUMENT (REQUEST_UNDECODABLE) before anything else runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pulse.device.v1.error_reason_pb2 import ErrorReason

from server.errors import FieldViolation, InvalidArgument


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands in for a request message that could not be parsed."""

    message_type: str
    problem: str

    def error(self) -> InvalidArgument:
        violation = FieldViolation(
            "request",
            f"is not a valid {self.message_type} ({self.problem}); "
            "check the method and the message your client sends",
        )
        return InvalidArgument([violation], reason=ErrorReason.REQUEST_UNDECODABLE)


class SafeDeserializer:
    """A message class's parser that answers Undecodable instead of raising."""

    def __init__(self, parse: Callable[[bytes], Any]) -> None:
        self._parse = parse
        message_type = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        self._name = message_type.full_name if message_type is not None else "request message"

    def __call__(self, data: bytes) -> Any:
        try:
            return self._parse(data)
        except Exception as error:  # DecodeError, RecursionError, ...
            return Undecodable(self._name, _problem(error))


def safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None or isinstance(deserializer, SafeDeserializer):
        return deserializer
    return SafeDeserializer(deserializer)


def _problem(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "nested too deeply"
    # The parser's own words, short, without the type name said already;
    # never the bytes themselves.
    text = (str(error) or type(error).__name__).splitlines()[0]
    return text.rpartition("': ")[2][:120]
