"""Decoding of x86-64 Linux system calls from raw registers and guest memory, and of the
32-bit (ia32, `int $0x80`) ones a 64-bit kernel also serves (`SyscallDecoder(compat32=True)`).

Argument names and C types come from the profile's prototypes (the kernel's own
syscall_metadata); this module adds the meaning: which integers are fds, flags or enums,
which pointers are strings, socket addresses, argv arrays or OUT buffers to read at exit.

Guest memory is attacker-controlled: every string, array and buffer is bounded by `Limits`;
an unreadable page becomes an argument with `error` set, never an exception. IN arguments that
could not be read at entry (user pages not yet faulted in) are read again at exit, after the
kernel itself has copied them in - except for execve, whose address space is gone by then.

execve's argv and envp are read at its exit, not at its entry (`DecodedCall.at_exit`): after
a success from where the kernel copied them onto the new image's stack (what the new program
really got; `complete_exec`), after a failure from the caller's memory, which the failed
call left in place. Only the path is read at the entry, so the caller waits less there.

ia32 calls: numbers and names are the fixed i386 ABI (`profiles/data/syscalls_i386.json`);
where the i386 call has the x86-64 call's prototype, that prototype (and the decoding by name
below) is reused with every value cut to 32 bits: arguments, longs, pointers, argv entries.
The other i386 calls (16-bit uid calls, old_mmap, socketcall, the compat struct layouts)
keep their raw arguments.
"""
from __future__ import annotations

import ipaddress
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tracer.decode import consts as c
from tracer.memory import GuestMemory, UnreadableMemory

Prototype = Sequence[tuple[str, str]]  # [(c_type, arg_name), ...]


@dataclass(frozen=True)
class Limits:
    """Bounds on what is read from guest memory per system call."""

    max_string: int = 4096        # bytes per string or path
    max_argv: int = 64            # entries of argv / envp
    max_argv_string: int = 1024   # bytes per argv / envp entry
    max_buffer_preview: int = 64  # bytes of read/write buffers shown
    max_sockaddr: int = 128


@dataclass(frozen=True)
class SyscallInfo:
    nr: int
    name: str
    prototype: tuple[tuple[str, str], ...] | None  # None: unknown, raw arguments


@dataclass
class Counters:
    """What decoding could not do, for loss accounting."""

    unreadable: int = 0
    truncated: int = 0


RETURN_VALUE = -1  # CaptureSpec.length_pos: the call's return value bounds the length


@dataclass(frozen=True)
class CaptureSpec:
    """Guest memory a host can copy at a hit for one argument, so that decoding needs no
    read after the vCPU ran on: up to `max_length` bytes at argument `pos`'s address, bounded
    by argument `length_pos` (RETURN_VALUE: the return value, signed; None: no bound);
    `string`: up to and including the first NUL."""

    pos: int
    max_length: int
    length_pos: int | None = None
    string: bool = False


@dataclass
class DecodedCall:
    """One system call being decoded: entry fields now, exit fields when it returns."""

    nr: int
    name: str
    raw_args: tuple[int, ...]
    args: list[dict[str, Any]] = field(default_factory=list)
    typed: dict[str, Any] = field(default_factory=dict)   # path, fd, flags, ... (schema columns)
    argv: list[str] | None = None
    ret: int | None = None
    errno: str | None = None
    # positions of IN arguments to read again at exit (unreadable at entry)
    retry: list[int] = field(default_factory=list)
    # positions of execve's argv and envp, left for its exit (decode_exit, complete_exec)
    at_exit: list[int] = field(default_factory=list)


