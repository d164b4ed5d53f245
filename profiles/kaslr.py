"""KASLR: the virtual slide of a running kernel, always confirmed by reading linux_banner.

* From LSTAR: the MSR holds the runtime address of entry_SYSCALL_64, so slide = LSTAR -
  entry_SYSCALL_64 (link-time). x86-64 KASLR moves the kernel in 2 MiB steps.
* From physical memory: find the banner bytes; the physical address of `_text` follows from
  the banner's place in the image, and `phys_base` (the kernel's own variable, read there)
  relates runtime virtual to physical: __pa(x) = x - __START_KERNEL_map + phys_base.
"""
from __future__ import annotations

from typing import Callable

from .errors import GuestError
from .image import START_KERNEL_MAP

KASLR_ALIGN = 2 << 20
SCAN_CHUNK = 16 << 20

ReadFn = Callable[[int, int], bytes]


def slide_from_lstar(entry_syscall_64: int, lstar: int) -> int:
    slide = (lstar - entry_syscall_64) & 0xFFFF_FFFF_FFFF_FFFF
    if slide >= 1 << 63:
        slide -= 1 << 64
    if slide % KASLR_ALIGN:
        raise GuestError(f"LSTAR {lstar:#x} is not entry_SYSCALL_64 ({entry_syscall_64:#x}) moved by a "
                         "2 MiB multiple: the profile does not match this kernel, or LSTAR is hooked")
    return slide


def banner_matches(read_virtual: ReadFn, banner_address: int, banner: bytes, slide: int) -> bool:
    try:
        return read_virtual(banner_address + slide, len(banner)) == banner
    except Exception:  # any unreadable address means "not confirmed"
        return False


def scan_physical(read_physical: ReadFn, size: int, needle: bytes, limit: int = 64, start: int = 0) -> list[int]:
    """Physical addresses in [start, size) where `needle` occurs, read in overlapping chunks."""
    hits: list[int] = []
    pos = start
    overlap = len(needle) - 1
    while pos < size and len(hits) < limit:
        length = min(SCAN_CHUNK + overlap, size - pos)
        try:
            chunk = read_physical(pos, length)
        except Exception:
            pos += SCAN_CHUNK
            continue
        start = 0
        while True:
            i = chunk.find(needle, start)
            if i < 0:
                break
            if pos + i not in hits:
                hits.append(pos + i)
            start = i + 1
        pos += SCAN_CHUNK
    return hits


def slide_from_physical(read_physical: ReadFn, size: int, banner: bytes, symbols: dict[str, int]) -> list[int]:
    """Candidate slides from banner hits in physical memory (each still to be confirmed)."""
    text, banner_addr, phys_base_sym = symbols["_text"], symbols["linux_banner"], symbols["phys_base"]
    slides = []
    for hit in scan_physical(read_physical, size, banner):
        phys_text = hit - (banner_addr - text)
        try:
            phys_base = int.from_bytes(read_physical(phys_text + phys_base_sym - text, 8), "little")
        except Exception:
            continue
        runtime_text = (phys_text + START_KERNEL_MAP - phys_base) & 0xFFFF_FFFF_FFFF_FFFF
        slide = runtime_text - text
        if slide % KASLR_ALIGN == 0 and slide not in slides:
            slides.append(slide)
    return slides
