"""The generation server process."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from copilot.v1 import generation_pb2_grpc, tenant_pb2_grpc
from servers.common.audit import AuditTrail
from servers.common.lifecycle import Service, connect_peer
from servers.common.outbox.replicas import ReplicaOutboxes
from servers.common.settings import Settings
from servers.generation.clients import MeteringClient, QuestionAuditor, RetrievalClient, UsageRecorder
from servers.generation.config import GenerationConfig
from servers.generation.llm import AnthropicProvider, OpenAIProvider
from servers.generation.pipeline import Pipeline
from servers.generation.providers import ExtractiveProvider, Provider
from servers.generation.resilience import Breakers
from servers.generation.service import GenerationServicer
from servers.generation.tenant_config import TenantConfigCache

USAGE_OUTBOX = "usage-outbox"
AUDIT_OUTBOX = "audit-outbox"


def build(settings: Settings, config: GenerationConfig | None = None) -> Service:
    config = config or GenerationConfig.from_env()
    # The SDKs' HTTP client logs every request at INFO: one line per provider call is noise.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    retrieval_channel = connect_peer(settings, "retrieval")
    metering_channel = connect_peer(settings, "metering")
    extractive = ExtractiveProvider()
    providers: dict[str, Provider] = {extractive.name: extractive}
    llms: list[OpenAIProvider | AnthropicProvider] = []
    openai_settings, anthropic_settings = config.openai, config.anthropic
    if openai_settings.configured:
        llms.append(OpenAIProvider(openai_settings))
    if anthropic_settings.configured:
        llms.append(AnthropicProvider(anthropic_settings))
    for llm in llms:
        providers[llm.name] = llm
    configs = TenantConfigCache(tenant_pb2_grpc.TenantServiceStub(metering_channel), ttl_s=settings.tenant_cache_ttl_s)
    metering = MeteringClient(metering_channel)
    outboxes = ReplicaOutboxes(settings, "generation", [USAGE_OUTBOX, AUDIT_OUTBOX])
    usage = UsageRecorder(metering, outboxes.directory / USAGE_OUTBOX)
    # COPILOT_AUDIT=0 only for the benchmark's comparison: the audit trail is on in any deployment.
    audit = AuditTrail("generation", metering_channel, outboxes.directory / AUDIT_OUTBOX) \
        if settings.audit_enabled else None
    pipeline = Pipeline(
        retrieval=RetrievalClient(retrieval_channel),
        metering=metering,
        usage=usage,
        configs=configs,
        providers=providers,
        breakers=Breakers(),
        audit=QuestionAuditor(audit) if audit is not None else None,
    )

    def register(server: grpc.aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(pipeline), server)

    async def close() -> None:
        await configs.stop()
        await usage.stop()
        if audit is not None:
            await audit.stop()
        for llm in llms:
            await llm.close()
        await retrieval_channel.close(None)
        await metering_channel.close(None)

    return Service(
        name="generation",
        port=settings.port("generation"),
        service_names=["copilot.v1.GenerationService"],
        register=register,
        dependencies={
            "retrieval": _channel_ready(retrieval_channel),
            "metering": _channel_ready(metering_channel),
        },
        # The replica's outbox directory claimed (and orphans adopted) before the outboxes replay.
        on_start=[outboxes.open, usage.start, configs.start, *([audit.start] if audit is not None else [])],
        on_refusal=audit.refused if audit is not None else None,
        on_stop=[outboxes.close, close],
    )


def _channel_ready(channel: grpc.aio.Channel) -> Callable[[], Awaitable[bool]]:
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
