"""The whole tracing pipeline's cost: the lab workload untraced vs traced with full decoding.

One lab guest (QEMU TCG + the vmitrace KVMI plugin, connected) runs the same guest work in
three states, alternating --repeat times in this one run (so load from elsewhere hits all):

  untraced   the collector is attached but its events are switched off at the host (its
             breakpoints stay instrumented: no translation flush between runs)
  traced     events on: syscall entry/exit breakpoints, process lifecycle breakpoints,
             CR/MSR integrity events, hypercalls; every syscall decoded; records go to a null
             sink (counted, then discarded). Where the host offers
             VMITRACE_SET_BREAKPOINT_EX (`vmitrace trace`'s default there), entries (64-
             and 32-bit) run on with their registers captured by the host, except
             execve/exit and calls that change credentials or the task's name (a bitmap;
             at the 32-bit fast stubs the host copies the sixth argument from the
             caller's stack); exits
             wait for their reply only when the call's decoding reads guest memory that
             the host's capture tables do not copy (VMITRACE_SET_CAPTURE_TABLE: paths,
             read/write buffers, struct stat, ...), or changes the task: the host checks
             the captured number against a bitmap
  blocking   the same with every hit waiting for its reply (`--blocking-syscalls`):
             every rule that runs on is switched between runs

Switching events off in mid-run strands the syscalls in flight at that moment: expect a few
unpaired entries among the losses, from the benchmark itself.

Reported per traced state: wall-time ratio against untraced of the medians (what the guest
feels) and of the fastest runs, the median and quartiles of the ratios of back-to-back runs
(each traced run against the untraced run just before it: their spread shows the machine's
noise), the CPU-time ratio (QEMU plus collector, traced, over QEMU
untraced), the collector process's CPU time per KVMI event (all its threads: session reader,
event loop, sink), how many events made their vCPU wait, the time the vCPU spent in events
per run (waits included) by the host's own count (VMITRACE_GET_VCPU_STATS) and its ratio to
the untraced run's time (the tracer's direct share of the overhead, which the machine's
noise does not blur; the rest is indirect: the collector's CPU and caches on the same
host, and noise), the collector's cyclic-GC pauses
(any vCPU waiting meanwhile waits for them too); and the load average (the machine is
shared; compare ratios, not times).

With --waits, also where the waits go: for each kind of event that made its vCPU wait, how
many, and the time from its arrival at the collector to its reply (the wait's part in Python;
the socket and the wake-ups come on top).

Usage: .venv/bin/python bench/trace_pipeline.py [--kernel 6.1] [--vcpus 1] [--rounds 5]
       [--repeat 3] [--spin-us 0]   (the collector's busy-poll for events, as `vmitrace trace --spin-us`)
Goal (issue 5): traced <= 1.5x untraced with blocking delivery.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guestlab.guest import Guest  # noqa: E402
from ratios import paired  # noqa: E402
from tracer.collector import Collector, TraceOptions  # noqa: E402
from tracer.kvmi import abi  # noqa: E402
from tracer.kvmi.events import BreakpointEvent  # noqa: E402
from tracer.kvmi.protocol import decode_event  # noqa: E402
from tracer.kvmi.transport import Listener  # noqa: E402
from tracer.memory import RamFile  # noqa: E402
from tracer.monitors.base import FastRegs  # noqa: E402
from tracer.monitors.kernel import PT_REGS_SIZE, R_ORIG_AX  # noqa: E402
from tracer.trace_cli import profile_for_image  # noqa: E402


class NullSink:
    """Counts records and keeps none (the cost of a real sink is measured in bench/sinks.py)."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, records: list[dict[str, Any]]) -> None:
        self.count += len(records)

    def flush(self) -> None:
        pass

    def close(self) -> dict[str, Any]:
        return {"written": self.count, "dropped": 0}


