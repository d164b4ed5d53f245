"""Sans-IO core of the introspector side of KVMI (kvmi-v7 dialect).

:class:`IntrospectorProtocol` turns received bytes into typed messages and typed commands into
bytes; it owns the handshake state, seq numbering and reply matching, and never touches a
socket (the h11/wsproto model). Transports (:mod:`tracer.kvmi.transport`) feed it.

Life of a connection::

    proto = IntrospectorProtocol(secret=b"...")
    msgs = proto.receive_data(chunk)        # -> [Handshake] once the host's struct is complete
    send(proto.handshake_response())        # kvmi_introspector2qemu, 24 bytes
    seq, data = proto.command(abi.KVMI_GET_VERSION)
    send(data)
    for msg in proto.receive_data(chunk):   # CommandReply / Event objects, in wire order
        ...
    send(proto.event_reply(event, abi.KVMI_EVENT_ACTION_CONTINUE))
    proto.receive_eof()                     # raises TruncatedMessage if a message was cut

Any :class:`~tracer.kvmi.errors.ProtocolError` leaves the protocol in state ``"failed"``; the
transport must close the connection. Memory is bounded: at most one partial message (8192
bytes, a vmitrace host's breakpoint event with pointer captures 33928, or the handshake's
64 KiB) stays buffered beyond what ``receive_data`` was given.
"""
from __future__ import annotations

import hashlib
import struct
import uuid as uuidlib
from collections import OrderedDict
from operator import itemgetter
from typing import Any, Sequence

from . import abi
from .errors import (HandshakeError, MalformedMessage, OversizeMessage, ProtocolError,
                     SequenceError, TruncatedMessage, UnknownMessage)
from .events import EVENT_CLASSES, BreakpointEvent, Event, PointerCapture

_HDR = abi.KVMI_MSG_HDR.struct
_HDR_SIZE = abi.KVMI_MSG_HDR.size
_ERR = abi.KVMI_ERROR_CODE.struct
_EVENT_COMMON = struct.Struct("<HHBB")  # kvmi_event.size, .vcpu, .event, .flags
_EVENT_PADDING = abi.KVMI_EVENT_.padding_struct.unpack_from  # type: ignore[union-attr]
_EVENT_MIN = abi.KVMI_EVENT_.size  # common part incl. arch: 544
_EVENT_FLAGS = abi.VMITRACE_EVENT_NO_REPLY | abi.VMITRACE_EVENT_CAPTURED | \
    abi.VMITRACE_EVENT_TABLE_CAPTURED
_BREAKPOINT = abi.KVMI_EVENT_BREAKPOINT_.struct
_BREAKPOINT_PADDING = abi.KVMI_EVENT_BREAKPOINT_.padding_struct.unpack_from  # type: ignore[union-attr]
_CAPTURED = abi.VMITRACE_CAPTURED.struct
_CAPTURED_PADDING = abi.VMITRACE_CAPTURED.padding_struct.unpack_from  # type: ignore[union-attr]
_CAPTURED_MIN = abi.KVMI_EVENT_BREAKPOINT_.size + abi.VMITRACE_CAPTURED.size
_TABLE_CAPTURED_SIZE = abi.VMITRACE_TABLE_CAPTURED.size
_TABLE_CAPTURED_PADDING = \
    abi.VMITRACE_TABLE_CAPTURED.padding_struct.unpack_from  # type: ignore[union-attr]
_POINTER_CAPTURE = abi.VMITRACE_POINTER_CAPTURE.struct.unpack_from  # gva, length, faulted, padding
_POINTER_CAPTURE_SIZE = abi.VMITRACE_POINTER_CAPTURE.size
_MAX_PAYLOAD = abi.KVMI_MSG_SIZE
_MAX_EVENT_PAYLOAD = abi.VMITRACE_EVENT_MSG_SIZE
_MAX_ABANDONED = 4096

