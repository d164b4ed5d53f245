"""Acceptance: a real lab guest (QEMU TCG + the vmitrace KVMI plugin, 2 vCPUs, both lab kernels)
traced from boot; the workloads' system calls must appear with exact decoded values, attributed
to the right processes, and match strace run inside the same guest."""
from __future__ import annotations

import contextlib
import gc
import json
import time

import pytest

from guestlab import workloads as wl
from tracer.kvmi import abi
from tracer.monitors import kernel as k
from test_trace_support import (TracedLab, arg, from_execve, parse_strace, program_calls,
                                strace_output, syscalls_of, vmitrace_sequence)

pytestmark = pytest.mark.guest



@pytest.fixture(scope="module", params=["6.1", "6.12"])
def lab(request):
    traced = TracedLab(request.param, vcpus=2)
    yield traced
    traced.close()


def after_startup(calls):
    """Calls made after glibc's start-up (the first mprotect) of a workload process."""
    idx = next(i for i, r in enumerate(calls) if r["action"] == "mprotect")
    return calls[idx + 1:]


def test_file_workload_exact_values(lab):
    pid, ppid, _ = lab.run_pid(wl.WORKLOAD_BINARIES["file"])
    calls = program_calls(lab.records(), pid, wl.WORKLOAD_BINARIES["file"])
    assert calls[0]["ret"] == 0
    main = after_startup(calls)
    assert [r["action"] for r in main] == ["openat", "write", "close", "openat", "read", "close",
                                            "exit_group"]
    open_w, write, close1, open_r, read, close2, exit_group = main
    assert arg(open_w, "dfd")["value"] == "AT_FDCWD"
    assert arg(open_w, "filename")["value"] == wl.FILE_PATH
    assert arg(open_w, "flags")["value"] == "O_WRONLY|O_CREAT|O_TRUNC"
    assert arg(open_w, "mode")["value"] == "0644"
    assert open_w["path"] == wl.FILE_PATH and open_w["mode"] == wl.FILE_MODE
    assert open_w["ret"] == 3 and open_w["fd"] == 3 and "errno" not in open_w
    assert write["fd"] == 3 and write["ret"] == wl.FILE_BYTES and write["length"] == wl.FILE_BYTES
    assert arg(write, "buf")["value"].startswith(wl.FILE_PATTERN.decode().replace("\n", "\\n"))
    assert arg(write, "buf")["truncated"]
    assert close1["fd"] == 3 and close1["ret"] == 0
    assert arg(open_r, "flags")["value"] == "O_RDONLY" and open_r["ret"] == 3
    assert "mode" not in open_r  # no O_CREAT: the mode register means nothing
    assert read["fd"] == 3 and read["ret"] == wl.FILE_BYTES
    assert close2["ret"] == 0
    assert exit_group["event_type"] == "enter" and arg(exit_group, "error_code")["value"] == "0"
    for r in calls[1:]:
        assert (r["pid"], r["tid"], r["ppid"]) == (pid, pid, ppid)
        assert r["comm"] == wl.WORKLOAD_COMMS["file"] and r["exe"] == wl.WORKLOAD_BINARIES["file"]
        assert r["uid"] == 0 and r["process_uid"] == calls[0]["process_uid"]
        assert r["process_uid"].endswith(f"/{pid}/{r['task_start_ns']}")


def test_file_workload_lifecycle(lab):
    pid, ppid, _ = lab.run_pid(wl.WORKLOAD_BINARIES["file"])
    procs = [r for r in lab.records() if r["kind"] == "process" and r["pid"] == pid]
    assert [r["event_type"] for r in procs][0] == "start" and \
        [r["event_type"] for r in procs][-2:] == ["exec", "exit"]  # sh may exec first
    start, exec_, exit_ = procs[0], procs[-2], procs[-1]
    assert start["ppid"] == ppid
    # The new task ran on from ret_from_fork; its start record still shows it as it was
    # there (its parent's image), since its execve entry waited until that was read.
    fork_return = lab.tracer.ctx.layout.address("ret_from_fork")
    assert lab.tracer.ctx.breakpoint_rules[fork_return].run_on
    assert start["comm"] != "wl-file" and start["exe"] != wl.WORKLOAD_BINARIES["file"]
    assert exec_["exe"] == wl.WORKLOAD_BINARIES["file"] and exec_["comm"] == "wl-file"
    assert exec_["argv"] == [wl.WORKLOAD_BINARIES["file"]]
    assert exit_["exit_code"] == wl.WORKLOAD_EXIT_OK and exit_["comm"] == "wl-file"
    assert start["process_uid"] == exec_["process_uid"] == exit_["process_uid"]
    parent = [r for r in lab.records() if r.get("process_uid") == start["parent_process_uid"]]
    assert parent and all(r["pid"] == ppid for r in parent)


