"""Build a Linux ISF from kernel memory: kallsyms + BTF + linux_banner + syscall tables.

The same `build_from_memory` serves a kernel image on disk (flattened vmlinux) and a running
guest (its kernel read back from guest memory), so both produce the same profile.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import struct
from typing import Any

from . import __version__, btf, isf, kallsyms, syscalls
from .errors import CorruptKernel, NoBTF, NotAKernel
from .image import KernelMemory, read_image

# Global variables volatility3's Linux plugins read by symbol, and the C type each has.
# vmlinux BTF describes only per-CPU variables, so these come from the kernel source; every
# entry is checked against the BTF (the type must exist) and the symbol's extent in kallsyms.
KNOWN_VARIABLES: dict[str, dict] = {
    "init_task": {"kind": "struct", "name": "task_struct"},
    "init_mm": {"kind": "struct", "name": "mm_struct"},
    "init_files": {"kind": "struct", "name": "files_struct"},
    "init_fs": {"kind": "struct", "name": "fs_struct"},
    "init_nsproxy": {"kind": "struct", "name": "nsproxy"},
    "init_pid_ns": {"kind": "struct", "name": "pid_namespace"},
    "init_uts_ns": {"kind": "struct", "name": "uts_namespace"},
    "init_net": {"kind": "struct", "name": "net"},
    "init_cred": {"kind": "struct", "name": "cred"},
    "modules": {"kind": "struct", "name": "list_head"},
    "mod_tree": {"kind": "struct", "name": "mod_tree_root"},
    "module_kset": {"kind": "pointer", "subtype": {"kind": "struct", "name": "kset"}},
    "cap_last_cap": {"kind": "base", "name": "int"},
    "page_offset_base": {"kind": "base", "name": "long unsigned int"},
    "vmemmap_base": {"kind": "base", "name": "long unsigned int"},
    "vmalloc_base": {"kind": "base", "name": "long unsigned int"},
    "phys_base": {"kind": "base", "name": "long unsigned int"},
    "jiffies": {"kind": "base", "name": "long unsigned int"},
    "max_pfn": {"kind": "base", "name": "long unsigned int"},
    "nr_cpu_ids": {"kind": "base", "name": "unsigned int"},
    "_text": {"kind": "base", "name": "char"},
    "_etext": {"kind": "base", "name": "char"},
    "_stext": {"kind": "base", "name": "char"},
}
# A symbol's name picks the ISF entry; when kallsyms lists a name more than once (static
# symbols of different files), global symbols (upper-case type) win over local ones.


def _pick_symbols(symbols: list[kallsyms.Symbol]) -> dict[str, int]:
    chosen: dict[str, kallsyms.Symbol] = {}
    for sym in symbols:
        old = chosen.get(sym.name)
        if old is None or (old.type.islower() and sym.type.isupper()):
            chosen[sym.name] = sym
    return {name: sym.address for name, sym in chosen.items()}


def _extent(addresses: list[int], addr: int) -> int:
    """Bytes from `addr` to the next higher symbol address (an upper bound of the object size)."""
    import bisect

    i = bisect.bisect_right(addresses, addr)
    return addresses[i] - addr if i < len(addresses) else 0


def _syscall_layout(types: btf.IsfTypes) -> dict[str, int] | None:
    meta = types.user_types.get("syscall_metadata")
    if not meta or not all(f in meta["fields"] for f in ("name", "nb_args", "types", "args")):
        return None
    return {f: meta["fields"][f]["offset"] for f in ("name", "nb_args", "types", "args")}


def build_from_memory(km: KernelMemory, provenance: dict[str, Any]) -> dict:
    """The ISF of the kernel in `km` (see profiles.isf for the embedded vmitrace records)."""
    try:
        return _build(km, provenance)
    except (IndexError, struct.error) as exc:
        raise CorruptKernel(f"kernel data refers outside the kernel image: {exc}") from exc


def _build(km: KernelMemory, provenance: dict[str, Any]) -> dict:
    tables, symbol_list = kallsyms.find_tables(km)
    symbols = _pick_symbols(symbol_list)
    if "linux_banner" not in symbols:
        raise NotAKernel("kallsyms has no linux_banner: not a Linux kernel")
    banner = km.cstring(symbols["linux_banner"], 1024)
    if not banner.startswith(b"Linux version "):
        raise NotAKernel(f"linux_banner does not read 'Linux version ...' (got {banner[:32]!r})")

    start, stop = symbols.get("__start_BTF"), symbols.get("__stop_BTF")
    if start is None or stop is None or not km.contains(start, max(0, stop - start)) or stop <= start:
        raise NoBTF("kernel has no BTF (no __start_BTF/__stop_BTF in kallsyms: built without "
                    "CONFIG_DEBUG_INFO_BTF)")
    btf_blob = km.read(start, stop - start)
    types = btf.IsfTypes(btf.parse(btf_blob))

    addresses = sorted(set(symbols.values()))
    out_symbols: dict[str, dict] = {name: {"address": addr} for name, addr in symbols.items()}
    for name, type_id in types.variables().items():  # per-CPU variables, typed by BTF
        if name in out_symbols:
            out_symbols[name]["type"] = types.descriptor(type_id)
    for name, desc in KNOWN_VARIABLES.items():
        if name not in out_symbols or "type" in out_symbols[name]:
            continue
        if desc["kind"] in ("struct", "union"):
            ut = types.user_types.get(desc["name"])
            extent = _extent(addresses, symbols[name])
            if ut is None or (extent and ut["size"] > extent):
                continue  # type absent or larger than the object: leave the symbol untyped
        out_symbols[name]["type"] = desc
    banner_bytes = banner + b"\0"
    out_symbols["linux_banner"] = {
        "address": symbols["linux_banner"],
        "type": {"kind": "array", "count": len(banner_bytes), "subtype": {"kind": "base", "name": "char"}},
        "constant_data": base64.b64encode(banner_bytes).decode(),
    }
    table_addr = symbols.get("sys_call_table")
    if table_addr is not None:
        count = min(syscalls.MAX_SYSCALLS, _extent(addresses, table_addr) // 8)
        out_symbols["sys_call_table"]["type"] = {
            "kind": "array", "count": count, "subtype": {"kind": "pointer", "subtype": {"kind": "function"}}}

    symtab_hash = hashlib.sha256("\n".join(f"{a:x} {s.type} {s.name}" for s, a in
                                           ((s, s.address) for s in symbol_list)).encode()).hexdigest()
    result = {
        "metadata": {
            "format": isf.ISF_FORMAT,
            "producer": {"name": "vmitrace", "version": __version__},
            "linux": {"symbols": [{"kind": "symtab", "name": "kallsyms", "hash_type": "sha256",
                                   "hash_value": symtab_hash}]},
        },
        "base_types": types.base_types,
        "user_types": types.user_types,
        "enums": types.enums,
        "symbols": out_symbols,
    }
    isf.embed(result, "syscalls", syscalls.build(km, symbols, _syscall_layout(types)))
    prov = dict(provenance)
    prov.update({
        "tool": f"vmitrace {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "banner": banner.decode("latin-1"),
        "kallsyms": {"num_syms": tables.num_syms, "absolute_percpu": tables.absolute_percpu,
                     "names": f"{tables.names:#x}", "token_table": f"{tables.token_table:#x}",
                     "offsets": f"{tables.offsets:#x}"},
        "btf": {"address": f"{start:#x}", "size": len(btf_blob),
                "sha256": hashlib.sha256(btf_blob).hexdigest(), "types": len(types.btf.types) - 1},
        "variable_types": "per-CPU variables from BTF; other globals from vmitrace's KNOWN_VARIABLES "
                          "(profiles/build.py)",
    })
    isf.embed(result, "provenance", prov)
    return result


def build_from_image(path: str) -> dict:
    """ISF for a vmlinuz (bzImage: xz, zstd, gzip, lz4) or vmlinux file."""
    elf, packing = read_image(path)
    km = elf.kernel_memory()
    if elf.section(".BTF") is None and elf.sections:
        raise NoBTF(f"{path}: kernel has no .BTF section (built without CONFIG_DEBUG_INFO_BTF)")
    del elf
    return build_from_memory(km, {"source": "image", "input": str(path), "packing": packing})
