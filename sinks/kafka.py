"""Kafka sink: one OCSF JSON event per message, keyed by VM id, never losing silently.

* Each record becomes one UTF-8 OCSF 1.5 JSON message (sinks.ocsf) with key = vm_id (so one
  VM's events stay in order on one partition) and headers `vmitrace-schema-version`,
  `ocsf-version` and `ocsf-class-uid`. The producer is kafka-python's with idempotent delivery
  (acks=all), zstd (or lz4) compression and large linger batches.
* kafka-python's send() never blocks on memory, so the sink bounds what is in flight itself:
  at most `queue_records` messages sent and not yet acknowledged. Beyond that, and whenever
  the broker cannot be reached (no producer, metadata timeouts, deliveries failing with
  retriable errors), messages go to an on-disk spill journal (sinks.spill) under `spill_dir`.
  While the journal holds anything, new messages are appended behind it so a VM's order is
  kept; when the broker answers again the journal is replayed first.
* When even the journal is full (`spill_bytes`) messages are dropped and counted per VM; so
  are messages the broker refuses for good (non-retriable errors). Each such loss is reported
  as a loss record (kind=loss, counter "kafka.dropped" / "kafka.failed") sent as soon as the
  broker takes messages again.
* Delivery is at least once: a message whose delivery timed out is spilled and sent again,
  and if the broker had in fact stored it, it appears twice (same metadata.uid). A process
  killed while the journal was being replayed re-sends from the last committed position.
* flush() returns when everything accepted is either acknowledged by the broker or in the
  journal on disk (fsynced). close() flushes, closes the producer and returns the stats;
  whatever is left in the journal is replayed by the next sink opened on the same spill_dir.
"""

from __future__ import annotations

import collections
import os
import re
import time
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaConfigurationError, KafkaError

from sinks.base import SinkError, SinkStats
from sinks.ocsf import OCSF_VERSION, to_ocsf_json
from sinks.schema import SCHEMA_VERSION, classify, loss_record, records_to_batch
from sinks.spill import SpillJournal

# Settings passed to kafka-python's producer as they are (TLS, SASL, client identity).
SECURITY_OPTIONS = frozenset({
    "security_protocol", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password",
    "ssl_crlfile", "ssl_ciphers", "ssl_check_hostname", "sasl_mechanism",
    "sasl_plain_username", "sasl_plain_password", "sasl_kerberos_name",
    "sasl_kerberos_service_name", "sasl_kerberos_domain_name", "client_id",
})
_LOSS_RESERVE = 1 << 20  # journal bytes beyond spill_bytes kept for loss records
_PROBE = 1  # messages sent from the journal to find out whether the broker is back


def default_spill_dir(bootstrap: str, topic: str) -> Path:
    cache = Path(os.environ.get("VMITRACE_CACHE", Path.home() / ".cache" / "vmitrace"))
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{bootstrap}_{topic}")
    return cache / "kafka-spill" / name


