"""``vmitrace probe``: what does this KVMI host speak, and what does it send?

The first thing to run when wiring up a host. It waits for one host on ``--listen``
(or boots a lab guest with the vmitrace plugin, ``--lab``), then prints the handshake,
the version, which commands and events the host supports (CHECK_COMMAND / CHECK_EVENT
over every standard id and the vmitrace vendor ids), and how many events of each type
arrive in ``--duration`` seconds with the cheap events enabled on every vCPU. On a host with
VMITRACE_GET_VCPU_STATS it also shows what delivering those events cost each vCPU: how many
waited for their reply and the time spent in events and in waits.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import click

from tracer.kvmi import abi
from tracer.kvmi.errors import CommandError, ConnectionClosed, KvmiError
from tracer.kvmi.transport import Listener, Session, vcpu_stats_delta

STANDARD_IDS = range(2, 64)  # 0 and 1 are EVENT_REPLY/EVENT, not commands
VENDOR_IDS = sorted(i for i in abi.COMMANDS if i >= abi.VMITRACE_SET_BREAKPOINT)
EVENT_IDS = range(0, 16)
# Events enabled during the counting window (per vCPU), and which CRs/MSRs they report.
COUNTED_EVENTS = (abi.KVMI_EVENT_CR, abi.KVMI_EVENT_MSR, abi.KVMI_EVENT_HYPERCALL,
                  abi.KVMI_EVENT_BREAKPOINT)
COUNTED_CRS = (0, 3, 4)
COUNTED_MSRS = (0xC0000081, 0xC0000082, 0xC0000083, 0x174, 0x175, 0x176,
                0xC0000100, 0xC0000101, 0xC0000102)
MAX_VCPUS_PROBED = 256


def command_name(ident: int) -> str:
    return abi.COMMAND_NAMES.get(ident, f"command_{ident:#x}")


def event_name(ident: int) -> str:
    return abi.EVENTS[ident][0] if ident in abi.EVENTS else f"event_{ident}"


def probe_session(session: Session, duration: float, blocking: bool) -> dict[str, Any]:
    """Query ``session`` and count its events for ``duration`` seconds."""
    report: dict[str, Any] = {
        "handshake": {"name": session.name, "uuid": str(session.uuid),
                      "start_time": session.start_time,
                      "struct_size": session.handshake.struct_size},
    }
    version = session.get_version()
    report["version"] = version.version
    report["features"] = {k: v for k, v in version.features._asdict().items()
                          if k != "padding"}
    report["commands"] = {command_name(i): session.check_command(i)
                          for i in list(STANDARD_IDS) + list(VENDOR_IDS)}
    report["events"] = {event_name(i): session.check_event(i) for i in EVENT_IDS}
    vcpus = 0
    if report["commands"][command_name(abi.KVMI_GET_GUEST_INFO)]:
        vcpus = min(session.get_guest_info().vcpu_count, MAX_VCPUS_PROBED)
    report["vcpu_count"] = vcpus

    nonblocking = not blocking and report["commands"][command_name(abi.VMITRACE_SET_DELIVERY)]
    if nonblocking:
        session.set_delivery(False)
    report["delivery"] = "non-blocking" if nonblocking else "blocking"
    stats_before = _vcpu_stats(session, vcpus, report["commands"])
    enabled = _enable(session, vcpus, report["events"], True)
    report["enabled_events"] = sorted(event_name(e) for e in enabled)
    counts: dict[str, int] = {}
    report["disconnected"] = False
    start = time.monotonic()
    deadline = start + duration
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = session.next_event(min(left, 0.5))
                if event is None:
                    continue
                counts[event.name] = counts.get(event.name, 0) + 1
                session.reply(event)
            except ConnectionClosed:  # report what was counted until the host left
                report["disconnected"] = True
                duration = time.monotonic() - start
                break
    finally:
        if not session.closed:
            _enable(session, vcpus, report["events"], False)
            _drain(session)
    report["duration"] = duration
    report["event_counts"] = dict(sorted(counts.items()))
    stats_after = _vcpu_stats(session, vcpus, report["commands"])
    report["vcpu_cost"] = [
        {"vcpu": vcpu, **vcpu_stats_delta(before, after),
         "max_wait_us_since_start": after.max_wait_us}
        for vcpu, (before, after) in enumerate(zip(stats_before or (), stats_after or ()))]
    return report


def _vcpu_stats(session: Session, vcpus: int, commands: dict[str, bool]) -> list[Any] | None:
    """Each vCPU's VMITRACE_GET_VCPU_STATS, or None (not offered, or the host left)."""
    if session.closed or not commands.get(command_name(abi.VMITRACE_GET_VCPU_STATS)):
        return None
    try:
        return [session.get_vcpu_stats(vcpu) for vcpu in range(vcpus)]
    except (CommandError, ConnectionClosed):
        return None


def _enable(session: Session, vcpus: int, supported: dict[str, bool], on: bool) -> set[int]:
    """Enable (or disable) the counted events the host supports; returns those it took."""
    taken: set[int] = set()
    for vcpu in range(vcpus):
        for event in COUNTED_EVENTS:
            if not supported.get(event_name(event)):
                continue
            try:
                session.control_events(vcpu, event, on)
                if event == abi.KVMI_EVENT_CR:
                    for cr in COUNTED_CRS:
                        session.control_cr(vcpu, cr, on)
                if event == abi.KVMI_EVENT_MSR:
                    for msr in COUNTED_MSRS:
                        session.control_msr(vcpu, msr, on)
            except CommandError:
                continue
            taken.add(event)
    return taken


