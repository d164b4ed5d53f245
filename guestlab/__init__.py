"""The guest lab: real Linux guests (Debian kernels, busybox) booted in QEMU with the vmitrace KVMI plugin.

* ``guestlab.build.ensure(kernel)`` -> ``LabBuild`` (cached kernel + initramfs).
* ``guestlab.Guest(kernel=..., vcpus=..., plugin_options=...)``: a booted guest (context manager).
* ``guestlab.workloads``: the exact values the guest workloads use (paths, flags, ports...).
"""
from guestlab.build import KERNELS, BuildError, LabBuild, ensure
from guestlab.guest import READY_MARKER, Guest, GuestError

__all__ = ["KERNELS", "BuildError", "LabBuild", "ensure", "READY_MARKER", "Guest", "GuestError"]
