"""Decode the kernel's compressed kallsyms tables, found by their structure (no symbol needed).

scripts/kallsyms.c emits, in .rodata: kallsyms_num_syms (u32), kallsyms_names (per symbol: a
length, 1 byte or 2 bytes little-endian base-128 when >= 0x80, then token indexes),
kallsyms_markers (u32 offset into names of every 256th symbol), kallsyms_token_table (256
NUL-terminated strings), kallsyms_token_index (256 u16 offsets into the token table),
kallsyms_offsets (u32 per symbol) and kallsyms_relative_base (u64). The order differs between
releases: 6.1 puts offsets + relative_base first and kallsyms_seqs_of_names between markers and
the token table; 6.12 puts offsets + relative_base after the token index. So the finder starts
from the one unmistakable piece (token table + index), then finds every other table by what it
must contain, and checks each against the others.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from .errors import NoKallsyms
from .image import START_KERNEL_MAP, KernelMemory

_DIGIT_TOKENS = re.compile(re.escape(b"".join(bytes([c]) + b"\0" for c in b"0123456789")))
# Bounds that keep a hostile or corrupt image from sending the decoder into the weeds.
MAX_SYMS = 2_000_000
MAX_NAME = 1024


@dataclass
class KallsymsTables:
    num_syms: int
    names: int        # addresses (in KernelMemory terms) of each table
    markers: int
    token_table: int
    token_index: int
    offsets: int
    relative_base: int  # the value stored in the image (runtime for a guest)
    absolute_percpu: bool


@dataclass
class Symbol:
    name: str
    type: str      # nm-style type letter
    address: int   # link-time address


def _find_token_table(data: bytes | bytearray | memoryview) -> tuple[int, int, list[bytes]]:
    """(token_table offset, token_index offset, tokens), located via the run of digit tokens."""
    buf = bytes(data) if not isinstance(data, (bytes, bytearray)) else data
    for match in _DIGIT_TOKENS.finditer(buf):
        p0 = match.start()
        for p in range(p0 & ~1, min(len(buf) - 512, p0 + 8192), 2):
            if buf[p] or buf[p + 1]:
                continue
            idx = struct.unpack_from("<256H", buf, p)
            if not all(1 < idx[i + 1] - idx[i] < 256 for i in range(255)):
                continue
            for pad in range(8):
                end = p - pad          # one past the NUL ending the last token
                if buf[end - 1] != 0 or any(buf[end:p]):
                    continue
                last_start = buf.rfind(b"\0", 0, end - 1) + 1
                start = last_start - idx[255]
                if start <= 0 or start > p0:
                    continue
                if all(buf[start + idx[i] - 1] == 0 and buf[start + idx[i]] != 0 for i in range(1, 256)):
                    tokens = [buf[start + idx[i]:buf.index(b"\0", start + idx[i])] for i in range(256)]
                    return start, p, tokens
    raise NoKallsyms("no kallsyms token table found (kernel built without CONFIG_KALLSYMS?)")


def _find_markers(buf: bytes, before: int) -> tuple[int, list[int]]:
    """The markers array: u32s starting at 0, strictly increasing, ending within 3 MiB before `before`."""
    lo = max(0, before - (8 << 20))
    best: tuple[int, list[int]] | None = None
    for pos in range(before - 4 - ((before - 4) % 4), lo, -4):
        if buf[pos:pos + 4] != b"\0\0\0\0":
            continue
        values = [0]
        q = pos + 4
        while q + 4 <= before:
            (v,) = struct.unpack_from("<I", buf, q)
            gap = v - values[-1]
            if not (64 <= gap <= 256 * MAX_NAME):
                break
            values.append(v)
            q += 4
        if len(values) >= 8 and before - q < 4 * MAX_SYMS:
            # The first such run walking backwards is the markers array (its end is nearest).
            best = (pos, values)
            break
    if best is None:
        raise NoKallsyms("kallsyms markers not found before the token table")
    return best


def _entry_len(buf: bytes, off: int) -> tuple[int, int]:
    """(length, header bytes) of one kallsyms_names entry."""
    b0 = buf[off]
    if b0 & 0x80:
        return (b0 & 0x7F) | (buf[off + 1] << 7), 2
    return b0, 1


def _skip_entries(buf: bytes, off: int, count: int, limit: int) -> int:
    for _ in range(count):
        if off >= limit:
            return -1
        length, hdr = _entry_len(buf, off)
        if length == 0 or length > MAX_NAME:
            return -1
        off += hdr + length
    return off


def _find_names(buf: bytes, markers_pos: int, markers: list[int]) -> tuple[int, int]:
    """(names offset, num_syms) such that marker k is where symbol 256*k starts."""
    m = len(markers)
    last = markers[-1]
    hi = markers_pos - last
    lo = max(0, hi - 256 * (MAX_NAME + 2))
    for x in range(hi - hi % 4, lo, -4):
        for gap in (4, 8):
            if x - gap < 0:
                continue
            (n,) = struct.unpack_from("<I", buf, x - gap)
            if not ((m - 1) * 256 < n <= m * 256) or n > MAX_SYMS:
                continue
            if _skip_entries(buf, x, 256, markers_pos) != x + markers[1]:
                continue
            # The last block must end within alignment of the markers array.
            end = _skip_entries(buf, x + last, n - 256 * (m - 1), markers_pos + 1)
            if end < 0 or not 0 <= markers_pos - end < 8 + 3 * n + 8:
                continue
            return x, n
    raise NoKallsyms("kallsyms_names / kallsyms_num_syms not found before the markers")


def _addresses(buf: bytes, offsets_pos: int, n: int, relative_base: int) -> tuple[list[int], bool]:
    raw = struct.unpack_from(f"<{n}i", buf, offsets_pos)
    absolute_percpu = any(v < 0 for v in raw)
    if absolute_percpu:
        addrs = [v if v >= 0 else relative_base - 1 - v for v in raw]
    else:
        addrs = [relative_base + (v & 0xFFFFFFFF) for v in raw]
    return addrs, absolute_percpu


def _sorted_enough(addrs: list[int]) -> bool:
    bad = sum(1 for a, b in zip(addrs, addrs[1:]) if b < a)
    return bad <= len(addrs) // 1000


def _find_offsets(km: KernelMemory, buf: bytes, names_pos: int, n: int, index_pos: int) -> tuple[int, int, list[int], bool]:
    """(offsets pos, relative_base, link-time addresses, absolute_percpu)."""
    candidates = []
    # 6.1: offsets, relative_base, num_syms, names.
    for gap in (4, 8):
        rb_pos = (names_pos - gap - 8) & ~7
        for off_pos in (rb_pos - 4 * n, (rb_pos - 4 * n) & ~7):
            candidates.append((off_pos, rb_pos))
    # 6.12: ... token_index, offsets, relative_base.
    after_index = (index_pos + 512 + 7) & ~7
    for off_pos in (after_index, index_pos + 512):
        candidates.append((off_pos, (off_pos + 4 * n + 7) & ~7))
    for off_pos, rb_pos in candidates:
        if off_pos < 0 or rb_pos + 8 > len(buf):
            continue
        (rb,) = struct.unpack_from("<Q", buf, rb_pos)
        link_rb = rb - km.slide
        if not START_KERNEL_MAP <= link_rb < 1 << 64:  # _text-based, link-time or KASLR-moved
            continue
        addrs, abs_percpu = _addresses(buf, off_pos, n, link_rb)
        if _sorted_enough(addrs):
            return off_pos, rb, addrs, abs_percpu
    raise NoKallsyms("kallsyms_offsets / kallsyms_relative_base not found next to the other tables")


def find_tables(km: KernelMemory) -> tuple[KallsymsTables, list[Symbol]]:
    """Locate and decode the kallsyms tables of `km`; symbols carry link-time addresses."""
    try:
        return _find_tables(km)
    except (struct.error, IndexError, ValueError) as exc:
        raise NoKallsyms(f"kallsyms tables are inconsistent: {exc}") from exc


def _find_tables(km: KernelMemory) -> tuple[KallsymsTables, list[Symbol]]:
    buf = km.data if isinstance(km.data, (bytes, bytearray)) else bytes(km.data)
    table_pos, index_pos, tokens = _find_token_table(buf)
    markers_pos, markers = _find_markers(buf, table_pos)
    names_pos, n = _find_names(buf, markers_pos, markers)
    offsets_pos, rb, addrs, abs_percpu = _find_offsets(km, buf, names_pos, n, index_pos)
    tables = KallsymsTables(n, km.base + names_pos, km.base + markers_pos, km.base + table_pos,
                            km.base + index_pos, km.base + offsets_pos, rb, abs_percpu)
    symbols = []
    off = names_pos
    for i in range(n):
        length, hdr = _entry_len(buf, off)
        off += hdr
        name = b"".join(tokens[t] for t in buf[off:off + length])
        off += length
        if not name:
            raise NoKallsyms(f"kallsyms entry {i} decodes to an empty name")
        symbols.append(Symbol(name[1:].decode("ascii", "replace"), chr(name[0]), addrs[i]))
    return tables, symbols
