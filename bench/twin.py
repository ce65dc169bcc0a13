"""UpdateDesired through the real server and typed client, beside the two
ceilings, in one run, 64 calls in flight each:
  - the raw asyncpg conditional UPDATE of the same table (the database's
    ceiling: one autocommit statement, no tenant scope, outbox or NOTIFY),
  - a bare grpc.aio server answering UpdateDesired with a fixed Twin (the
    framework's ceiling, same message types),
  - a bare grpc.aio server making the raw UPDATE on a pool, without auth,
    tenant scope, outbox or interceptors (bench.floor_server: the floor under
    any grpc.aio server that writes once per call),
  - for the breakdown, `store.write_desired` in a tenant-scoped transaction
    (everything the server does in the database, without gRPC),
  - UpdateDesired via `pulse` (auth, validation, tenant-scoped conditional
    UPDATE + outbox row + NOTIFY, delta and sync status in the answer) and
    the typed client, each call naming the version it last saw; then the
    same asking only for the new version and revision back (`read_mask`).
Each worker owns its devices, so versions never conflict and every call
writes. Each server runs in its own process; the clients run in this one.

    .venv/bin/python -m bench.twin
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import asyncpg
import grpc
from pulse.device.v1 import twin_pb2, twin_pb2_grpc
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
from server.db import Database, create_pool
from server.protoconv import struct
from server.twin import store

IN_FLIGHT = 64
PER_WORKER = 16
DEVICES = IN_FLIGHT * PER_WORKER
GOAL = 0.5
#: What a writer that only needs its new version asks for back.
LEAN = ["desired_version", "revision"]
SERVICE = "pulse.device.v1.TwinService"


def _device(i: int) -> str:
    # closed_loop hands worker n the calls n, n + 64, ...: worker n only ever
    # touches its own 16 devices, one call at a time.
    return f"TWIN-{(i % IN_FLIGHT) * PER_WORKER + (i // IN_FLIGHT) % PER_WORKER:05d}"


def _document(i: int) -> dict[str, Any]:
    return {
        "setpoint": 18 + i % 8,
        "mode": "eco",
        "telemetry": {"interval_s": 30, "fields": ["t", "rh", "co2"]},
    }


async def _echo_server() -> None:
    """The framework's ceiling, run as `BENCH_TWIN_ECHO=1 python -m bench.twin`."""
    reply = twin_pb2.Twin(
        device_id="TWIN-00000",
        desired=struct(_document(0)),
        reported=struct(_document(1)),
        desired_version=2,
        reported_version=1,
        sync_status=twin_pb2.Twin.PENDING,
        delta=struct({"setpoint": 18}),
        structured_delta=twin_pb2.TwinDelta(unchanged_count=5, desired_version=2),
        revision=3,
    )

    async def update_desired(request: twin_pb2.UpdateDesiredRequest, context: Any) -> Any:
        return reply

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        update_desired,
        request_deserializer=twin_pb2.UpdateDesiredRequest.FromString,
        response_serializer=twin_pb2.Twin.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"UpdateDesired": handler})]
    )
    server.add_insecure_port(f"127.0.0.1:{os.environ['PORT']}")
    await server.start()
    await server.wait_for_termination()


