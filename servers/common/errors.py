"""Domain errors and their gRPC status (with google.rpc rich details).

Application code raises these; the server interceptor turns them into a status with
ErrorInfo / BadRequest / QuotaFailure / RetryInfo details, so every service reports
errors the same way and clients can read them with grpcio-status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "copilot.dev"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    subject: str
    description: str


class CopilotError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = metadata or {}

    def details(self) -> list[Message]:
        return [error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN,
                                            metadata=self.metadata)]

    def to_status(self) -> grpc.Status:
        packed = []
        for detail in self.details():
            any_msg = any_pb2.Any()
            any_msg.Pack(detail)
            packed.append(any_msg)
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)
        return rpc_status.to_status(status)


class Unauthenticated(CopilotError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(CopilotError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class NotFound(CopilotError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(CopilotError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(CopilotError):
    """The system is not in a state the call needs (e.g. a tenant that was never provisioned)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Unavailable(CopilotError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "DEPENDENCY_UNAVAILABLE"


class DeadlineExceeded(CopilotError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class InvalidArgument(CopilotError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, violations: Sequence[FieldViolation] = (), *, reason: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations)

    @classmethod
    def field(cls, name: str, description: str) -> InvalidArgument:
        return cls(f"{name}: {description}", [FieldViolation(name, description)])

    def details(self) -> list[Message]:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in self.violations
        ])
        return [*super().details(), bad]


class MalformedRequest(InvalidArgument):
    """Bytes that do not decode as the RPC's request message (see servers/common/decoding.py).
    The message names only the expected type: nothing of the decoder's error or the bytes."""

    default_reason = "MALFORMED_REQUEST"

    def __init__(self, type_name: str, size: int) -> None:
        super().__init__(f"request is not a valid {type_name}",
                         [FieldViolation("", f"the {size} bytes sent are not a valid {type_name}")],
                         metadata={"message_type": type_name})
        self.type_name = type_name
        self.size = size


class ResourceExhausted(CopilotError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, violations: Sequence[QuotaViolation] = (),
                 retry_after_s: float = 1.0, *, reason: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations)
        self.retry_after_s = max(retry_after_s, 0.0)

    def details(self) -> list[Message]:
        seconds = self.retry_after_s
        delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
        quota = error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
            for v in self.violations
        ])
        return [*super().details(), quota, error_details_pb2.RetryInfo(retry_delay=delay)]


def from_rpc_error(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str, list[object]]:
    """Code, message and decoded rich details of an error a peer returned."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = exc.details() if hasattr(exc, "details") else str(exc)
    decoded: list[object] = []
    # Duck-typed: an AioRpcError is no grpc.Call, but has the code, details and trailers it reads.
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                        error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo):
                if detail.Is(cls.DESCRIPTOR):
                    msg = cls()
                    detail.Unpack(msg)
                    decoded.append(msg)
    return code, message or "", decoded


def quota_refusal_of(exc: grpc.RpcError) -> ResourceExhausted:
    """A peer's RESOURCE_EXHAUSTED as this service's own refusal, with the same message,
    quota violations and retry delay (a service that admits requests for its callers
    reports the refusal itself, naming the caller, rather than passing it through)."""
    _, message, details = from_rpc_error(exc)
    violations = [QuotaViolation(subject=v.subject, description=v.description)
                  for d in details if isinstance(d, error_details_pb2.QuotaFailure) for v in d.violations]
    delays = [d.retry_delay.ToTimedelta().total_seconds()
              for d in details if isinstance(d, error_details_pb2.RetryInfo)]
    return ResourceExhausted(message, violations, retry_after_s=delays[0] if delays else 1.0)


# Codes a peer's error keeps when it crosses a service boundary; others become UNAVAILABLE
# or INTERNAL so a caller is not told a dependency's internals.
PASS_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED,
}
