# Guest lab (sourced by setup.sh from the repository root): Debian kernels 6.1 (bookworm) and
# 6.12 (bookworm-backports), busybox-static, strace, and the initramfs with the workloads.
# Cached under $VMITRACE_CACHE/debs and $VMITRACE_CACHE/lab; a cached run takes a few seconds.
.venv/bin/vmitrace lab build --kernel all >/dev/null
