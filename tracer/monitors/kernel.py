"""What the monitors know about the guest kernel: precomputed offsets, KASLR, current task,
pt_regs, and a per-task cache of process attributes.

Everything here is computed once from the profile (a volatility3 object costs ~170 us; the hot
path only adds integers) and reads guest memory through `GuestMemory` with every loop bounded.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from tracer.memory import CapturedMemory, GuestMemory, UnreadableMemory


PT_REGS = struct.Struct("<21Q")  # r15 r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx si di orig_ax ip cs flags sp ss
PT_REGS_SIZE = PT_REGS.size  # 168
# indexes into the unpacked pt_regs
R_R10, R_R9, R_R8, R_AX, R_CX, R_DX, R_SI, R_DI, R_ORIG_AX, R_IP, R_SP = 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 19
R_BP, R_BX = 4, 5
PF_KTHREAD = 0x00200000
TASK_COMM_LEN = 16
MAX_PATH_DEPTH = 64
MAX_MOUNT_DEPTH = 16
MAX_CMDLINE = 4096
MAX_TASK_WALK = 65536  # links followed on the task list (pid_max's default is 32768)
KERNEL_PERCPU_LIMIT = 1 << 32  # per-CPU symbols are small section offsets, not addresses


class LayoutError(Exception):
    """The profile lacks something the monitors cannot do without."""


def _call(fn: Any, *args: Any) -> int | None:
    try:
        value = fn(*args)
    except Exception:  # profiles raise their own error types for missing names
        return None
    return None if value is None else int(value)


@dataclass
class KernelLayout:
    """Offsets and link-time symbol addresses, plus the KASLR slide once learned."""

    banner: bytes | None
    symbols: dict[str, int]
    task: dict[str, int]
    cred: dict[str, int]
    mm: dict[str, int]
    path: dict[str, int]
    current_offset: int            # per-CPU offset of the current task pointer
    slide: int | None = None
    kernel_cr3: int | None = None  # a CR3 that maps kernel data (learned from kernel-mode events)
    # offsets of mm->context.vdso ("mm_vdso") and of vdso_image.sym_int80_landing_pad
    vdso: dict[str, int] = field(default_factory=dict)

    REQUIRED_SYMBOLS = ("entry_SYSCALL_64", "do_syscall_64")
    OPTIONAL_SYMBOLS = ("linux_banner", "ret_from_fork", "do_exit", "do_group_exit",
                        "page_offset_base", "init_task",
                        # 32-bit system call entry stubs and their C handlers
                        "asm_int80_emulation", "int80_emulation", "entry_INT80_compat",
                        "do_int80_syscall_32", "entry_SYSENTER_compat", "do_SYSENTER_32",
                        "entry_SYSCALL_compat", "do_fast_syscall_32",
                        "vdso_image_32")  # where the 32-bit vDSO's int80_landing_pad is

    @classmethod
    def from_profile(cls, profile: Any) -> "KernelLayout":
        sym = profile.symbol
        symbols: dict[str, int] = {}
        for name in cls.REQUIRED_SYMBOLS + cls.OPTIONAL_SYMBOLS:
            value = _call(sym, name)
            if value is not None:
                symbols[name] = value
        missing = [n for n in cls.REQUIRED_SYMBOLS if n not in symbols]
        if missing:
            raise LayoutError(f"profile has no symbol(s) {missing}")
        off = profile.offset

        def offsets(struct_name: str, fields: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, int]:
            out = {}
            for f in fields:
                value = _call(off, struct_name, f)
                if value is not None:
                    out[f] = value
                elif f in required:
                    raise LayoutError(f"profile has no {struct_name}.{f}")
            return out

        task = offsets("task_struct", ("pid", "tgid", "real_parent", "comm", "cred",
                                       "start_time", "mm", "flags", "exit_code", "group_leader",
                                       "tasks"),
                       required=("pid", "tgid", "real_parent", "comm"))
        cred = offsets("cred", ("uid", "gid"))
        mm = offsets("mm_struct", ("exe_file", "arg_start", "arg_end", "env_start", "env_end",
                                     "pgd"))
        vdso = {}
        context, base = _call(off, "mm_struct", "context"), _call(off, "mm_context_t", "vdso")
        if context is not None and base is not None:
            vdso["mm_vdso"] = context + base  # mm->context.vdso: the process's vDSO base
        landing = _call(off, "vdso_image", "sym_int80_landing_pad")
        if landing is not None:
            vdso["landing_pad"] = landing
        path = {}
        for key, (s, f) in {"file_f_path": ("file", "f_path"), "path_mnt": ("path", "mnt"),
                            "path_dentry": ("path", "dentry"),
                            "dentry_d_parent": ("dentry", "d_parent"),
                            "dentry_d_name": ("dentry", "d_name"), "qstr_name": ("qstr", "name"),
                            "mount_mnt": ("mount", "mnt"),
                            "mount_mnt_parent": ("mount", "mnt_parent"),
                            "mount_mnt_mountpoint": ("mount", "mnt_mountpoint"),
                            "vfsmount_mnt_root": ("vfsmount", "mnt_root")}.items():
            value = _call(off, s, f)
            if value is not None:
                path[key] = value
        current = _call(sym, "current_task")
        if current is None:  # 6.12+: current_task lives in the per-CPU pcpu_hot structure
            hot = _call(sym, "pcpu_hot")
            field_off = _call(off, "pcpu_hot", "current_task")
            if hot is None or field_off is None:
                raise LayoutError("profile has neither current_task nor pcpu_hot.current_task")
            current = hot + field_off
        if current >= KERNEL_PERCPU_LIMIT:
            raise LayoutError(f"current task symbol {current:#x} is not a per-CPU offset")
        banner = getattr(profile, "banner", None)
        if isinstance(banner, str):
            banner = banner.encode()
        return cls(banner=banner, symbols=symbols, task=task, cred=cred, mm=mm, path=path,
                   current_offset=current, vdso=vdso)

    def address(self, name: str) -> int | None:
        """Runtime address of a kernel symbol (link-time address + KASLR slide)."""
        if self.slide is None or name not in self.symbols:
            return None
        return (self.symbols[name] + self.slide) & 0xFFFF_FFFF_FFFF_FFFF

    def learn_slide(self, mem: GuestMemory, lstar: int, cr3s: list[int],
                    profile_slide: int | None = None) -> int:
        """Slide = LSTAR - entry_SYSCALL_64, confirmed by reading linux_banner in the guest."""
        slide = profile_slide if profile_slide is not None else lstar - self.symbols["entry_SYSCALL_64"]
        if slide % (2 << 20):
            raise LayoutError(f"KASLR slide {slide:#x} from LSTAR {lstar:#x} is not 2 MiB aligned")
        banner_at = self.symbols.get("linux_banner")
        if banner_at is not None and self.banner:
            want = self.banner.rstrip(b"\0")[:200]
            errors = []
            for cr3 in cr3s:
                try:
                    got = mem.read_virtual(cr3, banner_at + slide, len(want))
                except UnreadableMemory as exc:
                    errors.append(str(exc))
                    continue
                if got != want:
                    raise LayoutError(f"linux_banner differs: profile {want[:60]!r}, guest {got[:60]!r}")
                self.kernel_cr3 = cr3
                break
            else:
                raise LayoutError(f"cannot read linux_banner to confirm the slide: {errors}")
        self.slide = slide
        return slide


DEFAULT_PAGE_OFFSET = 0xFFFF_8880_0000_0000  # x86-64 4-level, without memory randomization


def direct_map_base(layout: KernelLayout, mem: GuestMemory, cr3: int) -> int:
    """Start of the kernel's direct map of RAM (randomized under KASLR: page_offset_base)."""
    where = layout.address("page_offset_base")
    return mem.read_u64(cr3, where) if where is not None else DEFAULT_PAGE_OFFSET


