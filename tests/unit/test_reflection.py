"""Server reflection as grpcurl and ghz use it (servers/common/reflection.py): every listed
service resolves, methods resolve to their file (ghz asks for `pkg.Service.Method`), under
both reflection names. A real grpc.aio server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest as Request
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionResponse as Response

from servers.common.reflection import V1, V1ALPHA, add_reflection


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    add_reflection(server, ["grpc.health.v1.Health"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await server.stop(None)


async def ask(channel: grpc.aio.Channel, service: str, *requests: Request) -> list[Response]:
    call = channel.stream_stream(f"/{service}/ServerReflectionInfo", request_serializer=Request.SerializeToString,
                                 response_deserializer=Response.FromString)(None, timeout=10)
    answers = []
    for request in requests:
        await call.write(request)
        answers.append(await call.read())
    await call.done_writing()
    return answers


def files(response: Response) -> list[descriptor_pb2.FileDescriptorProto]:
    assert not response.HasField("error_response"), response.error_response
    return [descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in response.file_descriptor_response.file_descriptor_proto]


@pytest.mark.parametrize("service", [V1ALPHA, V1])
async def test_every_listed_service_resolves_to_its_file(channel: grpc.aio.Channel, service: str) -> None:
    (listed,) = await ask(channel, service, Request(list_services=""))
    names = [s.name for s in listed.list_services_response.service]
    assert {"grpc.health.v1.Health", V1ALPHA, V1} <= set(names)
    for name, response in zip(names, await ask(channel, service, *(Request(file_containing_symbol=n) for n in names)),
                              strict=True):
        package, _, short = name.rpartition(".")
        (file, *_) = files(response)
        assert file.package == package and short in {s.name for s in file.service}, (name, file.name)


@pytest.mark.parametrize("method", ["grpc.health.v1.Health.Check", f"{V1}.ServerReflectionInfo"])
async def test_a_method_symbol_resolves_to_the_file_of_its_service(channel: grpc.aio.Channel, method: str) -> None:
    (response,) = await ask(channel, V1, Request(file_containing_symbol=method))
    service, _, name = method.rpartition(".")
    (file, *_) = files(response)
    declared = {f"{file.package}.{s.name}.{m.name}" for s in file.service for m in s.method}
    assert method in declared, (service, name, declared)


@pytest.mark.parametrize("symbol", ["grpc.health.v1.Health.NoSuchMethod", "grpc.health.v1.NoSuchService.Check",
                                    "grpc.health.v1.HealthCheckRequest.no_such_field"])
async def test_an_unknown_symbol_is_not_found(channel: grpc.aio.Channel, symbol: str) -> None:
    (response,) = await ask(channel, V1, Request(file_containing_symbol=symbol))
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_a_field_symbol_resolves_to_the_file_of_its_message(channel: grpc.aio.Channel) -> None:
    (response,) = await ask(channel, V1, Request(file_containing_symbol="grpc.health.v1.HealthCheckRequest.service"))
    (file, *_) = files(response)
    assert "HealthCheckRequest" in {m.name for m in file.message_type}
