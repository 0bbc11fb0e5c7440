"""Server reflection that grpcurl and ghz can use.

Python's stock reflection answers `file_containing_symbol` only for messages, services
and enums; ghz and some grpcurl versions ask for a method (`pkg.Service.Method`) and get
NOT_FOUND. This servicer resolves methods (and fields/enum values) to their file, and
is served under both the v1alpha and the v1 reflection names (same wire format). Every
name it lists resolves: grpcio-reflection ships only the v1alpha schema, so the v1 one is
derived from it and added to the pool (grpcurl and ghz `list`/`describe` it like any other).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer
from grpc_reflection.v1alpha.reflection_pb2_grpc import add_ServerReflectionServicer_to_server

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


class SymbolReflectionServicer(ReflectionServicer):
    def _file_containing_symbol(self, request: reflection_pb2.ServerReflectionRequest,
                                fully_qualified_name: str) -> reflection_pb2.ServerReflectionResponse:
        response: reflection_pb2.ServerReflectionResponse = super()._file_containing_symbol(
            request, fully_qualified_name)
        if not response.HasField("error_response"):
            return response
        parent, _, member = fully_qualified_name.rpartition(".")
        if not parent:
            return response
        pool = self._pool
        members: tuple[tuple[Any, Callable[[Any], Iterable[str]]], ...] = (
            (pool.FindServiceByName, lambda d: d.methods_by_name),
            (pool.FindMessageTypeByName, lambda d: (*d.fields_by_name, *d.oneofs_by_name)),
            (pool.FindEnumTypeByName, lambda d: d.values_by_name),
        )
        for find, names in members:
            try:
                owner = find(parent)
            except KeyError:
                continue
            if member in names(owner):
                found: reflection_pb2.ServerReflectionResponse = super()._file_containing_symbol(
                    request, owner.full_name)
                return found
        return response


def _add_v1_schema(pool: descriptor_pool.DescriptorPool) -> None:
    """grpc.reflection.v1 into `pool`: v1alpha's file under the v1 package (v1 changed
    only the package), so the name the servicer lists can be described."""
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old, new = f".{file.package}.", ".grpc.reflection.v1."
    file.name, file.package = V1_FILE, "grpc.reflection.v1"
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new, 1)
    for method in file.service[0].method:
        method.input_type = method.input_type.replace(old, new, 1)
        method.output_type = method.output_type.replace(old, new, 1)
    pool.Add(file)


def add_reflection(server: grpc.aio.Server, service_names: Iterable[str],
                   pool: descriptor_pool.DescriptorPool | None = None) -> None:
    _add_v1_schema(pool or descriptor_pool.Default())
    names = sorted({*service_names, V1ALPHA, V1})
    servicer = SymbolReflectionServicer(names, pool=pool)
    add_ServerReflectionServicer_to_server(servicer, server)
    # v1 is wire-identical to v1alpha: serve the same handler under the v1 name.
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1, {"ServerReflectionInfo": handler}),)
    )
