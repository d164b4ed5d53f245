"""`vmitrace trace` and `vmitrace replay`: run the collector on live KVMI hosts, a lab guest,
or a recorded session, into one or more sinks."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import click

# tracer.collector and the monitors pull in pyarrow and pandas (the record schema): they are
# imported inside the commands, so `vmitrace --help` and other commands do not pay for them.

log = logging.getLogger(__name__)


class TraceError(click.ClickException):
    """A clear, user-facing failure of trace/replay (exit status 1)."""


# -- profiles ---------------------------------------------------------------------------------

def _index_path() -> Path:
    root = Path(os.environ.get("VMITRACE_CACHE") or Path.home() / ".cache" / "vmitrace")
    return root / "trace" / "image-profiles.json"


def profile_for_image(vmlinuz: Path) -> Path:
    """The cached profile of a kernel image, built on first use (keyed by the image's hash)."""
    import profiles
    from profiles import cache

    digest = hashlib.sha256(vmlinuz.read_bytes()).hexdigest()
    index_path = _index_path()
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    known = index.get(digest)
    if known and Path(known).exists():
        return Path(known)
    click.echo(f"[trace] building the profile of {vmlinuz} (once)", err=True)
    path = cache.store(profiles.build_from_image(str(vmlinuz)))
    index[digest] = str(path)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    return path


def _load_profile(path: str | Path) -> Any:
    import profiles

    try:
        return profiles.load(path)
    except (OSError, profiles.ProfileError) as exc:
        raise TraceError(f"cannot load profile {path}: {exc}") from exc


def _profile_from_guest(session: Any, timeout: float = 300.0) -> Any:
    """--profile auto on a live host: build (or reuse) the profile from the guest's memory.

    A host may connect before its kernel is in memory (at power-on): retry until the kernel
    is found, answering the events that arrive meanwhile (e.g. a host holding its vCPUs
    until the introspector answers) so the guest can boot.
    """
    import profiles
    from profiles import cache

    from tracer.kvmi.errors import KvmiError

    deadline = time.monotonic() + timeout
    while True:
        try:
            isf = profiles.build_from_guest(session)
            break
        except profiles.ProfileError as exc:
            if time.monotonic() > deadline:
                raise TraceError(f"no profile from guest {session.name!r} after {timeout:.0f} s:"
                                 f" {exc}") from exc
            log.info("guest %s: no kernel found yet (%s); retrying", session.name, exc)
        pause = time.monotonic() + 2.0
        while time.monotonic() < pause:
            try:
                event = session.next_event(timeout=0.2)
            except KvmiError as exc:
                raise TraceError(f"guest {session.name!r} went away: {exc}") from exc
            if event is not None:
                session.reply(event)
    return profiles.load(cache.store(isf))


# -- sinks ------------------------------------------------------------------------------------

def _open_sinks(specs: tuple[str, ...]) -> list[Any]:
    from sinks import SinkError, open_sink

    out = []
    for spec in specs or ("jsonl:-",):
        try:
            out.append(open_sink(spec))
        except (SinkError, ValueError, OSError) as exc:
            for sink in out:
                sink.close()
            raise TraceError(f"cannot open sink {spec!r}: {exc}") from exc
    return out


def _options(pids: tuple[int, ...], comms: tuple[str, ...], syscalls: tuple[str, ...],
             hv_events: bool, spin_us: int = 0, blocking_syscalls: bool = False,
             reply_spin_us: int = 300) -> Any:
    """The collector's TraceOptions for these filters."""
    from tracer.collector import TraceOptions
    from tracer.monitors.base import Filters

    return TraceOptions(filters=Filters(frozenset(pids), frozenset(comms), frozenset(syscalls)),
                        hv_events=hv_events, spin_us=spin_us, reply_spin_us=reply_spin_us,
                        run_on_syscalls=not blocking_syscalls)


def describe_host_cost(cost: dict[str, int]) -> str:
    """A VM's `host_cost` (VmTracer.measure_host_cost) in a sentence."""
    return (f"{cost['waits']} of {cost['events']} events made their vCPU wait "
            f"({cost['timeouts']} without a reply); vCPUs spent {cost['event_us'] / 1e6:.3f} s "
            f"in events, {cost['wait_us'] / 1e6:.3f} s of it waiting (longest wait "
            f"{cost['max_wait_us'] / 1e3:.1f} ms)")


def _summary(result: dict[str, Any]) -> None:
    """The final loss summary, on stderr."""
    for vm in result["vms"]:
        click.echo(f"[trace] VM {vm['vm_name'] or vm['vm_id']}: {vm['events']} events "
                   f"({vm.get('events_run_on', 0)} not waited for), "
                   f"{vm['syscalls']} syscalls paired", err=True)
        losses = {k: v for k, v in sorted(vm["losses"].items()) if v}
        click.echo("[trace]   losses: " + (", ".join(f"{k}={v}" for k, v in losses.items())
                                          or "none"), err=True)
        if vm.get("host_cost"):
            click.echo(f"[trace]   host: {describe_host_cost(vm['host_cost'])}", err=True)
        for note in vm["notes"]:
            click.echo(f"[trace]   note: {note}", err=True)
    for error in result["errors"]:
        click.echo(f"[trace] error: {error}", err=True)
    click.echo(f"[trace] {result['records']} records written; sinks: "
               f"{json.dumps(result['sinks'], default=str)}", err=True)


def _on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: object) -> None:
        click.echo(f"[trace] {signal.Signals(signum).name}: stopping", err=True)
        stop()
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _recorder_factory(path: str | None) -> Any:
    if path is None:
        return None
    from tracer.kvmi.recording import RecordingWriter

    count = {"n": 0}

    def make(handshake: Any) -> RecordingWriter:
        n = count["n"]
        count["n"] += 1
        return RecordingWriter(path if n == 0 else f"{path}.{n}", handshake)
    return make


