"""Fixed values of the lab workloads: the single source of truth.

The C workloads (``guestlab/workloads/*.c``) are compiled against a header generated from this
module (``c_header()``), so a test asserting against these constants asserts against exactly
what the guest executed. The syscall sequence of every workload is in ``README.md`` next to
this file. Sources named ``*.i386.c`` are 32-bit programs (``gcc -m32 -static``): the
binary drops that suffix (``wl-compat32.i386.c`` -> ``wl-compat32``). Flag values are Linux
x86-64 ABI values, written out so they do not depend on the host running the tests.
"""
from __future__ import annotations

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent

# Linux x86-64 ABI values used below.
AT_FDCWD = -100
O_RDONLY = 0o0
O_WRONLY = 0o1
O_CREAT = 0o100
O_TRUNC = 0o1000
ENOENT = 2
AF_INET = 2
SOCK_STREAM = 1
SOL_SOCKET = 1
SO_REUSEADDR = 2
SIGILL = 4
PROT_READ = 0x1
MAP_SHARED = 0x01

# Where the workloads live inside the guest. `WORKLOAD_DRIVER once` runs them all.
WORKLOAD_DRIVER = "/workload"
WORKLOAD_DIR = "/lab"
WORKLOADS = ("file", "exec", "enoent", "tcp", "vmcall", "int80", "compat32")
# Binary (and so the task's comm) of each workload.
WORKLOAD_BINARIES = {name: f"{WORKLOAD_DIR}/wl-{name}" for name in WORKLOADS}
WORKLOAD_COMMS = {name: f"wl-{name}" for name in WORKLOADS}
# Every workload exits with this status when everything it did matched the values below;
# any other status means something in the guest differed (see README.md for each code).
WORKLOAD_EXIT_OK = 0
WORKLOAD_EXIT_MISMATCH = 1
# Driver modes: "once" runs every workload one after the other; "steady" repeats that every
# STEADY_PERIOD_MS (default) until killed; a workload name runs just that one.
STEADY_PERIOD_MS = 1000
# Lines the driver prints, one per workload run: "wl <name> status=<exit status>" and, after
# a full round, "wl round=<n> failures=<k>".
DRIVER_LINE_PREFIX = "wl "

