"""Error conversion, auth metadata and streaming of the client's call helper,
against a small real grpc.aio server (no mocks of gRPC)."""

from __future__ import annotations

import asyncio
import pickle
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeAlias

import grpc
import grpc.aio
import pulse_client as pc
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import StringValue
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

SERVICE = "test.Fake"
DOMAIN = "pulse.device.v1"

# Strings: grpc's runtime classes are not all subscriptable.
Context: TypeAlias = "grpc.aio.ServicerContext[StringValue, StringValue]"
Handler: TypeAlias = "grpc.RpcMethodHandler[StringValue, StringValue]"


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)


# Scenario name -> the google.rpc.Status the fake server fails with.
STATUSES: dict[str, status_pb2.Status] = {
    "not_found": status_pb2.Status(
        code=code_pb2.NOT_FOUND,
        message="device NOPE-1 not found",
        details=[_pack(_info("DEVICE_NOT_FOUND", device="NOPE-1"))],
    ),
    "invalid": status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="bad request",
        details=[
            # A reason newer than this client: readable, but not an ErrorReason.
            _pack(_info("INVALID_FIELDS")),
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="device.device_id", description="is required"
                        ),
                        error_details_pb2.BadRequest.FieldViolation(
                            field="device.name", description="at most 256 characters"
                        ),
                    ]
                )
            ),
        ],
    ),
    "version": status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION,
        message="version 3 is stale",
        details=[
            _pack(_info("VERSION_MISMATCH", current_version="7", expected_version="3")),
            _pack(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type="VERSION", subject="twin/D-1", description="stale"
                        )
                    ]
                )
            ),
        ],
    ),
    # The reason's class subclasses FailedPrecondition, so under another code
    # the code must win.
    "version_aborted": status_pb2.Status(
        code=code_pb2.ABORTED,
        message="retry",
        details=[_pack(_info("VERSION_MISMATCH", current_version="7"))],
    ),
    "unknown_detail": status_pb2.Status(
        code=code_pb2.INTERNAL,
        message="boom",
        details=[
            _pack(_info("INTERNAL")),
            any_pb2.Any(type_url="type.googleapis.com/not.a.Known", value=b"\x08\x01"),
        ],
    ),
}


async def _abort(context: Context, status: status_pb2.Status) -> None:
    rich = rpc_status.to_status(status)
    await context.abort(rich.code, rich.details, rich.trailing_metadata)


@dataclass
class Fake:
    """What the fake server saw."""

    authorizations: list[str | None] = field(default_factory=list)
    deadlines: list[float | None] = field(default_factory=list)


def _authorization(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


def _handlers(fake: Fake) -> dict[str, Handler]:
    async def fail(request: StringValue, context: Context) -> StringValue:
        if request.value == "plain":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down for maintenance")
        await _abort(context, STATUSES[request.value])
        raise AssertionError("abort returned")

    async def echo(request: StringValue, context: Context) -> StringValue:
        fake.authorizations.append(_authorization(context))
        # None when the caller set no deadline (the stubs claim a float).
        fake.deadlines.append(context.time_remaining())
        return StringValue(value=request.value)

    async def slow(request: StringValue, context: Context) -> StringValue:
        await asyncio.sleep(5)
        return request

    async def stream(request: StringValue, context: Context) -> AsyncIterator[StringValue]:
        fake.authorizations.append(_authorization(context))
        for n in range(2):
            yield StringValue(value=f"{request.value}-{n}")
        if request.value != "ok":
            await _abort(context, STATUSES["not_found"])

    async def forever(request: StringValue, context: Context) -> AsyncIterator[StringValue]:
        yield StringValue(value="first")
        await asyncio.sleep(60)

    def unary(behavior: Callable[..., object]) -> Handler:
        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=StringValue.FromString,
            response_serializer=StringValue.SerializeToString,
        )

    def streaming(behavior: Callable[..., object]) -> Handler:
        return grpc.unary_stream_rpc_method_handler(
            behavior,
            request_deserializer=StringValue.FromString,
            response_serializer=StringValue.SerializeToString,
        )

    return {
        "Fail": unary(fail),
        "Echo": unary(echo),
        "Slow": unary(slow),
        "Stream": streaming(stream),
        "Forever": streaming(forever),
    }


