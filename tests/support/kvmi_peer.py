"""A scripted KVMI host peer for session tests.

It speaks the host side over a real socket with its own minimal codec (explicit struct
formats written from the headers, not tracer.kvmi's tables), so the client under test is
checked against an independent implementation. It is a *scripted* peer: tests tell it what
to send and inspect what it received. Failure paths a real host cannot produce on demand
(garbage, truncation, wrong seq) are sent through ``send_raw``.
"""
from __future__ import annotations

import socket
import struct
import threading
import uuid as uuidlib
from typing import Any, Callable, Sequence

HDR = struct.Struct("<HHI")  # kvmi_msg_hdr: id, size, seq
ERR = struct.Struct("<iI")  # kvmi_error_code: err, padding
VCPU_HDR = struct.Struct("<HHI")  # kvmi_vcpu_hdr: vcpu, padding1, padding2
# kvmi_qemu2introspector: struct_size, uuid[16], padding, start_time, name[64]
QEMU2INTRO = struct.Struct("<I16sIq64s")
INTRO2QEMU = struct.Struct("<I20s")  # kvmi_introspector2qemu: struct_size, cookie_hash[20]
# kvmi_event common: size, vcpu, event, flags (vmitrace; padding in standard KVMI),
# padding[2]; then kvmi_event_arch (536 bytes):
EVENT_COMMON = struct.Struct("<HHBB2x")
ARCH_HEAD = struct.Struct("<BxH4x")  # mode, padding1, view, padding2[4]
KVM_REGS = struct.Struct("<18Q")
KVM_SEGMENT = struct.Struct("<QIH8BBx")  # base limit selector type..avl unusable padding
KVM_DTABLE = struct.Struct("<QH6x")
KVM_SREGS_TAIL = struct.Struct("<7Q4Q")  # cr0 cr2 cr3 cr4 cr8 efer apic_base bitmap[4]
ARCH_MSRS = struct.Struct("<9Q")
ARCH_SIZE = ARCH_HEAD.size + KVM_REGS.size + 8 * KVM_SEGMENT.size + 2 * KVM_DTABLE.size + \
    KVM_SREGS_TAIL.size + ARCH_MSRS.size
assert ARCH_SIZE == 536

KVMI_EVENT_REPLY, KVMI_EVENT = 0, 1
EVENT_CR, EVENT_MSR, EVENT_BREAKPOINT, EVENT_PAUSE_VCPU = 1, 2, 4, 10


def arch_bytes(mode: int = 8, rip: int = 0, rax: int = 0, cr3: int = 0,
               lstar: int = 0) -> bytes:
    """A kvmi_event_arch with a few recognizable values."""
    regs = [0] * 18
    regs[0], regs[16] = rax, rip
    seg = KVM_SEGMENT.pack(0, 0xFFFFFFFF, 0x10, 11, 1, 0, 0, 1, 1, 1, 0, 0)
    sregs = seg * 8 + KVM_DTABLE.pack(0x1000, 0x7F) * 2 + \
        KVM_SREGS_TAIL.pack(0x80050033, 0, cr3, 0x6F0, 0, 0xD01, 0xFEE00900, 0, 0, 0, 0)
    msrs = ARCH_MSRS.pack(0, 0, 0, 0xD01, 0, lstar, 0, 0x7040600070406, 0)
    return ARCH_HEAD.pack(mode, 0) + KVM_REGS.pack(*regs) + sregs + msrs


def event_message(seq: int, vcpu: int, event_id: int, payload: bytes = b"",
                  arch: bytes | None = None, flags: int = 0) -> bytes:
    body = EVENT_COMMON.pack(8 + ARCH_SIZE, vcpu, event_id, flags) + (arch or arch_bytes()) + \
        payload
    return HDR.pack(KVMI_EVENT, len(body), seq) + body


