"""Sink throughput, each next to a bare baseline measured in the same run on the same records.

    .venv/bin/python bench/sinks.py [--records N] [--no-kafka] [--repeat R]

* parquet: ParquetSink (validation, Arrow conversion, partitioning, zstd, atomic files) vs a
  bare pyarrow write of the same dicts (Table.from_pylist + ParquetWriter, zstd, 64k rows).
* kafka:   KafkaSink (validation, OCSF rendering, bounded queue) to a local KRaft broker vs a
  bare kafka-python producer loop sending the same records pre-rendered as OCSF JSON, with
  the same key, headers, compression and idempotence.
* jsonl:   JsonlSink (OCSF) vs a bare loop of orjson.dumps(to_ocsf(record)) + write.
Goals (issue 6): Parquet >= 300 000 records/s and >= 70 % of bare pyarrow; Kafka >= 50 000
records/s. Rates are the best of --repeat runs (the machine is shared).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from sinks.jsonl import JsonlSink  # noqa: E402
from sinks.kafka import KafkaSink  # noqa: E402
from sinks.ocsf import OCSF_VERSION, to_ocsf_json  # noqa: E402
from sinks.parquet import ParquetSink  # noqa: E402
from sinks.schema import SCHEMA, SCHEMA_VERSION, RecordFactory, make_process_uid  # noqa: E402

T0 = 1_763_000_000_000_000_000
CHUNK = 4096  # records per write() call, as a collector would hand them over


def make_records(count: int, vm_id: str = "bench-vm") -> list[dict]:
    """A syscall-heavy mix like a traced guest produces: openat with decoded arguments,
    read/write, and an exec now and then."""
    factory = RecordFactory(vm_id, "bench", "observer", T0)
    records = []
    for i in range(count):
        pid = 300 + i % 61
        common = dict(vcpu=i & 1, pid=pid, tid=pid, ppid=1, uid=0, gid=0, comm=f"proc{pid % 7}",
                      process_uid=make_process_uid(vm_id, pid, 10_000 + pid), cr3=0x2000 * (pid % 4))
        shape = i % 10
        if shape < 3:
            path = f"/usr/lib/x86_64-linux-gnu/lib{i % 200}.so"
            records.append(factory.new(
                "syscall", "call", T0 + i * 1000, action="openat", syscall_nr=257,
                args=[0xFFFFFF9C, 0x7FFD0000 + i, 0x80000, 0], ret=3, path=path, fd=-100,
                flags="O_RDONLY|O_CLOEXEC", mode=0,
                decoded_args=[
                    {"name": "dfd", "type": "int", "value": "AT_FDCWD", "truncated": False,
                     "error": None},
                    {"name": "filename", "type": "const char *", "value": path,
                     "truncated": False, "error": None},
                    {"name": "flags", "type": "int", "value": "O_RDONLY|O_CLOEXEC",
                     "truncated": False, "error": None},
                    {"name": "mode", "type": "umode_t", "value": "0", "truncated": False,
                     "error": None}],
                **common))
        elif shape < 9:
            action, nr = ("read", 0) if shape < 6 else ("write", 1)
            records.append(factory.new(
                "syscall", "call", T0 + i * 1000, action=action, syscall_nr=nr,
                args=[3, 0x7FFD1000, 4096], ret=4096 if shape != 8 else -11,
                errno=None if shape != 8 else "EAGAIN", fd=3, length=4096, **common))
        else:
            records.append(factory.new(
                "process", "exec", T0 + i * 1000, action="execve", path="/bin/busybox",
                exe="/bin/busybox", argv=["busybox", "ls", "-l", f"/tmp/{i}"],
                cmdline=f"busybox ls -l /tmp/{i}", **common))
    return records


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def best_of(repeat: int, run) -> float:
    """Best (shortest) time of `repeat` runs; garbage collected before each."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        best = min(best, run())
    return best


def bench_parquet(records: list[dict], workdir: Path, repeat: int) -> dict[str, float]:
    def bare() -> float:
        target = workdir / "bare"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        start = time.perf_counter()
        with pq.ParquetWriter(target / "bare.parquet", SCHEMA, compression="zstd") as writer:
            for i in range(0, len(records), 65536):
                writer.write_table(pa.Table.from_pylist(records[i:i + 65536], schema=SCHEMA))
        return time.perf_counter() - start

    def sink() -> float:
        target = workdir / "sink"
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        parquet = ParquetSink(target)
        for i in range(0, len(records), CHUNK):
            parquet.write(records[i:i + CHUNK])
        stats = parquet.close()
        elapsed = time.perf_counter() - start
        assert stats["written"] == len(records), stats
        return elapsed

    return {"bare pyarrow": rate(len(records), best_of(repeat, bare)),
            "ParquetSink": rate(len(records), best_of(repeat, sink))}


