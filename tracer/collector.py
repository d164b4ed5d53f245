"""The collector: owns the KVMI sessions (one per VM), enables events, dispatches them to the
monitors and hands their records to the sinks.

Threads: one event loop per VM session (the only thread touching that VM's monitors, so
record order and `seq` are deterministic for a given event stream) and one sink thread that
drains a bounded queue into every sink. Monitors never block on sinks: a full queue drops the
record and counts it (`dropped_records`), and every loss counter is emitted periodically as a
record of its own (kind "loss") and once more when tracing stops.

Counters (column `counter` of loss records; per VM, emitted as deltas per interval):

  losses      unpaired_entry      an entry whose task entered again before returning
              unpaired_exit       a return with no recorded entry from a task already seen
              unreadable_entry / unreadable_exit / unreadable_event
                                  pt_regs or the current task could not be read: not traced
              unreadable_argument an argument left flagged (error set) in its record
              unreadable_signal_frame
                                  a call returning into a signal handler whose frame
                                  could not be read: its ret is the handler's ax (0,
                                  or the signal number for an ia32 frame)
              truncated_argument  a string, path, argv or sockaddr cut by its bound
              unreadable_task / unreadable_task_field
                                  process attributes missing from records (or a task list
                                  link unreadable: the attach snapshot ended there)
              snapshot_truncated  the attach snapshot's task list walk met a cycle, a link
                                  to something not a task, or its step limit: processes
                                  may be missing from it
              dropped_records     the sink queue was full (sinks too slow)
              dropped_events      events the KVMI session dropped (non-blocking delivery)
              monitor_error       a monitor failed on an event (logged with its traceback)
              breakpoint_install_failed
  not losses  inflight_at_attach  returns of syscalls entered before tracing began
              inflight_at_stop    syscalls still in progress when tracing stopped
              read_after_run_on   reads of a call's memory that its host's captures did
                                  not hold, made after its vCPU ran on (the value may be
                                  newer than the call's); none are expected
              restarted           syscalls the kernel restarts (recorded, then seen again)
              guest_int3          the guest's own int3 (re-injected to the guest)

Host requirements: the vmitrace instrumentation-breakpoint extension (our QEMU plugin). On
hosts without it (stock kvmi-v7 kernels) int3 patching through WRITE_PHYSICAL would be needed;
it is not implemented and `VmTracer.start` refuses such hosts with a clear SetupError.
"""
from __future__ import annotations

import collections
import contextlib
import gc
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from sinks.schema import KIND_HV_EVENT, RecordFactory
from profiles.syscalls import i386_abi
from tracer.decode import Limits, SyscallDecoder, ia32_syscall_table, syscall_table
from tracer.kvmi import abi
from tracer.kvmi import errors as kerr
from tracer.kvmi.events import (EVENT_CLASSES, BreakpointEvent, CrEvent, HypercallEvent, MsrEvent,
                                UnhookEvent)
from tracer.kvmi.transport import DEFAULT_REPLY_SPIN_US, VCPU_STATS_COUNTERS, vcpu_stats_delta
from tracer.memory import GuestMemory, PhysicalSource, RamFile, SessionSource, UnreadableMemory
from tracer.monitors.base import MSR_LSTAR, BreakpointRule, FastRegs, Filters, VmContext
from tracer.monitors.hypercall import HypercallMonitor
from tracer.monitors.integrity import IntegrityMonitor
from tracer.monitors.kernel import (KernelLayout, LayoutError, TaskReader, direct_map_base,
                                    kernel_cr3_candidates)
from tracer.monitors.process import ProcessMonitor
from tracer.monitors.syscalls import SetupError, SyscallMonitor

log = logging.getLogger(__name__)



@dataclass
class TraceOptions:
    filters: Filters = field(default_factory=Filters)
    limits: Limits = field(default_factory=Limits)
    queue_size: int = 65536
    batch_size: int = 4096
    loss_interval_s: float = 10.0
    syscalls: bool = True
    processes: bool = True
    integrity: bool = True
    hypercalls: bool = True
    hv_events: bool = False       # also emit raw CR/MSR events as records
    spin_us: int = 0              # Session busy-poll before sleeping for an event (0: off)
    reply_spin_us: int = DEFAULT_REPLY_SPIN_US  # Session busy-poll after a reply (0: off)
    # syscall entries, and exits that read no guest memory, run on without a reply where
    # the host can (False: every entry and exit waits)
    run_on_syscalls: bool = True
    observer_host: str | None = field(default_factory=socket.gethostname)


