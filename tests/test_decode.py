"""tracer.decode on guest memory images built here: exact values, bounds, hostile layouts."""
from __future__ import annotations

import json
import socket
import struct

from test_memory_support import GuestImage
from tracer.decode import Limits, SyscallDecoder, SyscallInfo
from tracer.decode import consts as c
from tracer.decode.syscalls import NOT_READ_BEFORE_EXIT, RETURN_VALUE, CaptureSpec
from tracer.kvmi.events import PointerCapture
from tracer.memory import CapturedMemory, UnreadableMemory

# Prototypes as the kernel's syscall_metadata spells them (x86-64 numbers).
TABLE = {
    0: SyscallInfo(0, "read", (("unsigned int", "fd"), ("char *", "buf"), ("size_t", "count"))),
    1: SyscallInfo(1, "write", (("unsigned int", "fd"), ("const char *", "buf"),
                                ("size_t", "count"))),
    4: SyscallInfo(4, "stat", (("const char *", "filename"), ("struct __old_kernel_stat *",
                                                               "statbuf"))),
    9: SyscallInfo(9, "mmap", (("unsigned long", "addr"), ("unsigned long", "len"),
                               ("unsigned long", "prot"), ("unsigned long", "flags"),
                               ("unsigned long", "fd"), ("unsigned long", "off"))),
    22: SyscallInfo(22, "pipe", (("int *", "fildes"),)),
    41: SyscallInfo(41, "socket", (("int", "family"), ("int", "type"), ("int", "protocol"))),
    42: SyscallInfo(42, "connect", (("int", "fd"), ("struct sockaddr *", "uservaddr"),
                                    ("int", "addrlen"))),
    43: SyscallInfo(43, "accept", (("int", "fd"), ("struct sockaddr *", "upeer_sockaddr"),
                                   ("int *", "upeer_addrlen"))),
    56: SyscallInfo(56, "clone", (("unsigned long", "clone_flags"), ("unsigned long", "newsp"),
                                  ("int *", "parent_tidptr"), ("int *", "child_tidptr"),
                                  ("unsigned long", "tls"))),
    59: SyscallInfo(59, "execve", (("const char *", "filename"),
                                   ("const char *const *", "argv"),
                                   ("const char *const *", "envp"))),
    61: SyscallInfo(61, "wait4", (("pid_t", "upid"), ("int *", "stat_addr"), ("int", "options"),
                                  ("struct rusage *", "ru"))),
    62: SyscallInfo(62, "kill", (("pid_t", "pid"), ("int", "sig"))),
    257: SyscallInfo(257, "openat", (("int", "dfd"), ("const char *", "filename"),
                                     ("int", "flags"), ("umode_t", "mode"))),
    46: SyscallInfo(46, "sendmsg", (("int", "fd"), ("struct user_msghdr *", "msg"),
                                    ("unsigned int", "flags"))),
    47: SyscallInfo(47, "recvmsg", (("int", "fd"), ("struct user_msghdr *", "msg"),
                                    ("unsigned int", "flags"))),
    332: SyscallInfo(332, "statx", (("int", "dfd"), ("const char *", "filename"),
                                    ("unsigned", "flags"), ("unsigned int", "mask"),
                                    ("struct statx *", "buffer"))),
    435: SyscallInfo(435, "clone3", (("struct clone_args *", "uargs"), ("size_t", "size"))),
    999: SyscallInfo(999, "madeup", (("int", "a"), ("unsigned long", "b"))),
}
U = 0x0000_7FFF_0000_0000


def setup():
    img = GuestImage()
    img.map_new(U, 8)
    return img, SyscallDecoder(TABLE)


def args_by_name(call):
    return {a["name"]: a for a in call.args}


def test_openat_exact_values_and_returned_fd():
    img, dec = setup()
    img.write(U, b"/tmp/vmitrace-wl-file.dat\0")
    call = dec.decode_entry(img.mem, img.cr3, 257, [(-100) & (2**64 - 1), U, 0o1101, 0o644, 0, 0])
    a = args_by_name(call)
    assert a["dfd"]["value"] == "AT_FDCWD"
    assert a["filename"]["value"] == "/tmp/vmitrace-wl-file.dat"
    assert a["flags"]["value"] == "O_WRONLY|O_CREAT|O_TRUNC"
    assert a["mode"]["value"] == "0644"
    dec.decode_exit(img.mem, img.cr3, call, 3)
    assert call.ret == 3 and call.errno is None
    assert call.typed == {"path": "/tmp/vmitrace-wl-file.dat", "flags": "O_WRONLY|O_CREAT|O_TRUNC",
                          "mode": 0o644, "fd": 3}


