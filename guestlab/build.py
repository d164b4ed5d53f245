"""Builds the lab's guest artifacts: a Debian kernel and an initramfs with busybox, strace and
the workloads. Everything is cached under ``$VMITRACE_CACHE`` (default ``~/.cache/vmitrace``):

* ``debs/``: the Debian packages as ``apt-get download`` saved them (keyed by exact version);
* ``debs/x/<package file name>/``: their extracted contents (only what the lab needs);
* ``lab/<kernel release>/``: ``vmlinuz``, ``config``, ``System.map`` (Debian's placeholder),
  ``initramfs.cpio.gz`` and ``inputs.json`` (the key of the current initramfs).

The initramfs is rebuilt whenever a package version, a workload source, the init files or
this module change.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from guestlab import workloads

log = logging.getLogger(__name__)

# Kernel series of the lab -> apt target release to resolve `linux-image-amd64` against.
KERNELS: dict[str, str | None] = {"6.1": None, "6.12": "bookworm-backports"}
INITRAMFS_DIR = Path(__file__).resolve().parent / "initramfs"
LIB_DIR = "/lib/x86_64-linux-gnu"

Progress = Callable[[str], None]


class BuildError(RuntimeError):
    """A lab artifact could not be fetched or built; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class LabBuild:
    """Paths of one built lab kernel and initramfs."""

    kernel: str  # lab series name, "6.1" or "6.12"
    release: str  # `uname -r` inside the guest, e.g. "6.1.0-56-amd64"
    package: str  # Debian package file the kernel came from
    vmlinuz: Path
    config: Path
    system_map: Path  # Debian's one-line placeholder; real symbols come from the guest
    initramfs: Path
    directory: Path


def cache_dir() -> Path:
    return Path(os.environ.get("VMITRACE_CACHE") or Path.home() / ".cache" / "vmitrace")


def _run(argv: list[str], **kwargs) -> str:
    try:
        done = subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)
    except FileNotFoundError as err:
        raise BuildError(f"{argv[0]} is not installed (run ./setup.sh)") from err
    except subprocess.CalledProcessError as err:
        raise BuildError(f"{' '.join(argv)} failed ({err.returncode}): {err.stderr.strip()}") from err
    return done.stdout


def _apt_target(release: str | None) -> list[str]:
    return ["-t", release] if release else []


@functools.lru_cache(maxsize=None)
def _apt_cache(*args: str) -> str:
    # apt-cache takes ~0.6 s a call: ask once per process, several packages per call.
    return _run(["apt-cache", *args])


