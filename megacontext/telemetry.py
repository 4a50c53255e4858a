"""Structured MegaContext telemetry: one small interface, three backends, never a reason for a run to fail.

    tel = telemetry_from_env(service_name="megacontext-train")   # MC_TELEMETRY=jsonl:PATH | otel | none
    timings = {}
    with tel.span("build", into=timings): ...                      # timings["build_ms"] = wall ms
    with tel.span("positional", into=timings): ...
    with tel.span("lens", into=timings): ...
    tel.emit("mc_timing", {**timings, "step": step})
    tel.flush(); tel.close()

Providers:
- `NoOpTelemetry`: drops events; spans still time (so callers can log timings elsewhere, e.g. W&B).
- `JsonlTelemetry(path)`: one JSON object per line, `{"ts": unix_seconds, "event": name, "fields": {...}}`. Each line
  is a single `write()` on an O_APPEND descriptor, so concurrent writers (ranks, processes) never interleave
  inside a line; lines are visible at once (`tail -f`), `flush()` fsyncs.
- `OpenTelemetryProvider`: OTLP over HTTP (protobuf) or gRPC. Events become OTel **log records** (event_name and
  body = the event name, attributes = the fields, nested dicts flattened to dotted keys): events are
  point-in-time records, which is what the OTel log/event data model is for, and a log pipeline (Loki, OpenSearch)
  can query every field. `span()` additionally exports a real OTel **span** per timed section, so a trace backend
  (Tempo) shows controller timing as spans. Exports are batched on a background thread, so `emit` never waits on
  the network.

Failure policy: a dead or rejecting collector costs exactly ONE `RuntimeWarning` per provider (carrying the
exporter's reason), never an exception and never a hang: exports time out after `MC_OTEL_TIMEOUT` seconds
(default 2), and after a failure the provider drops batches without trying for `retry_after_s` (default 30) before
trying again. The OTLP exporters' own log lines are captured for that one warning instead of being printed.
JSONL write errors (disk full...) likewise cost one warning. Bad *input* (an unknown MC_TELEMETRY value, a known
event missing a documented field, a field of an unsupported type) raises, so such bugs surface in tests.

Environment: MC_TELEMETRY (`jsonl:PATH`, `jsonl` = $NANOCHAT_BASE_DIR/telemetry/mc_events.jsonl, `otel`, `none`;
unset = `otel` if MC_OTEL_ENDPOINT is set, else `none`), MC_OTEL_ENDPOINT (default http://localhost:4318),
MC_OTEL_PROTOCOL (`grpc` | `http`; unset: `grpc` for grpc:// or grpcs:// URLs or port 4317, else `http`),
MC_OTEL_INSECURE (1: gRPC over a plaintext channel / HTTPS without certificate verification), MC_OTEL_TIMEOUT.
"""

import atexit
import json
import logging
import math
import os
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from urllib.parse import urlparse

__all__ = ["EVENTS", "JsonlTelemetry", "NoOpTelemetry", "OpenTelemetryProvider", "OtelSettings", "TelemetryProvider",
           "load_jsonl_events", "resolve_otel_settings", "telemetry_from_env"]

# The MegaContext telemetry events: name -> (required fields, optional fields), each field -> meaning. `emit` checks the
# required ones are present; any extra field is allowed and passed through.
EVENTS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "mc_tree_snapshot": (
        {"session": "training sample or chat session id",
         "total_tokens": "tokens ingested into the tree so far (T)",
         "block_size": "K, children per gist",
         "nodes_per_level": "list: number of complete nodes at level 0, 1, ..., max_level"},
        {"backend": "'ram' or 'disk'", "step": "training step", "max_level": "highest level built"}),
    "working_context_snapshot": (
        {"session": "id", "length": "W, entries in the WC", "w_max": "the WC budget",
         "levels": "list[W]: level of every entry, in order", "indices": "list[W]: node index of every entry"},
        {"tokens_covered": "T, tokens the WC covers", "level_counts": "list: entries per level", "step": "step",
         "positions": "list[W]: rotary positions fed to the model", "scheme": "position scheme"}),
    "focus_allocator": (
        {"session": "id", "expanded": "expand edits applied", "collapsed": "collapse edits applied",
         "swap_rate": "edits / WC length", "length_before": "W before the edits", "length_after": "W after"},
        {"residency": "share of entries unchanged since the last refocus", "iterations": "allocator passes",
         "score_mean": "mean LensNet score", "step": "step"}),
    "mc_timing": (
        {"build_ms": "tree build (GistNet) wall ms", "positional_ms": "positions + rotary tables wall ms",
         "lens_ms": "LensNet + allocator wall ms"},
        {"step": "step", "session": "id", "total_ms": "whole controller call wall ms",
         "allocator_ms": "allocator alone"}),
    "inference_update": (
        {"session": "chat session id", "prompt_tokens": "tokens in the prompt / history ingested",
         "working_budget": "W_max", "latency_ms": "wall ms for this reply"},
        {"generated_tokens": "tokens generated", "wc_length": "W after the reply", "swap_rate": "edits / W",
         "residency": "share of WC entries unchanged", "tokens_per_s": "decode speed",
         "refocuses": "refocus passes during the reply"}),
}