def kernel_cr3_candidates(cr3: int) -> list[int]:
    """CR3 values that map kernel data: the CR3 itself and, under KPTI, its kernel half
    (the kernel PGD is the first of an 8 KiB pair, the user PGD the second)."""
    base = cr3 & 0x000F_FFFF_FFFF_F000
    return [base, base & ~0x1000] if base & 0x1000 else [base]


@dataclass
class TaskInfo:
    """Attributes of one task, cached by task_struct address until something changes them."""

    task: int
    pid: int
    tid: int
    ppid: int | None
    uid: int | None
    gid: int | None
    start_ns: int | None
    comm: str
    kthread: bool
    exe: str | None = None
    cmdline: str | None = None
    argv: list[str] | None = None
    process_uid: str | None = None
    parent_process_uid: str | None = None
    parent_task: int | None = None
    missing: set[str] = field(default_factory=set)


class TaskReader:
    """Reads the current task and its attributes; caches them per task_struct address.

    Cache entries are dropped on exec, exit, fork (a reused task_struct address starts a
    new task) and after syscalls that change credentials or the name (the syscall monitor
    calls `forget`).
    """

    def __init__(self, layout: KernelLayout, mem: GuestMemory, vm_id: str,
                 max_cached: int = 8192) -> None:
        self.layout = layout
        self.mem = mem
        self.vm_id = vm_id
        self.cache: dict[int, TaskInfo] = {}
        self.max_cached = max_cached
        self.unreadable = 0

    def current(self, cr3: int, gs_base: int) -> int:
        return self.mem.read_u64(cr3, gs_base + self.layout.current_offset)

    def forget(self, task: int) -> None:
        self.cache.pop(task, None)

    def info(self, cr3: int, task: int, user_cr3: int | None = None,
             argv: list[str] | None = None) -> TaskInfo:
        """Attributes of `task` (kernel reads under `cr3`, user memory under `user_cr3`).
        `argv`: its arguments, already read (an exec's, from its new stack), for a task not
        cached: its argument area is then not read again."""
        cached = self.cache.get(task)
        if cached is not None:
            if cached.missing and user_cr3 is not None:
                self._fill_process(cached, cr3, user_cr3)
            # Orphans are re-parented (to init or a subreaper) without any event of theirs:
            # one read tells whether the parent changed.
            if self.mem.read_u64(cr3, task + self.layout.task["real_parent"]) != \
                    cached.parent_task:
                self._read_parent(cached, cr3)
            return cached
        info = self._read(cr3, task, user_cr3, argv)
        if len(self.cache) >= self.max_cached:
            self.cache.clear()
        self.cache[task] = info
        return info

    def _read(self, cr3: int, task: int, user_cr3: int | None,
              argv: list[str] | None) -> TaskInfo:
        t = self.layout.task
        mem = self.mem
        tid = mem.read_int(cr3, task + t["pid"], 4, signed=True)
        pid = mem.read_int(cr3, task + t["tgid"], 4, signed=True)
        comm = mem.read_virtual(cr3, task + t["comm"], TASK_COMM_LEN).split(b"\0", 1)[0]
        flags = mem.read_u32(cr3, task + t["flags"]) if "flags" in t else 0
        start = mem.read_u64(cr3, task + t["start_time"]) if "start_time" in t else None
        uid = gid = None
        if "cred" in t and "uid" in self.layout.cred:
            try:
                cred = mem.read_u64(cr3, task + t["cred"])
                uid = mem.read_u32(cr3, cred + self.layout.cred["uid"])
                gid = mem.read_u32(cr3, cred + self.layout.cred["gid"])
            except UnreadableMemory:
                self.unreadable += 1
        info = TaskInfo(task=task, pid=pid, tid=tid, ppid=None, uid=uid, gid=gid, start_ns=start,
                        comm=comm.decode("utf-8", "backslashreplace"),
                        kthread=bool(flags & PF_KTHREAD))
        # process_uid identifies the thread group: its leader's start time, not the thread's
        leader_start = start
        if tid != pid and "start_time" in t:
            leader_start = self._group_leader_start(cr3, task, start)
        if leader_start is not None:
            info.process_uid = f"{self.vm_id}/{pid}/{leader_start}"
        self._read_parent(info, cr3)
        info.missing = {"exe", "cmdline"} if not info.kthread else set()
        if argv is not None and info.missing:
            info.argv, info.cmdline = argv, " ".join(argv)
            info.missing.discard("cmdline")
        if user_cr3 is not None and info.missing:
            self._fill_process(info, cr3, user_cr3)
        return info

    def _read_parent(self, info: TaskInfo, cr3: int) -> None:
        t = self.layout.task
        try:
            parent = self.mem.read_u64(cr3, info.task + t["real_parent"])
            info.ppid = self.mem.read_int(cr3, parent + t["tgid"], 4, signed=True)
            info.parent_task = parent
            if "start_time" in t:
                start = self._group_leader_start(cr3, parent, None)
                info.parent_process_uid = f"{self.vm_id}/{info.ppid}/{start}"
        except UnreadableMemory:
            self.unreadable += 1

    def _group_leader_start(self, cr3: int, task: int, default: int | None) -> int | None:
        off = self.layout.task.get("group_leader")
        if off is None:
            return default if default is not None else self.mem.read_u64(
                cr3, task + self.layout.task["start_time"])
        leader = self.mem.read_u64(cr3, task + off)
        return self.mem.read_u64(cr3, leader + self.layout.task["start_time"])

    def _fill_process(self, info: TaskInfo, cr3: int, user_cr3: int) -> None:
        t, m = self.layout.task, self.layout.mm
        if "mm" not in t:
            info.missing.clear()
            return
        try:
            mm = self.mem.read_u64(cr3, info.task + t["mm"])
        except UnreadableMemory:
            self.unreadable += 1
            return
        if mm == 0:
            info.missing.clear()
            return
        if "exe" in info.missing and "exe_file" in m:
            try:
                exe_file = self.mem.read_u64(cr3, mm + m["exe_file"])
                info.exe = self.file_path(cr3, exe_file) if exe_file else None
                info.missing.discard("exe")
            except UnreadableMemory:
                self.unreadable += 1
        if "cmdline" in info.missing and "arg_start" in m:
            try:
                start = self.mem.read_u64(cr3, mm + m["arg_start"])
                end = self.mem.read_u64(cr3, mm + m["arg_end"])
                info.argv, _ = read_string_area(self.mem, user_cr3, start, end)
                info.cmdline = " ".join(info.argv)
                info.missing.discard("cmdline")
            except UnreadableMemory:
                self.unreadable += 1  # arguments page not present yet: try on a later event

    def task_list(self, cr3: int, max_steps: int = MAX_TASK_WALK) -> tuple[list[int], str]:
        """The task_structs linked on the kernel's task list after `init_task` (thread-group
        leaders, kernel threads included), and how the walk ended: "complete", "unreadable"
        (a link could not be read), "cycle" (a link led back elsewhere than the head),
        "inconsistent" (a link led to something that is not a thread-group leader: its
        `group_leader` is not itself), "limit" (`max_steps` links followed) or "unsupported"
        (no init_task or task_struct.tasks in the profile). We walk outside the guest's RCU,
        so a task freed and reused under the walk ends it in one of these ways, never in an
        unbounded loop nor with garbage taken for tasks."""
        off = self.layout.task.get("tasks")
        leader_off = self.layout.task.get("group_leader")
        init_task = self.layout.address("init_task")
        if off is None or init_task is None:
            return [], "unsupported"
        head = init_task + off
        seen = {head}
        tasks: list[int] = []
        link = head
        for _ in range(max_steps):
            try:
                link = self.mem.read_u64(cr3, link)  # list_head.next: its first member
                if link == head:
                    return tasks, "complete"
                if link in seen:
                    return tasks, "cycle"
                task = link - off
                if leader_off is not None and self.mem.read_u64(cr3, task + leader_off) != task:
                    return tasks, "inconsistent"
            except UnreadableMemory:
                return tasks, "unreadable"
            seen.add(link)
            tasks.append(task)
        return tasks, "limit"

    def user_cr3(self, cr3: int, task: int) -> int | None:
        """The CR3 of `task`'s address space: the physical address of `mm->pgd` (a kernel
        virtual address, translated under `cr3`); None for a task without one (kernel
        threads). Under KPTI this is the kernel half of the pair, which maps user memory
        too."""
        if "mm" not in self.layout.task or "pgd" not in self.layout.mm:
            return None
        mm = self.mem.read_u64(cr3, task + self.layout.task["mm"])
        if mm == 0:
            return None
        return self.mem.translate(cr3, self.mem.read_u64(cr3, mm + self.layout.mm["pgd"]))

    def vdso_base(self, cr3: int, task: int) -> int | None:
        """Where `task`'s vDSO is mapped (`mm->context.vdso`); None if the profile does not
        say or the task has no address space."""
        mm_at, vdso_at = self.layout.task.get("mm"), self.layout.vdso.get("mm_vdso")
        if mm_at is None or vdso_at is None:
            return None
        mm = self.mem.read_u64(cr3, task + mm_at)
        return self.mem.read_u64(cr3, mm + vdso_at) if mm else None

    def exec_strings(self, cr3: int, task: int, user: CapturedMemory | None = None
                     ) -> dict[str, tuple[Any, bool]]:
        """The filename, argv and envp a freshly exec'd task was given, as the kernel copied
        them onto its new stack: [argv strings][envp strings][filename] at the top. `user`:
        where that stack is read (a host's copy of it, memory.CapturedMemory), if not live."""
        t, m = self.layout.task, self.layout.mm
        out: dict[str, tuple[Any, bool]] = {}
        if "mm" not in t or not all(k in m for k in ("arg_start", "arg_end", "env_start",
                                                      "env_end")):
            return out
        mm = self.mem.read_u64(cr3, task + t["mm"])
        arg_start, arg_end, env_start, env_end = (
            self.mem.read_u64(cr3, mm + m[k]) for k in ("arg_start", "arg_end", "env_start",
                                                         "env_end"))
        stack = user or self.mem
        out["argv"] = read_string_area(stack, cr3, arg_start, arg_end)
        out["envp"] = read_string_area(stack, cr3, env_start, env_end)
        name = stack.read_cstring(cr3, env_end, 4096)
        if name.error_address is None:
            out["path"] = (name.text(), name.truncated)
        return out

    def file_path(self, cr3: int, file_ptr: int) -> str | None:
        """Absolute path of a `struct file`, crossing mount points (all loops bounded)."""
        p = self.layout.path
        need = ("file_f_path", "path_dentry", "dentry_d_parent", "dentry_d_name", "qstr_name")
        if any(k not in p for k in need):
            return None
        mem = self.mem
        dentry = mem.read_u64(cr3, file_ptr + p["file_f_path"] + p["path_dentry"])
        vfsmount = mem.read_u64(cr3, file_ptr + p["file_f_path"] + p["path_mnt"]) \
            if "path_mnt" in p else 0
        mounts = all(k in p for k in ("mount_mnt", "mount_mnt_parent", "mount_mnt_mountpoint",
                                      "vfsmount_mnt_root"))
        parts: list[bytes] = []
        for _ in range(MAX_MOUNT_DEPTH):
            mnt_root = mem.read_u64(cr3, vfsmount + p["vfsmount_mnt_root"]) \
                if mounts and vfsmount else 0
            for _ in range(MAX_PATH_DEPTH):
                if dentry == mnt_root:
                    break
                parent = mem.read_u64(cr3, dentry + p["dentry_d_parent"])
                if parent == dentry:
                    break
                name_ptr = mem.read_u64(cr3, dentry + p["dentry_d_name"] + p["qstr_name"])
                parts.append(mem.read_cstring(cr3, name_ptr, 255).data)
                dentry = parent
            else:
                return None  # deeper than any sane path: refuse rather than guess
            if not mounts or not vfsmount:
                break
            mount = vfsmount - p["mount_mnt"]
            parent_mount = mem.read_u64(cr3, mount + p["mount_mnt_parent"])
            if parent_mount == mount:
                break
            dentry = mem.read_u64(cr3, mount + p["mount_mnt_mountpoint"])
            vfsmount = parent_mount + p["mount_mnt"]
        return "/" + "/".join(x.decode("utf-8", "backslashreplace") for x in reversed(parts))


def read_string_area(mem: GuestMemory | CapturedMemory, cr3: int, start: int, end: int,
                     limit: int = MAX_CMDLINE) -> tuple[list[str], bool]:
    """NUL-separated strings in [start, end) (argv or envp on a new stack), bounded; the
    last one cut if the bound cuts the area. Trailing NULs end the list, as for readers of
    /proc/PID/cmdline: the kernel's own first exec (init) leaves one more there, so a
    trailing empty argument cannot be told from padding."""
    size = max(0, min(end - start, limit))
    raw = mem.read_virtual(cr3, start, size) if size else b""
    parts = raw.rstrip(b"\0").split(b"\0") if raw else []
    return [p.decode("utf-8", "backslashreplace") for p in parts], end - start > limit


def read_pt_regs(mem: GuestMemory, cr3: int, address: int) -> tuple[int, ...]:
    return PT_REGS.unpack(mem.read_virtual(cr3, address, PT_REGS_SIZE))