@dataclass
class Served:
    target: str
    fake: Fake


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    fake = Fake()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, _handlers(fake))]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Served(f"127.0.0.1:{port}", fake)
    finally:
        await server.stop(None)


def _unary(
    channel: grpc.aio.Channel, name: str
) -> grpc.aio.UnaryUnaryMultiCallable[StringValue, StringValue]:
    return channel.unary_unary(
        f"/{SERVICE}/{name}",
        request_serializer=StringValue.SerializeToString,
        response_deserializer=StringValue.FromString,
    )


def _stream(
    channel: grpc.aio.Channel, name: str
) -> grpc.aio.UnaryStreamMultiCallable[StringValue, StringValue]:
    return channel.unary_stream(
        f"/{SERVICE}/{name}",
        request_serializer=StringValue.SerializeToString,
        response_deserializer=StringValue.FromString,
    )


def _sync_unary(
    channel: grpc.Channel, name: str
) -> grpc.UnaryUnaryMultiCallable[StringValue, StringValue]:
    return channel.unary_unary(
        f"/{SERVICE}/{name}",
        request_serializer=StringValue.SerializeToString,
        response_deserializer=StringValue.FromString,
    )


def _sync_stream(
    channel: grpc.Channel, name: str
) -> grpc.UnaryStreamMultiCallable[StringValue, StringValue]:
    return channel.unary_stream(
        f"/{SERVICE}/{name}",
        request_serializer=StringValue.SerializeToString,
        response_deserializer=StringValue.FromString,
    )


async def _async_failure(target: str, scenario: str) -> pc.PulseError:
    async with await pc.AsyncPulseClient.connect(target, token="t") as client:
        with pytest.raises(pc.PulseError) as info:
            await client._rpc.unary(_unary(client.channel, "Fail"), StringValue(value=scenario))
        return info.value


def _sync_failure(target: str, scenario: str) -> pc.PulseError:
    with pc.PulseClient.connect(target, token="t") as client:
        with pytest.raises(pc.PulseError) as info:
            client._rpc.unary(_sync_unary(client.channel, "Fail"), StringValue(value=scenario))
        return info.value


async def _failure(flavour: str, target: str, scenario: str) -> pc.PulseError:
    if flavour == "async":
        return await _async_failure(target, scenario)
    # The sync client blocks, so it runs in a thread while this loop serves.
    return await asyncio.to_thread(_sync_failure, target, scenario)


FLAVOURS = ["async", "sync"]


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_not_found_carries_error_info(served: Served, flavour: str) -> None:
    error = await _failure(flavour, served.target, "not_found")
    assert type(error) is pc.NotFound
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert error.message == "device NOPE-1 not found"
    assert error.reason is pc.ErrorReason.DEVICE_NOT_FOUND
    assert error.reason == "DEVICE_NOT_FOUND"  # the wire name, for string comparisons
    assert error.reason_name == "DEVICE_NOT_FOUND"
    assert error.domain == DOMAIN
    assert error.metadata == {"device": "NOPE-1"}
    assert error.field_violations == []
    assert [type(d) for d in error.details] == [error_details_pb2.ErrorInfo]
    assert isinstance(error.__cause__, grpc.RpcError)
    assert error.__cause__.code() is grpc.StatusCode.NOT_FOUND
    if flavour == "async":
        assert isinstance(error.__cause__, grpc.aio.AioRpcError)
    assert str(error) == "NOT_FOUND: device NOPE-1 not found [DEVICE_NOT_FOUND]"


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_invalid_argument_lists_field_violations(served: Served, flavour: str) -> None:
    error = await _failure(flavour, served.target, "invalid")
    assert type(error) is pc.InvalidArgument
    assert error.reason is pc.ErrorReason.ERROR_REASON_UNSPECIFIED
    assert error.reason_name == "INVALID_FIELDS"
    assert "[INVALID_FIELDS]" in str(error)
    assert error.field_violations == [
        pc.FieldViolation("device.device_id", "is required"),
        pc.FieldViolation("device.name", "at most 256 characters"),
    ]
    assert "device.device_id: is required" in str(error)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_version_mismatch_is_a_version_conflict(served: Served, flavour: str) -> None:
    error = await _failure(flavour, served.target, "version")
    assert type(error) is pc.VersionConflict
    assert isinstance(error, pc.FailedPrecondition)
    assert error.reason is pc.ErrorReason.VERSION_MISMATCH
    assert error.current_version == 7
    assert error.metadata == {"current_version": "7", "expected_version": "3"}
    assert error.precondition_violations == [
        pc.PreconditionViolation("VERSION", "twin/D-1", "stale")
    ]
    assert isinstance(error.__cause__, grpc.RpcError)


