"""Harness for the tracing tests: a real lab guest traced from boot (no test functions here).

`TracedLab` starts a KVMI listener, boots a lab guest whose vmitrace plugin connects to it and
holds the vCPUs at reset until the collector is attached, so everything from the kernel's
first LSTAR write on is traced. Records land in a MemorySink.
"""
from __future__ import annotations

import re
import tempfile
from typing import Any

from guestlab import build
from guestlab.guest import Guest
from tracer.collector import Collector, MemorySink, TraceOptions
from tracer.kvmi.transport import Listener
from tracer.memory import RamFile
from tracer.trace_cli import profile_for_image


def lab_profile(kernel: str) -> Any:
    import profiles
    return profiles.load(profile_for_image(build.ensure(kernel, refresh=False).vmlinuz))


class TracedLab:
    def __init__(self, kernel: str, vcpus: int = 2, options: TraceOptions | None = None,
                 record: str | None = None, ram: bool = True, cpu: str = "qemu64") -> None:
        self.kernel = kernel
        self.profile = lab_profile(kernel)
        self.dir = tempfile.mkdtemp(prefix="vmitrace-test-")
        factory = None
        if record:
            from tracer.kvmi.recording import RecordingWriter
            factory = lambda hs: RecordingWriter(record, hs)  # noqa: E731
        self.listener = Listener(f"unix:{self.dir}/kvmi.sock", recorder_factory=factory)
        self.sink = MemorySink()
        self.collector = Collector(lambda s: self.profile, [self.sink], options or TraceOptions())
        self.guest = Guest(kernel=kernel, vcpus=vcpus, cpu=cpu,
                           plugin_options={"socket": self.listener.path, "hold": True})
        self.guest.start()
        try:
            session = self.listener.accept(timeout=60)
            assert session is not None, "the plugin did not connect"
            self.session = session
            self.collector.trace_in_thread(session, RamFile(self.guest.ram_path) if ram else None)
            self.guest.wait_ready(240)
        except BaseException:
            self.close()
            raise

    @property
    def tracer(self) -> Any:
        return self.collector.tracers[0]

    def run(self, command: str, timeout: float = 120) -> str:
        status, output = self.guest.run(command, timeout=timeout)
        assert status == 0, f"{command!r} failed ({status}): {output}"
        return output

    def run_pid(self, program: str, timeout: float = 120) -> tuple[int, int, str]:
        """Run `program` as a known process: (its pid, its parent's pid, output)."""
        out = self.run(f"sh -c 'echo vmitrace-pid $$ $PPID; exec {program}'", timeout)
        m = re.search(r"vmitrace-pid (\d+) (\d+)", out)
        assert m, out
        return int(m.group(1)), int(m.group(2)), out

    def records(self) -> list[dict[str, Any]]:
        assert self.collector.pump.sync(30)
        return list(self.sink.records)

    def close(self) -> dict[str, Any]:
        self.collector.stop()
        summary = self.collector.close()
        self.guest.stop()
        self.listener.close()
        return summary


def syscalls_of(records: list[dict[str, Any]], pid: int) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "syscall" and r.get("tid") == pid]


def program_calls(records: list[dict[str, Any]], pid: int, program: str) -> list[dict[str, Any]]:
    """The syscalls of `pid` from its execve of `program` on."""
    calls = syscalls_of(records, pid)
    start = next(i for i, r in enumerate(calls)
                 if r["action"] == "execve" and r.get("path") == program)
    return calls[start:]


def arg(record: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in record["decoded_args"] if a["name"] == name)


_STRACE_LINE = re.compile(r"^(?P<name>\w+)\((?P<args>.*)\)\s+= (?P<ret>\?|0x[0-9a-f]+|-?\d+)"
                          r"(?: (?P<errno>E[A-Z0-9_]+))?")


def parse_strace(text: str) -> list[tuple[str, int | None, str | None]]:
    """(name, return value, errno name) per completed strace line; signals and exits skipped."""
    out = []
    for line in text.splitlines():
        if line.startswith(("---", "+++")):
            continue
        m = _STRACE_LINE.match(line)
        if not m:
            raise AssertionError(f"unparsed strace line: {line!r}")
        ret = m.group("ret")
        errno = m.group("errno")
        value = None if ret == "?" else int(ret, 0)
        if errno:
            value = None
        out.append((m.group("name"), value, errno))
    return out


def vmitrace_sequence(calls: list[dict[str, Any]]) -> list[tuple[str, int | None, str | None]]:
    out = []
    for r in calls:
        if r.get("errno"):
            out.append((r["action"], None, r["errno"]))
        else:
            out.append((r["action"], r.get("ret"), None))
    return out


def strace_output(lab: TracedLab, program: str) -> tuple[int, str]:
    """Run `program` under strace in the guest; (pid of the traced program, strace output)."""
    out_file = "/tmp/vmitrace-strace.txt"
    out = lab.run(f"strace -o {out_file} sh -c 'echo vmitrace-child $$; exec {program}'")
    m = re.search(r"vmitrace-child (\d+)", out)
    assert m, out
    return int(m.group(1)), lab.run(f"cat {out_file}")


def from_execve(sequence: list[Any], is_execve: Any) -> list[Any]:
    """The part of a sequence starting at the execve of the program."""
    start = next(i for i, item in enumerate(sequence) if is_execve(item))
    return sequence[start:]

