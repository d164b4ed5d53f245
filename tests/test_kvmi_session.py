"""Listener and Session against a scripted host peer over real unix sockets."""
from __future__ import annotations

import hashlib
import os
import socket
import stat
import struct
import threading
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.kvmi_peer import (HDR, HostPeer, arch_bytes, breakpoint_payload,
                               cr_payload, event_message, msr_payload)
from tracer.kvmi import (CrEvent, Listener, Session, abi, errors)
from tracer.kvmi import transport
from tracer.kvmi.transport import Registers, parse_address

VM = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100")


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "kvmi.sock")


@pytest.fixture
def listener(sock_path):
    lst = Listener(f"unix:{sock_path}", handshake_timeout=5, command_timeout=5)
    yield lst
    lst.close()


def connect(listener: Listener, name: str = "vm-a", vm: uuid.UUID = VM) -> tuple[HostPeer, Session]:
    peer = HostPeer.connect(listener.path)
    peer.handshake(vm, name, start_time=1234)
    session = listener.accept(timeout=5)
    assert session is not None
    return peer, session


def test_address_parsing() -> None:
    assert parse_address("unix:/a/b") == ("unix", "/a/b")
    assert parse_address("vsock:1234") == ("vsock", 1234)
    for bad in ("tcp:1", "unix:", "vsock:x", "nothing", "vsock:0"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_socket_mode_0600_and_stale_socket(sock_path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()  # a dead listener's socket file stays behind
    with Listener(f"unix:{sock_path}") as lst:
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
        with pytest.raises(FileExistsError):  # a live listener is not replaced
            Listener(f"unix:{sock_path}")
        assert lst.path == sock_path
    assert not os.path.exists(sock_path)
    with open(sock_path, "w") as f:
        f.write("not a socket")
    with pytest.raises(FileExistsError):
        Listener(f"unix:{sock_path}")


def test_group_socket_mode_0660(sock_path) -> None:
    with Listener(f"unix:{sock_path}", group=os.getgid()):
        st = os.stat(sock_path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()


def test_handshake_identity_and_cookie(sock_path) -> None:
    with Listener(f"unix:{sock_path}", secret=b"top secret") as lst:
        peer = HostPeer.connect(sock_path)
        size, cookie = peer.handshake(VM, "vm-a", start_time=99)
        assert size == 24 and cookie == hashlib.sha1(b"top secret").digest()
        s = lst.accept(timeout=5)
        assert (s.uuid, s.name, s.start_time) == (VM, "vm-a", 99)
        s.close()
        peer.close()
    with Listener(f"unix:{sock_path}") as lst:
        peer = HostPeer.connect(sock_path)
        assert peer.handshake(VM, "vm-b") == (24, bytes(20))
        lst.accept(timeout=5).close()
        peer.close()


def test_host_rejecting_the_cookie_closes_the_session(sock_path) -> None:
    # A host configured with another secret compares the hash and hangs up.
    with Listener(f"unix:{sock_path}", secret=b"wrong") as lst:
        peer = HostPeer.connect(sock_path)
        _, cookie = peer.handshake(VM, "vm")
        assert cookie != hashlib.sha1(b"right").digest()
        peer.close()
        s = lst.accept(timeout=5)
        with pytest.raises(errors.ConnectionClosed):
            s.next_event(timeout=5)
        with pytest.raises(errors.ConnectionClosed):
            s.get_version()


def test_commands_round_trip(listener) -> None:
    peer, s = connect(listener)
    seen = []

    def host(p: HostPeer, msg_id: int, seq: int, payload: bytes) -> bool:
        seen.append((msg_id, payload))
        if msg_id == abi.KVMI_GET_VERSION:
            p.reply(msg_id, seq, 0, struct.pack("<I4xBBBB4x", 1, 0, 1, 1, 0))
        elif msg_id == abi.KVMI_GET_GUEST_INFO:
            p.reply(msg_id, seq, 0, struct.pack("<I12x", 4))
        elif msg_id == abi.KVMI_GET_REGISTERS:
            vcpu, nmsrs = struct.unpack_from("<H6xH", payload)
            idx = struct.unpack_from(f"<{nmsrs}I", payload, 16)
            regs = struct.pack("<18Q", *range(1, 19))
            sregs = arch_bytes(cr3=0xABC000)[8 + 144:8 + 144 + 312]
            entries = b"".join(struct.pack("<IIQ", i, 0, i * 2) for i in idx)
            p.reply(msg_id, seq, 0, struct.pack("<I4x", 8) + regs + sregs
                    + struct.pack("<I4x", nmsrs) + entries)
        elif msg_id == abi.KVMI_GET_CPUID:
            p.reply(msg_id, seq, 0, struct.pack("<4I", 1, 2, 3, 4))
        elif msg_id == abi.KVMI_VCPU_TRANSLATE_GVA:
            (gva,) = struct.unpack_from("<Q", payload, 8)
            p.reply(msg_id, seq, 0, struct.pack("<Q", gva - 0xFFFF800000000000))
        elif msg_id == abi.KVMI_CHECK_COMMAND:
            (cid,) = struct.unpack_from("<H", payload)
            p.reply(msg_id, seq, 0 if cid < 64 else -abi.KVM_ENOENT)
        elif msg_id in (abi.VMITRACE_SET_BREAKPOINT, abi.KVMI_SET_REGISTERS):
            p.reply(msg_id, seq, -abi.KVM_EOPNOTSUPP)
        else:
            p.reply(msg_id, seq, 0)
        return True

    peer.serve(host)
    v = s.get_version()
    assert v.version == 1 and (v.features.vmfunc, v.features.eptp) == (1, 1)
    assert s.get_guest_info().vcpu_count == 4
    regs = s.get_registers(1, msrs=[0xC0000082, 0x174])
    assert isinstance(regs, Registers) and regs.mode == 8
    assert regs.regs.rax == 1 and regs.regs.rip == 17 and regs.sregs.cr3 == 0xABC000
    assert regs.msrs == {0xC0000082: 0xC0000082 * 2, 0x174: 0x174 * 2}
    assert tuple(s.get_cpuid(0, 7)) == (1, 2, 3, 4)
    assert s.translate_gva(0, 0xFFFF800000001000) == 0x1000
    assert s.check_command(abi.KVMI_GET_VERSION) and not s.check_command(abi.VMITRACE_SET_DELIVERY)
    s.control_events(2, abi.KVMI_EVENT_CR, True)
    s.control_cr(2, 3, True)
    s.control_msr(1, 0xC0000082, False)
    s.control_vm_events(abi.KVMI_EVENT_UNHOOK, True)
    s.pause_vcpu(3, wait=True)
    s.inject_exception(0, 14, error_code=2, address=0x1234)
    with pytest.raises(errors.KvmEOPNOTSUPP) as exc:
        s.set_breakpoint(0xFFFFFFFF81000000)
    assert exc.value.name == "KVM_EOPNOTSUPP" and exc.value.value == 95
    assert exc.value.command == "VMITRACE_SET_BREAKPOINT"
    with pytest.raises(errors.KvmEOPNOTSUPP):
        s.set_registers(0, regs.regs)
    # the wire bytes the host saw (independent formats)
    assert (abi.KVMI_CONTROL_EVENTS, struct.pack("<H6xHB5x", 2, 1, 1)) in seen
    assert (abi.KVMI_CONTROL_CR, struct.pack("<H6xB3xI", 2, 1, 3)) in seen
    assert (abi.KVMI_CONTROL_MSR, struct.pack("<H6xB3xI", 1, 0, 0xC0000082)) in seen
    assert (abi.KVMI_CONTROL_VM_EVENTS, struct.pack("<HB5x", 0, 1)) in seen
    assert (abi.KVMI_PAUSE_VCPU, struct.pack("<H6xB7x", 3, 1)) in seen
    assert (abi.KVMI_INJECT_EXCEPTION, struct.pack("<H6xB3xIQ", 0, 14, 2, 0x1234)) in seen
    assert (abi.VMITRACE_SET_BREAKPOINT, struct.pack("<Q", 0xFFFFFFFF81000000)) in seen
    assert (abi.KVMI_GET_REGISTERS, struct.pack("<H6xH6xII", 1, 2, 0xC0000082, 0x174)) in seen
    s.close()
    peer.close()


def test_extended_breakpoint_wire_bytes_and_checks(listener) -> None:
    peer, s = connect(listener)
    seen: list[bytes] = []

    def host(p: HostPeer, msg_id: int, seq: int, payload: bytes) -> bool:
        seen.append(payload)
        p.reply(msg_id, seq, 0)
        return True

    peer.serve(host)
    assert abi.block_bitmap([0, 33, 511]) == (1, 2) + (0,) * 13 + (1 << 31,)
    with pytest.raises(ValueError):
        abi.block_bitmap([512])
    pt_regs = (4, 0, 168)
    flags = abi.VMITRACE_BLOCK_FROM_CAPTURE | abi.VMITRACE_BLOCK_BITMAP
    s.set_breakpoint_ex(0xFFFF_FFFF_8100_0000, True, 15, abi.block_bitmap([3]), [pt_regs], flags)
    assert seen == [struct.pack("<QBBBB4xBxHiBxHi16I", 0xFFFF_FFFF_8100_0000, 1, 15, 16, 3,
                                4, 168, 0, 0xFF, 0, 0, 8, *(0,) * 15)]
    differ = abi.VMITRACE_BLOCK_WORDS_DIFFER
    s.set_breakpoint_ex(0x2000, True, 0, [], [pt_regs], differ, (16, 11))
    assert seen[-1] == struct.pack("<QBBBBBB2xBxHiBxHi", 0x2000, 1, 0, 0, differ, 16, 11,
                                   4, 168, 0, 0xFF, 0, 0)
    reversed_set = flags | differ | abi.VMITRACE_BLOCK_DIFFER_REVERSED
    two_sets = abi.block_bitmap([43]) + abi.block_bitmap([59])
    s.set_breakpoint_ex(0x3000, True, 15, two_sets, [pt_regs], reversed_set, (16, 11))
    assert seen[-1] == struct.pack("<QBBBBBB2xBxHiBxHi32I", 0x3000, 1, 15, 32, 15, 16, 11,
                                   4, 168, 0, 0xFF, 0, 0, *two_sets)
    for bad in (dict(block_reg=21, captures=[pt_regs], block_flags=1),  # word 21 > 168 bytes
                dict(block_reg=0, captures=[], block_flags=1),           # no first capture
                dict(block_values=[1, 2], captures=[pt_regs], block_flags=2),  # not 16 words
                dict(block_flags=16),                                    # unknown flag
                dict(block_flags=8),                                     # reversed alone
                dict(block_reg=15, block_values=two_sets[:16], captures=[pt_regs],
                     block_flags=reversed_set, differ_words=(16, 11)),   # one set of two
                dict(block_reg=15, block_values=two_sets, captures=[pt_regs],
                     block_flags=flags | abi.VMITRACE_BLOCK_DIFFER_REVERSED),  # no differ
                dict(block_reg=16),                                      # no register 16
                dict(captures=[pt_regs], block_flags=differ, differ_words=(21, 11)),  # word 21
                dict(captures=[pt_regs], differ_words=(16, 11))):        # without the flag
        with pytest.raises(ValueError):
            s.set_breakpoint_ex(0x1000, True, **bad)
    assert len(seen) == 3  # refused before sending
    s.close()
    peer.close()


def test_capture_table_wire_bytes_and_checks(listener) -> None:
    peer, s = connect(listener)
    seen: list[tuple[int, bytes]] = []

    def host(p: HostPeer, msg_id: int, seq: int, payload: bytes) -> bool:
        seen.append((msg_id, payload))
        p.reply(msg_id, seq, 0)
        return True

    peer.serve(host)
    Entry = abi.CaptureTableEntry
    site = 0xFFFF_FFFF_8100_0000
    s.set_capture_table(site, 15, [
        Entry(257, 13, 4096, string=True),                          # openat: path at si
        Entry(1, 13, 8192, length_word=12),                         # write: buf at si, dx
        Entry(0, 13, 8192, length_word=10, signed_length=True),     # read: ax at the exit
        Entry(3, 5, 8192, length_word=10, signed_length=True, words32=True),  # ia32 read
        Entry(59, 19, 8192, indirect=8, wait_if_cut=True)])  # execve's exit: at argv[0]
    entry = struct.Struct("<HBBHBB")  # vmitrace_table_entry
    assert seen == [(abi.VMITRACE_SET_CAPTURE_TABLE,
                     struct.pack("<QB3xI", site, 15, 5) + entry.pack(257, 13, 0xFF, 4096, 1, 0)
                     + entry.pack(1, 13, 12, 8192, 0, 0) + entry.pack(0, 13, 10, 8192, 2, 0)
                     + entry.pack(3, 5, 10, 8192, 6, 0) + entry.pack(59, 19, 0xFF, 8192, 24, 8))]
    s.set_capture_table(site, 15, [])  # removes it
    assert seen[-1] == (abi.VMITRACE_SET_CAPTURE_TABLE, struct.pack("<QB3xI", site, 15, 0))
    # The largest table is bigger than KVMI_MSG_SIZE; the message carries it whole.
    full = [Entry(k % 512, 0, 1) for k in range(abi.VMITRACE_MAX_TABLE_ENTRIES)]
    s.set_capture_table(site, 0, full)
    assert len(seen[-1][1]) == 16 + 8 * 2048 == abi.VMITRACE_TABLE_MSG_SIZE > abi.KVMI_MSG_SIZE
    sent = len(seen)
    for key_word, bad in ((32, []),                                   # word 32
                          (0, full + [Entry(0, 0, 1)]),               # 2049 entries
                          (0, [Entry(512, 0, 1)]),                    # key 512
                          (0, [Entry(3, 32, 1)]),                     # pointer word 32
                          (0, [Entry(3, 0, 1, length_word=32)]),      # length word 32
                          (0, [Entry(3, 0, 0)]),                      # max_length 0
                          (0, [Entry(3, 0, 8193)]),                   # max_length 8193
                          (0, [Entry(3, 0, 1, indirect=256)]),        # offset 256
                          (0, [Entry(3, 0, 1)] * 5)):                 # 5 entries for key 3
        with pytest.raises(ValueError):
            s.set_capture_table(site, key_word, bad)
    assert len(seen) == sent  # refused before sending
    s.close()
    peer.close()


def test_read_physical_is_chunked_by_page(listener) -> None:
    peer, s = connect(listener)
    memory = bytes(range(256)) * 64  # 16 KiB image at gpa 0x10000
    requests = []

    def host(p: HostPeer, msg_id: int, seq: int, payload: bytes) -> bool:
        if msg_id == abi.KVMI_READ_PHYSICAL:
            gpa, size = struct.unpack("<QQ", payload)
            requests.append((gpa, size))
            p.reply(msg_id, seq, 0, memory[gpa - 0x10000:gpa - 0x10000 + size])
        elif msg_id == abi.KVMI_WRITE_PHYSICAL:
            gpa, size = struct.unpack_from("<QQ", payload)
            requests.append(("w", gpa, size, len(payload) - 16))
            p.reply(msg_id, seq, 0)
        return True

    peer.serve(host)
    data = s.read_physical(0x10000 + 100, 9000)
    assert data == memory[100:9100]
    assert requests[0] == (0x10000 + 100, 4096 - 100)
    assert all(size <= 4096 and (gpa % 4096) + size <= 4096 for gpa, size in requests)
    assert sum(size for _, size in requests) == 9000
    requests.clear()
    s.write_physical(0x10FF0, bytes(5000))
    assert requests == [("w", 0x10FF0, 16, 16), ("w", 0x11000, 4096, 4096),
                        ("w", 0x12000, 888, 888)]
    assert s.read_physical(0x10000, 0) == b""
    with pytest.raises(ValueError):
        s.read_physical(0, 1 << 40)
    s.close()


def test_events_queued_while_a_command_waits(listener) -> None:
    peer, s = connect(listener)
    done = threading.Event()

    def host(p: HostPeer, msg_id: int, seq: int, payload: bytes) -> bool:
        if msg_id == abi.KVMI_GET_GUEST_INFO:
            p.send_event(10, 0, abi.KVMI_EVENT_CR, cr_payload(3, 1, 2), rip=0x1000)
            p.send_event(11, 1, abi.KVMI_EVENT_MSR, msr_payload(0x174, 0, 5))
            p.reply(msg_id, seq, 0, struct.pack("<I12x", 2))
            p.send_event(12, 0, abi.KVMI_EVENT_BREAKPOINT, breakpoint_payload(0x2000, 1))
        elif msg_id == abi.KVMI_EVENT_REPLY:
            p.last_reply = (seq, payload)
            done.set()
        return True

    peer.serve(host)
    assert s.get_guest_info().vcpu_count == 2
    evs = [s.next_event(timeout=5) for _ in range(3)]
    assert [e.seq for e in evs] == [10, 11, 12]
    assert isinstance(evs[0], CrEvent) and evs[0].arch.regs.rip == 0x1000
    assert evs[1].msr == 0x174 and evs[2].gpa == 0x2000
    assert {e.seq for e in s.unanswered()} == {10, 11, 12}
    s.reply(evs[0], abi.KVMI_EVENT_ACTION_CONTINUE, new_val=7)
    assert done.wait(5)
    assert peer.last_reply == (10, struct.pack("<H6xBB6xQ", 0, 0, 1, 7))
    with pytest.raises(errors.EventReplyError):
        s.reply(evs[0])
    assert {e.seq for e in s.unanswered()} == {11, 12}
    assert s.next_event(timeout=0.05) is None
    s.close()


def test_command_timeout_then_late_reply_is_dropped(listener) -> None:
    peer, s = connect(listener)
    got = []

    def host(p: HostPeer, msg_id: int, seq: int, payload: bytes) -> bool:
        got.append((msg_id, seq))
        if len(got) == 2:  # answer the first (timed-out) command late, then the second
            p.reply(got[0][0], got[0][1], 0, struct.pack("<I12x", 1))
            p.reply(msg_id, seq, 0, struct.pack("<Q", 3000))
        return True

    peer.serve(host)
    with pytest.raises(errors.CommandTimeout):
        s.get_guest_info(timeout=0.2)
    assert s.get_vcpu_info(0).tsc_speed == 3000
    assert not s.closed
    s.close()


def test_wrong_seq_closes_only_that_connection(listener) -> None:
    peer_a, a = connect(listener, "a", uuid.uuid4())
    peer_b, b = connect(listener, "b", uuid.uuid4())
    peer_a.serve(lambda p, i, seq, pl: (p.reply(i, seq + 1000), True)[1])
    peer_b.serve(lambda p, i, seq, pl: (p.reply(i, seq, 0, struct.pack("<I12x", 3)), True)[1])
    with pytest.raises(errors.ConnectionClosed) as exc:
        a.get_guest_info()
    assert isinstance(exc.value.cause, errors.SequenceError)
    assert a.closed and isinstance(a.error, errors.SequenceError)
    assert peer_a.at_eof()
    assert b.get_guest_info().vcpu_count == 3 and not b.closed
    b.close()


@pytest.mark.parametrize("garbage,error", [
    (b"\xff" * 64, errors.OversizeMessage),
    (HDR.pack(0x4242, 0, 1), errors.UnknownMessage),
    (event_message(1, 0, 1, cr_payload(3, 1, 2))[:300], errors.TruncatedMessage),
    (event_message(1, 0, 1, cr_payload(3, 1, 2)[:-8]), errors.MalformedMessage),
    (HDR.pack(1, 552, 5) + struct.pack("<HHB3B", 544, 0, 1, 0, 9, 0) + bytes(544),
     errors.MalformedMessage),
])
def test_bad_peer_input_closes_cleanly(listener, garbage: bytes, error: type) -> None:
    peer, s = connect(listener)
    peer.send_event(1, 0, abi.KVMI_EVENT_PAUSE_VCPU)
    peer.send_raw(garbage)
    if error is errors.TruncatedMessage:
        peer.sock.shutdown(socket.SHUT_WR)  # close mid-message
    ev = s.next_event(timeout=5)  # the good event before the garbage is delivered
    assert ev is not None and ev.seq == 1
    with pytest.raises(errors.ConnectionClosed) as exc:
        s.next_event(timeout=5)
    assert isinstance(exc.value.cause, error)
    assert peer.at_eof()
    with pytest.raises(errors.ConnectionClosed):
        s.reply(ev)


def test_many_hosts_at_once_and_a_silent_one(sock_path) -> None:
    with Listener(f"unix:{sock_path}", handshake_timeout=2) as lst:
        silent = HostPeer.connect(sock_path)  # never handshakes
        peers = []
        for k in range(24):
            p = HostPeer.connect(sock_path)
            p.send_handshake(uuid.UUID(int=k + 1), f"vm{k}")
            peers.append(p)
        sessions = [lst.accept(timeout=5) for _ in peers]
        assert all(sessions)
        assert sorted(s.name for s in sessions) == sorted(f"vm{k}" for k in range(24))
        for p in peers:
            p.read_handshake_answer()
            p.serve(lambda pp, i, seq, pl: (pp.reply(i, seq, 0, struct.pack("<I12x", 1)), True)[1])
        results = []

        def ask(sess: Session) -> None:
            results.append((sess.uuid, sess.get_guest_info().vcpu_count))

        threads = [threading.Thread(target=ask, args=(x,)) for x in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(results) == 24 and {u for u, _ in results} == {uuid.UUID(int=k + 1)
                                                                  for k in range(24)}
        assert silent.at_eof(timeout=10)  # the listener gave up on it
        assert _wait_for(lambda: lst.handshake_failures == 1)
        for x in sessions:
            x.close()


def test_event_loop_and_commands_in_two_threads(listener) -> None:
    peer, s = connect(listener)
    n_events = 200
    replies = []
    lock = threading.Lock()

    def host(p: HostPeer, msg_id: int, seq: int, payload: bytes) -> bool:
        if msg_id == abi.KVMI_EVENT_REPLY:
            with lock:
                replies.append(seq)
        else:
            p.reply(msg_id, seq, 0, struct.pack("<Q", seq))
        return True

    peer.serve(host)

    def emit() -> None:
        for k in range(n_events):
            peer.send_event(k + 1, k % 2, abi.KVMI_EVENT_CR, cr_payload(3, k, k + 1))

    def commands() -> None:
        for _ in range(100):
            s.translate_gva(0, 0x1000)

    threads = [threading.Thread(target=emit), threading.Thread(target=commands)]
    for t in threads:
        t.start()
    seqs = []
    for _ in range(n_events):
        ev = s.next_event(timeout=10)
        seqs.append(ev.seq)
        s.reply(ev)
    for t in threads:
        t.join(10)
    assert seqs == list(range(1, n_events + 1))
    assert s.unanswered() == []
    s.close()
    assert peer.at_eof()
    assert sorted(replies) == list(range(1, n_events + 1))


def test_non_blocking_delivery(listener) -> None:
    peer, s = connect(listener)
    received = []

    def host(p: HostPeer, msg_id: int, seq: int, payload: bytes) -> bool:
        received.append((msg_id, payload))
        if msg_id == abi.VMITRACE_SET_DELIVERY:
            p.send_event(1, 0, abi.KVMI_EVENT_PAUSE_VCPU)  # sent before the switch
            p.reply(msg_id, seq)
            p.send_event(2, 0, abi.KVMI_EVENT_BREAKPOINT, breakpoint_payload(0x1000, 1))
        elif msg_id == abi.KVMI_GET_GUEST_INFO:
            p.reply(msg_id, seq, 0, struct.pack("<I12x", 1))
        return True

    peer.serve(host)
    s.set_delivery(False)
    assert not s.blocking
    first, second = s.next_event(timeout=5), s.next_event(timeout=5)
    assert first.blocking and not second.blocking
    s.reply(second)  # no-op: nothing is sent for a non-blocking event
    s.reply(first)
    s.get_guest_info()  # a round trip: everything sent before it has arrived
    assert [m for m, _ in received] == [abi.VMITRACE_SET_DELIVERY, abi.KVMI_EVENT_REPLY,
                                        abi.KVMI_GET_GUEST_INFO]
    assert received[0][1] == struct.pack("<B7x", 0)
    assert s.unanswered() == []
    s.close()


def test_recorder_sees_every_message(sock_path) -> None:
    log = []
    with Listener(f"unix:{sock_path}",
                  recorder_factory=lambda hs: (lambda d, ts, raw: log.append((d, ts, raw)))) as lst:
        peer = HostPeer.connect(sock_path)
        peer.handshake(VM, "rec")
        s = lst.accept(timeout=5)
        peer.serve(lambda p, i, seq, pl: (i == abi.KVMI_EVENT_REPLY or
                                          p.reply(i, seq, 0, struct.pack("<I12x", 1)), True)[1])
        peer.send_event(5, 0, abi.KVMI_EVENT_PAUSE_VCPU)
        s.get_guest_info()
        s.reply(s.next_event(timeout=5))
        s.get_guest_info()
        s.close()
    kinds = [(d, raw[:2]) for d, _, raw in log]
    assert log[0][0] == "in" and log[0][2] == peer_handshake_bytes(log[0][2])
    assert log[1] == ("out", log[1][1], peer.handshake_answer)
    assert [d for d, _ in kinds[2:]].count("out") == 3  # two commands, one event reply
    assert sum(1 for d, raw in kinds[2:] if d == "in") == 3  # one event, two replies
    times = [ts for _, ts, _ in log]
    assert times == sorted(times)


def peer_handshake_bytes(raw: bytes) -> bytes:
    size, uid, pad, start, name = struct.unpack("<I16sIq64s", raw)
    assert (size, uid, pad, name.rstrip(b"\0")) == (96, VM.bytes, 0, b"rec")
    return raw


def test_events_right_behind_the_handshake_are_kept(sock_path) -> None:
    with Listener(f"unix:{sock_path}") as lst:
        peer = HostPeer.connect(sock_path)
        peer.send_handshake(VM, "eager")
        peer.send_event(3, 0, abi.KVMI_EVENT_CREATE_VCPU)
        s = lst.accept(timeout=5)
        ev = s.next_event(timeout=5)
        assert ev.name == "KVMI_EVENT_CREATE_VCPU" and ev.seq == 3
        s.close()


def test_vsock_listener_binds() -> None:
    # Only binding is checked: this machine has no vsock loopback to connect through.
    try:
        lst = Listener("vsock:50123")
    except OSError as exc:
        pytest.skip(f"vsock not available on this machine: {exc}")
    lst.close()



def _wait_for(predicate, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("blocking", [False, True])
def test_event_queue_is_bounded(blocking: bool) -> None:
    ours, theirs = socket.socketpair()
    peer = HostPeer(theirs)
    peer.send_handshake(VM, "bounded")
    s = Session.from_socket(ours, max_queued_events=4, command_timeout=5)
    peer.read_handshake_answer()
    peer.serve(lambda p, i, seq, pl: (p.reply(i, seq, 0, struct.pack("<I12x", 1)
                                              if i == abi.KVMI_GET_GUEST_INFO else b""), True)[1])
    if not blocking:
        s.set_delivery(False)
    for k in range(20):
        peer.send_event(k + 1, 0, abi.KVMI_EVENT_PAUSE_VCPU)
    # Back-pressure: with nobody waiting for a reply the reader stops at the soft limit.
    assert _wait_for(lambda: s.pending_events() == 4)
    if blocking:  # more unanswered blocking events than the hard limit: a broken host
        with pytest.raises(errors.ConnectionClosed) as exc:
            s.get_guest_info()
        assert isinstance(exc.value.cause, errors.MalformedMessage)
        assert peer.at_eof()
    else:  # a waiting command makes the reader read on; non-blocking events overflow
        assert s.get_guest_info().vcpu_count == 1
        assert s.pending_events() == 8 and s.dropped_events == 12
        assert [s.next_event(timeout=1).seq for _ in range(8)] == list(range(1, 9))
        s.close()


def test_control_cmd_response_is_refused(listener) -> None:
    _, s = connect(listener)
    with pytest.raises(ValueError):
        s.request(abi.KVMI_CONTROL_CMD_RESPONSE, bytes(8))
    s.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(min_size=1, max_size=2000))
def test_random_garbage_never_hangs_a_session(garbage: bytes) -> None:
    ours, theirs = socket.socketpair()
    peer = HostPeer(theirs)
    peer.send_handshake(VM, "fuzz")
    s = Session.from_socket(ours, command_timeout=5)
    peer.read_handshake_answer()
    peer.send_raw(garbage)
    peer.sock.shutdown(socket.SHUT_WR)
    try:
        while True:  # whatever valid events the garbage happens to contain, then the end
            ev = s.next_event(timeout=10)
            assert ev is not None, "session neither delivered nor closed"
    except errors.ConnectionClosed as exc:
        assert exc.cause is None or isinstance(exc.cause, (errors.ProtocolError,
                                                           errors.ConnectionClosed))
    assert s.closed
    s.close()
    peer.close()


# -- the event loop's thread reads the socket itself --------------------------------------------
# Session hands reading to the thread waiting in next_event; these tests make sure that thread
# really owns reading (a precondition read from Session._read_owner) before the host acts.

def _consumer_reading(s: Session, thread: threading.Thread) -> bool:
    return s._read_owner == thread.ident


@pytest.fixture
def slow_handoff(monkeypatch):
    """The reader thread takes reading back only after 30 s away from next_event (not 20 ms),
    so a loaded machine cannot make it take over before the test's consumer reads."""
    monkeypatch.setattr(transport, "_IDLE_HANDOFF", 30.0)


def test_consumer_reads_a_commands_reply_and_queues_the_event(listener, slow_handoff) -> None:
    peer, s = connect(listener)
    peer.send_event(1, 0, abi.KVMI_EVENT_PAUSE_VCPU)
    assert s.next_event(timeout=5).seq == 1
    got: list = []
    consumer = threading.Thread(target=lambda: got.append(s.next_event(timeout=10)), daemon=True)
    consumer.start()
    assert _wait_for(lambda: _consumer_reading(s, consumer))

    def host(p: HostPeer, msg_id: int, seq: int, payload: bytes) -> bool:
        if msg_id == abi.KVMI_GET_GUEST_INFO:  # an event, then the reply, in one write
            p.send_raw(event_message(2, 1, 4, breakpoint_payload(0x3000, 1))
                       + HDR.pack(msg_id, 24, seq) + struct.pack("<iI", 0, 0)
                       + struct.pack("<I12x", 3))
        return True

    peer.serve(host)
    assert s.get_guest_info().vcpu_count == 3  # its reply was read by the consumer thread
    consumer.join(10)
    assert [e.seq for e in got] == [2] and got[0].gpa == 0x3000
    assert {e.seq for e in s.unanswered()} == {1, 2}
    s.close()


def test_reader_thread_reads_when_the_event_loop_is_away(listener) -> None:
    peer, s = connect(listener)
    peer.send_event(1, 0, abi.KVMI_EVENT_PAUSE_VCPU)
    first = s.next_event(timeout=5)
    s.reply(first)
    for k in range(2, 6):  # nobody in next_event now: the reader thread queues them
        peer.send_event(k, 0, abi.KVMI_EVENT_PAUSE_VCPU)
    assert _wait_for(lambda: s.pending_events() == 4)
    peer.close()
    assert _wait_for(lambda: s.closed)  # end of stream seen without next_event
    assert [s.next_event(timeout=1).seq for _ in range(4)] == [2, 3, 4, 5]
    with pytest.raises(errors.ConnectionClosed):
        s.next_event(timeout=1)
    s.close()


def test_close_wakes_a_consumer_reading(slow_handoff) -> None:
    ours, theirs = socket.socketpair()
    peer = HostPeer(theirs)
    peer.send_handshake(VM, "closing")
    s = Session.from_socket(ours, command_timeout=5)
    peer.read_handshake_answer()
    peer.send_event(1, 0, abi.KVMI_EVENT_PAUSE_VCPU)
    assert s.next_event(timeout=5).seq == 1
    outcome: list = []

    def consume() -> None:
        try:
            s.next_event()  # no timeout: only close() ends it
        except errors.ConnectionClosed as exc:
            outcome.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    assert _wait_for(lambda: _consumer_reading(s, consumer))
    s.close()
    consumer.join(10)
    assert not consumer.is_alive() and len(outcome) == 1
    assert peer.at_eof()


def test_bad_input_read_by_the_consumer_closes_cleanly(listener, slow_handoff) -> None:
    peer, s = connect(listener)
    peer.send_event(1, 0, abi.KVMI_EVENT_PAUSE_VCPU)
    assert s.next_event(timeout=5).seq == 1
    errors_seen: list = []

    def consume() -> None:
        try:
            while True:
                errors_seen.append(s.next_event(timeout=10))
        except errors.ConnectionClosed as exc:
            errors_seen.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    assert _wait_for(lambda: _consumer_reading(s, consumer))
    # a valid event, then a header announcing an event bigger than any message
    peer.send_raw(event_message(2, 0, abi.KVMI_EVENT_PAUSE_VCPU) + HDR.pack(1, 0xFFFF, 3))
    consumer.join(10)
    assert [e.seq for e in errors_seen[:-1]] == [2]
    assert isinstance(errors_seen[-1], errors.ConnectionClosed)
    assert isinstance(errors_seen[-1].cause, errors.ProtocolError)
    assert peer.at_eof() and s.closed
    s.close()


def test_consumer_reading_a_burst_respects_the_queue_bound(slow_handoff) -> None:
    ours, theirs = socket.socketpair()
    peer = HostPeer(theirs)
    peer.send_handshake(VM, "burst")
    s = Session.from_socket(ours, max_queued_events=4, command_timeout=5)
    peer.read_handshake_answer()
    peer.send_event(1, 0, abi.KVMI_EVENT_PAUSE_VCPU)
    assert s.next_event(timeout=5).seq == 1
    got: list = []

    def consume() -> None:
        got.append(s.next_event(timeout=10))

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    assert _wait_for(lambda: _consumer_reading(s, consumer))
    # 20 blocking events in one write: more than twice the queue bound
    peer.send_raw(b"".join(event_message(k, 0, abi.KVMI_EVENT_PAUSE_VCPU)
                           for k in range(2, 22)))
    consumer.join(10)
    assert got[0].seq == 2
    seqs = [s.next_event(timeout=5).seq for _ in range(19)]
    assert seqs == list(range(3, 22)) and not s.closed
    s.close()


def test_spinning_consumer_gets_events_and_times_out(listener, slow_handoff) -> None:
    """spin_us: next_event busy-polls before sleeping; events that come while it spins and
    after it gave up and slept are both delivered, and the timeout still ends the wait."""
    peer, s = connect(listener)
    s.spin_us = 200_000  # 0.2 s: long enough that the first event lands inside the spin
    assert s.next_event(timeout=0.05) is None  # the deadline bounds the spin
    got: list = []
    consumer = threading.Thread(target=lambda: got.extend(
        s.next_event(timeout=10) for _ in range(2)), daemon=True)
    consumer.start()
    assert _wait_for(lambda: _consumer_reading(s, consumer))
    peer.send_event(1, 0, abi.KVMI_EVENT_PAUSE_VCPU)  # usually within the spin
    assert _wait_for(lambda: len(got) == 1)
    time.sleep(0.5)  # the second wait has spun out and sleeps in poll()
    peer.send_event(2, 0, abi.KVMI_EVENT_PAUSE_VCPU)
    consumer.join(10)
    assert [e.seq for e in got] == [1, 2]
    for event in got:
        s.reply(event)
    assert [peer.recv_message()[1] for _ in range(2)] == [1, 2]
    s.close()


def test_consumer_busy_polls_after_a_reply(listener, slow_handoff) -> None:
    """reply_spin_us: after answering a blocking event, the next read busy-polls until that
    long after the reply; the timeout still ends the wait, an event that comes during the
    poll is delivered, and without a reply there is no poll to bound."""
    peer, s = connect(listener)
    s.reply_spin_us = 200_000  # 0.2 s: long enough to observe
    peer.send_event(1, 0, abi.KVMI_EVENT_PAUSE_VCPU)
    s.reply(s.next_event(timeout=5))
    assert peer.recv_message()[1] == 1
    assert s._reply_spin_until > time.monotonic()
    assert s.next_event(timeout=0.05) is None  # the deadline bounds the poll
    assert s._reply_spin_until == 0.0  # one poll per reply
    peer.send_event(2, 0, abi.KVMI_EVENT_PAUSE_VCPU)
    s.reply(s.next_event(timeout=5))
    got: list = []
    consumer = threading.Thread(target=lambda: got.append(s.next_event(timeout=10)),
                                daemon=True)
    consumer.start()
    peer.send_event(3, 0, abi.KVMI_EVENT_PAUSE_VCPU)  # usually within the poll
    consumer.join(10)
    assert [e.seq for e in got] == [3]
    s.reply_spin_us = 0
    s.reply(got[0])
    assert s._reply_spin_until == 0.0
    assert [peer.recv_message()[1] for _ in range(2)] == [2, 3]
    s.close()