# Kinds of argument, by syscall name and position. Positions not listed fall back to the
# C type. Names are the kernel's (x86-64 syscall table).
_FD, _DIRFD, _PATH, _STR = "fd", "dirfd", "path", "string"
_SPECS: dict[str, tuple[str | None, ...]] = {
    "read": (_FD, "buf_out", "size"), "write": (_FD, "buf_in", "size"),
    "pread64": (_FD, "buf_out", "size", None), "pwrite64": (_FD, "buf_in", "size", None),
    "readv": (_FD, None, None), "writev": (_FD, None, None),
    "open": (_PATH, "open_flags", "mode"), "creat": (_PATH, "mode"),
    "openat": (_DIRFD, _PATH, "open_flags", "mode"), "openat2": (_DIRFD, _PATH, None, "size"),
    "close": (_FD,), "close_range": (_FD, _FD, None),
    "stat": (_PATH, "stat_out"), "lstat": (_PATH, "stat_out"), "fstat": (_FD, "stat_out"),
    "newfstatat": (_DIRFD, _PATH, "stat_out", "at_flags"),
    "statx": (_DIRFD, _PATH, "at_flags", "hex", "statx_out"),
    "lseek": (_FD, None, "whence"),
    "mmap": ("addr", "size", "prot", "mmap_flags", _FD, None),
    "mprotect": ("addr", "size", "prot"), "pkey_mprotect": ("addr", "size", "prot", None),
    "munmap": ("addr", "size"), "brk": ("addr",),
    "access": (_PATH, "access_mode"), "faccessat": (_DIRFD, _PATH, "access_mode"),
    "faccessat2": (_DIRFD, _PATH, "access_mode", "at_flags"),
    "pipe": ("pipefd_out",), "pipe2": ("pipefd_out", "open_flags_noacc"),
    "dup": (_FD,), "dup2": (_FD, _FD), "dup3": (_FD, _FD, "open_flags_noacc"),
    "socket": ("family", "sock_type", "ipproto"),
    "socketpair": ("family", "sock_type", "ipproto", "pipefd_out"),
    "connect": (_FD, "sockaddr_in", "size"), "bind": (_FD, "sockaddr_in", "size"),
    "listen": (_FD, None),
    "accept": (_FD, "sockaddr_out", None), "accept4": (_FD, "sockaddr_out", None, "sock_flags"),
    "getsockname": (_FD, "sockaddr_out", None), "getpeername": (_FD, "sockaddr_out", None),
    "sendto": (_FD, "buf_in", "size", None, "sockaddr_in", "size"),
    "recvfrom": (_FD, "buf_out", "size", None, "sockaddr_out", None),
    "shutdown": (_FD, None), "setsockopt": (_FD, None, None, None, "size"),
    "getsockopt": (_FD, None, None, None, None),
    "execve": (_PATH, "argv", "envp"), "execveat": (_DIRFD, _PATH, "argv", "envp", "at_flags"),
    "clone": ("clone_flags", "addr", "addr", "addr", "addr"),
    "clone3": ("clone_args", "size"),
    "sendmsg": (_FD, "msghdr_in", None), "recvmsg": (_FD, "msghdr_out", None),
    "exit": ("exit_code",), "exit_group": ("exit_code",),
    "wait4": ("pid", "wait_status_out", "wait_options", None),
    "waitid": (None, "pid", None, "wait_options", None),
    "kill": ("pid", "signal"), "tkill": ("pid", "signal"), "tgkill": ("pid", "pid", "signal"),
    "rt_sigaction": ("signal", None, None, "size"),
    "rt_sigprocmask": ("sigprocmask_how", None, None, "size"),
    "fcntl": (_FD, "fcntl_cmd", None), "ioctl": (_FD, "hex", None),
    "chdir": (_PATH,), "fchdir": (_FD,), "mkdir": (_PATH, "mode"),
    "mkdirat": (_DIRFD, _PATH, "mode"), "rmdir": (_PATH,), "unlink": (_PATH,),
    "unlinkat": (_DIRFD, _PATH, "at_flags"), "rename": (_PATH, "target_path"),
    "renameat": (_DIRFD, _PATH, _DIRFD, "target_path"),
    "renameat2": (_DIRFD, _PATH, _DIRFD, "target_path", None),
    "link": (_PATH, "target_path"), "symlink": ("target_path", _PATH),
    "linkat": (_DIRFD, _PATH, _DIRFD, "target_path", "at_flags"),
    "symlinkat": ("target_path", _DIRFD, _PATH),
    "readlink": (_PATH, "str_out", "size"), "readlinkat": (_DIRFD, _PATH, "str_out", "size"),
    "chmod": (_PATH, "mode"), "fchmod": (_FD, "mode"), "fchmodat": (_DIRFD, _PATH, "mode"),
    "chown": (_PATH, None, None), "lchown": (_PATH, None, None), "fchown": (_FD, None, None),
    "fchownat": (_DIRFD, _PATH, None, None, "at_flags"), "truncate": (_PATH, None),
    "ftruncate": (_FD, None), "getcwd": ("str_out", "size"), "chroot": (_PATH,),
    "mount": (_STR, _PATH, _STR, "hex", None), "umount2": (_PATH, None),
    "arch_prctl": ("arch_prctl", "addr"), "futex": ("addr", "futex_op", None, None, None, None),
    "memfd_create": (_STR, None), "getdents64": (_FD, None, "size"),
}
# System calls whose non-negative return value is a new file descriptor.
_RETURNS_FD = frozenset({"open", "openat", "openat2", "creat", "socket", "accept", "accept4",
                         "dup", "dup2", "dup3", "epoll_create", "epoll_create1", "eventfd",
                         "eventfd2", "memfd_create", "timerfd_create", "signalfd",
                         "signalfd4", "inotify_init", "inotify_init1", "pidfd_open",
                         "userfaultfd", "perf_event_open", "fanotify_init", "open_tree",
                         "fsopen", "fsmount", "open_by_handle_at"})
# Returns that are addresses (shown in hex).
_RETURNS_ADDR = frozenset({"mmap", "mremap", "brk", "shmat"})
# Kinds read at exit (OUT parameters).
_OUT_KINDS = frozenset({"buf_out", "stat_out", "statx_out", "msghdr_out", "pipefd_out",
                        "sockaddr_out", "str_out",
                        "wait_status_out"})
# Argument kinds whose decoding reads guest memory at the entry (IN) or exit (OUT).
_MEMORY_KINDS = _OUT_KINDS | {_PATH, "target_path", _STR, "buf_in", "sockaddr_in",
                              "msghdr_in", "clone_args", "argv", "envp"}
_O_CREAT_OR_TMPFILE = 0o100 | 0o20000000
_NO_RETRY = frozenset({"execve", "execveat", "exit", "exit_group"})
# Kinds of execve's arguments read at its exit.
_EXEC_STRINGS = frozenset({"argv", "envp"})
# What an argument left for the exit shows until then (a call that never returned).
NOT_READ_BEFORE_EXIT = "not read: the call did not return"

