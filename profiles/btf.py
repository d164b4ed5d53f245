"""BTF (the kernel's BPF Type Format) parsed into ISF types.

BTF is the compact type information the kernel carries in its .BTF section (and, between
__start_BTF and __stop_BTF, in its memory): a header, then a stream of `btf_type` records
(id 1, 2, ... in order; id 0 is void) each followed by kind-specific data, then a string table.
ISF has no typedefs or qualifiers, so typedef/const/volatile/restrict/type_tag resolve to what
they qualify; anonymous structs/unions/enums get the name of the typedef that names them
(`atomic_t`, `kernel_cap_t`) or else a stable `__anon_<kind>_<btf id>` name.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from .errors import NoBTF

BTF_MAGIC = 0xEB9F
(INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC,
 FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64) = range(1, 20)
_QUALIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
# A BTF blob larger than this is not a kernel's (vmlinux BTF is ~5 MiB).
MAX_BTF = 64 << 20
HEADER = struct.Struct("<HBBIIIII")


@dataclass
class BtfType:
    kind: int
    name: str
    size_or_type: int
    vlen: int
    kind_flag: bool
    extra: Any = None  # kind-specific: members, array info, enum values, int encoding, params


@dataclass
class Btf:
    types: list[BtfType | None] = field(default_factory=list)  # index = type id; [0] is void


def btf_size(blob: bytes) -> int:
    """Total size of the BTF blob starting at `blob` (header + types + strings), or raise NoBTF."""
    if len(blob) < HEADER.size:
        raise NoBTF("BTF header truncated")
    magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = HEADER.unpack_from(blob)
    if magic != BTF_MAGIC or version != 1 or hdr_len < HEADER.size:
        raise NoBTF("no BTF header (magic 0xeb9f, version 1) where BTF was expected")
    size = hdr_len + max(type_off + type_len, str_off + str_len)
    if size > MAX_BTF:
        raise NoBTF(f"BTF header announces {size} bytes, more than any kernel's")
    return size


def parse(blob: bytes) -> Btf:
    """Parse a BTF blob; anything malformed raises NoBTF (guest memory may be hostile)."""
    try:
        return _parse(blob)
    except (struct.error, IndexError) as exc:
        raise NoBTF(f"BTF is malformed: {exc}") from exc


def _parse(blob: bytes) -> Btf:
    size = btf_size(blob)
    if len(blob) < size:
        raise NoBTF(f"BTF truncated: header announces {size} bytes, {len(blob)} present")
    _m, _v, _f, hdr_len, type_off, type_len, str_off, str_len = HEADER.unpack_from(blob)
    strings = blob[hdr_len + str_off:hdr_len + str_off + str_len]

    def name_at(off: int) -> str:
        if off >= len(strings):
            raise NoBTF(f"BTF string offset {off} outside the string table")
        end = strings.find(b"\0", off)
        return strings[off:end if end >= 0 else len(strings)].decode("utf-8", "replace")

    types: list[BtfType | None] = [None]
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    u32 = struct.Struct("<I")
    three = struct.Struct("<III")
    two = struct.Struct("<II")
    while pos < end:
        if pos + 12 > end:
            raise NoBTF("BTF type section truncated")
        name_off, info, st = three.unpack_from(blob, pos)
        pos += 12
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
        extra: Any = None
        if kind == INT:
            (enc,) = u32.unpack_from(blob, pos)
            extra = (enc >> 24 & 0xF, enc >> 16 & 0xFF, enc & 0xFF)  # encoding, bit offset, bits
            pos += 4
        elif kind == ARRAY:
            extra = three.unpack_from(blob, pos)  # elem type, index type, nelems
            pos += 12
        elif kind in (STRUCT, UNION):
            members = []
            for _ in range(vlen):
                m_name, m_type, m_off = three.unpack_from(blob, pos)
                pos += 12
                if kflag:
                    members.append((name_at(m_name), m_type, m_off & 0xFFFFFF, m_off >> 24))
                else:
                    members.append((name_at(m_name), m_type, m_off, 0))
            extra = members
        elif kind == ENUM:
            values = []
            for _ in range(vlen):
                v_name, v_val = struct.unpack_from("<Ii" if kflag else "<II", blob, pos)
                pos += 8
                values.append((name_at(v_name), v_val))
            extra = values
        elif kind == ENUM64:
            values = []
            for _ in range(vlen):
                v_name, lo, hi = three.unpack_from(blob, pos)
                pos += 12
                value = hi << 32 | lo
                if kflag and value >= 1 << 63:
                    value -= 1 << 64
                values.append((name_at(v_name), value))
            extra = values
        elif kind == FUNC_PROTO:
            params = []
            for _ in range(vlen):
                p_name, p_type = two.unpack_from(blob, pos)
                pos += 8
                params.append((name_at(p_name), p_type))
            extra = params
        elif kind == VAR or kind == DECL_TAG:
            pos += 4
        elif kind == DATASEC:
            extra = [three.unpack_from(blob, pos + 12 * i) for i in range(vlen)]  # var type, offset, size
            pos += 12 * vlen
        elif kind not in (PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG):
            raise NoBTF(f"BTF type {len(types)} has unknown kind {kind}")
        types.append(BtfType(kind, name_at(name_off), st, vlen, kflag, extra))
    if pos != end:
        raise NoBTF("BTF type section does not end on a record boundary")
    return Btf(types)


class IsfTypes:
    """Converts parsed BTF into the ISF base_types, user_types and enums sections."""

    def __init__(self, btf: Btf) -> None:
        self.btf = btf
        self.base_types: dict[str, dict] = {
            "void": {"kind": "void", "size": 0, "signed": False, "endian": "little"},
            "pointer": {"kind": "int", "size": 8, "signed": False, "endian": "little"},
        }
        self.user_types: dict[str, dict] = {}
        self.enums: dict[str, dict] = {}
        self._names: dict[int, str] = {}
        self._desc: dict[int, dict] = {}
        self._name_aggregates()
        self._convert()

    def _name_aggregates(self) -> None:
        """Give every struct/union/enum its ISF name; the first complete definition of a name wins."""
        types = self.btf.types
        taken: set[str] = {t.name for t in types[1:] if t and t.kind in (STRUCT, UNION, ENUM, ENUM64) and t.name}
        for tid, t in enumerate(types):
            if t and t.kind == TYPEDEF and t.name:
                target = types[t.size_or_type] if t.size_or_type < len(types) else None
                if (target and target.kind in (STRUCT, UNION, ENUM, ENUM64) and not target.name
                        and t.size_or_type not in self._names and t.name not in taken):
                    self._names[t.size_or_type] = t.name
                    taken.add(t.name)
        for tid, t in enumerate(types):
            if t and t.kind in (STRUCT, UNION, ENUM, ENUM64) and tid not in self._names:
                self._names[tid] = t.name or f"__anon_{_KIND_NAMES[t.kind]}_{tid}"

    def _type(self, tid: int) -> BtfType | None:
        if tid == 0:
            return None
        if tid >= len(self.btf.types):
            raise NoBTF(f"BTF refers to type {tid}, past the last type")
        return self.btf.types[tid]

    def _strip(self, tid: int) -> int:
        """Follow typedefs and qualifiers to the type they name (bounded: BTF may be hostile)."""
        for _ in range(64):
            t = self._type(tid)
            if t is None or t.kind not in _QUALIFIERS:
                return tid
            tid = t.size_or_type
        raise NoBTF("BTF typedef/qualifier chain longer than 64")

    def _base_name(self, t: BtfType) -> str:
        if t.name not in self.base_types:
            if t.kind == FLOAT:
                kind, signed = "float", True
            else:
                encoding = t.extra[0]
                signed = bool(encoding & 1)
                kind = "bool" if encoding & 4 else "char" if encoding & 2 or t.name.endswith("char") else "int"
            self.base_types[t.name] = {"kind": kind, "size": t.size_or_type, "signed": signed, "endian": "little"}
        return t.name

    def descriptor(self, tid: int, depth: int = 0) -> dict:
        """The ISF type descriptor of BTF type `tid`."""
        if depth > 64:
            raise NoBTF("BTF type nesting deeper than 64")
        cached = self._desc.get(tid)
        if cached is not None:
            return cached
        sid = self._strip(tid)
        t = self._type(sid)
        if t is None:
            desc: dict = {"kind": "base", "name": "void"}
        elif t.kind in (INT, FLOAT):
            desc = {"kind": "base", "name": self._base_name(t)}
        elif t.kind == PTR:
            desc = {"kind": "pointer", "subtype": self.descriptor(t.size_or_type, depth + 1)}
        elif t.kind == ARRAY:
            elem, _index, count = t.extra
            desc = {"kind": "array", "count": count, "subtype": self.descriptor(elem, depth + 1)}
        elif t.kind in (STRUCT, UNION):
            desc = {"kind": "struct" if t.kind == STRUCT else "union", "name": self._names[sid]}
        elif t.kind in (ENUM, ENUM64):
            desc = {"kind": "enum", "name": self._names[sid]}
        elif t.kind == FWD:
            desc = {"kind": "union" if t.kind_flag else "struct", "name": t.name}
        elif t.kind in (FUNC, FUNC_PROTO):
            desc = {"kind": "function"}
        elif t.kind == VAR:
            desc = self.descriptor(t.size_or_type, depth + 1)
        else:
            raise NoBTF(f"BTF type {sid} of kind {t.kind} cannot be a member or pointee")
        self._desc[tid] = desc
        return desc

    def size_of(self, tid: int, depth: int = 0) -> int:
        t = self._type(self._strip(tid))
        if t is None or depth > 64:
            return 0
        if t.kind in (INT, FLOAT, STRUCT, UNION, ENUM, ENUM64):
            return t.size_or_type
        if t.kind == PTR:
            return 8
        if t.kind == ARRAY:
            return t.extra[2] * self.size_of(t.extra[0], depth + 1)
        return 0

    def _member(self, m_name: str, m_type: int, bit_off: int, bitfield_size: int) -> dict:
        sid = self._strip(m_type)
        t = self._type(sid)
        if bitfield_size == 0 and t is not None and t.kind == INT:
            encoding, int_bit_off, bits = t.extra
            if bits != t.size_or_type * 8 or int_bit_off:  # old-style bitfield through the int encoding
                bitfield_size, bit_off = bits, bit_off + int_bit_off
        if bitfield_size == 0 and bit_off % 8 == 0:
            return {"type": self.descriptor(m_type), "offset": bit_off // 8}
        unit = max(1, self.size_of(m_type))
        byte_off = (bit_off // 8) // unit * unit
        if bit_off - byte_off * 8 + bitfield_size > unit * 8:  # straddles its natural unit (packed)
            byte_off = bit_off // 8
        inner = self.descriptor(m_type)
        if inner["kind"] not in ("base", "enum"):
            inner = {"kind": "base", "name": "unsigned int"}
        return {"type": {"kind": "bitfield", "bit_position": bit_off - byte_off * 8,
                         "bit_length": bitfield_size or 8, "type": inner}, "offset": byte_off}

    def _convert(self) -> None:
        for tid, t in enumerate(self.btf.types):
            if t is None:
                continue
            if t.kind in (INT, FLOAT) and t.name:
                self._base_name(t)
            elif t.kind in (STRUCT, UNION):
                name = self._names[tid]
                if name in self.user_types and self.user_types[name]["fields"]:
                    continue  # a name defined twice: keep the first complete definition
                fields: dict[str, dict] = {}
                for m_name, m_type, bit_off, bf_size in t.extra:
                    entry = self._member(m_name, m_type, bit_off, bf_size)
                    if not m_name:
                        m_name = f"unnamed_field_{bit_off // 8:x}"
                        if entry["type"]["kind"] in ("struct", "union"):
                            entry["anonymous"] = True
                    fields[m_name] = entry
                self.user_types[name] = {"kind": "struct" if t.kind == STRUCT else "union",
                                         "size": t.size_or_type, "fields": fields}
            elif t.kind in (ENUM, ENUM64):
                name = self._names[tid]
                if name in self.enums and self.enums[name]["constants"]:
                    continue
                signed = t.kind_flag or any(v < 0 for _n, v in t.extra)
                self.enums[name] = {"size": t.size_or_type, "base": self._int_name(t.size_or_type, signed),
                                    "constants": {n: v for n, v in t.extra}}
        for t in self.btf.types:  # declared but never defined: an empty shell keeps references valid
            if t is not None and t.kind == FWD and t.name not in self.user_types:
                self.user_types[t.name] = {"kind": "union" if t.kind_flag else "struct", "size": 0, "fields": {}}

    def _int_name(self, size: int, signed: bool) -> str:
        name = {1: "char" if signed else "unsigned char", 2: "short int" if signed else "short unsigned int",
                4: "int" if signed else "unsigned int", 8: "long int" if signed else "long unsigned int"}.get(size, "int")
        if name not in self.base_types:
            self.base_types[name] = {"kind": "char" if size == 1 else "int", "size": size, "signed": signed,
                                     "endian": "little"}
        return name

    def variables(self) -> dict[str, int]:
        """Variables BTF describes (vmlinux BTF has the per-CPU ones): name -> BTF type id."""
        out = {}
        for t in self.btf.types:
            if t is not None and t.kind == DATASEC:
                for var_id, _off, _size in t.extra:
                    var = self._type(var_id)
                    if var is not None and var.kind == VAR:
                        out[var.name] = var.size_or_type
        return out

    def functions(self) -> dict[str, int]:
        """Functions BTF describes: name -> FUNC_PROTO type id."""
        return {t.name: t.size_or_type for t in self.btf.types if t is not None and t.kind == FUNC}

    def find(self, kind: int, name: str) -> int | None:
        for tid, t in enumerate(self.btf.types):
            if t is not None and t.kind == kind and t.name == name:
                return tid
        return None


_KIND_NAMES = {STRUCT: "struct", UNION: "union", ENUM: "enum", ENUM64: "enum"}


def find_btf(data: bytes | bytearray, start_hint: int | None = None) -> tuple[int, int]:
    """(offset, size) of a vmlinux BTF blob inside `data`: at `start_hint` if given, else searched."""
    magic = struct.pack("<HBB", BTF_MAGIC, 1, 0)
    candidates = [start_hint] if start_hint is not None else []
    pos = 0
    while start_hint is None:
        pos = data.find(magic, pos)
        if pos < 0:
            break
        candidates.append(pos)
        pos += 1
    best = None
    for off in candidates:
        try:
            size = btf_size(bytes(data[off:off + HEADER.size]))
        except NoBTF:
            continue
        if off + size <= len(data) and (best is None or size > best[1]):
            best = (off, size)  # the kernel's own BTF is by far the largest blob
    if best is None or best[1] < 4096:
        raise NoBTF("no BTF found: kernel built without CONFIG_DEBUG_INFO_BTF")
    return best