def resolve_kernel_package(kernel: str) -> str:
    """The versioned kernel package `linux-image-amd64` depends on for this lab series."""
    if kernel not in KERNELS:
        raise BuildError(f"unknown lab kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    out = _apt_cache(*_apt_target(KERNELS[kernel]), "depends", "linux-image-amd64")
    names = re.findall(r"Depends:\s*(linux-image-\S+)", out)
    if not names:
        raise BuildError(f"apt-cache found no kernel behind linux-image-amd64 for {kernel}: {out!r}")
    if not names[0].startswith(f"linux-image-{kernel}."):
        raise BuildError(f"lab kernel {kernel} resolved to {names[0]} (other series); check apt sources")
    return names[0]


def _candidates(packages: list[str], target: str | None) -> dict[str, tuple[str, str]]:
    """package -> (version, architecture) apt would download."""
    out = _apt_cache(*_apt_target(target), "show", "--no-all-versions", *packages)
    found = {}
    for stanza in out.split("\n\n"):
        name = re.search(r"^Package:\s*(\S+)", stanza, re.M)
        version = re.search(r"^Version:\s*(\S+)", stanza, re.M)
        arch = re.search(r"^Architecture:\s*(\S+)", stanza, re.M)
        if name and version and arch:
            found[name.group(1)] = (version.group(1), arch.group(1))
    missing = set(packages) - set(found)
    if missing:
        raise BuildError(f"apt-cache has no candidate for {', '.join(sorted(missing))}")
    return found


def fetch_debs(packages: list[str], target: str | None = None,
               progress: Progress | None = None) -> dict[str, Path]:
    """Download the candidate .deb of each package into the cache (once per version)."""
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    paths = {}
    for package, (version, arch) in _candidates(packages, target).items():
        path = debs / f"{package}_{version.replace(':', '%3a')}_{arch}.deb"
        paths[package] = path
        if path.exists():
            continue
        if progress:
            progress(f"downloading {package} {version}")
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            _run(["apt-get", "download", *_apt_target(target), f"{package}={version}"], cwd=tmp)
            got = list(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise BuildError(f"apt-get download {package} produced {got}")
            got[0].rename(path)
    return paths


def extract_deb(deb: Path, members: tuple[str, ...] = (), progress: Progress | None = None) -> Path:
    """Extract a .deb (or only the given member directories, e.g. ./boot) into the cache."""
    suffix = "" if not members else "-" + hashlib.sha1("\0".join(members).encode()).hexdigest()[:8]
    out = cache_dir() / "debs" / "x" / (deb.stem + suffix)
    if (out / ".done").exists():
        return out
    if progress:
        progress(f"extracting {deb.name}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if members:
        # Only part of the package: avoids writing ~400 MB of kernel modules we never use.
        with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as src:
            tar = subprocess.run(["tar", "-x", "-C", str(out), "--wildcards", *members],
                                 stdin=src.stdout, capture_output=True, text=True)
            src.stdout.close()
        if src.returncode or tar.returncode:
            raise BuildError(f"extracting {members} from {deb} failed: {tar.stderr.strip()}")
    else:
        _run(["dpkg-deb", "-x", str(deb), str(out)])
    (out / ".done").touch()
    return out


def _depends(package: str) -> list[str]:
    out = _apt_cache("depends", package)
    return re.findall(r"^\s*Depends:\s*([^\s<>]+)", out, re.M)


# --- initramfs (cpio "newc", written here so device nodes need no root) ----------------------

class _Cpio:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.names: set[str] = set()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self.ino += 1
        self.chunks += [header, encoded, b"\0" * (-(len(header) + len(encoded)) % 4),
                        data, b"\0" * (-len(data) % 4)]

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.directory(os.path.dirname(name.lstrip("/")) or ".")
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.directory(os.path.dirname(name.lstrip("/")) or ".")
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.directory(os.path.dirname(name.lstrip("/")))
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.chunks)


def _compile_workloads(out: Path) -> dict[str, Path]:
    header = out / "wl_constants.h"
    header.write_text(workloads.c_header())
    built = {}
    for source in workloads.c_sources():
        name = workloads.binary_name(source)
        binary = out / name
        arch = ["-m32"] if workloads.is_i386(source) else []  # needs gcc-multilib
        _run(["gcc", *arch, "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(out),
              "-o", str(binary), str(source)])
        built[name] = binary
    return built


def _shared_libraries(binary: Path, library_dirs: list[Path]) -> dict[str, Path]:
    """Guest path -> host file of every library the binary loads (resolved by ldd, with the
    extracted packages first in the search path)."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(d) for d in library_dirs))
    out = _run(["ldd", str(binary)], env=env)
    libs: dict[str, Path] = {}
    for line in out.splitlines():
        if "not found" in line:
            raise BuildError(f"{binary.name}: shared library missing: {line.strip()}")
        m = re.match(r"\s*(\S+)\s+=>\s+(\S+)", line)
        if m:
            libs[f"{LIB_DIR}/{m.group(1)}"] = Path(m.group(2))
        elif (m := re.match(r"\s*(/\S*ld-linux\S*)", line)):
            libs[m.group(1)] = Path(m.group(1))
    return libs


def _inputs_key(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _source_digest() -> str:
    digest = hashlib.sha256()
    files = [Path(__file__), Path(workloads.__file__), *workloads.c_sources(),
             *sorted(INITRAMFS_DIR.iterdir())]
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def _apt_state() -> str:
    """Changes whenever `apt-get update` (or a sources change) could change what apt resolves:
    until then the last resolution stands and no apt-cache call (~0.6 s each) is needed."""
    parts = []
    for path in ("/var/lib/apt/lists", "/var/cache/apt/pkgcache.bin", "/etc/apt/sources.list",
                 "/etc/apt/sources.list.d", "/etc/apt/preferences.d"):
        with contextlib.suppress(OSError):
            parts.append(f"{path}:{os.stat(path).st_mtime_ns}")
    return ";".join(parts)


def _resolve_debs(kernel: str, say: Progress) -> tuple[Path, list[Path]]:
    """(kernel .deb, [busybox-static, strace, strace's libraries] .debs), fetched if needed."""
    kernel_deb = fetch_debs([resolve_kernel_package(kernel)], KERNELS[kernel], say)
    user = ["busybox-static", "strace", *(d for d in _depends("strace") if d != "libc6")]
    user_debs = fetch_debs(user, None, say)
    return next(iter(kernel_deb.values())), [user_debs[name] for name in user]


def ensure(kernel: str = "6.1", progress: Progress | None = None, refresh: bool = True) -> LabBuild:
    """Fetch and build (or reuse from the cache) the lab artifacts of one kernel series.

    Packages are resolved with apt again only when apt's lists or sources changed since the
    last resolution; ``refresh=False`` never asks apt while cached packages exist (what Guest
    does). The initramfs is rebuilt whenever a package or a lab source changed.
    """
    say = progress or (lambda msg: log.info("%s", msg))
    if kernel not in KERNELS:
        raise BuildError(f"unknown lab kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    lock_path = cache_dir() / "lab" / ".build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        # Test runs and helpers build concurrently: one builder at a time, the others reuse.
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_locked(kernel, say, refresh)


def _ensure_locked(kernel: str, say: Progress, refresh: bool) -> LabBuild:
    manifest = cache_dir() / "lab" / f"series-{kernel}.json"
    debs = cache_dir() / "debs"
    known = json.loads(manifest.read_text()) if manifest.exists() else None
    apt_state = _apt_state()
    if (known and (not refresh or known.get("apt_state") == apt_state)
            and all((debs / name).exists() for name in [known["kernel_deb"], *known["user_debs"]])):
        kernel_deb = debs / known["kernel_deb"]
        user_debs = [debs / name for name in known["user_debs"]]
    else:
        kernel_deb, user_debs = _resolve_debs(kernel, say)
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"kernel_deb": kernel_deb.name, "apt_state": apt_state,
                                        "user_debs": [d.name for d in user_debs]}))

    boot = extract_deb(kernel_deb, ("./boot/*",), say) / "boot"
    vmlinuzes = sorted(boot.glob("vmlinuz-*"))
    if len(vmlinuzes) != 1:
        raise BuildError(f"{kernel_deb.name} holds {len(vmlinuzes)} vmlinuz files, expected 1")
    release = vmlinuzes[0].name.removeprefix("vmlinuz-")

    lab = cache_dir() / "lab" / release
    lab.mkdir(parents=True, exist_ok=True)
    for name, src in (("vmlinuz", vmlinuzes[0]), ("config", boot / f"config-{release}"),
                      ("System.map", boot / f"System.map-{release}")):
        dst = lab / name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)

    key = _inputs_key({"debs": [d.name for d in user_debs], "sources": _source_digest()})
    initramfs = lab / "initramfs.cpio.gz"
    stamp = lab / "inputs.json"
    current = json.loads(stamp.read_text()).get("key") if stamp.exists() else None
    if current != key or not initramfs.exists():
        say(f"building initramfs for {release}")
        _build_initramfs(initramfs, user_debs[0], user_debs[1:], say)
        stamp.write_text(json.dumps({"key": key, "release": release, "package": kernel_deb.name}))
    return LabBuild(kernel=kernel, release=release, package=kernel_deb.name,
                    vmlinuz=lab / "vmlinuz", config=lab / "config",
                    system_map=lab / "System.map", initramfs=initramfs, directory=lab)


def _build_initramfs(target: Path, busybox_deb: Path, strace_debs: list[Path], say: Progress) -> None:
    busybox = extract_deb(busybox_deb, progress=say) / "bin" / "busybox"
    strace_roots = [extract_deb(d, progress=say) for d in strace_debs]
    strace = strace_roots[0] / "usr" / "bin" / "strace"
    lib_dirs = [root / sub for root in strace_roots
                for sub in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")]

    cpio = _Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "lab", "root"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.chardev("dev/ttyS0", 4, 64)
    cpio.chardev("dev/ttyS1", 4, 65)

    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = _run([str(busybox), "--list-full"]).split()
    for applet in applets:
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")
    cpio.symlink("init", "/bin/busybox")

    cpio.file("etc/inittab", (INITRAMFS_DIR / "inittab").read_bytes())
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    for script in ("rc.sysinit", "control", "boot-workload"):
        cpio.file(f"lab/{script}", (INITRAMFS_DIR / script).read_bytes(), 0o755)

    with tempfile.TemporaryDirectory() as tmp:
        built = _compile_workloads(Path(tmp))
        cpio.file(workloads.WORKLOAD_DRIVER, built.pop("workload").read_bytes(), 0o755)
        for name, binary in built.items():
            cpio.file(f"{workloads.WORKLOAD_DIR}/{name}", binary.read_bytes(), 0o755)

    cpio.file("usr/bin/strace", strace.read_bytes(), 0o755)
    for guest_path, host_path in _shared_libraries(strace, lib_dirs).items():
        cpio.file(guest_path, host_path.read_bytes(), 0o755)

    tmp_target = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    # No file name and no time in the gzip header: the same inputs give the same bytes.
    with open(tmp_target, "wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(cpio.finish())
    tmp_target.replace(target)  # atomic: a QEMU starting meanwhile reads the old or the new one
