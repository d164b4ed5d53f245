"""OS profiles: ISF generation and loading, KASLR, syscall tables.

Public API: `build_from_image(path)`, `build_from_guest(source)`, `load(path) -> LinuxProfile`,
`profile_for_banner(banner)` / `cache_dir()`; errors derive from `ProfileError`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import BadISF, CorruptKernel, GuestError, NoBTF, NoKallsyms, NotAKernel, ProfileError, TruncatedImage  # noqa: E402

__all__ = ["BadISF", "CorruptKernel", "GuestError", "NoBTF", "NoKallsyms", "NotAKernel", "ProfileError", "TruncatedImage",
           "build_from_image", "build_from_guest", "load", "LinuxProfile"]


def build_from_image(path: str) -> dict:
    from .build import build_from_image as _build
    return _build(path)


def build_from_guest(source, **kwargs) -> dict:  # type: ignore[no-untyped-def]
    from .guest import build_from_guest as _build
    return _build(source, **kwargs)


def load(path):  # type: ignore[no-untyped-def]
    from .loader import load as _load
    return _load(path)


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name == "LinuxProfile":
        from .loader import LinuxProfile
        return LinuxProfile
    raise AttributeError(name)
