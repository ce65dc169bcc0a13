"""Limits on what one caller can hold, and how the server ends at shutdown.

Each server here is a real one of the test's own, with small limits, so the
limits are reached with a handful of calls."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pulse_client as pc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pulse.device.v1 import devices_pb2, devices_pb2_grpc, twin_pb2, twin_pb2_grpc
from pulse.device.v1.error_reason_pb2 import ErrorReason

from server import config
from server.app import RunningServer, start
from server.auth import Role
from tests.conftest import Tenant
from tests.helpers import eventually


@pytest.fixture
async def small(settings: config.Settings, dsn: str) -> AsyncIterator[RunningServer]:
    limited = dataclasses.replace(
        settings,
        grpc_max_streams_per_caller=3,
        grpc_max_streams_per_tenant=5,
        grpc_max_concurrent_calls=4,
        shutdown_grace_s=2.0,
    )
    server = await start(limited, dsn)
    try:
        yield server
    finally:
        await server.stop()


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _retry_delay(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError("no RetryInfo detail")


async def _watch(stub: twin_pb2_grpc.TwinServiceStub, token: str, device_id: str) -> Any:
    """An open WatchTwin stream, after its first message."""
    call: Any = stub.WatchTwin(
        twin_pb2.WatchTwinRequest(device_ids=[device_id]), metadata=_md(token)
    )
    await call.read()
    return call


async def test_streams_per_caller_and_per_tenant(small: RunningServer, tenant: Tenant) -> None:
    target = f"127.0.0.1:{small.port}"
    async with await pc.AsyncPulseClient.connect(target, token=tenant.token()) as admin:
        await admin.devices.create("DEV-1")
    alice = tenant.token(Role.VIEWER, subject="alice")
    bob = tenant.token(Role.VIEWER, subject="bob")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = twin_pb2_grpc.TwinServiceStub(channel)
        held: list[Any] = [await _watch(stub, alice, "DEV-1") for _ in range(3)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _watch(stub, alice, "DEV-1")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 open streams" in (refused.value.details() or "")
        assert _retry_delay(refused.value) > 0
        assert pc.from_rpc_error(refused.value).reason == ErrorReason.Name(
            ErrorReason.TOO_MANY_STREAMS
        )
        # Another caller of the same tenant still gets streams, up to the tenant's limit.
        held += [await _watch(stub, bob, "DEV-1") for _ in range(2)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _watch(stub, bob, "DEV-1")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant" in (refused.value.details() or "")
        # A closed stream frees its place.
        held.pop().cancel()
        deadline = time.monotonic() + 10
        while small.admission.open_streams > 4:
            assert time.monotonic() < deadline, "the cancelled stream was never counted out"
            await asyncio.sleep(0.02)
        held.append(await _watch(stub, bob, "DEV-1"))
        for call in held:
            call.cancel()


async def test_concurrent_calls_past_the_limit_are_refused_with_a_retry_hint(
    small: RunningServer, tenant: Tenant
) -> None:
    """Calls waiting on the database count against the limit; the ones past
    it are told to come back instead of queueing until their deadline."""
    target = f"127.0.0.1:{small.port}"
    async with await pc.AsyncPulseClient.connect(target, token=tenant.token()) as client:
        await client.devices.create("DEV-1")
        # Hold every pooled connection, so the calls pile up in the server.
        cons = [await small.db.pool.acquire() for _ in range(small.db.pool.get_max_size())]
        try:
            calls = [asyncio.ensure_future(client.devices.get("DEV-1")) for _ in range(12)]
            # The four admitted calls cannot finish while the pool is held;
            # every other one is answered at once.
            await eventually(lambda: sum(c.done() for c in calls) == 8, what="8 refusals")
            await asyncio.sleep(0.2)
            assert sum(c.done() for c in calls) == 8
            for call in calls:
                if call.done():
                    error = call.exception()
                    assert isinstance(error, pc.ResourceExhausted), error
                    assert error.reason == ErrorReason.Name(ErrorReason.TOO_MANY_REQUESTS)
        finally:
            for con in cons:
                await small.db.pool.release(con)
        results = await asyncio.gather(*calls, return_exceptions=True)
        served = [r for r in results if not isinstance(r, BaseException)]
        assert len(served) == 4  # exactly the limit got through
        # Nothing is held after the burst: a new call is served.
        assert (await client.devices.get("DEV-1")).device_id == "DEV-1"


async def test_shutdown_ends_streams_and_refuses_new_calls_at_once(
    settings: config.Settings, dsn: str, tenant: Tenant
) -> None:
    server = await start(dataclasses.replace(settings, shutdown_grace_s=5.0), dsn)
    target = f"127.0.0.1:{server.port}"
    try:
        async with await pc.AsyncPulseClient.connect(target, token=tenant.token()) as client:
            await client.devices.create("DEV-1")
        async with grpc.aio.insecure_channel(target) as channel:
            stub = twin_pb2_grpc.TwinServiceStub(channel)
            streams: list[Any] = [await _watch(stub, tenant.token(), "DEV-1") for _ in range(3)]
            started = time.monotonic()
            stopping = asyncio.ensure_future(server.stop())
            for call in streams:
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await call.read()
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in (ended.value.details() or "")
            await stopping
            # Well within the grace period: nothing was left running.
            assert time.monotonic() - started < 4.0
    finally:
        await server.stop()
    with pytest.raises(pc.Unavailable):
        async with await pc.AsyncPulseClient.connect(target, token=tenant.token(), timeout=2):
            pass


async def test_a_taken_port_leaves_nothing_running(
    settings: config.Settings, dsn: str, running: RunningServer
) -> None:
    before = {t.get_name() for t in asyncio.all_tasks()}
    with pytest.raises(RuntimeError):
        await start(dataclasses.replace(settings, grpc_port=running.port), dsn)
    await asyncio.sleep(0.1)
    leaked = {t.get_name() for t in asyncio.all_tasks()} - before
    assert not leaked, leaked


async def test_a_burst_is_served_or_refused_retryably_never_cancelled(
    running: RunningServer, tenant: Tenant
) -> None:
    """Thousands of calls at once: grpc.aio cannot take them all in, and
    without a stream limit it cancelled the rest (CANCELLED, which no client
    retries). Each call must be served, or refused with a retryable code."""
    target = f"127.0.0.1:{running.port}"
    async with await pc.AsyncPulseClient.connect(target, token=tenant.token()) as client:
        await client.devices.create("DEV-1")
    channels = [grpc.aio.insecure_channel(target) for _ in range(50)]
    try:
        stubs = [devices_pb2_grpc.DeviceRegistryServiceStub(c) for c in channels]
        request = devices_pb2.GetDeviceRequest(device_id="DEV-1")

        async def call(n: int) -> grpc.StatusCode:
            try:
                await stubs[n % len(stubs)].GetDevice(request, metadata=_md(tenant.token()))
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        outcomes = Counter(await asyncio.gather(*(call(n) for n in range(3000))))
    finally:
        for channel in channels:
            await channel.close(None)
    assert outcomes[grpc.StatusCode.OK] > 0, outcomes
    retryable = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert set(outcomes) <= {grpc.StatusCode.OK, *retryable}, outcomes