class KafkaSink:
    def __init__(self, bootstrap_servers: str, topic: str, *,
                 spill_dir: str | os.PathLike | None = None,
                 queue_records: int = 65536, spill_bytes: int = 1 << 30,
                 compression: str = "zstd", linger_ms: int = 20, batch_size: int = 1 << 20,
                 delivery_timeout_ms: int = 120_000, request_timeout_ms: int = 30_000,
                 max_block_ms: int = 2000, reconnect_seconds: float = 5.0,
                 commit_seconds: float = 1.0, **options: Any) -> None:
        unknown = set(options) - SECURITY_OPTIONS
        if unknown:
            raise SinkError(f"kafka sink: unknown option(s) {sorted(unknown)}; "
                            f"known: {sorted(SECURITY_OPTIONS)}")
        if compression not in ("zstd", "lz4", "gzip", "snappy", "none"):
            raise SinkError(f"kafka sink: unsupported compression {compression!r}")
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.queue_records = queue_records
        self.reconnect_seconds = reconnect_seconds
        self.commit_seconds = commit_seconds
        self._producer_config = dict(
            bootstrap_servers=bootstrap_servers.split(","), enable_idempotence=True,
            acks="all", compression_type=None if compression == "none" else compression,
            linger_ms=linger_ms, batch_size=batch_size, max_block_ms=max_block_ms,
            delivery_timeout_ms=delivery_timeout_ms, request_timeout_ms=request_timeout_ms,
            bootstrap_timeout_ms=max(max_block_ms, 1000), max_request_size=4 << 20,
            reconnect_backoff_max_ms=2000,
            **{"client_id": "vmitrace", **options})
        self.stats = SinkStats()
        self.spill = SpillJournal(spill_dir or default_spill_dir(bootstrap_servers, topic),
                                  spill_bytes)
        # (future, key, class_uid, value, from_journal) in send order
        self._inflight: collections.deque = collections.deque()
        self._journal_inflight = 0
        self._failing = False  # the broker has been failing deliveries since the last success
        self._probing = False  # a journal message was sent to test a failing broker
        self._stale_producer = False  # a probe failed: start over with a new producer
        self._producer: KafkaProducer | None = None
        self._last_connect_attempt = -1e9
        self._last_commit = time.monotonic()
        self._lost: dict[tuple[str, str], int] = {}  # (vm_id, counter) -> records lost
        self._lost_since = 0
        self._loss_seq = 0
        self._headers: dict[int, list[tuple[str, bytes]]] = {}
        self._closed = False
        self.last_error: str | None = None
        self._connect()

    # --- the Sink interface ------------------------------------------------------------------

    def write(self, records: list[dict[str, Any]]) -> None:
        if self._closed:
            raise SinkError("kafka sink is closed")
        if records:
            records_to_batch(records)  # validation only: RecordError, nothing accepted
            self._submit([self._entry(r) for r in records])
        self._pump()

    def flush(self, timeout: float | None = None) -> None:
        """Everything accepted is acknowledged or in the journal on disk when this returns.
        Without a timeout: one round (what is in flight is delivered or fails; the journal is
        replayed while the broker answers). With a timeout: keeps probing an unreachable
        broker and replaying the journal until everything is delivered or time is up."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._pump()
            if self._producer is not None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    self._producer.flush(timeout=remaining)
                except KafkaError as exc:  # flush timeout: what is left stays in flight
                    self.last_error = str(exc)
            self._reap()
            self._send_losses()
            if self._inflight:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                continue
            if self.spill.pending == 0 and not self._lost:
                break  # everything delivered
            unreachable = self._failing or self._producer is None
            if unreachable and (deadline is None or time.monotonic() >= deadline):
                break  # no (more) time to wait for the broker: the journal keeps the rest
            if unreachable:
                time.sleep(0.2)  # the next probe or connection attempt
        # Whatever could not be delivered is made durable in the journal, loss reports too.
        stranded = [entry for *entry, _ in self._drain_inflight()]
        if stranded:
            self._to_journal(stranded)
            self._stale_producer = self._stale_producer or self._failing
        if self._lost:
            self._journal_losses()
        self.spill.mark_consumed_if(self._journal_inflight == 0)
        self.spill.commit()

    def close(self, timeout: float | None = None) -> dict[str, int]:
        if self._closed:
            return self.stats_dict()
        try:
            self.flush(timeout)
        finally:
            self._closed = True
            self._drop_producer(timeout=5)
            self.spill.close()
        return self.stats_dict()

    def stats_dict(self) -> dict[str, int]:
        """SinkStats plus `spill_pending` (entries waiting in the journal) and `in_flight`."""
        stats = self.stats.as_dict()
        stats["spill_pending"] = self.spill.pending
        stats["in_flight"] = len(self._inflight)
        return stats

    # --- message path ------------------------------------------------------------------------

    def _entry(self, record: dict[str, Any]) -> tuple[bytes, int, bytes]:
        class_uid = record.get("class_uid")
        if class_uid is None:
            class_uid = classify(record["kind"], record["event_type"], record.get("action"),
                                 record.get("errno"))[0]
        return record["vm_id"].encode(), class_uid, to_ocsf_json(record)

    def _header(self, class_uid: int) -> list[tuple[str, bytes]]:
        headers = self._headers.get(class_uid)
        if headers is None:
            headers = [("vmitrace-schema-version", SCHEMA_VERSION.encode()),
                       ("ocsf-version", OCSF_VERSION.encode()),
                       ("ocsf-class-uid", str(class_uid).encode())]
            self._headers[class_uid] = headers
        return headers

    def _submit(self, entries: list[tuple[bytes, int, bytes]]) -> None:
        """Send, or queue behind the journal, or spill when the queue is full."""
        if self.spill.pending or self._producer is None or self._failing:
            self._to_journal(entries)
            return
        room = self.queue_records - len(self._inflight)
        sent = self._send(entries[:max(room, 0)], from_journal=False)
        if sent < len(entries):
            self._to_journal(entries[sent:])

    def _send(self, entries: list[tuple[bytes, int, bytes]], from_journal: bool) -> int:
        """Hand entries to the producer; returns how many it took (a message refused for
        good, e.g. too large, is taken and counted as lost so that it cannot block the
        journal)."""
        producer = self._producer
        if producer is None:
            return 0
        topic, inflight = self.topic, self._inflight
        for index, (key, class_uid, value) in enumerate(entries):
            try:
                future = producer.send(topic, value=value, key=key,
                                       headers=self._header(class_uid))
            except KafkaError as exc:
                self.last_error = str(exc)
                if getattr(exc, "retriable", False):  # metadata unavailable in time, ...
                    self._failing = True
                    return index
                self.stats.errors += 1
                self._count_loss(key.decode(), "kafka.failed")
                continue
            inflight.append((future, key, class_uid, value, from_journal))
            if from_journal:
                self._journal_inflight += 1
        return len(entries)

    def _to_journal(self, entries: list[tuple[bytes, int, bytes]]) -> None:
        try:
            appended = self.spill.append(entries)
        except OSError as exc:
            appended = 0
            self.stats.errors += 1
            self.last_error = f"spill journal: {exc}"
        self.stats.spilled += appended
        for key, _, _ in entries[appended:]:
            self._count_loss(key.decode(), "kafka.dropped")

    def _count_loss(self, vm_id: str, counter: str) -> None:
        if not self._lost:
            self._lost_since = time.time_ns()
        self._lost[(vm_id, counter)] = self._lost.get((vm_id, counter), 0) + 1
        self.stats.dropped += 1

    # --- housekeeping ------------------------------------------------------------------------

    def _pump(self) -> None:
        """Reap acknowledgements, reconnect, replay the journal, report losses."""
        self._reap()
        if self._stale_producer and not self._inflight:
            # kafka-python may not find a broker that died and came back (it stops
            # re-bootstrapping); a new producer bootstraps afresh.
            self._stale_producer = self._probing = False
            self._drop_producer()
        if self._producer is None:
            self._connect()
        if self.spill.pending and self._producer is not None:
            if not self._failing:
                budget = self.queue_records - len(self._inflight)
            else:
                budget = _PROBE if not self._inflight else 0
                self._probing = self._probing or budget > 0
            if budget > 0:
                entries = self.spill.read(budget)
                sent = self._send(entries, from_journal=True)
                if sent < len(entries):  # the producer refused: back into the journal
                    self.spill.unread(len(entries) - sent)
        self._send_losses()
        if time.monotonic() - self._last_commit >= self.commit_seconds:
            self.spill.mark_consumed_if(self._journal_inflight == 0)
            self.spill.commit()
            self._last_commit = time.monotonic()

    def _reap(self) -> None:
        inflight = self._inflight
        retry = []
        while inflight and inflight[0][0].is_done:
            future, key, class_uid, value, from_journal = inflight.popleft()
            if from_journal:
                self._journal_inflight -= 1
            if future.exception is None:
                self.stats.written += 1
                if from_journal:
                    self.stats.replayed += 1
                self._failing = self._probing = False
            elif getattr(future.exception, "retriable", False):
                self._failing = True
                self._stale_producer = self._stale_producer or (self._probing and from_journal)
                self.last_error = str(future.exception)
                retry.append((key, class_uid, value))
            else:
                self.last_error = str(future.exception)
                self.stats.errors += 1
                self._count_loss(key.decode(), "kafka.failed")
        if retry:
            self._to_journal(retry)

    def _drain_inflight(self):
        """Entries still in flight after a flush that gave up (broker unreachable)."""
        while self._inflight:
            future, key, class_uid, value, from_journal = self._inflight.popleft()
            if from_journal:
                self._journal_inflight -= 1
            if future.is_done and future.exception is None:
                self.stats.written += 1
                continue
            yield key, class_uid, value, from_journal

    def _loss_entries(self) -> list[tuple[bytes, int, bytes]]:
        """Loss records for everything counted as lost so far (and the counters reset)."""
        now = time.time_ns()
        records = []
        for (vm_id, counter), count in sorted(self._lost.items()):
            records.append(loss_record(vm_id, counter, count, self._lost_since, now,
                                       self._loss_seq))
            self._loss_seq += 1
        self._lost.clear()
        self.stats.loss_records += len(records)
        return [self._entry(r) for r in records]

    def _send_losses(self) -> None:
        """Loss records go out once the broker takes messages directly again."""
        if not self._lost or self._failing or self._producer is None or self.spill.pending:
            return
        entries = self._loss_entries()
        sent = self._send(entries, from_journal=False)
        if sent < len(entries):
            self._journal_losses(entries[sent:])

    def _journal_losses(self, entries: list[tuple[bytes, int, bytes]] | None = None) -> None:
        """Keep loss reports with the journal (in a reserve beyond its size limit), so a
        later sink on the same spill_dir delivers them."""
        entries = entries if entries is not None else self._loss_entries()
        try:
            kept = self.spill.append(entries, reserve=_LOSS_RESERVE)
        except OSError as exc:
            kept = 0
            self.last_error = f"spill journal: {exc}"
        if kept < len(entries):
            self.stats.errors += 1
            self.last_error = "loss records could not be kept: the journal reserve is full"

    def _drop_producer(self, timeout: float = 0) -> None:
        """Close the producer; what it still holds is in the journal already."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.close(timeout=timeout)
        except KafkaError as exc:
            # kafka-python 3.0's close() gives up when its own flush times out and leaves
            # its I/O thread running (and retries from __del__): stop that thread here.
            self.last_error = str(exc)
            sender = getattr(producer, "_sender", None)
            if sender is not None:
                sender.force_close()
            producer._closed = True

    def _connect(self) -> None:
        if time.monotonic() - self._last_connect_attempt < self.reconnect_seconds:
            return
        self._last_connect_attempt = time.monotonic()
        try:
            self._producer = KafkaProducer(**self._producer_config)
        except KafkaConfigurationError as exc:
            raise SinkError(f"kafka sink: bad configuration: {exc}") from exc
        except KafkaError as exc:  # NoBrokersAvailable, ...: spill and try again later
            self.last_error = str(exc)
            self._producer = None