# -- commands ---------------------------------------------------------------------------------

@click.command("trace")
@click.option("--lab", is_flag=True, help="Boot a lab guest with the vmitrace KVMI plugin and trace it.")
@click.option("--kernel", type=click.Choice(["6.1", "6.12"]), default="6.1", show_default=True,
              help="With --lab: the lab kernel series.")
@click.option("--vcpus", type=click.IntRange(1, 4), default=1, show_default=True,
              help="With --lab: number of vCPUs.")
@click.option("--workload", type=click.Choice(["steady", "once", "none"]), default="steady",
              show_default=True, help="With --lab: the workload driver started at boot.")
@click.option("--listen", "listen", metavar="unix:PATH|vsock:PORT",
              help="Accept real KVMI hosts on this address (one session per VM).")
@click.option("--secret-file", type=click.Path(exists=True, dir_okay=False),
              help="With --listen: file holding the shared KVMI handshake secret.")
@click.option("--profile", "profile_arg", default="auto", show_default=True,
              help="Profile (ISF) path, or 'auto': from the lab kernel image, or from the guest.")
@click.option("--duration", type=float, help="Stop after this many seconds (default: until signalled).")
@click.option("--pid", "pids", type=int, multiple=True, help="Only these pids/tids (repeatable).")
@click.option("--comm", "comms", multiple=True, help="Only tasks with this comm (repeatable).")
@click.option("--syscall", "syscalls", multiple=True, help="Only this syscall name (repeatable).")
@click.option("--sink", "sink_specs", multiple=True, metavar="SPEC",
              help="jsonl:PATH|-, parquet:DIR, kafka:HOST:PORT/TOPIC (repeatable; default jsonl:-).")
@click.option("--record", "record", type=click.Path(dir_okay=False),
              help="Record the KVMI session(s) to this file for `vmitrace replay`.")
@click.option("--hv-events", is_flag=True, help="Also emit raw CR/MSR write events as records.")
@click.option("--spin-us", type=click.IntRange(0, 10_000), default=0, show_default=True,
              help="Busy-poll this many microseconds for the next event before sleeping: lower "
                   "guest slow-down under dense events, for a CPU core while they last.")
@click.option("--reply-spin-us", type=click.IntRange(0, 10_000), default=300, show_default=True,
              help="After answering an event the guest waited for, busy-poll until this many "
                   "microseconds after the reply for the next one (0: never): spares a wake-up "
                   "on the critical path of a guest that waits, for at most that much CPU per "
                   "reply.")
@click.option("--blocking-syscalls", is_flag=True,
              help="Make every syscall entry and exit wait for its reply, even where the host "
                   "can let them run on (decoding is exact either way).")