def test_failed_open_carries_errno_name():
    img, dec = setup()
    img.write(U, b"/nonexistent/x\0")
    call = dec.decode_entry(img.mem, img.cr3, 257, [2**64 - 100, U, 0, 0, 0, 0])
    dec.decode_exit(img.mem, img.cr3, call, 2**64 - 2)
    assert call.ret == -2 and call.errno == "ENOENT"
    assert dec.render_ret(call) == "-1 ENOENT"
    assert "fd" not in call.typed


def test_unreadable_path_is_flagged_then_read_again_at_exit():
    img, dec = setup()
    path_gva = U + 0x10_0000  # not mapped yet: like a page the kernel faults in on copy
    call = dec.decode_entry(img.mem, img.cr3, 257, [2**64 - 100, path_gva, 0, 0, 0, 0])
    assert args_by_name(call)["filename"]["error"].startswith("unreadable at 0x7fff00100000")
    assert call.retry == [1]
    img.map_new(path_gva)
    img.write(path_gva, b"/late\0")
    dec.decode_exit(img.mem, img.cr3, call, 4)
    assert args_by_name(call)["filename"]["value"] == "/late"
    assert args_by_name(call)["filename"]["error"] is None
    assert call.typed["path"] == "/late"


def test_long_path_is_truncated_and_counted():
    img = GuestImage()
    img.map_new(U, 8)
    dec = SyscallDecoder(TABLE, Limits(max_string=100))
    img.write(U, b"a" * 5000 + b"\0")
    call = dec.decode_entry(img.mem, img.cr3, 257, [0, U, 0, 0, 0, 0])
    f = args_by_name(call)["filename"]
    assert f["truncated"] and len(f["value"]) == 100 and f["error"] is None
    assert dec.counters.truncated == 1


def test_write_buffer_preview_bounded_and_read_buffer_at_exit():
    img, dec = setup()
    img.write(U, b"hello\nworld" + b"x" * 100)
    w = dec.decode_entry(img.mem, img.cr3, 1, [1, U, 3000])
    buf = args_by_name(w)["buf"]
    assert buf["value"].startswith("hello\\nworld") and len(buf["value"]) < 80 and buf["truncated"]
    dec.decode_exit(img.mem, img.cr3, w, 3000)
    assert w.ret == 3000 and w.typed["fd"] == 1

    r = dec.decode_entry(img.mem, img.cr3, 0, [3, U, 4096])
    assert args_by_name(r)["buf"]["value"] == hex(U)  # nothing read yet at entry
    dec.decode_exit(img.mem, img.cr3, r, 5)
    assert args_by_name(r)["buf"]["value"] == "hello" and not args_by_name(r)["buf"]["truncated"]


def test_mmap_prot_and_flags():
    img, dec = setup()
    call = dec.decode_entry(img.mem, img.cr3, 9, [0, 8192, 3, 0x22, 2**64 - 1, 0])
    a = args_by_name(call)
    assert a["prot"]["value"] == "PROT_READ|PROT_WRITE"
    assert a["flags"]["value"] == "MAP_PRIVATE|MAP_ANONYMOUS"
    assert a["fd"]["value"] == "-1"
    dec.decode_exit(img.mem, img.cr3, call, 0x7F00_0000_0000)
    assert dec.render_ret(call) == "0x7f0000000000"


def test_clone_flags_with_exit_signal():
    img, dec = setup()
    flags = 0x01200000 | 17  # CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD (fork)
    call = dec.decode_entry(img.mem, img.cr3, 56, [flags, 0, 0, 0, 0])
    assert args_by_name(call)["clone_flags"]["value"] == \
        "CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD"


