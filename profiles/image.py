"""Kernel images: bzImage payload decompression and a flat view of the vmlinux ELF.

A bzImage (vmlinuz) carries the real kernel, an ELF vmlinux, as a compressed payload whose
place the setup header announces (payload_offset / payload_length, boot protocol >= 2.08).
The vmlinux is flattened into `KernelMemory`: its loadable segments laid out by link-time
virtual address, so the same finders work on an image and on a guest's memory.
"""
from __future__ import annotations

import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field

from .errors import NotAKernel, TruncatedImage

# x86-64 kernels are linked at __START_KERNEL_map (0xffffffff80000000) + CONFIG_PHYSICAL_START.
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
# Largest decompressed vmlinux accepted: guards against decompression bombs.
MAX_VMLINUX = 1 << 30
# Largest flattened kernel address range accepted (text + rodata + data + bss).
MAX_KERNEL_SPAN = 512 << 20

_MAGICS = [
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x1f\x8b", "gzip"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzo"),
]


@dataclass
class KernelMemory:
    """Kernel memory addressed by link-time virtual address.

    `data[i]` is the byte at link-time address `base + i` (for a guest: the byte the running
    kernel holds there). Pointers stored in the data are runtime values: subtract `slide` to get
    link-time addresses (slide is 0 for an image on disk).
    """

    data: bytes | bytearray | memoryview
    base: int
    slide: int = 0
    origin: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    def contains(self, addr: int, size: int = 1) -> bool:
        return self.base <= addr and addr + size <= self.base + len(self.data)

    def read(self, addr: int, size: int) -> bytes:
        if size < 0 or not self.contains(addr, size):
            raise IndexError(f"kernel address {addr:#x}+{size:#x} outside the kernel image")
        off = addr - self.base
        return bytes(self.data[off:off + size])

    def u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.read(addr, 8))[0]

    def pointer(self, addr: int) -> int:
        """A kernel pointer stored at `addr`, as a link-time address (0 stays 0)."""
        value = self.u64(addr)
        return value - self.slide if value else 0

    def cstring(self, addr: int, limit: int = 4096) -> bytes:
        if not self.contains(addr):
            raise IndexError(f"string at {addr:#x} outside the kernel image")
        off = addr - self.base
        end = min(len(self.data), off + limit)
        chunk = bytes(self.data[off:end])
        nul = chunk.find(b"\0")
        return chunk if nul < 0 else chunk[:nul]


def detect_compression(payload: bytes) -> str | None:
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    return None


def _decompress(kind: str, payload: bytes) -> bytes:
    try:
        if kind == "xz":
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=1 << 31)
            out = dec.decompress(payload, MAX_VMLINUX)
            if not dec.eof:
                raise TruncatedImage("xz payload ends before its end marker (truncated image?)")
            return out
        if kind == "gzip":
            dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = dec.decompress(payload, MAX_VMLINUX)
            if not dec.eof:
                raise TruncatedImage("gzip payload ends before its end (truncated image?)")
            return out
        if kind == "zstd":
            import zstandard

            dobj = zstandard.ZstdDecompressor().decompressobj()
            out = dobj.decompress(payload)
            if not dobj.eof:
                raise TruncatedImage("zstd payload ends before its end (truncated image?)")
            return out
        if kind == "lz4":
            return _lz4_legacy(payload)
    except (lzma.LZMAError, zlib.error, EOFError, gzip.BadGzipFile) as exc:
        raise TruncatedImage(f"{kind} payload does not decompress: {exc} (truncated or corrupt image?)") from exc
    except Exception as exc:  # zstandard.ZstdError and lz4 errors have no common base
        if isinstance(exc, TruncatedImage):
            raise
        raise TruncatedImage(f"{kind} payload does not decompress: {exc}") from exc
    raise NotAKernel(f"bzImage payload compressed with {kind}, which vmitrace does not unpack "
                     "(supported: xz, zstd, gzip, lz4)")


def _lz4_legacy(payload: bytes) -> bytes:
    """The kernel's lz4 format: legacy frame, blocks of [u32 size][lz4 block] of <= 8 MiB out."""
    import lz4.block

    pos, out, total = 4, [], 0
    while pos + 4 <= len(payload):
        (size,) = struct.unpack_from("<I", payload, pos)
        if size == 0x184C2102:  # a concatenated frame starts again
            pos += 4
            continue
        pos += 4
        if size == 0 or pos + size > len(payload):
            # The kernel appends the decompressed size after the last block; stop there.
            break
        block = lz4.block.decompress(payload[pos:pos + size], uncompressed_size=8 << 20)
        out.append(block)
        total += len(block)
        if total > MAX_VMLINUX:
            raise TruncatedImage("lz4 payload decompresses beyond 1 GiB")
        pos += size
    if not out:
        raise TruncatedImage("lz4 payload holds no complete block (truncated image?)")
    return b"".join(out)


