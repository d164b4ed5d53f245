"""Guest memory access: physical sources, the x86-64 page walk, bounded virtual reads.

Guest memory is attacker-controlled. Every read here is bounded in size, every walk in depth,
every string in length; an address that cannot be read raises `UnreadableMemory` carrying the
failing address, and the string helpers return what they could read with the failure flagged,
so decoders can mark a field instead of losing the record.

Physical sources implement `read(gpa, size) -> bytes` and raise `UnreadableMemory` for
addresses they do not hold:

* `RamFile` maps a QEMU shared RAM file (``memory-backend-file,share=on``) or a raw dump;
  guest-physical addresses below the PCI hole are file offsets, RAM above 4 GiB follows.
* `BytesSource` serves an in-memory image (tests, small dumps).
* `SessionSource` reads through a KVMI session's ``read_physical``.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

PAGE_SIZE = 0x1000
PAGE_MASK = ~(PAGE_SIZE - 1)
# Largest single virtual read a caller may ask for; larger asks are programming errors.
MAX_READ = 1 << 20
# Physical address bits 12..51 of a paging-structure entry (NX, PKEY and software bits dropped).
_ADDR_MASK = 0x000F_FFFF_FFFF_F000
_PRESENT = 1 << 0
_PAGE_SIZE_BIT = 1 << 7
_FOUR_GIB = 1 << 32
_U64 = struct.Struct("<Q")


class UnreadableMemory(Exception):
    """A guest address could not be read (not present, outside RAM, or the host refused)."""

    def __init__(self, address: int, reason: str, *, physical: bool = False) -> None:
        kind = "gpa" if physical else "gva"
        super().__init__(f"unreadable {kind} {address:#x}: {reason}")
        self.address = address
        self.reason = reason
        self.physical = physical


class PhysicalSource(Protocol):
    def read(self, gpa: int, size: int) -> bytes:
        """Exactly `size` bytes at guest-physical `gpa`, or raise UnreadableMemory."""
        ...


class BytesSource:
    """Guest-physical memory held in a bytes-like object; offset = guest-physical address."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = data
        self.size = len(data)

    def read(self, gpa: int, size: int) -> bytes:
        if gpa < 0 or size < 0 or gpa + size > self.size:
            raise UnreadableMemory(gpa, "outside the image", physical=True)
        return bytes(self._data[gpa:gpa + size])