def check_event_fields(event: str, fields: dict) -> None:
    """ValueError if a documented event lacks a required field (a bug in the caller, surfaced by tests)."""
    if not isinstance(event, str) or not event:
        raise ValueError(f"event name must be a non-empty string, got {event!r}")
    if event in EVENTS:
        missing = [k for k in EVENTS[event][0] if k not in fields]
        if missing:
            raise ValueError(f"telemetry event {event!r} is missing required field(s) {missing}; "
                             f"see megacontext.telemetry.EVENTS")


class TelemetryProvider(ABC):
    """The interface every backend implements. Usable as a context manager (closes on exit)."""

    def emit(self, event: str, fields: dict | None = None) -> None:
        """Record one event. Known events (EVENTS) must carry their required fields; values may be numbers,
        strings, bools, None, lists/tuples/dicts of those, or tensors/arrays (anything with `.tolist()`)."""
        fields = dict(fields or {})
        check_event_fields(event, fields)
        self._emit(event, {k: plain(v) for k, v in fields.items()})

    @contextmanager
    def span(self, name: str, into: dict | None = None, **attributes):
        """Time the block (host wall clock; synchronize CUDA first if you want device time) and store
        `into[name + "_ms"]`. Backends with spans also export one named `name` carrying `attributes`
        (nested `span` blocks become child spans)."""
        t0 = time.perf_counter()
        with self._span_scope(name, attributes):
            try:
                yield
            finally:
                if into is not None:
                    into[f"{name}_ms"] = (time.perf_counter() - t0) * 1000.0

    timer = span  # same thing, for call sites that read better as "timer"

    @abstractmethod
    def _emit(self, event: str, fields: dict) -> None: ...

    def _span_scope(self, name: str, attributes: dict):
        """Backends without a span concept only time (the mc_timing event carries the numbers)."""
        return nullcontext()

    @abstractmethod
    def flush(self) -> None:
        """Push buffered events out (bounded by the export timeout)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release resources; idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NoOpTelemetry(TelemetryProvider):
    def emit(self, event: str, fields: dict | None = None) -> None:
        return None  # zero cost: no validation, no conversion (no tensor -> host copies)

    def _emit(self, event: str, fields: dict) -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


class JsonlTelemetry(TelemetryProvider):
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()
        self._warned = False

    def _emit(self, event: str, fields: dict) -> None:
        line = json.dumps({"ts": time.time(), "event": event, "fields": fields}, allow_nan=False) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            if self._fd is None:
                self._warn_once(f"event {event!r} emitted after close(); dropped")
                return
            try:
                written = os.write(self._fd, data)  # one write per line: O_APPEND keeps concurrent lines whole
            except OSError as e:
                self._warn_once(f"cannot append to {self.path} ({e}); telemetry events are being dropped")
                return
            if written != len(data):
                self._warn_once(f"short write to {self.path} (disk full?); a telemetry line is truncated")

    def flush(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                except OSError as e:
                    self._warn_once(f"cannot fsync {self.path} ({e})")

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"MegaContext telemetry: {message}", RuntimeWarning, stacklevel=3)


def load_jsonl_events(path: str) -> list[dict]:
    """Read back a JsonlTelemetry file: a list of {"ts", "event", "fields"} dicts (a torn last line is skipped)."""
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                events.append(json.loads(line))
    return events


# ----------------------------------------------------------------------------------------------------------------
# OpenTelemetry


@dataclass(frozen=True)
class OtelSettings:
    endpoint: str  # as configured (for messages)
    protocol: str  # "http" | "grpc"
    insecure: bool
    timeout_s: float
    logs_target: str  # full URL (http) or host:port (grpc)
    traces_target: str


def resolve_otel_settings(env=None) -> OtelSettings:
    """MC_OTEL_* environment -> OtelSettings (see the module docstring for the rules)."""
    env = os.environ if env is None else env
    endpoint = env.get("MC_OTEL_ENDPOINT") or "http://localhost:4318"
    url = urlparse(endpoint if "://" in endpoint else "http://" + endpoint)
    if url.scheme not in ("http", "https", "grpc", "grpcs") or not url.hostname:
        raise ValueError(f"MC_OTEL_ENDPOINT must look like http://host:4318 or grpc://host:4317, got {endpoint!r}")
    port = url.port
    protocol = (env.get("MC_OTEL_PROTOCOL") or "").strip().lower()
    if protocol in ("http", "http/protobuf"):
        protocol = "http"
    elif protocol == "":
        protocol = "grpc" if url.scheme in ("grpc", "grpcs") or port == 4317 else "http"
    elif protocol != "grpc":
        raise ValueError(f"MC_OTEL_PROTOCOL must be 'grpc' or 'http' (http/protobuf), got {protocol!r}")
    tls = url.scheme in ("https", "grpcs")
    insecure = _truthy(env.get("MC_OTEL_INSECURE", "")) or not tls
    try:
        timeout_s = float(env.get("MC_OTEL_TIMEOUT") or 2.0)
    except ValueError as e:
        raise ValueError(f"MC_OTEL_TIMEOUT must be seconds, got {env.get('MC_OTEL_TIMEOUT')!r}") from e
    if protocol == "grpc":
        hostport = url.netloc if port is not None else f"{url.hostname}:{443 if tls else 4317}"
        return OtelSettings(endpoint, protocol, insecure, timeout_s, hostport, hostport)
    base = f"{'https' if tls else 'http'}://{url.netloc}{_strip_signal_path(url.path)}"
    return OtelSettings(endpoint, protocol, insecure, timeout_s, base + "/v1/logs", base + "/v1/traces")


def _strip_signal_path(path: str) -> str:
    path = path.rstrip("/")
    for suffix in ("/v1/logs", "/v1/traces"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


class OpenTelemetryProvider(TelemetryProvider):
    """OTLP exporter pair (logs for events, traces for spans) with the one-warning failure policy."""

    def __init__(self, settings: OtelSettings | None = None, service_name: str = "megacontext",
                 retry_after_s: float = 30.0, schedule_delay_ms: int = 1000):
        self.settings = settings or resolve_otel_settings()
        self._health = CollectorHealth(self.settings.endpoint, retry_after_s)
        self._pipeline = _OtelPipeline(self.settings, service_name, self._health, schedule_delay_ms)
        self._closed = False

    def _emit(self, event: str, fields: dict) -> None:
        if not self._closed:
            self._pipeline.emit_log(event, otel_attributes(fields))

    def _span_scope(self, name: str, attributes: dict):
        if self._closed:
            return nullcontext()
        attrs = otel_attributes({k: plain(v) for k, v in attributes.items()})
        return self._pipeline.tracer.start_as_current_span(name, attributes=attrs)

    def flush(self) -> None:
        if not self._closed:
            self._pipeline.flush(int(self.settings.timeout_s * 1000) + 1000)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pipeline.shutdown()


class CollectorHealth:
    """Shared by the log and span exporters of one provider: warn once, then back off while the collector is down."""

    def __init__(self, endpoint: str, retry_after_s: float):
        self.endpoint = endpoint
        self.retry_after_s = retry_after_s
        self.warned = False
        self.failures = 0
        self._down_until = 0.0
        self._lock = threading.Lock()

    def should_skip(self) -> bool:
        return time.monotonic() < self._down_until

    def succeeded(self) -> None:
        self._down_until = 0.0

    def failed(self, detail: str = "") -> None:
        with self._lock:
            self.failures += 1
            self._down_until = time.monotonic() + self.retry_after_s
            if self.warned:
                return
            self.warned = True
        reason = detail or _EXPORTER_LOGS.last or "export failed"
        warnings.warn(f"MegaContext telemetry: OTLP export to {self.endpoint} failed ({reason}); events are dropped "
                      f"while the collector is unreachable (retrying every {self.retry_after_s:g}s, no further "
                      f"warnings). The run continues.", RuntimeWarning, stacklevel=2)


class _GuardedExporter:
    """Wraps an OTLP log or span exporter for the SDK's batch processor: skips batches while the collector is known
    to be down (so a dead collector costs no time), and reports every outcome to CollectorHealth."""

    def __init__(self, inner, health: CollectorHealth, success, failure):
        self.inner, self.health, self.success, self.failure = inner, health, success, failure

    def export(self, batch):
        if self.health.should_skip():
            return self.failure
        try:
            result = self.inner.export(batch)
        except Exception as e:  # a transport/encoding error must not kill the export thread: one warning, go on
            self.health.failed(f"{type(e).__name__}: {e}")
            return self.failure
        if result == self.success:
            self.health.succeeded()
        else:
            self.health.failed()
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.inner.shutdown()


class _ExporterLogCapture(logging.Filter):
    """Swallows what the OTLP exporters log (they log every failed attempt, with retries) and keeps the latest
    message for CollectorHealth's single warning. Installed while at least one provider is open."""

    LOGGERS = ("opentelemetry.exporter.otlp.proto.http._log_exporter",
               "opentelemetry.exporter.otlp.proto.http.trace_exporter",
               "opentelemetry.exporter.otlp.proto.http._common",
               "opentelemetry.exporter.otlp.common.http",
               "opentelemetry.exporter.otlp.proto.grpc.exporter",
               "opentelemetry.exporter.otlp.proto.grpc._log_exporter",
               "opentelemetry.exporter.otlp.proto.grpc.trace_exporter")

    def __init__(self):
        super().__init__()
        self.recent = deque(maxlen=2)  # e.g. the transient error (with its cause), then the final give-up line
        self._users = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        self.recent.append(record.getMessage()[:300])
        return False

    @property
    def last(self) -> str:
        return " / ".join(self.recent)

    def acquire(self) -> None:
        with self._lock:
            self._users += 1
            if self._users == 1:
                for name in self.LOGGERS:
                    logging.getLogger(name).addFilter(self)

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for name in self.LOGGERS:
                    logging.getLogger(name).removeFilter(self)


