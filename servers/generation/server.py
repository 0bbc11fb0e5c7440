"""The generation server process."""

from __future__ import annotations

import grpc

from copilot.v1 import generation_pb2_grpc, metering_pb2_grpc, retrieval_pb2_grpc, tenant_pb2_grpc
from servers.common.lifecycle import Service, connect
from servers.common.settings import Settings
from servers.generation.pipeline import Pipeline
from servers.generation.providers import ExtractiveProvider, Provider
from servers.generation.service import GenerationServicer
from servers.generation.tenant_config import TenantConfigCache


def build(settings: Settings) -> Service:
    retrieval_channel = connect(settings.address("retrieval"))
    metering_channel = connect(settings.address("metering"))
    extractive = ExtractiveProvider()
    providers: dict[str, Provider] = {extractive.name: extractive}
    pipeline = Pipeline(
        retrieval=retrieval_pb2_grpc.RetrievalServiceStub(retrieval_channel),
        metering=metering_pb2_grpc.MeteringServiceStub(metering_channel),
        configs=TenantConfigCache(tenant_pb2_grpc.TenantServiceStub(metering_channel),
                                  ttl_s=settings.tenant_cache_ttl_s),
        providers=providers,
    )

    def register(server: grpc.aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(pipeline), server)

    async def close() -> None:
        await retrieval_channel.close(None)
        await metering_channel.close(None)

    return Service(
        name="generation",
        port=settings.generation_port,
        service_names=["copilot.v1.GenerationService"],
        register=register,
        dependencies={
            "retrieval": _channel_ready(retrieval_channel),
            "metering": _channel_ready(metering_channel),
        },
        on_stop=[close],
    )


def _channel_ready(channel: grpc.aio.Channel):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        state = channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.READY:
            return True
        try:
            await channel.channel_ready()  # bounded by the health loop's timeout
        except Exception:
            return False
        return True

    return check