class MemorySink:
    """A sink keeping records in a list: for the Python API (notebooks, tests)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, records: list[dict[str, Any]]) -> None:
        self.records.extend(records)

    def flush(self) -> None:
        pass

    def close(self) -> dict[str, Any]:
        return {"written": len(self.records), "dropped": 0}


class RecordPump:
    """Bounded queue from the monitors to the sinks, drained by one thread.

    The hot side (`offer`) is a lock-free deque append: no lock hand-off or thread wake-up
    per record while a vCPU waits for its event reply. The sink thread wakes when a batch is
    due, on `sync`/`close`, or every `flush_interval_s`, and hands the sinks whatever is
    queued (possibly nothing) each time.
    """

    def __init__(self, sinks: Iterable[Any], queue_size: int = 65536, batch_size: int = 4096,
                 flush_interval_s: float = 0.25) -> None:
        self.sinks = list(sinks)
        self.queue_size = queue_size
        # records, or an Event (sync marker); appended by monitors, popped by the sink thread
        self._items: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.written = 0
        self.sink_errors = 0
        self._thread = threading.Thread(target=self._run, name="vmitrace-sinks", daemon=True)
        self._thread.start()

    def offer(self, record: dict[str, Any]) -> bool:
        """Queue a record without blocking; False when the queue is full (caller counts it)."""
        items = self._items
        if len(items) >= self.queue_size:
            return False
        items.append(record)
        if len(items) == self.batch_size:
            self._wake.set()
        return True

    def sync(self, timeout: float = 30.0) -> bool:
        """Wait until every record offered so far has been handed to the sinks."""
        marker = threading.Event()
        self._items.append(marker)
        self._wake.set()
        return marker.wait(timeout)

    def _run(self) -> None:
        items = self._items
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            stopping = self._stopping
            batch: list[dict[str, Any]] = []
            while items:
                item = items.popleft()
                if isinstance(item, threading.Event):
                    if batch:
                        self._write(batch)
                        batch = []
                    item.set()
                    continue
                batch.append(item)
                if len(batch) >= self.batch_size:
                    self._write(batch)
                    batch = []
            # Also on idle wake-ups: write([]) lets sinks do their time-based housekeeping
            # (Parquet's time flush, Kafka's journal replay) while a VM is quiet.
            self._write(batch)
            if stopping:
                return

    def _write(self, batch: list[dict[str, Any]]) -> None:
        for sink in self.sinks:
            try:
                sink.write(batch)
            except Exception:  # noqa: BLE001 - one failing sink must not stop the others
                self.sink_errors += 1
                log.exception("sink %r failed to write %d records", sink, len(batch))
        self.written += len(batch)

    def close(self) -> list[Any]:
        """Drain, flush and close every sink; returns their stats."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        stats = []
        for sink in self.sinks:
            try:
                sink.flush()
                stats.append(sink.close())
            except Exception as exc:  # noqa: BLE001
                self.sink_errors += 1
                log.exception("sink %r failed to close", sink)
                stats.append({"error": str(exc)})
        return stats


ProfileSource = Callable[[Any], Any]  # session -> LinuxProfile

_frozen_lock = threading.Lock()
_frozen_users = 0


@contextlib.contextmanager
def heap_frozen() -> Iterator[None]:
    """While any VM is traced, the heap as it was when its tracing began is out of the cyclic
    GC's view (gc.freeze). It is mostly the profiles' symbol tables, which live as long as the
    collector: a full collection walking them (60-113 ms for a Debian kernel's) would stall
    every vCPU waiting for a reply meanwhile. When the last VM's tracing ends, the heap is
    back in view, so that cycles frozen with it are still collected."""
    global _frozen_users
    with _frozen_lock:
        _frozen_users += 1
        gc.freeze()
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_users -= 1
            if not _frozen_users:
                gc.unfreeze()