def test_socket_and_connect_inet():
    img, dec = setup()
    s = dec.decode_entry(img.mem, img.cr3, 41, [2, 1 | 0o2000000, 0])
    assert [a["value"] for a in s.args] == ["AF_INET", "SOCK_STREAM|SOCK_CLOEXEC", "IPPROTO_IP"]
    sa = struct.pack("<H", 2) + struct.pack(">H", 40123) + socket.inet_aton("127.0.0.1") + bytes(8)
    img.write(U, sa)
    call = dec.decode_entry(img.mem, img.cr3, 42, [3, U, 16])
    assert args_by_name(call)["uservaddr"]["value"] == "AF_INET 127.0.0.1:40123"
    dec.decode_exit(img.mem, img.cr3, call, 2**64 - 111)
    assert call.errno == "ECONNREFUSED"
    assert call.typed["remote_addr"] == "127.0.0.1" and call.typed["remote_port"] == 40123


def test_sockaddr_inet6_and_unix_and_abstract():
    img, dec = setup()
    sa6 = struct.pack("<H", 10) + struct.pack(">H", 443) + bytes(4) + \
        socket.inet_pton(socket.AF_INET6, "::1") + bytes(4)
    img.write(U, sa6)
    call = dec.decode_entry(img.mem, img.cr3, 42, [3, U, 28])
    assert args_by_name(call)["uservaddr"]["value"] == "AF_INET6 [::1]:443"
    img.write(U + 0x100, struct.pack("<H", 1) + b"/run/sock\0")
    call = dec.decode_entry(img.mem, img.cr3, 42, [3, U + 0x100, 12])
    assert args_by_name(call)["uservaddr"]["value"] == "AF_UNIX /run/sock"
    img.write(U + 0x200, struct.pack("<H", 1) + b"\0abs")
    call = dec.decode_entry(img.mem, img.cr3, 42, [3, U + 0x200, 6])
    assert args_by_name(call)["uservaddr"]["value"] == "AF_UNIX @abs"


def test_hostile_sockaddr_length_is_bounded():
    img, dec = setup()
    img.write(U, struct.pack("<H", 1) + b"x" * 200)
    call = dec.decode_entry(img.mem, img.cr3, 42, [3, U, 0x7FFF_FFFF])
    arg = args_by_name(call)["uservaddr"]
    assert arg["truncated"] and len(arg["value"]) <= 140


def test_accept_peer_read_at_exit():
    img, dec = setup()
    call = dec.decode_entry(img.mem, img.cr3, 43, [3, U, U + 0x100])
    sa = struct.pack("<H", 2) + struct.pack(">H", 5555) + socket.inet_aton("10.1.2.3") + bytes(8)
    img.write(U, sa)
    img.write(U + 0x100, struct.pack("<I", 16))
    dec.decode_exit(img.mem, img.cr3, call, 4)
    assert args_by_name(call)["upeer_sockaddr"]["value"] == "AF_INET 10.1.2.3:5555"
    assert call.typed["fd"] == 4 and call.typed["remote_port"] == 5555


def test_execve_argv_envp_exact_and_bounded():
    img, dec = setup()
    strings = [b"/bin/busybox", b"sh", b"-c", b"exit 42"]
    base = U + 0x1000
    ptrs = []
    off = 0
    for s in strings:
        img.write(base + off, s + b"\0")
        ptrs.append(base + off)
        off += len(s) + 1
    for i, p in enumerate(ptrs + [0]):
        img.write_u64(U + i * 8, p)
    img.write_u64(U + 0x800, 0)  # empty envp
    call = dec.decode_entry(img.mem, img.cr3, 59, [ptrs[0], U, U + 0x800])
    assert call.typed["path"] == "/bin/busybox"
    # argv and envp wait for the exit; a failed execve leaves them in the caller's memory
    assert call.at_exit == [1, 2] and call.argv is None
    assert args_by_name(call)["argv"]["error"] == NOT_READ_BEFORE_EXIT
    dec.decode_exit(img.mem, img.cr3, call, -13)
    assert call.argv == ["/bin/busybox", "sh", "-c", "exit 42"]
    assert json.loads(args_by_name(call)["argv"]["value"]) == call.argv
    assert args_by_name(call)["envp"]["value"] == "[]" and call.at_exit == []


