"""The guest lab against real QEMU guests: both kernels, 1 and 2 vCPUs."""
from __future__ import annotations

import gzip
import hashlib
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guestlab import Guest, GuestError, ensure
from guestlab import workloads as wl
from guestlab.guest import READY_MARKER
from support.lab import LAB_MATRIX, lab_guest, lab_guest_factory  # noqa: F401

pytestmark = pytest.mark.guest

_OPEN_FLAG_NAMES = (("O_WRONLY", wl.O_WRONLY), ("O_CREAT", wl.O_CREAT), ("O_TRUNC", wl.O_TRUNC))


def strace_open_flags(flags: int) -> str:
    """How strace prints the open flags the workloads use."""
    names = [name for name, bit in _OPEN_FLAG_NAMES if flags & bit]
    assert sum(bit for _, bit in _OPEN_FLAG_NAMES if flags & bit) == flags, "unexpected flag"
    return "|".join(names) or "O_RDONLY"


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- the build ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_build_is_cached_and_names_the_kernel(kernel):
    first = ensure(kernel, refresh=False)
    stamp = first.initramfs.stat().st_mtime_ns
    second = ensure(kernel, refresh=False)
    assert second == first
    assert first.initramfs.stat().st_mtime_ns == stamp, "cached initramfs was rebuilt"
    assert first.release.startswith(kernel + ".")
    assert first.package.startswith(f"linux-image-{first.release}_")
    assert first.vmlinuz.stat().st_size > 1 << 20
    assert "CONFIG_LOCALVERSION" in first.config.read_text()
    cpio = gzip.decompress(first.initramfs.read_bytes())
    for member in (b"init\0", b"lab/wl-file\0", b"workload\0", b"usr/bin/strace\0",
                   b"lib/x86_64-linux-gnu/libunwind-ptrace.so.0\0", b"dev/console\0"):
        assert member in cpio


def test_unknown_kernel_is_refused():
    with pytest.raises(Exception, match="unknown lab kernel"):
        ensure("2.6")


def test_guest_arguments_are_checked():
    with pytest.raises(ValueError):
        Guest(vcpus=5)
    with pytest.raises(ValueError):
        Guest(vcpus=2, max_vcpus=1)
    with pytest.raises(ValueError):
        Guest(vcpus=2, max_vcpus=5)
    with pytest.raises(ValueError):
        Guest(memory_mb=4096)  # above 2 GiB guest-physical addresses stop matching file offsets
    with pytest.raises(ValueError):
        Guest(name="bad name")
    guest = Guest(plugin_options={"socket": "/tmp/x"}, plugin_path=wl.SOURCE_DIR / "missing.so")
    with pytest.raises(GuestError, match="not built"):
        guest.start()
    assert guest.pid is None


# --- a running guest, every kernel and vCPU count -------------------------------------------------