def test_exec_workload_argv_envp_and_child(lab):
    pid, _, _ = lab.run_pid(wl.WORKLOAD_BINARIES["exec"])
    records = lab.records()
    main = after_startup(program_calls(records, pid, wl.WORKLOAD_BINARIES["exec"]))
    assert [r["action"] for r in main] == ["fork", "wait4", "exit_group"]
    fork, wait4, _ = main
    child = fork["ret"]
    assert child > pid
    child_calls = syscalls_of(records, child)
    execve = next(r for r in child_calls if r["action"] == "execve")
    assert execve["path"] == wl.EXEC_PATH and execve["ret"] == 0
    assert execve["argv"] == list(wl.EXEC_ARGV)
    assert json.loads(arg(execve, "argv")["value"]) == list(wl.EXEC_ARGV)
    assert json.loads(arg(execve, "envp")["value"]) == list(wl.EXEC_ENVP)
    assert execve["ppid"] == pid
    assert wait4["ret"] == child and arg(wait4, "upid")["value"] == str(child)
    assert arg(wait4, "stat_addr")["value"] == \
        f"[{{WIFEXITED(s) && WEXITSTATUS(s) == {wl.EXEC_EXIT_CODE}}}]"
    life = [r for r in records if r["kind"] == "process" and r["pid"] == child]
    assert [r["event_type"] for r in life] == ["start", "exec", "exit"]
    assert life[0]["ppid"] == pid and life[0]["comm"] == wl.WORKLOAD_COMMS["exec"]
    assert life[1]["argv"] == list(wl.EXEC_ARGV) and life[1]["exe"] == wl.EXEC_PATH
    assert life[2]["exit_code"] == wl.EXEC_EXIT_CODE


def test_exec_with_strings_longer_than_the_hosts_copy_waits(lab):
    """A successful exec's exit runs on with the host's copy of the strings at its new
    stack's top, 8 KiB from argv[0]; where they are longer (ten 1000-byte variables here)
    the copy is cut short and the exit waits instead (VMITRACE_TABLE_WAIT_IF_CUT): the
    filename, at the very top, is still read before the new program runs. Nothing was read
    after a hit ran on."""
    ctx, program = lab.tracer.ctx, wl.WORKLOAD_BINARIES["file"]
    value = "x" * 1000
    exit_site = lab.tracer.syscalls.return_site
    live_reads = ctx.loss.counts["read_after_run_on"]
    with watching(ctx, (exit_site,)) as hits:
        lab.run_pid(program)  # short strings: runs on
        out = lab.run("x=$(/bin/busybox head -c 1000 /dev/zero | /bin/busybox tr '\\0' x); "
                      "sh -c 'echo vmitrace-pid $$; exec /bin/busybox env " +
                      " ".join(f"VMITRACE_{i}=$0" for i in range(10)) + f" {program}' $x")
    pid = int(out.split("vmitrace-pid ")[1].split()[0])
    waited = [waited for _, nr, waited in hits if nr == 59]
    # only sh's exec of env (the variables are its arguments) and env's of the program
    assert waited.count(True) == 2, waited
    execs = [r for r in syscalls_of(lab.records(), pid) if r["action"] == "execve"]
    assert [r["path"] for r in execs][-2:] == ["/bin/busybox", program]
    envp = json.loads(arg(execs[-1], "envp")["value"])
    assert f"VMITRACE_0={value}" in envp and f"VMITRACE_9={value}" not in envp  # 4 KiB of it
    assert execs[-1]["argv"] == [program] and execs[-1]["ret"] == 0
    assert json.loads(arg(execs[-2], "argv")["value"])[:3] == \
        ["/bin/busybox", "env", f"VMITRACE_0={value}"]
    assert ctx.loss.counts["read_after_run_on"] == live_reads, dict(ctx.loss.counts)


def test_enoent_workload(lab):
    pid, _, _ = lab.run_pid(wl.WORKLOAD_BINARIES["enoent"])
    main = after_startup(program_calls(lab.records(), pid, wl.WORKLOAD_BINARIES["enoent"]))
    failed = main[0]
    assert failed["action"] == "openat" and failed["path"] == wl.ENOENT_PATH
    assert arg(failed, "flags")["value"] == "O_RDONLY"
    assert failed["ret"] == -wl.ENOENT and failed["errno"] == "ENOENT"
    assert "fd" not in failed


def test_tcp_workload(lab):
    pid, _, _ = lab.run_pid(wl.WORKLOAD_BINARIES["tcp"])
    main = after_startup(program_calls(lab.records(), pid, wl.WORKLOAD_BINARIES["tcp"]))
    names = [r["action"] for r in main]
    assert names == ["socket", "setsockopt", "bind", "listen", "socket", "connect", "accept",
                     "write", "read", "close", "close", "close", "exit_group"]
    sock, _, bind, listen, client, connect, accept, write, read = main[:9]
    assert [a["value"] for a in sock["decoded_args"]] == ["AF_INET", "SOCK_STREAM", "IPPROTO_IP"]
    assert sock["ret"] == 3 and client["ret"] == 4
    target = f"AF_INET {wl.TCP_ADDRESS}:{wl.TCP_PORT}"
    assert arg(bind, "umyaddr")["value"] == target and bind["ret"] == 0
    assert bind["local_addr"] == wl.TCP_ADDRESS and bind["local_port"] == wl.TCP_PORT
    assert listen["ret"] == 0
    assert arg(connect, "uservaddr")["value"] == target
    assert connect["remote_addr"] == wl.TCP_ADDRESS and connect["remote_port"] == wl.TCP_PORT
    assert connect["fd"] == 4 and connect["ret"] == 0 and connect["family"] == "AF_INET"
    assert accept["ret"] == 5 and accept["fd"] == 5
    assert write["fd"] == 4 and write["ret"] == len(wl.TCP_PAYLOAD)
    assert arg(write, "buf")["value"] == wl.TCP_PAYLOAD.decode()
    assert read["fd"] == 5 and read["ret"] == len(wl.TCP_PAYLOAD)
    assert arg(read, "buf")["value"] == wl.TCP_PAYLOAD.decode()


