"""Kafka sink against a real single-node KRaft broker, read back by an independent consumer.

The broker (tests/support/kafka.py) is shared by the session; the outage tests stop it and
start it again on the same ports and data, and leave it running.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer

from sinks import open_sink
from sinks.kafka import KafkaSink
from sinks.schema import RecordError
from sinks.spill import SpillError, SpillJournal
from support.kafka import (SASL_PASSWORD, SASL_USER, kafka_broker,  # noqa: F401 (fixture)
                           make_certificate)
from test_schema import sample_records
from test_schema_ocsf import ocsf_errors
from test_sink_parquet import syscall_records

pytestmark = pytest.mark.kafka

HEX_COLUMNS = {"cr3", "rip", "old_value", "new_value", "gpa", "gva", "addr", "hypercall_nr"}


def consume(bootstrap: str, topic: str, expected: int, timeout: float = 120.0) -> list:
    """Every message of `topic` from the start, by a consumer of its own (no group)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None)
    messages = []
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            got = [m for records in batch.values() for m in records]
            messages.extend(got)
            if got:
                quiet_since = time.monotonic()
            elif len(messages) >= expected and time.monotonic() - quiet_since > 2:
                break
    finally:
        consumer.close()
    return messages


def check_message(record: dict, message) -> None:
    """The message carries the record: key, headers, and every column in its OCSF place."""
    assert message.key == record["vm_id"].encode()
    headers = dict(message.headers)
    assert headers["vmitrace-schema-version"] == b"1"
    assert headers["ocsf-class-uid"] == str(record["class_uid"]).encode()
    event = orjson.loads(message.value)
    assert ocsf_errors(event) == []
    unmapped = event["unmapped"]
    assert event["metadata"]["uid"] == record["event_uid"]
    assert event["metadata"]["sequence"] == record["seq"]
    assert event["time"] == record["time"] // 1_000_000 and unmapped["time_ns"] == record["time"]
    for name in ("class_uid", "activity_id", "severity_id", "type_uid"):
        assert event[name] == record[name]
    if record["class_uid"]:
        assert event["device"]["instance_uid"] == record["vm_id"]
        assert event["device"].get("name") == record.get("vm_name")
    process = event.get("process") if record["class_uid"] == 1007 else \
        event.get("actor", {}).get("process")
    places = {"pid": ("pid",), "tid": ("tid",), "process_uid": ("uid",), "comm": ("name",),
              "cmdline": ("cmd_line",), "exe": ("file", "path")}
    for column, path in places.items():
        if column in record:
            value = process
            for step in path:
                value = value[step]
            assert value == record[column], column
    if "uid" in record:
        assert process["user"]["uid"] == str(record["uid"])
    if "ppid" in record:
        assert process["parent_process"]["pid"] == record["ppid"]
    mapped = {"event_uid", "time", "seq", "vm_id", "vm_name", "class_uid", "activity_id",
              "severity_id", "type_uid", "pid", "tid", "process_uid", "comm", "cmdline", "exe",
              "uid", "ppid", "parent_process_uid"}
    if record["class_uid"] == 1001:
        assert event["file"]["path"] == record["path"]
        mapped.add("path")
    for column, value in record.items():
        if column in mapped:
            continue
        if column in ("remote_addr", "remote_port") and record["class_uid"] == 4001:
            assert event["dst_endpoint"][column.split("_")[1].replace("addr", "ip")] == value
            continue
        if column == "length" and record["class_uid"] == 1004:
            assert event["size"] == value
            continue
        expected = hex(value) if column in HEX_COLUMNS else \
            [hex(v) for v in value] if column == "args" else value
        assert unmapped[column] == expected, column


def log_batches(log_dir: Path) -> list[tuple[int, int, int]]:
    """(compression codec, producer id, record count) of every record batch in the
    partition's log segments, parsed from the broker's own files (format v2)."""
    batches = []
    for segment in sorted(log_dir.glob("*.log")):
        data = segment.read_bytes()
        position = 0
        while position + 61 <= len(data):
            _, length = struct.unpack_from(">qi", data, position)
            attributes, = struct.unpack_from(">h", data, position + 21)
            producer_id, = struct.unpack_from(">q", data, position + 43)
            count, = struct.unpack_from(">i", data, position + 57)
            batches.append((attributes & 0x7, producer_id, count))
            position += 12 + length
    return batches


