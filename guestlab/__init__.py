"""The guest lab: real Linux guests (Debian kernels, busybox) booted in QEMU with the vmitrace KVMI plugin."""