def test_vmcall_hypercall_record(lab):
    pid, _, _ = lab.run_pid(wl.WORKLOAD_BINARIES["vmcall"])
    hyper = [r for r in lab.records() if r["kind"] == "hypercall" and r.get("pid") == pid]
    assert len(hyper) == 1
    h = hyper[0]
    assert h["hypercall_nr"] == wl.VMCALL_RAX and h["comm"] == wl.WORKLOAD_COMMS["vmcall"]
    assert h["extra"]["rbx"] == hex(wl.VMCALL_RBX) and h["extra"]["rsi"] == hex(wl.VMCALL_RSI)


def test_int80_32bit_syscalls_of_a_64bit_process(lab):
    program = wl.WORKLOAD_BINARIES["int80"]
    pid, ppid, _ = lab.run_pid(program)
    calls = after_startup(program_calls(lab.records(), pid, program))
    assert [(r["action"], (r.get("extra") or {}).get("abi")) for r in calls] == [
        ("getpid", None), ("getpid", "ia32"), ("open", "ia32"), ("write", "ia32"),
        ("close", "ia32"), ("open", None), ("read", None), ("close", None), ("exit_group", None)]
    getpid64, getpid32, open32, write32, close32, open64 = calls[:6]
    assert getpid64["syscall_nr"] == 39 and open64["syscall_nr"] == 2  # x86-64 numbers
    assert getpid32["syscall_nr"] == wl.I386_NR_GETPID and getpid32["ret"] == pid
    assert getpid32["args"] == [] and getpid32["decoded_args"] == []
    assert open32["syscall_nr"] == wl.I386_NR_OPEN
    assert [(a["name"], a["value"]) for a in open32["decoded_args"]] == [
        ("filename", wl.INT80_PATH), ("flags", "O_WRONLY|O_CREAT|O_TRUNC"), ("mode", "0600")]
    assert open32["args"][1:] == [wl.INT80_OPEN_FLAGS, wl.INT80_MODE]
    assert open32["args"][0] < 1 << 32
    assert open32["path"] == wl.INT80_PATH and open32["mode"] == wl.INT80_MODE
    assert open32["ret"] == 3 and open32["fd"] == 3 and "errno" not in open32
    assert write32["syscall_nr"] == wl.I386_NR_WRITE and write32["fd"] == 3
    assert arg(write32, "buf")["value"] == wl.INT80_PAYLOAD.decode()
    assert write32["length"] == write32["ret"] == len(wl.INT80_PAYLOAD)
    assert close32["syscall_nr"] == wl.I386_NR_CLOSE and close32["fd"] == 3
    assert close32["ret"] == 0
    for r in calls[:5]:
        assert (r["pid"], r["tid"], r["ppid"]) == (pid, pid, ppid)
        assert r["comm"] == wl.WORKLOAD_COMMS["int80"] and r["exe"] == program
        assert r["event_type"] == "call"
    tracer = lab.tracer.syscalls
    assert set(tracer.ia32_sites) >= {"asm_int80_emulation"}


def test_int80_matches_strace(lab):
    program = wl.WORKLOAD_BINARIES["int80"]
    pid, text = strace_output(lab, program)  # (its "runs in 32 bit mode" notes go to stderr)
    truth = from_execve(parse_strace(text), lambda item: item[0] == "execve")
    calls = syscalls_of(lab.records(), pid)
    ours = from_execve(vmitrace_sequence(calls), lambda item: item[0] == "execve")
    assert ("write", len(wl.INT80_PAYLOAD), None) in truth
    assert ours == truth


# The 32-bit vDSO enters by `syscall` where the CPU vendor is AMD (QEMU's qemu64 model, the
# lab's default) and by `sysenter` where it is Intel (whose guests also turn KPTI on).
FAST_STUBS = {"qemu64": "entry_SYSCALL_compat",
              "qemu64,vendor=GenuineIntel": "entry_SYSENTER_compat"}


@pytest.fixture(scope="module", params=["6.1", "6.12"])
def intel_lab(request):
    traced = TracedLab(request.param, vcpus=2, cpu="qemu64,vendor=GenuineIntel")
    yield traced
    traced.close()


@contextlib.contextmanager
def watching(ctx, sites):
    """The hits at `sites` while inside: (site, captured orig_ax, whether the vCPU waited)."""
    handlers = [ctx.breakpoints[s] for s in sites]
    hits: list[tuple[int, int, bool]] = []

    def watch(at, handler):
        def on_hit(event, regs):
            hits.append((at, k.PT_REGS.unpack(event.captured[0])[k.R_ORIG_AX], event.blocking))
            handler(event, regs)
        return on_hit
    for s, handler in zip(sites, handlers):
        ctx.breakpoints[s] = watch(s, handler)
    try:
        yield hits
    finally:
        for s, handler in zip(sites, handlers):
            ctx.breakpoints[s] = handler


