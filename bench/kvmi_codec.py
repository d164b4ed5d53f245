"""KVMI codec throughput: events decoded/s and replies encoded/s on one core.

Each figure is printed with its ratio to a bare ``struct.unpack_from``/``pack_into`` of the
same bytes measured in the same run (the floor any Python decoder pays), so results compare
across machines. Rates are per CPU second of this process (time.process_time), so a machine
shared with other work still reports single-core throughput. Goal (project issue 2):
>= 200 000 events/s decoded.

The last section times blocking-event round trips over a socketpair: a host thread sends one
BREAKPOINT event and waits for its EVENT_REPLY before sending the next, and the introspector
side is either a :class:`~tracer.kvmi.transport.Session` (``next_event`` + ``reply``) or a
bare socket loop that reads the event's bytes and writes a fixed reply (the floor of two
threads ping-ponging over a unix socket in Python). Those rates are in wall time.

    .venv/bin/python bench/kvmi_codec.py [--events 200000] [--repeat 3] [--round-trips 20000]
"""
from __future__ import annotations

import argparse
import socket
import struct
import threading
import time
import uuid

from tracer.kvmi import abi
from tracer.kvmi.protocol import (IntrospectorProtocol, build_event, build_handshake,
                                  encode_event_reply)
from tracer.kvmi.transport import Session

CHUNK = 65536


def make_stream(n: int) -> bytes:
    """n events: CR, MSR and BREAKPOINT in turn, realistic registers."""
    arch = {"mode": 8, "regs": {"rip": 0xFFFFFFFF81000000, "rax": 39, "rsp": 0x7FFC0000},
            "sregs": {"cr3": 0x1234000, "cr0": 0x80050033},
            "msrs": {"lstar": 0xFFFFFFFF81A00080}}
    kinds = [
        build_event(0, 0, abi.KVMI_EVENT_CR, arch, cr=3, old_value=0x1000, new_value=0x2000),
        build_event(0, 1, abi.KVMI_EVENT_MSR, arch, msr=0xC0000082, old_value=1, new_value=2),
        build_event(0, 0, abi.KVMI_EVENT_BREAKPOINT, arch, gpa=0x1000000, insn_len=1),
    ]
    out = bytearray()
    for k in range(n):
        msg = bytearray(kinds[k % 3])
        struct.pack_into("<I", msg, 4, k + 1)  # seq
        out += msg
    return bytes(out)


def bench_decode(stream: bytes, n: int) -> float:
    proto = IntrospectorProtocol()
    proto.receive_data(build_handshake(uuid.uuid4(), "bench"))
    got = 0
    t0 = time.process_time()
    for k in range(0, len(stream), CHUNK):
        got += len(proto.receive_data(stream[k:k + CHUNK]))
    dt = time.process_time() - t0
    assert got == n, (got, n)
    return n / dt


def bench_decode_baseline(stream: bytes, n: int) -> float:
    """The floor: unpack header, event common part and payload of each message, nothing else."""
    unpack_hdr = struct.Struct("<HHI").unpack_from
    unpack_common = struct.Struct("<HHB3x").unpack_from
    payloads = {24: struct.Struct("<QQQ").unpack_from, 16: struct.Struct("<QB7x").unpack_from}
    got = 0
    pos = 0
    end = len(stream)
    t0 = time.process_time()
    while pos < end:
        _id, size, _seq = unpack_hdr(stream, pos)
        csize, _vcpu, _event = unpack_common(stream, pos + 8)
        payloads[size - csize](stream, pos + 8 + csize)
        pos += 8 + size
        got += 1
    dt = time.process_time() - t0
    assert got == n
    return n / dt


def bench_arch(events: list) -> float:
    t0 = time.process_time()
    for ev in events:
        ev._arch = None
        _ = ev.arch.regs.rip
    return len(events) / (time.process_time() - t0)


def bench_regs(events: list) -> float:
    t0 = time.process_time()
    for ev in events:
        _ = ev.regs.rip
    return len(events) / (time.process_time() - t0)


def bench_encode(events: list) -> float:
    t0 = time.process_time()
    for ev in events:
        encode_event_reply(ev)
    return len(events) / (time.process_time() - t0)


def bench_encode_baseline(events: list) -> float:
    """The floor: pack the same reply bytes (hdr, vcpu hdr, event reply, new_val) in place."""
    rep = struct.Struct("<HHIH2x4xBB2x4xQ")
    buf = bytearray(rep.size)
    pack_into = rep.pack_into
    t0 = time.process_time()
    for ev in events:
        pack_into(buf, 0, 0, 24, ev.seq, ev.vcpu, 0, ev.event_id, 0)
    return len(events) / (time.process_time() - t0)


