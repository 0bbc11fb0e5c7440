"""A local fake of the Stripe API endpoints billing uses, for the real `stripe` SDK.

Customers (create, delete), Billing Meters (list, create), Billing Meter Events (create,
with identifiers enforced unique like Stripe does), meter event summaries, and
Idempotency-Key replay of successful POSTs. Faults can be queued: a status to answer
with, either before doing anything (a 429 or 503) or after applying the request (a 500
whose response was lost), to prove that nothing is lost or doubled.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlparse


@dataclass
class Fault:
    status: int
    after_apply: bool = False
    retry_after: float | None = None


@dataclass
class StripeState:
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    meters: dict[str, dict[str, Any]] = field(default_factory=dict)
    # identifier → event
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotent: dict[tuple[str, str], tuple[int, dict[str, Any]]] = field(default_factory=dict)
    faults: deque[Fault] = field(default_factory=deque)
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0

    def new_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter:08d}"

    def totals(self, customer: str, event_name: str) -> int:
        return sum(int(e["payload"]["value"]) for e in self.events.values()
                   if e["event_name"] == event_name and e["payload"]["stripe_customer_id"] == customer)


def _nest(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (a[b][c]=v) back into nested dicts."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _error(status: int, code: str, message: str, kind: str = "invalid_request_error") -> tuple[int, dict[str, Any]]:
    return status, {"error": {"type": kind, "code": code, "message": message}}


class Handler(BaseHTTPRequestHandler):
    state: StripeState

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.send_header("request-id", f"req_{time.monotonic_ns()}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        length = int(self.headers.get("content-length") or 0)
        body = _nest(parse_qsl(self.rfile.read(length).decode(), keep_blank_values=True)) if length else {}
        query = _nest(parse_qsl(url.query))
        if not (self.headers.get("authorization") or "").startswith("Bearer sk_"):
            self._send(*_error(401, "unauthorized", "no API key", "authentication_error"))
            return
        state = self.state
        key = self.headers.get("idempotency-key")
        with state.lock:
            state.requests.append((method, url.path))
            fault = state.faults.popleft() if state.faults else None
            if fault is not None and not fault.after_apply:
                headers = {"retry-after": str(fault.retry_after)} if fault.retry_after is not None else {}
                self._send(*_error(fault.status, "rate_limit" if fault.status == 429 else "api_error",
                                   "injected fault", "api_error"), headers)
                return
            if method == "POST" and key and (url.path, key) in state.idempotent:
                status, response = state.idempotent[(url.path, key)]
                self._send(status, response, {"idempotent-replayed": "true"})
                return
            status, response = self._route(method, url.path, body, query)
            if fault is not None:  # applied, but the answer is lost
                self._send(*_error(fault.status, "api_error", "injected fault after apply", "api_error"))
                return
            if method == "POST" and key and status < 400:
                state.idempotent[(url.path, key)] = (status, response)
        self._send(status, response)

    def _route(self, method: str, path: str, body: dict[str, Any], query: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        state = self.state
        parts = path.strip("/").split("/")
        if parts[:2] == ["v1", "customers"]:
            if method == "POST" and len(parts) == 2:
                cid = state.new_id("cus")
                customer = {"id": cid, "object": "customer", "name": body.get("name"),
                            "metadata": body.get("metadata", {})}
                state.customers[cid] = customer
                return 200, customer
            if method == "DELETE" and len(parts) == 3:
                if state.customers.pop(parts[2], None) is None:
                    return _error(404, "resource_missing", f"No such customer: '{parts[2]}'")
                return 200, {"id": parts[2], "object": "customer", "deleted": True}
        if parts[:3] == ["v1", "billing", "meters"]:
            if len(parts) == 3 and method == "GET":
                return 200, {"object": "list", "url": "/v1/billing/meters", "has_more": False,
                             "data": list(state.meters.values())}
            if len(parts) == 3 and method == "POST":
                mid = state.new_id("mtr")
                meter = {"id": mid, "object": "billing.meter", "event_name": body["event_name"],
                         "display_name": body.get("display_name"), "status": "active"}
                state.meters[mid] = meter
                return 200, meter
            if len(parts) == 5 and parts[4] == "event_summaries" and method == "GET":
                found = state.meters.get(parts[3])
                if found is None:
                    return _error(404, "resource_missing", "No such meter")
                start, end = int(query["start_time"]), int(query["end_time"])
                value = sum(float(e["payload"]["value"]) for e in state.events.values()
                            if e["event_name"] == found["event_name"]
                            and e["payload"]["stripe_customer_id"] == query["customer"]
                            and start <= int(e["timestamp"]) < end)
                summary = {"id": f"mtrusg_{parts[3]}_{start}", "object": "billing.meter_event_summary",
                           "aggregated_value": value, "start_time": start, "end_time": end, "meter": parts[3],
                           "livemode": False}
                return 200, {"object": "list", "has_more": False, "data": [summary],
                             "url": path}
        if parts == ["v1", "billing", "meter_events"] and method == "POST":
            ident = body.get("identifier") or state.new_id("evt")
            if ident in state.events:
                return _error(400, "resource_already_exists",
                              f"An event already exists with identifier {ident}.")
            payload = body.get("payload", {})
            if payload.get("stripe_customer_id") not in state.customers:
                return _error(400, "resource_missing", "No such customer")
            if int(payload.get("value", "-1")) < 0:
                return _error(400, "parameter_invalid", "value must be a non-negative integer")
            event = {"object": "billing.meter_event", "event_name": body["event_name"], "identifier": ident,
                     "payload": payload, "timestamp": int(body.get("timestamp") or time.time()),
                     "created": int(time.time()), "livemode": False}
            state.events[ident] = event
            return 200, event
        return _error(404, "resource_missing", f"Unrecognized request URL ({method}: {path})")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


class FakeStripe:
    def __init__(self) -> None:
        self.state = StripeState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeStripe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