@pytest.mark.parametrize("lab_guest", LAB_MATRIX, indirect=True)
class TestRunningGuest:
    def test_ready_release_and_vcpus(self, lab_guest):
        assert READY_MARKER in lab_guest.serial_log.read_text(errors="replace")
        assert lab_guest.run("uname -r") == (0, lab_guest.build.release + "\n")
        assert lab_guest.run("nproc") == (0, f"{lab_guest.vcpus}\n")
        cpus = lab_guest.qmp("query-cpus-fast")
        assert len(cpus) == lab_guest.vcpus
        assert lab_guest.qmp("query-status")["status"] == "running"

    def test_run_reports_status_and_exact_output(self, lab_guest):
        assert lab_guest.run("exit 3") == (3, "")
        assert lab_guest.run("printf 'no newline'") == (0, "no newline")
        assert lab_guest.run("echo out; echo err >&2") == (0, "out\nerr\n")
        assert lab_guest.run_bytes(r"printf '\000\377\n'") == (0, b"\x00\xff\n")
        assert lab_guest.run("echo \"q' \\\"x\\\" $((6 * 7))\"") == (0, 'q\' "x" 42\n')
        status, output = lab_guest.run("sleep 30", timeout=2)
        assert status == 137  # killed by the guest-side timeout
        assert lab_guest.run("echo still there") == (0, "still there\n")

    def test_workloads_once(self, lab_guest):
        status, output = lab_guest.run(f"{wl.WORKLOAD_DRIVER} once")
        assert status == wl.WORKLOAD_EXIT_OK, output
        lines = output.splitlines()
        assert lines == [f"wl {name} status={wl.WORKLOAD_EXIT_OK}" for name in wl.WORKLOADS] + \
            ["wl round=1 failures=0"]
        assert lab_guest.run(f"stat -c '%s %a' {wl.FILE_PATH}") == \
            (0, f"{wl.FILE_BYTES} {wl.FILE_MODE:o}\n")
        assert lab_guest.run(f"md5sum < {wl.FILE_PATH}")[1].split()[0] == \
            hashlib.md5(wl.FILE_CONTENT).hexdigest()
        assert lab_guest.run(" ".join(f"'{a}'" for a in wl.EXEC_ARGV))[0] == wl.EXEC_EXIT_CODE
        assert lab_guest.run(f"test -e {wl.ENOENT_PATH}")[0] == 1
        assert lab_guest.run(f"cat {wl.COMPAT32_PATH}; stat -c ' %s %a' {wl.COMPAT32_PATH}") == \
            (0, f"{wl.COMPAT32_PAYLOAD.decode()} {len(wl.COMPAT32_PAYLOAD)} {wl.COMPAT32_MODE:o}\n")
        for name in wl.WORKLOADS:  # one at a time, through the driver
            assert lab_guest.run(f"{wl.WORKLOAD_DRIVER} {name}") == \
                (wl.WORKLOAD_EXIT_OK, f"wl {name} status={wl.WORKLOAD_EXIT_OK}\n")

    def test_strace_in_the_guest_sees_the_exact_syscalls(self, lab_guest):
        def strace(name: str) -> str:
            status, output = lab_guest.run(f"strace -f {wl.WORKLOAD_BINARIES[name]} 2>&1")
            assert status == wl.WORKLOAD_EXIT_OK, output
            return re.sub(r"\)\s+= ", ") = ", output)  # strace pads results into a column

        out = strace("file")
        assert (f'openat(AT_FDCWD, "{wl.FILE_PATH}", {strace_open_flags(wl.FILE_WRITE_FLAGS)}, '
                f'0{wl.FILE_MODE:o}) = 3') in out
        assert re.search(rf'write\(3, ".*"\.\.\., {wl.FILE_BYTES}\) = {wl.FILE_BYTES}', out)
        assert f'openat(AT_FDCWD, "{wl.FILE_PATH}", {strace_open_flags(wl.FILE_READ_FLAGS)}) = 3' in out
        assert re.search(rf'read\(3, ".*"\.\.\., {wl.FILE_BYTES}\) = {wl.FILE_BYTES}', out)

        out = strace("enoent")
        assert (f'openat(AT_FDCWD, "{wl.ENOENT_PATH}", {strace_open_flags(wl.ENOENT_FLAGS)}) '
                f'= -1 ENOENT') in out

        out = strace("exec")
        argv = ", ".join(f'"{a}"' for a in wl.EXEC_ARGV)
        assert f'execve("{wl.EXEC_PATH}", [{argv}]' in out
        assert f"exited with {wl.EXEC_EXIT_CODE}" in out
        assert f"WEXITSTATUS(s) == {wl.EXEC_EXIT_CODE}" in out

        out = strace("tcp")
        sockaddr = (f'{{sa_family=AF_INET, sin_port=htons({wl.TCP_PORT}), '
                    f'sin_addr=inet_addr("{wl.TCP_ADDRESS}")}}')
        assert f"bind(3, {sockaddr}, 16) = 0" in out
        assert f"listen(3, {wl.TCP_BACKLOG}) = 0" in out
        assert f"connect(4, {sockaddr}, 16) = 0" in out
        assert "accept(3, NULL, NULL) = 5" in out
        assert f'write(4, "{wl.TCP_PAYLOAD.decode()}", {len(wl.TCP_PAYLOAD)}) = {len(wl.TCP_PAYLOAD)}' in out

        out = strace("vmcall")
        assert "--- SIGILL {si_signo=SIGILL" in out  # TCG: vmcall raises #UD in the guest

        out = strace("compat32")  # a 32-bit process: glibc's calls through the vDSO
        assert "runs in 32 bit mode" in out
        assert (f'openat(AT_FDCWD, "{wl.COMPAT32_PATH}", '
                f'{strace_open_flags(wl.COMPAT32_WRITE_FLAGS)}, 0{wl.COMPAT32_MODE:o}) = 3') in out
        payload = wl.COMPAT32_PAYLOAD.decode()
        assert f'write(3, "{payload}", {len(payload)}) = {len(payload)}' in out
        assert f'read(3, "{payload}", {len(payload)}) = {len(payload)}' in out
        assert re.search(rf"mmap2\(NULL, {wl.COMPAT32_MAP_LEN}, PROT_READ, MAP_SHARED, 3, "
                         rf"{wl.COMPAT32_MAP_PGOFF * wl.COMPAT32_PAGE_SIZE:#x}\) = 0x[0-9a-f]+", out)

    def test_proc_ps_and_kallsyms(self, lab_guest):
        assert lab_guest.run("cat /proc/sys/kernel/kptr_restrict") == (0, "0\n")
        status, ps = lab_guest.run("ps")
        assert status == 0 and re.search(r"^\s*1 root\s+init", ps, re.M), ps
        status, line = lab_guest.run("grep ' entry_SYSCALL_64$' /proc/kallsyms")
        assert status == 0
        address = int(line.split()[0], 16)
        assert address >= 0xFFFFFFFF80000000  # real kernel text addresses, not zeros
        status, count = lab_guest.run("wc -l < /proc/kallsyms")
        assert status == 0 and int(count) > 50_000  # KALLSYMS_ALL
        plain = lab_guest.run("head -n 3000 /proc/kallsyms", timeout=120)
        assert plain == lab_guest.run("head -n 3000 /proc/kallsyms", compress=True, timeout=120)
        assert len(plain[1].splitlines()) == 3000

    def test_ram_file_is_guest_memory(self, lab_guest):
        path = lab_guest.ram_path
        assert path.parent.as_posix() == "/dev/shm" and path.exists()
        assert path.stat().st_size == lab_guest.memory_mb << 20
        # The kernel's banner lives in guest RAM: the file is the guest's physical memory.
        status, banner = lab_guest.run("cat /proc/version")
        assert status == 0
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as ram:
            assert ram.find(banner.strip().encode()[:60]) >= 0