def check_compat32(lab, cpu):
    """The compat32 workload's calls, decoded exactly, entering by the CPU's fast stub."""
    program = wl.WORKLOAD_BINARIES["compat32"]
    tracer = lab.tracer.syscalls
    assert {"asm_int80_emulation", FAST_STUBS[cpu]} <= set(tracer.ia32_sites)
    hits = dict(tracer.ia32_hits)
    pid, ppid, _ = lab.run_pid(program)
    fast = tracer.ia32_hits[FAST_STUBS[cpu]] - hits.get(FAST_STUBS[cpu], 0)
    calls = program_calls(lab.records(), pid, program)
    # the 64-bit shell's execve (exec may move the task: its exit may be on another vCPU)
    assert calls[0]["ret"] == 0 and "abi" not in (calls[0].get("extra") or {})
    main = after_startup(calls)
    assert [r["action"] for r in main] == ["getpid", "openat", "write", "close", "openat",
                                            "read", "mmap2", "munmap", "close", "exit_group"]
    getpid, open_w, write, close1, open_r, read, mmap2, munmap, close2, exit_group = main
    assert getpid["syscall_nr"] == wl.I386_NR_GETPID and getpid["ret"] == pid
    assert open_w["syscall_nr"] == wl.I386_NR_OPENAT
    assert [(a["name"], a["value"]) for a in open_w["decoded_args"]] == [
        ("dfd", "AT_FDCWD"), ("filename", wl.COMPAT32_PATH),
        ("flags", "O_WRONLY|O_CREAT|O_TRUNC"), ("mode", "0640")]
    assert open_w["args"][2:] == [wl.COMPAT32_WRITE_FLAGS, wl.COMPAT32_MODE]
    assert open_w["path"] == wl.COMPAT32_PATH and open_w["mode"] == wl.COMPAT32_MODE
    assert open_w["ret"] == 3 and open_w["fd"] == 3
    assert write["syscall_nr"] == wl.I386_NR_WRITE and write["fd"] == 3
    assert arg(write, "buf")["value"] == wl.COMPAT32_PAYLOAD.decode()
    assert write["length"] == write["ret"] == len(wl.COMPAT32_PAYLOAD)
    assert close1["syscall_nr"] == wl.I386_NR_CLOSE and close1["fd"] == 3 and close1["ret"] == 0
    assert arg(open_r, "flags")["value"] == "O_RDONLY" and open_r["ret"] == 3
    assert open_r["path"] == wl.COMPAT32_PATH and "mode" not in open_r
    assert read["syscall_nr"] == wl.I386_NR_READ and read["fd"] == 3
    assert read["ret"] == len(wl.COMPAT32_PAYLOAD)
    assert arg(read, "buf")["value"] == wl.COMPAT32_PAYLOAD.decode()
    # mmap2 (raw arguments): the sixth, the page offset, came from the user stack.
    assert mmap2["syscall_nr"] == wl.I386_NR_MMAP2
    assert mmap2["args"] == [0, wl.COMPAT32_MAP_LEN, wl.COMPAT32_MAP_PROT,
                             wl.COMPAT32_MAP_FLAGS, 3, wl.COMPAT32_MAP_PGOFF]
    assert [a["value"] for a in mmap2["decoded_args"]] == [
        hex(v) for v in mmap2["args"]]
    assert not any(a["error"] for a in mmap2["decoded_args"])
    assert 0 < mmap2["ret"] < 1 << 32 and mmap2["ret"] % wl.COMPAT32_PAGE_SIZE == 0
    assert munmap["syscall_nr"] == wl.I386_NR_MUNMAP and munmap["ret"] == 0
    assert munmap["args"] == [mmap2["ret"], wl.COMPAT32_MAP_LEN]
    assert close2["fd"] == 3 and close2["ret"] == 0
    assert exit_group["event_type"] == "enter" and arg(exit_group, "error_code")["value"] == "0"
    for r in calls[1:]:
        assert r["extra"]["abi"] == "ia32"
        assert (r["pid"], r["tid"], r["ppid"]) == (pid, pid, ppid)
        assert r["comm"] == wl.WORKLOAD_COMMS["compat32"] and r["exe"] == program
    # Every call after glibc's start-up goes through __kernel_vsyscall and returns to the
    # vDSO's int80_landing_pad: one user address (below 4 GiB), the same for all.
    landing_pads = {r["rip"] for r in main}
    assert len(landing_pads) == 1 and 0 < landing_pads.pop() < 1 << 32
    assert fast >= len(main)


def check_compat32_strace(traced):
    """The compat32 workload under strace in the guest: the same calls and results, and the
    same sixth argument of mmap2."""
    program = wl.WORKLOAD_BINARIES["compat32"]
    pid, text = strace_output(traced, program)
    truth = from_execve(parse_strace(text), lambda item: item[0] == "execve")
    calls = syscalls_of(traced.records(), pid)
    ours = from_execve(vmitrace_sequence(calls), lambda item: item[0] == "execve")
    assert ours == truth
    # strace shows mmap2's sixth argument as the byte offset (pages times the page size).
    line = next(x for x in text.splitlines() if x.startswith("mmap2("))
    assert line.split(") = ")[0].rsplit(", ", 1)[1] == hex(
        wl.COMPAT32_MAP_PGOFF * wl.COMPAT32_PAGE_SIZE)
    mmap2 = next(r for r in calls if r["action"] == "mmap2" and r["args"][4] == 3)
    assert mmap2["args"][5] == wl.COMPAT32_MAP_PGOFF


def check_compat32_restart(traced):
    """A 32-bit nanosleep stopped and continued: the kernel rewinds the fast call to the vDSO's
    `int $0x80`, which enters again as restart_syscall through the int80 stub."""
    program = wl.WORKLOAD_BINARIES["compat32"]
    hits = traced.tracer.syscalls.ia32_hits["asm_int80_emulation"]
    frames_lost = traced.tracer.ctx.loss.counts["unreadable_signal_frame"]
    out = traced.run(f"{program} {wl.COMPAT32_SLEEP_ARG} & p=$!; echo vmitrace-pid $p; "
                     "sleep 0.5; kill -STOP $p; kill -CONT $p; wait $p")
    pid = int(out.split("vmitrace-pid ")[1].split()[0])
    calls = [r for r in syscalls_of(traced.records(), pid)
             if "sleep" in r["action"] or r["action"] == "restart_syscall"]
    assert [r["action"] for r in calls] == ["clock_nanosleep", "restart_syscall"], calls
    interrupted, resumed = calls
    assert interrupted["extra"] == {"abi": "ia32", "restarted": "true"}
    assert "ret" not in interrupted
    args = interrupted["args"]  # CLOCK_REALTIME, no flags, glibc's 32-bit timespec buffers
    assert args[:2] == [0, 0] and 0 < args[2] < 1 << 32 and 0 < args[3] < 1 << 32
    assert resumed["extra"]["abi"] == "ia32" and resumed["ret"] == 0
    assert resumed["rip"] == interrupted["rip"]  # the landing pad: both return there
    assert traced.tracer.syscalls.ia32_hits["asm_int80_emulation"] > hits
    assert traced.tracer.ctx.loss.counts["unreadable_signal_frame"] == frames_lost  # no handler


