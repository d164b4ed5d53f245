"""Linux x86-64 ABI constants for symbolic rendering (written out: independent of the host)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

ERRNO_NAMES: dict[int, str] = {
    1: "EPERM", 2: "ENOENT", 3: "ESRCH", 4: "EINTR", 5: "EIO", 6: "ENXIO", 7: "E2BIG",
    8: "ENOEXEC", 9: "EBADF", 10: "ECHILD", 11: "EAGAIN", 12: "ENOMEM", 13: "EACCES",
    14: "EFAULT", 15: "ENOTBLK", 16: "EBUSY", 17: "EEXIST", 18: "EXDEV", 19: "ENODEV",
    20: "ENOTDIR", 21: "EISDIR", 22: "EINVAL", 23: "ENFILE", 24: "EMFILE", 25: "ENOTTY",
    26: "ETXTBSY", 27: "EFBIG", 28: "ENOSPC", 29: "ESPIPE", 30: "EROFS", 31: "EMLINK",
    32: "EPIPE", 33: "EDOM", 34: "ERANGE", 35: "EDEADLK", 36: "ENAMETOOLONG", 37: "ENOLCK",
    38: "ENOSYS", 39: "ENOTEMPTY", 40: "ELOOP", 42: "ENOMSG", 43: "EIDRM", 61: "ENODATA",
    62: "ETIME", 71: "EPROTO", 74: "EBADMSG", 75: "EOVERFLOW", 84: "EILSEQ", 88: "ENOTSOCK",
    89: "EDESTADDRREQ", 90: "EMSGSIZE", 91: "EPROTOTYPE", 92: "ENOPROTOOPT",
    93: "EPROTONOSUPPORT", 94: "ESOCKTNOSUPPORT", 95: "EOPNOTSUPP", 96: "EPFNOSUPPORT",
    97: "EAFNOSUPPORT", 98: "EADDRINUSE", 99: "EADDRNOTAVAIL", 100: "ENETDOWN",
    101: "ENETUNREACH", 102: "ENETRESET", 103: "ECONNABORTED", 104: "ECONNRESET",
    105: "ENOBUFS", 106: "EISCONN", 107: "ENOTCONN", 108: "ESHUTDOWN", 109: "ETOOMANYREFS",
    110: "ETIMEDOUT", 111: "ECONNREFUSED", 112: "EHOSTDOWN", 113: "EHOSTUNREACH",
    114: "EALREADY", 115: "EINPROGRESS", 116: "ESTALE", 122: "EDQUOT", 125: "ECANCELED",
    # kernel-internal restart codes (seen only if a syscall is caught mid-restart)
    512: "ERESTARTSYS", 513: "ERESTARTNOINTR", 514: "ERESTARTNOHAND", 515: "ENOIOCTLCMD",
    516: "ERESTART_RESTARTBLOCK", 524: "ENOTSUPP",
}
MAX_ERRNO = 4095

SIGNAL_NAMES: dict[int, str] = {
    1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT",
    7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2",
    13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM", 16: "SIGSTKFLT", 17: "SIGCHLD",
    18: "SIGCONT", 19: "SIGSTOP", 20: "SIGTSTP", 21: "SIGTTIN", 22: "SIGTTOU", 23: "SIGURG",
    24: "SIGXCPU", 25: "SIGXFSZ", 26: "SIGVTALRM", 27: "SIGPROF", 28: "SIGWINCH",
    29: "SIGIO", 30: "SIGPWR", 31: "SIGSYS",
}

OPEN_ACCMODE = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR", 3: "O_ACCMODE"}
OPEN_FLAGS: list[tuple[int, str]] = [
    (0o100, "O_CREAT"), (0o200, "O_EXCL"), (0o400, "O_NOCTTY"), (0o1000, "O_TRUNC"),
    (0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"), (0o4010000, "O_SYNC"), (0o10000, "O_DSYNC"),
    (0o20000, "O_ASYNC"), (0o40000, "O_DIRECT"), (0o100000, "O_LARGEFILE"),
    (0o20200000, "O_TMPFILE"), (0o200000, "O_DIRECTORY"), (0o400000, "O_NOFOLLOW"),
    (0o1000000, "O_NOATIME"), (0o2000000, "O_CLOEXEC"), (0o10000000, "O_PATH"),
]
PROT_FLAGS: list[tuple[int, str]] = [
    (0x1, "PROT_READ"), (0x2, "PROT_WRITE"), (0x4, "PROT_EXEC"), (0x8, "PROT_SEM"),
    (0x01000000, "PROT_GROWSDOWN"), (0x02000000, "PROT_GROWSUP"),
]
MAP_TYPES = {0x1: "MAP_SHARED", 0x2: "MAP_PRIVATE", 0x3: "MAP_SHARED_VALIDATE"}
MAP_FLAGS: list[tuple[int, str]] = [
    (0x10, "MAP_FIXED"), (0x20, "MAP_ANONYMOUS"), (0x40, "MAP_32BIT"), (0x100, "MAP_GROWSDOWN"),
    (0x800, "MAP_DENYWRITE"), (0x1000, "MAP_EXECUTABLE"), (0x2000, "MAP_LOCKED"),
    (0x4000, "MAP_NORESERVE"), (0x8000, "MAP_POPULATE"), (0x10000, "MAP_NONBLOCK"),
    (0x20000, "MAP_STACK"), (0x40000, "MAP_HUGETLB"), (0x80000, "MAP_SYNC"),
    (0x100000, "MAP_FIXED_NOREPLACE"), (0x4000000, "MAP_UNINITIALIZED"),
]
CLONE_FLAGS: list[tuple[int, str]] = [
    (0x100, "CLONE_VM"), (0x200, "CLONE_FS"), (0x400, "CLONE_FILES"), (0x800, "CLONE_SIGHAND"),
    (0x1000, "CLONE_PIDFD"), (0x2000, "CLONE_PTRACE"), (0x4000, "CLONE_VFORK"),
    (0x8000, "CLONE_PARENT"), (0x10000, "CLONE_THREAD"), (0x20000, "CLONE_NEWNS"),
    (0x40000, "CLONE_SYSVSEM"), (0x80000, "CLONE_SETTLS"), (0x100000, "CLONE_PARENT_SETTID"),
    (0x200000, "CLONE_CHILD_CLEARTID"), (0x400000, "CLONE_DETACHED"),
    (0x800000, "CLONE_UNTRACED"), (0x1000000, "CLONE_CHILD_SETTID"),
    (0x2000000, "CLONE_NEWCGROUP"), (0x4000000, "CLONE_NEWUTS"), (0x8000000, "CLONE_NEWIPC"),
    (0x10000000, "CLONE_NEWUSER"), (0x20000000, "CLONE_NEWPID"), (0x40000000, "CLONE_NEWNET"),
    (0x80000000, "CLONE_IO"),
]
ADDRESS_FAMILIES = {
    0: "AF_UNSPEC", 1: "AF_UNIX", 2: "AF_INET", 3: "AF_AX25", 4: "AF_IPX", 5: "AF_APPLETALK",
    9: "AF_X25", 10: "AF_INET6", 16: "AF_NETLINK", 17: "AF_PACKET", 38: "AF_ALG",
    40: "AF_VSOCK", 44: "AF_XDP",
}
SOCK_TYPES = {1: "SOCK_STREAM", 2: "SOCK_DGRAM", 3: "SOCK_RAW", 4: "SOCK_RDM",
              5: "SOCK_SEQPACKET", 6: "SOCK_DCCP", 10: "SOCK_PACKET"}
SOCK_TYPE_FLAGS: list[tuple[int, str]] = [(0o4000, "SOCK_NONBLOCK"), (0o2000000, "SOCK_CLOEXEC")]
IP_PROTOCOLS = {0: "IPPROTO_IP", 1: "IPPROTO_ICMP", 6: "IPPROTO_TCP", 17: "IPPROTO_UDP",
                41: "IPPROTO_IPV6", 58: "IPPROTO_ICMPV6", 132: "IPPROTO_SCTP", 255: "IPPROTO_RAW"}
ACCESS_MODES: list[tuple[int, str]] = [(4, "R_OK"), (2, "W_OK"), (1, "X_OK")]
AT_FLAGS: list[tuple[int, str]] = [
    (0x100, "AT_SYMLINK_NOFOLLOW"), (0x200, "AT_REMOVEDIR"), (0x400, "AT_SYMLINK_FOLLOW"),
    (0x800, "AT_NO_AUTOMOUNT"), (0x1000, "AT_EMPTY_PATH"),
]
AT_FDCWD = -100
FCNTL_CMDS = {
    0: "F_DUPFD", 1: "F_GETFD", 2: "F_SETFD", 3: "F_GETFL", 4: "F_SETFL", 5: "F_GETLK",
    6: "F_SETLK", 7: "F_SETLKW", 8: "F_SETOWN", 9: "F_GETOWN", 10: "F_SETSIG", 11: "F_GETSIG",
    15: "F_SETOWN_EX", 16: "F_GETOWN_EX", 36: "F_OFD_GETLK", 37: "F_OFD_SETLK",
    38: "F_OFD_SETLKW", 1024: "F_SETLEASE", 1025: "F_GETLEASE", 1026: "F_NOTIFY",
    1030: "F_DUPFD_CLOEXEC", 1031: "F_SETPIPE_SZ", 1032: "F_GETPIPE_SZ", 1033: "F_ADD_SEALS",
    1034: "F_GET_SEALS",
}
SEEK_WHENCE = {0: "SEEK_SET", 1: "SEEK_CUR", 2: "SEEK_END", 3: "SEEK_DATA", 4: "SEEK_HOLE"}
SIGPROCMASK_HOW = {0: "SIG_BLOCK", 1: "SIG_UNBLOCK", 2: "SIG_SETMASK"}
WAIT_OPTIONS: list[tuple[int, str]] = [
    (1, "WNOHANG"), (2, "WUNTRACED"), (4, "WEXITED"), (8, "WCONTINUED"),
    (0x1000000, "WNOWAIT"), (0x20000000, "__WNOTHREAD"), (0x40000000, "__WALL"),
    (0x80000000, "__WCLONE"),
]
FILE_TYPES = {0o140000: "S_IFSOCK", 0o120000: "S_IFLNK", 0o100000: "S_IFREG",
              0o060000: "S_IFBLK", 0o040000: "S_IFDIR", 0o020000: "S_IFCHR", 0o010000: "S_IFIFO"}
ARCH_PRCTL_CODES = {0x1001: "ARCH_SET_GS", 0x1002: "ARCH_SET_FS", 0x1003: "ARCH_GET_FS",
                    0x1004: "ARCH_GET_GS", 0x1011: "ARCH_GET_CPUID", 0x1012: "ARCH_SET_CPUID"}
FUTEX_OPS = {0: "FUTEX_WAIT", 1: "FUTEX_WAKE", 2: "FUTEX_FD", 3: "FUTEX_REQUEUE",
             4: "FUTEX_CMP_REQUEUE", 5: "FUTEX_WAKE_OP", 6: "FUTEX_LOCK_PI",
             7: "FUTEX_UNLOCK_PI", 8: "FUTEX_TRYLOCK_PI", 9: "FUTEX_WAIT_BITSET",
             10: "FUTEX_WAKE_BITSET", 11: "FUTEX_WAIT_REQUEUE_PI", 12: "FUTEX_CMP_REQUEUE_PI",
             13: "FUTEX_LOCK_PI2"}


def render_flags(value: int, flags: Sequence[tuple[int, str]], zero: str = "0") -> str:
    """`A|B|0x40` for a bit set; multi-bit flags match only when all their bits are set."""
    names = []
    rest = value
    for mask, name in flags:
        if mask and rest & mask == mask:
            names.append(name)
            rest &= ~mask
    if rest:
        names.append(hex(rest))
    return "|".join(names) if names else zero


def render_enum(value: int, names: Mapping[int, str]) -> str:
    return names.get(value, str(value))


def signal_name(value: int) -> str:
    if value in SIGNAL_NAMES:
        return SIGNAL_NAMES[value]
    if 32 <= value <= 64:
        return f"SIGRTMIN+{value - 32}" if value > 32 else "SIGRTMIN"
    return str(value)


def open_flags(value: int) -> str:
    access = OPEN_ACCMODE[value & 3]
    rest = render_flags(value & ~3, OPEN_FLAGS, zero="")
    return f"{access}|{rest}" if rest else access


def mmap_flags(value: int) -> str:
    kind = MAP_TYPES.get(value & 0xF)
    rest_value = value & ~0xF if kind else value
    rest = render_flags(rest_value, MAP_FLAGS, zero="")
    return "|".join(p for p in (kind, rest) if p) or "0"


def clone_flags(value: int) -> str:
    exit_signal = value & 0xFF
    rest = render_flags(value & ~0xFF, CLONE_FLAGS, zero="")
    parts = [p for p in (rest, signal_name(exit_signal) if exit_signal else "") if p]
    return "|".join(parts) or "0"


def socket_type(value: int) -> str:
    base = SOCK_TYPES.get(value & 0xF, str(value & 0xF))
    rest = render_flags(value & ~0xF, SOCK_TYPE_FLAGS, zero="")
    return f"{base}|{rest}" if rest else base


def access_mode(value: int) -> str:
    return render_flags(value, ACCESS_MODES, zero="F_OK")


def file_mode(value: int) -> str:
    """`S_IFREG|0644` when a file type is present, else the permission bits in octal."""
    kind = FILE_TYPES.get(value & 0o170000)
    perms = f"0{value & 0o7777:o}" if value & 0o7777 else "000"
    return f"{kind}|{perms}" if kind else f"0{value:o}" if value else "000"


def futex_op(value: int) -> str:
    name = FUTEX_OPS.get(value & 0x7F, str(value & 0x7F))
    if value & 128:
        name += "_PRIVATE"
    if value & 256:
        name += "|FUTEX_CLOCK_REALTIME"
    return name


def errno_name(ret: int) -> str | None:
    """The errno name of a negative syscall return value, or None for a success value."""
    if -MAX_ERRNO <= ret < 0:
        return ERRNO_NAMES.get(-ret, f"E{-ret}")
    return None