def trace(lab: bool, kernel: str, vcpus: int, workload: str, listen: str | None,
          secret_file: str | None, profile_arg: str, duration: float | None,
          pids: tuple[int, ...], comms: tuple[str, ...], syscalls: tuple[str, ...],
          sink_specs: tuple[str, ...], record: str | None, hv_events: bool,
          spin_us: int, reply_spin_us: int, blocking_syscalls: bool) -> None:
    """Trace system calls, processes, integrity events and hypercalls of VMs over KVMI.

    \b
    Examples:
      vmitrace trace --lab --duration 30 --sink jsonl:/tmp/trace.jsonl
      vmitrace trace --lab --kernel 6.12 --vcpus 2 --comm wl-file --sink jsonl:-
      vmitrace trace --listen unix:/run/vmitrace/kvmi.sock --profile p.json.xz --sink parquet:/data
    """
    if lab == bool(listen):
        raise click.UsageError("give exactly one of --lab or --listen")
    from tracer.collector import Collector
    from tracer.kvmi.transport import Listener

    options = _options(pids, comms, syscalls, hv_events, spin_us, blocking_syscalls,
                       reply_spin_us)
    if profile_arg != "auto":
        fixed = _load_profile(profile_arg)
        profile_for: Callable[[Any], Any] = lambda session: fixed  # noqa: E731
    elif lab:
        from guestlab import build
        lab_profile = _load_profile(profile_for_image(build.ensure(kernel, refresh=False).vmlinuz))
        profile_for = lambda session: lab_profile  # noqa: E731
    else:
        profile_for = _profile_from_guest
    secret = Path(secret_file).read_bytes().strip() if secret_file else None
    deadline = time.monotonic() + duration if duration else None
    sinks = _open_sinks(sink_specs)
    collector = Collector(profile_for, sinks, options)
    _on_signals(collector.stop)
    tmpdir = tempfile.mkdtemp(prefix="vmitrace-trace-") if lab else None
    address = f"unix:{tmpdir}/kvmi.sock" if lab else listen
    guest = None
    try:
        try:
            listener = Listener(address, secret=secret,  # type: ignore[arg-type]
                                recorder_factory=_recorder_factory(record))
        except (OSError, ValueError) as exc:
            raise TraceError(f"cannot listen on {address}: {exc}") from exc
        with listener:
            if lab:
                # A recorded session must see every memory read so that replay can answer
                # them; a live one reads guest RAM directly from the shared file (faster).
                guest = start_lab_guest(kernel, vcpus, workload, listener, collector,
                                        ram_shortcut=record is None, error=TraceError)
                click.echo(f"[trace] lab guest {guest.name} ({guest.release}, {vcpus} vCPU) "
                           "is up", err=True)
                # with --lab the deadline counts from the moment the guest is up
                deadline = time.monotonic() + duration if duration else None
                while not collector.stop_event.is_set() and \
                        (deadline is None or time.monotonic() < deadline):
                    if guest.process is not None and guest.process.poll() is not None:
                        click.echo("[trace] the lab guest stopped", err=True)
                        break
                    time.sleep(0.2)
            else:
                click.echo(f"[trace] listening on {address}", err=True)
                memory_for = None
                collector.serve(listener, deadline, memory_for)
    finally:
        collector.stop()
        result = collector.close()
        if guest is not None:
            guest.stop()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        _summary(result)
    if result["errors"]:
        sys.exit(1)


def start_lab_guest(kernel: str, vcpus: int, workload: str, listener: Any, collector: Any,
                    ram_shortcut: bool, error: type[click.ClickException] = TraceError,
                    connect_timeout: float = 60.0) -> Any:
    """Boot a lab guest whose KVMI plugin connects to `listener`, held at reset until
    `collector` traces its session (so boot is traced), and wait until it is up.

    `ram_shortcut`: read guest RAM from the shared RAM file instead of over KVMI (faster, but a
    recording then lacks those reads). Failures stop the guest and raise `error` (exit 1).
    Returns the running guestlab Guest; the caller stops it.
    """
    from guestlab.guest import Guest, GuestError
    from tracer.kvmi.errors import KvmiError
    from tracer.memory import RamFile

    guest = Guest(kernel=kernel, vcpus=vcpus, workload=workload,
                  plugin_options={"socket": listener.path, "hold": True})
    try:
        guest.start()
        session = listener.accept(timeout=connect_timeout)
        if session is None:
            raise error(f"the lab guest's KVMI plugin did not connect within "
                        f"{connect_timeout:g} s")
        collector.trace_in_thread(session, RamFile(guest.ram_path) if ram_shortcut else None)
        guest.wait_ready(guest.boot_timeout)
    except (GuestError, KvmiError, OSError) as exc:
        guest.stop()
        raise error(f"lab guest: {exc}") from exc
    except BaseException:  # our own error, or Ctrl-C while booting: do not leave QEMU behind
        guest.stop()
        raise
    return guest