_HDR = struct.Struct("<HHI")  # kvmi_msg_hdr: id, size, seq


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _host(sock: socket.socket, n: int, event: bytes) -> None:
    """n blocking events, each sent after the reply to the previous one was read."""
    msg = bytearray(event)
    try:
        for k in range(n):
            struct.pack_into("<I", msg, 4, k + 1)  # seq
            sock.sendall(msg)
            _msg_id, size, seq = _HDR.unpack(_recv_exact(sock, _HDR.size))
            _recv_exact(sock, size)
            assert seq == k + 1, (seq, k + 1)
    except (EOFError, OSError):
        pass


def _breakpoint_event() -> bytes:
    arch = {"mode": 8, "regs": {"rip": 0xFFFFFFFF81000000, "rax": 39}}
    return build_event(1, 0, abi.KVMI_EVENT_BREAKPOINT, arch, gpa=0x1000000, insn_len=1)


def bench_round_trips_session(n: int) -> float:
    ours, theirs = socket.socketpair()
    host_thread = threading.Thread(target=lambda: (theirs.sendall(
        build_handshake(uuid.uuid4(), "bench")), theirs.recv(64)), daemon=True)
    host_thread.start()
    s = Session.from_socket(ours, command_timeout=10)
    host_thread.join()
    host_thread = threading.Thread(target=_host, args=(theirs, n, _breakpoint_event()),
                                   daemon=True)
    t0 = time.perf_counter()
    host_thread.start()
    for _ in range(n):
        ev = s.next_event(timeout=10)
        assert ev is not None
        s.reply(ev)
    host_thread.join()
    dt = time.perf_counter() - t0
    s.close()
    theirs.close()
    return n / dt


def bench_round_trips_baseline(n: int) -> float:
    """The floor: read exactly one event's bytes, write a prebuilt reply of the right size."""
    ours, theirs = socket.socketpair()
    event = _breakpoint_event()
    reply = _HDR.pack(abi.KVMI_EVENT_REPLY, 16, 0) + bytes(16)
    host_thread = threading.Thread(target=_host, args=(theirs, n, event), daemon=True)
    seq_pack = struct.Struct("<I").pack_into
    out = bytearray(reply)
    t0 = time.perf_counter()
    host_thread.start()
    for k in range(n):
        _recv_exact(ours, len(event))
        seq_pack(out, 4, k + 1)
        ours.sendall(out)
    host_thread.join()
    dt = time.perf_counter() - t0
    ours.close()
    theirs.close()
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--round-trips", type=int, default=20_000)
    args = ap.parse_args()
    n = args.events
    stream = make_stream(n)
    proto = IntrospectorProtocol()
    proto.receive_data(build_handshake(uuid.uuid4(), "bench"))
    events = proto.receive_data(stream)
    sample = events[: min(n, 50_000)]

    def best(fn, *a) -> float:  # type: ignore[no-untyped-def]
        return max(fn(*a) for _ in range(args.repeat))

    dec, dec_base = best(bench_decode, stream, n), best(bench_decode_baseline, stream, n)
    enc, enc_base = best(bench_encode, events), best(bench_encode_baseline, events)
    arch = best(bench_arch, sample)
    regs = best(bench_regs, sample)
    print(f"kvmi codec benchmark: {n} events (CR/MSR/BREAKPOINT, {len(stream) // n} B each), "
          f"best of {args.repeat}, per CPU second")
    print(f"  events decoded      {dec:12,.0f} /s   bare struct.unpack_from {dec_base:12,.0f} /s"
          f"   ratio {dec / dec_base:.2f}")
    print(f"  replies encoded     {enc:12,.0f} /s   bare struct.pack_into   {enc_base:12,.0f} /s"
          f"   ratio {enc / enc_base:.2f}")
    print(f"  event.arch (regs, sregs, msrs) decoded on access {arch:12,.0f} /s")
    print(f"  event.regs alone decoded on access             {regs:12,.0f} /s")
    print(f"  goal >= 200,000 events/s decoded: {'met' if dec >= 200_000 else 'NOT met'}")
    rt = best(bench_round_trips_session, args.round_trips)
    rt_base = best(bench_round_trips_baseline, args.round_trips)
    print(f"  blocking event round trips (Session next_event + reply, wall time) "
          f"{rt:10,.0f} /s")
    print(f"  bare socket read + write round trips                            "
          f"{rt_base:10,.0f} /s   ratio {rt / rt_base:.2f}")


if __name__ == "__main__":
    main()
