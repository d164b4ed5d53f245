"""Profiles built from the real Debian kernel images (6.1 bookworm, 6.12 bookworm-backports)."""
from __future__ import annotations

import gzip
import shutil
import struct
import subprocess

import pytest

import profiles
from profiles import isf
from test_profile_support import (CHECKED_STRUCTS, KERNELS, UAPI_TO_ENTRY, bpftool_structs, image_isf, lab_build,
                                  uapi_syscall_numbers, without_provenance, work_dir)


@pytest.fixture(scope="module", params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def profile(kernel: str) -> profiles.LinuxProfile:
    return profiles.load(image_isf(kernel)[1])


def test_isf_validates_against_volatility3_schema(kernel: str) -> None:
    from volatility3 import schemas

    result, _path = image_isf(kernel)
    assert result["metadata"]["format"] == "6.2.0"
    assert schemas.validate(result, use_cache=False) is True


def test_volatility3_loads_the_file_and_agrees_with_the_fast_path(profile: profiles.LinuxProfile) -> None:
    table = profile.context.symbol_space[profile.table_name]
    task = table.get_type("task_struct")
    for field in ("pid", "tgid", "comm", "mm", "real_parent", "tasks", "cred"):
        assert task.relative_child_offset(field) == profile.offset("task_struct", field)
    assert task.size == profile.size("task_struct")
    assert table.get_symbol("init_task").address == profile.symbol("init_task")
    assert table.get_symbol("linux_banner").constant_data.rstrip(b"\0") == profile.banner_bytes


def test_banner_and_release(kernel: str, profile: profiles.LinuxProfile) -> None:
    release = lab_build(kernel).release
    assert profile.banner.startswith(f"Linux version {release} ")
    assert profile.symbol("linux_banner") > profile.symbol("_text") >= 0xFFFF_FFFF_8000_0000


def test_offsets_match_bpftool(kernel: str, profile: profiles.LinuxProfile) -> None:
    oracle = bpftool_structs(kernel)
    checked = 0
    for struct_name in CHECKED_STRUCTS:
        size, fields = oracle[struct_name]
        assert profile.size(struct_name) == size, struct_name
        assert fields, struct_name
        for field, offset in fields.items():
            assert profile.offset(struct_name, field) == offset, f"{struct_name}.{field}"
            checked += 1
    assert checked > 400


def test_pt_regs_layout_matches_the_entry_code(profile: profiles.LinuxProfile) -> None:
    expected = {"r15": 0, "ax": 0x50, "cx": 0x58, "dx": 0x60, "si": 0x68, "di": 0x70, "orig_ax": 0x78,
                "ip": 0x80, "sp": 0x98}
    assert {f: profile.offset("pt_regs", f) for f in expected} == expected


def test_current_task_offset(kernel: str, profile: profiles.LinuxProfile) -> None:
    if kernel == "6.1":
        assert profile.current_task_offset == profile.symbol("current_task")
        assert not profile.has_symbol("pcpu_hot")
    else:
        assert not profile.has_symbol("current_task")
        assert profile.current_task_offset == profile.symbol("pcpu_hot") + profile.offset("pcpu_hot", "current_task")
    assert 0 < profile.current_task_offset < 0x10_0000  # a per-CPU offset, not an address


def test_syscall_names_match_the_uapi_header(profile: profiles.LinuxProfile) -> None:
    uapi = uapi_syscall_numbers()
    compared = 0
    for nr, name in uapi.items():
        if nr in profile.syscalls:
            assert profile.syscalls[nr].name == UAPI_TO_ENTRY.get(name, name), nr
            compared += 1
    assert compared > 300
    assert profile.syscalls[0].name == "read" and profile.syscalls[59].name == "execve"


def test_syscall_prototypes_come_from_the_kernel(profile: profiles.LinuxProfile) -> None:
    assert profile.syscall_record["prototype_source"].startswith("kernel syscall_metadata")
    assert profile.syscalls[257].args == (("int", "dfd"), ("const char *", "filename"), ("int", "flags"),
                                          ("umode_t", "mode"))
    assert profile.syscalls[0].args == (("unsigned int", "fd"), ("char *", "buf"), ("size_t", "count"))
    with_args = sum(1 for s in profile.syscalls.values() if s.args is not None)
    assert with_args > 0.95 * len(profile.syscalls)


def test_kaslr_slide_from_lstar(profile: profiles.LinuxProfile) -> None:
    entry = profile.symbol("entry_SYSCALL_64")
    assert profile.kaslr_slide(entry + 0x3A00000) == 0x3A00000
    assert profile.kaslr_slide(entry) == 0
    with pytest.raises(profiles.GuestError, match="2 MiB"):
        profile.kaslr_slide(entry + 0x1000)


def test_confirm_slide_reads_the_banner(profile: profiles.LinuxProfile) -> None:
    slide = 0x1E00000
    banner_at = profile.symbol("linux_banner") + slide
    memory = {banner_at: profile.banner_bytes}

    def read(gva: int, size: int) -> bytes:
        data = memory.get(gva, b"")
        if len(data) < size:
            raise OSError("unmapped")
        return data[:size]

    assert profile.confirm_slide(slide, read)
    assert not profile.confirm_slide(slide + 0x200000, read)


def test_kallsyms_count_and_types(kernel: str) -> None:
    result, _ = image_isf(kernel)
    prov = isf.embedded(result, "provenance")
    assert prov["kallsyms"]["num_syms"] > 90_000
    syms = result["symbols"]
    assert syms["init_task"]["type"] == {"kind": "struct", "name": "task_struct"}
    assert syms["sys_call_table"]["type"]["count"] >= 400


def test_cache_is_keyed_by_banner(kernel: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from profiles import cache

    monkeypatch.setenv("VMITRACE_CACHE", str(tmp_path))
    result, _ = image_isf(kernel)
    banner = isf.embedded(result, "provenance")["banner"]
    assert cache.lookup(banner) is None
    path = cache.store(result)
    assert path.parent == tmp_path / "profiles"
    assert cache.lookup(banner) == path
    assert lab_build(kernel).release in path.name
    assert profiles.load(path).banner == banner


def _repack(vmlinux_xz_image: bytes, vmlinux: bytes, kind: str) -> bytes:
    """A bzImage whose payload is `vmlinux` compressed by the system tool the kernel build uses."""
    if kind == "gzip":
        payload = gzip.compress(vmlinux, compresslevel=1)
    else:  # the kernel packs lz4 in the legacy frame format: lz4 -l
        payload = subprocess.run(["lz4", "-l", "-1", "-c"], input=vmlinux, capture_output=True, check=True).stdout
    payload += struct.pack("<I", len(vmlinux))
    image = bytearray(vmlinux_xz_image)
    setup_sects = image[0x1F1] or 4
    payload_offset, _ = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    struct.pack_into("<I", image, 0x24C, len(payload))
    protected_mode = start + len(payload) - (setup_sects + 1) * 512
    struct.pack_into("<I", image, 0x1F4, (protected_mode + 15) // 16)  # syssize
    return bytes(image[:start]) + payload + bytes(-protected_mode % 16)


@pytest.mark.parametrize("kind", ["gzip", "lz4"])
def test_gzip_and_lz4_payloads_build_the_same_profile(kind: str) -> None:
    from profiles.build import build_from_image
    from profiles.image import vmlinux_bytes

    assert shutil.which("lz4")
    original = lab_build("6.1").vmlinuz.read_bytes()
    vmlinux, packing = vmlinux_bytes(original)
    assert packing == "bzImage/xz"
    path = work_dir() / f"vmlinuz-6.1-{kind}"
    path.write_bytes(_repack(original, vmlinux, kind))
    result = build_from_image(str(path))
    assert isf.embedded(result, "provenance")["packing"] == f"bzImage/{kind}"
    assert without_provenance(result) == without_provenance(image_isf("6.1")[0])


def test_vmlinux_file_builds_the_same_profile() -> None:
    from profiles.build import build_from_image
    from test_profile_support import vmlinux_by_system_tools

    result = build_from_image(str(vmlinux_by_system_tools("6.12")))
    assert isf.embedded(result, "provenance")["packing"] == "vmlinux"
    assert without_provenance(result) == without_provenance(image_isf("6.12")[0])


def test_reads_isf_without_vmitrace_records_like_dwarf2json_output(tmp_path) -> None:
    """dwarf2json files carry no vmitrace records; they load with empty syscall tables.

    (No dwarf2json output is available offline, so one of ours is stripped of its records and
    labelled as dwarf2json's; the shape is the same ISF 6.2.0.)"""
    result, _ = image_isf("6.1")
    stripped = {k: v for k, v in result.items()}
    stripped["symbols"] = {k: v for k, v in result["symbols"].items() if not k.startswith("vmitrace.")}
    stripped["metadata"] = dict(result["metadata"], producer={"name": "dwarf2json", "version": "0.9.0"})
    for name in ("plain.json", "packed.json.xz"):
        path = isf.write(stripped, tmp_path / name)
        prof = profiles.load(path)
        assert prof.syscalls == {} and prof.provenance["source"].startswith("external ISF")
        assert prof.offset("task_struct", "pid") == profiles.load(image_isf("6.1")[1]).offset("task_struct", "pid")
        assert prof.context.symbol_space[prof.table_name].get_type("task_struct").size == prof.size("task_struct")
