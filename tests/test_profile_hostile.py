"""Guest memory is attacker-controlled: corrupt BTF and kallsyms data must fail cleanly.

The inputs are the real 6.1 kernel's tables with random damage (hypothesis); every outcome
must be a parsed result or a ProfileError, never another exception or a hang.
"""
from __future__ import annotations

import struct
from functools import lru_cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profiles import ProfileError, btf
from profiles.image import KernelMemory, vmlinux_bytes, Elf64
from test_profile_support import lab_build

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@lru_cache(maxsize=None)
def kernel() -> tuple[bytes, KernelMemory]:
    elf = Elf64(vmlinux_bytes(lab_build("6.1").vmlinuz.read_bytes())[0])
    return elf.section_bytes(elf.section(".BTF")), elf.kernel_memory()


def _damage(blob: bytes, edits: list[tuple[float, int]]) -> bytes:
    data = bytearray(blob)
    for where, value in edits:
        data[int(where * (len(data) - 1))] = value
    return bytes(data)


edits = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=64)


@SETTINGS
@given(edits=edits)
def test_damaged_btf_parses_or_raises_profile_error(edits: list[tuple[float, int]]) -> None:
    blob, _ = kernel()
    try:
        btf.IsfTypes(btf.parse(_damage(blob, edits)))
    except ProfileError:
        pass


@SETTINGS
@given(cut=st.floats(0, 1))
def test_truncated_btf_raises_profile_error(cut: float) -> None:
    blob, _ = kernel()
    try:
        btf.parse(blob[:int(cut * (len(blob) - 1))])
    except ProfileError:
        return
    raise AssertionError("a truncated BTF blob parsed")


def test_btf_header_announcing_too_much_is_refused() -> None:
    blob, _ = kernel()
    forged = bytearray(blob)
    struct.pack_into("<I", forged, 20, 1 << 30)  # str_len
    try:
        btf.parse(bytes(forged))
    except ProfileError as exc:
        assert "BTF" in str(exc)
    else:
        raise AssertionError("forged BTF size accepted")


@SETTINGS
@given(edits=edits, region=st.sampled_from(["names", "markers", "tokens", "offsets"]))
def test_damaged_kallsyms_decode_or_raise_profile_error(edits: list[tuple[float, int]], region: str) -> None:
    from profiles import kallsyms

    _, km = kernel()
    tables, _symbols = kallsyms.find_tables(km)
    start = {"names": tables.names, "markers": tables.markers, "tokens": tables.token_table,
             "offsets": tables.offsets}[region] - km.base
    data = bytearray(km.data)
    data[start:start + 4096] = _damage(bytes(data[start:start + 4096]), edits)
    try:
        kallsyms.find_tables(KernelMemory(data, km.base))
    except ProfileError:
        pass
