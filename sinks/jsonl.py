"""JSON Lines sink: one JSON document per line, to a file (appended) or stdout ("-").

Formats: "ocsf" (default, sinks.ocsf), "ecs" (sinks.ecs) or "raw" (the schema v1 dict as it
is, times as int nanoseconds). A write error (disk full, closed pipe) counts the records of
that call as dropped and raises SinkError; the lines written before stay intact (a file is
cut back to its size before the failed write, so no torn line remains). Each write() is
handed to the OS at once (no user-space buffer to lose); flush() fsyncs a regular file.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import Any, BinaryIO, Callable, NoReturn

import orjson

from sinks.base import SinkError, SinkStats
from sinks.ecs import to_ecs_json
from sinks.ocsf import to_ocsf_json
from sinks.schema import records_to_batch


def _raw_json(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record)


RENDERERS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "ocsf": to_ocsf_json, "ecs": to_ecs_json, "raw": _raw_json,
}


class JsonlSink:
    def __init__(self, path: str | os.PathLike, *, format: str = "ocsf") -> None:
        if format not in RENDERERS:
            raise SinkError(f"jsonl sink: unknown format {format!r} "
                            f"(one of {sorted(RENDERERS)})")
        self.path = str(path)
        self.render = RENDERERS[format]
        self.stats = SinkStats()
        self._owned = self.path != "-"
        self._stream: BinaryIO = (open(self.path, "ab", buffering=0) if self._owned
                                  else sys.stdout.buffer)
        # Only a regular file can be rolled back after a failed write and fsynced: a FIFO,
        # a terminal or /dev/null cannot (and need not) be.
        self._regular = self._owned and stat.S_ISREG(os.fstat(self._stream.fileno()).st_mode)
        self._closed = False

    def write(self, records: list[dict[str, Any]]) -> None:
        if self._closed:
            raise SinkError("jsonl sink is closed")
        if not records:
            return
        records_to_batch(records)  # validation: RecordError, nothing accepted
        render = self.render
        data = b"\n".join([render(r) for r in records]) + b"\n"
        start = self._stream.tell() if self._regular else 0
        try:
            view = memoryview(data)
            while view:
                view = view[self._stream.write(view):]
            if not self._owned:
                self._stream.flush()
        except OSError as exc:
            if self._regular:
                try:
                    os.truncate(self._stream.fileno(), start)
                except OSError:
                    pass  # the original error is the one to report
            self._fail(len(records), exc)
        self.stats.written += len(records)

    def flush(self) -> None:
        try:
            if self._regular:
                os.fsync(self._stream.fileno())
            elif not self._owned:
                self._stream.flush()
        except OSError as exc:
            self._fail(0, exc)

    def close(self) -> dict[str, int]:
        if not self._closed:
            self._closed = True
            try:
                self.flush()
            finally:
                if self._owned:
                    try:
                        self._stream.close()
                    except OSError:
                        pass  # the flush above already reported the failure
        return self.stats.as_dict()

    def _fail(self, count: int, exc: OSError) -> NoReturn:
        self.stats.dropped += count
        self.stats.errors += 1
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise SinkError(f"jsonl sink: {reason} writing {self.path}: {count} records not "
                        f"written") from exc