def test_execve_success_takes_argv_and_envp_from_the_new_stack_within_bounds():
    img, dec = setup()
    dec = SyscallDecoder(TABLE, Limits(max_argv=3, max_argv_string=4))
    img.write(U + 0x100, b"/bin/sh\0")
    call = dec.decode_entry(img.mem, img.cr3, 59, [U + 0x100, U, U + 0x800])
    dec.decode_exit(img.mem, img.cr3, call, 0)  # success: the caller's memory is gone
    assert call.at_exit == [1, 2]
    dec.complete_exec(call, {"argv": (["sh", "-c", "", "x"], False),
                             "envp": (["A=1", "LONGER=2"], False)})
    argv, envp = args_by_name(call)["argv"], args_by_name(call)["envp"]
    assert call.argv == ["sh", "-c", ""] and argv["truncated"] and argv["error"] is None
    assert json.loads(envp["value"]) == ["A=1", "LONG"] and envp["truncated"]
    assert args_by_name(call)["filename"]["value"] == "/bin/sh"  # read at entry: kept


def test_execve_success_without_a_readable_new_stack_flags_argv():
    img, dec = setup()
    call = dec.decode_entry(img.mem, img.cr3, 59, [0, U, 0])
    dec.decode_exit(img.mem, img.cr3, call, 0)
    dec.complete_exec(call, {})
    assert args_by_name(call)["argv"]["error"] == "unreadable on the new stack"
    assert args_by_name(call)["envp"]["value"] == "NULL"  # NULL: nothing left to read


def test_execve_argv_without_terminator_is_cut():
    img = GuestImage()
    img.map_new(U, 8)
    dec = SyscallDecoder(TABLE, Limits(max_argv=5))
    img.write(U + 0x1000, b"x\0")
    for i in range(512):  # a page full of pointers and no NULL
        img.write_u64(U + i * 8, U + 0x1000)
    call = dec.decode_entry(img.mem, img.cr3, 59, [U + 0x1000, U, 0])
    dec.decode_exit(img.mem, img.cr3, call, -2)
    assert call.argv == ["x"] * 5 and args_by_name(call)["argv"]["truncated"]


def test_execve_argv_pointing_to_unmapped_string_is_flagged():
    img, dec = setup()
    img.write_u64(U, U + 0x50_0000)
    img.write_u64(U + 8, 0)
    call = dec.decode_entry(img.mem, img.cr3, 59, [0, U, 0])
    dec.decode_exit(img.mem, img.cr3, call, -2)
    arg = args_by_name(call)["argv"]
    assert arg["error"].startswith("unreadable") and call.retry == []  # never retried


def test_pipe_fds_and_stat_out_and_wait_status():
    img, dec = setup()
    call = dec.decode_entry(img.mem, img.cr3, 22, [U])
    img.write(U, struct.pack("<ii", 3, 4))
    dec.decode_exit(img.mem, img.cr3, call, 0)
    assert call.args[0]["value"] == "[3, 4]"

    img.write(U + 0x200, b"/etc\0")
    st = struct.pack("<QQQIII4xQqqq", 1, 77, 2, 0o100644, 0, 0, 0, 3000, 4096, 8) + bytes(48)
    img.write(U + 0x400, st)
    call = dec.decode_entry(img.mem, img.cr3, 4, [U + 0x200, U + 0x400])
    dec.decode_exit(img.mem, img.cr3, call, 0)
    assert args_by_name(call)["statbuf"]["value"] == \
        "{st_mode=S_IFREG|0644, st_size=3000, st_ino=77, st_uid=0, st_gid=0}"

    call = dec.decode_entry(img.mem, img.cr3, 61, [2**64 - 1, U + 0x800, 0, 0])
    img.write(U + 0x800, struct.pack("<i", 42 << 8))
    dec.decode_exit(img.mem, img.cr3, call, 77)
    assert args_by_name(call)["stat_addr"]["value"] == "[{WIFEXITED(s) && WEXITSTATUS(s) == 42}]"
    assert args_by_name(call)["upid"]["value"] == "-1"


def test_out_params_not_read_on_failure():
    img, dec = setup()
    call = dec.decode_entry(img.mem, img.cr3, 22, [U + 0x70_0000])
    dec.decode_exit(img.mem, img.cr3, call, 2**64 - 24)
    assert call.errno == "EMFILE" and call.args[0]["error"] is None


def test_unreadable_out_param_is_flagged():
    img, dec = setup()
    call = dec.decode_entry(img.mem, img.cr3, 22, [U + 0x70_0000])
    dec.decode_exit(img.mem, img.cr3, call, 0)
    assert call.args[0]["error"] == "unreadable at 0x7fff00700000"


