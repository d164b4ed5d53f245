"""Session recordings and the replay host: the same client code runs live and on replay."""
from __future__ import annotations

import os
import struct
import uuid

import pytest

from support.kvmi_peer import HostPeer, breakpoint_payload, cr_payload
from tracer.kvmi import (ConnectionClosed, KvmENOENT, Listener, RecordingError, RecordingReader,
                         RecordingWriter, ReplayHost, Session, abi)

VM = uuid.UUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")


def live_host(peer: HostPeer) -> None:
    """A scripted host: CR event, answers commands, then a breakpoint, then hangs up."""
    peer.handshake(VM, "recorded-vm", start_time=777)
    peer.send_event(40, 0, abi.KVMI_EVENT_CR, cr_payload(3, 0x1000, 0x2000), rip=0xFFFF0001)

    def host(p: HostPeer, msg_id: int, seq: int, payload: bytes) -> bool:
        if msg_id == abi.KVMI_GET_GUEST_INFO:
            p.reply(msg_id, seq, 0, struct.pack("<I12x", 2))
        elif msg_id == abi.KVMI_READ_PHYSICAL:
            gpa, size = struct.unpack("<QQ", payload)
            p.reply(msg_id, seq, 0, bytes((gpa + k) & 0xFF for k in range(size)))
        elif msg_id == abi.KVMI_VCPU_TRANSLATE_GVA:
            p.reply(msg_id, seq, 0, struct.pack("<Q", 0x5000))
        elif msg_id == abi.KVMI_EVENT_REPLY:
            if seq == 40:
                p.send_event(41, 1, abi.KVMI_EVENT_BREAKPOINT, breakpoint_payload(0x5000, 1),
                             rip=0xFFFF0002)
            else:
                p.close()
                return False
        return True

    peer.serve(host)


def client(s: Session) -> list:
    """What a collector would do; returns everything it observed."""
    seen = []
    ev = s.next_event(timeout=10)
    seen.append((ev.name, ev.seq, ev.vcpu, ev.values(), ev.arch.regs.rip))
    seen.append(s.get_guest_info().vcpu_count)
    seen.append(s.read_physical(0x1FF0, 32))
    s.reply(ev, new_val=ev.new_value)
    ev = s.next_event(timeout=10)
    seen.append((ev.name, ev.seq, ev.vcpu, ev.values(), ev.arch.regs.rip))
    seen.append(s.translate_gva(1, 0xFFFF0002))
    s.reply(ev)
    with pytest.raises(ConnectionClosed):
        s.next_event(timeout=10)
    return seen


@pytest.fixture
def recording(tmp_path) -> tuple[str, list]:
    rec_dir = tmp_path / "rec"
    rec_dir.mkdir()
    with Listener(f"unix:{tmp_path}/live.sock",
                  recorder_factory=RecordingWriter.factory(rec_dir)) as lst:
        live_host(HostPeer.connect(f"{tmp_path}/live.sock"))
        s = lst.accept(timeout=10)
        seen = client(s)
        s.close()  # also closes (flushes) the session's RecordingWriter
    (name,) = os.listdir(rec_dir)
    assert name.startswith("recorded-vm-" + str(VM))
    return str(rec_dir / name), seen


def test_recording_file_contents(recording) -> None:
    path, seen = recording
    assert seen[0] == ("KVMI_EVENT_CR", 40, 0, {"cr": 3, "old_value": 0x1000, "new_value": 0x2000},
                       0xFFFF0001)
    assert seen[2] == bytes((0x1FF0 + k) & 0xFF for k in range(32))
    r = RecordingReader(path)
    assert (r.uuid, r.name, r.start_time) == (VM, "recorded-vm", 777)
    recs = list(r)
    assert [x.direction for x in recs[:2]] == ["in", "out"]
    assert len(recs[0].raw) == 96 and len(recs[1].raw) == 24
    ids = [(x.direction, struct.unpack_from("<H", x.raw)[0]) for x in recs[2:]]
    # 2 events + 4 replies in; 4 commands (read_physical is 2 page chunks) + 2 event replies out
    assert sorted(ids).count(("in", abi.KVMI_EVENT)) == 2
    assert ids.count(("out", abi.KVMI_EVENT_REPLY)) == 2
    assert ids.count(("out", abi.KVMI_READ_PHYSICAL)) == 2
    assert all(a.monotonic_ns <= b.monotonic_ns for a, b in zip(recs, recs[1:]))


