"""tracer.memory: page walks, bounded virtual reads and strings over images built here."""
from __future__ import annotations

import struct

import pytest

from test_memory_support import PAGE_SIZE_BIT, GuestImage
from tracer.memory import (MAX_READ, BytesSource, GuestMemory, RamFile, UnreadableMemory,
                           is_canonical)

USER = 0x0000_7F00_0000_0000
KERNEL = 0xFFFF_8880_0000_0000


def test_4k_translation_and_offsets():
    img = GuestImage()
    img.map_4k(USER, 0x500000)
    assert img.mem.translate(img.cr3, USER + 0x123) == 0x500123


def test_cr3_low_bits_pcid_and_noflush_are_ignored():
    img = GuestImage()
    img.map_4k(USER, 0x500000)
    assert img.mem.translate(img.cr3 | 0x5 | (1 << 63), USER + 8) == 0x500008


def test_2m_and_1g_large_pages():
    img = GuestImage()
    img.map_2m(USER + 0x20_0000, 0x20_0000)
    img.map_1g(KERNEL, 0)
    assert img.mem.translate(img.cr3, USER + 0x20_0000 + 0x1_2345) == 0x20_0000 + 0x1_2345
    assert img.mem.translate(img.cr3, KERNEL + 0x7_6543) == 0x7_6543


def test_nx_bit_does_not_disturb_the_address():
    img = GuestImage()
    img.map_4k(USER, 0x500000, flags=0x7 | (1 << 63))
    assert img.mem.translate(img.cr3, USER + 1) == 0x500001


def test_not_present_reports_the_failing_virtual_address():
    img = GuestImage()
    with pytest.raises(UnreadableMemory) as info:
        img.mem.translate(img.cr3, USER + 0x10)
    assert info.value.address == USER + 0x10
    assert not info.value.physical


def test_entry_pointing_outside_ram_is_unreadable_not_a_crash():
    img = GuestImage()
    # A PML4 entry claiming a page table far beyond the image.
    struct.pack_into("<Q", img.ram, img.cr3 + ((USER >> 39) & 0x1FF) * 8, 0x7_0000_0000 | 7)
    with pytest.raises(UnreadableMemory):
        img.mem.read_virtual(img.cr3, USER, 4)


def test_self_referencing_tables_terminate():
    img = GuestImage()
    # Every level points back at the PML4 itself: a walk must stop after four levels.
    for i in range(512):
        struct.pack_into("<Q", img.ram, img.cr3 + i * 8, img.cr3 | 7)
    gpa = img.mem.translate(img.cr3, USER)
    assert gpa == img.cr3  # the "page" reached is the PML4 itself, after exactly four steps


def test_non_canonical_address_is_unreadable():
    img = GuestImage()
    assert not is_canonical(0x0000_8000_0000_0000)
    with pytest.raises(UnreadableMemory):
        img.mem.read_virtual(img.cr3, 0x0000_8000_0000_0000, 1)


def test_read_crossing_pages_with_discontiguous_frames():
    img = GuestImage()
    img.map_4k(USER, 0x600000)
    img.map_4k(USER + 0x1000, 0x480000)  # lower frame than the first page on purpose
    img.write(USER + 0xFF0, bytes(range(32)))
    assert img.mem.read_virtual(img.cr3, USER + 0xFF0, 32) == bytes(range(32))
    assert img.ram[0x600FF0:0x601000] == bytes(range(16))
    assert img.ram[0x480000:0x480010] == bytes(range(16, 32))


def test_read_into_missing_second_page_fails_at_that_page():
    img = GuestImage()
    img.map_new(USER)
    with pytest.raises(UnreadableMemory) as info:
        img.mem.read_virtual(img.cr3, USER + 0xFFC, 8)
    assert info.value.address == USER + 0x1000


def test_read_size_is_bounded():
    img = GuestImage()
    with pytest.raises(ValueError):
        img.mem.read_virtual(img.cr3, USER, MAX_READ + 1)


def test_cstring_complete_truncated_and_unreadable():
    img = GuestImage()
    img.map_new(USER, 2)
    img.write(USER, b"/etc/passwd\0")
    s = img.mem.read_cstring(img.cr3, USER)
    assert s.data == b"/etc/passwd" and s.complete

    t = img.mem.read_cstring(img.cr3, USER, max_len=4)
    assert t.data == b"/etc" and t.truncated and t.error_address is None

    exact = img.mem.read_cstring(img.cr3, USER, max_len=11)  # NUL right at the bound
    assert exact.data == b"/etc/passwd" and exact.complete

    # A string running off the end of the mapped range: partial data + the failing address.
    img.write(USER + 0x1FF0, b"A" * 16)
    u = img.mem.read_cstring(img.cr3, USER + 0x1FF0)
    assert u.data == b"A" * 16 and u.error_address == USER + 0x2000 and not u.truncated


