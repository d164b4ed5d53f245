"""The plugin builds warning-free from its own API declarations and exports only what
QEMU looks up (the build runs in a copy: the tree's .so may be in use by other tests)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIR = REPO / "qemu-kvmi-plugin"


def test_plugin_builds_without_warnings_and_exports_only_the_plugin_entry_points(tmp_path):
    build = tmp_path / "qemu-kvmi-plugin"
    shutil.copytree(PLUGIN_DIR, build, ignore=shutil.ignore_patterns("*.so", "*.o"))
    result = subprocess.run(["make", "-C", str(build), "CFLAGS=-O2 -g -Werror"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stderr
    so = build / "vmitrace-kvmi.so"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True,
                             text=True, check=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines()
                if line.split()[1] in ("T", "D", "B")}
    assert exported == {"qemu_plugin_install", "qemu_plugin_version"}
    # Everything else it needs comes from QEMU (qemu_plugin_*) or glib/libc.
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True,
                               text=True, check=True).stdout
    assert "qemu_plugin_read_register" in undefined