def test_kill_signal_and_fallbacks_by_type():
    img, dec = setup()
    call = dec.decode_entry(img.mem, img.cr3, 62, [1234, 9])
    assert [a["value"] for a in call.args] == ["1234", "SIGKILL"]
    assert call.typed["target_pid"] == 1234 and call.typed["signal"] == "SIGKILL"
    call = dec.decode_entry(img.mem, img.cr3, 999, [2**64 - 5, 2**64 - 1])
    assert [a["value"] for a in call.args] == ["-5", str(2**64 - 1)]
    unknown = dec.decode_entry(img.mem, img.cr3, 4242, [1, 2, 3, 4, 5, 6])
    assert unknown.name == "syscall_4242" and len(unknown.args) == 6


def test_flag_renderers():
    assert c.open_flags(0o2000000 | 0o200000) == "O_RDONLY|O_DIRECTORY|O_CLOEXEC"
    assert c.open_flags(0o20200002) == "O_RDWR|O_TMPFILE"
    assert c.render_flags(0x1 | 0x40000000, c.PROT_FLAGS) == "PROT_READ|0x40000000"
    assert c.access_mode(0) == "F_OK" and c.access_mode(6) == "R_OK|W_OK"
    assert c.signal_name(34) == "SIGRTMIN+2"
    assert c.file_mode(0o40755) == "S_IFDIR|0755"
    assert c.errno_name(-2) == "ENOENT" and c.errno_name(-4096) is None
    assert c.futex_op(128 | 1) == "FUTEX_WAKE_PRIVATE"


def test_clone3_args_struct():
    img, dec = setup()
    flags = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000 | 0x80000 | 0x100000 | 0x200000
    img.write(U, struct.pack("<QQQQQQQQ", flags, 0, 0, 0, 0, 0x7F00_0000, 0x800000, 0x7F80_0000))
    call = dec.decode_entry(img.mem, img.cr3, 435, [U, 88])
    value = args_by_name(call)["uargs"]["value"]
    assert value.startswith("{flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|")
    assert "exit_signal=0" in value and "stack_size=0x800000" in value
    assert call.typed["flags"].startswith("CLONE_VM|")


def test_statx_out():
    img, dec = setup()
    img.write(U, b"/etc/passwd\0")
    call = dec.decode_entry(img.mem, img.cr3, 332, [2**64 - 100, U, 0x100, 0xFFF, U + 0x400])
    img.write(U + 0x400, struct.pack("<IIQIIIH2xQQ", 0xFFF, 4096, 0, 1, 1000, 100, 0o100600,
                                     4242, 77))
    dec.decode_exit(img.mem, img.cr3, call, 0)
    assert args_by_name(call)["buffer"]["value"] == \
        "{stx_mode=S_IFREG|0600, stx_size=77, stx_ino=4242, stx_uid=1000, stx_gid=100}"
    assert args_by_name(call)["flags"]["value"] == "AT_SYMLINK_NOFOLLOW"


def test_sendmsg_and_recvmsg_names():
    img, dec = setup()
    sa = struct.pack("<H", 2) + struct.pack(">H", 53) + socket.inet_aton("10.0.0.53") + bytes(8)
    img.write(U + 0x100, sa)
    img.write(U, struct.pack("<Qi4xQQQQi", U + 0x100, 16, U + 0x200, 1, 0, 0, 0))
    call = dec.decode_entry(img.mem, img.cr3, 46, [3, U, 0])
    assert args_by_name(call)["msg"]["value"] == "{msg_name=AF_INET 10.0.0.53:53, msg_iovlen=1}"
    assert call.typed["remote_port"] == 53
    r = dec.decode_entry(img.mem, img.cr3, 47, [3, U, 0])
    dec.decode_exit(img.mem, img.cr3, r, 40)
    assert r.typed["remote_addr"] == "10.0.0.53"


# -- ia32 (`int $0x80`) calls: the i386 ABI table, values cut to 32 bits ---------------------
L = 0x0060_0000  # a 32-bit caller's address (below 4 GiB)


def ia32_setup(limits=None):
    from profiles.syscalls import i386_abi
    from tracer.decode import ia32_syscall_table
    img = GuestImage()
    img.map_new(L, 8)
    return img, SyscallDecoder(ia32_syscall_table(i386_abi(), TABLE), limits, compat32=True)