# file: write then read back.
FILE_PATH = "/tmp/vmitrace-wl-file.dat"
FILE_WRITE_FLAGS = O_WRONLY | O_CREAT | O_TRUNC  # 0x241
FILE_MODE = 0o644
FILE_READ_FLAGS = O_RDONLY
FILE_BYTES = 3000
FILE_PATTERN = b"vmitrace file workload\n"
FILE_CONTENT = (FILE_PATTERN * (FILE_BYTES // len(FILE_PATTERN) + 1))[:FILE_BYTES]

# exec: fork, execve of a fixed argv and environment, wait4 for a known exit status.
EXEC_PATH = "/bin/busybox"
EXEC_ARGV = ("/bin/busybox", "sh", "-c", "exit 42")
EXEC_ENVP = ("PATH=/bin:/sbin", "VMITRACE_WORKLOAD=exec")
EXEC_EXIT_CODE = 42

# enoent: an openat of a path that does not exist.
ENOENT_PATH = "/nonexistent/vmitrace-missing-file"
ENOENT_FLAGS = O_RDONLY

# tcp: a listener and a client in one process on the loopback interface.
TCP_ADDRESS = "127.0.0.1"
TCP_PORT = 40123
TCP_BACKLOG = 1
TCP_PAYLOAD = b"vmitrace-ping"

# vmcall: executes `vmcall` with these registers. Under TCG (and on hosts without a
# hypervisor that handles it) the guest kernel delivers SIGILL; the workload catches it,
# skips the 3-byte instruction and exits WORKLOAD_EXIT_OK.
VMCALL_RAX = 0x564D4954  # "VMIT"
VMCALL_RBX = 0x1111
VMCALL_RCX = 0x2222
VMCALL_RDX = 0x3333
VMCALL_RSI = 0x4444
VMCALL_INSN = bytes((0x0F, 0x01, 0xC1))

# int80: a 64-bit process making 32-bit (i386 ABI) system calls with `int $0x80`. Numbers are
# the i386 ABI's (arch/x86/entry/syscalls/syscall_32.tbl), not x86-64's.
I386_NR_WRITE = 4
I386_NR_OPEN = 5
I386_NR_CLOSE = 6
I386_NR_GETPID = 20
INT80_INSN = bytes((0xCD, 0x80))
INT80_PATH = "/tmp/vmitrace-wl-int80.dat"
INT80_OPEN_FLAGS = O_WRONLY | O_CREAT | O_TRUNC  # 0x241, the same values in the i386 ABI
INT80_MODE = 0o600
INT80_PAYLOAD = b"vmitrace int 0x80"

# compat32: a 32-bit (i386) static binary whose glibc enters the kernel through the vDSO's
# __kernel_vsyscall (sysenter or 32-bit syscall). mmap2 is a six-argument call whose sixth,
# the page offset, travels on the user stack on those paths.
I386_NR_READ = 3
I386_NR_MUNMAP = 91
I386_NR_MMAP2 = 192
I386_NR_OPENAT = 295
I386_SOURCE_SUFFIX = ".i386.c"
COMPAT32_PATH = "/tmp/vmitrace-wl-compat32.dat"
COMPAT32_WRITE_FLAGS = O_WRONLY | O_CREAT | O_TRUNC  # 0x241 (glibc's open() adds nothing)
COMPAT32_MODE = 0o640
COMPAT32_READ_FLAGS = O_RDONLY
COMPAT32_PAYLOAD = b"vmitrace ia32 fast syscall"
COMPAT32_PAGE_SIZE = 4096
COMPAT32_MAP_LEN = 4096
COMPAT32_MAP_PROT = PROT_READ
COMPAT32_MAP_FLAGS = MAP_SHARED
COMPAT32_MAP_PGOFF = 7  # mmap(..., offset 0x7000) -> mmap2(..., 7)
# `wl-compat32 sleep` instead makes one blocking call: nanosleep of COMPAT32_SLEEP_S seconds.
COMPAT32_SLEEP_ARG = "sleep"
COMPAT32_SLEEP_S = 2
# `wl-compat32 signals` instead has SIGALRM interrupt blocking calls: glibc's pause() (through
# the vDSO) and a read of an empty pipe by `int $0x80`, first with a plain handler (the kernel
# builds the legacy i386 signal frame), then with an SA_SIGINFO one (the rt frame); neither
# restarts, so each call fails with EINTR. The timer repeats every COMPAT32_TICK_US: a tick
# before a call blocks only delays its interruption.
COMPAT32_SIGNALS_ARG = "signals"
COMPAT32_TICK_US = 100_000
I386_NR_PAUSE = 29
EINTR = 4

# signals (`wl-signals`, not run by the driver): SIGUSR1 and SIGUSR2 blocked, sent, then
# both delivered at the return of one rt_sigsuspend, which fails with EINTR. The kernel
# stacks a frame for each; SIGUSR2's handler, on top, runs first.
SIGNALS_BINARY = f"{WORKLOAD_DIR}/wl-signals"
SIGUSR1 = 10
SIGUSR2 = 12
KERNEL_SIGSET_BYTES = 8


def _c_string(value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return '"' + "".join(f"\\x{b:02x}" for b in raw) + '"'


def c_header() -> str:
    """The C header the workloads are compiled with (all values from this module)."""
    lines = [
        "/* Generated from guestlab/workloads/__init__.py at build time. Do not edit. */",
        "#pragma once",
        f"#define WL_EXIT_OK {WORKLOAD_EXIT_OK}",
        f"#define WL_EXIT_MISMATCH {WORKLOAD_EXIT_MISMATCH}",
        f"#define WL_DIR {_c_string(WORKLOAD_DIR)}",
        f"#define WL_STEADY_PERIOD_MS {STEADY_PERIOD_MS}",
        f"#define WL_FILE_PATH {_c_string(FILE_PATH)}",
        f"#define WL_FILE_WRITE_FLAGS 0{FILE_WRITE_FLAGS:o}",
        f"#define WL_FILE_MODE 0{FILE_MODE:o}",
        f"#define WL_FILE_READ_FLAGS 0{FILE_READ_FLAGS:o}",
        f"#define WL_FILE_BYTES {FILE_BYTES}",
        f"#define WL_FILE_PATTERN {_c_string(FILE_PATTERN)}",
        f"#define WL_FILE_PATTERN_LEN {len(FILE_PATTERN)}",
        f"#define WL_EXEC_PATH {_c_string(EXEC_PATH)}",
        "#define WL_EXEC_ARGV { " + ", ".join(_c_string(a) for a in EXEC_ARGV) + ", 0 }",
        "#define WL_EXEC_ENVP { " + ", ".join(_c_string(e) for e in EXEC_ENVP) + ", 0 }",
        f"#define WL_EXEC_EXIT_CODE {EXEC_EXIT_CODE}",
        f"#define WL_ENOENT_PATH {_c_string(ENOENT_PATH)}",
        f"#define WL_ENOENT_FLAGS 0{ENOENT_FLAGS:o}",
        f"#define WL_TCP_ADDRESS {_c_string(TCP_ADDRESS)}",
        f"#define WL_TCP_PORT {TCP_PORT}",
        f"#define WL_TCP_BACKLOG {TCP_BACKLOG}",
        f"#define WL_TCP_PAYLOAD {_c_string(TCP_PAYLOAD)}",
        f"#define WL_TCP_PAYLOAD_LEN {len(TCP_PAYLOAD)}",
        f"#define WL_VMCALL_RAX {VMCALL_RAX:#x}UL",
        f"#define WL_VMCALL_RBX {VMCALL_RBX:#x}UL",
        f"#define WL_VMCALL_RCX {VMCALL_RCX:#x}UL",
        f"#define WL_VMCALL_RDX {VMCALL_RDX:#x}UL",
        f"#define WL_VMCALL_RSI {VMCALL_RSI:#x}UL",
        f"#define WL_VMCALL_INSN_LEN {len(VMCALL_INSN)}",
        f"#define WL_I386_NR_WRITE {I386_NR_WRITE}",
        f"#define WL_I386_NR_OPEN {I386_NR_OPEN}",
        f"#define WL_I386_NR_CLOSE {I386_NR_CLOSE}",
        f"#define WL_I386_NR_GETPID {I386_NR_GETPID}",
        f"#define WL_I386_NR_READ {I386_NR_READ}",
        f"#define WL_INT80_PATH {_c_string(INT80_PATH)}",
        f"#define WL_INT80_OPEN_FLAGS 0{INT80_OPEN_FLAGS:o}",
        f"#define WL_INT80_MODE 0{INT80_MODE:o}",
        f"#define WL_INT80_PAYLOAD {_c_string(INT80_PAYLOAD)}",
        f"#define WL_INT80_PAYLOAD_LEN {len(INT80_PAYLOAD)}",
        f"#define WL_COMPAT32_PATH {_c_string(COMPAT32_PATH)}",
        f"#define WL_COMPAT32_WRITE_FLAGS 0{COMPAT32_WRITE_FLAGS:o}",
        f"#define WL_COMPAT32_MODE 0{COMPAT32_MODE:o}",
        f"#define WL_COMPAT32_READ_FLAGS 0{COMPAT32_READ_FLAGS:o}",
        f"#define WL_COMPAT32_PAYLOAD {_c_string(COMPAT32_PAYLOAD)}",
        f"#define WL_COMPAT32_PAYLOAD_LEN {len(COMPAT32_PAYLOAD)}",
        f"#define WL_COMPAT32_PAGE_SIZE {COMPAT32_PAGE_SIZE}",
        f"#define WL_COMPAT32_MAP_LEN {COMPAT32_MAP_LEN}",
        f"#define WL_COMPAT32_MAP_PROT {COMPAT32_MAP_PROT:#x}",
        f"#define WL_COMPAT32_MAP_FLAGS {COMPAT32_MAP_FLAGS:#x}",
        f"#define WL_COMPAT32_MAP_PGOFF {COMPAT32_MAP_PGOFF}",
        f"#define WL_COMPAT32_SLEEP_ARG {_c_string(COMPAT32_SLEEP_ARG)}",
        f"#define WL_COMPAT32_SLEEP_S {COMPAT32_SLEEP_S}",
        f"#define WL_COMPAT32_SIGNALS_ARG {_c_string(COMPAT32_SIGNALS_ARG)}",
        f"#define WL_COMPAT32_TICK_US {COMPAT32_TICK_US}",
        f"#define WL_EINTR {EINTR}",
        f"#define WL_KERNEL_SIGSET_BYTES {KERNEL_SIGSET_BYTES}",
        "#define WL_NAMES { " + ", ".join(_c_string(n) for n in WORKLOADS) + ", 0 }",
    ]
    return "\n".join(lines) + "\n"


def c_sources() -> list[Path]:
    """The C sources, one static binary each (wl-<name>.c, wl-<name>.i386.c and the driver
    workload.c)."""
    return sorted(SOURCE_DIR.glob("*.c"))


def binary_name(source: Path) -> str:
    """The binary a source compiles to (its name without ``.c`` or ``.i386.c``)."""
    return source.name.removesuffix(I386_SOURCE_SUFFIX).removesuffix(".c")


def is_i386(source: Path) -> bool:
    """Whether a source is a 32-bit program (``gcc -m32``)."""
    return source.name.endswith(I386_SOURCE_SUFFIX)