# --- boot-time workload and shutdown ---------------------------------------------------------------

def test_steady_workload_and_clean_stop(tmp_path):
    period_ms = 400
    guest = Guest(kernel="6.1", vcpus=1, workload="steady", workload_period_ms=period_ms,
                  log_dir=tmp_path)
    with guest:
        assert f"vmitrace.workload=steady vmitrace.period_ms={period_ms}" in \
            guest.run("cat /proc/cmdline")[1]
        pid, ram, run_dir = guest.pid, guest.ram_path, guest.run_dir
        assert not process_gone(pid) and ram.exists()
        rounds: list[str] = []
        deadline = time.monotonic() + 120
        while len(rounds) < 3 and time.monotonic() < deadline:
            status, log = guest.run("grep round= /tmp/workload.log")
            rounds = log.splitlines()
        assert len(rounds) >= 3, rounds
        assert all(line.endswith("failures=0") for line in rounds), rounds
        status = guest.stop()
    assert status == 0  # powered off from inside, not killed
    assert process_gone(pid)
    assert not ram.exists()
    assert not run_dir.exists()
    assert READY_MARKER in (tmp_path / f"{guest.name}-serial.log").read_text(errors="replace")
    assert guest.stop() == 0  # idempotent


def test_stop_falls_back_when_the_guest_does_not_power_off():
    with Guest(kernel="6.1") as guest:
        pid, ram = guest.pid, guest.ram_path
        guest.qmp("stop")  # pause the vCPUs: the poweroff request is never acted on
        assert guest.qmp("query-status")["status"] == "paused"
        status = guest.stop(timeout=4)
    assert status is not None and process_gone(pid) and not ram.exists()


# --- the command line ------------------------------------------------------------------------------

VMITRACE = [str(Path(sys.executable).with_name("vmitrace"))]  # the installed console script


def test_cli_build_json_lists_both_kernels():
    done = subprocess.run([*VMITRACE, "lab", "build", "--json"], capture_output=True, text=True,
                          timeout=600, check=True)
    builds = json.loads(done.stdout)
    assert [b["kernel"] for b in builds] == ["6.1", "6.12"]
    for b in builds:
        assert b["release"] == ensure(b["kernel"], refresh=False).release
        assert Path(b["initramfs"]).is_file()


def test_cli_run_until_interrupted():
    proc = subprocess.Popen([*VMITRACE, "lab", "run", "--kernel", "6.12", "--vcpus", "2",
                             "--workload", "steady", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        text = ""
        while not text.endswith("}\n"):
            line = proc.stdout.readline()
            assert line, f"vmitrace lab run ended early: {proc.stderr.read()}"
            text += line
        info = json.loads(text)
        assert info["vcpus"] == 2 and info["release"].startswith("6.12.")
        ram = Path(info["ram"])
        assert ram.stat().st_size == info["memory_mb"] << 20
        assert READY_MARKER in Path(info["serial_log"]).read_text(errors="replace")
        assert "vmitrace.workload=steady" in Path(f"/proc/{info['qemu_pid']}/cmdline").read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert process_gone(info["qemu_pid"])
    assert not ram.exists()


# --- the KVMI plugin option ------------------------------------------------------------------------

def test_kvmi_socket_connects_the_plugin_with_this_guests_identity(tmp_path, lab_guest_factory):
    from tracer.kvmi import Listener

    listener = Listener(f"unix:{tmp_path}/kvmi.sock")
    try:
        guest = lab_guest_factory(kernel="6.12", kvmi_socket=f"{tmp_path}/kvmi.sock")
        session = listener.accept(timeout=60)
        assert session is not None, guest.qemu_log.read_text(errors="replace")
        assert session.name == guest.name
        assert str(session.uuid) == str(guest.uuid)
        assert guest.run("uname -r") == (0, guest.release + "\n")
        session.close()
    finally:
        listener.close()