async def test_reason_class_never_contradicts_the_code(served: Served) -> None:
    error = await _failure("async", served.target, "version_aborted")
    assert type(error) is pc.Aborted
    assert error.reason is pc.ErrorReason.VERSION_MISMATCH


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_status_without_details(served: Served, flavour: str) -> None:
    error = await _failure(flavour, served.target, "plain")
    assert type(error) is pc.Unavailable
    assert (error.message, error.reason_name, error.domain) == ("down for maintenance", "", "")
    assert error.reason is pc.ErrorReason.ERROR_REASON_UNSPECIFIED
    assert not error.reason and str(error.reason) == ""
    assert error.metadata == {} and error.details == []


async def test_unknown_detail_types_are_kept_packed(served: Served) -> None:
    error = await _failure("async", served.target, "unknown_detail")
    assert type(error) is pc.Internal
    info, unknown = error.details
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert isinstance(unknown, any_pb2.Any)
    assert unknown.type_url.endswith("not.a.Known")


def test_version_conflict_without_a_usable_version() -> None:
    assert pc.VersionConflict("x").current_version is None
    assert pc.VersionConflict("x", metadata={"current_version": "abc"}).current_version is None


async def test_errors_survive_pickling(served: Served) -> None:
    error = await _failure("async", served.target, "invalid")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is pc.InvalidArgument
    assert (copy.code, copy.message, copy.reason) == (error.code, error.message, error.reason)
    assert copy.reason_name == error.reason_name == "INVALID_FIELDS"
    assert copy.field_violations == error.field_violations
    assert copy.details == error.details
    assert str(copy) == str(error)


async def test_bearer_token_is_sent_on_every_call(served: Served) -> None:
    async with await pc.AsyncPulseClient.connect(served.target, token="s3cret") as client:
        echo = _unary(client.channel, "Echo")
        for _ in range(2):
            await client._rpc.unary(echo, StringValue(value="hi"))
    assert served.fake.authorizations == ["Bearer s3cret", "Bearer s3cret"]


async def test_callable_token_is_called_per_call(served: Served) -> None:
    issued = iter(f"tok-{n}" for n in range(100))
    calls: list[str] = []

    def token() -> str:
        calls.append(value := next(issued))
        return value

    async with await pc.AsyncPulseClient.connect(served.target, token=token) as client:
        echo = _unary(client.channel, "Echo")
        assert calls == []  # connecting makes no call
        for _ in range(3):
            await client._rpc.unary(echo, StringValue(value="hi"))
        async with client._rpc.stream(_stream(client.channel, "Stream"), StringValue(value="ok")):
            pass
    assert calls == ["tok-0", "tok-1", "tok-2", "tok-3"]
    assert served.fake.authorizations[:3] == ["Bearer tok-0", "Bearer tok-1", "Bearer tok-2"]


async def test_no_token_sends_no_authorization(served: Served) -> None:
    async with await pc.AsyncPulseClient.connect(served.target) as client:
        await client._rpc.unary(_unary(client.channel, "Echo"), StringValue(value="hi"))
    assert served.fake.authorizations == [None]


