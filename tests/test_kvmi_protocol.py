"""The sans-IO protocol core: handshake, events, replies, failure paths, fuzzing."""
from __future__ import annotations

import hashlib
import struct
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.kvmi_peer import (ARCH_SIZE, HDR, QEMU2INTRO, breakpoint_payload,
                               captured_breakpoint_payload, cr_payload, event_message,
                               msr_payload, arch_bytes)
from tracer.kvmi import abi, errors
from tracer.kvmi.events import BreakpointEvent, CrEvent, Event, MsrEvent, PointerCapture
from tracer.kvmi.protocol import (CommandReply, Handshake, IntrospectorProtocol, build_event,
                                  encode_event_reply)

VM = uuid.UUID("12345678-1234-5678-9abc-def012345678")


def handshake_bytes(name: str = "vm-a", extra: int = 0, size: int | None = None) -> bytes:
    return QEMU2INTRO.pack(size or QEMU2INTRO.size + extra, VM.bytes, 0, 42,
                           name.encode()) + bytes(extra)


def ready(secret: bytes | None = None) -> IntrospectorProtocol:
    p = IntrospectorProtocol(secret=secret)
    assert isinstance(p.receive_data(handshake_bytes())[0], Handshake)
    return p


def reply_bytes(msg_id: int, seq: int, err: int = 0, data: bytes = b"") -> bytes:
    body = struct.pack("<iI", err, 0) + data
    return HDR.pack(msg_id, len(body), seq) + body


def test_handshake_split_at_every_byte() -> None:
    data = handshake_bytes()
    for cut in range(len(data) + 1):
        p = IntrospectorProtocol()
        msgs = p.receive_data(data[:cut]) + p.receive_data(data[cut:])
        assert len(msgs) == 1
        hs = msgs[0]
        assert (hs.uuid, hs.name, hs.start_time, hs.struct_size) == (VM, "vm-a", 42, 96)
        assert p.state == "ready"


def test_larger_handshake_tail_is_ignored_and_events_follow() -> None:
    p = IntrospectorProtocol()
    ev = event_message(9, 0, 10)
    msgs = p.receive_data(handshake_bytes(extra=100) + ev)
    assert msgs[0].struct_size == 196 and msgs[0].raw == handshake_bytes(extra=100)
    assert msgs[1].name == "KVMI_EVENT_PAUSE_VCPU" and msgs[1].seq == 9


@pytest.mark.parametrize("size", [0, 31, 64 * 1024 + 1, 0xFFFFFFFF])
def test_handshake_size_out_of_bounds(size: int) -> None:
    p = IntrospectorProtocol()
    with pytest.raises(errors.HandshakeError):
        p.receive_data(struct.pack("<I", size) + bytes(92))
    assert p.state == "failed"


def test_handshake_padding_must_be_zero_and_name_is_bounded() -> None:
    bad = bytearray(handshake_bytes())
    bad[20] = 1  # kvmi_qemu2introspector.padding
    with pytest.raises(errors.HandshakeError):
        IntrospectorProtocol().receive_data(bytes(bad))
    noterm = QEMU2INTRO.pack(96, VM.bytes, 0, 0, b"A" * 64)
    hs = IntrospectorProtocol().receive_data(noterm)[0]
    assert hs.name == "A" * 64


@pytest.mark.parametrize("secret,expected", [
    (None, bytes(20)), (b"s3cret", hashlib.sha1(b"s3cret").digest())])
def test_handshake_response(secret: bytes | None, expected: bytes) -> None:
    p = ready(secret)
    assert p.handshake_response() == struct.pack("<I20s", 24, expected)