def _drain(session: Session) -> None:
    """Answer events still queued so no vCPU is left waiting."""
    while True:
        try:
            event = session.next_event(0.2)
        except ConnectionClosed:
            return
        if event is None:
            return
        session.reply(event)


def render_text(report: dict[str, Any]) -> str:
    hs = report["handshake"]
    lines = [
        f"host        {hs['name']!r} uuid {hs['uuid']} start_time {hs['start_time']} "
        f"(handshake {hs['struct_size']} bytes)",
        f"version     {report['version']}  features "
        + " ".join(f"{k}={v}" for k, v in report["features"].items()),
        f"vcpus       {report['vcpu_count']}",
        "commands    " + " ".join(n for n, ok in report["commands"].items() if ok),
        "events      " + " ".join(n for n, ok in report["events"].items() if ok),
        f"counted     {report['duration']:g} s, {report['delivery']} delivery, enabled: "
        + (" ".join(report["enabled_events"]) or "none"),
    ]
    if report["disconnected"]:
        lines.append(f"  the host disconnected after {report['duration']:.1f} s")
    if report["event_counts"]:
        for name, count in report["event_counts"].items():
            rate = count / report["duration"] if report["duration"] else 0.0
            lines.append(f"  {name:<26} {count:8d}  ({rate:.0f}/s)")
    else:
        lines.append("  no events")
    for cost in report["vcpu_cost"]:
        share = cost["event_us"] / 1e4 / report["duration"] if report["duration"] else 0.0
        lines.append(f"  vCPU {cost['vcpu']}: {cost['events']} events delivered, "
                     f"{cost['waits']} waited ({cost['timeouts']} without a reply): "
                     f"{cost['event_us'] / 1e3:.1f} ms in events ({share:.2f} % of the time), "
                     f"{cost['wait_us'] / 1e3:.1f} ms of it waiting")
    return "\n".join(lines)


@click.command("probe")
@click.option("--listen", "address", metavar="unix:PATH|vsock:PORT",
              help="Listen here and wait for one KVMI host to connect.")
@click.option("--lab", is_flag=True,
              help="Boot a lab guest with the vmitrace KVMI plugin and probe it.")
@click.option("--kernel", type=click.Choice(["6.1", "6.12"]), default="6.1", show_default=True,
              help="With --lab: the lab kernel series.")
@click.option("--vcpus", default=1, show_default=True, type=click.IntRange(1, 4),
              help="With --lab: number of vCPUs.")
@click.option("--duration", default=5.0, show_default=True, type=click.FloatRange(0, 3600),
              help="Seconds to count events for.")
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds to wait for a host to connect.")
@click.option("--blocking", is_flag=True,
              help="Keep blocking delivery (default: non-blocking when the host offers it).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def probe(address: str | None, lab: bool, kernel: str, vcpus: int, duration: float,
          timeout: float, blocking: bool, as_json: bool) -> None:
    """Handshake, version, supported commands/events and event counts of a KVMI host.

    \b
    Examples:
      vmitrace probe --listen unix:/run/vmitrace/kvmi.sock   # then start QEMU
      vmitrace probe --lab --duration 10                      # boots a lab guest
      vmitrace probe --lab --kernel 6.12 --vcpus 2 --json

    Exit status: 0 done, 1 no host connected in time or the probe failed, 2 bad usage.
    """
    if (address is None) == (not lab):
        raise click.UsageError("give exactly one of --listen ADDRESS or --lab")
    guest = None
    workdir = None
    if lab:
        import guestlab  # only needed here, and it pulls in the lab build machinery

        workdir = tempfile.mkdtemp(prefix="vmitrace-probe-")
        address = "unix:" + os.path.join(workdir, "kvmi.sock")
    try:
        with Listener(address) as listener:
            if lab:
                guest = guestlab.Guest(kernel, vcpus=vcpus, workload="steady",
                                       plugin_options={"socket": listener.path})
                guest.start()
                click.echo(f"[probe] booting lab guest {guest.name} ({kernel}, {vcpus} vCPU)",
                           err=True)
            else:
                click.echo(f"[probe] waiting for a KVMI host on {address}", err=True)
            session = listener.accept(timeout=timeout)
            if session is None:
                raise click.ClickException(f"no host connected within {timeout:g} s")
            with session:
                if guest is not None:
                    guest.wait_ready(guest.boot_timeout)
                report = probe_session(session, duration, blocking)
    except (KvmiError, OSError) as exc:
        raise click.ClickException(f"probe failed: {exc}") from exc
    except RuntimeError as exc:  # guestlab.GuestError / BuildError: the lab guest failed
        raise click.ClickException(f"lab guest failed: {exc}") from exc
    finally:
        if guest is not None:
            guest.stop()
        if workdir is not None:
            _remove_dir(workdir)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_text(report))


def _remove_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as exc:
        print(f"vmitrace probe: could not remove {path}: {exc}", file=sys.stderr)
