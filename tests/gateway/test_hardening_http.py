"""The gateway under hostile or unlucky conditions: malformed input answers a
4xx and stores nothing, connections are bounded in number and in how long
they may take to send a request head, backing-off statuses carry
Retry-After, and stopping ends open event streams with an error event."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

import grpc
import httpx
import pulse_client as pc
import pytest
from google.rpc import error_details_pb2, status_pb2
from pulse.device.v1 import devices_pb2

from server.app import SERVICE_NAMES
from server.gateway.serve import running_gateway
from server.gateway.transcode import MAX_JSON_DEPTH
from tests.conftest import Tenant


def _auth(tenant: Tenant) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.token()}"}


def _nested(levels: int, leaf: Any = 1) -> Any:
    doc = leaf
    for _ in range(levels):
        doc = {"k": doc}
    return doc


async def _until(condition: Callable[[], bool], what: str, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {within_s} s: {what}"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def _gateway(target: str, **settings: Any) -> AsyncIterator[str]:
    """A gateway of the test's own, with the limits under test."""
    async with running_gateway(target, SERVICE_NAMES, host="127.0.0.1", port=0, **settings) as port:
        yield f"127.0.0.1:{port}"


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _server_sockets(port: int) -> int:
    """Descriptors this process holds for connections accepted on `port`:
    the gateway's side of each connection, not the tests' client side."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    local = f":{port:04X}"
    held = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            listening = fields[3] == "0A"
            if fields[1].endswith(local) and not listening and fields[9] in inodes:
                held += 1
    return held


async def _connect(address: str, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    await writer.drain()
    return reader, writer


def _parse(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


# -- bad input ---------------------------------------------------------------


async def test_deep_json_is_refused_and_stores_nothing(
    http: httpx.AsyncClient, client: pc.AsyncPulseClient, tenant: Tenant
) -> None:
    h = _auth(tenant)
    await client.devices.create("DEEP-1")
    desired = "/customer/devices/DEEP-1/twin/desired"
    too_deep = [
        json.dumps(_nested(40)),
        json.dumps(_nested(MAX_JSON_DEPTH + 1)),
        "[" * 30_000 + "]" * 30_000,  # deeper than Python's recursion limit
    ]
    for body in too_deep:
        r = await http.patch(
            desired,
            content=body,
            headers={**h, "If-Match": '"0"', "content-type": "application/json"},
        )
        assert r.status_code == 422, r.text  # upstream's path: upstream's status
        error = r.json()["error"]
        assert error["status"] == "INVALID_ARGUMENT"
        assert f"{MAX_JSON_DEPTH} levels" in error["message"]
    r = await http.post(
        "/customer/devices",
        content="[" * 30_000 + "]" * 30_000,
        headers={**h, "content-type": "application/json"},
    )
    assert r.status_code == 400, r.text

    # At the limit the gateway passes the body on; the API's own 10-level
    # limit for documents answers, never a server error.
    r = await http.patch(
        desired, json={"desired": _nested(MAX_JSON_DEPTH - 1)}, headers={**h, "If-Match": '"0"'}
    )
    assert r.status_code == 422, r.text
    assert "10 levels" in r.text
    # A device body holds metadata 10 levels deep inside its own level.
    r = await http.post(
        "/customer/devices", json={"device_id": "DEEP-2", "metadata": _nested(10)}, headers=h
    )
    assert r.status_code == 200, r.text

    assert (await client.twin.get("DEEP-1")).desired_version == 0
    assert (await http.get("/customer/devices/DEEP-1", headers=h)).status_code == 200


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1])
async def test_every_body_answers_deep_json_with_4xx(
    http: httpx.AsyncClient, tenant: Tenant, depth: int
) -> None:
    openapi = (await http.get("/openapi.json")).json()
    operations = [
        (method, path)
        for path, methods in openapi["paths"].items()
        for method, op in methods.items()
        if "requestBody" in op
    ]
    assert operations
    for method, path in operations:
        url = path.replace("{", "").replace("}", "")
        body = {"k": _nested(depth - 1)}
        r = await http.request(method.upper(), url, json=body, headers=_auth(tenant))
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
        if depth > MAX_JSON_DEPTH:
            assert f"{MAX_JSON_DEPTH} levels" in r.json()["error"]["message"]


async def test_non_ascii_forwarded_headers(http: httpx.AsyncClient, tenant: Tenant) -> None:
    token = f"Bearer {tenant.token()}".encode()
    r = await http.get(
        "/customer/devices",
        headers={b"authorization": token, b"x-request-id": "caf\u00e9".encode()},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert "x-request-id" in r.json()["error"]["message"]

    r = await http.get(
        "/customer/devices", headers={b"authorization": "Bearer \u00e9t\u00e9".encode()}
    )
    assert r.status_code == 401, r.text
    assert r.json()["error"]["status"] == "UNAUTHENTICATED"
    assert "authorization" in r.json()["error"]["message"]

    r = await http.get("/customer/devices", headers={**_auth(tenant), "x-request-id": "req-1"})
    assert r.status_code == 200, r.text


async def test_a_single_field_given_twice_is_400(http: httpx.AsyncClient, tenant: Tenant) -> None:
    h = _auth(tenant)
    r = await http.get(
        "/customer/devices", params=[("page_size", "5"), ("page_size", "6")], headers=h
    )
    assert r.status_code == 400, r.text
    assert "page_size" in r.json()["error"]["message"]

    r = await http.get("/customer/devices/D-1", params={"device_id": "D-2"}, headers=h)
    assert r.status_code == 400, r.text
    assert "device_id" in r.json()["error"]["message"]

    # A repeated field takes any number of values.
    r = await http.get(
        "/customer/devices", params=[("filter.site_ids", "A"), ("filter.site_ids", "B")], headers=h
    )
    assert r.status_code == 200, r.text


async def test_whole_numbers_in_documents_stay_integers(
    http: httpx.AsyncClient, client: pc.AsyncPulseClient, tenant: Tenant
) -> None:
    h = _auth(tenant)
    await client.devices.create("NUM-1")
    document = {"setpoint": 21, "ratio": 0.5, "list": [1, 2.5, {"n": -3}], "big": 2**53}
    r = await http.patch(
        "/customer/devices/NUM-1/twin/desired",
        json={"desired": document},
        headers={**h, "If-Match": '"0"'},
    )
    assert r.status_code == 200, r.text
    for response in (r, await http.get("/customer/devices/NUM-1/twin", headers=h)):
        twin = response.json()
        assert '"setpoint":21,' in response.text or '"setpoint":21}' in response.text
        assert twin["desired"] == document
        assert isinstance(twin["desired"]["setpoint"], int)
        assert isinstance(twin["desired"]["list"][2]["n"], int)
        assert isinstance(twin["desired"]["ratio"], float)
        # Values inside maps of google.protobuf.Value too.
        assert twin["structured_delta"]["added"]["setpoint"] == 21
        assert isinstance(twin["structured_delta"]["added"]["setpoint"], int)

    r = await http.post(
        "/customer/devices", json={"device_id": "NUM-2", "metadata": {"floor": 3}}, headers=h
    )
    assert r.json()["metadata"] == {"floor": 3}
    assert isinstance(r.json()["metadata"]["floor"], int)


# -- statuses that ask the client to back off --------------------------------


@asynccontextmanager
async def _refusing_grpc(code: grpc.StatusCode, retry_after: timedelta) -> AsyncIterator[str]:
    """A gRPC server whose GetDevice fails with `code` and a RetryInfo."""

    async def get_device(request: devices_pb2.GetDeviceRequest, context: Any) -> devices_pb2.Device:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromTimedelta(retry_after)
        status = status_pb2.Status(code=code.value[0], message="slow down")
        status.details.add().Pack(info)
        await context.abort(
            code,
            "slow down",
            trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
        )
        raise AssertionError("abort returns only by raising")

    handler = grpc.method_handlers_generic_handler(
        "pulse.device.v1.DeviceRegistryService",
        {
            "GetDevice": grpc.unary_unary_rpc_method_handler(
                get_device,
                request_deserializer=devices_pb2.GetDeviceRequest.FromString,
                response_serializer=devices_pb2.Device.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    ("code", "http_status", "delay", "retry_after"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, timedelta(seconds=2.5), "3"),
        (grpc.StatusCode.UNAVAILABLE, 503, timedelta(seconds=7), "7"),
    ],
)
async def test_retry_info_becomes_retry_after(
    code: grpc.StatusCode, http_status: int, delay: timedelta, retry_after: str
) -> None:
    async with (
        _refusing_grpc(code, delay) as target,
        _gateway(target) as address,
        httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as http,
    ):
        r = await http.get("/customer/devices/D-1")
    assert r.status_code == http_status, r.text
    assert r.headers["retry-after"] == retry_after
    error = r.json()["error"]
    assert (error["code"], error["status"]) == (http_status, code.name)
    assert any("retry_delay" in d for d in error["details"])


async def test_unreachable_api_server_is_503() -> None:
    async with (
        _gateway("127.0.0.1:1") as address,
        httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as http,
    ):
        r = await http.get("/customer/devices/D-1")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["status"] == "UNAVAILABLE"


# -- connection limits -------------------------------------------------------

_PARTIAL_HEADS = [b"", b"GET /customer/devices HTTP/1.1\r\n", b"GET /openapi.json HTTP/1.1\r\nHo"]


async def test_incomplete_request_heads_time_out(target: str) -> None:
    async with _gateway(target, header_timeout_s=1.0) as address:
        port = _port(address)
        stalled = [
            await _connect(address, _PARTIAL_HEADS[n % len(_PARTIAL_HEADS)]) for n in range(300)
        ]
        # Every one is answered 408 and closed by the server.
        answers = await asyncio.wait_for(
            asyncio.gather(*(reader.read() for reader, _ in stalled)), 60
        )
        for raw in answers:
            status, _, body = _parse(raw)
            assert status == 408
            assert body["error"]["status"] == "DEADLINE_EXCEEDED"
        for _, writer in stalled:
            writer.close()
        await _until(lambda: _server_sockets(port) == 0, "the gateway released every socket")

        # A connection that completes its head is served, and keeps being
        # served across requests on the same connection.
        async with httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as http:
            for _ in range(2):
                assert (await http.get("/openapi.json")).status_code == 200


async def test_connections_over_the_cap_get_503(target: str) -> None:
    cap = 20
    request = b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n"
    async with _gateway(target, max_connections=cap, header_timeout_s=120.0) as address:
        port = _port(address)
        fds_before = len(os.listdir("/proc/self/fd"))
        held = [await _connect(address, _PARTIAL_HEADS[1]) for _ in range(cap)]
        await _until(lambda: _server_sockets(port) == cap, "the gateway holds the connections")

        async def refused() -> tuple[int, dict[str, str], dict[str, Any]]:
            reader, writer = await _connect(address, request)
            try:
                return _parse(await reader.read())
            finally:
                writer.close()

        answers = await asyncio.wait_for(asyncio.gather(*(refused() for _ in range(300))), 60)
        for status, headers, body in answers:
            assert status == 503
            assert headers["retry-after"] == "1"
            assert body["error"]["status"] == "UNAVAILABLE"
            assert f"{cap} open connections" in body["error"]["message"]
        await _until(lambda: _server_sockets(port) == cap, "refused sockets are released")

        # Clients that read the 503 but never close are cut off as well.
        lingering = [await _connect(address, request) for _ in range(30)]
        for reader, _ in lingering:
            assert _parse(await asyncio.wait_for(reader.read(), 30))[0] == 503
        await _until(lambda: _server_sockets(port) == cap, "lingering refused sockets closed")
        for _, writer in lingering:
            writer.close()

        # The held connections were never disturbed; closing them frees slots.
        assert all(not writer.is_closing() for _, writer in held)
        for _, writer in held:
            writer.close()
        await _until(lambda: _server_sockets(port) == 0, "held sockets released")
        async with httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as http:
            assert (await http.get("/openapi.json")).status_code == 200
        # Hundreds of attempts later, the process holds no more descriptors
        # than it started with (small slack for unrelated activity).
        await _until(
            lambda: len(os.listdir("/proc/self/fd")) <= fds_before + 10,
            "descriptors return to where they started",
        )


# -- shutdown ----------------------------------------------------------------


async def _next_event(lines: AsyncIterator[str]) -> tuple[str, str]:
    """(event type, data) of the next server-sent event."""
    kind, data = "message", ""
    async for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data:
            return kind, data
    raise AssertionError("the stream ended")


async def test_stopping_ends_event_streams_promptly(
    target: str, client: pc.AsyncPulseClient, tenant: Tenant
) -> None:
    grace_s = 5
    await client.devices.create("STOP-1")
    stack = AsyncExitStack()
    address = await stack.enter_async_context(_gateway(target, shutdown_grace_s=grace_s))
    async with (
        httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as http,
        http.stream(
            "GET", "/customer/twins:watch", params={"device_ids": "STOP-1"}, headers=_auth(tenant)
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()
        kind, data = await asyncio.wait_for(_next_event(lines), 30)
        assert (kind, json.loads(data)["device_id"]) == ("message", "STOP-1")

        started = time.monotonic()
        stopping = asyncio.create_task(stack.aclose())
        kind, data = await asyncio.wait_for(_next_event(lines), 30)
        assert kind == "error"
        error = json.loads(data)["error"]
        assert (error["code"], error["status"]) == (503, "UNAVAILABLE")
        assert "shutting down" in error["message"]
        assert [line async for line in lines if line] == []  # then the stream ends
        await asyncio.wait_for(stopping, 30)
    assert time.monotonic() - started < grace_s


async def test_stopping_is_bounded_by_the_grace_period(target: str) -> None:
    """A request that never finishes (a body that stops half way) is
    cancelled once the grace period is over."""
    stack = AsyncExitStack()
    address = await stack.enter_async_context(_gateway(target, shutdown_grace_s=1))
    _, writer = await _connect(
        address,
        b"POST /customer/devices HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{",
    )
    await _until(lambda: _server_sockets(_port(address)) == 1, "the request is being read")
    started = time.monotonic()
    await asyncio.wait_for(stack.aclose(), 30)
    assert time.monotonic() - started < 10
    writer.close()