def test_events_decode_with_arch() -> None:
    p = ready()
    stream = (event_message(1, 2, 1, cr_payload(3, 0x1000, 0x2000),
                            arch_bytes(rip=0xFFFFFFFF81000000, cr3=0x1234000, lstar=0xABC)) +
              event_message(2, 0, 2, msr_payload(0xC0000082, 1, 2)) +
              event_message(3, 1, 4, breakpoint_payload(0x1000123, 3)))
    msgs = []
    for b in stream:  # byte by byte
        msgs += p.receive_data(bytes([b]))
    cr, msr, bp = msgs
    assert isinstance(cr, CrEvent) and (cr.seq, cr.vcpu, cr.cr, cr.old_value, cr.new_value) == \
        (1, 2, 3, 0x1000, 0x2000)
    assert cr.arch.regs.rip == 0xFFFFFFFF81000000 and cr.arch.mode == 8
    assert cr.arch.sregs.cr3 == 0x1234000 and cr.arch.msrs.lstar == 0xABC
    assert cr.arch.sregs.cs.selector == 0x10 and cr.arch.sregs.gdt.limit == 0x7F
    assert isinstance(msr, MsrEvent) and (msr.msr, msr.new_value) == (0xC0000082, 2)
    assert isinstance(bp, BreakpointEvent) and (bp.gpa, bp.insn_len) == (0x1000123, 3)


def test_every_event_kind_decodes() -> None:
    payloads = {0: b"", 1: cr_payload(0, 1, 2), 2: msr_payload(1, 2, 3), 3: b"",
                4: breakpoint_payload(5, 1), 5: b"", 6: struct.pack("<QQBxH4x", 1, 2, 3, 4),
                7: struct.pack("<BxxxIQ", 14, 2, 0xDEAD), 8: struct.pack("<BB6x", 1, 1),
                9: b"", 10: b"", 11: struct.pack("<B7x", 1),
                13: struct.pack("<IIB3x4x", 7, 0, 2)}
    p = ready()
    for eid, payload in payloads.items():
        (ev,) = p.receive_data(event_message(100 + eid, 0, eid, payload))
        assert ev.event_id == eid and ev.name == abi.EVENTS[eid][0]
    (pf,) = p.receive_data(event_message(1, 0, 6, payloads[6]))
    assert (pf.gva, pf.gpa, pf.access, pf.view) == (1, 2, 3, 4)
    (trap,) = p.receive_data(event_message(2, 0, 7, payloads[7]))
    assert (trap.vector, trap.error_code, trap.cr2) == (14, 2, 0xDEAD)
    (cpuid,) = p.receive_data(event_message(3, 0, 13, payloads[13]))
    assert (cpuid.function, cpuid.index, cpuid.insn_length) == (7, 0, 2)


def test_event_no_reply_flag() -> None:
    """vmitrace's flag: the vCPU ran on; the event needs (and gets) no reply."""
    msg = bytearray(event_message(1, 0, 1, cr_payload(3, 1, 2)))
    (plain,) = ready().receive_data(bytes(msg))
    msg[13] = abi.VMITRACE_EVENT_NO_REPLY
    (flagged,) = ready().receive_data(bytes(msg))
    assert plain.blocking and not flagged.blocking
    assert (flagged.cr, flagged.old_value, flagged.new_value) == (3, 1, 2)


CAPTURED, TABLE = abi.VMITRACE_EVENT_CAPTURED, abi.VMITRACE_EVENT_TABLE_CAPTURED


def test_pointer_captures_decode_in_table_order() -> None:
    """vmitrace's VMITRACE_SET_CAPTURE_TABLE: pointer captures after the captured bytes."""
    pt_regs = bytes(range(168))
    pointers = [(0x7FFC_0000_1000, b"/tmp/vmitrace-wl-file.dat\0", 0),
                (0x4C_5FF0, b"x" * 16, 1),  # the page after these bytes did not translate
                (0, b"", 1),                # a NULL pointer
                (0x7FFC_0000_2000, b"", 0)]  # a length word of 0 (or negative)
    msg = event_message(9, 1, abi.KVMI_EVENT_BREAKPOINT,
                        captured_breakpoint_payload(0x1000, 5, [pt_regs, b"\x01" * 8], pointers),
                        arch=bytes(ARCH_SIZE), flags=CAPTURED | TABLE | abi.VMITRACE_EVENT_NO_REPLY)
    p = ready()
    events = [e for b in msg for e in p.receive_data(bytes([b]))]  # byte by byte
    (ev,) = events
    assert isinstance(ev, BreakpointEvent) and not ev.blocking
    assert (ev.gpa, ev.insn_len, ev.captured) == (0x1000, 5, (pt_regs, b"\x01" * 8))
    assert ev.pointer_captures == tuple(PointerCapture(gva, data, bool(faulted))
                                        for gva, data, faulted in pointers)
    assert build_event(9, 1, abi.KVMI_EVENT_BREAKPOINT, blocking=False, gpa=0x1000, insn_len=5,
                       captured=[pt_regs, b"\x01" * 8], pointer_captures=ev.pointer_captures) == msg
    # Without the flag there are none, and the captures alone fill the message.
    (plain,) = ready().receive_data(event_message(
        1, 0, 4, captured_breakpoint_payload(0x1000, 5, [pt_regs]), flags=CAPTURED))
    assert plain.captured == (pt_regs, b"") and plain.pointer_captures == ()