def test_records_arrive_field_by_field(kafka_broker, tmp_path):
    records = sample_records() + syscall_records("vm-a", 1500) + syscall_records("vm-b", 700)
    kafka_broker.create_topic("events")  # an auto-created topic may spill its first records
    sink = open_sink(f"kafka:{kafka_broker.bootstrap}/events?spill_dir={tmp_path}/spill")
    for i in range(0, len(records), 250):
        sink.write(records[i:i + 250])
    stats = sink.close()
    assert stats["written"] == len(records)
    assert stats["dropped"] == stats["spilled"] == stats["spill_pending"] == 0

    messages = consume(kafka_broker.bootstrap, "events", len(records))
    assert len(messages) == len(records)
    by_uid = {orjson.loads(m.value)["metadata"]["uid"]: m for m in messages}
    for record in records:
        check_message(record, by_uid[record["event_uid"]])
    # one VM's events stay in order (same key, same partition)
    for vm in ("vm-a", "vm-b"):
        seqs = [orjson.loads(m.value)["metadata"]["sequence"] for m in messages
                if m.key == vm.encode()]
        assert seqs == sorted(seqs) and len(seqs) == (1500 if vm == "vm-a" else 700)

    # The broker's own log: zstd-compressed batches (codec 4) from an idempotent producer
    # (producer id assigned), many records per batch.
    batches = log_batches(kafka_broker.workdir / "data" / "events-0")
    assert batches and all(codec == 4 and pid >= 0 for codec, pid, _ in batches)
    assert sum(n for _, _, n in batches) == len(records)
    assert max(n for _, _, n in batches) >= 100


def test_lz4_and_bad_records(kafka_broker, tmp_path):
    kafka_broker.create_topic("lz4events")
    sink = KafkaSink(kafka_broker.bootstrap, "lz4events", spill_dir=tmp_path, compression="lz4")
    good = syscall_records("vm-c", 20)
    with pytest.raises(RecordError, match="record 1: unknown column"):
        sink.write([good[0], dict(good[1], bogus=1)])
    sink.write(good)
    assert sink.close()["written"] == 20
    assert len(consume(kafka_broker.bootstrap, "lz4events", 20)) == 20
    batches = log_batches(kafka_broker.workdir / "data" / "lz4events-0")
    assert {codec for codec, _, _ in batches} == {3}


def test_in_flight_queue_is_bounded(kafka_broker, tmp_path):
    """Beyond queue_records unacknowledged messages, records wait in the journal (not in
    memory) and are sent from there in order as acknowledgements come in."""
    kafka_broker.create_topic("bounded")
    records = syscall_records("vm-q", 1000)
    sink = KafkaSink(kafka_broker.bootstrap, "bounded", spill_dir=tmp_path, queue_records=100)
    sink.write(records)
    assert sink.stats_dict()["in_flight"] <= 100
    assert sink.stats.spilled >= 900 - sink.stats.written
    stats = sink.close()
    assert stats["written"] == 1000 and stats["replayed"] == stats["spilled"]
    assert stats["dropped"] == 0 and stats["spill_pending"] == 0
    messages = consume(kafka_broker.bootstrap, "bounded", 1000)
    seqs = [orjson.loads(m.value)["metadata"]["sequence"] for m in messages]
    assert seqs == sorted(seqs) and len(seqs) == 1000  # the journal keeps the order


def test_sasl_settings_pass_through(kafka_broker, tmp_path):
    kafka_broker.create_topic("secure")
    spec = (f"kafka:{kafka_broker.sasl_bootstrap}/secure?spill_dir={tmp_path}/ok"
            f"&security_protocol=SASL_PLAINTEXT&sasl_mechanism=PLAIN"
            f"&sasl_plain_username={SASL_USER}&sasl_plain_password={SASL_PASSWORD}")
    sink = open_sink(spec)
    sink.write(syscall_records("vm-s", 50))
    assert sink.close()["written"] == 50
    assert len(consume(kafka_broker.bootstrap, "secure", 50)) == 50

    wrong = KafkaSink(kafka_broker.sasl_bootstrap, "secure", spill_dir=tmp_path / "bad",
                      security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                      sasl_plain_username=SASL_USER, sasl_plain_password="wrong",
                      reconnect_seconds=0.2)
    wrong.write(syscall_records("vm-s", 10, session=2))
    stats = wrong.close(timeout=5)
    assert stats["written"] == 0 and stats["spilled"] == 10 and stats["spill_pending"] == 10
    assert wrong.last_error  # kafka-python reports the refused login as a bootstrap failure


