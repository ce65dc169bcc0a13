"""GetDevice through the real server and typed client, beside the two ceilings.

In one run, 64 calls in flight each:
  - raw asyncpg primary-key read (the database's ceiling),
  - a bare grpc.aio server returning a fixed Device (the framework's ceiling),
  - a bare grpc.aio server making the same read on a pool, without auth,
    tenant scope or interceptors (bench.floor_server: the floor under any
    grpc.aio server that reads once per call),
  - GetDevice through `pulse` (auth, tenant-scoped transaction, RLS) and the
    typed client.
Each server runs in its own process; the client runs in this one.

    .venv/bin/python -m bench.registry
"""

from __future__ import annotations

import secrets

import asyncpg
import grpc
from pulse.device.v1 import devices_pb2, devices_pb2_grpc
from pulse_client import AsyncPulseClient

from bench.harness import (
    closed_loop,
    free_port,
    run,
    scratch_database,
    seed_tenant,
    subprocess_server,
)
from server.auth import Role, mint_token

DEVICES = 1000


def _device_id(i: int) -> str:
    return f"BENCH-{i % DEVICES + 1:06d}"


async def main() -> None:
    async with scratch_database() as dsn:
        tenant = await seed_tenant(
            dsn,
            [_device_id(i) for i in range(DEVICES)],
            tags={"env": "prod", "line": "3"},
        )
        print(f"GetDevice, 64 in flight, {DEVICES} devices, medians of 3 rounds")

        pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10)
        assert pool is not None

        async def raw_read(i: int) -> object:
            return await pool.fetchrow(
                "SELECT device_id, name, tags FROM devices WHERE tenant_id = $1 AND device_id = $2",
                tenant,
                _device_id(i),
            )

        raw = await closed_loop("raw asyncpg PK read (pool of 10)", raw_read)
        await pool.close()
        print(raw.row())

        port = free_port()
        async with (
            subprocess_server("bench.echo_server", port, {}),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)

            async def echo_call(i: int) -> object:
                return await stub.GetDevice(devices_pb2.GetDeviceRequest(device_id="x"))

            echo = await closed_loop("bare grpc.aio echo", echo_call)
        print(echo.row())

        port = free_port()
        async with (
            subprocess_server(
                "bench.floor_server", port, {"DATABASE_URL": dsn, "TENANT": str(tenant)}
            ),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)

            async def floor_call(i: int) -> object:
                return await stub.GetDevice(devices_pb2.GetDeviceRequest(device_id=_device_id(i)))

            floor = await closed_loop("bare grpc.aio + one pooled read", floor_call)
        print(floor.row(echo.rate))

        secret = secrets.token_hex(32)
        port = free_port()
        env = {"DATABASE_URL": dsn, "PULSE_SECRET": secret, "PULSE_DB_POOL_SIZE": "10"}
        async with subprocess_server("bench.serve", port, env):
            token = mint_token(secret.encode(), tenant_id=tenant, role=Role.VIEWER)
            client = await AsyncPulseClient.connect(f"127.0.0.1:{port}", token=token)

            async def get_device(i: int) -> object:
                return await client.devices.get(_device_id(i))

            real = await closed_loop("GetDevice via pulse + typed client", get_device)
            await client.close()
        ceiling = min(raw.rate, echo.rate)
        print(real.row(ceiling))
        verdict = "met" if real.rate >= 0.6 * ceiling else "NOT met"
        print(
            f"  GetDevice is {real.rate / ceiling:.0%} of the lower ceiling "
            f"({ceiling:,.0f}/s); goal >= 60%: {verdict}"
        )
        print(
            f"  GetDevice is {real.rate / floor.rate:.0%} of the floor, a bare grpc.aio "
            f"handler making the same read with no auth or scope ({floor.rate:,.0f}/s, "
            f"{floor.rate / ceiling:.0%} of the lower ceiling)"
        )


if __name__ == "__main__":
    run(main)