def _sync_echo_twice(target: str, token: pc.Token) -> None:
    with pc.PulseClient.connect(target, token=token) as client:
        echo = _sync_unary(client.channel, "Echo")
        for _ in range(2):
            assert client._rpc.unary(echo, StringValue(value="hi")).value == "hi"


async def test_sync_client_sends_the_token(served: Served) -> None:
    issued = iter(["a", "b"])
    await asyncio.to_thread(_sync_echo_twice, served.target, "fixed")
    await asyncio.to_thread(_sync_echo_twice, served.target, lambda: next(issued))
    assert served.fake.authorizations == ["Bearer fixed", "Bearer fixed", "Bearer a", "Bearer b"]


async def test_default_and_per_call_deadlines(served: Served) -> None:
    async with await pc.AsyncPulseClient.connect(served.target, timeout=0.2) as client:
        with pytest.raises(pc.DeadlineExceeded) as info:
            await client._rpc.unary(_unary(client.channel, "Slow"), StringValue())
        assert isinstance(info.value.__cause__, grpc.aio.AioRpcError)
        echo = _unary(client.channel, "Echo")
        await client._rpc.unary(echo, StringValue())
        await client._rpc.unary(echo, StringValue(), timeout=None)
        await client._rpc.unary(echo, StringValue(), timeout=10)
    first, unbounded, explicit = served.fake.deadlines
    # Loose bounds: the server measures against its own clock, after transit.
    assert first is not None and first < 1
    assert unbounded is None
    assert explicit is not None and 5 < explicit < 11


async def test_stream_items_then_converted_error(served: Served) -> None:
    async with await pc.AsyncPulseClient.connect(served.target, token="t") as client:
        stream = client._rpc.stream(_stream(client.channel, "Stream"), StringValue(value="x"))
        received: list[str] = []
        with pytest.raises(pc.NotFound) as info:
            async for item in stream:
                received.append(item.value)
    assert received == ["x-0", "x-1"]
    assert info.value.reason is pc.ErrorReason.DEVICE_NOT_FOUND
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert served.fake.authorizations == ["Bearer t"]


async def test_stream_cancel_ends_iteration(served: Served) -> None:
    async with await pc.AsyncPulseClient.connect(served.target) as client:
        stream = client._rpc.stream(_stream(client.channel, "Forever"), StringValue())
        received = []
        async for item in stream:
            received.append(item.value)
            stream.cancel()
        assert received == ["first"]
        # Leaving the block cancels too, so an abandoned watch does not linger.
        async with client._rpc.stream(_stream(client.channel, "Forever"), StringValue()) as s:
            assert (await anext(s)).value == "first"
        assert [item async for item in s] == []


def _sync_stream_run(target: str) -> tuple[list[str], pc.PulseError, list[str]]:
    with pc.PulseClient.connect(target, token="t") as client:
        received: list[str] = []
        with pytest.raises(pc.NotFound) as info:
            for item in client._rpc.stream(
                _sync_stream(client.channel, "Stream"), StringValue(value="y")
            ):
                received.append(item.value)
        cancelled: list[str] = []
        with client._rpc.stream(_sync_stream(client.channel, "Forever"), StringValue()) as s:
            for item in s:
                cancelled.append(item.value)
                s.cancel()
        return received, info.value, cancelled


async def test_sync_stream(served: Served) -> None:
    received, error, cancelled = await asyncio.to_thread(_sync_stream_run, served.target)
    assert received == ["y-0", "y-1"]
    assert error.reason is pc.ErrorReason.DEVICE_NOT_FOUND
    assert isinstance(error.__cause__, grpc.RpcError)
    assert cancelled == ["first"]


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_connect_to_nothing_is_unavailable() -> None:
    target = f"127.0.0.1:{_unused_port()}"
    with pytest.raises(pc.Unavailable):
        await pc.AsyncPulseClient.connect(target, timeout=0.3)
    with pytest.raises(pc.Unavailable):
        await asyncio.to_thread(pc.PulseClient.connect, target, timeout=0.3)