async def main() -> None:
    async with scratch_database() as dsn:
        tenant = await seed_tenant(dsn, [f"TWIN-{n:05d}" for n in range(DEVICES)])
        versions = {_device(i): 0 for i in range(DEVICES)}
        print(f"UpdateDesired, {IN_FLIGHT} in flight, {DEVICES} devices, medians of 3 rounds")

        pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10)
        assert pool is not None
        await pool.execute("SELECT 1")

        async def raw_update(i: int) -> object:
            device = _device(i)
            version = await pool.fetchval(
                """
                UPDATE device_state
                SET desired = $3::jsonb, desired_version = desired_version + 1,
                    desired_updated_at = now()
                WHERE tenant_id = $1 AND device_id = $2 AND desired_version = $4
                RETURNING desired_version
                """,
                tenant,
                device,
                json.dumps(_document(i)),
                versions[device],
            )
            assert version == versions[device] + 1, "conflict: workers overlap"
            versions[device] = version
            return version

        raw = await closed_loop("raw asyncpg conditional UPDATE", raw_update)
        await pool.close()
        print(raw.row())

        port = free_port()
        async with (
            subprocess_server("bench.twin", port, {"BENCH_TWIN_ECHO": "1"}),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub = twin_pb2_grpc.TwinServiceStub(channel)

            async def echo_call(i: int) -> object:
                return await stub.UpdateDesired(
                    twin_pb2.UpdateDesiredRequest(
                        device_id=_device(i), desired=struct(_document(i)), expected_version=0
                    )
                )

            echo = await closed_loop("bare grpc.aio echo", echo_call)
        print(echo.row())

        port = free_port()
        async with (
            subprocess_server(
                "bench.floor_server", port, {"DATABASE_URL": dsn, "TENANT": str(tenant)}
            ),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub = twin_pb2_grpc.TwinServiceStub(channel)

            async def floor_call(i: int) -> object:
                device = _device(i)
                twin = await stub.UpdateDesired(
                    twin_pb2.UpdateDesiredRequest(
                        device_id=device,
                        desired=struct(_document(i)),
                        expected_version=versions[device],
                    )
                )
                assert twin.desired_version == versions[device] + 1, "conflict: workers overlap"
                versions[device] = twin.desired_version
                return twin

            floor = await closed_loop("bare grpc.aio + one pooled UPDATE", floor_call)
        print(floor.row(echo.rate))

        db = Database(await create_pool(dsn, size=10))

        async def store_write(i: int) -> object:
            device = _device(i)
            async with db.tenant(tenant) as con:
                record = await store.write_desired(
                    con, tenant, device, _document(i), expected_version=versions[device]
                )
            versions[device] = record.desired_version
            return record

        scoped = await closed_loop("store.write_desired (no gRPC)", store_write)
        print(scoped.row())

        async def store_write_notify_inside(i: int) -> object:
            # The design not taken (server/twin/notify.py): the same write
            # with NOTIFY inside its transaction.
            device = _device(i)
            async with db.tenant(tenant) as con:
                record = await store.write_desired(
                    con, tenant, device, _document(i), expected_version=versions[device]
                )
                await con.execute(
                    "SELECT pg_notify($1, $2)", store.channel(tenant), f"{device}:{record.revision}"
                )
            versions[device] = record.desired_version
            return record

        inside = await closed_loop(
            "  same, NOTIFY inside the transaction", store_write_notify_inside
        )
        async with db.admin() as con:
            await con.execute("DELETE FROM twin_outbox")
        await db.close()
        print(inside.row())

        secret = secrets.token_hex(32)
        port = free_port()
        env = {"DATABASE_URL": dsn, "PULSE_SECRET": secret, "PULSE_DB_POOL_SIZE": "10"}
        async with subprocess_server("bench.serve", port, env):
            token = mint_token(secret.encode(), tenant_id=tenant, role=Role.OPERATOR)
            client = await AsyncPulseClient.connect(f"127.0.0.1:{port}", token=token)

            async def update_desired(i: int) -> object:
                device = _device(i)
                twin = await client.twin.update_desired(
                    device, _document(i), expected_version=versions[device]
                )
                versions[device] = twin.desired_version
                return twin

            real = await closed_loop("UpdateDesired via pulse + typed client", update_desired)

            async def update_desired_lean(i: int) -> object:
                device = _device(i)
                twin = await client.twin.update_desired(
                    device, _document(i), expected_version=versions[device], fields=LEAN
                )
                versions[device] = twin.desired_version
                return twin

            lean = await closed_loop("  same, read_mask version+revision", update_desired_lean)
            await client.close()
        ceiling = min(raw.rate, echo.rate)
        print(real.row(ceiling))
        print(lean.row(ceiling))
        verdict = "met" if real.rate >= GOAL * ceiling else "NOT met"
        print(
            f"  UpdateDesired is {real.rate / ceiling:.0%} of the lower ceiling "
            f"({ceiling:,.0f}/s); goal >= {GOAL:.0%}: {verdict}"
        )
        print(
            f"  UpdateDesired is {real.rate / floor.rate:.0%} of the floor, a bare grpc.aio "
            f"handler making the raw UPDATE with no auth, scope or outbox "
            f"({floor.rate:,.0f}/s, {floor.rate / ceiling:.0%} of the lower ceiling)"
        )


if __name__ == "__main__":
    run(_echo_server if os.environ.get("BENCH_TWIN_ECHO") else main)
