"""Record schema v1 and the sinks: Parquet datasets, Kafka (OCSF JSON), JSON Lines.

    sink = open_sink("parquet:/data/trace")          # or several: open_sinks([...])
    sink.write(records)   # schema v1 dicts (sinks.schema)
    sink.flush()
    stats = sink.close()  # {"written": ..., "dropped": ..., ...}

Specs:
    parquet:DIR[?batch_rows=N&batch_seconds=S&file_rows=N&file_seconds=S&compression=zstd]
    kafka:HOST:PORT[,HOST:PORT...]/TOPIC[?spill_dir=D&queue_records=N&spill_bytes=N&
          compression=zstd|lz4&linger_ms=N&delivery_timeout_ms=N&security_protocol=SSL&
          ssl_cafile=F&sasl_mechanism=PLAIN&sasl_plain_username=U&sasl_plain_password=P...]
    jsonl:PATH[?format=ocsf|ecs|raw]      jsonl:-  (stdout)
Modules are imported when a sink of their kind is opened, so `import sinks.schema` stays
light.
"""

from __future__ import annotations

import inspect
import urllib.parse
from typing import Any

from sinks.base import Sink, SinkError, SinkStats

__all__ = ["open_sink", "open_sinks", "FanoutSink", "Sink", "SinkError", "SinkStats"]

_BOOLEAN_OPTIONS = {"ssl_check_hostname"}


def _split_options(spec: str, rest: str) -> tuple[str, dict[str, str]]:
    target, _, query = rest.partition("?")
    options: dict[str, str] = {}
    if query:
        for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True,
                                                 strict_parsing=True):
            if key in options:
                raise SinkError(f"sink spec {spec!r}: option {key!r} given twice")
            options[key] = value
    return target, options


def _typed(spec: str, cls: type, options: dict[str, str]) -> dict[str, Any]:
    """Convert option strings to the types of the sink's keyword parameters."""
    parameters = inspect.signature(cls).parameters
    accepts_more = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    typed: dict[str, Any] = {}
    for key, value in options.items():
        parameter = parameters.get(key)
        if parameter is None or parameter.kind is parameter.VAR_KEYWORD:
            if not accepts_more:
                known = sorted(n for n, p in parameters.items()
                               if p.kind is p.KEYWORD_ONLY)
                raise SinkError(f"sink spec {spec!r}: unknown option {key!r} (known: {known})")
            wanted = "bool" if key in _BOOLEAN_OPTIONS else "str"
        else:
            annotation = str(parameter.annotation)
            wanted = next((t for t in ("bool", "int", "float") if t in annotation), "str")
        try:
            if wanted == "bool":
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                typed[key] = value.lower() in ("1", "true", "yes")
            elif wanted == "int":
                typed[key] = int(value, 0)
            elif wanted == "float":
                typed[key] = float(value)
            else:
                typed[key] = value
        except ValueError:
            raise SinkError(f"sink spec {spec!r}: option {key}={value!r} is not a valid "
                            f"{wanted}") from None
    return typed


def open_sink(spec: str):
    """Open one sink from its spec (see the module docstring)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SinkError(f"sink spec {spec!r}: expected parquet:DIR, kafka:HOST:PORT/TOPIC "
                        "or jsonl:PATH|-")
    target, options = _split_options(spec, rest)
    if kind == "parquet":
        from sinks.parquet import ParquetSink
        return ParquetSink(target, **_typed(spec, ParquetSink, options))
    if kind == "jsonl":
        from sinks.jsonl import JsonlSink
        return JsonlSink(target, **_typed(spec, JsonlSink, options))
    if kind == "kafka":
        from sinks.kafka import KafkaSink
        servers, slash, topic = target.partition("/")
        if not slash or not topic or not servers or "/" in topic:
            raise SinkError(f"sink spec {spec!r}: expected kafka:HOST:PORT[,HOST:PORT]/TOPIC")
        for server in servers.split(","):
            host, colon, port = server.rpartition(":")
            if not colon or not host or not port.isdigit():
                raise SinkError(f"sink spec {spec!r}: {server!r} is not HOST:PORT")
        return KafkaSink(servers, topic, **_typed(spec, KafkaSink, options))
    raise SinkError(f"sink spec {spec!r}: unknown sink kind {kind!r} "
                    "(parquet, kafka or jsonl)")


def open_sinks(specs: list[str]) -> "FanoutSink":
    """Open several sinks behind one FanoutSink; on a failure the ones opened are closed."""
    opened: list[tuple[str, Any]] = []
    try:
        for spec in specs:
            opened.append((spec, open_sink(spec)))
    except BaseException:
        for _, sink in opened:
            sink.close()
        raise
    return FanoutSink(opened)


class FanoutSink:
    """Writes every record to several sinks. A failing sink does not stop the others: each
    is tried, then the first error is raised (all of them are in `errors`)."""

    def __init__(self, sinks: list[tuple[str, Any]]) -> None:
        self.sinks = sinks
        self.errors: list[tuple[str, Exception]] = []

    def _each(self, call: str, *args: Any) -> dict[str, Any]:
        results = {}
        failures = []
        for spec, sink in self.sinks:
            try:
                results[spec] = getattr(sink, call)(*args)
            except SinkError as exc:
                failures.append((spec, exc))
        if failures:
            self.errors.extend(failures)
            spec, exc = failures[0]
            others = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise SinkError(f"{spec}: {exc}{others}") from exc
        return results

    def write(self, records: list[dict[str, Any]]) -> None:
        if records:
            from sinks.schema import records_to_batch
            records_to_batch(records)  # a bad record reaches no sink at all
        self._each("write", records)

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> dict[str, dict[str, int]]:
        """Close every sink; returns {spec: stats}."""
        return self._each("close")