# Reply prefix: kvmi_msg_hdr + kvmi_vcpu_hdr + kvmi_event_reply, then the specific reply.
_REPLY_PREFIX_FMT = abi.KVMI_MSG_HDR.fmt + abi.KVMI_VCPU_HDR.fmt + abi.KVMI_EVENT_REPLY_.fmt
_REPLY_PLAIN = struct.Struct("<" + _REPLY_PREFIX_FMT)
_REPLY_NEWVAL = struct.Struct("<" + _REPLY_PREFIX_FMT + abi.KVMI_EVENT_CR_REPLY.fmt)
assert abi.KVMI_EVENT_CR_REPLY.fmt == abi.KVMI_EVENT_MSR_REPLY.fmt
_REPLY_PLAIN_PAYLOAD = _REPLY_PLAIN.size - _HDR_SIZE
_REPLY_NEWVAL_PAYLOAD = _REPLY_NEWVAL.size - _HDR_SIZE
_ACTIONS = (abi.KVMI_EVENT_ACTION_CONTINUE, abi.KVMI_EVENT_ACTION_RETRY,
            abi.KVMI_EVENT_ACTION_CRASH)


def _value_getter(sd: abi.StructDef):  # type: ignore[no-untyped-def]
    """Return f(flat_tuple) -> tuple of the non-padding scalar values, in field order."""
    idx = []
    flat = 0
    for f in sd.fields:
        n = f.count if f.kind == "array" else 1
        if not f.padding:
            assert f.kind == "scalar", (sd.name, f.name)
            idx.append(flat)
        flat += n
    if len(idx) == 1:
        i = idx[0]
        return lambda vals: (vals[i],)
    return itemgetter(*idx)


# event id -> (class, payload struct (Struct, padding struct, getter) or None, payload size)
_EVENT_DECODERS: dict[int, tuple[type[Event], Any, Any, Any, int]] = {}
for _eid, (_name, _payload, _reply) in abi.EVENTS.items():
    if _payload is None:
        _EVENT_DECODERS[_eid] = (EVENT_CLASSES[_eid], None, None, None, 0)
    else:
        _EVENT_DECODERS[_eid] = (EVENT_CLASSES[_eid], _payload.struct, _payload.padding_struct,
                                 _value_getter(_payload), _payload.size)


class Handshake:
    """The host's ``kvmi_qemu2introspector``: which VM this connection is."""

    __slots__ = ("uuid", "name", "start_time", "struct_size", "raw")

    def __init__(self, uuid: uuidlib.UUID, name: str, start_time: int, struct_size: int,
                 raw: bytes) -> None:
        self.uuid = uuid
        self.name = name
        self.start_time = start_time
        self.struct_size = struct_size
        self.raw = raw

    def __repr__(self) -> str:
        return f"<Handshake uuid={self.uuid} name={self.name!r} start_time={self.start_time}>"


class CommandReply:
    """A reply to one of our commands: ``err`` (0 or ``-KVM_E*``) and the data after it."""

    __slots__ = ("msg_id", "seq", "err", "data", "raw")

    def __init__(self, msg_id: int, seq: int, err: int, data: bytes, raw: bytes) -> None:
        self.msg_id = msg_id
        self.seq = seq
        self.err = err
        self.data = data
        self.raw = raw

    def __repr__(self) -> str:
        name = abi.COMMAND_NAMES.get(self.msg_id, hex(self.msg_id))
        return f"<CommandReply {name} seq={self.seq} err={self.err} {len(self.data)}B>"