def check_compat32_signals(traced, cpu):
    """32-bit calls interrupted into a signal handler record their own result, -EINTR, which
    the kernel saved in the handler's frame (the handler's eax is the signal number): with
    a plain handler (the legacy i386 frame) and with an SA_SIGINFO one (the rt frame).
    glibc's pause() enters by the CPU's fast stub, the read by `int $0x80`. Neither exit
    waits (pause reads nothing, the read's buffer is captured): each frame is read while
    its handler runs, whose return waits at its entry."""
    program = wl.WORKLOAD_BINARIES["compat32"]
    tracer, loss = traced.tracer.syscalls, traced.tracer.ctx.loss.counts
    decoder, stub = tracer.ia32_decoder, FAST_STUBS[cpu]
    handler_returns = {decoder.number("sigreturn"), decoder.number("rt_sigreturn")}
    assert handler_returns <= set(tracer.entries_that_wait(decoder))
    frames_lost, live_reads = loss["unreadable_signal_frame"], loss["read_after_run_on"]
    hits = dict(tracer.ia32_hits)
    exits = [tracer.ia32_sites[s] + 5 for s in (stub, "asm_int80_emulation")]
    with watching(traced.tracer.ctx, exits) as exit_hits:
        pid, _, _ = traced.run_pid(f"{program} {wl.COMPAT32_SIGNALS_ARG}")
    calls = after_startup(program_calls(traced.records(), pid, program))
    assert all(r["extra"]["abi"] == "ia32" for r in calls)
    blocked = [i for i, r in enumerate(calls) if r["action"] in ("pause", "read")]
    assert [calls[i]["action"] for i in blocked] == ["pause", "read"] * 2, \
        [r["action"] for r in calls]
    for n, i in enumerate(blocked):
        call = calls[i]
        assert call["ret"] == -wl.EINTR and call["errno"] == "EINTR", call
        assert "restarted" not in call["extra"], call
        assert calls[i + 1]["action"] == ("sigreturn" if n < 2 else "rt_sigreturn"), calls[i + 1]
    pause_plain, read_plain, pause_rt, read_rt = (calls[i] for i in blocked)
    assert pause_plain["syscall_nr"] == pause_rt["syscall_nr"] == wl.I386_NR_PAUSE
    assert read_plain["syscall_nr"] == read_rt["syscall_nr"] == wl.I386_NR_READ
    assert read_plain["args"][2] == read_rt["args"][2] == 1
    # pause() returns to the vDSO's landing pad, the read after the workload's `int $0x80`
    assert pause_plain["rip"] == pause_rt["rip"]
    assert pause_plain["rip"] not in (read_plain["rip"], read_rt["rip"])
    assert loss["unreadable_signal_frame"] == frames_lost, dict(loss)
    assert loss["read_after_run_on"] == live_reads, dict(loss)
    waited = {(at, nr): blocking for at, nr, blocking in exit_hits}
    assert waited[(exits[0], wl.I386_NR_PAUSE)] is False, waited
    assert waited[(exits[1], wl.I386_NR_READ)] is False, waited
    assert tracer.ia32_hits[stub] > hits.get(stub, 0)


def test_compat32_glibc_calls_through_the_vdso(lab):
    check_compat32(lab, "qemu64")


def test_compat32_hits_run_on_unless_a_record_needs_the_vcpu(lab):
    """32-bit hits run on as 64-bit ones do: at the SYSCALL stub getpid's entry and exit do
    not wait, nor do openat's, write's and read's, whose path and buffers the host captured
    (by the registers' low 32 bits), nor mmap2's entry, whose sixth argument the host copied
    from the caller's stack. Their decoding (exact: test_compat32_glibc_calls_through_the_vdso)
    read nothing live."""
    tracer = lab.tracer
    ctx, site = tracer.ctx, tracer.syscalls.ia32_sites["entry_SYSCALL_compat"]
    sites = (site, site + 5)
    NR_READ, NR_WRITE, NR_GETPID, NR_MMAP2 = 3, 4, 20, 192
    entry_rule, exit_rule = (ctx.breakpoint_rules[s] for s in sites)
    assert entry_rule.run_on and exit_rule.run_on
    assert entry_rule.block_values == abi.block_bitmap(tracer.syscalls.entries_that_wait(
        tracer.syscalls.ia32_decoder))
    assert all(e.words32 for e in entry_rule.table + exit_rule.table)
    assert {wl.I386_NR_OPENAT, NR_WRITE} <= {e.key for e in entry_rule.table}
    assert {wl.I386_NR_OPENAT, NR_WRITE, NR_READ} <= {e.key for e in exit_rule.table}
    stack_word = abi.CaptureTableEntry(NR_MMAP2, k.R_SP, 4, words32=True)  # the user esp
    assert [e for e in entry_rule.table if e.key == NR_MMAP2] == [stack_word]
    assert NR_MMAP2 not in {e.key for e in exit_rule.table}
    live_reads = ctx.loss.counts["read_after_run_on"]
    with watching(ctx, sites) as hits:
        lab.run_pid(wl.WORKLOAD_BINARIES["compat32"])
    waited = {(at, nr): blocking for at, nr, blocking in hits}
    assert waited[(sites[0], NR_GETPID)] is False and waited[(sites[1], NR_GETPID)] is False
    for nr in (wl.I386_NR_OPENAT, NR_WRITE, NR_READ):
        assert waited[(sites[0], nr)] is False and waited[(sites[1], nr)] is False, waited
    assert waited[(sites[0], NR_MMAP2)] is False, waited
    assert ctx.loss.counts["read_after_run_on"] == live_reads, dict(ctx.loss.counts)


