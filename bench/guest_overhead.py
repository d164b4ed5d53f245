"""Guest slow-down caused by the QEMU KVMI plugin, as ratios against an untraced run.

One fixed amount of guest work (a fork/exec-heavy shell loop: every round forks, execs
busybox, opens, reads and writes) is timed in each configuration, all in this one run:

  untraced            lab guest without the plugin
  plugin idle         plugin loaded and connected, nothing enabled
  cr+msr              CR0/CR3/CR4 write events and MSR write events (syscall, segment-base,
                      speculation-control and timer MSRs), blocking, answered CONTINUE
  bp syscall blocking instrumentation breakpoint at entry_SYSCALL_64, blocking delivery,
                      every event answered CONTINUE by a tracer.kvmi Session with its
                      defaults (the plugin's vCPU busy-polls up to its default spin_us for
                      the reply; the Session, up to reply_spin_us after a reply, for the
                      next event)
  bp syscall blocking, no busy-poll
                      the same with the Session's reply_spin_us 0: it sleeps for each event
  bp syscall blocking, introspector spins
                      the same, and the Session busy-polls up to --spin-us before every read
                      of the next event (trades introspector CPU for latency)
  bp syscall nonblock same breakpoint, non-blocking delivery (observe-only)

Each configuration reports the wall-time ratio of the medians (what the guest feels), of the
fastest runs ("best": the least disturbed by other load), and the CPU-time
ratio (QEMU plus the introspector process, and QEMU alone; on a loaded machine the scheduler can make a
guest that often sleeps in event waits look faster in wall time than a pure CPU hog); the
time the vCPU spent in events, by the plugin's own count (VMITRACE_GET_VCPU_STATS), over the
untraced run's time ("events": the introspection's direct share, which the machine's noise
does not blur); and
the median and quartiles of the ratios of back-to-back runs (each against the untraced run
of its own round), whose spread shows how far the machine's noise reaches.
The goals are judged on the worse of the two wall-time ratios; CPU is reported beside them.

Usage: .venv/bin/python bench/guest_overhead.py [--kernel 6.1] [--rounds 300] [--repeat 3]
       [--spin-us 300]
Goals (issue 3): blocking syscall breakpoints <= 1.5x untraced, non-blocking <= 1.2x.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import guestlab  # noqa: E402
from tracer.kvmi import abi  # noqa: E402
from tracer.kvmi.errors import ConnectionClosed  # noqa: E402
from tracer.kvmi.transport import DEFAULT_REPLY_SPIN_US, Listener, Session  # noqa: E402
from ratios import paired  # noqa: E402

CRS = (0, 3, 4)
MSRS = (0xC0000081, 0xC0000082, 0xC0000083, 0x174, 0x175, 0x176,  # syscall entry points
        0xC0000100, 0xC0000101, 0xC0000102,  # FS/GS bases
        0x48, 0x49, 0x6E0)  # SPEC_CTRL, PRED_CMD, TSC_DEADLINE


def workload(rounds: int) -> str:
    return (f"i=0; while [ $i -lt {rounds} ]; do cat /proc/version > /tmp/bench.out; "
            f"i=$((i+1)); done")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_once(guest: guestlab.Guest, rounds: int) -> tuple[float, float, float]:
    """Wall seconds of the guest work, and the CPU seconds QEMU and this process (the
    introspector) spent meanwhile: the cost that machine load cannot hide."""
    assert guest.pid is not None
    qemu0, own0 = process_cpu_seconds(guest.pid), sum(os.times()[:2])
    start = time.monotonic()
    status, output = guest.run(workload(rounds), timeout=600)
    elapsed = time.monotonic() - start
    qemu, own = process_cpu_seconds(guest.pid) - qemu0, sum(os.times()[:2]) - own0
    if status != 0:
        raise RuntimeError(f"guest work failed: {status} {output!r}")
    return elapsed, qemu, own


class Responder:
    """Answers every event CONTINUE (blocking ones) and counts them per type."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.counts: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                event = self.session.next_event(0.5)
                if event is None:
                    continue
                self.counts[event.name] = self.counts.get(event.name, 0) + 1
                if event.blocking:
                    self.session.reply(event)
            except ConnectionClosed:  # the benchmark closed the session: done
                return

    def take_counts(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


def entry_syscall_64(guest: guestlab.Guest) -> int:
    status, out = guest.run("grep ' entry_SYSCALL_64$' /proc/kallsyms")
    if status != 0 or not out.strip():
        raise RuntimeError(f"entry_SYSCALL_64 not in kallsyms: {out!r}")
    return int(out.split()[0], 16)


BLOCKING_SPIN = "bp syscall blocking, introspector spins"
BLOCKING_SLEEP = "bp syscall blocking, no busy-poll"
CONFIGS = ("untraced", "plugin idle", "cr+msr", "bp syscall blocking", BLOCKING_SLEEP,
           BLOCKING_SPIN, "bp syscall nonblock")


def configure(session: Session, name: str, syscall_entry: int, spin_us: int) -> None:
    """Switch the plugin guest to configuration ``name`` (from any other)."""
    cr_msr = name == "cr+msr"
    bp = name.startswith("bp ")
    session.spin_us = spin_us if name == BLOCKING_SPIN else 0
    session.reply_spin_us = 0 if name == BLOCKING_SLEEP else DEFAULT_REPLY_SPIN_US
    session.set_delivery(name != "bp syscall nonblock")
    session.control_events(0, abi.KVMI_EVENT_CR, cr_msr)
    session.control_events(0, abi.KVMI_EVENT_MSR, cr_msr)
    session.control_events(0, abi.KVMI_EVENT_BREAKPOINT, bp)
    if bp:
        session.set_breakpoint(syscall_entry)
    else:
        session.clear_breakpoint(syscall_entry)


def run(kernel: str, rounds: int, repeat: int, spin_us: int) -> dict[str, Any]:
    """Both guests run side by side; configurations are interleaved round by round so
    that load from elsewhere on the machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpu: dict[str, list[float]] = {name: [] for name in CONFIGS}
    qemu_cpu: dict[str, list[float]] = {name: [] for name in CONFIGS}
    events: dict[str, dict[str, int]] = {name: {} for name in CONFIGS}
    in_events: dict[str, list[float]] = {name: [] for name in CONFIGS}  # host's count, s
    workdir = tempfile.mkdtemp(prefix="vmitrace-bench-")
    path = os.path.join(workdir, "kvmi.sock")
    print(f"guest work: {rounds} rounds of fork/exec/open/read/write; {repeat} interleaved "
          "runs per configuration", flush=True)
    with Listener("unix:" + path) as listener, \
            guestlab.Guest(kernel, vcpus=1) as plain, \
            guestlab.Guest(kernel, vcpus=1, plugin_options={"socket": path}) as traced:
        session = listener.accept(timeout=60)
        if session is None:
            raise RuntimeError("the plugin did not connect")
        responder = Responder(session)
        for cr in CRS:
            session.control_cr(0, cr, True)
        for msr in MSRS:
            session.control_msr(0, msr, True)
        syscall_entry = entry_syscall_64(traced)
        for guest in (plain, traced):  # warm the translation caches
            time_once(guest, max(1, rounds // 10))
        for _ in range(repeat):
            for name in CONFIGS:
                if name == "untraced":
                    wall, qemu, own = time_once(plain, rounds)
                    times[name].append(wall)
                    cpu[name].append(qemu + own)
                    qemu_cpu[name].append(qemu)
                    in_events[name].append(0.0)
                    continue
                configure(session, name, syscall_entry, spin_us)
                # A changed breakpoint set flushes QEMU's translations: re-warm first, so
                # each configuration is timed in its steady state.
                time_once(traced, max(1, rounds // 5))
                time.sleep(0.2)
                responder.take_counts()
                before = session.get_vcpu_stats(0)
                wall, qemu, own = time_once(traced, rounds)
                in_events[name].append((session.get_vcpu_stats(0).event_us - before.event_us)
                                       / 1e6)
                times[name].append(wall)
                cpu[name].append(qemu + own)
                qemu_cpu[name].append(qemu)
                time.sleep(0.2)  # let the last non-blocking events arrive
                for k, v in responder.take_counts().items():
                    events[name][k] = events[name].get(k, 0) + v
        session.close()
    base = statistics.median(times["untraced"])
    cpu_base = statistics.median(cpu["untraced"])
    best_base = min(times["untraced"])
    configs = {name: {"seconds": times[name], "median": statistics.median(times[name]),
                      "ratio": statistics.median(times[name]) / base,
                      "best_ratio": min(times[name]) / best_base,
                      "paired_ratio": paired(times["untraced"], times[name]),
                      "cpu_seconds": cpu[name],
                      "cpu_ratio": statistics.median(cpu[name]) / cpu_base,
                      "qemu_cpu_ratio": statistics.median(qemu_cpu[name]) / cpu_base,
                      "in_events_ratio": statistics.median(in_events[name]) / base,
                      "events": events[name]}
               for name in CONFIGS}
    return {"kernel": kernel, "rounds": rounds, "repeat": repeat, "spin_us": spin_us,
            "load_average": os.getloadavg(), "configs": configs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", default="6.1", choices=sorted(guestlab.KERNELS))
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--spin-us", type=int, default=300,
                        help="introspector busy-poll time in the spinning configuration")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    results = run(args.kernel, args.rounds, args.repeat, args.spin_us)
    print(f"\nratio to untraced (median of runs; load average "
          f"{results['load_average'][0]:.1f} on {os.cpu_count()} CPUs):")
    print(f"  {'':40s} {'wall':>6s} {'best':>6s} {'cpu':>6s} {'qemu':>6s} {'events':>6s}"
          "  events/s  back-to-back (quartiles)")
    for name, cfg in results["configs"].items():
        events = sum(cfg["events"].values())
        rate = events / sum(cfg["seconds"]) if events else 0.0
        median, q1, q3 = cfg["paired_ratio"]
        print(f"  {name:40s} {cfg['ratio']:5.2f}x {cfg['best_ratio']:5.2f}x "
              f"{cfg['cpu_ratio']:5.2f}x {cfg['qemu_cpu_ratio']:5.2f}x "
              f"{cfg['in_events_ratio']:5.2f}x  {rate:8.0f}  "
              f"{median:5.2f}x ({q1:.2f}-{q3:.2f}x)")
    # Time is what the goals speak of; judged on the worse of the median and best-run
    # ratios, so that one lucky run cannot meet a goal.
    goals = {"bp syscall blocking": 1.5, BLOCKING_SPIN: 1.5, "bp syscall nonblock": 1.2}
    for name, goal in goals.items():
        cfg = results["configs"][name]
        worst = max(cfg["ratio"], cfg["best_ratio"])
        print(f"  goal {name} <= {goal}x: wall ratio {worst:.2f}x -> "
              f"{'met' if worst <= goal else 'NOT met'} (CPU {cfg['cpu_ratio']:.2f}x)")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