def parse_handshake(raw: bytes) -> Handshake:
    """Decode a complete ``kvmi_qemu2introspector`` (``struct_size`` bytes, maybe > 96)."""
    size = len(raw)
    if size < abi.HANDSHAKE_MIN_SIZE or size > abi.HANDSHAKE_MAX_SIZE:
        raise HandshakeError(f"handshake struct_size {size} outside "
                             f"[{abi.HANDSHAKE_MIN_SIZE}, {abi.HANDSHAKE_MAX_SIZE}]")
    full = raw[:abi.KVMI_QEMU2INTROSPECTOR.size].ljust(abi.KVMI_QEMU2INTROSPECTOR.size, b"\0")
    try:
        hs = abi.KVMI_QEMU2INTROSPECTOR.decode(full)
    except abi.AbiError as exc:
        raise HandshakeError(f"kvmi_qemu2introspector: {exc}") from None
    name = hs.name.split(b"\0", 1)[0].decode("utf-8", "replace")
    return Handshake(uuidlib.UUID(bytes=hs.uuid), name, hs.start_time, size, raw)


def build_handshake(uuid: uuidlib.UUID, name: str, start_time: int = 0,
                    struct_size: int | None = None) -> bytes:
    """A host's ``kvmi_qemu2introspector`` (for test peers and replay); name max 63 bytes."""
    encoded = name.encode()[:63]
    body = abi.KVMI_QEMU2INTROSPECTOR.encode(
        struct_size=struct_size or abi.KVMI_QEMU2INTROSPECTOR.size, uuid=uuid.bytes,
        start_time=start_time, name=encoded)
    if struct_size and struct_size > len(body):
        body += bytes(struct_size - len(body))
    return body


def cookie_hash(secret: bytes | None) -> bytes:
    """``introspector2qemu.cookie_hash``: SHA-1 of the shared secret, zeros without one."""
    return hashlib.sha1(secret).digest() if secret else bytes(20)