def test_compat32_matches_strace(lab):
    check_compat32_strace(lab)


def test_compat32_restarted_call(lab):
    check_compat32_restart(lab)


def test_compat32_call_interrupted_by_a_handled_signal_keeps_its_return_value(lab):
    check_compat32_signals(lab, "qemu64")


def test_compat32_sysenter(intel_lab):
    check_compat32(intel_lab, "qemu64,vendor=GenuineIntel")


def test_compat32_sysenter_matches_strace(intel_lab):
    check_compat32_strace(intel_lab)


def test_matches_strace_name_for_name_and_value_for_value(lab):
    program = wl.WORKLOAD_BINARIES["tcp"]
    pid, text = strace_output(lab, program)
    truth = from_execve(parse_strace(text), lambda item: item[0] == "execve")
    calls = syscalls_of(lab.records(), pid)
    ours = from_execve(vmitrace_sequence(calls), lambda item: item[0] == "execve")
    assert len(truth) > 25
    assert ours == truth


def test_the_host_counts_what_tracing_cost_the_vcpus(lab):
    """The host's vCPU statistics (VMITRACE_GET_VCPU_STATS) agree with the collector: the
    events that waited are those the collector answered (the host counts one once its vCPU
    has the reply, the collector before it replies), with the time spent in them."""
    ctx, tracer = lab.tracer.ctx, lab.tracer

    def waited() -> int:
        return ctx.events - ctx.events_run_on

    w0, c0, w0_after = waited(), tracer.measure_host_cost(), waited()
    lab.run(f"{wl.WORKLOAD_DRIVER} once >/dev/null")
    w1, c1, w1_after = waited(), tracer.measure_host_cost(), waited()
    assert c0 is not None and c1 is not None
    cost = {field: c1[field] - c0[field] for field in c0 if field != "max_wait_us"}
    assert w1 - w0_after - lab.guest.vcpus <= cost["waits"] <= w1_after - w0 + lab.guest.vcpus
    assert cost["waits"] > 0 and cost["events"] > 10 * cost["waits"]  # most entries run on
    assert cost["event_us"] > cost["wait_us"] > 0 and cost["timeouts"] == 0
    assert c1["max_wait_us"] * cost["waits"] >= cost["wait_us"]


def test_no_integrity_alarm_and_few_unpaired(lab):
    lab.run(f"timeout 30 {wl.WORKLOAD_DRIVER} steady 200 >/dev/null; true", timeout=90)
    records = lab.records()
    assert not [r for r in records if r["kind"] == "integrity"]
    losses = lab.tracer.ctx.loss.counts
    paired = lab.tracer.syscalls.calls
    unpaired = losses["unpaired_entry"] + losses["unpaired_exit"]
    assert paired > 3000
    assert unpaired / paired < 0.001, dict(losses)
    assert losses["monitor_error"] == 0 and losses["unreadable_entry"] == 0, dict(losses)
    assert losses["dropped_records"] == 0


def test_the_profile_is_out_of_the_cyclic_gcs_view(lab):
    """While it traces, the collector keeps the heap it started with out of the cyclic GC's
    view: a full collection while vCPUs wait must not walk the profile's tables (124 000
    objects for the 6.1 kernel: 60-113 ms)."""
    assert lab.profile.syscalls
    assert not any(obj is lab.profile.syscalls for obj in gc.get_objects())