_STAT = struct.Struct("<QQQIII4xQqqq")  # dev ino nlink mode uid gid rdev size blksize blocks
_STATX = struct.Struct("<IIQIIIH2xQQ")  # mask blksize attributes nlink uid gid mode ino size
_CLONE_ARGS = struct.Struct("<QQQQQQQQ")  # flags pidfd child_tid parent_tid exit_signal stack
#                                           stack_size tls (clone3's struct clone_args, v0)
_MSGHDR = struct.Struct("<Q i 4x Q Q Q Q i")  # name namelen iov iovlen control controllen flags


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _int_bits(c_type: str) -> int:
    t = c_type.replace("const ", "").strip()
    if "long" in t or t in ("size_t", "ssize_t", "loff_t", "off_t", "u64", "s64", "__u64",
                            "key_serial_t", "aio_context_t") or t.endswith("_t") and "64" in t:
        return 64
    if t in ("u16", "__u16", "short", "unsigned short"):
        return 16
    return 32


def _is_string_type(c_type: str) -> bool:
    """A prototype type decoded as a NUL-terminated string (`const char *`)."""
    return "*" in c_type and "char" in c_type and "const" in c_type


def _is_unsigned(c_type: str) -> bool:
    t = c_type.replace("const ", "").strip()
    return t.startswith("unsigned") or t.startswith("u") and t[1:2].isdigit() or \
        t.startswith("__u") or t in ("size_t", "umode_t", "uid_t", "gid_t", "qid_t",
                                     "key_t", "mqd_t", "timer_t", "rwf_t")