def bench_jsonl(records: list[dict], workdir: Path, repeat: int) -> dict[str, float]:
    def bare() -> float:
        start = time.perf_counter()
        with open(workdir / "bare.jsonl", "wb") as f:
            for i in range(0, len(records), CHUNK):
                f.write(b"\n".join([to_ocsf_json(r) for r in records[i:i + CHUNK]]) + b"\n")
        return time.perf_counter() - start

    def sink() -> float:
        (workdir / "sink.jsonl").unlink(missing_ok=True)
        start = time.perf_counter()
        jsonl = JsonlSink(workdir / "sink.jsonl")
        for i in range(0, len(records), CHUNK):
            jsonl.write(records[i:i + CHUNK])
        jsonl.close()
        return time.perf_counter() - start

    return {"bare to_ocsf_json + write": rate(len(records), best_of(repeat, bare)),
            "JsonlSink": rate(len(records), best_of(repeat, sink))}


def bench_kafka(records: list[dict], workdir: Path, repeat: int) -> dict[str, float]:
    from kafka import KafkaProducer
    from support.kafka import KafkaBroker

    broker = KafkaBroker(workdir / "kafka")
    broker.start()
    try:
        rendered = [(r["vm_id"].encode(), r["class_uid"], to_ocsf_json(r)) for r in records]
        settings = dict(bootstrap_servers=[broker.bootstrap], enable_idempotence=True,
                        acks="all", compression_type="zstd", linger_ms=20,
                        batch_size=1 << 20, max_request_size=4 << 20)
        run_id = iter(range(1000))

        def bare() -> float:
            topic = f"bare{next(run_id)}"
            broker.create_topic(topic)
            producer = KafkaProducer(**settings)
            headers = {}
            start = time.perf_counter()
            for key, class_uid, value in rendered:
                header = headers.get(class_uid)
                if header is None:
                    header = headers[class_uid] = [
                        ("vmitrace-schema-version", SCHEMA_VERSION.encode()),
                        ("ocsf-version", OCSF_VERSION.encode()),
                        ("ocsf-class-uid", str(class_uid).encode())]
                producer.send(topic, value=value, key=key, headers=header)
            producer.flush()
            elapsed = time.perf_counter() - start
            producer.close()
            return elapsed

        def sink() -> float:
            topic = f"sink{next(run_id)}"
            broker.create_topic(topic)
            kafka = KafkaSink(broker.bootstrap, topic, spill_dir=workdir / f"spill-{topic}")
            start = time.perf_counter()
            for i in range(0, len(records), CHUNK):
                kafka.write(records[i:i + CHUNK])
            stats = kafka.close()
            elapsed = time.perf_counter() - start
            assert stats["written"] == len(records) and stats["spilled"] == 0, stats
            return elapsed

        return {"bare kafka-python producer (pre-rendered)": rate(len(records),
                                                                  best_of(repeat, bare)),
                "KafkaSink": rate(len(records), best_of(repeat, sink))}
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=262_144)
    parser.add_argument("--kafka-records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-kafka", action="store_true")
    args = parser.parse_args()
    records = make_records(args.records)
    workdir = Path(tempfile.mkdtemp(prefix="vmitrace-bench-"))
    try:
        results = {"parquet": bench_parquet(records, workdir, args.repeat),
                   "jsonl": bench_jsonl(records[:args.kafka_records], workdir, args.repeat)}
        if not args.no_kafka:
            results["kafka"] = bench_kafka(records[:args.kafka_records], workdir,
                                           max(1, args.repeat - 1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{'sink':8} {'variant':45} {'records/s':>12} {'vs baseline':>12}")
    for sink, variants in results.items():
        baseline = next(iter(variants.values()))
        for name, value in variants.items():
            print(f"{sink:8} {name:45} {value:12,.0f} {value / baseline:11.0%}")
    parquet = results["parquet"]
    print(f"\nParquet goal >= 300,000 records/s: {parquet['ParquetSink']:,.0f} "
          f"({'met' if parquet['ParquetSink'] >= 300_000 else 'NOT met'}); "
          f">= 70 % of bare pyarrow: {parquet['ParquetSink'] / parquet['bare pyarrow']:.0%} "
          f"({'met' if parquet['ParquetSink'] >= 0.7 * parquet['bare pyarrow'] else 'NOT met'})")
    if "kafka" in results:
        kafka = results["kafka"]
        print(f"Kafka goal >= 50,000 records/s: {kafka['KafkaSink']:,.0f} "
              f"({'met' if kafka['KafkaSink'] >= 50_000 else 'NOT met'}); the bare producer "
              f"loop on this machine: "
              f"{kafka['bare kafka-python producer (pre-rendered)']:,.0f} records/s")


if __name__ == "__main__":
    main()
