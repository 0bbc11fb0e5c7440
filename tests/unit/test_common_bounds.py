"""Bounds on what one client may cost a server: the stream limiter on its own, then the
bounds interceptor on a real grpc.aio server (behind the identity interceptor, as every
service runs it) with test servicers of the real contracts."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from copilot.v1 import (
    audit_pb2,
    generation_pb2,
    generation_pb2_grpc,
    metering_pb2,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
)
from servers.common.bounds import METHOD_SIZES, BoundsServerInterceptor, StreamLimiter, request_limit
from servers.common.channels import server_options
from servers.common.errors import ResourceExhausted, from_rpc_error
from servers.common.interceptors import IdentityServerInterceptor, remaining_deadline
from servers.common.settings import BOUNDS_ENV, Bounds, Settings


def who(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("x-tenant-id", tenant), ("x-user-id", "u1"), ("x-roles", "admin"))


# -- the limiter on its own


def test_limiter_caps_each_tenant_and_the_server_and_counts_back_to_zero() -> None:
    limiter = StreamLimiter(per_tenant=2, total=3)
    a1, a2 = limiter.acquire("tenant-a"), limiter.acquire("tenant-a")
    with pytest.raises(ResourceExhausted) as refused:
        limiter.acquire("tenant-a")
    assert refused.value.reason == "TOO_MANY_STREAMS"
    assert "COPILOT_MAX_STREAMS_PER_TENANT=2" in refused.value.message
    details = refused.value.details()
    quota = next(d for d in details if isinstance(d, error_details_pb2.QuotaFailure))
    assert quota.violations[0].subject == "tenant:tenant-a"
    assert any(isinstance(d, error_details_pb2.RetryInfo) for d in details)
    # Another tenant still gets a stream, until the server's own cap.
    b1 = limiter.acquire("tenant-b")
    with pytest.raises(ResourceExhausted) as full:
        limiter.acquire("tenant-c")
    assert full.value.reason == "SERVER_STREAMS_EXHAUSTED"
    assert (limiter.open_streams("tenant-a"), limiter.open_streams("tenant-b"), limiter.open_streams()) == (2, 1, 3)
    # Released once however often the exit paths release it.
    a1.release()
    a1.release()
    assert limiter.open_streams("tenant-a") == 1 and limiter.open_streams() == 2
    for slot in (a2, b1):
        slot.release()
    assert limiter.open_streams() == 0 and limiter.open_streams("tenant-a") == 0
    limiter.acquire("tenant-c").release()


def test_every_rpc_of_the_contracts_has_a_size_chosen_for_it() -> None:
    methods = {f"/{service.full_name}/{method.name}"
               for module in (audit_pb2, generation_pb2, metering_pb2, retrieval_pb2, tenant_pb2)
               for service in module.DESCRIPTOR.services_by_name.values() for method in service.methods}
    assert methods == set(METHOD_SIZES)
    bounds = Bounds()
    assert request_limit(bounds, "/copilot.v1.RetrievalService/Search") == bounds.query_request_bytes
    assert request_limit(bounds, "/copilot.v1.RetrievalService/IngestDocuments") == bounds.ingest_request_bytes
    assert request_limit(bounds, "/copilot.v1.TenantService/CreateTenant") == bounds.default_request_bytes
    # Queries are the smallest, ingest batches the largest; gRPC's own cap is the largest.
    assert bounds.query_request_bytes < bounds.default_request_bytes < bounds.ingest_request_bytes
    assert dict(server_options(bounds))["grpc.max_receive_message_length"] == bounds.ingest_request_bytes


def test_bounds_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COPILOT_MAX_STREAMS_PER_TENANT", "3")
    monkeypatch.setenv("COPILOT_INGEST_IDLE_S", "2.5")
    bounds = Settings.from_env().bounds
    assert bounds.streams_per_tenant == 3 and bounds.ingest_idle_s == 2.5
    # What a child process is given reads back the same.
    for env, value in bounds.env().items():
        monkeypatch.setenv(env, value)
    assert Bounds.from_env() == bounds
    assert set(bounds.env()) == set(BOUNDS_ENV.values())
    monkeypatch.setenv("COPILOT_MAX_STREAMS_PER_SERVER", "0")
    with pytest.raises(ValueError, match="COPILOT_MAX_STREAMS_PER_SERVER"):
        Bounds.from_env()


# -- the interceptor on a real server


class Retrieval(retrieval_pb2_grpc.RetrievalServiceServicer):
    def __init__(self) -> None:
        self.search_sleep_s = 0.0
        self.remaining: list[float | None] = []

    async def Search(self, request: retrieval_pb2.SearchRequest,
                     context: grpc.aio.ServicerContext) -> retrieval_pb2.SearchResponse:
        self.remaining.append(remaining_deadline())
        await asyncio.sleep(self.search_sleep_s)
        return retrieval_pb2.SearchResponse()

    async def StreamIngestDocuments(
            self, request_iterator: AsyncIterator[retrieval_pb2.StreamIngestDocumentsRequest],
            context: grpc.aio.ServicerContext) -> AsyncIterator[retrieval_pb2.StreamIngestDocumentsResponse]:
        done = 0
        async for request in request_iterator:
            done += len(request.documents)
            yield retrieval_pb2.StreamIngestDocumentsResponse(documents_done=done)


class Generation(generation_pb2_grpc.GenerationServiceServicer):
    """StreamAnswer by the question: "wait" never answers, "fail" fails after one delta,
    "flood" sends `flood` deltas of 64 KiB, anything else one delta."""

    def __init__(self) -> None:
        self.flood = 2000
        self.produced = 0
        self.started = asyncio.Event()

    async def StreamAnswer(self, request: generation_pb2.StreamAnswerRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.StreamAnswerResponse]:
        self.started.set()
        if request.question == "wait":
            await asyncio.Event().wait()
        if request.question == "flood":
            for _ in range(self.flood):
                self.produced += 1
                yield generation_pb2.StreamAnswerResponse(delta="x" * 65536)
            return
        yield generation_pb2.StreamAnswerResponse(delta="hello")
        if request.question == "fail":
            raise RuntimeError("the model fell over")


@dataclasses.dataclass
class Rig:
    limiter: StreamLimiter
    retrieval: Retrieval
    generation: Generation
    search: Any
    ingest: Any
    answer: Any


@pytest.fixture
async def make_rig() -> AsyncIterator[Any]:
    started: list[tuple[grpc.aio.Server, grpc.aio.Channel]] = []

    async def make(**bounds: Any) -> Rig:
        b = dataclasses.replace(Bounds(), **bounds)
        limiter = StreamLimiter(b.streams_per_tenant, b.streams_per_server)
        server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False),
                                               BoundsServerInterceptor(b, limiter)], options=server_options(b))
        retrieval, generation = Retrieval(), Generation()
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(retrieval, server)
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(generation, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel))
        r = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        g = generation_pb2_grpc.GenerationServiceStub(channel)
        return Rig(limiter, retrieval, generation, r.Search, r.StreamIngestDocuments, g.StreamAnswer)

    yield make
    for server, channel in started:
        await channel.close(None)
        await server.stop(None)


async def _error(call: Any) -> tuple[grpc.StatusCode, str, list[object]]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return from_rpc_error(info.value)


def _reason(details: list[object]) -> str:
    return next(d.reason for d in details if isinstance(d, error_details_pb2.ErrorInfo))


async def _drain(call: Any) -> list[Any]:
    return [message async for message in call]


async def _until(condition: Callable[[], bool]) -> None:
    """Waits (2 s at most) for something the server does just after the client sees a call end."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()


