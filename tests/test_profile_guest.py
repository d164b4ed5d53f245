"""Acceptance on running lab guests (both kernels): the profiles describe the running kernel.

One guest per kernel boots with the vmitrace KVMI plugin connected to a tracer.kvmi Listener.
While it runs the module collects what the guest itself reports (/proc/kallsyms, ps), builds a
profile from guest memory through the KVMI session, then pauses the guest and copies its RAM
(a raw memory dump, guest-physical address = file offset) and stops it. The oracles:
volatility3's own linux.pslist plugin on the dump, the guest's /proc/kallsyms and `ps`, and the
running kernel's sys_call_table read out of the dump at the addresses /proc/kallsyms gives.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

import guestlab
import profiles
from profiles.guest import build_from_guest
from test_profile_support import KERNELS, image_isf, parse_kallsyms, parse_ps, without_provenance, work_dir
from tracer.kvmi import abi
from tracer.kvmi.errors import ConnectionClosed
from tracer.kvmi.transport import Listener

pytestmark = pytest.mark.guest

MSR_LSTAR = 0xC000_0082
LINK_TEXT = 0xFFFF_FFFF_8100_0000
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000


def _pump(session: Any, stop: threading.Event) -> None:
    """Answer every event (CONTINUE) so the guest never waits on the introspector."""
    while not stop.is_set():
        try:
            event = session.next_event(0.2)
            if event is not None:
                session.reply(event, abi.KVMI_EVENT_ACTION_CONTINUE)
        except ConnectionClosed:
            return


@pytest.fixture(scope="module", params=KERNELS)
def lab(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    kernel = request.param
    tmp = tempfile.mkdtemp(prefix="vmitrace-profile-lab-")
    sock = os.path.join(tmp, "kvmi.sock")
    listener = Listener("unix:" + sock)
    stop = threading.Event()
    info: dict[str, Any] = {"kernel": kernel}
    guest = guestlab.Guest(kernel=kernel, plugin_options={"socket": sock})
    try:
        guest.start()
        session = listener.accept(timeout=120)
        assert session is not None, "the KVMI plugin did not connect"
        pump = threading.Thread(target=_pump, args=(session, stop), daemon=True)
        pump.start()
        guest.wait_ready(guest.boot_timeout)
        status, kallsyms = guest.run("cat /proc/kallsyms", timeout=120, compress=True)
        assert status == 0
        info["kallsyms"] = parse_kallsyms(kallsyms)
        info["lstar"] = session.get_registers(0, msrs=[MSR_LSTAR]).msrs[MSR_LSTAR]
        info["guest_isf"] = build_from_guest(session)
        status, ps = guest.run("ps -o pid,comm")
        assert status == 0
        info["ps"] = parse_ps(ps)
        guest.qmp("stop")
        dump = work_dir() / f"ram-{kernel}.raw"
        shutil.copyfile(guest.ram_path, dump)
        info["dump"] = dump
    finally:
        stop.set()
        guest.stop()
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)
    info["image_isf"], info["image_path"] = image_isf(kernel)
    info["profile"] = profiles.load(info["image_path"])
    yield info
    info["dump"].unlink(missing_ok=True)


def _slide(lab: dict[str, Any]) -> int:
    ((text, _type),) = lab["kallsyms"]["_text"]
    return text - lab["profile"].symbol("_text")


def test_profile_from_guest_memory_over_kvmi_equals_the_image_profile(lab: dict[str, Any]) -> None:
    guest_isf = lab["guest_isf"]
    prov = guest_isf["symbols"]["vmitrace.provenance"]
    assert prov != lab["image_isf"]["symbols"]["vmitrace.provenance"]
    assert without_provenance(guest_isf) == without_provenance(lab["image_isf"])
    record = profiles.isf.embedded(guest_isf, "provenance")
    assert record["source"] == "guest" and record["lstar_checked"] is True
    assert int(record["kaslr_slide"], 16) == _slide(lab)


def test_profile_from_a_raw_dump_equals_the_image_profile(lab: dict[str, Any]) -> None:
    assert without_provenance(build_from_guest(str(lab["dump"]))) == without_provenance(lab["image_isf"])


def test_symbol_addresses_match_proc_kallsyms(lab: dict[str, Any]) -> None:
    prof, slide = lab["profile"], _slide(lab)
    assert slide % (2 << 20) == 0
    compared = 0
    for name, entries in lab["kallsyms"].items():
        if len(entries) != 1 or not prof.has_symbol(name):
            continue  # names kallsyms lists twice are ambiguous by name
        (address, _type), = entries
        link = prof.symbol(name)
        expected = link + slide if link >= START_KERNEL_MAP else link  # per-CPU offsets do not move
        assert address == expected, name
        compared += 1
    assert compared > 80_000


def test_kaslr_slide_from_the_lstar_register(lab: dict[str, Any]) -> None:
    assert lab["profile"].kaslr_slide(lab["lstar"]) == _slide(lab)


def test_kaslr_slide_from_a_banner_scan_of_physical_memory(lab: dict[str, Any]) -> None:
    from tracer.memory import GuestMemory, RamFile

    prof = lab["profile"]
    ram = RamFile(lab["dump"])
    try:
        data = ram.read(0, ram.size)
        banner_gpa = data.find(prof.banner_bytes + b"\0")
        ((text, _), ) = lab["kallsyms"]["_text"]
        ((banner, _), ) = lab["kallsyms"]["linux_banner"]
        ((pgt, _), ) = lab["kallsyms"]["init_top_pgt"]
        cr3 = banner_gpa - (banner - text) + (pgt - text)  # the kernel's own page tables
        memory = GuestMemory(ram)
        slide = prof.find_slide(lambda gva, n: memory.read_virtual(cr3, gva, n),
                                read_physical=ram.read, physical_size=ram.size)
        assert slide == _slide(lab)
        assert not prof.confirm_slide(slide + (2 << 20), lambda gva, n: memory.read_virtual(cr3, gva, n))
    finally:
        ram.close()


def test_syscall_names_match_the_running_kernels_table(lab: dict[str, Any]) -> None:
    """The running kernel's sys_call_table, read from the dump and named by /proc/kallsyms."""
    prof, kallsyms = lab["profile"], lab["kallsyms"]
    data = lab["dump"].read_bytes()
    ((text, _), ) = kallsyms["_text"]
    ((banner, _), ) = kallsyms["linux_banner"]
    ((table, _), ) = kallsyms["sys_call_table"]
    phys_text = data.find(prof.banner_bytes + b"\0") - (banner - text)
    following = min(a for entries in kallsyms.values() for a, _ in entries if a > table)
    names_at: dict[int, list[str]] = {}
    for name, entries in kallsyms.items():
        for address, _type in entries:
            names_at.setdefault(address, []).append(name)
    running = {}
    for nr in range((following - table) // 8):
        (target,) = struct.unpack_from("<Q", data, phys_text + table - text + 8 * nr)
        wrappers = [n for n in names_at.get(target, []) if n.startswith("__x64_sys_")]
        if wrappers and wrappers[0] != "__x64_sys_ni_syscall":
            running[nr] = wrappers[0].removeprefix("__x64_sys_")
    assert len(running) > 340
    assert {nr: s.name for nr, s in prof.syscalls.items()} == running


def test_volatility3_pslist_on_the_dump_lists_the_guests_processes(lab: dict[str, Any], tmp_path: Path) -> None:
    symbols = tmp_path / "symbols" / "linux"
    symbols.mkdir(parents=True)
    shutil.copyfile(lab["image_path"], symbols / lab["image_path"].name)
    cache = tmp_path / "volcache"
    cache.mkdir()
    vol = Path(sys.executable).with_name("vol")
    proc = subprocess.run([str(vol), "-q", "-f", str(lab["dump"]), "-s", str(tmp_path / "symbols"),
                           "--cache-path", str(cache), "-r", "json", "linux.pslist"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = {row["PID"]: row["COMM"] for row in json.loads(proc.stdout)}
    reported = lab["ps"]
    # `ps` and the shell around it exited before the dump was taken.
    transient = {pid for pid, comm in reported.items() if comm in ("ps", "sh", "timeout")}
    assert len(listed) > 20
    for pid, comm in reported.items():
        if pid not in transient:
            assert _same_task_name(comm, listed.get(pid)), (pid, comm, listed.get(pid))
    for pid, comm in listed.items():
        if pid in reported:
            assert _same_task_name(reported[pid], comm)
        else:
            assert pid > max(reported), (pid, comm)  # only tasks started after `ps` ran


def _same_task_name(reported: str, comm: str | None) -> bool:
    """/proc shows a kworker as comm + "-"/"+" + its current workqueue (cut to 15 chars); the
    task's comm, which volatility3 reads, is the part before that."""
    if comm is None:
        return False
    if comm.startswith("kworker/") and reported.startswith(comm) and reported[len(comm):][:1] in ("-", "+", ""):
        return True
    return reported == comm