class IntrospectorProtocol:
    """State machine of one connection, introspector side; no I/O inside.

    States: ``"handshake"`` (waiting for the host's struct), ``"ready"``, ``"closed"`` (EOF
    seen), ``"failed"`` (a :class:`ProtocolError` was raised).
    """

    def __init__(self, secret: bytes | None = None) -> None:
        self.state = "handshake"
        self.handshake: Handshake | None = None
        self._secret = secret
        self._buf = bytearray()
        self._pending: dict[int, int] = {}  # seq -> command id
        self._abandoned: OrderedDict[int, int] = OrderedDict()  # timed-out seq -> id
        self._next_seq = 1

    # -- receiving ------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Any]:
        """Feed received bytes; return the complete messages they finish, in order.

        Messages are :class:`Handshake`, :class:`CommandReply` and :class:`Event` objects.
        On bad input the :class:`ProtocolError` raised carries, in ``messages``, the valid
        messages that preceded the bad one.
        """
        if self.state in ("closed", "failed"):
            raise ProtocolError(f"connection is {self.state}")
        if self._buf:  # the previous receive ended inside a message
            self._buf += data
            data = bytes(self._buf)
        elif type(data) is not bytes:
            data = bytes(data)  # messages keep `raw` as immutable bytes
        out: list[Any] = []
        pos = 0
        try:
            if self.state == "handshake":
                pos = self._parse_handshake(data, out)
                if not out:
                    return out
            pos = self._parse_messages(data, pos, out)
            return out
        except ProtocolError as exc:
            self.state = "failed"
            exc.messages = out
            raise
        finally:
            self._buf = bytearray(data[pos:])  # at most one incomplete message

    def receive_eof(self) -> None:
        """The peer closed; raise :class:`TruncatedMessage` if it stopped mid-message."""
        pending = len(self._buf)
        self._buf.clear()
        if self.state == "failed":
            return
        self.state = "closed"
        if pending:
            self.state = "failed"
            raise TruncatedMessage(f"connection closed with {pending} bytes of an incomplete "
                                   "message")

    def _parse_handshake(self, data: bytes, out: list[Any]) -> int:
        if len(data) < 4:
            return 0
        (size,) = struct.unpack_from("<I", data)
        if size < abi.HANDSHAKE_MIN_SIZE or size > abi.HANDSHAKE_MAX_SIZE:
            raise HandshakeError(f"handshake struct_size {size} outside "
                                 f"[{abi.HANDSHAKE_MIN_SIZE}, {abi.HANDSHAKE_MAX_SIZE}]")
        if len(data) < size:
            return 0
        hs = parse_handshake(data[:size])
        self.handshake = hs
        self.state = "ready"
        out.append(hs)
        return size

    def _parse_messages(self, data: bytes, pos: int, out: list[Any]) -> int:
        """Parse complete messages from ``data[pos:]``; returns where parsing stopped."""
        end = len(data)
        unpack_hdr = _HDR.unpack_from
        event_id = abi.KVMI_EVENT
        append = out.append
        while end - pos >= _HDR_SIZE:
            msg_id, size, seq = unpack_hdr(data, pos)
            if size > _MAX_PAYLOAD and (msg_id != event_id or size > _MAX_EVENT_PAYLOAD):
                raise OversizeMessage(f"message id {msg_id} announces {size} bytes "
                                      f"(max {abi.max_payload(msg_id)})")
            if msg_id != event_id:
                self._check_reply_header(msg_id, seq)
            total = _HDR_SIZE + size
            if end - pos < total:
                break
            raw = data[pos:pos + total]
            if msg_id == event_id:
                append(decode_event(raw, size, seq))
            else:
                reply = self._parse_reply(raw, msg_id, size, seq)
                if reply is not None:
                    append(reply)
            pos += total
        return pos

    def _check_reply_header(self, msg_id: int, seq: int) -> None:
        expected = self._pending.get(seq)
        if expected is None:
            expected = self._abandoned.get(seq)
        if msg_id not in abi.COMMAND_NAMES and expected != msg_id:
            raise UnknownMessage(f"unknown message id {msg_id:#x} (seq {seq})")
        if expected is None:
            raise SequenceError(f"reply {abi.COMMAND_NAMES[msg_id]} with seq {seq} matches "
                                "no pending command")
        if expected != msg_id:
            raise SequenceError(f"reply id {msg_id:#x} for seq {seq}, but that seq was "
                                f"{abi.COMMAND_NAMES.get(expected, hex(expected))}")

    def _parse_reply(self, raw: bytes, msg_id: int, size: int, seq: int) -> CommandReply | None:
        if size < _ERR.size:
            raise MalformedMessage(f"reply to {abi.COMMAND_NAMES.get(msg_id, msg_id)} has "
                                   f"{size} bytes, less than kvmi_error_code")
        err, pad = _ERR.unpack_from(raw, _HDR_SIZE)
        if pad:
            raise MalformedMessage("kvmi_error_code: non-zero padding")
        if err > 0:
            raise MalformedMessage(f"kvmi_error_code.err is positive ({err})")
        if self._pending.pop(seq, None) is None:
            self._abandoned.pop(seq, None)
            return None  # the command timed out; its late reply is dropped
        return CommandReply(msg_id, seq, err, raw[_HDR_SIZE + _ERR.size:], raw)

    # -- sending --------------------------------------------------------------------------
    def handshake_response(self) -> bytes:
        """``kvmi_introspector2qemu`` to send once the :class:`Handshake` arrived."""
        if self.handshake is None:
            raise ProtocolError("no handshake received yet")
        return abi.KVMI_INTROSPECTOR2QEMU.encode(struct_size=abi.KVMI_INTROSPECTOR2QEMU.size,
                                                 cookie_hash=cookie_hash(self._secret))

    def command(self, msg_id: int, payload: bytes = b"", vcpu: int | None = None
                ) -> tuple[int, bytes]:
        """Encode a command; returns ``(seq, bytes)``. ``vcpu`` prepends ``kvmi_vcpu_hdr``.

        For known commands the vCPU header is required exactly when the dialect needs one.
        """
        if self.state != "ready":
            raise ProtocolError(f"cannot send commands in state {self.state}")
        spec = abi.COMMANDS.get(msg_id)
        if msg_id in (abi.KVMI_EVENT, abi.KVMI_EVENT_REPLY):
            raise ValueError("events and event replies are not commands")
        if spec is not None and spec.vcpu != (vcpu is not None):
            raise ValueError(f"{spec.name} {'needs' if spec.vcpu else 'takes no'} vcpu")
        if vcpu is not None:
            payload = abi.KVMI_VCPU_HDR.encode(vcpu=vcpu) + payload
        if len(payload) > abi.max_payload(msg_id):
            raise ValueError(f"payload of {len(payload)} bytes exceeds "
                             f"{abi.max_payload(msg_id)}")
        seq = self._alloc_seq()
        self._pending[seq] = msg_id
        return seq, _HDR.pack(msg_id, len(payload), seq) + payload

    def abandon(self, seq: int) -> None:
        """Forget a pending command (timed out); its reply, if it ever comes, is dropped."""
        msg_id = self._pending.pop(seq, None)
        if msg_id is not None:
            self._abandoned[seq] = msg_id
            while len(self._abandoned) > _MAX_ABANDONED:
                self._abandoned.popitem(last=False)

    @property
    def pending(self) -> dict[int, int]:
        """Commands sent and not answered yet: seq -> command id."""
        return dict(self._pending)

    def _alloc_seq(self) -> int:
        for _ in range(len(self._pending) + len(self._abandoned) + 2):
            seq = self._next_seq
            self._next_seq = (seq + 1) & 0xFFFFFFFF or 1
            if seq not in self._pending and seq not in self._abandoned:
                return seq
        raise ProtocolError("no free sequence number")

    def event_reply(self, event: Event, action: int = abi.KVMI_EVENT_ACTION_CONTINUE,
                    **reply: Any) -> bytes:
        """Encode the reply to ``event`` (see :func:`encode_event_reply`)."""
        return encode_event_reply(event, action, **reply)


