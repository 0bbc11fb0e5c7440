"""Server reflection that grpcurl and ghz can use.

Python's stock reflection answers `file_containing_symbol` only for messages, services
and enums; ghz and some grpcurl versions ask for a method (`pkg.Service.Method`) and get
NOT_FOUND. This servicer resolves methods (and fields/enum values) to their file, and
is served under both the v1alpha and the v1 reflection names (same wire format).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer
from grpc_reflection.v1alpha.reflection_pb2_grpc import add_ServerReflectionServicer_to_server

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"


class SymbolReflectionServicer(ReflectionServicer):
    def _file_containing_symbol(self, request, fully_qualified_name):  # type: ignore[no-untyped-def]
        response = super()._file_containing_symbol(request, fully_qualified_name)
        if not response.HasField("error_response"):
            return response
        parent, _, _member = fully_qualified_name.rpartition(".")
        if not parent:
            return response
        pool = self._pool
        for find in (pool.FindServiceByName, pool.FindMessageTypeByName, pool.FindEnumTypeByName):
            try:
                owner = find(parent)
            except KeyError:
                continue
            return super()._file_containing_symbol(request, owner.full_name)
        return response


def add_reflection(server: grpc.aio.Server, service_names: Iterable[str],
                   pool: descriptor_pool.DescriptorPool | None = None) -> None:
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