def escape_bytes(data: bytes) -> str:
    """strace-like C escaping of a buffer preview."""
    out = []
    for b in data:
        if b == 0x5C:
            out.append("\\\\")
        elif b == 0x22:
            out.append('\\"')
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append({0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r", 0x00: "\\0"}.get(b, f"\\x{b:02x}"))
    return "".join(out)


def decode_sockaddr(data: bytes) -> tuple[str, dict[str, Any]]:
    """(`AF_INET 127.0.0.1:80`-style text, {family, addr, port}) of a sockaddr's bytes."""
    if len(data) < 2:
        return f"short sockaddr ({len(data)} bytes)", {}
    family = int.from_bytes(data[:2], "little")
    fam = c.ADDRESS_FAMILIES.get(family, str(family))
    info: dict[str, Any] = {"family": fam}
    if family == 2 and len(data) >= 8:
        port = int.from_bytes(data[2:4], "big")
        addr = str(ipaddress.IPv4Address(data[4:8]))
        info.update(addr=addr, port=port)
        return f"{fam} {addr}:{port}", info
    if family == 10 and len(data) >= 24:
        port = int.from_bytes(data[2:4], "big")
        addr = str(ipaddress.IPv6Address(data[8:24]))
        info.update(addr=addr, port=port)
        return f"{fam} [{addr}]:{port}", info
    if family == 1:
        path = data[2:]
        if path[:1] == b"\0":  # abstract socket: the name is all the bytes of the length given
            name = "@" + escape_bytes(path[1:])
        else:
            name = path.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
        info["addr"] = name
        return f"{fam} {name}", info
    return f"{fam} ({len(data)} bytes)", info


class SyscallDecoder:
    """Turns (nr, six raw args) into a DecodedCall at entry and completes it at exit."""

    def __init__(self, syscalls: Mapping[int, SyscallInfo], limits: Limits | None = None,
                 compat32: bool = False) -> None:
        self.syscalls = dict(syscalls)
        self.limits = limits or Limits()
        self.compat32 = compat32  # ia32 calls: registers, longs and pointers are 32 bits
        self.word_bits = 32 if compat32 else 64
        self.word_mask = (1 << self.word_bits) - 1
        self.counters = Counters()
        self._by_name = {info.name: info for info in self.syscalls.values()}

    def name(self, nr: int) -> str:
        info = self.syscalls.get(nr & self.word_mask)
        return info.name if info else f"syscall_{nr}"

    def number(self, name: str) -> int | None:
        info = self._by_name.get(name)
        return info.nr if info else None

    def reads_memory(self, nr: int) -> bool:
        """Whether decoding call `nr` reads guest memory (an IN argument at its entry or an
        OUT one at its exit); False: its registers alone decode it."""
        info = self.syscalls.get(nr & self.word_mask)
        if info is None or info.prototype is None:
            return False  # shown as raw registers
        spec = _SPECS.get(info.name, ())
        for pos, (c_type, _name) in enumerate(info.prototype):
            kind = spec[pos] if pos < len(spec) else None
            if kind in _MEMORY_KINDS or (kind is None and _is_string_type(c_type)):
                return True
        return False

    def capture_plan(self, nr: int) -> tuple[list[CaptureSpec], list[CaptureSpec]] | None:
        """What to capture at call `nr`'s entry (its IN arguments) and exit (its OUT ones,
        and the IN ones again for the retry of those unreadable at entry) so that decoding
        it reads nothing else (see `capture_spec`); None if some argument needs more (argv,
        msghdr, sockaddr_out: addresses or lengths held in guest memory). Both lists are
        empty for calls whose registers alone decode them."""
        info = self.syscalls.get(nr & self.word_mask)
        if info is None or info.prototype is None:
            return [], []
        spec = _SPECS.get(info.name, ())
        entry: list[CaptureSpec] = []
        exit_: list[CaptureSpec] = []
        for pos, (c_type, _name) in enumerate(info.prototype):
            kind = spec[pos] if pos < len(spec) else None
            if kind is None:
                if not _is_string_type(c_type):
                    continue
                kind = _STR
            if kind not in _MEMORY_KINDS:
                continue
            capture = self.capture_spec(info.name, pos, kind)
            if capture is None:
                return None
            if kind in _OUT_KINDS:
                exit_.append(capture)
            else:
                entry.append(capture)
        return entry, entry + exit_

    def capture_spec(self, name: str, pos: int, kind: str) -> CaptureSpec | None:
        """The capture that holds every byte decoding argument `pos` (of memory kind `kind`)
        of call `name` reads, or None if no single bounded region does."""
        lim = self.limits
        if kind in (_PATH, "target_path", _STR) or (kind == "str_out" and name == "getcwd"):
            return CaptureSpec(pos, lim.max_string + 1, string=True)  # +1: a NUL at max_string
        if kind == "buf_in":
            return CaptureSpec(pos, lim.max_buffer_preview, length_pos=pos + 1)
        if kind == "sockaddr_in":
            return CaptureSpec(pos, lim.max_sockaddr, length_pos=pos + 1)
        if kind == "buf_out":
            return CaptureSpec(pos, lim.max_buffer_preview, length_pos=RETURN_VALUE)
        if kind == "str_out":
            return CaptureSpec(pos, lim.max_string, length_pos=RETURN_VALUE)
        fixed = {"clone_args": _CLONE_ARGS.size, "pipefd_out": 8, "stat_out": _STAT.size,
                 "statx_out": _STATX.size, "wait_status_out": 4}.get(kind)
        return None if fixed is None else CaptureSpec(pos, fixed)

    # -- entry ------------------------------------------------------------------------------
    def decode_entry(self, mem: GuestMemory | None, cr3: int, nr: int,
                     raw_args: Sequence[int],
                     unreadable: Mapping[int, str] | None = None) -> DecodedCall:
        """`unreadable`: positions whose raw value itself could not be read (0 stands in for
        it), with the reason; their arguments carry it as their error."""
        if self.compat32:  # the kernel reads eax and the argument registers' low halves
            nr &= self.word_mask
            raw_args = tuple(v & self.word_mask for v in raw_args)
        unreadable = unreadable or {}
        info = self.syscalls.get(nr)
        if info is None or info.prototype is None:
            call = DecodedCall(nr, info.name if info else f"syscall_{nr}", tuple(raw_args))
            call.args = [_arg(f"arg{i}", "unsigned long", "?" if i in unreadable else hex(v),
                              error=unreadable.get(i)) for i, v in enumerate(raw_args)]
            return call
        call = DecodedCall(nr, info.name, tuple(raw_args[:len(info.prototype)]))
        spec = _SPECS.get(info.name, ())
        for pos, (c_type, arg_name) in enumerate(info.prototype):
            if pos in unreadable:
                call.args.append(_arg(arg_name, c_type, "?", error=unreadable[pos]))
                continue
            kind = spec[pos] if pos < len(spec) else None
            if kind in _OUT_KINDS:
                call.args.append(_arg(arg_name, c_type, _pointer(raw_args[pos])))
                continue
            if kind in _EXEC_STRINGS and raw_args[pos]:
                call.args.append(_arg(arg_name, c_type, _pointer(raw_args[pos]),
                                      error=NOT_READ_BEFORE_EXIT))
                call.at_exit.append(pos)
                continue
            arg = self._decode_in(call, mem, cr3, pos, kind, c_type, arg_name, raw_args)
            call.args.append(arg)
            if arg["error"] is not None and info.name not in _NO_RETRY:
                call.retry.append(pos)
        return call

    def _decode_in(self, call: DecodedCall, mem: GuestMemory | None, cr3: int, pos: int,
                   kind: str | None, c_type: str, arg_name: str,
                   raw: Sequence[int]) -> dict[str, Any]:
        value = raw[pos]
        t = call.typed
        if kind is None:
            return self._by_type(mem, cr3, c_type, arg_name, value)
        if kind == _FD:
            fd = _signed(value, 32)
            t.setdefault("fd", fd)
            return _arg(arg_name, c_type, str(fd))
        if kind == _DIRFD:
            fd = _signed(value, 32)
            return _arg(arg_name, c_type, "AT_FDCWD" if fd == c.AT_FDCWD else str(fd))
        if kind in (_PATH, "target_path", _STR):
            arg = self._string(mem, cr3, c_type, arg_name, value, self.limits.max_string)
            if kind == _PATH and arg["error"] is None:
                t["path"] = arg["value"]
            elif kind == "target_path" and arg["error"] is None:
                t["target_path"] = arg["value"]
            return arg
        if kind == "open_flags":
            text = c.open_flags(value & 0xFFFF_FFFF)
            t["flags"] = text
            return _arg(arg_name, c_type, text)
        if kind == "open_flags_noacc":
            text = c.render_flags(value & 0xFFFF_FFFF, c.OPEN_FLAGS)
            t["flags"] = text
            return _arg(arg_name, c_type, text)
        if kind == "mode":
            mode = value & 0xFFFF_FFFF
            if call.name not in ("open", "openat") or raw[pos - 1] & _O_CREAT_OR_TMPFILE:
                t["mode"] = mode  # open's mode means something only when creating
            return _arg(arg_name, c_type, c.file_mode(mode))
        if kind == "prot":
            text = c.render_flags(value & 0xFFFF_FFFF, c.PROT_FLAGS, zero="PROT_NONE")
            t["prot"] = text
            return _arg(arg_name, c_type, text)
        if kind == "mmap_flags":
            text = c.mmap_flags(value & 0xFFFF_FFFF)
            t["flags"] = text
            return _arg(arg_name, c_type, text)
        if kind == "clone_flags":
            text = c.clone_flags(value)
            t["flags"] = text
            return _arg(arg_name, c_type, text)
        if kind == "family":
            text = c.render_enum(value & 0xFFFF_FFFF, c.ADDRESS_FAMILIES)
            t["family"] = text
            return _arg(arg_name, c_type, text)
        if kind == "sock_type":
            return _arg(arg_name, c_type, c.socket_type(value & 0xFFFF_FFFF))
        if kind == "sock_flags":
            text = c.render_flags(value & 0xFFFF_FFFF, c.SOCK_TYPE_FLAGS)
            t["flags"] = text
            return _arg(arg_name, c_type, text)
        if kind == "ipproto":
            return _arg(arg_name, c_type, c.render_enum(value & 0xFFFF_FFFF, c.IP_PROTOCOLS))
        if kind == "access_mode":
            return _arg(arg_name, c_type, c.access_mode(value & 0xFFFF_FFFF))
        if kind == "at_flags":
            return _arg(arg_name, c_type, c.render_flags(value & 0xFFFF_FFFF, c.AT_FLAGS))
        if kind == "signal":
            text = c.signal_name(_signed(value, 32))
            t["signal"] = text
            return _arg(arg_name, c_type, text)
        if kind == "pid":
            pid = _signed(value, 32)
            t.setdefault("target_pid", pid)
            return _arg(arg_name, c_type, str(pid))
        if kind == "fcntl_cmd":
            return _arg(arg_name, c_type, c.render_enum(value & 0xFFFF_FFFF, c.FCNTL_CMDS))
        if kind == "whence":
            return _arg(arg_name, c_type, c.render_enum(value & 0xFFFF_FFFF, c.SEEK_WHENCE))
        if kind == "sigprocmask_how":
            return _arg(arg_name, c_type, c.render_enum(value & 0xFFFF_FFFF, c.SIGPROCMASK_HOW))
        if kind == "wait_options":
            return _arg(arg_name, c_type, c.render_flags(value & 0xFFFF_FFFF, c.WAIT_OPTIONS))
        if kind == "arch_prctl":
            return _arg(arg_name, c_type, c.render_enum(value & 0xFFFF_FFFF, c.ARCH_PRCTL_CODES))
        if kind == "futex_op":
            return _arg(arg_name, c_type, c.futex_op(value & 0xFFFF_FFFF))
        if kind == "exit_code":
            return _arg(arg_name, c_type, str(_signed(value, 32)))
        if kind == "addr":
            if "addr" not in t and pos == 0:
                t["addr"] = value
            return _arg(arg_name, c_type, _pointer(value))
        if kind == "size":
            if "length" not in t:
                t["length"] = value
            return _arg(arg_name, c_type, str(value))
        if kind == "hex":
            return _arg(arg_name, c_type, hex(value))
        if kind == "clone_args":
            return self._clone_args(call, mem, cr3, c_type, arg_name, value)
        if kind == "msghdr_in":
            return self._msghdr(call, mem, cr3, c_type, arg_name, value, remote=True)
        if kind == "buf_in":
            return self._buffer(mem, cr3, c_type, arg_name, value, raw[pos + 1])
        if kind == "sockaddr_in":
            length = raw[pos + 1] & 0xFFFF_FFFF
            arg, info = self._sockaddr(mem, cr3, c_type, arg_name, value, length)
            _sockaddr_columns(t, call.name, info, remote=call.name != "bind")
            return arg
        if kind in ("argv", "envp"):
            arg, strings = self._string_array(mem, cr3, c_type, arg_name, value)
            if kind == "argv" and strings is not None:
                call.argv = strings
            return arg
        raise AssertionError(f"unknown argument kind {kind}")

    def _by_type(self, mem: GuestMemory | None, cr3: int, c_type: str, arg_name: str,
                 value: int) -> dict[str, Any]:
        if "*" in c_type:
            if _is_string_type(c_type):
                return self._string(mem, cr3, c_type, arg_name, value, self.limits.max_string)
            return _arg(arg_name, c_type, _pointer(value))
        bits = min(_int_bits(c_type), self.word_bits)
        if _is_unsigned(c_type):
            return _arg(arg_name, c_type, str(value & ((1 << bits) - 1)))
        return _arg(arg_name, c_type, str(_signed(value, bits)))

    # -- memory-backed values ---------------------------------------------------------------
    def _string(self, mem: GuestMemory | None, cr3: int, c_type: str, arg_name: str,
                gva: int, max_len: int) -> dict[str, Any]:
        if gva == 0:
            return _arg(arg_name, c_type, "NULL")
        if mem is None:
            return _arg(arg_name, c_type, _pointer(gva), error="no guest memory")
        s = mem.read_cstring(cr3, gva, max_len)
        if s.truncated:
            self.counters.truncated += 1
        if s.error_address is not None:
            self.counters.unreadable += 1
            return _arg(arg_name, c_type, s.text() if s.data else _pointer(gva),
                        error=f"unreadable at {s.error_address:#x}")
        return _arg(arg_name, c_type, s.text(), truncated=s.truncated)

    def _buffer(self, mem: GuestMemory | None, cr3: int, c_type: str, arg_name: str,
                gva: int, count: int) -> dict[str, Any]:
        want = min(count, self.limits.max_buffer_preview)
        if gva == 0 or want == 0 or mem is None:
            return _arg(arg_name, c_type, _pointer(gva) if gva else "NULL")
        try:
            data = mem.read_virtual(cr3, gva, want)
        except UnreadableMemory as exc:
            self.counters.unreadable += 1
            return _arg(arg_name, c_type, _pointer(gva), error=f"unreadable at {exc.address:#x}")
        return _arg(arg_name, c_type, escape_bytes(data), truncated=count > want)

    def _sockaddr(self, mem: GuestMemory | None, cr3: int, c_type: str, arg_name: str,
                  gva: int, length: int) -> tuple[dict[str, Any], dict[str, Any]]:
        if gva == 0:
            return _arg(arg_name, c_type, "NULL"), {}
        if mem is None:
            return _arg(arg_name, c_type, _pointer(gva), error="no guest memory"), {}
        size = min(length, self.limits.max_sockaddr)
        try:
            data = mem.read_virtual(cr3, gva, size)
        except UnreadableMemory as exc:
            self.counters.unreadable += 1
            return _arg(arg_name, c_type, _pointer(gva),
                        error=f"unreadable at {exc.address:#x}"), {}
        text, info = decode_sockaddr(data)
        return _arg(arg_name, c_type, text, truncated=length > size), info

    def _clone_args(self, call: DecodedCall, mem: GuestMemory | None, cr3: int, c_type: str,
                    arg_name: str, gva: int) -> dict[str, Any]:
        if gva == 0 or mem is None:
            return _arg(arg_name, c_type, _pointer(gva))
        try:
            flags, _pidfd, _ctid, _ptid, exit_signal, stack, stack_size, tls = \
                _CLONE_ARGS.unpack(mem.read_virtual(cr3, gva, _CLONE_ARGS.size))
        except UnreadableMemory as exc:
            return _arg(arg_name, c_type, _pointer(gva), error=f"unreadable at {exc.address:#x}")
        text = c.clone_flags(flags & ~0xFF)
        call.typed["flags"] = text
        sig = c.signal_name(exit_signal) if exit_signal else "0"
        return _arg(arg_name, c_type, f"{{flags={text}, exit_signal={sig}, stack={_pointer(stack)}"
                                      f", stack_size={stack_size:#x}, tls={_pointer(tls)}}}")

    def _msghdr(self, call: DecodedCall, mem: GuestMemory | None, cr3: int, c_type: str,
                arg_name: str, gva: int, remote: bool) -> dict[str, Any]:
        if gva == 0 or mem is None:
            return _arg(arg_name, c_type, _pointer(gva))
        try:
            name, namelen, _iov, iovlen, _control, controllen, _flags = \
                _MSGHDR.unpack(mem.read_virtual(cr3, gva, _MSGHDR.size))
        except UnreadableMemory as exc:
            return _arg(arg_name, c_type, _pointer(gva), error=f"unreadable at {exc.address:#x}")
        parts = []
        if name and namelen > 0:
            addr, info = self._sockaddr(mem, cr3, c_type, arg_name, name, namelen & 0xFFFF_FFFF)
            parts.append(f"msg_name={addr['value']}")
            _sockaddr_columns(call.typed, call.name, info, remote=remote)
        parts.append(f"msg_iovlen={iovlen}")
        if controllen:
            parts.append(f"msg_controllen={controllen}")
        return _arg(arg_name, c_type, "{" + ", ".join(parts) + "}")

    def _string_array(self, mem: GuestMemory | None, cr3: int, c_type: str, arg_name: str,
                      gva: int) -> tuple[dict[str, Any], list[str] | None]:
        if gva == 0:
            return _arg(arg_name, c_type, "NULL"), []
        if mem is None:
            return _arg(arg_name, c_type, _pointer(gva), error="no guest memory"), None
        lim = self.limits
        try:
            pointers, truncated = mem.read_pointer_array(cr3, gva, lim.max_argv,
                                                         self.word_bits // 8)
        except UnreadableMemory as exc:
            self.counters.unreadable += 1
            return _arg(arg_name, c_type, _pointer(gva),
                        error=f"unreadable at {exc.address:#x}"), None
        strings: list[str] = []
        error = None
        for p in pointers:
            s = mem.read_cstring(cr3, p, lim.max_argv_string)
            truncated |= s.truncated
            if s.error_address is not None and error is None:
                error = f"unreadable at {s.error_address:#x}"
            strings.append(s.text())
        if truncated:
            self.counters.truncated += 1
        if error:
            self.counters.unreadable += 1
        return _arg(arg_name, c_type, json.dumps(strings), truncated=truncated, error=error), \
            strings

    # -- exit -------------------------------------------------------------------------------
    def decode_exit(self, mem: GuestMemory | None, cr3: int, call: DecodedCall,
                    ret: int) -> DecodedCall:
        """Complete `call` with its return value (pt_regs->ax) and OUT parameters."""
        ret = _signed(ret, 64)
        if self.compat32:  # what the caller's eax holds: an error or an unsigned 32-bit value
            ret = _signed(ret, 32) if -4095 <= _signed(ret, 32) < 0 else ret & 0xFFFF_FFFF
        call.ret = ret
        call.errno = c.errno_name(ret)
        if call.name in _RETURNS_FD and ret >= 0:
            call.typed["fd"] = ret
        info = self.syscalls.get(call.nr)
        if info is None or info.prototype is None:
            return call
        spec = _SPECS.get(call.name, ())
        raw = call.raw_args
        # A failed execve left its argv and envp in the caller's memory: read with the rest.
        again = call.retry + call.at_exit if call.errno is not None else call.retry
        for pos in again:
            c_type, arg_name = info.prototype[pos]
            kind = spec[pos] if pos < len(spec) else None
            call.args[pos] = self._decode_in(call, mem, cr3, pos, kind, c_type, arg_name, raw)
        if call.errno is not None:
            call.at_exit.clear()
            return call
        for pos, kind in enumerate(spec[:len(raw)]):
            if kind in _OUT_KINDS:
                c_type, arg_name = info.prototype[pos]
                call.args[pos] = self._decode_out(call, mem, cr3, pos, kind, c_type, arg_name, ret)
        return call

    def _decode_out(self, call: DecodedCall, mem: GuestMemory | None, cr3: int, pos: int,
                    kind: str, c_type: str, arg_name: str, ret: int) -> dict[str, Any]:
        gva = call.raw_args[pos]
        if gva == 0:
            return _arg(arg_name, c_type, "NULL")
        if mem is None:
            return _arg(arg_name, c_type, _pointer(gva), error="no guest memory")
        try:
            if kind == "buf_out":
                return self._buffer(mem, cr3, c_type, arg_name, gva, max(ret, 0))
            if kind == "str_out":
                length = min(max(ret, 0), self.limits.max_string)
                if call.name == "getcwd":  # returns the length including the NUL
                    s = mem.read_cstring(cr3, gva, self.limits.max_string)
                    return _arg(arg_name, c_type, s.text(), truncated=s.truncated,
                                error=None if s.error_address is None
                                else f"unreadable at {s.error_address:#x}")
                data = mem.read_virtual(cr3, gva, length)
                return _arg(arg_name, c_type, data.decode("utf-8", "backslashreplace"),
                            truncated=ret > length)
            if kind == "pipefd_out":
                a, b = struct.unpack("<ii", mem.read_virtual(cr3, gva, 8))
                return _arg(arg_name, c_type, f"[{a}, {b}]")
            if kind == "stat_out":
                fields = _STAT.unpack(mem.read_virtual(cr3, gva, _STAT.size))
                _dev, ino, _nlink, mode, uid, gid, _rdev, size, _blksize, _blocks = fields
                return _arg(arg_name, c_type, f"{{st_mode={c.file_mode(mode)}, st_size={size}, "
                                              f"st_ino={ino}, st_uid={uid}, st_gid={gid}}}")
            if kind == "statx_out":
                _mask, _blksize, _attrs, _nlink, uid, gid, mode, ino, size = \
                    _STATX.unpack(mem.read_virtual(cr3, gva, _STATX.size))
                return _arg(arg_name, c_type, f"{{stx_mode={c.file_mode(mode)}, stx_size={size}, "
                                              f"stx_ino={ino}, stx_uid={uid}, stx_gid={gid}}}")
            if kind == "msghdr_out":
                return self._msghdr(call, mem, cr3, c_type, arg_name, gva, remote=True)
            if kind == "wait_status_out":
                status = mem.read_u32(cr3, gva)
                text = _wait_status(status)
                return _arg(arg_name, c_type, text)
            if kind == "sockaddr_out":
                len_ptr = call.raw_args[pos + 1]
                length = mem.read_u32(cr3, len_ptr) if len_ptr else self.limits.max_sockaddr
                arg, info = self._sockaddr(mem, cr3, c_type, arg_name, gva, length)
                _sockaddr_columns(call.typed, call.name, info,
                                  remote=call.name != "getsockname")
                return arg
        except UnreadableMemory as exc:
            self.counters.unreadable += 1
            return _arg(arg_name, c_type, _pointer(gva), error=f"unreadable at {exc.address:#x}")
        raise AssertionError(f"unknown OUT kind {kind}")

    def complete_exec(self, call: DecodedCall, recovered: Mapping[str, Any]) -> None:
        """Complete a successful execve/execveat from the new image: its argv and envp (left
        for the exit) and any argument unreadable at entry, taken from where the kernel
        copied them onto the new stack (`recovered`: {"path": (str, truncated),
        "argv"/"envp": (list, truncated)}), within the bounds of an entry's (max_argv
        strings of max_argv_string characters).
        """
        spec = _SPECS.get(call.name, ())
        lim = self.limits
        for kind, (value, truncated) in recovered.items():
            if kind not in spec:
                continue
            pos = spec.index(kind)
            old = call.args[pos]
            if old["error"] is None:
                continue  # read completely at entry: keep it
            if kind in _EXEC_STRINGS:
                truncated = truncated or len(value) > lim.max_argv or \
                    any(len(v) > lim.max_argv_string for v in value)
                value = [v[:lim.max_argv_string] for v in value[:lim.max_argv]]
                if truncated:
                    self.counters.truncated += 1
            text = value if isinstance(value, str) else json.dumps(value)
            call.args[pos] = _arg(old["name"], old["type"], text, truncated=truncated)
            if kind == "argv":
                call.argv = list(value)
            elif kind == _PATH:
                call.typed["path"] = value
        for pos in call.at_exit:
            if call.args[pos]["error"] == NOT_READ_BEFORE_EXIT:  # none on the new stack
                self.counters.unreadable += 1
                call.args[pos] = dict(call.args[pos], error="unreadable on the new stack")
        call.at_exit.clear()

    def truncated_values(self, call: DecodedCall) -> int:
        """Arguments cut by a bound (strings, paths, argv, sockaddrs). Buffer previews are
        short by design and not counted."""
        spec = _SPECS.get(call.name, ())
        return sum(1 for pos, a in enumerate(call.args) if a["truncated"] and
                   (spec[pos] if pos < len(spec) else None) not in ("buf_in", "buf_out"))

    def render_ret(self, call: DecodedCall) -> str:
        if call.ret is None:
            return "?"
        if call.errno:
            return f"-1 {call.errno}"
        if call.name in _RETURNS_ADDR:
            return hex(call.ret)
        return str(call.ret)


def _wait_status(status: int) -> str:
    if status & 0x7F == 0:
        return f"[{{WIFEXITED(s) && WEXITSTATUS(s) == {(status >> 8) & 0xFF}}}]"
    if status & 0xFF == 0x7F:
        return f"[{{WIFSTOPPED(s) && WSTOPSIG(s) == {c.signal_name((status >> 8) & 0xFF)}}}]"
    core = " && WCOREDUMP(s)" if status & 0x80 else ""
    return f"[{{WIFSIGNALED(s) && WTERMSIG(s) == {c.signal_name(status & 0x7F)}{core}}}]"


def wait_exit_code(status: int) -> int | None:
    return (status >> 8) & 0xFF if status & 0x7F == 0 else None


def _sockaddr_columns(typed: dict[str, Any], name: str, info: dict[str, Any],
                      remote: bool) -> None:
    if not info:
        return
    typed["family"] = info.get("family")
    side = "remote" if remote else "local"
    if "addr" in info:
        typed[f"{side}_addr"] = info["addr"]
    if "port" in info:
        typed[f"{side}_port"] = info["port"]


def _pointer(value: int) -> str:
    return "NULL" if value == 0 else hex(value)


def _arg(name: str, c_type: str, value: str, truncated: bool = False,
         error: str | None = None) -> dict[str, Any]:
    return {"name": name, "type": c_type, "value": value, "truncated": truncated, "error": error}


# Kernel entry names (SYSCALL_DEFINE) that differ from the x86-64 ABI names users and strace
# know (arch/x86/entry/syscalls/syscall_64.tbl).
ABI_NAMES = {"newuname": "uname", "newstat": "stat", "newlstat": "lstat", "newfstat": "fstat",
             "sendfile64": "sendfile", "umount": "umount2"}


def syscall_table(entries: Mapping[int, Any]) -> dict[int, SyscallInfo]:
    """SyscallInfo for each entry of a profile's syscall table, under x86-64 ABI names.

    Accepts values that are SyscallInfo, (name, prototype) pairs, or objects with `name` and
    `prototype`/`args` attributes.
    """
    table: dict[int, SyscallInfo] = {}
    for nr, entry in entries.items():
        if isinstance(entry, SyscallInfo):
            table[nr] = entry
            continue
        if isinstance(entry, tuple):
            name, proto = entry
        else:
            name = getattr(entry, "name")
            proto = getattr(entry, "prototype", None) or getattr(entry, "args", None)
        if name.startswith("sys_"):
            name = name[4:]
        name = ABI_NAMES.get(name, name)
        if proto is None:
            proto = [("unsigned long", f"arg{i}") for i in range(6)]
        table[nr] = SyscallInfo(int(nr), name, tuple((str(t), str(n)) for t, n in proto))
    return table




def ia32_syscall_table(abi: Mapping[str, Any],
                       x86_64: Mapping[int, SyscallInfo]) -> dict[int, SyscallInfo]:
    """SyscallInfo per i386 number from the i386 ABI table (`profiles.syscalls.i386_abi()`):
    the prototype of the x86-64 call named by `prototype_of` (from the profile's x86-64
    table, `x86_64`), else None (raw arguments)."""
    by_name = {info.name: info.prototype for info in x86_64.values()}
    return {int(nr): SyscallInfo(int(nr), entry["name"], by_name.get(entry.get("prototype_of", "")))
            for nr, entry in abi["syscalls"].items()}
