"""The load suite's generator and statistics (bench/load.py, bench/loadsuite.py), so they
cannot rot: percentiles, the open-loop schedule, latency from the scheduled send time, the
closed loop, the mix's construction and the suite's options. Loopback only, a few seconds."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench import loadsuite
from bench.load import (
    CLIENT_BACKLOG,
    Call,
    MixSpec,
    Outcome,
    closed_loop,
    merge,
    open_loop,
    percentile,
    result_of,
    schedule,
    summarize,
)

SLOW = "/bench.Test/Slow"
STREAM = "/bench.Test/Stream"
FAIL = "/bench.Test/Fail"


def test_percentile_matches_statistics_inclusive_quantiles() -> None:
    values = sorted([0.3, 0.1, 0.7, 0.2, 0.9, 0.5, 0.4, 0.8, 0.6, 1.0, 0.05])
    q = statistics.quantiles(values, n=100, method="inclusive")
    for pct in (1, 50, 90, 99):
        assert percentile(values, pct) == pytest.approx(q[pct - 1])
    assert percentile(values, 0) == values[0] and percentile(values, 100) == values[-1]
    assert percentile([2.0], 99) == 2.0
    assert percentile([], 50) != percentile([], 50)  # NaN: no sample
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_summarize_counts_successes_and_errors_apart() -> None:
    s = summarize("Answer", [0.010, 0.020, 0.030, 0.040], {"UNAVAILABLE": 2}, duration_s=2.0)
    assert s.ok == 4 and s.error_count == 2 and s.rps == 2.0
    assert s.p50_ms == pytest.approx(25.0) and s.max_ms == pytest.approx(40.0) and s.mean_ms == pytest.approx(25.0)


def test_schedule_is_a_constant_rate_with_staggered_phases() -> None:
    times = schedule(100, 1.0, start=5.0)
    assert len(times) == 100 and times[0] == 5.0
    assert all(b - a == pytest.approx(0.01) for a, b in itertools.pairwise(times))
    # Two senders at half the rate, half a period apart, interleave into the full rate.
    a, b = schedule(50, 1.0, phase=0.0), schedule(50, 1.0, phase=0.5)
    assert sorted(a + b) == pytest.approx(schedule(100, 1.0))
    assert schedule(0, 1.0) == [] and schedule(10, 0) == []
    assert all(t < 1.0 for t in schedule(3, 1.0, phase=0.9))
    with pytest.raises(ValueError):
        schedule(10, 1.0, phase=1.0)


def test_a_mix_is_either_open_or_closed_loop() -> None:
    call = Call("x", SLOW, b"", ())
    with pytest.raises(ValueError):
        MixSpec(target="127.0.0.1:1", calls=(call,), duration_s=1, concurrency=1, rate=10)
    with pytest.raises(ValueError):
        MixSpec(target="127.0.0.1:1", calls=(call,), duration_s=1)
    with pytest.raises(ValueError):
        MixSpec(target="127.0.0.1:1", calls=(), duration_s=1, rate=10)


def test_merge_and_result_group_by_label() -> None:
    one = Outcome(latencies={"A": [0.01]}, errors={"B": {"UNAVAILABLE": 1}}, max_send_lag_s=0.002)
    two = Outcome(latencies={"A": [0.03], "B": [0.02]}, errors={"B": {"UNAVAILABLE": 2, "INTERNAL": 1}})
    spec = MixSpec(target="127.0.0.1:1", calls=(Call("A", SLOW, b"", ()),), duration_s=1.0, rate=10)
    result = result_of(spec, merge([one, two]))
    assert result.by_label["A"].ok == 2 and result.by_label["B"].errors == {"UNAVAILABLE": 3, "INTERNAL": 1}
    assert result.total.ok == 3 and result.total.error_count == 4 and result.max_send_lag_s == 0.002


class _Server:
    """A loopback server that serves one call at a time (each takes `service_s`)."""

    def __init__(self, service_s: float) -> None:
        self.service_s = service_s
        self.calls = 0
        self._one = asyncio.Lock()

    def handlers(self) -> grpc.GenericRpcHandler:
        identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731

        async def slow(request: bytes, context: Any) -> bytes:
            async with self._one:
                self.calls += 1
                await asyncio.sleep(self.service_s)
            return request

        async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            self.calls += 1
            for _ in range(3):
                yield request

        async def fail(request: bytes, context: Any) -> bytes:
            self.calls += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no")
            return b""

        return grpc.method_handlers_generic_handler("bench.Test", {
            "Slow": grpc.unary_unary_rpc_method_handler(slow, identity, identity),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, identity, identity),
            "Fail": grpc.unary_unary_rpc_method_handler(fail, identity, identity),
        })


async def _serve(service_s: float) -> tuple[grpc.aio.Server, _Server, str]:
    state = _Server(service_s)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((state.handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, state, f"127.0.0.1:{port}"


async def test_open_loop_sends_on_schedule_and_measures_from_the_scheduled_time() -> None:
    server, state, target = await _serve(service_s=0.03)
    try:
        # 30 calls scheduled over 0.3 s to a server that takes 30 ms each, one at a time: the
        # last one cannot finish before 30 x 30 ms = 0.9 s after the first was due, although
        # it was due at 0.29 s, so its latency (from its due time) is at least 0.6 s. A
        # generator that waited for answers (coordinated omission) would report ~30 ms.
        spec = MixSpec(target=target, calls=(Call("slow", SLOW, b"x", ()),), duration_s=0.3, warmup_s=0.0,
                       rate=100, timeout_s=5)
        outcome = await open_loop(spec, rate=100, phase=0.0, offset=0)
    finally:
        await server.stop(None)
    latencies = sorted(outcome.latencies["slow"])
    assert len(latencies) == 30 and state.calls == 30 and not outcome.errors
    assert latencies[-1] >= 0.6


async def test_open_loop_counts_a_full_backlog_as_errors() -> None:
    server, _state, target = await _serve(service_s=0.2)
    try:
        spec = MixSpec(target=target, calls=(Call("slow", SLOW, b"x", ()),), duration_s=0.1, warmup_s=0.0,
                       rate=100, timeout_s=5, max_in_flight=2)
        outcome = await open_loop(spec, rate=100, phase=0.0, offset=0)
    finally:
        await server.stop(None)
    assert outcome.errors["slow"][CLIENT_BACKLOG] >= 1
    assert len(outcome.latencies.get("slow", [])) + outcome.errors["slow"][CLIENT_BACKLOG] == 10


async def test_closed_loop_cycles_the_mix_and_reads_streams_to_the_end() -> None:
    server, _state, target = await _serve(service_s=0.0)
    try:
        calls = (Call("unary", SLOW, b"x", ()), Call("stream", STREAM, b"y", (), streaming=True),
                 Call("refused", FAIL, b"z", ()))
        spec = MixSpec(target=target, calls=calls, duration_s=0.3, warmup_s=0.05, concurrency=2, timeout_s=5)
        outcome = await closed_loop(spec, concurrency=2, offset=0)
    finally:
        await server.stop(None)
    assert outcome.latencies["unary"] and outcome.latencies["stream"]
    assert set(outcome.errors) == {"refused"} and set(outcome.errors["refused"]) == {"RESOURCE_EXHAUSTED"}


def test_each_tenant_has_its_own_corpus_and_the_mix_spreads_over_tenants() -> None:
    a, b = loadsuite.tenant_corpus("load-0000"), loadsuite.tenant_corpus("load-0001")
    assert [d.text for d in a] == [d.text for d in loadsuite.tenant_corpus("load-0000")]  # deterministic
    assert {d.text for d in a}.isdisjoint({d.text for d in b})
    assert loadsuite.tenant_ids(8, 11) == ["load-0008", "load-0009", "load-0010"]

    class Issuer:
        def mint(self, tenant: str, subject: str, roles: list[str], ttl_s: int = 3600) -> str:
            return f"token-of-{tenant}"

    tenants = loadsuite.tenant_ids(0, 5)
    calls = loadsuite.build_calls(Issuer(), tenants, loadsuite.MIX)
    assert len(calls) == 5 * sum(share for _, share in loadsuite.MIX)
    # The first calls of the cycle come from every tenant in turn.
    assert [c.metadata[0][1] for c in calls[:5]] == [f"Bearer token-of-{t}" for t in tenants]
    labels = [c.label for c in calls]
    assert {label: labels.count(label) for label in set(labels)} == {k: 5 * v for k, v in loadsuite.MIX}
    assert all(c.streaming == (c.label == "StreamAnswer") for c in calls)


def test_the_sustained_rate_needs_p99_no_errors_and_the_calls_answered() -> None:
    spec = MixSpec(target="t", calls=(Call("A", SLOW, b"", ()),), duration_s=1.0, rate=100)
    good = result_of(spec, Outcome(latencies={"A": [0.01] * 100}, errors={}))
    slow = result_of(spec, Outcome(latencies={"A": [0.01] * 90 + [0.2] * 10}, errors={}))
    failing = result_of(spec, Outcome(latencies={"A": [0.01] * 99}, errors={"A": {"UNAVAILABLE": 1}}))
    short = result_of(spec, Outcome(latencies={"A": [0.01] * 50}, errors={}))
    assert loadsuite.passes(good, 100)
    assert not loadsuite.passes(slow, 100) and not loadsuite.passes(failing, 100)
    assert not loadsuite.passes(short, 100)


def test_quick_options_are_small_and_bounded() -> None:
    opts = loadsuite.parse(["--quick", "--out", "", "--env", "COPILOT_AUDIT=0", "--embedder", "hash"])
    assert opts.quick and opts.tenants <= 10 and max(opts.curve) <= 20 and opts.soak_minutes <= 0.5
    assert opts.out is None and opts.env == {"COPILOT_AUDIT": "0", "COPILOT_EMBEDDER": "hash"}
    full = loadsuite.parse([])
    assert full.tenants == 100 and full.curve == (10, 100, 1000) and full.soak_minutes == 10
    with pytest.raises(SystemExit):
        loadsuite.parse(["--env", "NOEQUALS"])


def test_the_search_goes_up_until_a_failure_and_down_when_the_start_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    capacity = {"value": 60.0}

    def fake_open(target: str, calls: tuple[Call, ...], rate: float, duration_s: float, warmup_s: float,
                  processes: int) -> Any:
        spec = MixSpec(target=target, calls=calls, duration_s=duration_s, rate=rate)
        latency = 0.01 if rate <= capacity["value"] else 0.5
        return result_of(spec, Outcome(latencies={"A": [latency] * int(rate * duration_s)}, errors={}))

    monkeypatch.setattr(loadsuite, "run_open", fake_open)
    monkeypatch.setattr("bench.loadsuite.time.sleep", lambda s: None)
    calls = (Call("A", SLOW, b"", ()),)
    up = loadsuite.find_sustained("t", calls, 50, 25, 1.0, 0.0, 10, 1, lambda s: None)
    assert [s.rate for s in up.steps] == [50, 75, 62] and up.sustained is not None and up.sustained.rate == 50
    capacity["value"] = 20.0
    down = loadsuite.find_sustained("t", calls, 50, 25, 1.0, 0.0, 10, 1, lambda s: None, refine=False)
    assert [s.rate for s in down.steps] == [50, 25, 12] and down.sustained is not None and down.sustained.rate == 12


def test_the_report_keeps_the_notes_below_the_marker(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text(f"# old results\n\n{loadsuite.NOTES_MARKER}\n\n## Notes\n\nhand-written\n")
    report = loadsuite.Report(machine={}, options=loadsuite.parse(["--quick", "--out", str(out)]))
    report.lines = ["# new results"]
    loadsuite.write_report(report)
    text = out.read_text()
    assert text.startswith("# new results") and "old results" not in text
    assert text.endswith("## Notes\n\nhand-written\n") and text.count(loadsuite.NOTES_MARKER) == 1
