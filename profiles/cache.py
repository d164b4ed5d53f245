"""Profile cache: ISF files under $VMITRACE_CACHE/profiles (default ~/.cache/vmitrace), keyed by banner.

The file name is `<kernel release>-<sha256(banner)[:16]>.json.xz`: the release for people, the
hash because two builds of one release differ in their banners (build date, compiler).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from . import isf as isf_mod


def cache_dir() -> Path:
    root = Path(os.environ.get("VMITRACE_CACHE") or Path.home() / ".cache" / "vmitrace")
    return root / "profiles"


def _key(banner: str | bytes) -> str:
    if isinstance(banner, str):
        banner = banner.encode("latin-1")
    banner = banner.rstrip(b"\0")
    parts = banner.split(b" ")
    release = parts[2].decode("latin-1") if len(parts) > 2 and parts[0] == b"Linux" else "unknown"
    release = re.sub(r"[^A-Za-z0-9._+-]", "_", release)[:64]
    return f"{release}-{hashlib.sha256(banner).hexdigest()[:16]}"


def path_for_banner(banner: str | bytes) -> Path:
    return cache_dir() / f"{_key(banner)}.json.xz"


def lookup(banner: str | bytes) -> Path | None:
    path = path_for_banner(banner)
    return path if path.exists() else None


def store(isf: dict) -> Path:
    """Write `isf` into the cache under its banner; returns the path."""
    import base64

    banner = base64.b64decode(isf["symbols"]["linux_banner"]["constant_data"])
    return isf_mod.write(isf, path_for_banner(banner))