def decode_event(raw: bytes, size: int, seq: int, blocking: bool = True) -> Event:
    """Decode one complete KVMI_EVENT message (``raw`` includes the 8-byte header)."""
    if size < _EVENT_MIN:
        raise MalformedMessage(f"event message of {size} bytes is shorter than kvmi_event "
                               f"({_EVENT_MIN})")
    common_size, vcpu, event_id, flags = _EVENT_COMMON.unpack_from(raw, _HDR_SIZE)
    if common_size < _EVENT_MIN or common_size > size:
        raise MalformedMessage(f"kvmi_event.size {common_size} outside [{_EVENT_MIN}, {size}]")
    if any(_EVENT_PADDING(raw, _HDR_SIZE)):
        raise MalformedMessage("kvmi_event: non-zero padding")
    if flags:
        if flags & ~_EVENT_FLAGS:
            raise MalformedMessage(f"kvmi_event: unknown flags {flags:#x}")
        if flags & abi.VMITRACE_EVENT_NO_REPLY:
            blocking = False
        if flags & abi.VMITRACE_EVENT_CAPTURED:
            return _decode_captured(raw, size, seq, vcpu, event_id, common_size, blocking,
                                    bool(flags & abi.VMITRACE_EVENT_TABLE_CAPTURED))
        if flags & abi.VMITRACE_EVENT_TABLE_CAPTURED:
            raise MalformedMessage("kvmi_event: VMITRACE_EVENT_TABLE_CAPTURED without "
                                   "VMITRACE_EVENT_CAPTURED")
    dec = _EVENT_DECODERS.get(event_id)
    if dec is None:
        raise MalformedMessage(f"unknown event id {event_id}")
    cls, st, pad, getter, psize = dec
    off = _HDR_SIZE + common_size
    if size - common_size != psize:
        raise MalformedMessage(f"{cls.name}: payload of {size - common_size} bytes, "
                               f"expected {psize}")
    if st is None:
        return cls(seq, vcpu, raw, blocking)
    if pad is not None and any(pad.unpack_from(raw, off)):
        raise MalformedMessage(f"{cls.name}: non-zero padding")
    return cls(seq, vcpu, raw, blocking, *getter(st.unpack_from(raw, off)))