def cr_payload(cr: int, old: int, new: int) -> bytes:
    return struct.pack("<H6xQQ", cr, old, new)  # kvmi_event_cr


def msr_payload(msr: int, old: int, new: int) -> bytes:
    return struct.pack("<I4xQQ", msr, old, new)  # kvmi_event_msr


def breakpoint_payload(gpa: int, insn_len: int) -> bytes:
    return struct.pack("<QB7x", gpa, insn_len)  # kvmi_event_breakpoint


def captured_breakpoint_payload(gpa: int, insn_len: int, captures: Sequence[bytes],
                                pointers: Sequence[tuple[int, bytes, int]] = ()) -> bytes:
    """A vmitrace breakpoint payload (kvmi_event.flags: CAPTURED 2, with pointers also
    TABLE_CAPTURED 4): vmitrace_captured {u16 length[2]; padding} and the captured bytes, then
    for pointers ((gva, data, faulted) each) vmitrace_table_captured {u8 count; padding[7]},
    vmitrace_pointer_capture {u64 gva; u16 length; u8 faulted; padding[5]} each, the data."""
    lengths = [len(c) for c in captures] + [0] * (2 - len(captures))
    out = breakpoint_payload(gpa, insn_len) + struct.pack("<2H4x", *lengths) + b"".join(captures)
    if pointers:
        out += struct.pack("<B7x", len(pointers))
        out += b"".join(struct.pack("<QHB5x", gva, len(data), faulted)
                        for gva, data, faulted in pointers)
        out += b"".join(data for _gva, data, _faulted in pointers)
    return out


class HostPeer:
    """Host side of one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self._buf = bytearray()
        self.handshake_answer: bytes | None = None

    @classmethod
    def connect(cls, path: str) -> "HostPeer":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return cls(s)

    def send_handshake(self, uuid: uuidlib.UUID, name: str, start_time: int = 0,
                       extra: int = 0) -> None:
        data = QEMU2INTRO.pack(QEMU2INTRO.size + extra, uuid.bytes, 0, start_time,
                               name.encode()) + bytes(extra)
        self.sock.sendall(data)

    def read_handshake_answer(self) -> tuple[int, bytes]:
        data = self._read_exact(INTRO2QEMU.size)
        self.handshake_answer = data
        return INTRO2QEMU.unpack(data)

    def handshake(self, uuid: uuidlib.UUID | None = None, name: str = "vm",
                  start_time: int = 0) -> tuple[int, bytes]:
        self.send_handshake(uuid or uuidlib.uuid4(), name, start_time)
        return self.read_handshake_answer()

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"introspector closed ({len(self._buf)} of {n} bytes)")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def recv_message(self) -> tuple[int, int, bytes]:
        """(id, seq, payload) of the next message from the introspector."""
        msg_id, size, seq = HDR.unpack(self._read_exact(HDR.size))
        return msg_id, seq, self._read_exact(size)

    def at_eof(self, timeout: float = 10) -> bool:
        """True once the introspector closed the connection (buffered bytes ignored)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            return True

    def reply(self, msg_id: int, seq: int, err: int = 0, data: bytes = b"") -> None:
        body = ERR.pack(err, 0) + (data if err == 0 else b"")
        self.sock.sendall(HDR.pack(msg_id, len(body), seq) + body)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_event(self, seq: int, vcpu: int, event_id: int, payload: bytes = b"",
                   **arch: Any) -> None:
        self.sock.sendall(event_message(seq, vcpu, event_id, payload, arch_bytes(**arch)))

    def serve(self, handler: Callable[["HostPeer", int, int, bytes], bool]) -> threading.Thread:
        """Answer messages in a thread: handler(peer, id, seq, payload) -> keep going?"""
        def loop() -> None:
            try:
                while True:
                    msg_id, seq, payload = self.recv_message()
                    if not handler(self, msg_id, seq, payload):
                        return
            except (EOFError, OSError):
                return
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return t

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
