"""A bare grpc.aio server answering GetDevice with a fixed Device: the
framework's ceiling, with the same message types as the real call."""

from __future__ import annotations

import os
from typing import Any

import grpc
from pulse.device.v1 import devices_pb2, status_pb2

from bench.harness import run

SERVICE = "pulse.device.v1.DeviceRegistryService"
_DEVICE = devices_pb2.Device(
    device_id="BENCH-000001",
    name="bench device",
    site_id="site-1",
    model="m1",
    tags={"env": "prod", "line": "3"},
    lifecycle_status=status_pb2.ACTIVE,
    connectivity_status=status_pb2.ONLINE,
)


async def get_device(
    request: devices_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> devices_pb2.Device:
    return _DEVICE


async def main() -> None:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        get_device,
        request_deserializer=devices_pb2.GetDeviceRequest.FromString,
        response_serializer=devices_pb2.Device.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"GetDevice": handler})]
    )
    server.add_insecure_port(f"127.0.0.1:{os.environ['PORT']}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    run(main)