def _decode_captured(raw: bytes, size: int, seq: int, vcpu: int, event_id: int,
                     common_size: int, blocking: bool, table: bool) -> Event:
    """A breakpoint event with captured guest memory (vmitrace vendor extension); with
    ``table``, pointer captures follow the captures."""
    if event_id != abi.KVMI_EVENT_BREAKPOINT:
        raise MalformedMessage(f"captured memory on event id {event_id} (breakpoints only)")
    off = _HDR_SIZE + common_size
    if size - common_size < _CAPTURED_MIN:
        raise MalformedMessage(f"captured breakpoint payload of {size - common_size} bytes")
    gpa, insn_len = _BREAKPOINT.unpack_from(raw, off)[:2]
    if any(_BREAKPOINT_PADDING(raw, off)) or any(_CAPTURED_PADDING(raw, off + _BREAKPOINT.size)):
        raise MalformedMessage("captured breakpoint: non-zero padding")
    lengths = _CAPTURED.unpack_from(raw, off + _BREAKPOINT.size)[:abi.VMITRACE_CAPTURES]
    end = _CAPTURED_MIN + sum(lengths)  # of the captures, in payload bytes
    if max(lengths) > abi.VMITRACE_MAX_CAPTURE or \
            (end > size - common_size if table else end != size - common_size):
        raise MalformedMessage(f"captured breakpoint: lengths {lengths} do not fit "
                               f"{size - common_size} payload bytes")
    pos = off + _CAPTURED_MIN
    captured = []
    for length in lengths:
        captured.append(raw[pos:pos + length])
        pos += length
    pointer_captures = _decode_pointer_captures(raw, pos) if table else ()
    return BreakpointEvent(seq, vcpu, raw, blocking, gpa, insn_len, tuple(captured),
                           pointer_captures)


def _decode_pointer_captures(raw: bytes, pos: int) -> tuple[PointerCapture, ...]:
    """The vmitrace_table_captured at ``pos`` and what follows it, up to the message's end."""
    end = len(raw)
    if end - pos < _TABLE_CAPTURED_SIZE:
        raise MalformedMessage("pointer captures: no room for vmitrace_table_captured")
    count = raw[pos]
    if any(_TABLE_CAPTURED_PADDING(raw, pos)):
        raise MalformedMessage("vmitrace_table_captured: non-zero padding")
    if not 1 <= count <= abi.VMITRACE_MAX_TABLE_CAPTURES:
        raise MalformedMessage(f"vmitrace_table_captured: count {count} outside "
                               f"1-{abi.VMITRACE_MAX_TABLE_CAPTURES}")
    pos += _TABLE_CAPTURED_SIZE
    data = pos + count * _POINTER_CAPTURE_SIZE
    if data > end:
        raise MalformedMessage(f"pointer captures: {count} do not fit the message")
    out = []
    for _ in range(count):
        gva, length, faulted, *padding = _POINTER_CAPTURE(raw, pos)
        if any(padding) or faulted > 1 or length > abi.VMITRACE_MAX_POINTER_CAPTURE or \
                data + length > end:
            raise MalformedMessage(f"vmitrace_pointer_capture: length {length}, faulted "
                                   f"{faulted}, padding {padding} (message {end} bytes)")
        out.append(PointerCapture(gva, raw[data:data + length], faulted == 1))
        pos += _POINTER_CAPTURE_SIZE
        data += length
    if data != end:
        raise MalformedMessage(f"pointer captures end {end - data} bytes before the message")
    return tuple(out)


