"""Monitors: turn KVMI events into records (syscalls, processes, integrity, hypercalls)."""