def test_cstring_crossing_a_page():
    img = GuestImage()
    img.map_new(USER, 2)
    img.write(USER + 0xFFD, b"abcdef\0")
    assert img.mem.read_cstring(img.cr3, USER + 0xFFD).data == b"abcdef"


def test_unbounded_string_of_a_whole_page_is_cut_at_max_len():
    img = GuestImage()
    img.map_new(USER, 4)
    img.write(USER, b"x" * 0x4000)
    s = img.mem.read_cstring(img.cr3, USER, max_len=1000)
    assert len(s.data) == 1000 and s.truncated


def test_pointer_array_bounded_and_terminated():
    img = GuestImage()
    img.map_new(USER)
    for i, p in enumerate([0x10, 0x20, 0x30, 0]):
        img.write_u64(USER + i * 8, p)
    assert img.mem.read_pointer_array(img.cr3, USER, 16) == ([0x10, 0x20, 0x30], False)
    assert img.mem.read_pointer_array(img.cr3, USER, 3) == ([0x10, 0x20, 0x30], False)
    assert img.mem.read_pointer_array(img.cr3, USER, 2) == ([0x10, 0x20], True)


IMAGE = 0xFFFF_FFFF_8100_0000
VMALLOC = 0xFFFF_C900_0000_0000


@pytest.mark.parametrize("gva", [IMAGE, KERNEL])
def test_stable_kernel_translations_are_cached_until_invalidated(gva):
    img = GuestImage()
    img.map_4k(gva, 0x500000)
    mem = img.mem
    mem.set_direct_map(KERNEL, 1 << 30)
    assert mem.translate(img.cr3, gva) == 0x500000
    walks = mem.walks
    assert mem.translate(img.cr3, gva + 8) == 0x500008
    assert mem.walks == walks  # served from the cache
    img.map_4k(gva, 0x501000)  # remap behind the cache's back
    assert mem.translate(img.cr3, gva) == 0x500000  # stale until told
    mem.invalidate()
    assert mem.translate(img.cr3, gva) == 0x501000


def test_vmalloc_translations_are_never_cached():
    img = GuestImage()  # kernel stacks live in vmalloc space and are remapped when reused
    img.mem.set_direct_map(KERNEL, 1 << 30)
    img.map_4k(VMALLOC, 0x500000)
    assert img.mem.translate(img.cr3, VMALLOC) == 0x500000
    img.map_4k(VMALLOC, 0x501000)
    assert img.mem.translate(img.cr3, VMALLOC) == 0x501000


def test_user_translations_are_never_cached():
    img = GuestImage()
    img.map_4k(USER, 0x500000)
    assert img.mem.translate(img.cr3, USER) == 0x500000
    img.map_4k(USER, 0x501000)
    assert img.mem.translate(img.cr3, USER) == 0x501000


def test_ram_file_maps_a_file_and_refuses_outside(tmp_path):
    path = tmp_path / "ram"
    data = bytearray(1 << 20)
    data[0x1234:0x1238] = b"KVMI"
    path.write_bytes(data)
    ram = RamFile(path)
    assert ram.read(0x1234, 4) == b"KVMI"
    assert ram.read_u64(0) == 0
    with pytest.raises(UnreadableMemory):
        ram.read((1 << 20) - 2, 4)
    ram.close()


def test_ram_file_high_memory_above_4g(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(b"\0" * 0x2000 + b"HIGH" + b"\0" * 0xFFC)
    ram = RamFile(path, below_4g=0x2000)
    assert ram.read(1 << 32, 4) == b"HIGH"
    with pytest.raises(UnreadableMemory):
        ram.read(0x2000, 4)  # in the hole


def test_bytes_source_and_large_page_image_over_ram_file(tmp_path):
    img = GuestImage(size=4 << 20)
    img.map_2m(KERNEL, 0x200000)
    img.ram[0x200000 + 0x10:0x200000 + 0x15] = b"hello"
    path = tmp_path / "dump"
    path.write_bytes(img.ram)
    mem = GuestMemory(RamFile(path))
    assert mem.read_virtual(img.cr3, KERNEL + 0x10, 5) == b"hello"
    mem2 = GuestMemory(BytesSource(bytes(img.ram)))
    assert mem2.read_cstring(img.cr3, KERNEL + 0x10).data == b"hello"


def test_page_size_bit_in_pt_level_is_not_a_large_page():
    img = GuestImage()
    img.map_4k(USER, 0x500000, flags=0x7 | PAGE_SIZE_BIT)  # PAT bit at the PT level
    assert img.mem.translate(img.cr3, USER + 4) == 0x500004