def encode_event_reply(event: Event, action: int = abi.KVMI_EVENT_ACTION_CONTINUE,
                       **reply: Any) -> bytes:
    """EVENT_REPLY for ``event``: header (event's seq), vcpu hdr, kvmi_event_reply, specific.

    CR and MSR replies take ``new_val`` (default: the event's ``new_value``, i.e. allow the
    write); PF replies take the ``kvmi_event_pf_reply`` fields; other events take none.
    """
    if action not in _ACTIONS:
        raise ValueError(f"unknown event action {action}")
    eid = event.event_id
    if eid == abi.KVMI_EVENT_CR or eid == abi.KVMI_EVENT_MSR:
        new_val = reply.pop("new_val", None)
        if reply:
            raise ValueError(f"{event.name} reply takes only new_val, got {sorted(reply)}")
        if new_val is None:
            new_val = event.new_value  # type: ignore[attr-defined]
        return _REPLY_NEWVAL.pack(abi.KVMI_EVENT_REPLY, _REPLY_NEWVAL_PAYLOAD, event.seq,
                                  event.vcpu, 0, 0, action, eid, 0, 0, new_val)
    if eid == abi.KVMI_EVENT_PF:
        specific = abi.KVMI_EVENT_PF_REPLY.encode(reply)
        return _REPLY_PLAIN.pack(abi.KVMI_EVENT_REPLY, _REPLY_PLAIN_PAYLOAD + len(specific),
                                 event.seq, event.vcpu, 0, 0, action, eid, 0, 0) + specific
    if reply:
        raise ValueError(f"{event.name} reply has no specific fields, got {sorted(reply)}")
    return _REPLY_PLAIN.pack(abi.KVMI_EVENT_REPLY, _REPLY_PLAIN_PAYLOAD, event.seq,
                             event.vcpu, 0, 0, action, eid, 0, 0)


def encode_message(msg_id: int, seq: int, payload: bytes) -> bytes:
    """Header + payload (for host-side peers and tests)."""
    if len(payload) > abi.max_payload(msg_id):
        raise ValueError(f"payload of {len(payload)} bytes exceeds {abi.max_payload(msg_id)}")
    return _HDR.pack(msg_id, len(payload), seq) + payload


def build_event(seq: int, vcpu: int, event_id: int, arch: Any = None, *, blocking: bool = True,
                captured: Sequence[bytes] | None = None,
                pointer_captures: Sequence[PointerCapture] = (), **fields: Any) -> bytes:
    """A host's KVMI_EVENT message (for test peers, replay fixtures and benchmarks).

    ``arch`` is a mapping/namedtuple of ``kvmi_event_arch`` fields; ``fields`` are the
    event-specific payload fields. vmitrace hosts' additions: ``blocking=False`` sets
    VMITRACE_EVENT_NO_REPLY; for breakpoints, ``captured`` (the bytes of up to two captures)
    and then ``pointer_captures`` (up to four) follow the payload.
    """
    name, payload_sd, _ = abi.EVENTS[event_id]
    if payload_sd is None:
        if fields:
            raise ValueError(f"{name} has no payload fields")
        payload = b""
    else:
        payload = payload_sd.encode(fields)
    flags = 0 if blocking else abi.VMITRACE_EVENT_NO_REPLY
    if captured is not None:
        flags |= abi.VMITRACE_EVENT_CAPTURED
        lengths = [len(c) for c in captured] + [0] * (abi.VMITRACE_CAPTURES - len(captured))
        payload += abi.VMITRACE_CAPTURED.encode(length=lengths) + b"".join(captured)
    if pointer_captures:
        if captured is None:
            raise ValueError("pointer captures come only with captured")
        flags |= abi.VMITRACE_EVENT_TABLE_CAPTURED
        payload += abi.VMITRACE_TABLE_CAPTURED.encode(count=len(pointer_captures))
        payload += b"".join(abi.VMITRACE_POINTER_CAPTURE.encode(
            gva=pc.gva, length=len(pc.data), faulted=int(pc.faulted)) for pc in pointer_captures)
        payload += b"".join(pc.data for pc in pointer_captures)
    common = abi.KVMI_EVENT_.encode(size=abi.KVMI_EVENT_.size, vcpu=vcpu, event=event_id,
                                    flags=flags, arch=arch or {})
    return encode_message(abi.KVMI_EVENT, seq, common + payload)
