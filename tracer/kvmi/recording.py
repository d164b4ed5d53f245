"""KVMI session recordings: a compact file format, a writer, a reader and a replay host.

File layout (little endian)::

    header  recording_header (112 bytes): magic "VMTKVMI\\0", version, header_size, flags,
            uuid[16], start_time (handshake), wallclock_ns (when recording began), name[64]
    records recording_record (16 bytes): direction (0 in, 1 out), padding, length,
            monotonic_ns; then `length` bytes: one raw message exactly as it crossed the
            socket (the first "in" is kvmi_qemu2introspector, the first "out" is
            kvmi_introspector2qemu; all others are KVMI messages with their header)

:class:`RecordingWriter` is a Session recorder; :class:`ReplayHost` plays a recording back as
a KVMI host over a real socket, so the collector's code path (``Listener``/``Session``) is
identical for live and replayed sessions::

    host = ReplayHost("vm1.kvmirec")
    thread = host.connect("unix:/tmp/x.sock")   # or: sock = host.socketpair()
"""
from __future__ import annotations

import collections
import os
import socket
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from . import abi
from .errors import KvmiError
from .protocol import Handshake, encode_message, parse_handshake
from .transport import parse_address

FORMAT_VERSION = 1
MAGIC = b"VMTKVMI\0"
RECORDING_HEADER = abi.StructDef("recording_header", [
    ("magic", ("bytes", 8)), ("version", "u16"), ("header_size", "u16"), ("flags", "u32"),
    ("uuid", ("bytes", 16)), ("start_time", "s64"), ("wallclock_ns", "u64"),
    ("name", ("char", 64))], 112)
RECORDING_RECORD = abi.StructDef("recording_record", [
    ("direction", "u8"), ("padding1", "u8"), ("padding2", "u16"), ("length", "u32"),
    ("monotonic_ns", "u64")], 16)
_REC = RECORDING_RECORD.struct
_MAX_RECORD = abi.HANDSHAKE_MAX_SIZE  # no message is larger than a handshake may be
_DIRS = {"in": 0, "out": 1}
_DIR_NAMES = ("in", "out")


class RecordingError(KvmiError):
    """A recording file is not in this format, or is damaged."""


@dataclass(frozen=True)
class Record:
    """One recorded message: ``direction`` "in" (host to us) or "out", time, raw bytes."""

    direction: str
    monotonic_ns: int
    raw: bytes


class RecordingWriter:
    """A Session recorder writing one VM's messages to ``path`` (thread-safe).

    Use as ``recorder_factory=RecordingWriter.factory(directory)`` on a Listener, or pass
    ``RecordingWriter(path, handshake)`` as a Session's ``recorder``.
    """

    def __init__(self, path: str | os.PathLike[str], handshake: Handshake) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._file: BinaryIO | None = open(self.path, "wb")
        self.records = 0
        self._file.write(RECORDING_HEADER.encode(
            magic=MAGIC, version=FORMAT_VERSION, header_size=RECORDING_HEADER.size,
            uuid=handshake.uuid.bytes, start_time=handshake.start_time,
            wallclock_ns=time.time_ns(), name=handshake.name.encode()[:63]))

    @classmethod
    def factory(cls, directory: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
        """A Listener ``recorder_factory`` writing ``DIR/<name>-<uuid>-<ns>.kvmirec``."""
        def make(handshake: Handshake) -> "RecordingWriter":
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in handshake.name)
            return cls(os.path.join(os.fspath(directory),
                                    f"{safe}-{handshake.uuid}-{time.time_ns()}.kvmirec"),
                       handshake)
        return make

    def __call__(self, direction: str, monotonic_ns: int, raw: bytes) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.write(_REC.pack(_DIRS[direction], 0, 0, len(raw), monotonic_ns))
            self._file.write(raw)
            self.records += 1

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        """Flush and close; later messages are not recorded."""
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None


