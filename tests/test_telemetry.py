"""Telemetry providers: JSONL round trip, and OTLP over HTTP and gRPC into real receivers on 127.0.0.1 that decode
the protobuf bodies; a dead collector costs one warning, no exception, no hang."""

import gzip
import json
import logging
import socket
import threading
import warnings
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from megacontext import telemetry as telemetry_module
from megacontext.telemetry import (
    EVENTS,
    JsonlTelemetry,
    NoOpTelemetry,
    OpenTelemetryProvider,
    load_jsonl_events,
    resolve_otel_settings,
    telemetry_from_env,
)

grpc = pytest.importorskip("grpc")
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

SAMPLE_EVENTS = {
    "mc_tree_snapshot": {"session": "s0", "total_tokens": 4096, "block_size": 32, "nodes_per_level": [4096, 128, 4],
                         "backend": "ram"},
    "working_context_snapshot": {"session": "s0", "length": 5, "w_max": 8, "levels": torch.tensor([2, 1, 0, 0, 0]),
                                 "indices": [0, 32, 2048, 2049, 2050]},
    "focus_allocator": {"session": "s0", "expanded": 1, "collapsed": 0, "swap_rate": 0.125, "length_before": 5,
                        "length_after": 36, "residency": 0.9},
    "mc_timing": {"build_ms": 1.5, "positional_ms": 0.25, "lens_ms": 3.0, "step": 7},
    "inference_update": {"session": "chat-1", "prompt_tokens": 900, "working_budget": 512, "latency_ms": 42.0,
                         "generated_tokens": 17, "swap_rate": 0.1, "residency": 0.95, "extra": {"a": 1, "b": "x"}},
}


# ---------------------------------------------------------------------------------------------- receivers


def _any_value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attrs(kvs):
    return {kv.key: _any_value(kv.value) for kv in kvs}


class Receiver:
    """What a collector got: decoded log records and spans."""

    def __init__(self):
        self.logs, self.spans, self.service_names = [], [], set()
        self.lock = threading.Lock()

    def add_logs(self, req: logs_service_pb2.ExportLogsServiceRequest):
        with self.lock:
            for rl in req.resource_logs:
                self.service_names.add(_attrs(rl.resource.attributes).get("service.name"))
                for sl in rl.scope_logs:
                    for rec in sl.log_records:
                        self.logs.append({"event_name": rec.event_name, "body": _any_value(rec.body),
                                          "attributes": _attrs(rec.attributes)})

    def add_spans(self, req: trace_service_pb2.ExportTraceServiceRequest):
        with self.lock:
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        self.spans.append({"name": sp.name, "span_id": sp.span_id, "parent": sp.parent_span_id,
                                           "attributes": _attrs(sp.attributes),
                                           "ms": (sp.end_time_unix_nano - sp.start_time_unix_nano) / 1e6})