class VmTracer:
    """Traces one VM: its session, memory, kernel layout and monitors."""

    def __init__(self, session: Any, profile: Any, pump: RecordPump, options: TraceOptions,
                 memory_source: PhysicalSource | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.session = session
        self.profile = profile
        self.pump = pump
        self.options = options
        if options.spin_us:
            session.spin_us = options.spin_us
        session.reply_spin_us = options.reply_spin_us
        vm_id = str(getattr(session, "uuid", "vm"))
        factory = RecordFactory(vm_id=vm_id, vm_name=getattr(session, "name", None) or None,
                                observer_host=options.observer_host,
                                session_start_ns=int(getattr(session, "start_time", 0) or 0))
        self.mem = GuestMemory(memory_source or SessionSource(session))
        self.ctx = VmContext(session, self.mem, factory, self._emit, options.filters, clock)
        self.layout = KernelLayout.from_profile(profile)
        self.decoder = SyscallDecoder(syscall_table(profile.syscalls), options.limits)
        ia32 = SyscallDecoder(ia32_syscall_table(i386_abi(), self.decoder.syscalls),
                              options.limits, compat32=True)
        self.syscalls = SyscallMonitor(self.ctx, self.decoder, ia32)
        self.processes = ProcessMonitor(self.ctx)
        self.integrity = IntegrityMonitor(self.ctx)
        self.hypercalls = HypercallMonitor(self.ctx)
        self.active = False
        self.vcpus = 1
        self.notes: list[str] = []   # what this host or kernel could not do
        self.closed = False
        self.event_clock: Any = None
        self._installer: threading.Thread | None = None
        self._last_loss_ns = clock()
        self.enabled_events: list[int] = []  # per-vCPU events start() switched on
        self._host_stats_at_start: list[Any] | None = None
        self.host_cost: dict[str, int] | None = None  # set by close() where the host tells

    # -- records ----------------------------------------------------------------------------
    def _emit(self, record: dict[str, Any]) -> None:
        if not self.pump.offer(record):
            self.ctx.loss.add("dropped_records")

    # -- setup ------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.session
        self.vcpus = s.get_guest_info().vcpu_count
        if not s.check_command(abi.VMITRACE_SET_BREAKPOINT):
            raise SetupError(
                "this KVMI host has no instrumentation breakpoints (vmitrace vendor extension); "
                "int3 patching through WRITE_PHYSICAL is not implemented, so system calls "
                "cannot be traced on it")
        if s.check_command(abi.VMITRACE_GET_VCPU_STATS):
            self._host_stats_at_start = self._host_stats()
        self.ctx.breakpoint_rules_supported = s.check_command(abi.VMITRACE_SET_BREAKPOINT_EX)
        self.ctx.capture_tables_supported = self.ctx.breakpoint_rules_supported and \
            s.check_command(abi.VMITRACE_SET_CAPTURE_TABLE)
        self.ctx.run_on_allowed = self.options.run_on_syscalls
        wanted = [abi.KVMI_EVENT_BREAKPOINT, abi.KVMI_EVENT_MSR, abi.KVMI_EVENT_CR]
        if self.options.hypercalls:
            wanted.append(abi.KVMI_EVENT_HYPERCALL)
        for event_id in wanted:
            if not s.check_event(event_id):
                self.notes.append(f"host does not offer {EVENT_CLASSES[event_id].name}")
                continue
            for vcpu in range(self.vcpus):
                s.control_events(vcpu, event_id, True)
            self.enabled_events.append(event_id)
        for vcpu in range(self.vcpus):
            s.control_msr(vcpu, MSR_LSTAR, True)
        if self.options.integrity:
            self.integrity.install(self.vcpus)
            self.notes.extend(self.integrity.unsupported)
        try:
            regs = s.get_registers(0, msrs=[MSR_LSTAR])
        except kerr.KvmEINVAL:
            # This host cannot read LSTAR now (our plugin knows it only once the guest wrote
            # it): the guest is booting; the MSR event will tell.
            regs = s.get_registers(0)
        booting = not regs.msrs.get(MSR_LSTAR)
        if self.options.integrity:
            self.integrity.seed_cr(0, 0, regs.sregs.cr0)
            self.integrity.seed_cr(0, 4, regs.sregs.cr4)
            for vcpu in range(1, 1 if booting else self.vcpus):
                try:
                    other = s.get_registers(vcpu, timeout=2.0)
                except (kerr.CommandError, kerr.CommandTimeout):
                    continue  # its CR writes will arm it
                self.integrity.seed_cr(vcpu, 0, other.sregs.cr0)
                self.integrity.seed_cr(vcpu, 4, other.sregs.cr4)
        lstar = regs.msrs.get(MSR_LSTAR, 0)
        if lstar:
            self._activate(lstar, regs.sregs.cr3)
        else:
            log.info("LSTAR not set yet (guest booting): waiting for the kernel to write it")

    def _activate(self, lstar: int, cr3: int) -> None:
        """Learn KASLR from LSTAR, confirm with linux_banner, install the breakpoints."""
        layout = self.layout
        profile_slide = None
        kaslr = getattr(self.profile, "kaslr_slide", None)
        if kaslr is not None:
            try:
                profile_slide = kaslr(lstar)
            except Exception as exc:  # noqa: BLE001 - the layout check below reports it
                raise LayoutError(f"profile rejects LSTAR {lstar:#x}: {exc}") from exc
        layout.learn_slide(self.mem, lstar, kernel_cr3_candidates(cr3)[::-1], profile_slide)
        kernel_cr3 = layout.kernel_cr3 or kernel_cr3_candidates(cr3)[-1]
        self.ctx.layout = layout
        self.ctx.tasks = TaskReader(layout, self.mem, self.ctx.vm_id)
        ram_size = self._ram_size()
        if ram_size:
            base = direct_map_base(layout, self.mem, kernel_cr3)
            if base >> 47 == 0x1FFFF:
                self.mem.set_direct_map(base, ram_size)
        self.integrity.set_baseline(MSR_LSTAR, lstar)
        do_exit_waits = False
        if self.options.processes:
            missing = self.processes.install()
            self.processes.forget_hooks.append(self._forget_task)
            if missing:
                self.notes.append(f"kernel lacks {missing}: no process start/exit records")
            do_exit_waits = "do_exit" not in missing
            # Processes already running get no start record: list them once, now.
            if self.processes.snapshot(kernel_cr3) is None:
                self.notes.append("profile lacks init_task or task_struct.tasks: "
                                  "no process snapshot at attach")
        if self.options.syscalls:
            self.syscalls.install(kernel_cr3, do_exit_waits)
        self.active = True
        log.info("tracing VM %s: KASLR slide %#x", self.ctx.vm_id, layout.slide)

    def _ram_size(self) -> int | None:
        """Bytes of guest RAM (bounds the direct map whose translations may be cached)."""
        size = getattr(self.mem.source, "size", None)
        if size:
            return int(size) + (1 << 32)  # RAM above the PCI hole sits at 4 GiB and up
        try:
            return (self.session.get_max_gfn() + 1) << 12
        except (kerr.KvmiError, AttributeError):
            return None  # unknown: direct-map reads are walked every time (correct, slower)

    def _install_queued(self) -> None:
        """Send queued breakpoints from a helper thread (see VmContext.add_breakpoint)."""
        queue_ = self.ctx.install_queue
        if not queue_ or (self._installer is not None and self._installer.is_alive()):
            return
        addresses = list(queue_)
        queue_.clear()

        def install() -> None:
            for gva in addresses:
                try:
                    self.install_breakpoint(gva)
                except kerr.KvmiError as exc:
                    self.ctx.loss.add("breakpoint_install_failed")
                    self.notes.append(f"breakpoint at {gva:#x} not set: {exc}")
                    log.error("VM %s: breakpoint at %#x not set: %s", self.ctx.vm_id, gva, exc)
        self._installer = threading.Thread(target=install, daemon=True,
                                           name=f"vmitrace-bp-{self.ctx.vm_id[:8]}")
        self._installer.start()

    def install_breakpoint(self, gva: int, rule: BreakpointRule | None = None) -> None:
        """Ask the host for the breakpoint at `gva` with `rule`, by default the one it was
        added with (VmContext.add_breakpoint)."""
        rule = rule or self.ctx.breakpoint_rules.get(gva)
        if rule is None:
            self.session.set_breakpoint(gva)
            return
        try:
            self._set_rule(gva, rule)
        except kerr.KvmEINVAL:
            if not rule.uses_later_flags():
                raise
            # an older vmitrace plugin: those hits wait instead (successful exec exits)
            self.notes.append(f"host refuses VMITRACE_BLOCK_DIFFER_REVERSED, "
                              f"VMITRACE_TABLE_INDIRECT or VMITRACE_TABLE_WAIT_IF_CUT: more "
                              f"hits wait at {gva:#x}")
            self.ctx.breakpoint_rules[gva] = rule = rule.for_older_host()
            self._set_rule(gva, rule)

    def _set_rule(self, gva: int, rule: BreakpointRule) -> None:
        if rule.table:
            # Hits wait until the table is in place: those that run on rely on its
            # captures. Setting the rule afterwards keeps the table.
            self.session.set_breakpoint_ex(gva, False, captures=rule.captures)
            self.session.set_capture_table(gva, rule.table_key_word, rule.table)
        self.session.set_breakpoint_ex(gva, rule.run_on, rule.block_reg, rule.block_values,
                                       rule.captures, rule.block_flags, rule.differ_words)

    def _forget_task(self, task: int) -> None:
        self.syscalls.pending.pop(task, None)
        self.syscalls.seen_tasks.discard(task)

    # -- events -----------------------------------------------------------------------------
    def handle(self, event: Any) -> None:
        """Dispatch one event to the monitors (the caller replies)."""
        ctx = self.ctx
        ctx.events += 1
        if not event.blocking:
            ctx.events_run_on += 1
        if isinstance(event, BreakpointEvent):
            regs = FastRegs(event.raw)
            handler = ctx.breakpoints.get(regs.rip)
            if handler is None:
                # Not ours: the guest's own int3 (text patching, debuggers). CONTINUE
                # re-injects it, so the guest handles it as if nobody watched.
                ctx.loss.add("guest_int3")
                log.debug("guest int3 at %#x (gpa %#x)", regs.rip, event.gpa)
                return
            handler(event, regs)
        elif isinstance(event, MsrEvent):
            if event.msr == MSR_LSTAR and not self.active and event.new_value:
                self._activate(event.new_value, FastRegs(event.raw).cr3)
            if self.options.integrity:
                self.integrity.on_msr(event)
            if self.options.hv_events:
                ctx.record(KIND_HV_EVENT, "msr", vcpu=event.vcpu, reg_nr=event.msr,
                           old_value=event.old_value, new_value=event.new_value)
        elif isinstance(event, CrEvent):
            if self.options.integrity:
                self.integrity.on_cr(event)
            if self.options.hv_events:
                ctx.record(KIND_HV_EVENT, "cr", vcpu=event.vcpu, reg_nr=event.cr,
                           reg_name=f"CR{event.cr}", old_value=event.old_value,
                           new_value=event.new_value)
        elif isinstance(event, HypercallEvent):
            if self.options.hypercalls:
                self.hypercalls.on_hypercall(event)
        elif isinstance(event, UnhookEvent):
            log.info("host unhooks VM %s: removing breakpoints", ctx.vm_id)
            self._remove_instrumentation()

    def run(self, stop: threading.Event, deadline: float | None = None) -> None:
        """Event loop until `stop` is set, the deadline passes or the host goes away."""
        s = self.session
        try:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                self._install_queued()
                event = s.next_event(timeout=0.2)
                if event is not None:
                    self._process(event)
        except kerr.ConnectionClosed as exc:
            log.info("VM %s: connection closed (%s)", self.ctx.vm_id, exc)

    def _process(self, event: Any) -> None:
        """Handle one event, reply, then run the work its handlers deferred."""
        s = self.session
        if self.event_clock is not None:
            self.event_clock.at_event(event)
        try:
            self.handle(event)
        except (LayoutError, SetupError):
            s.reply(event)
            raise
        except UnreadableMemory as exc:
            self.ctx.loss.add("unreadable_event")
            log.debug("event %r: %s", event, exc)
        except kerr.ConnectionClosed:
            raise
        except Exception:  # noqa: BLE001 - a monitor bug must not stall the guest
            self.ctx.loss.add("monitor_error")
            log.exception("monitor failed on %r", event)
        if event.blocking:  # a vCPU that ran on takes no reply
            s.reply(event)
        self._run_deferred()
        # Periodic loss records, paced by event times (not by idle wake-ups) so that a
        # replay emits them where the live run did.
        now = self.ctx.clock()
        if now - self._last_loss_ns >= self.options.loss_interval_s * 1e9:
            self._last_loss_ns = now
            self.ctx.emit_losses()

    def _run_deferred(self) -> None:
        """The monitors' after-reply work, overlapping the guest's run to its next event."""
        deferred = self.ctx.deferred
        while deferred:
            work = deferred.pop(0)
            try:
                work()
            except UnreadableMemory as exc:
                self.ctx.loss.add("unreadable_event")
                log.debug("deferred work: %s", exc)
            except kerr.ConnectionClosed as exc:  # memory read through a session now gone
                self.ctx.loss.add("deferred_after_disconnect")
                log.debug("deferred work: %s", exc)
            except Exception:  # noqa: BLE001 - a monitor bug must not stop tracing
                self.ctx.loss.add("monitor_error")
                log.exception("monitor failed in deferred work")

    def _remove_instrumentation(self) -> None:
        if self._installer is not None:
            self._installer.join(timeout=30)
        for gva in list(self.ctx.breakpoints):
            try:
                self.session.clear_breakpoint(gva)
            except kerr.KvmiError:
                pass
            del self.ctx.breakpoints[gva]

    def close(self) -> dict[str, Any]:
        """Switch events off, handle those already received, remove breakpoints, answer what
        is still outstanding, emit the final losses.

        Every event received is handled, those queued at the stop too (vCPUs that run on
        past their events leave several): a recording of the session then replays to the
        same records."""
        if self.closed:
            return self.summary()
        self.closed = True
        s = self.session
        self._run_deferred()  # what the last event left, while its memory is readable
        if not getattr(s, "closed", False):
            try:
                for event_id in self.enabled_events:
                    for vcpu in range(self.vcpus):
                        s.control_events(vcpu, event_id, False)
                # The host sent every event before its last reply: they are all queued.
                for _ in range(s.pending_events()):
                    event = s.next_event(timeout=0)
                    if event is None:
                        break
                    self._process(event)
                self._remove_instrumentation()
            except (kerr.KvmiError, LayoutError, SetupError) as exc:
                log.info("VM %s: cleanup: %s", self.ctx.vm_id, exc)
            for event in s.unanswered():  # release vCPUs still waiting on us
                try:
                    s.reply(event)
                except kerr.KvmiError:
                    pass
            self.host_cost = self.measure_host_cost()
            s.close()  # the host drops introspection and the guest runs on untouched
        inflight = sum(1 for p in self.syscalls.pending.values() if p.call is not None)
        if inflight:
            self.ctx.loss.add("inflight_at_stop", inflight)
        dropped = getattr(s, "dropped_events", 0)
        if dropped:
            self.ctx.loss.add("dropped_events", dropped)
        close_source = getattr(self.mem.source, "close", None)
        if close_source is not None:
            close_source()  # the tracer owns the memory source it was given
        if self.ctx.tasks is not None and self.ctx.tasks.unreadable:
            self.ctx.loss.add("unreadable_task_field", self.ctx.tasks.unreadable)
        self.ctx.emit_losses(final=True)
        return self.summary()

    def _host_stats(self) -> list[Any] | None:
        """Each vCPU's VMITRACE_GET_VCPU_STATS; None if the host does not answer them."""
        try:
            return [self.session.get_vcpu_stats(vcpu) for vcpu in range(self.vcpus)]
        except kerr.KvmiError as exc:  # e.g. a replay whose recording predates them
            log.info("VM %s: no vCPU statistics: %s", self.ctx.vm_id, exc)
            return None

    def measure_host_cost(self) -> dict[str, int] | None:
        """What this trace has cost the guest's vCPUs so far, by the host's count: events
        delivered, waits (and those without a reply), microseconds in events and in waits,
        summed over the vCPUs, and the longest wait since the VM started. None where the host
        does not tell, or has gone."""
        before = self._host_stats_at_start
        after = self._host_stats() if before is not None else None
        if before is None or after is None:
            return None
        deltas = [vcpu_stats_delta(b, a) for b, a in zip(before, after)]
        cost = {f: sum(d[f] for d in deltas) for f in VCPU_STATS_COUNTERS}
        cost["max_wait_us"] = max((a.max_wait_us for a in after), default=0)
        return cost

    def summary(self) -> dict[str, Any]:
        return {"vm_id": self.ctx.vm_id, "vm_name": getattr(self.session, "name", None),
                "events": self.ctx.events, "events_run_on": self.ctx.events_run_on,
                "syscalls": self.syscalls.calls,
                "losses": dict(self.ctx.loss.counts), "notes": list(self.notes),
                "kaslr_slide": self.layout.slide, "host_cost": self.host_cost}


class Collector:
    """Traces every VM that connects (or one given session) into the given sinks."""

    def __init__(self, profile_for: ProfileSource, sinks: Iterable[Any],
                 options: TraceOptions | None = None) -> None:
        self.profile_for = profile_for
        self.options = options or TraceOptions()
        self.pump = RecordPump(sinks, self.options.queue_size, self.options.batch_size)
        self.stop_event = threading.Event()
        self.tracers: list[VmTracer] = []
        self.errors: list[str] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def trace(self, session: Any, memory_source: PhysicalSource | None = None,
              deadline: float | None = None, clock: Callable[[], int] = time.time_ns,
              event_clock: Any = None) -> VmTracer:
        """Set up and run one VM's tracing in the calling thread until stopped.

        `clock` gives record times (ns since the epoch); `event_clock.at_event(event)`, when
        given, is told of each event first (replay: times come from the recording).
        """
        tracer = VmTracer(session, self.profile_for(session), self.pump, self.options,
                          memory_source, clock)
        tracer.event_clock = event_clock
        with self._lock:
            self.tracers.append(tracer)
        with heap_frozen():
            try:
                tracer.start()
                tracer.run(self.stop_event, deadline)
            finally:
                tracer.close()
        return tracer

    def trace_in_thread(self, session: Any, memory_source: PhysicalSource | None = None,
                        deadline: float | None = None) -> threading.Thread:
        def target() -> None:
            try:
                self.trace(session, memory_source, deadline)
            except Exception as exc:  # noqa: BLE001 - reported in the summary
                self.errors.append(f"{getattr(session, 'name', session)}: {exc}")
                log.error("tracing %s failed: %s", getattr(session, "name", session), exc)
        thread = threading.Thread(target=target, name=f"vmitrace-vm-{len(self._threads)}",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def serve(self, listener: Any, deadline: float | None = None,
              memory_for: Callable[[Any], PhysicalSource | None] | None = None) -> None:
        """Accept hosts until stopped; each connection is traced in its own thread."""
        while not self.stop_event.is_set() and (deadline is None or time.monotonic() < deadline):
            try:
                session = listener.accept(timeout=0.5)
            except (TimeoutError, kerr.CommandTimeout):
                continue
            if session is None:
                continue
            self.trace_in_thread(session, memory_for(session) if memory_for else None, deadline)

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> dict[str, Any]:
        """Stop every VM, drain the sinks; returns a summary (per VM, sinks, errors)."""
        self.stop_event.set()
        for thread in self._threads:
            thread.join(timeout=30)
        sink_stats = self.pump.close()
        return {"vms": [t.summary() for t in self.tracers], "sinks": sink_stats,
                "errors": list(self.errors), "records": self.pump.written,
                "sink_errors": self.pump.sink_errors}


def ram_source(path: str) -> RamFile:
    return RamFile(path)
