"""KVMI codec throughput: events decoded/s and replies encoded/s on one core.

Each figure is printed with its ratio to a bare ``struct.unpack_from``/``pack_into`` of the
same bytes measured in the same run (the floor any Python decoder pays), so results compare
across machines. Rates are per CPU second of this process (time.process_time), so a machine
shared with other work still reports single-core throughput. Goal (project issue 2):
>= 200 000 events/s decoded.

    .venv/bin/python bench/kvmi_codec.py [--events 200000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import struct
import time
import uuid

from tracer.kvmi import abi
from tracer.kvmi.protocol import (IntrospectorProtocol, build_event, build_handshake,
                                  encode_event_reply)

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
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


if __name__ == "__main__":
    main()