def test_ia32_table_names_and_shared_prototypes():
    _, dec = ia32_setup()
    assert [dec.name(nr) for nr in (1, 3, 4, 5, 11, 20, 90, 252, 295)] == [
        "exit", "read", "write", "open", "execve", "getpid", "mmap", "exit_group", "openat"]
    assert dec.syscalls[4].prototype == TABLE[1].prototype  # write: x86-64's prototype
    assert dec.syscalls[90].prototype is None  # old_mmap (a struct pointer): raw arguments
    assert dec.number("restart_syscall") == 0


def test_ia32_write_masks_registers_and_decodes_like_x86_64():
    img, dec = ia32_setup()
    img.write(L, b"vmitrace int 0x80")
    high = 0xDEAD_BEEF_0000_0000  # upper register halves a 64-bit caller left: not seen
    assert dec.name(high | 4) == "write"
    call = dec.decode_entry(img.mem, img.cr3, high | 4, [high | 3, high | L, high | 17, 0, 0, 0])
    assert call.name == "write" and call.nr == 4 and call.raw_args == (3, L, 17)
    assert [a["value"] for a in call.args] == ["3", "vmitrace int 0x80", "17"]
    assert call.typed == {"fd": 3, "length": 17}
    dec.decode_exit(img.mem, img.cr3, call, 17)
    assert call.ret == 17 and call.errno is None


def test_ia32_return_values_are_32_bit():
    img, dec = ia32_setup()
    call = dec.decode_entry(img.mem, img.cr3, 5, [L, 0, 0, 0, 0, 0])
    dec.decode_exit(img.mem, img.cr3, call, (-2) & (2**64 - 1))
    assert call.ret == -2 and call.errno == "ENOENT"
    call = dec.decode_entry(img.mem, img.cr3, 192, [0] * 6)  # mmap2: an address above 2 GiB
    dec.decode_exit(img.mem, img.cr3, call, 0xF7F0_0000)
    assert call.ret == 0xF7F0_0000 and call.errno is None


def test_ia32_signed_long_is_32_bit():
    img, dec = ia32_setup()
    table = {**dec.syscalls, 999: SyscallInfo(999, "madeup", (("long", "a"), ("int", "b")))}
    dec = SyscallDecoder(table, compat32=True)
    call = dec.decode_entry(img.mem, img.cr3, 999, [0xFFFF_FFFF, 0xFFFF_FFFE, 0, 0, 0, 0])
    assert [a["value"] for a in call.args] == ["-1", "-2"]


def test_ia32_execve_reads_32_bit_pointer_arrays():
    img, dec = ia32_setup()
    strings = [b"/bin/busybox", b"sh", b"-c", b"exit 42"]
    ptrs, off = [], 0
    for s in strings:
        img.write(L + 0x1000 + off, s + b"\0")
        ptrs.append(L + 0x1000 + off)
        off += len(s) + 1
    img.write(L, b"".join(struct.pack("<I", p) for p in ptrs + [0]))
    img.write(L + 0x800, bytes(4))
    call = dec.decode_entry(img.mem, img.cr3, 11, [ptrs[0], L, L + 0x800, 0, 0, 0])
    dec.decode_exit(img.mem, img.cr3, call, -2)
    assert call.argv == ["/bin/busybox", "sh", "-c", "exit 42"]
    assert args_by_name(call)["envp"]["value"] == "[]"


def test_ia32_pointer_array_without_terminator_is_cut():
    img, dec = ia32_setup(Limits(max_argv=5))
    img.write(L + 0x1000, b"x\0")
    img.write(L, struct.pack("<I", L + 0x1000) * 1024)  # a page full of pointers, no NULL
    call = dec.decode_entry(img.mem, img.cr3, 11, [L + 0x1000, L, 0, 0, 0, 0])
    dec.decode_exit(img.mem, img.cr3, call, -2)
    assert call.argv == ["x"] * 5 and args_by_name(call)["argv"]["truncated"]


def test_ia32_unknown_prototype_and_number_give_raw_arguments():
    img, dec = ia32_setup()
    call = dec.decode_entry(img.mem, img.cr3, 102, [1, L, 0, 0, 0, 1 << 40])  # socketcall
    assert call.name == "socketcall" and call.raw_args == (1, L, 0, 0, 0, 0)
    assert [a["value"] for a in call.args] == ["0x1", hex(L), "0x0", "0x0", "0x0", "0x0"]
    dec.decode_exit(img.mem, img.cr3, call, 0)
    assert call.ret == 0
    assert dec.decode_entry(img.mem, img.cr3, 4000, [0] * 6).name == "syscall_4000"


