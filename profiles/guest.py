"""Build a profile from a running guest's memory (KVMI session, RAM file or raw dump).

The x86-64 kernel image (text, rodata, data) is loaded physically contiguous, and its BTF
(__start_BTF..__stop_BTF) and kallsyms tables stay in memory for the kernel's lifetime. So:

1. find candidate `linux_banner` copies in physical memory ("Linux version ..."), nearest to a
   hint first (the physical page of LSTAR when a KVMI session can translate it);
2. read a window around a candidate and decode the kallsyms tables in it (runtime addresses);
   the banner's runtime address places `_text` physically; the decoded table positions must
   agree with that placement, which rejects stale copies (page cache, log buffer);
3. get the KASLR slide from the kernel's own vmcoreinfo note (KERNELOFFSET=, through the
   vmcoreinfo_data pointer and page_offset_base), falling back to the x86-64 default link
   address (0xffffffff81000000); LSTAR, when known, must equal the runtime entry_SYSCALL_64;
4. hand the kernel [_text, __bss_start) to the same builder the image path uses, with the slide,
   so the ISF holds link-time addresses and equals the image-built one.
"""
from __future__ import annotations

import re
import struct
from typing import Any

from . import kallsyms
from .build import build_from_memory
from .errors import GuestError, NoKallsyms, ProfileError
from .image import START_KERNEL_MAP, KernelMemory
from .kaslr import KASLR_ALIGN, scan_physical

MSR_LSTAR = 0xC000_0082
DEFAULT_LINK_TEXT = START_KERNEL_MAP + 0x100_0000  # CONFIG_PHYSICAL_START=0x1000000
WINDOW_BEFORE = 48 << 20
WINDOW_AFTER = 48 << 20
MAX_KERNEL_IMAGE = 256 << 20
MAX_CANDIDATES = 32
MAX_PROBE = 64 << 30


class _Reader:
    """Physical reads from any source vmitrace knows, and the size of guest RAM."""

    def __init__(self, source: Any, physical_size: int | None) -> None:
        from tracer import memory

        self.session = source if hasattr(source, "read_physical") and hasattr(source, "get_registers") else None
        if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
            source = memory.RamFile(source)
        elif self.session is not None:
            source = memory.SessionSource(source)
        if not hasattr(source, "read"):
            raise GuestError(f"cannot read guest memory from {type(source).__name__}: give a KVMI Session, "
                             "a tracer.memory physical source or a RAM file path")
        self.source = source
        self.size = physical_size or getattr(source, "size", None) or self._probe_size()

    def read(self, gpa: int, size: int) -> bytes:
        from tracer.memory import UnreadableMemory

        out = bytearray()
        step = 1 << 20
        for pos in range(gpa, gpa + size, step):
            n = min(step, gpa + size - pos)
            try:
                out += self.source.read(pos, n)
            except UnreadableMemory as exc:
                raise GuestError(f"guest memory unreadable at {pos:#x}: {exc.reason}") from exc
        return bytes(out)

    def _probe_size(self) -> int:
        """Largest readable RAM below MAX_PROBE, found by binary search on 2 MiB granules."""
        lo, hi = 0, MAX_PROBE // KASLR_ALIGN
        while lo < hi:
            mid = (lo + hi + 1) // 2
            try:
                self.source.read(mid * KASLR_ALIGN - 8, 8)
                lo = mid
            except Exception:
                hi = mid - 1
        if lo == 0:
            raise GuestError("guest memory is unreadable")
        return lo * KASLR_ALIGN


def _registers(reader: _Reader) -> tuple[int | None, int | None]:
    """(LSTAR, its guest-physical address) from a KVMI session, or (None, None)."""
    if reader.session is None:
        return None, None
    try:
        regs = reader.session.get_registers(0, msrs=[MSR_LSTAR])
        lstar = regs.msrs[MSR_LSTAR]
        return lstar, reader.session.translate_gva(0, lstar)
    except Exception:  # a host that refuses either command: fall back to scanning
        return None, None