class RamFile:
    """A guest RAM file mapped read-only: QEMU's shared memory backend or a raw dump.

    `below_4g` is how many bytes of RAM sit below the PCI hole (they appear at gpa 0..below_4g);
    the rest of the file appears from 4 GiB up. The default follows QEMU's q35 layout and, for
    guests of up to 2 GiB (every lab guest), simply means file offset = guest-physical address.
    """

    def __init__(self, path: str | os.PathLike[str], below_4g: int | None = None) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(fd).st_size
            if self.size == 0:
                raise ValueError(f"{path}: empty RAM file")
            self._map = mmap.mmap(fd, self.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        if below_4g is None:
            below_4g = self.size if self.size < 0xB000_0000 else 0x8000_0000
        self.below_4g = min(below_4g, self.size)
        self.path = os.fspath(path)

    def _offset(self, gpa: int, size: int) -> int:
        if 0 <= gpa and gpa + size <= self.below_4g:
            return gpa
        if gpa >= _FOUR_GIB:
            off = self.below_4g + (gpa - _FOUR_GIB)
            if off + size <= self.size:
                return off
        raise UnreadableMemory(gpa, "not guest RAM", physical=True)

    def read(self, gpa: int, size: int) -> bytes:
        if size < 0:
            raise ValueError("negative size")
        off = self._offset(gpa, size)
        return self._map[off:off + size]

    def read_u64(self, gpa: int) -> int:
        return _U64.unpack_from(self._map, self._offset(gpa, 8))[0]

    def close(self) -> None:
        self._map.close()


class SessionSource:
    """Physical reads through a KVMI session (READ_PHYSICAL); host errors become UnreadableMemory."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def read(self, gpa: int, size: int) -> bytes:
        from tracer.kvmi.errors import CommandError

        try:
            data = self._session.read_physical(gpa, size)
        except CommandError as exc:  # the host's answer (e.g. -KVM_EINVAL): not readable;
            # a closed connection or a timeout is not the guest's doing and propagates
            raise UnreadableMemory(gpa, f"host refused: {exc}", physical=True) from exc
        if len(data) != size:
            raise UnreadableMemory(gpa, f"host returned {len(data)} of {size} bytes", physical=True)
        return bytes(data)


@dataclass(frozen=True, slots=True)
class CString:
    """A bounded C string read from the guest.

    `truncated`: `max_len` bytes were read without finding the terminating NUL.
    `error_address`: reading stopped at this unreadable address before a NUL was found.
    """

    data: bytes
    truncated: bool = False
    error_address: int | None = None

    @property
    def complete(self) -> bool:
        return not self.truncated and self.error_address is None

    def text(self) -> str:
        return self.data.decode("utf-8", errors="backslashreplace")


def is_canonical(gva: int) -> bool:
    top = gva >> 47
    return top == 0 or top == 0x1FFFF


def is_kernel_address(gva: int) -> bool:
    return gva >> 47 == 0x1FFFF


KERNEL_IMAGE_START = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map: kernel text, data, bss


class GuestMemory:
    """Virtual and physical reads over one guest's physical memory (4-level paging).

    Only translations that cannot change while the kernel runs are cached, and shared by all
    address spaces (every page table maps them alike): the kernel image (from __START_KERNEL_map) and, once `set_direct_map` has told where it is,
    the direct map of physical memory (task structs, slab objects). vmalloc space (kernel
    stacks, modules) is remapped when freed and reused, and user page tables change under
    mmap/munmap without any CR3 write: those are walked on every read. `invalidate()` drops
    the cache.
    """

    def __init__(self, source: PhysicalSource, cache_entries: int = 4096) -> None:
        self.source = source
        self._cache: dict[int, int] = {}  # virtual page -> physical page
        self._cache_entries = cache_entries
        self._direct_map = (0, 0)
        self._read_u64 = getattr(source, "read_u64", None) or self._read_u64_generic
        self.walks = 0
        self.cache_hits = 0

    # -- physical ---------------------------------------------------------------------------
    def read_physical(self, gpa: int, size: int) -> bytes:
        if not 0 <= size <= MAX_READ:
            raise ValueError(f"read size {size} out of bounds")
        return self.source.read(gpa, size)

    def _read_u64_generic(self, gpa: int) -> int:
        return _U64.unpack(self.source.read(gpa, 8))[0]

    # -- translation ------------------------------------------------------------------------
    def set_direct_map(self, start: int, size: int) -> None:
        """Also cache translations in [start, start+size): the kernel's direct map of RAM."""
        self._direct_map = (start, start + size)

    def invalidate(self) -> None:
        """Forget every cached translation."""
        self._cache.clear()

    def translate(self, cr3: int, gva: int) -> int:
        """Guest-physical address of `gva` under page tables rooted at `cr3`."""
        root = cr3 & _ADDR_MASK  # drops PCID (bits 0..11) and the no-flush bit 63
        page = gva & PAGE_MASK
        stable = gva >= KERNEL_IMAGE_START or self._direct_map[0] <= gva < self._direct_map[1]
        if stable:
            hit = self._cache.get(page)
            if hit is not None:
                self.cache_hits += 1
                return hit | (gva & (PAGE_SIZE - 1))
        gpa = self._walk(root, gva)
        if stable:
            if len(self._cache) >= self._cache_entries:
                self._cache.clear()  # small and simple: start over rather than track recency
            self._cache[page] = gpa & PAGE_MASK
        return gpa

    def _walk(self, root: int, gva: int) -> int:
        if not is_canonical(gva):
            raise UnreadableMemory(gva, "non-canonical address")
        self.walks += 1
        read_u64 = self._read_u64
        table = root
        # Levels: PML4 (shift 39), PDPT (30, may map 1 GiB), PD (21, may map 2 MiB), PT (12).
        for shift in (39, 30, 21, 12):
            entry_addr = table + ((gva >> shift) & 0x1FF) * 8
            try:
                entry = read_u64(entry_addr)
            except UnreadableMemory as exc:
                raise UnreadableMemory(gva, f"page table at gpa {entry_addr:#x} outside RAM") from exc
            if not entry & _PRESENT:
                raise UnreadableMemory(gva, f"not present (level shift {shift})")
            if shift in (30, 21) and entry & _PAGE_SIZE_BIT:
                size_mask = (1 << shift) - 1
                return (entry & _ADDR_MASK & ~size_mask) | (gva & size_mask)
            table = entry & _ADDR_MASK
        return table | (gva & (PAGE_SIZE - 1))

    # -- virtual reads ----------------------------------------------------------------------
    def read_virtual(self, cr3: int, gva: int, size: int) -> bytes:
        """`size` bytes at `gva`, crossing pages; raises UnreadableMemory at the first bad byte."""
        if not 0 <= size <= MAX_READ:
            raise ValueError(f"read size {size} out of bounds")
        gva &= 0xFFFF_FFFF_FFFF_FFFF
        first_room = PAGE_SIZE - (gva & (PAGE_SIZE - 1))
        if size <= first_room:  # the common case: one page
            return self._read_physical_for(gva, self.translate(cr3, gva), size)
        parts = []
        addr, left = gva, size
        while left > 0:
            chunk = min(left, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            parts.append(self._read_physical_for(addr, self.translate(cr3, addr), chunk))
            addr = (addr + chunk) & 0xFFFF_FFFF_FFFF_FFFF
            left -= chunk
        return b"".join(parts)

    def _read_physical_for(self, gva: int, gpa: int, size: int) -> bytes:
        try:
            return self.source.read(gpa, size)
        except UnreadableMemory as exc:
            raise UnreadableMemory(gva, f"maps to gpa {gpa:#x} outside RAM") from exc

    def read_u64(self, cr3: int, gva: int) -> int:
        return _U64.unpack(self.read_virtual(cr3, gva, 8))[0]

    def read_u32(self, cr3: int, gva: int) -> int:
        return int.from_bytes(self.read_virtual(cr3, gva, 4), "little")

    def read_int(self, cr3: int, gva: int, size: int, signed: bool = False) -> int:
        return int.from_bytes(self.read_virtual(cr3, gva, size), "little", signed=signed)

    def read_cstring(self, cr3: int, gva: int, max_len: int = 4096) -> CString:
        """The NUL-terminated string at `gva`, at most `max_len` bytes (NUL excluded).

        Never raises for guest faults: an unreadable page ends the string with
        `error_address` set; hitting `max_len` sets `truncated`.
        """
        if not 0 <= max_len <= MAX_READ:
            raise ValueError(f"max_len {max_len} out of bounds")
        parts: list[bytes] = []
        got = 0
        addr = gva & 0xFFFF_FFFF_FFFF_FFFF
        while got < max_len + 1:  # one byte past max_len tells a NUL at exactly max_len apart
            chunk = min(max_len + 1 - got, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            try:
                data = self.read_virtual(cr3, addr, chunk)
            except UnreadableMemory as exc:
                return CString(b"".join(parts), error_address=exc.address)
            nul = data.find(b"\0")
            if nul >= 0:
                parts.append(data[:nul])
                return CString(b"".join(parts))
            parts.append(data)
            got += chunk
            addr = (addr + chunk) & 0xFFFF_FFFF_FFFF_FFFF
        return CString(b"".join(parts)[:max_len], truncated=True)

    def read_pointer_array(self, cr3: int, gva: int, max_count: int,
                           width: int = 8) -> tuple[list[int], bool]:
        """A NULL-terminated array of pointers (argv/envp) of `width` bytes each (4: a 32-bit
        caller's): (pointers, truncated).

        Raises UnreadableMemory if the array itself becomes unreadable; `truncated` means
        `max_count` pointers were read without meeting the NULL.
        """
        fmt = "<Q" if width == 8 else "<I"
        pointers: list[int] = []
        addr = gva
        while len(pointers) < max_count:
            room = (PAGE_SIZE - (addr & (PAGE_SIZE - 1))) // width or 1
            count = min(room, max_count - len(pointers))
            data = self.read_virtual(cr3, addr, count * width)
            for (value,) in struct.iter_unpack(fmt, data):
                if value == 0:
                    return pointers, False
                pointers.append(value)
            addr += count * width
        # Exactly max_count pointers: truncated unless the next slot is the NULL.
        try:
            return pointers, self.read_virtual(cr3, addr, width) != bytes(width)
        except UnreadableMemory:
            return pointers, True


class CapturedMemory:
    """Guest memory as a host copied it at an event (pointer captures: objects with `gva`,
    `data` and `faulted`), in front of the live memory.

    Reads that a capture holds are answered from it, with the fault it met where it stopped
    (as the live read would have raised then); any other read goes to `live` and is counted
    in `live_reads`: after a vCPU ran on, such a read may see what the guest wrote since.
    """

    def __init__(self, live: GuestMemory, captures: Sequence[Any]) -> None:
        self.live = live
        self.captures = captures
        self.live_reads = 0

    def _capture_at(self, gva: int, size: int) -> Any:
        """A capture holding `size` bytes at `gva`, or one that stopped at a fault inside
        them (its end included: the fault is then at `gva`)."""
        for capture in self.captures:
            start = gva - capture.gva
            if 0 <= start and (start + size <= len(capture.data) or
                               (capture.faulted and start <= len(capture.data))):
                return capture
        return None

    def read_virtual(self, cr3: int, gva: int, size: int) -> bytes:
        capture = self._capture_at(gva, size)
        if capture is not None:
            start = gva - capture.gva
            if start + size <= len(capture.data):
                return capture.data[start:start + size]
            raise UnreadableMemory(capture.gva + len(capture.data), "unmapped at the event")
        self.live_reads += 1
        return self.live.read_virtual(cr3, gva, size)

    def read_u32(self, cr3: int, gva: int) -> int:
        return int.from_bytes(self.read_virtual(cr3, gva, 4), "little")

    def read_cstring(self, cr3: int, gva: int, max_len: int = 4096) -> CString:
        """As GuestMemory.read_cstring, from a capture that holds the string's end (its NUL,
        `max_len` + 1 bytes, or the fault that stopped it)."""
        capture = self._capture_at(gva, 1)  # a string's capture holds its NUL, or faulted
        if capture is not None:
            data = capture.data[gva - capture.gva:]
            nul = data.find(b"\0", 0, max_len + 1)
            if nul >= 0:
                return CString(data[:nul])
            if len(data) > max_len:
                return CString(data[:max_len], truncated=True)
            if capture.faulted:
                return CString(data, error_address=capture.gva + len(capture.data))
        self.live_reads += 1
        return self.live.read_cstring(cr3, gva, max_len)

    def read_pointer_array(self, cr3: int, gva: int, max_count: int,
                           width: int = 8) -> tuple[list[int], bool]:
        self.live_reads += 1  # never captured (argv and envp: their calls wait)
        return self.live.read_pointer_array(cr3, gva, max_count, width)