def test_largest_pointer_capture_event_exceeds_kvmi_msg_size() -> None:
    full = [(0x1000 * k, bytes([k]) * abi.VMITRACE_MAX_POINTER_CAPTURE, 0) for k in range(1, 5)]
    msg = event_message(1, 0, 4, captured_breakpoint_payload(1, 1, [bytes(256)] * 2, full),
                        flags=CAPTURED | TABLE)
    assert len(msg) - 8 == abi.VMITRACE_EVENT_MSG_SIZE > abi.KVMI_MSG_SIZE
    p = ready()
    events = [e for k in range(0, len(msg), 4096) for e in p.receive_data(msg[k:k + 4096])]
    assert [pc.data for pc in events[0].pointer_captures] == [data for _, data, _ in full]
    with pytest.raises(errors.OversizeMessage):
        ready().receive_data(HDR.pack(abi.KVMI_EVENT, abi.VMITRACE_EVENT_MSG_SIZE + 1, 2))


def _table_tail(tail: bytes, flags: int = CAPTURED | TABLE) -> bytes:
    return event_message(1, 0, 4, captured_breakpoint_payload(1, 1, [b"abc"]) + tail,
                         flags=flags)


_ONE = struct.pack("<B7x", 1) + struct.pack("<QHB5x", 0x1000, 2, 0) + b"ok"


@pytest.mark.parametrize("msg", [
    _table_tail(_ONE, flags=TABLE),                                   # without CAPTURED
    event_message(1, 0, 4, breakpoint_payload(1, 1), flags=TABLE),    # likewise
    event_message(1, 0, 1, cr_payload(3, 1, 2) + _ONE, flags=CAPTURED | TABLE),  # not a bp
    _table_tail(b""),                                                 # flag, nothing follows
    _table_tail(_ONE[:7]),                                            # a cut header
    _table_tail(struct.pack("<B7x", 0)),                              # count 0
    _table_tail(struct.pack("<B7x", 5) + struct.pack("<QHB5x", 1, 0, 0) * 5),  # count 5
    _table_tail(struct.pack("<B6xB", 1, 1) + _ONE[8:]),               # header padding
    _table_tail(_ONE[:8] + struct.pack("<QHB4xB", 0x1000, 2, 0, 1) + b"ok"),  # capture padding
    _table_tail(_ONE[:8] + struct.pack("<QHB5x", 0x1000, 2, 2) + b"ok"),      # faulted 2
    _table_tail(_ONE[:8] + struct.pack("<QHB5x", 0x1000, 8193, 0) + bytes(8193)),  # > 8192
    _table_tail(struct.pack("<B7x", 2) + _ONE[8:]),                   # 2 captures, 1 header
    _table_tail(_ONE[:-1]),                                           # bytes missing
    _table_tail(_ONE + b"!"),                                         # bytes left over
])
def test_malformed_pointer_captures(msg: bytes) -> None:
    p = ready()
    with pytest.raises(errors.MalformedMessage):
        p.receive_data(msg)
    assert p.state == "failed"


