"""A bare grpc.aio server whose handlers make one pooled database call each,
with no authentication, tenant scope or interceptor: the floor under any
grpc.aio server that reads or writes once per call (PORT, DATABASE_URL,
TENANT).

GetDevice reads the device as `pulse` does (the same store function and
conversion). UpdateDesired is the raw conditional UPDATE of bench.twin, in
autocommit, of the document converted as `pulse` converts it.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import grpc
from pulse.device.v1 import devices_pb2, twin_pb2

from bench.harness import run
from server import protoconv
from server.db import create_pool
from server.registry import convert, store

_WRITE = """
UPDATE device_state
SET desired = $3, desired_version = desired_version + 1, desired_updated_at = now()
WHERE tenant_id = $1 AND device_id = $2 AND desired_version = $4
RETURNING desired_version
"""


async def main() -> None:
    tenant = uuid.UUID(os.environ["TENANT"])
    pool = await create_pool(os.environ["DATABASE_URL"], size=10)

    async def get_device(request: devices_pb2.GetDeviceRequest, context: Any) -> Any:
        async with pool.acquire() as con:
            return convert.device(await store.get_device(con, tenant, request.device_id))

    async def update_desired(request: twin_pb2.UpdateDesiredRequest, context: Any) -> Any:
        version = await pool.fetchval(
            _WRITE,
            tenant,
            request.device_id,
            protoconv.struct_to_dict("desired", request.desired),
            request.expected_version,
        )
        return twin_pb2.Twin(
            device_id=request.device_id, desired=request.desired, desired_version=version
        )

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "pulse.device.v1.DeviceRegistryService",
                {
                    "GetDevice": grpc.unary_unary_rpc_method_handler(
                        get_device,
                        request_deserializer=devices_pb2.GetDeviceRequest.FromString,
                        response_serializer=devices_pb2.Device.SerializeToString,
                    )
                },
            ),
            grpc.method_handlers_generic_handler(
                "pulse.device.v1.TwinService",
                {
                    "UpdateDesired": grpc.unary_unary_rpc_method_handler(
                        update_desired,
                        request_deserializer=twin_pb2.UpdateDesiredRequest.FromString,
                        response_serializer=twin_pb2.Twin.SerializeToString,
                    )
                },
            ),
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{os.environ['PORT']}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    run(main)