def test_run_on_and_blocking_syscalls_decode_the_same(lab):
    """Entries of ordinary calls (exit_group's too), and exits of calls whose decoding reads
    no guest memory or only what the host's capture tables copy (paths, buffers), do not
    stop the vCPU (the host copies pt_regs and the current task into the event, and checks
    the captured number against the exit rule's bitmap); with every hit waiting (what
    `--blocking-syscalls` installs), and with plain breakpoints without captures (hosts
    without the extended breakpoint: the monitor reads pt_regs itself), the same calls decode
    to the same values."""
    tracer, session = lab.tracer, lab.session
    ctx, sites = tracer.ctx, (tracer.syscalls.entry_site, tracer.syscalls.return_site)
    rules = [ctx.breakpoint_rules[site] for site in sites]
    assert rules[0].run_on and rules[0].block_flags == abi.VMITRACE_BLOCK_BITMAP
    assert rules[0].block_values == abi.block_bitmap(tracer.syscalls.entries_that_wait())
    entries_wait = set(tracer.syscalls.entries_that_wait())
    assert {59, 322, 105, 157} <= entries_wait  # execve(at), setuid, prctl
    # exit(_group) need not: the exiting task waits at do_exit before its memory goes
    assert tracer.syscalls.do_exit_waits and not {60, 231} & entries_wait
    do_exit_rule = ctx.breakpoint_rules[ctx.layout.address("do_exit")]
    assert not do_exit_rule.run_on and len(do_exit_rule.captures) == 1  # waits; task copied
    assert not {0, 1, 3, 257} & entries_wait             # read, write, close, openat run on
    waits = set(tracer.syscalls.exits_that_wait())
    assert rules[1].run_on and {59, 43, 46, 47} <= waits  # execve, accept, sendmsg, recvmsg
    assert not {3, 12, 39} & waits                          # close, brk, getpid
    assert not {105, 157} & waits  # setuid, prctl: what follows reads the task again
    # A successful exec(at) runs on (its return is redirected: the reversed set), with the
    # strings at its new stack's top copied from argv[0] (the pointer at sp + 8) on.
    half = abi.VMITRACE_MAX_BLOCK_VALUES
    assert rules[1].block_flags & abi.VMITRACE_BLOCK_DIFFER_REVERSED
    assert rules[1].block_values[half:] == abi.block_bitmap([59, 322])
    assert rules[1].block_values[:half] == abi.block_bitmap(waits - {59, 322})
    assert [e for e in rules[1].table if e.key in (59, 322)] == [
        abi.CaptureTableEntry(nr, k.R_SP, abi.VMITRACE_MAX_POINTER_CAPTURE, indirect=8,
                              wait_if_cut=True) for nr in (59, 322)]
    # Read, write, open(at), wait4 are decoded from what the host captured at the sites.
    assert {0, 1, 2, 257, 61} <= tracer.syscalls.x86_64.captured and not {0, 1, 2, 257, 61} & waits
    assert {e.key for e in rules[0].table} >= {1, 2, 257} and {e.key for e in rules[1].table} >= \
        {0, 1, 2, 257, 61}
    handlers = [ctx.breakpoints[site] for site in sites]
    hits: list[tuple[int, int, bool]] = []  # (site, number, whether the vCPU waited)
    paths: list[bytes] = []  # what the host captured at openat entries

    def watching(site, handler):
        def watch(event, regs):
            if event.captured and event.captured[0]:
                nr = k.PT_REGS.unpack(event.captured[0])[k.R_ORIG_AX]
                hits.append((site, nr, event.blocking))
                if site == sites[0] and nr == 257:
                    paths.extend(c.data for c in event.pointer_captures)
            else:
                hits.append((site, -1, event.blocking))
            handler(event, regs)
        return watch

    program = wl.WORKLOAD_BINARIES["file"]
    actions = ["openat", "write", "close", "openat", "read", "close", "exit_group"]
    for site, handler in zip(sites, handlers):
        ctx.breakpoints[site] = watching(site, handler)
    try:
        pids = [lab.run_pid(program)[0]]
        exit_waited = {nr: blocking for site, nr, blocking in hits if site == sites[1]}
        assert exit_waited[3] is False and exit_waited[0] is False, exit_waited
        assert exit_waited[1] is False and exit_waited[257] is False, exit_waited
        assert exit_waited[59] is False, exit_waited  # the program's exec
        assert wl.FILE_PATH.encode() + b"\0" in paths
        entry_waited = {nr: blocking for site, nr, blocking in hits if site == sites[0]}
        assert entry_waited[257] is False and entry_waited[231] is False, entry_waited
        for waiting in (lambda site, rule: session.set_breakpoint_ex(site, False,
                                                                     captures=rule.captures),
                        lambda site, rule: session.set_breakpoint(site)):
            for site, rule in zip(sites, rules):
                waiting(site, rule)
            hits.clear()
            pids.append(lab.run_pid(program)[0])
            assert len(hits) > 2 * len(actions) and all(blocking for *_, blocking in hits)
    finally:
        for site, handler in zip(sites, handlers):
            ctx.breakpoints[site] = handler
            tracer.install_breakpoint(site)  # the plain breakpoint dropped the table
    records = lab.records()
    assert ctx.loss.counts["read_after_run_on"] == 0, dict(ctx.loss.counts)
    for calls in (after_startup(program_calls(records, p, program)) for p in pids):
        assert [r["action"] for r in calls] == actions
        assert arg(calls[0], "filename")["value"] == wl.FILE_PATH
        assert arg(calls[0], "flags")["value"] == "O_WRONLY|O_CREAT|O_TRUNC"
        assert calls[0]["ret"] == 3 and calls[1]["ret"] == wl.FILE_BYTES
        assert calls[2]["ret"] == 0 and calls[4]["ret"] == wl.FILE_BYTES


def test_credential_change_recorded_with_the_caller_as_it_was(lab):
    """busybox su drops to another user in its own process, then execs a shell: its setuid
    record shows uid 0 (the call's entry waits until it is read: the kernel changes the
    credentials before the exit), and the shell's calls show the new uid."""
    out = lab.run("grep -q ^vmtuser: /etc/passwd || "
                  "echo 'vmtuser:x:4321:4321:vmtuser:/:/bin/sh' >> /etc/passwd; "
                  "su vmtuser -s /bin/sh -c 'echo vmitrace-pid $$ $(id -u)'")
    pid, uid = map(int, out.split("vmitrace-pid ")[1].split()[:2])
    assert uid == 4321
    calls = syscalls_of(lab.records(), pid)
    names = [r["action"] for r in calls]
    su_setuid = calls[names.index("setuid")]  # su's; the shell it execs calls setuid again
    assert arg(su_setuid, "uid")["value"] == "4321" and su_setuid["ret"] == 0
    assert su_setuid["uid"] == 0 and calls[names.index("setgid")]["uid"] == 0
    shell = calls[names.index("setuid") + 1]
    assert shell["action"] == "execve" and shell["uid"] == 4321
    assert all(r["uid"] == 4321 for r in calls[names.index("setuid") + 1:])