def test_tls_settings_pass_through(kafka_broker, tmp_path):
    """A real TLS listener: the sink verifies the broker against the given CA file; with
    another CA the handshake fails and nothing is delivered."""
    kafka_broker.create_topic("tls")
    spec = (f"kafka:{kafka_broker.ssl_bootstrap}/tls?spill_dir={tmp_path}/ok"
            f"&security_protocol=SSL&ssl_cafile={kafka_broker.ssl_cafile}")
    sink = open_sink(spec)
    sink.write(syscall_records("vm-t", 40))
    assert sink.close()["written"] == 40
    assert len(consume(kafka_broker.bootstrap, "tls", 40)) == 40

    _, other_ca = make_certificate(tmp_path, "impostor")
    untrusting = KafkaSink(kafka_broker.ssl_bootstrap, "tls", spill_dir=tmp_path / "bad",
                           security_protocol="SSL", ssl_cafile=str(other_ca),
                           reconnect_seconds=0.2)
    untrusting.write(syscall_records("vm-t", 10, session=2))
    stats = untrusting.close(timeout=3)
    assert stats["written"] == 0 and stats["spill_pending"] == 10


def test_message_refused_for_good_is_counted_and_does_not_block(kafka_broker, tmp_path):
    kafka_broker.create_topic("poison")
    records = syscall_records("vm-p", 30)
    records[10]["extra"] = {"blob": "x" * (5 << 20)}  # beyond the 4 MiB request limit
    sink = KafkaSink(kafka_broker.bootstrap, "poison", spill_dir=tmp_path)
    sink.write(records)
    stats = sink.close(timeout=60)
    assert stats["written"] == 29 + 1 and stats["dropped"] == 1 and stats["loss_records"] == 1
    events = [orjson.loads(m.value) for m in consume(kafka_broker.bootstrap, "poison", 30)]
    [loss] = [e for e in events if e["unmapped"]["kind"] == "loss"]
    assert loss["unmapped"]["counter"] == "kafka.failed" and loss["count"] == 1
    delivered = {e["metadata"]["uid"] for e in events} - {loss["metadata"]["uid"]}
    assert delivered == {r["event_uid"] for i, r in enumerate(records) if i != 10}


def test_broker_outage_nothing_lost(kafka_broker, tmp_path):
    kafka_broker.create_topic("outage")
    sink = KafkaSink(kafka_broker.bootstrap, "outage", spill_dir=tmp_path / "spill",
                     queue_records=1000, delivery_timeout_ms=6000, request_timeout_ms=2000,
                     max_block_ms=1000, reconnect_seconds=0.5)
    before = syscall_records("vm-o", 2000, session=1)
    during = syscall_records("vm-o", 4000, session=2)
    after = syscall_records("vm-o", 1000, session=3)
    for i in range(0, len(before), 200):
        sink.write(before[i:i + 200])
    # SIGKILL the broker in the middle of the stream, with messages in flight
    kafka_broker.stop(kill=True)
    try:
        for i in range(0, len(during), 250):
            sink.write(during[i:i + 250])
        sink.flush(timeout=60)  # deliveries time out; they go to the journal
        assert sink.stats.spilled >= 3000
        assert sink.spill.pending > 0 and sink.stats_dict()["in_flight"] == 0
    finally:
        kafka_broker.start()
    for i in range(0, len(after), 250):
        sink.write(after[i:i + 250])
    stats = sink.close(timeout=120)
    assert stats["dropped"] == 0 and stats["spill_pending"] == 0
    assert stats["replayed"] > 0

    everything = before + during + after
    messages = consume(kafka_broker.bootstrap, "outage", len(everything))
    uids = [orjson.loads(m.value)["metadata"]["uid"] for m in messages]
    assert set(uids) == {r["event_uid"] for r in everything}  # nothing lost
    duplicates = len(uids) - len(set(uids))  # at least once: a timed-out send may be stored
    assert duplicates <= 1000
    by_uid = {orjson.loads(m.value)["metadata"]["uid"]: m for m in messages}
    for record in everything[::97]:
        check_message(record, by_uid[record["event_uid"]])


