"""Shared helpers of the profile tests (no test functions here).

Kernels come from guestlab.build.ensure (Debian's packages); each ISF is built once per test
session and kept in a per-session directory. The independent oracles live here too:
decompression with the system's xz/zstd tools and BTF reading with Debian's bpftool.
"""
from __future__ import annotations

import atexit
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

KERNELS = ("6.1", "6.12")
_WORK = Path(tempfile.mkdtemp(prefix="vmitrace-profile-tests-"))
atexit.register(shutil.rmtree, _WORK, True)  # unpacked kernels and RAM dumps are large

# Structs whose offsets the acceptance criteria name.
CHECKED_STRUCTS = ("task_struct", "mm_struct", "files_struct", "fdtable", "file", "path", "dentry",
                   "qstr", "cred", "pt_regs")


def work_dir() -> Path:
    return _WORK


@lru_cache(maxsize=None)
def lab_build(kernel: str):  # type: ignore[no-untyped-def]
    import guestlab

    return guestlab.build.ensure(kernel, refresh=False)


@lru_cache(maxsize=None)
def image_isf(kernel: str) -> tuple[dict, Path]:
    """(ISF dict, path of its .json.xz) built from the lab kernel's vmlinuz, once per session."""
    from profiles import isf
    from profiles.build import build_from_image

    result = build_from_image(str(lab_build(kernel).vmlinuz))
    return result, isf.write(result, _WORK / f"image-{kernel}.json.xz")


def without_provenance(isf_dict: dict) -> dict:
    out = dict(isf_dict)
    out["symbols"] = {k: v for k, v in isf_dict["symbols"].items() if k != "vmitrace.provenance"}
    return out


@lru_cache(maxsize=None)
def vmlinux_by_system_tools(kernel: str) -> Path:
    """The vmlinux inside the lab vmlinuz, unpacked with the system's xz / zstd (not vmitrace)."""
    data = lab_build(kernel).vmlinuz.read_bytes()
    for magic, argv in ((b"\xfd7zXZ\x00", ["xz", "-dc"]), (b"\x28\xb5\x2f\xfd", ["zstd", "-dcq"])):
        pos = data.find(magic)
        if pos > 0:
            # The tools stop at the end of the stream and complain about the trailing size word.
            proc = subprocess.run(argv, input=data[pos:], capture_output=True)
            out = proc.stdout
            if out[:4] == b"\x7fELF":
                path = _WORK / f"vmlinux-{kernel}"
                path.write_bytes(out)
                return path
    raise AssertionError(f"could not unpack {kernel} vmlinuz with the system tools")


@lru_cache(maxsize=None)
def bpftool_structs(kernel: str) -> dict[str, tuple[int, dict[str, int]]]:
    """struct name -> (size, {member: byte offset}) as Debian's bpftool reads the vmlinux BTF.

    Members of anonymous struct/union members are flattened into their parent with their
    offsets added, the way C (and volatility3) lets one name them. Bitfields are left out.
    """
    assert shutil.which("bpftool"), "bpftool missing: ./setup.sh installs it"
    text = subprocess.run(["bpftool", "btf", "dump", "file", str(vmlinux_by_system_tools(kernel)), "format",
                           "raw"], check=True, capture_output=True, text=True).stdout
    types: dict[int, tuple[str, str, int, list[tuple[str, int, int, bool]]]] = {}
    current: list | None = None
    head = re.compile(r"^\[(\d+)\] (STRUCT|UNION) '([^']*)' size=(\d+) vlen=\d+")
    member = re.compile(r"^\t'([^']*)' type_id=(\d+) bits_offset=(\d+)( bitfield_size=\d+)?")
    for line in text.splitlines():
        m = head.match(line)
        if m:
            current = []
            types[int(m.group(1))] = (m.group(2), m.group(3), int(m.group(4)), current)
            continue
        m = member.match(line)
        if m and current is not None:
            current.append((m.group(1), int(m.group(2)), int(m.group(3)), bool(m.group(4))))
        elif not line.startswith("\t"):
            current = None
    # Resolve modifiers/typedefs so an anonymous member's type id leads to its struct/union.
    alias: dict[int, int] = {}
    for line in text.splitlines():
        m = re.match(r"^\[(\d+)\] (TYPEDEF|CONST|VOLATILE|RESTRICT|TYPE_TAG) '[^']*' type_id=(\d+)", line)
        if m:
            alias[int(m.group(1))] = int(m.group(3))

    def resolve(tid: int) -> int:
        for _ in range(16):
            if tid not in alias:
                break
            tid = alias[tid]
        return tid

    def flatten(tid: int, base: int, out: dict[str, int], depth: int = 0) -> None:
        for name, mtype, bits, is_bitfield in types[tid][3]:
            if name == "(anon)":
                inner = resolve(mtype)
                if inner in types and depth < 8:
                    flatten(inner, base + bits // 8, out, depth + 1)
            elif not is_bitfield and bits % 8 == 0:
                out.setdefault(name, base + bits // 8)

    result = {}
    for tid, (_kind, name, size, _members) in types.items():
        if name != "(anon)" and name not in result:
            fields: dict[str, int] = {}
            flatten(tid, 0, fields)
            result[name] = (size, fields)
    return result


def parse_kallsyms(text: str) -> dict[str, list[tuple[int, str]]]:
    """name -> [(address, type)] of the core kernel symbols in a /proc/kallsyms listing."""
    out: dict[str, list[tuple[int, str]]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue  # module symbols carry a fourth column
        out.setdefault(parts[2], []).append((int(parts[0], 16), parts[1]))
    return out


def parse_ps(text: str) -> dict[int, str]:
    """pid -> comm from `ps -o pid,comm` output."""
    out = {}
    for line in text.splitlines()[1:]:
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1].strip()
    return out


def uapi_syscall_numbers() -> dict[int, str]:
    """x86-64 syscall numbers from the system's kernel UAPI header (Debian linux-libc-dev)."""
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    out = {}
    for m in re.finditer(r"#define __NR_(\w+) (\d+)", header.read_text()):
        out[int(m.group(2))] = m.group(1)
    return out


# Where the UAPI name of a syscall differs from the name of its kernel entry point
# (arch/x86/entry/syscalls/syscall_64.tbl: number, abi, name, entry point).
UAPI_TO_ENTRY = {"stat": "newstat", "fstat": "newfstat", "lstat": "newlstat", "uname": "newuname",
                 "umount2": "umount", "sendfile": "sendfile64"}