@pytest.fixture
def http_collector():
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path == "/v1/logs":
                receiver.add_logs(logs_service_pb2.ExportLogsServiceRequest.FromString(body))
                reply = logs_service_pb2.ExportLogsServiceResponse()
            elif self.path == "/v1/traces":
                receiver.add_spans(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse()
            else:
                self.send_error(404)
                return
            data = reply.SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", receiver
    server.shutdown()
    server.server_close()


@pytest.fixture
def grpc_collector():
    receiver = Receiver()

    class Logs(logs_service_pb2_grpc.LogsServiceServicer):
        def Export(self, request, context):
            receiver.add_logs(request)
            return logs_service_pb2.ExportLogsServiceResponse()

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            receiver.add_spans(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", receiver
    server.stop(grace=None)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class FakeClock:
    """Stands in for the `time` module inside megacontext.telemetry: its clocks move only when the test advances
    them, so span timings and timestamps have exact, known values."""

    def __init__(self):
        self.now = 1000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def perf_counter(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now

    def time_ns(self) -> int:
        return round(self.time() * 1e9)


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(telemetry_module, "time", fake)
    return fake


EXPECTED_TIMINGS = {"build_ms": 10.0, "positional_ms": 2.5, "lens_ms": 0.0}


def _exercise(tel, clock):
    """Emit every documented event plus nested timing spans, the way the controller does; the fake clock moves
    10 ms inside `build` and 2.5 ms inside `positional`."""
    timings = {}
    with tel.span("controller_step", step=7):
        with tel.span("build", into=timings, level=1):
            clock.advance(0.010)
        with tel.span("positional", into=timings):
            clock.advance(0.0025)
        with tel.span("lens", into=timings):
            pass
    for name, fields in SAMPLE_EVENTS.items():
        tel.emit(name, fields)
    return timings


# ---------------------------------------------------------------------------------------------- JSONL / NoOp


def test_event_table_documents_the_design_events():
    assert set(EVENTS) == {"mc_tree_snapshot", "working_context_snapshot", "focus_allocator", "mc_timing",
                           "inference_update"}
    assert set(EVENTS["mc_timing"][0]) == {"build_ms", "positional_ms", "lens_ms"}
    for name, fields in SAMPLE_EVENTS.items():  # the samples are valid events
        assert set(EVENTS[name][0]) <= set(fields)


def test_jsonl_round_trip(tmp_path, clock):
    path = tmp_path / "sub" / "events.jsonl"
    with JsonlTelemetry(str(path)) as tel:
        timings = _exercise(tel, clock)
        tel.emit("custom_event", {"loss": float("nan"), "vec": torch.arange(3), "t": (1, 2)})
        tel.flush()
    events = load_jsonl_events(str(path))
    assert [e["event"] for e in events] == [*SAMPLE_EVENTS, "custom_event"]
    assert all(e["ts"] == pytest.approx(clock.time()) for e in events)  # stamped at emit time
    by_name = {e["event"]: e["fields"] for e in events}
    assert by_name["working_context_snapshot"]["levels"] == [2, 1, 0, 0, 0]  # tensor -> list
    assert by_name["inference_update"]["extra"] == {"a": 1, "b": "x"}
    assert by_name["custom_event"] == {"loss": None, "vec": [0, 1, 2], "t": [1, 2]}  # NaN -> null: strict JSON
    assert timings == pytest.approx(EXPECTED_TIMINGS)
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_jsonl_appends_whole_lines_from_many_threads(tmp_path):
    path = str(tmp_path / "events.jsonl")
    tels = [JsonlTelemetry(path) for _ in range(2)]  # two writers on one file, like two ranks

    def work(i):
        for j in range(100):
            tels[i % 2].emit("mc_timing", {"build_ms": i, "positional_ms": j, "lens_ms": 0.0, "pad": "x" * 500})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tel in tels:
        tel.close()
    events = load_jsonl_events(path)
    assert len(events) == 400
    assert sorted((e["fields"]["build_ms"], e["fields"]["positional_ms"]) for e in events) == \
        sorted((i, j) for i in range(4) for j in range(100))


def test_emit_rejects_bad_input(tmp_path):
    with JsonlTelemetry(str(tmp_path / "e.jsonl")) as tel:
        with pytest.raises(ValueError, match="missing required field"):
            tel.emit("mc_timing", {"build_ms": 1.0})
        with pytest.raises(TypeError, match="telemetry field values"):
            tel.emit("custom", {"obj": object()})
    assert load_jsonl_events(str(tmp_path / "e.jsonl")) == []


def test_emit_after_close_warns_once(tmp_path):
    tel = JsonlTelemetry(str(tmp_path / "e.jsonl"))
    tel.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tel.emit("x", {})
        tel.emit("x", {})
    assert len(caught) == 1 and "after close" in str(caught[0].message)


def test_noop_times_spans_and_accepts_anything(clock):
    tel = NoOpTelemetry()
    timings = _exercise(tel, clock)
    assert timings == pytest.approx(EXPECTED_TIMINGS)
    tel.flush()
    tel.close()


def test_telemetry_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert isinstance(telemetry_from_env(env={}), NoOpTelemetry)
    assert isinstance(telemetry_from_env(env={"MC_TELEMETRY": "none"}), NoOpTelemetry)
    tel = telemetry_from_env(env={"MC_TELEMETRY": f"jsonl:{tmp_path / 'a.jsonl'}"})
    assert isinstance(tel, JsonlTelemetry) and tel.path == str(tmp_path / "a.jsonl")
    tel.close()
    tel = telemetry_from_env(env={"MC_TELEMETRY": "jsonl"})
    assert tel.path == str(tmp_path / "telemetry" / "mc_events.jsonl")
    tel.close()
    with pytest.raises(ValueError, match="MC_TELEMETRY"):
        telemetry_from_env(env={"MC_TELEMETRY": "kafka"})
    port = _closed_port()
    tel = telemetry_from_env(env={"MC_OTEL_ENDPOINT": f"http://127.0.0.1:{port}"})  # endpoint alone -> otel
    assert isinstance(tel, OpenTelemetryProvider)
    tel.close()


def test_resolve_otel_settings():
    s = resolve_otel_settings({})
    assert (s.protocol, s.logs_target, s.traces_target) == ("http", "http://localhost:4318/v1/logs",
                                                            "http://localhost:4318/v1/traces")
    s = resolve_otel_settings({"MC_OTEL_ENDPOINT": "http://tempo:4317"})
    assert (s.protocol, s.logs_target, s.insecure) == ("grpc", "tempo:4317", True)
    assert resolve_otel_settings({"MC_OTEL_ENDPOINT": "grpc://collector"}).logs_target == "collector:4317"
    s = resolve_otel_settings({"MC_OTEL_ENDPOINT": "grpcs://otel.example:443"})
    assert (s.protocol, s.insecure) == ("grpc", False)
    s = resolve_otel_settings({"MC_OTEL_ENDPOINT": "grpcs://otel.example:443", "MC_OTEL_INSECURE": "1"})
    assert s.insecure
    s = resolve_otel_settings({"MC_OTEL_ENDPOINT": "https://otel.example/prefix/v1/logs", "MC_OTEL_TIMEOUT": "0.5"})
    assert (s.protocol, s.traces_target, s.insecure, s.timeout_s) == (
        "http", "https://otel.example/prefix/v1/traces", False, 0.5)
    s = resolve_otel_settings({"MC_OTEL_ENDPOINT": "collector:4317", "MC_OTEL_PROTOCOL": "http/protobuf"})
    assert (s.protocol, s.logs_target) == ("http", "http://collector:4317/v1/logs")
    with pytest.raises(ValueError, match="MC_OTEL_PROTOCOL"):
        resolve_otel_settings({"MC_OTEL_PROTOCOL": "thrift"})
    with pytest.raises(ValueError, match="MC_OTEL_ENDPOINT"):
        resolve_otel_settings({"MC_OTEL_ENDPOINT": "ftp://x:1"})


# ---------------------------------------------------------------------------------------------- OTLP


def _check_received(receiver: Receiver):
    assert receiver.service_names == {"megacontext-test"}
    got = {rec["event_name"]: rec for rec in receiver.logs}
    assert set(got) == set(SAMPLE_EVENTS)
    assert all(rec["body"] == name for name, rec in got.items())
    assert got["mc_timing"]["attributes"] == {"build_ms": 1.5, "positional_ms": 0.25, "lens_ms": 3.0, "step": 7}
    assert got["working_context_snapshot"]["attributes"]["levels"] == [2, 1, 0, 0, 0]
    assert got["mc_tree_snapshot"]["attributes"]["nodes_per_level"] == [4096, 128, 4]
    inf = got["inference_update"]["attributes"]
    assert (inf["session"], inf["prompt_tokens"], inf["extra.a"], inf["extra.b"]) == ("chat-1", 900, 1, "x")
    spans = {sp["name"]: sp for sp in receiver.spans}
    assert set(spans) == {"controller_step", "build", "positional", "lens"}
    for child in ("build", "positional", "lens"):  # nested `span` blocks are child spans
        assert spans[child]["parent"] == spans["controller_step"]["span_id"]
    assert spans["build"]["attributes"] == {"level": 1} and spans["build"]["ms"] >= 0  # the SDK's own clock


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_otlp_round_trip(protocol, http_collector, grpc_collector, monkeypatch, clock):
    endpoint, receiver = http_collector if protocol == "http" else grpc_collector
    monkeypatch.setenv("MC_OTEL_ENDPOINT", endpoint)
    monkeypatch.setenv("MC_OTEL_PROTOCOL", protocol)
    monkeypatch.setenv("MC_OTEL_INSECURE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy collector must cost no warning at all
        tel = OpenTelemetryProvider(service_name="megacontext-test")
        timings = _exercise(tel, clock)
        tel.flush()
        tel.close()
    assert timings == pytest.approx(EXPECTED_TIMINGS)
    _check_received(receiver)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_dead_collector_costs_one_warning_and_no_hang(protocol, monkeypatch, caplog, clock):
    port = _closed_port()
    monkeypatch.setenv("MC_OTEL_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MC_OTEL_PROTOCOL", protocol)
    monkeypatch.setenv("MC_OTEL_TIMEOUT", "1")
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tel = telemetry_from_env(service_name="megacontext-test")
        health = tel._health
        for _ in range(3):
            _exercise(tel, clock)
            tel.flush()
        # the log and the span exporter may each try once; every later batch is dropped without trying
        tries_while_down = health.failures
        assert 1 <= tries_while_down <= 2
        clock.advance(health.retry_after_s + 1)  # the back-off is over: the next batch tries the collector again
        _exercise(tel, clock)
        tel.flush()
        assert health.failures > tries_while_down
        tel.close()
    ours = [w for w in caught if "MegaContext telemetry" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert issubclass(ours[0].category, RuntimeWarning) and f"127.0.0.1:{port}" in str(ours[0].message)
    assert len(caught) == 1, [str(w.message) for w in caught]
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == [], [r.getMessage() for r in noisy]  # the exporter's own retries/errors are not printed
