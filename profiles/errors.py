"""Errors the profile code raises for bad input. Each says what was wrong with which input."""
from __future__ import annotations


class ProfileError(Exception):
    """Base class: a profile could not be built or loaded. The message is for the user."""


class NotAKernel(ProfileError):
    """The file is neither a bzImage nor an ELF vmlinux."""


class TruncatedImage(ProfileError):
    """The image ends before the data its headers announce (or decompression ran dry)."""


class NoBTF(ProfileError):
    """The kernel carries no usable BTF (built without CONFIG_DEBUG_INFO_BTF)."""


class NoKallsyms(ProfileError):
    """The kallsyms tables could not be found or did not decode consistently."""


class BadISF(ProfileError):
    """An ISF file is unreadable, of a format version volatility3 2.28 rejects, or invalid."""


class CorruptKernel(ProfileError):
    """Kernel data points outside itself or contradicts itself (corrupt or hostile image/memory)."""


class GuestError(ProfileError):
    """The kernel could not be located or read in guest memory."""