class RecordingReader:
    """Reads a recording: ``uuid``, ``name``, ``start_time``, ``wallclock_ns``; iterate for
    :class:`Record` objects. A damaged file raises :class:`RecordingError` at the bad spot."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            head = f.read(RECORDING_HEADER.size)
        if len(head) < RECORDING_HEADER.size or head[:8] != MAGIC:
            raise RecordingError(f"{self.path}: not a vmitrace KVMI recording")
        try:
            h = RECORDING_HEADER.decode(head)
        except abi.AbiError as exc:
            raise RecordingError(f"{self.path}: bad header: {exc}") from None
        if h.version != FORMAT_VERSION:
            raise RecordingError(f"{self.path}: format version {h.version}, "
                                 f"this reader knows {FORMAT_VERSION}")
        if h.header_size < RECORDING_HEADER.size:
            raise RecordingError(f"{self.path}: header_size {h.header_size} too small")
        self.header_size = h.header_size
        self.uuid = uuidlib.UUID(bytes=h.uuid)
        self.name = h.name.split(b"\0", 1)[0].decode("utf-8", "replace")
        self.start_time = h.start_time
        self.wallclock_ns = h.wallclock_ns

    def __iter__(self) -> Iterator[Record]:
        with open(self.path, "rb") as f:
            f.seek(self.header_size)
            n = 0
            while True:
                head = f.read(_REC.size)
                if not head:
                    return
                if len(head) < _REC.size:
                    raise RecordingError(f"{self.path}: record {n} header truncated")
                try:
                    rec = RECORDING_RECORD.decode(head)
                except abi.AbiError as exc:
                    raise RecordingError(f"{self.path}: record {n}: {exc}") from None
                if rec.direction > 1 or rec.length > _MAX_RECORD:
                    raise RecordingError(f"{self.path}: record {n} is corrupt "
                                         f"(direction {rec.direction}, length {rec.length})")
                raw = f.read(rec.length)
                if len(raw) < rec.length:
                    raise RecordingError(f"{self.path}: record {n} truncated")
                yield Record(_DIR_NAMES[rec.direction], rec.monotonic_ns, raw)
                n += 1


_HDR = abi.KVMI_MSG_HDR.struct


class ReplayHost:
    """Serves a Session from a recording, acting as the KVMI host.

    * the recorded handshake is sent first; the introspector's 24-byte answer is read;
    * events are sent in recorded order; an event the recording shows replied is awaited
      (the live Session must reply to it) before anything recorded after that reply is sent;
    * each command gets the recorded reply of the next recorded command with the same id and
      payload (seq rewritten); a command absent from the recording gets ``-KVM_ENOENT``;
    * at the end of the recording, once every recorded reply was handed out (or no command
      came for ``end_grace`` seconds while some were left), the host closes the connection
      (``linger=True``: it keeps answering commands until the introspector closes).

    ``unmatched_commands`` counts commands answered with -KVM_ENOENT.
    """

    def __init__(self, recording: str | os.PathLike[str] | RecordingReader,
                 linger: bool = False, end_grace: float = 2.0) -> None:
        self.reader = recording if isinstance(recording, RecordingReader) else \
            RecordingReader(recording)
        self.linger = linger
        self.end_grace = end_grace
        self.unmatched_commands = 0
        self.error: BaseException | None = None
        self._load()

    def _records(self) -> Iterator[tuple[str, int, int, bytes, bytes]]:
        """(direction, id, seq, payload, raw) of each KVMI message after the handshake."""
        seen = {"in": False, "out": False}
        for rec in self.reader:
            if not seen[rec.direction]:  # the first message each way is the handshake
                seen[rec.direction] = True
                if rec.direction == "in":
                    parse_handshake(rec.raw)  # validates
                continue
            if len(rec.raw) < _HDR.size:
                raise RecordingError(f"{self.reader.path}: message shorter than its header")
            msg_id, _size, seq = _HDR.unpack_from(rec.raw)
            yield rec.direction, msg_id, seq, rec.raw[_HDR.size:], rec.raw

    def _load(self) -> None:
        """First pass: the handshake and the command -> replies table (events stay on disk)."""
        self._handshake = next((r.raw for r in self.reader if r.direction == "in"), None)
        if self._handshake is None:
            raise RecordingError(f"{self.reader.path}: no handshake recorded")
        sent: dict[int, tuple[int, bytes]] = {}  # out seq -> (id, payload)
        self._replies: dict[tuple[int, bytes], collections.deque[bytes]] = {}
        for direction, msg_id, seq, payload, _raw in self._records():
            if direction == "out" and msg_id != abi.KVMI_EVENT_REPLY:
                sent[seq] = (msg_id, payload)
            elif direction == "in" and msg_id != abi.KVMI_EVENT:
                key = sent.pop(seq, None)
                if key is not None and key[0] == msg_id:
                    self._replies.setdefault(key, collections.deque()).append(payload)

    def _script(self) -> Iterator[tuple[str, object]]:
        """Second pass, streamed: events to send and event replies to wait for, in order."""
        for direction, msg_id, seq, _payload, raw in self._records():
            if direction == "in" and msg_id == abi.KVMI_EVENT:
                yield "event", raw
            elif direction == "out" and msg_id == abi.KVMI_EVENT_REPLY:
                yield "await", seq

    # -- entry points ---------------------------------------------------------------------
    def socketpair(self) -> socket.socket:
        """Serve in a thread over a socketpair; returns the introspector's end."""
        ours, theirs = socket.socketpair()
        threading.Thread(target=self.serve, args=(ours,), daemon=True,
                         name="kvmi-replay").start()
        return theirs

    def connect(self, address: str) -> threading.Thread:
        """Connect to a Listener at ``unix:PATH`` and serve in a thread (returned)."""
        kind, target = parse_address(address)
        if kind != "unix":
            raise ValueError("replay connects to unix listeners only")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(target)
        t = threading.Thread(target=self.serve, args=(sock,), daemon=True, name="kvmi-replay")
        t.start()
        return t

    # -- the host -------------------------------------------------------------------------
    def serve(self, sock: socket.socket) -> None:
        """Play the recording on a connected socket, then close it."""
        replied: set[int] = set()
        cv = threading.Condition()
        send_lock = threading.Lock()
        state = {"eof": False}

        def send(data: bytes) -> None:
            with send_lock:
                sock.sendall(data)

        def read_loop() -> None:
            try:
                buf = bytearray()
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    buf += data
                    while len(buf) >= _HDR.size:
                        msg_id, size, seq = _HDR.unpack_from(buf)
                        if size > abi.max_payload(msg_id):
                            raise RecordingError(f"introspector sent oversize message {msg_id}")
                        if len(buf) < _HDR.size + size:
                            break
                        payload = bytes(buf[_HDR.size:_HDR.size + size])
                        del buf[:_HDR.size + size]
                        if msg_id == abi.KVMI_EVENT_REPLY:
                            with cv:
                                replied.add(seq)
                                cv.notify_all()
                        else:
                            with cv:  # taking a reply and sending it is one step for serve()
                                send(self._answer(msg_id, seq, payload))
                                cv.notify_all()
            except (OSError, KvmiError) as exc:
                self.error = exc
            finally:
                with cv:
                    state["eof"] = True
                    cv.notify_all()

        try:
            sock.sendall(self._handshake)  # type: ignore[arg-type]
            answer = b""
            while len(answer) < abi.KVMI_INTROSPECTOR2QEMU.size:
                chunk = sock.recv(abi.KVMI_INTROSPECTOR2QEMU.size - len(answer))
                if not chunk:
                    raise RecordingError("introspector closed during the handshake")
                answer += chunk
            reader = threading.Thread(target=read_loop, daemon=True, name="kvmi-replay-rd")
            reader.start()
            for kind, item in self._script():
                if kind == "event":
                    send(item)  # type: ignore[arg-type]
                else:
                    with cv:
                        while item not in replied and not state["eof"]:
                            cv.wait()
                        if state["eof"]:
                            break
            if not self.linger:
                # Commands recorded after the last event are still answered; then hang up.
                with cv:
                    while self._unserved() and not state["eof"]:
                        # a client that stopped asking (it diverged from the recording)
                        # must not keep the replay open forever
                        if not cv.wait(self.end_grace):
                            break
                    sock.shutdown(socket.SHUT_WR)
            reader.join()
        except (OSError, KvmiError, abi.AbiError) as exc:
            self.error = exc
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _unserved(self) -> int:
        """Recorded replies not handed out yet."""
        return sum(len(q) for q in self._replies.values())

    def _answer(self, msg_id: int, seq: int, payload: bytes) -> bytes:
        queue = self._replies.get((msg_id, payload))
        if queue:
            return encode_message(msg_id, seq, queue.popleft())
        self.unmatched_commands += 1
        return encode_message(msg_id, seq, abi.KVMI_ERROR_CODE.encode(err=-abi.KVM_ENOENT))


__all__ = ["FORMAT_VERSION", "RECORDING_HEADER", "RECORDING_RECORD", "Record", "RecordingError",
           "RecordingReader", "RecordingWriter", "ReplayHost"]