@pytest.mark.parametrize("mutate,error", [
    (lambda m: m[:13] + b"\x02" + m[14:], errors.MalformedMessage),  # unknown kvmi_event.flags
    (lambda m: m[:14] + b"\x01" + m[15:], errors.MalformedMessage),  # kvmi_event.padding
    (lambda m: m[:17] + b"\x01" + m[18:], errors.MalformedMessage),  # arch.padding1
    (lambda m: m[:8 + 544 + 2] + b"\x01" + m[8 + 544 + 3:], errors.MalformedMessage),  # cr pad
    (lambda m: m[:12] + b"" + m[12:], None),  # unchanged
])
def test_event_padding(mutate, error) -> None:
    msg = event_message(1, 0, 1, cr_payload(3, 1, 2))
    p = ready()
    if error is None:
        assert len(p.receive_data(mutate(msg))) == 1
    else:
        with pytest.raises(error):
            p.receive_data(mutate(msg))
        assert p.state == "failed"


def test_event_size_mismatches() -> None:
    short = event_message(1, 0, 1, cr_payload(3, 1, 2)[:-1])
    with pytest.raises(errors.MalformedMessage):
        ready().receive_data(short)
    unknown_event = event_message(1, 0, 12)
    with pytest.raises(errors.MalformedMessage):
        ready().receive_data(unknown_event)
    tiny = HDR.pack(1, 8, 1) + bytes(8)
    with pytest.raises(errors.MalformedMessage):
        ready().receive_data(tiny)


def test_command_and_reply_matching() -> None:
    p = ready()
    seq, data = p.command(abi.KVMI_GET_VERSION)
    assert data == HDR.pack(2, 0, seq)
    seq2, data2 = p.command(abi.KVMI_CONTROL_EVENTS, struct.pack("<HB1x4x", 1, 1), vcpu=3)
    assert data2 == HDR.pack(9, 16, seq2) + struct.pack("<H2x4x", 3) + struct.pack("<HB5x", 1, 1)
    assert seq2 == seq + 1
    msgs = p.receive_data(reply_bytes(9, seq2) + reply_bytes(2, seq, 0, struct.pack("<I4x8x", 1)))
    assert [type(m) for m in msgs] == [CommandReply, CommandReply]
    assert (msgs[0].seq, msgs[0].err, msgs[1].data[:4]) == (seq2, 0, b"\x01\0\0\0")
    assert p.pending == {}
    with pytest.raises(ValueError):
        p.command(abi.KVMI_GET_REGISTERS)  # needs a vcpu
    with pytest.raises(ValueError):
        p.command(abi.KVMI_READ_PHYSICAL, bytes(16), vcpu=0)
    with pytest.raises(ValueError):
        p.command(abi.KVMI_WRITE_PHYSICAL, bytes(8185))


def test_abandoned_command_reply_is_dropped() -> None:
    p = ready()
    seq, _ = p.command(abi.KVMI_GET_GUEST_INFO)
    p.abandon(seq)
    assert p.receive_data(reply_bytes(5, seq, 0, bytes(16))) == []
    with pytest.raises(errors.SequenceError):  # a second reply for it is a protocol error
        p.receive_data(reply_bytes(5, seq, 0, bytes(16)))


@pytest.mark.parametrize("data,error", [
    (reply_bytes(5, 77), errors.SequenceError),  # nobody asked
    (reply_bytes(0x1234, 1), errors.UnknownMessage),
    (HDR.pack(5, 8185, 1), errors.OversizeMessage),
    (HDR.pack(5, 4, 1) + bytes(4), errors.MalformedMessage),  # shorter than kvmi_error_code
    (HDR.pack(5, 8, 1) + struct.pack("<iI", 0, 1), errors.MalformedMessage),  # err padding
    (HDR.pack(5, 8, 1) + struct.pack("<iI", 5, 0), errors.MalformedMessage),  # err > 0
])
def test_bad_messages(data: bytes, error: type) -> None:
    p = ready()
    p.command(abi.KVMI_GET_GUEST_INFO)  # seq 1 pending, id 5
    with pytest.raises(error):
        p.receive_data(data)
    assert p.state == "failed"
    with pytest.raises(errors.ProtocolError):
        p.receive_data(b"")


