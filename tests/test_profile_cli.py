"""`vmitrace profile build/show` as a user runs it, including every kind of bad input.

Bad input must give a clear message naming the problem and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import json
import lzma
import subprocess
import sys
from pathlib import Path

import pytest

from profiles import isf
from test_profile_support import image_isf, lab_build, vmlinux_by_system_tools

VMITRACE = str(Path(sys.executable).with_name("vmitrace"))


def run(*args: str, env_cache: Path | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if env_cache is not None:
        env["VMITRACE_CACHE"] = str(env_cache)
    return subprocess.run([VMITRACE, *args], capture_output=True, text=True, timeout=600, env=env)


def assert_clean_failure(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    """A failure (exit 1; 2 is for usage errors) with one clear line on stderr."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    (error,) = [line for line in proc.stderr.splitlines() if not line.startswith("[profile]")]
    assert error.startswith("Error: "), proc.stderr
    for phrase in phrases:
        assert phrase in error, proc.stderr


def test_build_and_show(tmp_path: Path) -> None:
    out = tmp_path / "k.json.xz"
    proc = run("profile", "build", "--kernel", str(lab_build("6.12").vmlinuz), "-o", str(out), "--no-validate")
    assert proc.returncode == 0, proc.stderr
    assert "Linux version 6.12" in proc.stdout
    shown = run("profile", "show", str(out), "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    result, _ = image_isf("6.12")
    assert info["banner"] == isf.embedded(result, "provenance")["banner"].strip()
    assert info["counts"]["symbols"] == len(result["symbols"]) - 2  # minus vmitrace's two records
    assert info["counts"]["user_types"] == len(result["user_types"])
    assert info["counts"]["syscalls_x86_64"] == len(isf.embedded(result, "syscalls")["x86_64"])
    assert info["provenance"]["source"] == "image" and info["provenance"]["packing"] == "bzImage/zstd"
    text = run("profile", "show", str(out))
    assert text.returncode == 0 and "syscalls_x86_64:" in text.stdout and "provenance.packing: bzImage/zstd" in text.stdout


def test_build_into_the_cache_by_default(tmp_path: Path) -> None:
    proc = run("profile", "build", "--kernel", str(vmlinux_by_system_tools("6.1")), "--no-validate",
               env_cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (cached,) = (tmp_path / "profiles").glob("*.json.xz")
    assert cached.name.startswith(lab_build("6.1").release + "-")


def test_build_from_a_lab_series_with_json_summary(tmp_path: Path) -> None:
    """--kernel 6.1 names the lab kernel series (as everywhere else): its image from the lab
    cache is used; --json summarizes what was built, with the counts `show` reports."""
    out = tmp_path / "lab.json.xz"
    proc = run("profile", "build", "--kernel", "6.1", "-o", str(out), "--no-validate", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["path"] == str(out.resolve()) and summary["lab_kernel"] == "6.1"
    assert summary["provenance"]["input"] == str(lab_build("6.1").vmlinuz)
    assert summary["banner"].startswith(f"Linux version {lab_build('6.1').release} ")
    assert summary["validated"] is False
    shown = json.loads(run("profile", "show", str(out), "--json").stdout)
    assert summary["counts"] == shown["counts"] and shown["counts"]["syscalls_x86_64"] > 300


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    proc = run("profile", "build", "-o", str(tmp_path / "o.json"))
    assert proc.returncode == 2 and "--kernel" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.json").exists()


def test_not_a_kernel(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("hello, this is not a kernel\n" * 100)
    assert_clean_failure(run("profile", "build", "--kernel", str(junk), "-o", str(tmp_path / "o.json")),
                         "not a Linux kernel")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert_clean_failure(run("profile", "build", "--kernel", str(empty), "-o", str(tmp_path / "o.json")),
                         "not a Linux kernel")
    missing = run("profile", "build", "--kernel", str(tmp_path / "missing"), "-o", str(tmp_path / "o.json"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr  # a bad argument: usage
    assert "neither a lab kernel series (6.1, 6.12) nor a kernel image file" in missing.stderr
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("fraction", [0.5, 0.999])
def test_truncated_image(tmp_path: Path, fraction: float) -> None:
    data = lab_build("6.1").vmlinuz.read_bytes()
    cut = tmp_path / "vmlinuz-cut"
    cut.write_bytes(data[:int(len(data) * fraction)])
    assert_clean_failure(run("profile", "build", "--kernel", str(cut), "-o", str(tmp_path / "o.json")), "truncated")


def test_truncated_vmlinux(tmp_path: Path) -> None:
    data = vmlinux_by_system_tools("6.1").read_bytes()
    cut = tmp_path / "vmlinux-cut"
    cut.write_bytes(data[:len(data) // 3])
    assert_clean_failure(run("profile", "build", "--kernel", str(cut), "-o", str(tmp_path / "o.json")), "truncated")


def _erase_btf(vmlinux: bytes, rename_section: bool) -> bytes:
    """Simulate a kernel built without BTF: erase the .BTF contents (and optionally its section)."""
    from profiles.image import Elf64

    elf = Elf64(vmlinux)
    sec = elf.section(".BTF")
    assert sec is not None
    data = bytearray(vmlinux)
    data[sec.offset:sec.offset + sec.size] = bytes(sec.size)
    if rename_section:
        shstrtab = elf.sections[-1]
        pos = data.find(b".BTF\0", shstrtab.offset, shstrtab.offset + shstrtab.size)
        data[pos:pos + 4] = b".XXX"
    return bytes(data)


@pytest.mark.parametrize("rename_section", [True, False])
def test_kernel_without_btf(tmp_path: Path, rename_section: bool) -> None:
    path = tmp_path / "vmlinux-nobtf"
    path.write_bytes(_erase_btf(vmlinux_by_system_tools("6.1").read_bytes(), rename_section))
    assert_clean_failure(run("profile", "build", "--kernel", str(path), "-o", str(tmp_path / "o.json")), "BTF")


@pytest.mark.parametrize("version", ["6.3.0", "7.0.0", "banana"])
def test_isf_of_the_wrong_format_version(tmp_path: Path, version: str) -> None:
    result, _ = image_isf("6.1")
    wrong = dict(result, metadata=dict(result["metadata"], format=version))
    path = isf.write(wrong, tmp_path / "wrong.json.xz")
    proc = run("profile", "show", str(path))
    assert_clean_failure(proc, "format version", version)


def test_files_that_are_not_isf(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("[1, 2, 3]")
    assert_clean_failure(run("profile", "show", str(tmp_path / "a.json")), "not an ISF file")
    (tmp_path / "b.json").write_text("{not json")
    assert_clean_failure(run("profile", "show", str(tmp_path / "b.json")), "not an ISF file")
    good = lzma.compress(json.dumps({"metadata": {"format": "6.2.0"}}).encode())
    (tmp_path / "c.json.xz").write_bytes(good[:len(good) // 2])
    assert_clean_failure(run("profile", "show", str(tmp_path / "c.json.xz")), "truncated")
    (tmp_path / "d.json").write_text(json.dumps({"metadata": {"format": "6.2.0"}}))
    assert_clean_failure(run("profile", "show", str(tmp_path / "d.json")), "missing")


def test_from_guest_needs_a_source(tmp_path: Path) -> None:
    assert_clean_failure(run("profile", "build", "--from-guest", "-o", str(tmp_path / "o.json")), "--ram FILE or --lab")
    junk = tmp_path / "ram"
    junk.write_bytes(bytes(8 << 20))
    assert_clean_failure(run("profile", "build", "--from-guest", "--ram", str(junk), "-o", str(tmp_path / "o.json")),
                         "no 'Linux version' banner")
