"""ISF (volatility3's Intermediate Symbol Format) files: writing, reading, vmitrace's records.

vmitrace writes ISF format 6.2.0, the newest volatility3 2.28 accepts. The schema forbids extra
top-level keys and extra metadata, so vmitrace's own records travel inside the same file as
symbols whose names cannot be C identifiers, at address 0, with the record as base64 JSON in
`constant_data` (volatility3 ignores them; they keep profile and syscall table in one file):

* `vmitrace.provenance`: how the profile was built (source, input, banner, tool, date, table
  locations);
* `vmitrace.syscalls`: {"x86_64": {"<nr>": {"name", "args": [[c_type, name], ...] | null}},
  "ia32": {...} (when the kernel has the table), "prototype_source", "names_source"}.
"""
from __future__ import annotations

import base64
import json
import lzma
import os
from pathlib import Path
from typing import Any

from .errors import BadISF

ISF_FORMAT = "6.2.0"
RECORD_PREFIX = "vmitrace."
# Compressed ISF files are a few MB; refuse to inflate anything absurd.
MAX_ISF_BYTES = 1 << 30


def embed(isf: dict, record: str, value: Any) -> None:
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    isf["symbols"][RECORD_PREFIX + record] = {"address": 0, "constant_data": base64.b64encode(data).decode()}


def embedded(isf: dict, record: str) -> Any:
    sym = isf.get("symbols", {}).get(RECORD_PREFIX + record)
    if not sym or "constant_data" not in sym:
        return None
    return json.loads(base64.b64decode(sym["constant_data"]))


def write(isf: dict, path: str | os.PathLike[str]) -> Path:
    """Write `isf` to `path` (.json or .json.xz) atomically: temp name, fsync, rename."""
    path = Path(path)
    data = json.dumps(isf, separators=(",", ":"), sort_keys=True).encode()
    if path.name.endswith(".xz"):
        data = lzma.compress(data, preset=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike[str]) -> dict:
    """The ISF dict in `path` (.json or .json.xz, vmitrace's or dwarf2json's), format-checked."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_ISF_BYTES + 1)
        if raw[:6] == b"\xfd7zXZ\x00":
            dec = lzma.LZMADecompressor()
            raw = dec.decompress(raw, MAX_ISF_BYTES)
            if not dec.eof:
                raise BadISF(f"{path}: xz data is truncated (or inflates beyond 1 GiB)")
        isf = json.loads(raw)
    except OSError as exc:
        raise BadISF(f"cannot read ISF {path}: {exc.strerror}") from exc
    except (lzma.LZMAError, EOFError) as exc:
        raise BadISF(f"{path}: xz data is corrupt or truncated: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadISF(f"{path} is not an ISF file: not JSON ({exc})") from exc
    check_format(isf, str(path))
    return isf


def check_format(isf: Any, where: str) -> None:
    """Raise BadISF unless `isf` is an ISF whose format version volatility3 2.28 can load."""
    if not isinstance(isf, dict) or not isinstance(isf.get("metadata"), dict):
        raise BadISF(f"{where} is not an ISF file: no metadata object")
    fmt = isf["metadata"].get("format")
    if not isinstance(fmt, str):
        raise BadISF(f"{where} is not an ISF file: metadata has no format version")
    try:
        major, minor, _patch = (int(x) for x in fmt.split("."))
    except ValueError:
        raise BadISF(f"{where}: ISF format version {fmt!r} is not MAJOR.MINOR.PATCH") from None
    supported = supported_formats()
    if not any(major == smaj and minor <= smin for smaj, smin, _ in supported):
        newest = ".".join(map(str, max(supported)))
        raise BadISF(f"{where}: ISF format version {fmt} is not supported by volatility3 "
                     f"(it reads up to {newest}; vmitrace writes {ISF_FORMAT})")
    missing = [k for k in ("base_types", "user_types", "enums", "symbols") if not isinstance(isf.get(k), dict)]
    if missing:
        raise BadISF(f"{where} is not a complete ISF file: missing {', '.join(missing)}")


def supported_formats() -> list[tuple[int, int, int]]:
    from volatility3.framework import class_subclasses
    from volatility3.framework.symbols.intermed import ISFormatTable

    return [c.version for c in class_subclasses(ISFormatTable)]


def validate(isf: dict, use_cache: bool = True) -> None:
    """Validate with volatility3's own schema check (volatility3.schemas.validate, which caches
    successful results by content hash); raise BadISF with the reason if the ISF is invalid."""
    import jsonschema
    from volatility3 import schemas

    fmt = isf.get("metadata", {}).get("format", "")
    try:
        ok = schemas.validate(isf, use_cache=use_cache)
    except jsonschema.ValidationError as exc:
        raise BadISF(f"ISF does not validate against volatility3's schema-{fmt}.json: {exc.message} "
                     f"at {'/'.join(map(str, exc.absolute_path))}") from exc
    if not ok:
        raise BadISF(f"volatility3 has no usable schema for ISF format {fmt!r}")