@click.command("replay")
@click.argument("recording", type=click.Path(exists=True, dir_okay=False))
@click.option("--profile", "profile_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The profile (ISF) of the recorded guest's kernel.")
@click.option("--sink", "sink_specs", multiple=True, metavar="SPEC",
              help="jsonl:PATH|-, parquet:DIR, kafka:HOST:PORT/TOPIC (repeatable; default jsonl:-).")
@click.option("--pid", "pids", type=int, multiple=True, help="Only these pids/tids (repeatable).")
@click.option("--comm", "comms", multiple=True, help="Only tasks with this comm (repeatable).")
@click.option("--syscall", "syscalls", multiple=True,
              help="Only this syscall name (repeatable).")
@click.option("--hv-events", is_flag=True, help="Also emit raw CR/MSR write events as records.")
def replay(recording: str, profile_path: str, sink_specs: tuple[str, ...], pids: tuple[int, ...],
           comms: tuple[str, ...], syscalls: tuple[str, ...], hv_events: bool) -> None:
    """Re-run the collector against a recorded KVMI session (deterministic: same records).

    RECORDING is a file written by `vmitrace trace --record` or the demo's session.kvmirec;
    --profile is the ISF of the recorded guest's kernel (the demo's summary.json names it).

    \b
    Examples:
      vmitrace replay vmitrace-demo-out/session.kvmirec --profile PROFILE --sink jsonl:-
      vmitrace replay lab.kvmirec --profile p.json.xz --sink parquet:/tmp/replayed --comm wl-file
    """
    from tracer.collector import Collector

    options = _options(pids, comms, syscalls, hv_events)
    options.observer_host = None  # a replay has no live observer; keeps output reproducible
    profile = _load_profile(profile_path)
    sinks = _open_sinks(sink_specs)
    collector = Collector(lambda session: profile, sinks, options)
    _on_signals(collector.stop)
    try:
        run_replay(collector, recording)
    finally:
        result = collector.close()
        _summary(result)
    if result["errors"]:
        sys.exit(1)


def run_replay(collector: Any, recording: str) -> None:
    """Serve `recording` through a real socket and trace it with the event-time clock."""
    from tracer.kvmi.recording import RecordingError, RecordingReader, ReplayHost
    from tracer.kvmi.transport import Session

    try:
        reader = RecordingReader(recording)
        clock = RecordedClock(reader)
        host = ReplayHost(reader)
    except (OSError, RecordingError) as exc:
        raise TraceError(f"cannot replay {recording}: {exc}") from exc
    sock = host.socketpair()
    session = Session.from_socket(sock)
    tracer_thread = threading.Thread(
        target=lambda: collector.trace(session, None, None, clock=clock.now, event_clock=clock),
        daemon=True)
    tracer_thread.start()
    tracer_thread.join()
    if host.unmatched_commands:
        click.echo(f"[trace] replay: {host.unmatched_commands} commands were not in the "
                   "recording (answered -KVM_ENOENT)", err=True)


class RecordedClock:
    """Event times of a recording: its wall clock at the start plus the recorded offsets."""

    def __init__(self, reader: Any) -> None:
        from tracer.kvmi import abi

        header = abi.KVMI_MSG_HDR.struct
        self.times: dict[int, list[int]] = {}
        first = None
        for rec in reader:
            if first is None:
                first = rec.monotonic_ns
            if rec.direction == "in" and len(rec.raw) >= header.size:
                msg_id, _size, seq = header.unpack_from(rec.raw)
                if msg_id == abi.KVMI_EVENT:
                    self.times.setdefault(seq, []).append(
                        reader.wallclock_ns + rec.monotonic_ns - first)
        self.current = reader.wallclock_ns

    def at_event(self, event: Any) -> None:
        times = self.times.get(event.seq)
        if times:  # seqs may wrap in long sessions: consume in order, keep the last
            self.current = times.pop(0) if len(times) > 1 else times[0]

    def now(self) -> int:
        return self.current
