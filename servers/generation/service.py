"""GenerationService: protobuf ↔ pipeline at the boundary."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import duration_pb2
from grpc.aio import ServicerContext

from copilot.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from servers.common.errors import InvalidArgument
from servers.generation.convert import mode_from_proto, mode_to_proto, origin_to_proto, policy_to_proto
from servers.generation.pipeline import AnswerDetails, Pipeline, Question

MAX_QUESTION_CHARS = 4000
MAX_TOP_K = 50
MAX_FILTERS = 16


def to_question(request: generation_pb2.AnswerRequest | generation_pb2.StreamAnswerRequest,
                call_id: str = "") -> Question:
    text = request.question.strip()
    if not text:
        raise InvalidArgument.field("question", "must not be empty")
    if len(text) > MAX_QUESTION_CHARS:
        raise InvalidArgument.field("question", f"must be at most {MAX_QUESTION_CHARS} characters")
    if not 0 <= request.top_k <= MAX_TOP_K:
        raise InvalidArgument.field("top_k", f"must be between 1 and {MAX_TOP_K} (0 for the tenant default)")
    if request.mode not in common_pb2.RetrievalMode.values():
        raise InvalidArgument.field("mode", f"unknown retrieval mode {request.mode}")
    if len(request.filters) > MAX_FILTERS:
        raise InvalidArgument.field("filters", f"at most {MAX_FILTERS} filters")
    if len(request.request_id) > 128:
        raise InvalidArgument.field("request_id", "must be at most 128 characters")
    return Question(text=text, top_k=request.top_k, mode=mode_from_proto(request.mode), filters=dict(request.filters),
                    request_id=request.request_id, call_id=call_id)


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def to_proto(details: AnswerDetails) -> generation_pb2.AnswerDetails:
    latency = _duration(details.latency_s)
    grounding = details.grounding
    return generation_pb2.AnswerDetails(
        citations=[
            common_pb2.Citation(index=c.index, document_id=c.passage.document_id, chunk_id=c.passage.chunk_id,
                                title=c.passage.title, section=c.passage.section, quote=c.quote,
                                score=c.passage.score, source=c.passage.source, access=c.passage.access)
            for c in details.citations
        ],
        usage=common_pb2.TokenUsage(input_tokens=details.input_tokens, output_tokens=details.output_tokens,
                                    total_tokens=details.input_tokens + details.output_tokens,
                                    estimated=details.estimated),
        latency=latency, mode_used=mode_to_proto(details.mode_used),
        degraded=details.degraded, degraded_reason=details.degraded_reason, provider=details.provider,
        model=details.model, request_id=details.request_id,
        pii_masks=[generation_pb2.PiiMask(kind=m.kind, placeholder=m.placeholder) for m in details.pii_masks],
        sub_questions=details.sub_questions, usage_pending=details.usage_pending,
        retrieval_latency=_duration(details.retrieval_s), provider_latency=_duration(details.provider_s),
        spans=[generation_pb2.CitedSpan(citation_index=s.citation, document_id=s.document_id, chunk_id=s.chunk_id,
                                        start=s.start, end=s.end, text=s.text, match_quality=s.quality,
                                        origin=origin_to_proto(s.origin)) for s in grounding.spans],
        sentences=[generation_pb2.SentenceVerdict(start=s.start, end=s.end, citations=s.citations, spans=s.spans,
                                                  supported=s.verdict.supported, support=s.verdict.support,
                                                  issues=s.verdict.issues, removed=s.removed)
                   for s in grounding.sentences],
        groundedness=generation_pb2.Groundedness(score=grounding.score, unsupported_sentences=grounding.unsupported,
                                                 policy=policy_to_proto(grounding.policy), refused=grounding.refused,
                                                 unmatched_quotes=grounding.unmatched_quotes),
    )


# Envoy's id of the client call (it makes one for every request and keeps none a client sent).
REQUEST_ID_HEADER = "x-request-id"


def call_id(context: ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            return value[:128]
    return ""


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def Answer(
        self, request: generation_pb2.AnswerRequest,
        context: ServicerContext[generation_pb2.AnswerRequest, generation_pb2.AnswerResponse],
    ) -> generation_pb2.AnswerResponse:
        parts: list[str] = []
        response = generation_pb2.AnswerResponse()
        async for event in self._pipeline.run(to_question(request, call_id(context))):
            if isinstance(event, str):
                parts.append(event)
            else:
                response.details.CopyFrom(to_proto(event))
        response.answer = "".join(parts)
        return response

    async def StreamAnswer(
        self, request: generation_pb2.StreamAnswerRequest,
        context: ServicerContext[generation_pb2.StreamAnswerRequest, generation_pb2.StreamAnswerResponse],
    ) -> AsyncIterator[generation_pb2.StreamAnswerResponse]:
        async for event in self._pipeline.run(to_question(request, call_id(context))):
            if isinstance(event, str):
                yield generation_pb2.StreamAnswerResponse(delta=event)
            else:
                yield generation_pb2.StreamAnswerResponse(details=to_proto(event))