def test_ia32_argument_whose_value_could_not_be_read_is_flagged():
    """The fast ia32 entries' sixth argument comes from the user stack: unreadable, its raw
    value is unknown (0 stands in) and the argument says why, decoded or raw."""
    img, dec = ia32_setup()
    img.write(L, b"/tmp/x\0")
    table = {**dec.syscalls, 999: SyscallInfo(999, "six", tuple(("int", f"a{i}") for i in range(6)))}
    dec = SyscallDecoder(table, compat32=True)
    call = dec.decode_entry(img.mem, img.cr3, 999, [1, 2, 3, 4, 5, 0], {5: "unreadable at 0x10"})
    assert [a["value"] for a in call.args] == ["1", "2", "3", "4", "5", "?"]
    assert [a["error"] for a in call.args] == [None] * 5 + ["unreadable at 0x10"]
    assert call.retry == []  # nothing to read again at exit: the value itself is unknown
    call = dec.decode_entry(img.mem, img.cr3, 192, [0, 4096, 1, 1, 3, 0], {5: "unreadable"})
    assert call.name == "mmap2" and [a["error"] for a in call.args][4:] == [None, "unreadable"]
    assert call.args[5]["value"] == "?" and call.args[4]["value"] == "0x3"


def test_which_calls_read_guest_memory():
    """What lets a call's exit run on: its decoding needs nothing but registers."""
    _, dec = setup()
    reads = {nr: dec.reads_memory(nr) for nr in TABLE}
    assert {nr for nr, yes in reads.items() if yes} == {0, 1, 4, 22, 42, 43, 46, 47, 59, 61, 257,
                                                        332, 435}
    assert not dec.reads_memory(12345)  # not in the table: raw registers only


# -- decoding from a host's pointer captures (VMITRACE_SET_CAPTURE_TABLE) --------------------

def host_capture(img, spec, raw_args, ret=0):
    """What a vmitrace host copies for `spec` at a hit (docs/kvmi-vendor-extension.md): the
    bounded bytes at the argument's address, cut after the first NUL for strings, stopped
    (faulted) at the first byte it cannot translate."""
    gva = raw_args[spec.pos]
    if spec.length_pos is None:
        want = spec.max_length
    elif spec.length_pos == RETURN_VALUE:
        want = 0 if ret >= 2**63 else min(ret, spec.max_length)
    else:
        want = min(raw_args[spec.length_pos], spec.max_length)
    data = bytearray()
    faulted = gva == 0
    while not faulted and len(data) < want:
        addr = gva + len(data)
        chunk = min(want - len(data), 0x1000 - (addr & 0xFFF))
        try:
            data += img.mem.read_virtual(img.cr3, addr, chunk)
        except UnreadableMemory:
            faulted = True
        if spec.string and b"\0" in data:
            del data[data.index(b"\0") + 1:]
            break
    return PointerCapture(gva, bytes(data), faulted)


def decoded(call):
    return call.args, call.typed, call.ret, call.errno


def decode_from_captures(img, dec, nr, raw, ret, scribble):
    """Decode call `nr` from captures taken at its entry and exit, after `scribble` changed
    the guest's memory (the caller ran on); returns the call and the CapturedMemory reads
    that went to live memory."""
    entry_specs, exit_specs = dec.capture_plan(nr)
    at_entry = CapturedMemory(img.mem, [host_capture(img, s, raw) for s in entry_specs])
    call = dec.decode_entry(at_entry, img.cr3, nr, raw)
    at_exit = CapturedMemory(img.mem, [host_capture(img, s, raw, ret) for s in exit_specs])
    scribble()
    dec.decode_exit(at_exit, img.cr3, call, ret)
    return call, at_entry.live_reads + at_exit.live_reads