def guest_work(rounds: int) -> str:
    """`rounds` passes of every lab workload (`guestlab.workloads.WORKLOADS`)."""
    return (f"i=0; while [ $i -lt {rounds} ]; do /workload once >/dev/null || exit 1; "
            f"i=$((i+1)); done")


TRACED_EVENTS = (abi.KVMI_EVENT_BREAKPOINT, abi.KVMI_EVENT_CR, abi.KVMI_EVENT_MSR,
                 abi.KVMI_EVENT_HYPERCALL)


def set_events(session: Any, vcpus: int, enabled: bool) -> None:
    """Switch the collector's events on or off (its breakpoints stay: no translation flush)."""
    for vcpu in range(vcpus):
        for event_id in TRACED_EVENTS:
            session.control_events(vcpu, event_id, enabled)


class GcPauses:
    """The collector process's cyclic-GC pauses (gc.callbacks), while `state` is set."""

    def __init__(self) -> None:
        self.state: str | None = None
        self.pauses: dict[str, list[float]] = {}
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self.state is not None:
            self.pauses.setdefault(self.state, []).append(time.perf_counter() - self._start)

    def summary(self, state: str) -> dict[str, float]:
        pauses = self.pauses.get(state, [])
        return {"count": len(pauses), "total_ms": round(sum(pauses) * 1e3, 2),
                "max_ms": round(max(pauses, default=0.0) * 1e3, 2)}


class WaitTimes:
    """With --waits, a Session recorder: for each event that made its vCPU wait, the time
    from its arrival at the collector to its reply, by what it was (the handler of its
    breakpoint, and the system call's name where the host captured pt_regs). It decodes
    every event a second time, so it costs the collector a little: compare with runs
    without it."""

    def __init__(self) -> None:
        self.state: str | None = None
        self.tracer: Any = None
        self._arrived: dict[int, tuple[int, str]] = {}
        self.waits: dict[str, dict[str, list[int]]] = {}

    def __call__(self, direction: str, time_ns: int, raw: bytes) -> None:
        msg_id, size, seq = struct.unpack_from("<HHI", raw)
        if direction == "in" and msg_id == abi.KVMI_EVENT and self.state is not None:
            event = decode_event(raw, size, seq)
            if event.blocking:
                self._arrived[seq] = (time_ns, self._kind(event))
        elif direction == "out" and msg_id == abi.KVMI_EVENT_REPLY:
            arrived = self._arrived.pop(seq, None)
            if arrived is not None and self.state is not None:
                kinds = self.waits.setdefault(self.state, {})
                kinds.setdefault(arrived[1], []).append(time_ns - arrived[0])

    def _kind(self, event: Any) -> str:
        if not isinstance(event, BreakpointEvent) or self.tracer is None:
            return type(event).__name__
        handler = self.tracer.ctx.breakpoints.get(FastRegs(event.raw).rip)
        kind = getattr(getattr(handler, "func", handler), "__qualname__", "unknown breakpoint")
        compat_abi = getattr(handler, "keywords", {}).get("abi")  # the 32-bit sites' handlers
        if compat_abi is not None:
            kind += f"[{compat_abi.name}]"
        pt_regs = event.captured[0] if event.captured else b""
        if len(pt_regs) == PT_REGS_SIZE:
            nr = struct.unpack_from("<q", pt_regs, R_ORIG_AX * 8)[0]
            if compat_abi is not None or nr not in self.tracer.decoder.syscalls:
                return f"{kind} nr {nr}"
            return f"{kind} {self.tracer.decoder.name(nr)}"
        return kind

    def summary(self, state: str, top: int = 12) -> list[dict[str, Any]]:
        """The kinds of `state`'s waits, longest total first."""
        kinds = sorted(self.waits.get(state, {}).items(), key=lambda kv: -sum(kv[1]))
        return [{"kind": kind, "count": len(times), "total_ms": round(sum(times) / 1e6, 1),
                 "median_us": round(statistics.median(times) / 1e3),
                 "max_us": round(max(times) / 1e3)} for kind, times in kinds[:top]]


