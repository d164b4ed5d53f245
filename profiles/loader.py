"""`profiles.load(path) -> LinuxProfile`: the profile API the tracer uses.

A LinuxProfile wraps a volatility3 symbol table (context + LinuxKernelIntermedSymbols, created
with a full 64-bit symbol_mask so kernel addresses are not cut to 48 bits) and precomputes the
answers the tracer's hot paths need, because building a volatility3 object costs ~170 us:
field offsets, struct sizes, symbol addresses, the syscall table and the per-CPU current task
offset are plain dict lookups.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import isf as isf_mod
from . import kaslr
from .errors import BadISF, GuestError

FULL_MASK = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Syscall:
    nr: int
    name: str
    args: tuple[tuple[str, str], ...] | None  # ((c_type, arg_name), ...); None if unknown


class LinuxProfile:
    def __init__(self, path: str | os.PathLike[str], isf: dict | None = None) -> None:
        self.path = Path(path).resolve()
        self._isf = isf if isf is not None else isf_mod.read_json(self.path)
        isf_mod.check_format(self._isf, str(self.path))
        symbols = self._isf["symbols"]
        self._symbols = {name: int(entry["address"]) for name, entry in symbols.items()
                         if not name.startswith(isf_mod.RECORD_PREFIX)}
        banner_entry = symbols.get("linux_banner", {})
        if "constant_data" not in banner_entry:
            raise BadISF(f"{self.path}: no linux_banner with constant_data: not a Linux kernel profile")
        import base64

        self.banner_bytes: bytes = base64.b64decode(banner_entry["constant_data"]).rstrip(b"\0")
        self.banner: str = self.banner_bytes.decode("latin-1")
        self.provenance: dict[str, Any] = isf_mod.embedded(self._isf, "provenance") or {
            "source": "external ISF (no vmitrace provenance record)"}
        record = isf_mod.embedded(self._isf, "syscalls") or {}
        self.syscall_record = record
        self.syscalls: dict[int, Syscall] = _syscalls(record.get("x86_64", {}))
        self.syscalls_ia32: dict[int, Syscall] = _syscalls(record.get("ia32", {}))
        self._context: Any = None
        self._table_name: str | None = None

    # --- counts and raw access ---------------------------------------------------------------
    @property
    def isf(self) -> dict:
        return self._isf

    def counts(self) -> dict[str, int]:
        return {"symbols": len(self._symbols), "user_types": len(self._isf["user_types"]),
                "enums": len(self._isf["enums"]), "base_types": len(self._isf["base_types"]),
                "syscalls_x86_64": len(self.syscalls), "syscalls_ia32": len(self.syscalls_ia32)}

    # --- hot-path accessors --------------------------------------------------------------------
    def symbol(self, name: str) -> int:
        """Link-time address of `name`; KeyError if the kernel has no such symbol."""
        return self._symbols[name]

    def has_symbol(self, name: str) -> bool:
        return name in self._symbols

    @functools.lru_cache(maxsize=None)
    def _fields(self, struct: str) -> dict[str, tuple[int, dict]]:
        """Fields of `struct` with anonymous struct/union members flattened (as volatility3 does)."""
        user = self._isf["user_types"].get(struct)
        if user is None:
            raise KeyError(f"no struct or union named {struct!r} in {self.path.name}")
        out: dict[str, tuple[int, dict]] = {}

        def walk(fields: dict, base: int, depth: int) -> None:
            for name, field in fields.items():
                off = base + field["offset"]
                if field.get("anonymous") and depth < 16:
                    inner = self._isf["user_types"].get(field["type"].get("name", ""), {})
                    walk(inner.get("fields", {}), off, depth + 1)
                else:
                    out.setdefault(name, (off, field["type"]))
        walk(user["fields"], 0, 0)
        return out

    def offset(self, struct: str, field: str) -> int:
        """Byte offset of `field` (dotted paths allowed: "thread_info.flags") in `struct`."""
        total, current = 0, struct
        for part in field.split("."):
            try:
                off, ftype = self._fields(current)[part]
            except KeyError:
                raise KeyError(f"{current} has no field {part!r}") from None
            total += off
            current = ftype.get("name", "")
        return total

    def has_field(self, struct: str, field: str) -> bool:
        try:
            self.offset(struct, field)
            return True
        except KeyError:
            return False

    def field_type(self, struct: str, field: str) -> dict:
        return self._fields(struct)[field][1]

    def size(self, struct: str) -> int:
        try:
            return int(self._isf["user_types"][struct]["size"])
        except KeyError:
            raise KeyError(f"no struct or union named {struct!r} in {self.path.name}") from None

    @functools.cached_property
    def current_task_offset(self) -> int:
        """Per-CPU offset of the current task pointer (add the kernel GS base of the vCPU).

        6.1: the per-CPU variable `current_task`; 6.12: `pcpu_hot.current_task`.
        """
        if self.has_symbol("current_task"):
            return self.symbol("current_task")
        if self.has_symbol("pcpu_hot"):
            return self.symbol("pcpu_hot") + self.offset("pcpu_hot", "current_task")
        raise KeyError("profile has neither current_task nor pcpu_hot")

    # --- KASLR ------------------------------------------------------------------------------------
    def kaslr_slide(self, lstar: int) -> int:
        """Virtual slide from the LSTAR MSR (runtime entry_SYSCALL_64); raises GuestError if it cannot be."""
        return kaslr.slide_from_lstar(self.symbol("entry_SYSCALL_64"), lstar)

    def confirm_slide(self, slide: int, read_virtual: Callable[[int, int], bytes]) -> bool:
        """True if linux_banner reads back at its slid address through `read_virtual(gva, size)`."""
        return kaslr.banner_matches(read_virtual, self.symbol("linux_banner"), self.banner_bytes, slide)

    def find_slide(self, read_virtual: Callable[[int, int], bytes], *, lstar: int | None = None,
                   read_physical: Callable[[int, int], bytes] | None = None, physical_size: int = 0) -> int:
        """The slide from LSTAR, else from a banner scan of physical memory; confirmed by the banner."""
        tried = []
        if lstar is not None:
            try:
                slide = self.kaslr_slide(lstar)
                if self.confirm_slide(slide, read_virtual):
                    return slide
                tried.append(f"LSTAR gives {slide:#x} but linux_banner does not read back there")
            except GuestError as exc:
                tried.append(str(exc))
        if read_physical is not None and physical_size:
            for slide in kaslr.slide_from_physical(read_physical, physical_size, self.banner_bytes, self._symbols):
                if self.confirm_slide(slide, read_virtual):
                    return slide
                tried.append(f"banner scan gives {slide:#x} but linux_banner does not read back there")
        raise GuestError("KASLR slide not found: " + ("; ".join(tried) or "no LSTAR and no physical memory given"))

    # --- volatility3 -------------------------------------------------------------------------------
    @property
    def context(self) -> Any:
        self._ensure_table()
        return self._context

    @property
    def table_name(self) -> str:
        self._ensure_table()
        assert self._table_name is not None
        return self._table_name

    def _ensure_table(self) -> None:
        if self._context is not None:
            return
        import volatility3.framework.symbols.linux.extensions.network  # noqa: F401 (the table needs it loaded)
        from volatility3.framework import contexts
        from volatility3.framework.symbols.linux import LinuxKernelIntermedSymbols

        context = contexts.Context()
        name = context.symbol_space.free_table_name("vmitrace")
        table = LinuxKernelIntermedSymbols(context, f"vmitrace.{name}", name=name,
                                           isf_url=self.path.as_uri(), validate=False,
                                           symbol_mask=FULL_MASK)
        context.symbol_space.append(table)
        self._context, self._table_name = context, name

    def module(self, layer_name: str, slide: int) -> Any:
        """A volatility3 module for the kernel in `layer_name` (a layer of `self.context`)."""
        return self.context.module(self.table_name, layer_name, offset=slide)


def _syscalls(entries: dict[str, dict]) -> dict[int, Syscall]:
    out = {}
    for nr, entry in entries.items():
        args = entry.get("args")
        out[int(nr)] = Syscall(int(nr), entry["name"], tuple((t, n) for t, n in args) if args is not None else None)
    return out


def load(path: str | os.PathLike[str]) -> LinuxProfile:
    return LinuxProfile(path)
