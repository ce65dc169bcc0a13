"""Server reflection under both names tools ask for: `grpc.reflection.v1`
(current grpcurl, buf curl and Postman try it first) and `v1alpha` (older
tools).

grpcio-reflection implements only v1alpha. The two protocols are the same
messages under another package, field for field, so v1 is the same servicer
registered under the v1 name, and v1's descriptor (for a client that
describes the reflection service itself) is v1alpha's file, renamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

V1ALPHA = "grpc.reflection.v1alpha"
V1 = "grpc.reflection.v1"
SERVICE = "ServerReflection"


def enable(service_names: Sequence[str], target: Any) -> None:
    """Serve reflection for `service_names` (and itself) on `target`, an
    object with add_generic_rpc_handlers."""
    _register_v1_descriptor()
    servicer = ReflectionServicer(
        [*service_names, f"{V1}.{SERVICE}", f"{V1ALPHA}.{SERVICE}"],
    )
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for package in (V1, V1ALPHA):
        target.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    f"{package}.{SERVICE}", {"ServerReflectionInfo": method}
                ),
            )
        )


def _register_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(f"{V1}.{SERVICE}")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = V1
    proto.ClearField("options")
    old, new = f".{V1ALPHA}.", f".{V1}."
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = field.type_name.replace(old, new)
    for service in proto.service:
        for rpc in service.method:
            rpc.input_type = rpc.input_type.replace(old, new)
            rpc.output_type = rpc.output_type.replace(old, new)
    pool.Add(proto)