def test_replay_through_a_listener_gives_the_same_session(recording, tmp_path) -> None:
    path, seen = recording
    host = ReplayHost(path)
    with Listener(f"unix:{tmp_path}/replay.sock") as lst:
        thread = host.connect(f"unix:{tmp_path}/replay.sock")
        s = lst.accept(timeout=10)
        assert (s.uuid, s.name, s.start_time) == (VM, "recorded-vm", 777)
        assert client(s) == seen
        s.close()
        thread.join(10)
    assert host.unmatched_commands == 0 and host.error is None


def test_replay_over_a_socketpair(recording) -> None:
    path, seen = recording
    s = Session.from_socket(ReplayHost(path).socketpair(), handshake_timeout=10)
    assert client(s) == seen


def test_replay_answers_unknown_commands_with_enoent(recording) -> None:
    path, _ = recording
    host = ReplayHost(path, linger=True)
    s = Session.from_socket(host.socketpair(), handshake_timeout=10)
    ev = s.next_event(timeout=10)
    with pytest.raises(KvmENOENT):
        s.get_version()  # never recorded
    with pytest.raises(KvmENOENT):
        s.read_physical(0x9000, 8)  # recorded command id, other payload
    assert s.get_guest_info().vcpu_count == 2
    with pytest.raises(KvmENOENT):
        s.get_guest_info()  # the recording answered it once only
    assert host.unmatched_commands == 3
    s.reply(ev)
    s.close()


def test_damaged_recordings_are_rejected(recording, tmp_path) -> None:
    path, _ = recording
    data = open(path, "rb").read()
    bad_magic = tmp_path / "magic.kvmirec"
    bad_magic.write_bytes(b"NOTVMTKV" + data[8:])
    with pytest.raises(RecordingError):
        RecordingReader(bad_magic)
    truncated = tmp_path / "cut.kvmirec"
    truncated.write_bytes(data[:-5])
    with pytest.raises(RecordingError):
        list(RecordingReader(truncated))
    huge = bytearray(data)
    struct.pack_into("<I", huge, 112 + 4, 0x7FFFFFFF)  # first record's length
    corrupt = tmp_path / "len.kvmirec"
    corrupt.write_bytes(bytes(huge))
    with pytest.raises(RecordingError):
        list(RecordingReader(corrupt))
    with pytest.raises(RecordingError):
        ReplayHost(corrupt)
    empty = tmp_path / "empty.kvmirec"
    empty.write_bytes(data[:112])
    with pytest.raises(RecordingError):
        ReplayHost(empty)


def test_cli_dump(recording) -> None:
    import json

    from click.testing import CliRunner

    from tracer.cli import main

    path, _ = recording
    result = CliRunner().invoke(main, ["kvmi", "dump", path, "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert rows[0]["message"] == "kvmi_qemu2introspector" and rows[0]["vm"] == "recorded-vm"
    assert rows[1]["message"] == "kvmi_introspector2qemu"
    cr = next(r for r in rows if r.get("event") == "KVMI_EVENT_CR")
    assert (cr["seq"], cr["cr"], cr["new_value"], cr["rip"]) == (40, 3, 0x2000, 0xFFFF0001)
    assert sum(r["message"] == "KVMI_READ_PHYSICAL" for r in rows) == 4  # 2 commands, 2 replies
    text = CliRunner().invoke(main, ["kvmi", "dump", path, "--limit", "3"])
    assert text.exit_code == 0 and len(text.output.splitlines()) == 4
    bad = CliRunner().invoke(main, ["kvmi", "dump", __file__])
    assert bad.exit_code != 0 and "not a vmitrace KVMI recording" in bad.output


def test_replay_answers_commands_recorded_after_the_last_event(tmp_path) -> None:
    def session_script(s: Session) -> int:
        s.reply(s.next_event(timeout=10))
        return s.get_guest_info().vcpu_count  # after the last event: must still be answered

    with Listener(f"unix:{tmp_path}/l.sock",
                  recorder_factory=RecordingWriter.factory(tmp_path)) as lst:
        peer = HostPeer.connect(f"{tmp_path}/l.sock")
        peer.handshake(VM, "tail")
        peer.send_event(1, 0, abi.KVMI_EVENT_PAUSE_VCPU)
        peer.serve(lambda p, i, seq, pl: (i == abi.KVMI_EVENT_REPLY or
                                          p.reply(i, seq, 0, struct.pack("<I12x", 3)), True)[1])
        s = lst.accept(timeout=10)
        assert session_script(s) == 3
        s.close()
    (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".kvmirec")]
    for _ in range(3):  # the host must not hang up between the event reply and the command
        s = Session.from_socket(ReplayHost(tmp_path / path).socketpair(), handshake_timeout=10)
        assert session_script(s) == 3
        with pytest.raises(ConnectionClosed):
            s.next_event(timeout=10)