def test_wrong_id_for_pending_seq() -> None:
    p = ready()
    seq, _ = p.command(abi.KVMI_GET_GUEST_INFO)
    with pytest.raises(errors.SequenceError):
        p.receive_data(reply_bytes(abi.KVMI_GET_VERSION, seq))


def test_eof_mid_message() -> None:
    p = ready()
    p.receive_data(event_message(1, 0, 10)[:100])
    with pytest.raises(errors.TruncatedMessage):
        p.receive_eof()
    p2 = ready()
    p2.receive_eof()
    assert p2.state == "closed"


def test_event_reply_bytes() -> None:
    p = ready()
    cr, msr, bp, pf = p.receive_data(
        event_message(5, 2, 1, cr_payload(4, 1, 2)) + event_message(6, 1, 2, msr_payload(9, 1, 7))
        + event_message(7, 0, 4, breakpoint_payload(1, 1))
        + event_message(8, 3, 6, struct.pack("<QQBxH4x", 1, 2, 3, 0)))
    prefix = struct.Struct("<HHI H2x4x BB2x4x")
    assert encode_event_reply(cr) == prefix.pack(0, 24, 5, 2, 0, 1) + struct.pack("<Q", 2)
    assert encode_event_reply(cr, 1, new_val=9) == prefix.pack(0, 24, 5, 2, 1, 1) + \
        struct.pack("<Q", 9)
    assert encode_event_reply(msr) == prefix.pack(0, 24, 6, 1, 0, 2) + struct.pack("<Q", 7)
    assert encode_event_reply(bp, 2) == prefix.pack(0, 16, 7, 0, 2, 4)
    pf_reply = encode_event_reply(pf, 1, singlestep=1, ctx_addr=0x10)
    assert pf_reply == prefix.pack(0, 16 + 272, 8, 3, 1, 6) + \
        struct.pack("<QIBB2x256s", 0x10, 0, 1, 0, b"")
    with pytest.raises(ValueError):
        encode_event_reply(bp, 3)
    with pytest.raises(ValueError):
        encode_event_reply(bp, 0, new_val=1)


# -- property tests -------------------------------------------------------------------------

def _feed(p: IntrospectorProtocol, data: bytes, chunk: int) -> list:
    out = []
    try:
        for k in range(0, len(data), chunk):
            out += p.receive_data(data[k:k + chunk])
        p.receive_eof()
    except errors.ProtocolError:
        assert p.state == "failed"
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), chunk=st.integers(1, 700), handshaken=st.booleans())
def test_random_bytes_only_raise_protocol_errors(data: bytes, chunk: int, handshaken: bool) -> None:
    p = ready() if handshaken else IntrospectorProtocol()
    if handshaken:
        p.command(abi.KVMI_GET_VERSION)
        p.command(abi.KVMI_GET_REGISTERS, bytes(8), vcpu=0)
    for m in _feed(p, data, chunk):
        assert isinstance(m, (Handshake, CommandReply, Event))
    assert len(p._buf) <= 64 * 1024


def _valid_stream() -> tuple[bytes, IntrospectorProtocol]:
    p = ready()
    seq, _ = p.command(abi.KVMI_GET_VERSION)
    stream = (event_message(1, 0, 1, cr_payload(3, 1, 2)) + reply_bytes(2, seq, 0, bytes(16))
              + event_message(2, 1, 4, breakpoint_payload(0x55, 2))
              + event_message(3, 0, 10))
    return stream, p


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_valid_streams(data) -> None:
    stream, p = _valid_stream()
    buf = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if op == "flip":
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[pos:pos + data.draw(st.integers(1, 40))]
        else:
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=20))
    chunk = data.draw(st.integers(1, 2000))
    for m in _feed(p, bytes(buf), chunk):
        assert isinstance(m, (CommandReply, Event))
        if isinstance(m, Event):
            assert m.arch.mode >= 0  # lazily decoded arch never fails on accepted events


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=600))
def test_struct_decoders_only_raise_abi_errors(data: bytes) -> None:
    for sd in abi.STRUCTS.values():
        try:
            sd.decode(data)
        except abi.AbiError:
            pass