def test_captured_calls_decode_as_live_reads_did_before_the_caller_ran_on():
    img, dec = setup()
    img.write(U, b"/tmp/vmitrace-wl-file.dat\0")
    img.write(U + 0x100, b"hello\nworld" + b"x" * 100)
    img.write(U + 0x300, struct.pack("<HH4s8x", socket.AF_INET, socket.htons(7777),
                                     socket.inet_aton("127.0.0.1")))
    img.write(U + 0x400, struct.pack("<ii", 5, 6))
    img.write(U + 0x500, struct.pack("<QQQIII4xQqqq", 1, 42, 1, 0o100644, 0, 0, 0, 12, 4096, 1))
    img.write(U + 0x600, struct.pack("<I", 3 << 8))
    img.write(U + 0x8000 - 2, b"ab")  # a string running into an unmapped page
    calls = [(257, [2**64 - 100, U, 0o1101, 0o644, 0, 0], 3),
             (257, [2**64 - 100, U + 0x8000 - 2, 0, 0, 0, 0], 2**64 - 14),
             (257, [2**64 - 100, 0, 0, 0, 0, 0], 2**64 - 14),
             (1, [1, U + 0x100, 3000], 3000), (1, [1, U + 0x100, 5], 5),
             (0, [3, U + 0x100, 4096], 7), (0, [3, U + 0x100, 4096], 2**64 - 11),
             (42, [3, U + 0x300, 16], 0), (22, [U + 0x400], 0), (4, [U, U + 0x500], 0),
             (61, [2**64 - 1, U + 0x600, 0, 0], 77), (9, [0, 8192, 3, 0x22, 2**64 - 1, 0], U)]
    pristine = bytes(img.ram)
    for nr, raw, ret in calls:
        live = dec.decode_exit(img.mem, img.cr3, dec.decode_entry(img.mem, img.cr3, nr, raw), ret)

        def scribble():
            for gva in (U, U + 0x100, U + 0x300, U + 0x400, U + 0x500, U + 0x600):
                img.write(gva, b"\xee" * 0x80)
        call, live_reads = decode_from_captures(img, dec, nr, raw, ret, scribble)
        assert decoded(call) == decoded(live), dec.name(nr)
        assert live_reads == 0, dec.name(nr)
        img.ram[:] = pristine


def test_captured_strings_keep_the_live_bounds_and_faults():
    img = GuestImage()
    img.map_new(U, 2)
    dec = SyscallDecoder(TABLE, Limits(max_string=100))
    for text in (b"a" * 99, b"a" * 100, b"a" * 101, b"a" * 500):
        img.write(U, text + b"\0")
        raw = [0, U, 0, 0, 0, 0]
        live = dec.decode_exit(img.mem, img.cr3, dec.decode_entry(img.mem, img.cr3, 257, raw), 3)
        call, live_reads = decode_from_captures(img, dec, 257, raw, 3, lambda: None)
        assert decoded(call) == decoded(live) and live_reads == 0
        assert args_by_name(call)["filename"]["truncated"] == (len(text) > 100)


def test_a_read_no_capture_holds_goes_live_and_is_counted():
    img, dec = setup()
    img.write(U, b"/etc/passwd\0")
    mem = CapturedMemory(img.mem, [PointerCapture(U + 0x800, b"other\0", False)])
    call = dec.decode_entry(mem, img.cr3, 257, [0, U, 0, 0, 0, 0])
    assert args_by_name(call)["filename"]["value"] == "/etc/passwd"
    assert mem.live_reads == 1


def test_capture_plan_covers_bounded_arguments_and_refuses_the_rest():
    _img, dec = setup()
    assert dec.capture_plan(257) == ([CaptureSpec(1, 4097, string=True)],
                                     [CaptureSpec(1, 4097, string=True)])
    assert dec.capture_plan(0) == ([], [CaptureSpec(1, 64, length_pos=RETURN_VALUE)])
    assert dec.capture_plan(1) == ([CaptureSpec(1, 64, length_pos=2)],
                                   [CaptureSpec(1, 64, length_pos=2)])
    assert dec.capture_plan(9) == ([], [])  # registers alone
    for name in ("execve", "accept", "sendmsg", "recvmsg"):  # argv, sockaddr_out, msghdr
        assert dec.capture_plan(dec.number(name)) is None, name


def test_adjacent_captures_each_answer_their_own_string():
    """mount's strings often lie back to back: the end of one capture is the start of the
    next, and each string comes from its own."""
    img, dec = setup()
    mem = CapturedMemory(img.mem, [PointerCapture(U, b"devpts\0", False),
                                   PointerCapture(U + 7, b"/dev/pts\0", False)])
    assert mem.read_cstring(img.cr3, U + 7).data == b"/dev/pts"
    assert mem.read_cstring(img.cr3, U).data == b"devpts"
    assert mem.read_virtual(img.cr3, U + 7, 4) == b"/dev" and mem.live_reads == 0