_EXPORTER_LOGS = _ExporterLogCapture()


class _OtelPipeline:
    """LoggerProvider + TracerProvider, each with a batch processor around a guarded OTLP exporter."""

    def __init__(self, settings: OtelSettings, service_name: str, health: CollectorHealth, schedule_delay_ms: int):
        from opentelemetry._logs import SeverityNumber
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExportResult
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

        log_exporter, span_exporter = _otlp_exporters(settings)
        resource = Resource.create({"service.name": service_name})
        self.severity = SeverityNumber.INFO
        self.loggers = LoggerProvider(resource=resource, shutdown_on_exit=False)
        guarded_logs = _GuardedExporter(log_exporter, health, LogRecordExportResult.SUCCESS,
                                        LogRecordExportResult.FAILURE)
        self.loggers.add_log_record_processor(BatchLogRecordProcessor(guarded_logs,
                                                                      schedule_delay_millis=schedule_delay_ms))
        self.logger = self.loggers.get_logger("megacontext")
        self.tracers = TracerProvider(resource=resource, shutdown_on_exit=False)
        guarded_spans = _GuardedExporter(span_exporter, health, SpanExportResult.SUCCESS, SpanExportResult.FAILURE)
        self.tracers.add_span_processor(BatchSpanProcessor(guarded_spans, schedule_delay_millis=schedule_delay_ms))
        self.tracer = self.tracers.get_tracer("megacontext")
        _EXPORTER_LOGS.acquire()
        self._open = True
        atexit.register(self.shutdown)  # buffered events still go out if the caller never closes

    def emit_log(self, event: str, attributes: dict) -> None:
        self.logger.emit(timestamp=time.time_ns(), severity_number=self.severity, severity_text="INFO", body=event,
                         attributes=attributes, event_name=event)

    def flush(self, timeout_ms: int) -> None:
        self.loggers.force_flush(timeout_ms)
        self.tracers.force_flush(timeout_ms)

    def shutdown(self) -> None:
        if not self._open:
            return
        self._open = False
        atexit.unregister(self.shutdown)
        self.loggers.shutdown()
        self.tracers.shutdown()
        _EXPORTER_LOGS.release()