def bzimage_payload(image: bytes) -> tuple[str, bytes]:
    """(compression, compressed payload) of a bzImage, or raise NotAKernel / TruncatedImage."""
    if len(image) < 0x270 or image[0x202:0x206] != b"HdrS":
        raise NotAKernel("not a Linux kernel: no bzImage setup header ('HdrS' at 0x202) and no ELF header")
    setup_sects = image[0x1F1] or 4
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        raise NotAKernel(f"bzImage boot protocol {version >> 8}.{version & 0xff} is older than 2.08 "
                         "(no payload fields)")
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    (syssize,) = struct.unpack_from("<I", image, 0x1F4)  # protected-mode part, 16-byte units
    expected = (setup_sects + 1) * 512 + syssize * 16
    if len(image) < expected:
        raise TruncatedImage(f"truncated bzImage: its header announces {expected} bytes, file has {len(image)}")
    start = (setup_sects + 1) * 512 + payload_offset
    if start + payload_length > len(image):
        raise TruncatedImage(f"truncated bzImage: payload needs {start + payload_length} bytes, "
                             f"file has {len(image)}")
    payload = image[start:start + payload_length]
    kind = detect_compression(payload)
    if kind is None:
        raise NotAKernel("bzImage payload has an unknown compression format")
    return kind, payload


def vmlinux_bytes(image: bytes) -> tuple[bytes, str]:
    """The ELF vmlinux inside `image` (a vmlinuz or already a vmlinux), and how it was packed."""
    if image[:4] == b"\x7fELF":
        return image, "vmlinux"
    kind, payload = bzimage_payload(image)
    vmlinux = _decompress(kind, payload)
    if vmlinux[:4] != b"\x7fELF":
        raise NotAKernel(f"bzImage {kind} payload is not an ELF vmlinux")
    return vmlinux, f"bzImage/{kind}"


@dataclass
class Section:
    name: str
    type: int
    addr: int
    offset: int
    size: int


class Elf64:
    """The few parts of an x86-64 ELF vmlinux the profile builder needs."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        if len(data) < 64 or data[:4] != b"\x7fELF":
            raise NotAKernel("not an ELF file")
        if data[4] != 2 or data[5] != 1:
            raise NotAKernel("not a 64-bit little-endian ELF (vmitrace reads x86-64 kernels)")
        (e_machine,) = struct.unpack_from("<H", data, 18)
        if e_machine != 62:
            raise NotAKernel(f"ELF machine {e_machine} is not x86-64")
        (self.phoff, self.shoff) = struct.unpack_from("<QQ", data, 32)
        (phentsize, phnum, shentsize, shnum, shstrndx) = struct.unpack_from("<HHHHH", data, 54)
        self.segments: list[tuple[int, int, int, int, int]] = []  # type, offset, vaddr, filesz, memsz
        for i in range(phnum):
            off = self.phoff + i * phentsize
            if off + 56 > len(data):
                raise TruncatedImage("truncated vmlinux: program headers past end of file")
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz = struct.unpack_from("<IIQQQQQ", data, off)
            self.segments.append((p_type, p_offset, p_vaddr, p_filesz, p_memsz))
        self.sections: list[Section] = []
        if self.shoff and shnum:
            if self.shoff + shnum * shentsize > len(data):
                raise TruncatedImage("truncated vmlinux: section headers past end of file")
            raw = []
            for i in range(shnum):
                off = self.shoff + i * shentsize
                sh_name, sh_type, _fl, sh_addr, sh_offset, sh_size = struct.unpack_from("<IIQQQQ", data, off)
                raw.append((sh_name, sh_type, sh_addr, sh_offset, sh_size))
            strtab = raw[shstrndx] if shstrndx < len(raw) else None
            for sh_name, sh_type, sh_addr, sh_offset, sh_size in raw:
                name = ""
                if strtab:
                    start = strtab[3] + sh_name
                    end = data.find(b"\0", start, start + 256)
                    name = data[start:end].decode("ascii", "replace") if end > 0 else ""
                self.sections.append(Section(name, sh_type, sh_addr, sh_offset, sh_size))

    def section(self, name: str) -> Section | None:
        for sec in self.sections:
            if sec.name == name:
                return sec
        return None

    def section_bytes(self, sec: Section) -> bytes:
        if sec.offset + sec.size > len(self.data):
            raise TruncatedImage(f"truncated vmlinux: section {sec.name} extends past end of file")
        return self.data[sec.offset:sec.offset + sec.size]

    def kernel_memory(self) -> KernelMemory:
        """Flatten the PT_LOAD segments mapped in the kernel's high half (per-CPU data at 0 is left out)."""
        loads = [s for s in self.segments if s[0] == 1 and s[2] >= START_KERNEL_MAP]
        if not loads:
            raise NotAKernel("ELF has no loadable segment at kernel addresses: not a Linux x86-64 vmlinux")
        base = min(s[2] for s in loads)
        end = max(s[2] + s[4] for s in loads)
        if end - base > MAX_KERNEL_SPAN:
            raise NotAKernel("ELF segments span more than 512 MiB: not a kernel image")
        flat = bytearray(end - base)
        for _t, p_offset, p_vaddr, p_filesz, _memsz in loads:
            if p_offset + p_filesz > len(self.data):
                raise TruncatedImage("truncated vmlinux: a segment extends past end of file")
            flat[p_vaddr - base:p_vaddr - base + p_filesz] = self.data[p_offset:p_offset + p_filesz]
        return KernelMemory(flat, base, 0, "image")


def read_image(path: str) -> tuple[Elf64, str]:
    """Open a vmlinuz or vmlinux file: (parsed ELF, packing description)."""
    try:
        with open(path, "rb") as f:
            image = f.read()
    except OSError as exc:
        raise NotAKernel(f"cannot read {path}: {exc.strerror}") from exc
    vmlinux, packing = vmlinux_bytes(image)
    return Elf64(vmlinux), packing