def _vmcoreinfo_offset(read_runtime: Any, symbols: dict[str, int], reader: _Reader) -> int | None:
    """KERNELOFFSET from the kernel's vmcoreinfo note, or None if the kernel has none."""
    if "vmcoreinfo_data" not in symbols or "page_offset_base" not in symbols:
        return None
    try:
        data_ptr = struct.unpack("<Q", read_runtime(symbols["vmcoreinfo_data"], 8))[0]
        page_offset = struct.unpack("<Q", read_runtime(symbols["page_offset_base"], 8))[0]
        if not data_ptr or data_ptr < page_offset:
            return None
        note = reader.read(data_ptr - page_offset, 4096)
    except (GuestError, IndexError):
        return None
    match = re.search(rb"\nKERNELOFFSET=([0-9a-f]+)\n", b"\n" + note.split(b"\0", 1)[0])
    return int(match.group(1), 16) if match else None


def locate(reader: _Reader, hint_gpa: int | None = None) -> tuple[int, dict[str, int], bytes]:
    """(physical address of _text, runtime symbol addresses, banner) of the running kernel."""
    regions = [(0, reader.size)]
    if hint_gpa is not None:  # the kernel is near the page LSTAR points into: look there first
        regions.insert(0, (max(0, hint_gpa - WINDOW_BEFORE - WINDOW_AFTER), min(reader.size, hint_gpa + WINDOW_AFTER)))
    failures: list[str] = []
    tried: set[int] = set()
    for lo, hi in regions:
        hits = [h for h in scan_physical(reader.read, hi, b"Linux version ", limit=256, start=lo)
                if h not in tried and _looks_like_banner(reader, h)]
        if hint_gpa is not None:
            hits.sort(key=lambda h: abs(h - hint_gpa))
        tried.update(hits)
        found = _try_candidates(reader, hits, failures)
        if found is not None:
            return found
    if not tried:
        raise GuestError("no 'Linux version' banner in guest memory: not a Linux guest, or RAM not readable")
    raise GuestError("found no running kernel behind the banners in guest memory: " + "; ".join(failures[:4]))


def _try_candidates(reader: _Reader, hits: list[int], failures: list[str]) -> tuple[int, dict[str, int], bytes] | None:
    for hit in hits[:MAX_CANDIDATES]:
        lo = max(0, (hit - WINDOW_BEFORE) & ~(KASLR_ALIGN - 1))
        hi = min(reader.size, hit + WINDOW_AFTER)
        window = reader.read(lo, hi - lo)
        km = KernelMemory(window, START_KERNEL_MAP, 0, "guest-window")
        try:
            tables, symbol_list = kallsyms.find_tables(km)
        except NoKallsyms as exc:
            failures.append(f"{hit:#x}: {exc}")
            continue
        runtime = {}
        for sym in symbol_list:
            runtime.setdefault(sym.name, sym.address)
        if not all(n in runtime for n in ("_text", "linux_banner")):
            failures.append(f"{hit:#x}: kallsyms lacks _text or linux_banner")
            continue
        phys_text = hit - (runtime["linux_banner"] - runtime["_text"])
        # The token table we decoded must sit where the kernel's layout puts it.
        if "kallsyms_token_table" in runtime:
            expected = phys_text + runtime["kallsyms_token_table"] - runtime["_text"]
            if expected != lo + tables.token_table - km.base:
                failures.append(f"{hit:#x}: kallsyms tables not where this banner places the kernel")
                continue
        if "sys_call_table" in runtime and "__x64_sys_read" in runtime:
            at = phys_text + runtime["sys_call_table"] - runtime["_text"] - lo
            if not 0 <= at <= len(window) - 8 or struct.unpack_from("<Q", window, at)[0] != runtime["__x64_sys_read"]:
                failures.append(f"{hit:#x}: sys_call_table[0] is not read() where this banner places the kernel")
                continue
        if phys_text < 0 or phys_text % 0x1000:
            failures.append(f"{hit:#x}: implied _text at {phys_text:#x} is not page aligned")
            continue
        banner = window[hit - lo:window.index(b"\0", hit - lo)] if b"\0" in window[hit - lo:] else b""
        return phys_text, runtime, banner
    return None


def _looks_like_banner(reader: _Reader, gpa: int) -> bool:
    try:
        text = reader.read(gpa, 512)
    except GuestError:
        return False
    end = text.find(b"\0")
    return end > 20 and text[end - 1:end] == b"\n" and b"\n" not in text[:end - 1]