async def _released(limiter: StreamLimiter) -> None:
    await _until(lambda: limiter.open_streams() == 0)


async def test_an_oversized_query_is_refused_naming_its_limit(make_rig: Any) -> None:
    rig = await make_rig(query_request_bytes=1024)
    ok = retrieval_pb2.SearchRequest(query="x" * 1000)
    assert ok.ByteSize() <= 1024
    await rig.search(ok, metadata=who("tenant-a"), timeout=5)
    code, message, details = await _error(rig.search(retrieval_pb2.SearchRequest(query="x" * 1100),
                                                     metadata=who("tenant-a"), timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 1024 bytes (COPILOT_MAX_QUERY_REQUEST_BYTES)" in message
    assert _reason(details) == "MESSAGE_TOO_LARGE"
    assert not any(isinstance(d, error_details_pb2.RetryInfo) for d in details)
    # The same size is fine where the RPC's limit is larger (a stream message of an upload).
    call = rig.ingest(metadata=who("tenant-a"), timeout=5)
    await call.write(retrieval_pb2.StreamIngestDocumentsRequest(documents=[retrieval_pb2.Document(text="x" * 1100)]))
    assert (await call.read()).documents_done == 1
    await call.done_writing()
    # grpc-stubs does not declare grpc.aio.EOF (it exists at run time).
    assert await call.read() == grpc.aio.EOF  # type: ignore[attr-defined]


async def test_an_oversized_upload_message_ends_the_stream(make_rig: Any) -> None:
    rig = await make_rig(ingest_stream_message_bytes=2048)
    batches = [retrieval_pb2.StreamIngestDocumentsRequest(documents=[retrieval_pb2.Document(text="x" * n)])
               for n in (100, 3000)]
    call = rig.ingest(iter(batches), metadata=who("tenant-a"), timeout=5)
    code, message, _ = await _error(_drain(call))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "StreamIngestDocuments request message" in message and "COPILOT_MAX_INGEST_STREAM_MESSAGE_BYTES" in message
    await _released(rig.limiter)


async def test_a_tenant_over_its_stream_limit_is_refused_while_another_gets_streams(make_rig: Any) -> None:
    rig = await make_rig(streams_per_tenant=2, streams_per_server=3)
    # Nothing is sent on a waiting stream: reading it in the background opens it.
    held = [rig.answer(generation_pb2.StreamAnswerRequest(question="wait"), metadata=who("tenant-a"), timeout=30)
            for _ in range(2)]
    readers = [asyncio.ensure_future(call.read()) for call in held]
    await _until(lambda: rig.limiter.open_streams("tenant-a") == 2)
    code, message, details = await _error(_drain(
        rig.answer(generation_pb2.StreamAnswerRequest(question="hi"), metadata=who("tenant-a"), timeout=5)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant tenant-a already has 2 open streams" in message
    assert _reason(details) == "TOO_MANY_STREAMS"
    quota = next(d for d in details if isinstance(d, error_details_pb2.QuotaFailure))
    assert quota.violations[0].subject == "tenant:tenant-a"
    assert any(isinstance(d, error_details_pb2.RetryInfo) for d in details)
    # Another tenant still streams; a third takes the server's last slot, a fourth finds none.
    b = await _drain(rig.answer(generation_pb2.StreamAnswerRequest(question="hi"), metadata=who("tenant-b"), timeout=5))
    assert b[0].delta == "hello"
    third = rig.answer(generation_pb2.StreamAnswerRequest(question="wait"), metadata=who("tenant-c"), timeout=30)
    readers.append(asyncio.ensure_future(third.read()))
    await _until(lambda: rig.limiter.open_streams() == 3)
    code, _, details = await _error(_drain(
        rig.answer(generation_pb2.StreamAnswerRequest(question="hi"), metadata=who("tenant-d"), timeout=5)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and _reason(details) == "SERVER_STREAMS_EXHAUSTED"
    for call in [*held, third]:
        call.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await _released(rig.limiter)


async def test_a_stream_slot_is_released_on_every_exit_path(make_rig: Any) -> None:
    rig = await make_rig(streams_per_tenant=1)
    tenant = who("tenant-a")
    # Normal end.
    assert len(await _drain(rig.answer(generation_pb2.StreamAnswerRequest(question="hi"), metadata=tenant))) == 1
    await _released(rig.limiter)
    # The handler fails.
    code, _, _ = await _error(_drain(rig.answer(generation_pb2.StreamAnswerRequest(question="fail"),
                                                metadata=tenant, timeout=5)))
    assert code == grpc.StatusCode.INTERNAL
    await _released(rig.limiter)
    # The client cancels while the handler waits.
    rig.generation.started.clear()
    call = rig.answer(generation_pb2.StreamAnswerRequest(question="wait"), metadata=tenant, timeout=30)
    await rig.generation.started.wait()
    assert rig.limiter.open_streams("tenant-a") == 1
    call.cancel()
    await _released(rig.limiter)
    # The client's deadline passes.
    code, _, _ = await _error(_drain(rig.answer(generation_pb2.StreamAnswerRequest(question="wait"),
                                                metadata=tenant, timeout=0.3)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    await _released(rig.limiter)
    # The client goes away while its upload is open (and one while it is ingesting).
    upload = rig.ingest(metadata=tenant, timeout=30)
    await upload.write(retrieval_pb2.StreamIngestDocumentsRequest())
    await upload.read()
    upload.cancel()
    await _released(rig.limiter)
    # After all that the tenant's one stream is free.
    assert len(await _drain(rig.answer(generation_pb2.StreamAnswerRequest(question="hi"), metadata=tenant))) == 1


async def test_an_idle_upload_is_ended_with_deadline_exceeded(make_rig: Any) -> None:
    rig = await make_rig(ingest_idle_s=0.3)
    call = rig.ingest(metadata=who("tenant-a"), timeout=30)
    await call.write(retrieval_pb2.StreamIngestDocumentsRequest(documents=[retrieval_pb2.Document(text="a")]))
    assert (await call.read()).documents_done == 1
    # ... and then the client sends nothing more.
    code, message, details = await _error(call.read())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no message on this StreamIngestDocuments stream for 0.3 s (COPILOT_INGEST_IDLE_S)" in message
    assert _reason(details) == "STREAM_IDLE"
    await _released(rig.limiter)


async def test_calls_without_a_deadline_get_the_servers_maximum(make_rig: Any) -> None:
    rig = await make_rig(max_call_s=0.3, max_stream_s=0.3)
    rig.retrieval.search_sleep_s = 0.6
    code, message, details = await _error(rig.search(retrieval_pb2.SearchRequest(query="q"), metadata=who("tenant-a")))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "without a client deadline" in message and "COPILOT_MAX_CALL_S" in message
    assert _reason(details) == "SERVER_MAX_DURATION"
    # The cap is the deadline its outgoing calls get too.
    remaining = rig.retrieval.remaining[-1]
    assert remaining is not None and 0 < remaining <= 0.3
    # A client's own deadline, even a longer one, is the client's choice.
    await rig.search(retrieval_pb2.SearchRequest(query="q"), metadata=who("tenant-a"), timeout=10)
    assert (rig.retrieval.remaining[-1] or 0) > 0.3
    code, message, _ = await _error(_drain(rig.answer(generation_pb2.StreamAnswerRequest(question="wait"),
                                                      metadata=who("tenant-a"))))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "COPILOT_MAX_STREAM_S" in message
    await _released(rig.limiter)


async def test_a_client_that_stops_reading_holds_a_bounded_amount_and_is_ended(make_rig: Any) -> None:
    rig = await make_rig(stream_send_timeout_s=0.5)
    call = rig.answer(generation_pb2.StreamAnswerRequest(question="flood"), metadata=who("tenant-a"), timeout=30)
    await call.initial_metadata()
    # The client reads nothing: flow control stops the handler after a window's worth.
    for _ in range(3):
        await asyncio.sleep(0.5)
    produced = rig.generation.produced
    assert 0 < produced < rig.generation.flood // 4, produced
    assert rig.limiter.open_streams("tenant-a") == 1
    # When it reads again it gets what was sent, then the reason the stream ended.
    received = 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            received += 1
    code, message, details = from_rpc_error(info.value)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "took no message for 0.5 s (COPILOT_STREAM_SEND_TIMEOUT_S)" in message
    assert _reason(details) == "SLOW_CONSUMER"
    assert received < rig.generation.flood
    await _released(rig.limiter)
