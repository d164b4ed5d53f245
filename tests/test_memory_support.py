"""A guest-physical image with x86-64 page tables built in the test (no test functions here).

Used by test_memory*.py and test_decode*.py to exercise page walks and decoders on memory
whose layout is known exactly, including hostile layouts (missing pages, loops, huge strings).
"""
from __future__ import annotations

import struct

from tracer.memory import BytesSource, GuestMemory

PRESENT_RW_USER = 0x7
PAGE_SIZE_BIT = 0x80


class GuestImage:
    """Physical memory + a page-table allocator. Page tables live from `pt_base` upwards."""

    def __init__(self, size: int = 8 << 20, pt_base: int = 0x10000) -> None:
        self.ram = bytearray(size)
        self._next_table = pt_base
        self.cr3 = self._new_table()
        self._next_data = size // 2  # data pages come from the upper half
        self.mem = GuestMemory(BytesSource(self.ram))

    def _new_table(self) -> int:
        addr = self._next_table
        self._next_table += 0x1000
        assert self._next_table <= len(self.ram) // 2, "page-table area exhausted"
        return addr

    def _entry(self, table: int, index: int) -> int:
        return struct.unpack_from("<Q", self.ram, table + index * 8)[0]

    def _set(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.ram, table + index * 8, value)

    def _descend(self, gva: int, shifts: tuple[int, ...]) -> int:
        table = self.cr3
        for shift in shifts:
            idx = (gva >> shift) & 0x1FF
            entry = self._entry(table, idx)
            if not entry & 1:
                new = self._new_table()
                self._set(table, idx, new | PRESENT_RW_USER)
                table = new
            else:
                table = entry & 0x000F_FFFF_FFFF_F000
        return table

    def map_4k(self, gva: int, gpa: int, flags: int = PRESENT_RW_USER) -> None:
        pt = self._descend(gva, (39, 30, 21))
        self._set(pt, (gva >> 12) & 0x1FF, gpa | flags)

    def map_2m(self, gva: int, gpa: int) -> None:
        pd = self._descend(gva, (39, 30))
        self._set(pd, (gva >> 21) & 0x1FF, gpa | PRESENT_RW_USER | PAGE_SIZE_BIT)

    def map_1g(self, gva: int, gpa: int) -> None:
        pdpt = self._descend(gva, (39,))
        self._set(pdpt, (gva >> 30) & 0x1FF, gpa | PRESENT_RW_USER | PAGE_SIZE_BIT)

    def alloc_page(self) -> int:
        gpa = self._next_data
        self._next_data += 0x1000
        assert self._next_data <= len(self.ram)
        return gpa

    def map_new(self, gva: int, pages: int = 1) -> None:
        """Back `pages` pages from `gva` (page aligned) with fresh zeroed physical pages."""
        for i in range(pages):
            self.map_4k(gva + i * 0x1000, self.alloc_page())

    def write(self, gva: int, data: bytes) -> None:
        """Write through the page tables built here (every touched page must be mapped)."""
        for i, byte in enumerate(data):
            gpa = self.mem.translate(self.cr3, gva + i)
            self.ram[gpa] = byte
        self.mem.invalidate()

    def write_u64(self, gva: int, value: int) -> None:
        self.write(gva, struct.pack("<Q", value))