def build_from_guest(source: Any, *, physical_size: int | None = None, lstar: int | None = None,
                     hint_gpa: int | None = None) -> dict:
    """ISF of the kernel running in a guest: `source` is a KVMI Session, a tracer.memory
    physical source, or a path of a RAM file / raw dump (guest-physical address = offset)."""
    reader = _Reader(source, physical_size)
    if lstar is None:
        lstar, lstar_gpa = _registers(reader)
        hint_gpa = hint_gpa if hint_gpa is not None else lstar_gpa
    phys_text, runtime, banner = locate(reader, hint_gpa)
    runtime_text = runtime["_text"]

    def read_runtime(addr: int, size: int) -> bytes:
        if not 0 <= addr - runtime_text < MAX_KERNEL_IMAGE:
            raise IndexError(f"{addr:#x} is outside the kernel image")
        return reader.read(phys_text + addr - runtime_text, size)

    offset = _vmcoreinfo_offset(read_runtime, runtime, reader)
    slide_source = "vmcoreinfo KERNELOFFSET"
    if offset is None:
        offset, slide_source = runtime_text - DEFAULT_LINK_TEXT, "x86-64 default link address 0xffffffff81000000"
    if offset % KASLR_ALIGN:
        raise GuestError(f"KASLR offset {offset:#x} from {slide_source} is not 2 MiB aligned")
    if lstar is not None and "entry_SYSCALL_64" in runtime and lstar != runtime["entry_SYSCALL_64"]:
        raise GuestError(f"LSTAR {lstar:#x} is not the running kernel's entry_SYSCALL_64 "
                         f"({runtime['entry_SYSCALL_64']:#x}): syscall entry hooked or wrong kernel")
    end = runtime.get("__bss_start") or runtime.get("_edata")
    if end is None or not 0 < end - runtime_text <= MAX_KERNEL_IMAGE:
        raise GuestError("kallsyms gives no sane end of the kernel image (__bss_start/_edata)")
    image = reader.read(phys_text, end - runtime_text)
    km = KernelMemory(image, runtime_text - offset, offset, "guest")
    provenance = {"source": "guest", "input": _describe(source), "physical_text": f"{phys_text:#x}",
                  "kaslr_slide": f"{offset:#x}", "slide_source": slide_source,
                  "lstar_checked": lstar is not None}
    try:
        return build_from_memory(km, provenance)
    except ProfileError:
        raise
    except IndexError as exc:
        raise GuestError(f"kernel image in guest memory is incomplete: {exc}") from exc


def _describe(source: Any) -> str:
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        return f"RAM file {source}"
    name = getattr(source, "name", None)
    return f"{type(source).__name__}{' ' + str(name) if name else ''}"


def build_from_guest_cli(*, lab: bool, kernel: str | None, ram: str | None) -> dict:
    """`vmitrace profile build --from-guest`: from a RAM file / raw dump, or from a lab guest
    booted with the vmitrace KVMI plugin, read through a KVMI session."""
    if ram:
        return build_from_guest(ram)
    if not lab:
        raise GuestError("--from-guest needs --ram FILE or --lab")
    import os
    import shutil
    import tempfile
    import threading

    import guestlab
    from tracer.kvmi.errors import KvmiError
    from tracer.kvmi.transport import Listener

    series = kernel or "6.1"
    if series not in guestlab.KERNELS:
        raise GuestError(f"--lab --kernel takes a lab kernel series ({', '.join(guestlab.KERNELS)}), not {series!r}")
    tmp = tempfile.mkdtemp(prefix="vmitrace-profile-")
    sock = os.path.join(tmp, "kvmi.sock")
    listener = Listener("unix:" + sock)
    stop = threading.Event()
    guest = guestlab.Guest(kernel=series, plugin_options={"socket": sock})
    try:
        return _build_over_kvmi(guest, listener, stop)
    except (guestlab.GuestError, guestlab.BuildError, KvmiError) as exc:
        raise GuestError(f"lab guest {series}: {exc}") from exc
    finally:
        stop.set()
        guest.stop()
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _build_over_kvmi(guest: Any, listener: Any, stop: Any) -> dict:
    """Boot `guest`, accept its plugin's KVMI session, answer its events, build from it."""
    import threading

    from tracer.kvmi import abi

    guest.start()
    session = listener.accept(timeout=120)
    if session is None:
        raise GuestError("the lab guest's KVMI plugin did not connect")

    def answer_events() -> None:  # the introspector must answer every event it gets
        while not stop.is_set():
            try:
                event = session.next_event(0.2)
                if event is not None:
                    session.reply(event, abi.KVMI_EVENT_ACTION_CONTINUE)
            except Exception:
                return

    threading.Thread(target=answer_events, daemon=True).start()
    guest.wait_ready(guest.boot_timeout)
    return build_from_guest(session)