def _otlp_exporters(settings: OtelSettings):
    """(log exporter, span exporter) for the configured protocol, with the short timeout."""
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return (OTLPLogExporter(endpoint=settings.logs_target, insecure=settings.insecure, timeout=settings.timeout_s),
                OTLPSpanExporter(endpoint=settings.traces_target, insecure=settings.insecure,
                                 timeout=settings.timeout_s))
    import requests
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    session = requests.Session()
    if settings.insecure and settings.logs_target.startswith("https://"):
        session.verify = False  # MC_OTEL_INSECURE=1 over HTTPS: the user chose to skip certificate checks
        from urllib3.exceptions import InsecureRequestWarning

        warnings.simplefilter("ignore", InsecureRequestWarning)  # ...so don't warn about it on every export
    return (OTLPLogExporter(endpoint=settings.logs_target, timeout=settings.timeout_s, session=session),
            OTLPSpanExporter(endpoint=settings.traces_target, timeout=settings.timeout_s, session=session))


# ----------------------------------------------------------------------------------------------------------------
# Value conversion


def plain(value):
    """Tensors/arrays/tuples -> plain JSON-able Python; non-finite floats -> None (strict JSON has no NaN)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return plain(value.tolist())
    raise TypeError(f"telemetry field values must be numbers, strings, bools, None, lists, dicts or tensors; "
                    f"got {type(value).__name__}")


def otel_attributes(fields: dict, prefix: str = "") -> dict:
    """Plain fields -> OTel attribute dict: nested dicts flattened to dotted keys, None dropped (OTel has no null),
    homogeneous lists of primitives kept, anything else (nested/mixed lists) as a JSON string."""
    out = {}
    for key, value in fields.items():
        name = prefix + key
        if isinstance(value, dict):
            out.update(otel_attributes(value, name + "."))
        elif value is None:
            continue
        elif isinstance(value, list):
            out[name] = _otel_sequence(value)
        else:
            out[name] = value
    return out


def _otel_sequence(values: list):
    for kind in (bool, str):
        if all(isinstance(v, kind) for v in values):
            return values
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return values
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values]
    return json.dumps(values)


# ----------------------------------------------------------------------------------------------------------------
# Choosing a provider


def telemetry_from_env(service_name: str = "megacontext", env=None) -> TelemetryProvider:
    """Provider named by MC_TELEMETRY (see the module docstring). If `otel` is asked for but the OpenTelemetry
    packages are missing, warn (naming the install command) and return NoOpTelemetry."""
    env = os.environ if env is None else env
    choice = (env.get("MC_TELEMETRY") or "").strip()
    if choice == "":
        choice = "otel" if env.get("MC_OTEL_ENDPOINT") else "none"
    kind, _, arg = choice.partition(":")
    kind = kind.lower()
    if kind in ("none", "noop", "off", "0"):
        return NoOpTelemetry()
    if kind == "jsonl":
        if not arg:
            from nanochat.common import get_base_dir

            arg = os.path.join(get_base_dir(), "telemetry", "mc_events.jsonl")
        return JsonlTelemetry(arg)
    if kind == "otel":
        settings = resolve_otel_settings(env)
        try:
            return OpenTelemetryProvider(settings, service_name=service_name)
        except ImportError as e:
            warnings.warn(f"MegaContext telemetry: MC_TELEMETRY=otel but OpenTelemetry is not installed ({e}); "
                          "install it with `uv pip install opentelemetry-sdk opentelemetry-exporter-otlp`. "
                          "Telemetry is OFF for this run.", RuntimeWarning, stacklevel=2)
            return NoOpTelemetry()
    raise ValueError(f"MC_TELEMETRY must be 'jsonl:PATH', 'jsonl', 'otel' or 'none', got {choice!r}")
