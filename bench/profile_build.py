"""Profile build time and peak memory per lab kernel, against plain decompression of the image.

Each measurement runs in a fresh Python process (so peak RSS is its own): the baseline only
unpacks the vmlinuz payload; the build makes the full ISF (kallsyms, BTF, syscalls) and writes
it as .json.xz. Goals from issue 4: < 60 s and < 2 GB per kernel (dwarf2json needs ~8 GB).

    .venv/bin/python bench/profile_build.py [--kernel 6.1 --kernel 6.12] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
mode, path, out = sys.argv[1:4]
start = time.perf_counter()
if mode == "decompress":
    from profiles.image import vmlinux_bytes
    vmlinux, packing = vmlinux_bytes(open(path, "rb").read())
elif mode == "build":
    from profiles import isf
    from profiles.build import build_from_image
    isf.write(build_from_image(path), out)
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(mode: str, vmlinuz: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(vmlinuz), str(out)],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", action="append", help="lab kernel series (default: 6.1 and 6.12)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best is kept")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import guestlab

    kernels = args.kernel or ["6.1", "6.12"]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'kernel':<8}{'decompress s':>14}{'build s':>10}{'ratio':>8}{'decomp MB':>11}{'build MB':>10}"
              f"{'ratio':>8}{'ISF MB':>8}")
        for kernel in kernels:
            vmlinuz = guestlab.build.ensure(kernel, refresh=False).vmlinuz
            out = Path(tmp) / f"{kernel}.json.xz"
            base = min((measure("decompress", vmlinuz, out) for _ in range(args.repeat)), key=lambda r: r["seconds"])
            build = min((measure("build", vmlinuz, out) for _ in range(args.repeat)), key=lambda r: r["seconds"])
            print(f"{kernel:<8}{base['seconds']:>14.2f}{build['seconds']:>10.2f}"
                  f"{build['seconds'] / base['seconds']:>8.1f}{base['peak_mb']:>11.0f}{build['peak_mb']:>10.0f}"
                  f"{build['peak_mb'] / base['peak_mb']:>8.1f}{out.stat().st_size / 2**20:>8.1f}")
            goal_ok = build["seconds"] < 60 and build["peak_mb"] < 2048
            print(f"  goal (< 60 s, < 2 GB): {'met' if goal_ok else 'MISSED'}")


if __name__ == "__main__":
    main()
