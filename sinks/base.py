"""What every sink has in common: the interface, its statistics and its errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


class SinkError(RuntimeError):
    """A sink could not store records; the message says where, why and how many were lost."""


@dataclass
class SinkStats:
    """Counters of one sink. `written`: records stored (Parquet: in complete, visible files;
    Kafka: acknowledged by the broker; JSONL: handed to the OS), the sink's own loss records
    included (`loss_records`: how many loss records of its own it stored (Parquet) or made
    and sent or kept in the journal (Kafka)). `dropped`: records lost, each also
    reported in a loss record where the sink can still store one. `spilled`: records put in
    the Kafka spill journal (`replayed`: sent from it later). `errors`: failed operations."""

    written: int = 0
    dropped: int = 0
    spilled: int = 0
    replayed: int = 0
    loss_records: int = 0
    files: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Sink(Protocol):
    """The contract of every sink. Not thread-safe: one writer thread per sink."""

    def write(self, records: list[dict[str, Any]]) -> None:
        """Accept records (schema v1 dicts). Raises sinks.schema.RecordError for a record that
        does not conform (nothing of that call is accepted) and SinkError when storage fails
        (the lost records are counted). `write([])` does the time-based housekeeping only
        (Parquet: write an old buffer, roll old files; Kafka: reap acknowledgements, replay
        the journal): call it when idle so that buffered records do not wait for the next."""

    def flush(self) -> None:
        """Make everything accepted so far durable and visible to readers."""

    def close(self) -> dict[str, int]:
        """Flush, release resources, return the statistics (SinkStats.as_dict())."""