def test_signal_at_syscall_exit_keeps_the_entry_arguments(lab):
    """kill() of oneself: before the call's exit the kernel rewrites pt_regs for the signal
    handler, and rt_sigreturn rewrites them again; the records keep the calls' own values."""
    out = lab.run("sh -c 'trap \"echo handled\" USR1; echo vmitrace-pid $$; kill -USR1 $$'")
    assert "handled" in out
    pid = int(out.split("vmitrace-pid ")[1].split()[0])
    calls = syscalls_of(lab.records(), pid)
    kills = [r for r in calls if r["action"] == "kill"]
    assert len(kills) == 1, [r["action"] for r in calls]
    kill = kills[0]
    assert arg(kill, "pid")["value"] == str(pid) and arg(kill, "sig")["value"] == "SIGUSR1"
    assert kill["ret"] == 0
    assert "rt_sigreturn" in [r["action"] for r in calls[calls.index(kill) + 1:]]


def test_call_interrupted_by_a_handled_signal_keeps_its_return_value(lab):
    """The shell's `wait` sleeps in a call until a trapped signal interrupts it: the kernel
    sets the call's result (-EINTR) in the handler's signal frame and clears pt_regs->ax
    for the handler; the record has the result from the frame."""
    out = lab.run("sh -c 'trap \"echo handled\" USR1; echo vmitrace-pid $$; sleep 3 & s=$!; "
                  "(sleep 1; kill -USR1 $$) & wait $s; echo status $?'")
    assert "handled" in out and "status 138" in out, out  # 128 + SIGUSR1
    pid = int(out.split("vmitrace-pid ")[1].split()[0])
    calls = syscalls_of(lab.records(), pid)
    handled = [i for i, r in enumerate(calls) if r["action"] == "rt_sigreturn"]
    assert handled, [r["action"] for r in calls]
    interrupted = calls[handled[0] - 1] if calls[handled[0] - 1]["action"] != "write" else \
        calls[handled[0] - 2]  # the handler's echo
    assert interrupted["action"] == "rt_sigsuspend", interrupted
    assert interrupted.get("errno") == "EINTR" and interrupted["ret"] == -4, interrupted


def test_two_signals_at_one_return_keep_the_calls_result(lab):
    """wl-signals: SIGUSR1 and SIGUSR2 are both delivered at the return of rt_sigsuspend,
    each with a frame, the second on top; the call's -EINTR is in the first one, reached
    through the registers the second saved for the first handler."""
    frames_lost = lab.tracer.ctx.loss.counts["unreadable_signal_frame"]
    pid, _, _ = lab.run_pid(wl.SIGNALS_BINARY)  # exit status 0: the guest saw it as described
    calls = program_calls(lab.records(), pid, wl.SIGNALS_BINARY)
    names = [r["action"] for r in calls]
    suspend = calls[names.index("rt_sigsuspend")]
    assert suspend.get("errno") == "EINTR" and suspend["ret"] == -wl.EINTR, suspend
    kills = [arg(r, "sig")["value"] for r in calls if r["action"] == "kill"]
    assert kills == ["SIGUSR1", "SIGUSR2"], names
    after = names[names.index("rt_sigsuspend") + 1:]
    assert after == ["rt_sigreturn", "rt_sigreturn", "exit_group"], after
    assert lab.tracer.ctx.loss.counts["unreadable_signal_frame"] == frames_lost


def test_restarted_syscall(lab):
    """A call stopped and continued comes back rewound for its restart, into no handler:
    no signal frame is looked for."""
    frames_lost = lab.tracer.ctx.loss.counts["unreadable_signal_frame"]
    out = lab.run("sleep 2 & p=$!; echo vmitrace-pid $p; sleep 0.5; kill -STOP $p; "
                  "kill -CONT $p; wait $p")
    pid = int(out.split("vmitrace-pid ")[1].split()[0])
    calls = [r for r in syscalls_of(lab.records(), pid) if "sleep" in r["action"] or
             r["action"] == "restart_syscall"]
    assert [r["action"] for r in calls] == ["clock_nanosleep", "restart_syscall"], calls
    interrupted, resumed = calls
    assert interrupted["extra"]["restarted"] == "true" and "ret" not in interrupted
    assert resumed["ret"] == 0
    assert lab.tracer.ctx.loss.counts["unreadable_signal_frame"] == frames_lost


def test_orphan_is_reparented(lab):
    # The parent waits until the child has run (its first return, where its start record
    # reads the parent), then exits and leaves it an orphan.
    out = lab.run("rm -f /tmp/orphan-ran; sh -c '(touch /tmp/orphan-ran; exec sleep 1) & "
                  "while [ ! -e /tmp/orphan-ran ]; do :; done; echo vmitrace-pid $! $$'; "
                  "sleep 2")
    pid, first_parent = map(int, out.split("vmitrace-pid ")[1].split()[:2])
    deadline = time.monotonic() + 30  # the orphan's exit may come after the command's end
    while True:
        life = [r for r in lab.records() if r["kind"] == "process" and r["pid"] == pid]
        if (life and life[-1]["event_type"] == "exit") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert life[0]["event_type"] == "start" and life[0]["ppid"] == first_parent
    assert life[-1]["event_type"] == "exit" and life[-1]["exit_code"] == 0
    assert life[-1]["ppid"] != first_parent  # re-parented when its shell exited


def test_compat32_sysenter_restarted_call(intel_lab):
    check_compat32_restart(intel_lab)


def test_compat32_sysenter_call_interrupted_by_a_handled_signal(intel_lab):
    check_compat32_signals(intel_lab, "qemu64,vendor=GenuineIntel")