def test_full_spill_counts_losses_and_reports_them(kafka_broker, tmp_path):
    records = syscall_records("vm-f", 1500, session=4)
    kafka_broker.create_topic("lossy")
    kafka_broker.stop()
    try:
        # No broker when the sink starts: everything goes to the journal until it is full.
        sink = KafkaSink(kafka_broker.bootstrap, "lossy", spill_dir=tmp_path / "spill",
                         spill_bytes=300_000, max_block_ms=1000, reconnect_seconds=0.5)
        for i in range(0, len(records), 100):
            sink.write(records[i:i + 100])
        sink.flush(timeout=3)
        stats = sink.stats_dict()
    finally:
        kafka_broker.start()
    assert stats["written"] == 0
    assert stats["dropped"] > 0 and stats["spilled"] > 0
    assert stats["spilled"] + stats["dropped"] == len(records)
    assert stats["spill_pending"] == stats["spilled"] + 1  # the loss record waits there too

    # The same sink reconnects, replays the journal and reports the loss.
    final = sink.close(timeout=120)
    assert final["written"] == stats["spilled"] + 1 and final["spill_pending"] == 0
    assert final["loss_records"] == 1 and final["dropped"] == stats["dropped"]

    messages = consume(kafka_broker.bootstrap, "lossy", final["written"])
    events = [orjson.loads(m.value) for m in messages]
    losses = [e for e in events if e["unmapped"]["kind"] == "loss"]
    assert len(losses) == 1 and losses[0]["count"] == stats["dropped"]
    assert losses[0]["unmapped"]["counter"] == "kafka.dropped"
    assert ocsf_errors(losses[0]) == []
    delivered = {e["metadata"]["uid"] for e in events if e["unmapped"]["kind"] != "loss"}
    assert len(delivered) + losses[0]["count"] == len(records)  # every record accounted for
    assert delivered == {r["event_uid"] for r in records[:len(delivered)]}  # oldest kept


def test_journal_left_behind_is_delivered_by_the_next_sink(kafka_broker, tmp_path):
    """A sink that never reached its broker leaves its journal; the next sink opened on the
    same spill directory delivers it first."""
    kafka_broker.create_topic("leftover")
    records = syscall_records("vm-l", 50)
    nowhere = KafkaSink("127.0.0.1:1", "leftover", spill_dir=tmp_path, max_block_ms=500)
    nowhere.write(records)
    assert nowhere.close(timeout=1)["spill_pending"] == 50
    later = KafkaSink(kafka_broker.bootstrap, "leftover", spill_dir=tmp_path)
    later.write(syscall_records("vm-l", 5, session=9))
    stats = later.close(timeout=60)
    assert stats["written"] == 55 and stats["replayed"] == 55 and stats["spill_pending"] == 0
    messages = consume(kafka_broker.bootstrap, "leftover", 55)
    uids = [orjson.loads(m.value)["metadata"]["uid"] for m in messages]
    assert uids[:50] == [r["event_uid"] for r in records]  # the journal first, in order
    assert len(uids) == 55


def test_spill_journal_recovery(tmp_path):
    journal = SpillJournal(tmp_path, max_bytes=10_000)
    entries = [(b"vm", 1003, b"x" * i) for i in range(1, 40)]
    assert journal.append(entries) == 39
    assert [e[2] for e in journal.read(5)] == [b"x" * i for i in range(1, 6)]
    journal.mark_consumed_if(True)
    journal.read(3)  # read, never confirmed: replayed after a restart
    with pytest.raises(SpillError, match="in use"):
        SpillJournal(tmp_path, max_bytes=10_000)
    journal.close()
    with open(tmp_path / "spill.journal", "ab") as f:
        f.write(b"\x10\x00\x00\x00torn")  # a writer killed mid-frame
    again = SpillJournal(tmp_path, max_bytes=10_000)
    assert again.torn_bytes == 8 and again.pending == 34
    assert again.read(1)[0][2] == b"x" * 6
    again.unread(1)
    assert len(again.read(100)) == 34
    again.mark_consumed_if(True)
    again.close()
    assert (tmp_path / "spill.journal").stat().st_size == 0  # drained: truncated
    full = SpillJournal(tmp_path, max_bytes=100)
    assert full.append([(b"k", 1, b"v" * 60)] * 3) == 1
    assert full.append([(b"k", 1, b"v" * 60)], reserve=100) == 1
    full.close()