def timed(guest: Guest, command: str) -> float:
    start = time.monotonic()
    status, output = guest.run(command, timeout=1800)
    if status != 0:
        raise SystemExit(f"guest work failed ({status}): {output}")
    return time.monotonic() - start


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of another process (QEMU), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="6.1", choices=["6.1", "6.12"])
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved untraced/traced runs (medians are reported)")
    parser.add_argument("--spin-us", type=int, default=0,
                        help="collector busy-poll before sleeping for an event")
    parser.add_argument("--waits", action="store_true",
                        help="also report where the waits go (adds a little collector work)")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval for this process (GIL hand-off latency)")
    args = parser.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)

    from guestlab import build
    import profiles
    profile = profiles.load(profile_for_image(build.ensure(args.kernel, refresh=False).vmlinuz))
    work = guest_work(args.rounds)
    directory = tempfile.mkdtemp(prefix="vmitrace-bench-")
    wait_times = WaitTimes() if args.waits else None
    with Listener(f"unix:{directory}/kvmi.sock",
                  recorder_factory=(lambda handshake: wait_times) if wait_times else None
                  ) as listener:
        guest = Guest(kernel=args.kernel, vcpus=args.vcpus,
                      plugin_options={"socket": listener.path})
        guest.start()
        try:
            session = listener.accept(timeout=60)
            assert session is not None, "plugin did not connect"
            guest.wait_ready(240)
            sink = NullSink()
            collector = Collector(lambda s: profile, [sink],
                                  TraceOptions(observer_host=None, spin_us=args.spin_us))
            collector.trace_in_thread(session, RamFile(guest.ram_path))
            deadline = time.monotonic() + 60
            while not (collector.tracers and collector.tracers[0].active and
                       not collector.tracers[0].ctx.install_queue):
                if time.monotonic() > deadline:
                    raise SystemExit("collector did not become active")
                time.sleep(0.1)
            tracer = collector.tracers[0]
            if wait_times is not None:
                wait_times.tracer = tracer
            timed(guest, guest_work(1))  # warm caches after the breakpoints' translation flush
            # "blocking" switches every rule that runs on, as --blocking-syscalls would
            run_on = {site: rule for site, rule in tracer.ctx.breakpoint_rules.items()
                      if rule.run_on}
            states = ("untraced", "traced", "blocking") if run_on else ("untraced", "traced")
            wall: dict[str, list[float]] = {state: [] for state in states}
            gc_pauses = GcPauses()
            qemu_cpu = dict.fromkeys(states, 0.0)
            collector_cpu = dict.fromkeys(states, 0.0)
            events = dict.fromkeys(states, 0)
            waited = dict.fromkeys(states, 0)  # events whose vCPU waited for the reply
            in_events_us = dict.fromkeys(states, 0)  # the host's count (vCPU stats)
            waiting_us = dict.fromkeys(states, 0)
            for _ in range(args.repeat):
                for state in states:
                    set_events(session, args.vcpus, state != "untraced")
                    if len(states) == 3:
                        for site, rule in run_on.items():
                            tracer.install_breakpoint(
                                site, replace(rule, run_on=state != "blocking"))
                    time.sleep(0.2)
                    events0, cpu0 = tracer.ctx.events, cpu_seconds()
                    waited0 = events0 - tracer.ctx.events_run_on
                    qemu0 = process_cpu_seconds(guest.pid)
                    host0 = tracer.measure_host_cost()
                    gc_pauses.state = state
                    if wait_times is not None:
                        wait_times.state = state
                    wall[state].append(timed(guest, work))
                    gc_pauses.state = None
                    if wait_times is not None:
                        wait_times.state = None
                    qemu_cpu[state] += process_cpu_seconds(guest.pid) - qemu0
                    host1 = tracer.measure_host_cost()
                    if host0 is not None and host1 is not None:
                        in_events_us[state] += host1["event_us"] - host0["event_us"]
                        waiting_us[state] += host1["wait_us"] - host0["wait_us"]
                    collector_cpu[state] += cpu_seconds() - cpu0
                    events[state] += tracer.ctx.events - events0
                    waited[state] += tracer.ctx.events - tracer.ctx.events_run_on - waited0
            collector.stop()
            summary = collector.close()
        finally:
            guest.stop()
    base = statistics.median(wall["untraced"])
    result: dict[str, Any] = {
        "kernel": args.kernel, "vcpus": args.vcpus, "rounds": args.rounds,
        "spin_us": args.spin_us, "repeat": args.repeat,
        "wall_s": {state: [round(t, 3) for t in times] for state, times in wall.items()},
        "qemu_cpu_s": {state: round(t, 3) for state, t in qemu_cpu.items()},
        "records": sink.count,
        "losses": summary["vms"][0]["losses"] if summary["vms"] else {},
        "loadavg": os.getloadavg(),
    }
    for state in states[1:]:
        cpu = collector_cpu[state]
        pair_median, pair_q1, pair_q3 = paired(wall["untraced"], wall[state])
        result[state] = {
            "ratio": round(statistics.median(wall[state]) / base, 3),
            "best_ratio": round(min(wall[state]) / min(wall["untraced"]), 3),
            "paired_ratio": [round(pair_median, 3), round(pair_q1, 3), round(pair_q3, 3)],
            # (QEMU + collector) traced over QEMU untraced: steadier than wall time on a
            # loaded machine
            "cpu_ratio": round((qemu_cpu[state] + cpu) / qemu_cpu["untraced"], 3)
            if qemu_cpu["untraced"] else None,
            "events": events[state],
            "waited": waited[state],
            "cpu_us_per_event": round(cpu / events[state] * 1e6, 1) if events[state] else None,
            # by the host's count: the vCPU's time in events (waits included) per run, and
            # as a share of the untraced run: the tracer's own part of the overhead, which
            # the machine's noise does not blur
            "vcpu_in_events_ms": round(in_events_us[state] / 1e3 / args.repeat, 1),
            "vcpu_waiting_ms": round(waiting_us[state] / 1e3 / args.repeat, 1),
            "in_events_ratio": round(in_events_us[state] / 1e6 / args.repeat / base, 3),
            "gc_pauses": gc_pauses.summary(state),
        }
        if wait_times is not None:
            result[state]["waits"] = wait_times.summary(state)
    print(json.dumps(result, indent=1))
    if "blocking" not in result:
        print("host without VMITRACE_SET_BREAKPOINT_EX: every entry waits", file=sys.stderr)
    for state in states[1:]:
        r = result[state]
        median, q1, q3 = r["paired_ratio"]
        print(f"{state}/untraced = {r['ratio']}x wall (median), {r['best_ratio']}x (fastest "
              f"runs), back-to-back runs {median}x ({q1}-{q3}x quartiles), {r['cpu_ratio']}x "
              f"CPU; collector CPU {r['cpu_us_per_event']} us/event; "
              f"{r['waited']} of {r['events']} events waited; the vCPU spent "
              f"{r['vcpu_in_events_ms']} ms per run in events ({r['vcpu_waiting_ms']} ms "
              f"waiting): {r['in_events_ratio']}x the untraced time; GC paused the collector "
              f"{r['gc_pauses']['count']} times, {r['gc_pauses']['total_ms']} ms in all "
              f"(longest {r['gc_pauses']['max_ms']} ms)",
              file=sys.stderr)
        for wait in r.get("waits", []):
            print(f"  waits at {wait['kind']}: {wait['count']}, {wait['total_ms']} ms in all "
                  f"(median {wait['median_us']} us, longest {wait['max_us']} us)",
                  file=sys.stderr)
    print("goal (issue 5): <= 1.5x with blocking delivery", file=sys.stderr)


if __name__ == "__main__":
    main()
