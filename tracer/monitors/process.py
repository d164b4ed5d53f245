"""The process monitor: lifecycle records for process start, exec and exit.

* start: a breakpoint on `ret_from_fork`, where every new task runs first (current = the new
  task, its CR3 loaded); thread-group leaders that are not kernel threads are new processes.
  Where the host takes breakpoint rules, the hit carries the current task and the new task
  runs on without waiting: what the record reads of it cannot change before the collector
  has handled its events in order, since the calls that change it (exec, exit,
  credentials, name) wait at their entries, and its death waits at `do_exit`.
* exec: emitted by the syscall monitor when execve/execveat returns 0 (the new image's comm,
  exe and argv are read then).
* exit: a breakpoint on `do_exit(code)`, which every exiting task goes through (exit,
  exit_group, fatal signals); the thread-group leader's exit is the process's.
* snapshot: once, when tracing attaches, one record per process already running (the
  kernel's task list from `init_task`, kernel threads left out), so that processes started
  before the attach are known before they exec or exit.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from sinks.schema import KIND_PROCESS
from tracer.decode.consts import signal_name
from tracer.memory import UnreadableMemory
from tracer.kvmi.abi import VMITRACE_CAPTURE_GS_BASE
from tracer.monitors.base import BreakpointRule, FastRegs, VmContext, process_fields


class ProcessMonitor:
    def __init__(self, ctx: VmContext) -> None:
        self.ctx = ctx
        self.forget_hooks: list[Any] = []  # called with a task address when it exits

    def install(self) -> list[str]:
        """Set the lifecycle breakpoints; returns the names of those the kernel lacks."""
        missing = []
        current = ((VMITRACE_CAPTURE_GS_BASE, self.ctx.layout.current_offset, 8),)
        # do_exit waits: the task's memory and task_struct go soon after it. The host's copy
        # of the current task spares a read while it waits.
        for name, handler, rule in (
                ("ret_from_fork", self.on_fork_return, BreakpointRule(current, run_on=True)),
                ("do_exit", self.on_exit, BreakpointRule(current))):
            address = self.ctx.layout.address(name)
            if address is None:
                missing.append(name)
                continue
            self.ctx.add_breakpoint(address, handler, rule)
        return missing

    def snapshot(self, cr3: int) -> int | None:
        """Record every process already running (kernel reads under `cr3`); returns how many
        were recorded, None if the kernel layout lacks the task list."""
        ctx = self.ctx
        tasks, ended = ctx.tasks.task_list(cr3)
        if ended == "unsupported":
            return None
        if ended == "unreadable":
            ctx.loss.add("unreadable_task")
        elif ended != "complete":
            ctx.loss.add("snapshot_truncated")  # cycle, non-task or step limit: tasks missing
        recorded = 0
        for task in tasks:
            try:
                user_cr3 = ctx.tasks.user_cr3(cr3, task)
                info = ctx.tasks.info(cr3, task, user_cr3=user_cr3)
            except UnreadableMemory:
                ctx.loss.add("unreadable_task")
                continue
            if info.kthread or info.tid != info.pid:
                continue
            if not ctx.filters.task_selected(info.pid, info.tid, info.comm):
                continue
            ctx.record(KIND_PROCESS, "snapshot", action="snapshot", **process_fields(info),
                       argv=info.argv, parent_process_uid=info.parent_process_uid,
                       cr3=user_cr3)
            recorded += 1
        return recorded

    def _current_task(self, event: Any, regs: FastRegs) -> int:
        """The task current at the hit: the host's copy, or read while the vCPU waits."""
        captured = event.captured
        if captured is not None and len(captured[0]) == 8:
            return int.from_bytes(captured[0], "little")
        if event.blocking:
            return self.ctx.tasks.current(regs.cr3, regs.gs_base)
        # the host could not read it, and the vCPU ran on
        raise UnreadableMemory(regs.gs_base + self.ctx.layout.current_offset,
                               "current task not captured at the hit")

    def on_fork_return(self, event: Any, regs: FastRegs) -> None:
        ctx = self.ctx
        try:
            task = self._current_task(event, regs)
            ctx.tasks.forget(task)  # a reused task_struct address is a new task
            info = ctx.tasks.info(regs.cr3, task, user_cr3=regs.cr3)
        except UnreadableMemory:
            ctx.loss.add("unreadable_task")
            return
        if info.kthread or info.tid != info.pid:
            return
        if not ctx.filters.task_selected(info.pid, info.tid, info.comm) and \
                not ctx.filters.task_selected(info.ppid or -1, info.ppid or -1, info.comm):
            return
        ctx.record(KIND_PROCESS, "start", vcpu=event.vcpu, action="start",
                   **process_fields(info), argv=info.argv,
                   parent_process_uid=info.parent_process_uid,
                   cr3=regs.cr3 & 0x000F_FFFF_FFFF_F000)

    def on_exit(self, event: Any, regs: FastRegs) -> None:
        ctx = self.ctx
        code = regs.rdi & 0xFFFF_FFFF
        try:
            task = self._current_task(event, regs)
            info = ctx.tasks.info(regs.cr3, task, user_cr3=regs.cr3)
        except UnreadableMemory:
            ctx.loss.add("unreadable_task")
            return
        ctx.tasks.forget(task)
        for hook in self.forget_hooks:
            hook(task)
        if info.kthread or info.tid != info.pid:
            return
        if not ctx.filters.task_selected(info.pid, info.tid, info.comm):
            return
        signal = code & 0x7F
        # built after the reply, which releases the dying task: nothing more is read of it
        ctx.defer(partial(ctx.record, KIND_PROCESS, "exit", ctx.clock(), vcpu=event.vcpu,
                          action="exit", **process_fields(info),
                          parent_process_uid=info.parent_process_uid,
                          exit_code=(code >> 8) & 0xFF if signal == 0 else None,
                          signal=signal_name(signal) if signal else None,
                          extra={"wait_status": hex(code)}))
