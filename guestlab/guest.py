"""A lab guest: QEMU 10 under TCG, booting a lab kernel and initramfs (see guestlab.build).

Host-side files of a guest live in a private run directory (``Guest.run_dir``):
``serial.log`` (ttyS0: kernel console, init messages, the ready marker), ``control.sock``
(ttyS1: the control channel served by /lab/control in the guest), ``qmp.sock`` (QMP) and
``qemu.log`` (QEMU's own stderr). Guest RAM is a shared file in /dev/shm (``Guest.ram_path``)
whose offsets equal guest-physical addresses (memory is capped at 2 GiB, below the PCI hole).
"""
from __future__ import annotations

import atexit
import base64
import contextlib
import gzip
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid as uuid_module
import weakref
from pathlib import Path
from typing import Any, Mapping

from guestlab import build

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PLUGIN_PATH = REPO / "qemu-kvmi-plugin" / "vmitrace-kvmi.so"
QEMU = "qemu-system-x86_64"
READY_MARKER = "VMITRACE-LAB-READY"
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "vmitrace-lab-"
MAX_MEMORY_MB = 2048  # guest-physical address == RAM file offset only below the PCI hole
MAX_OUTPUT_BYTES = 64 << 20  # a run() reply larger than this is refused (guest-controlled)

_live: "weakref.WeakSet[Guest]" = weakref.WeakSet()


class GuestError(RuntimeError):
    """The guest failed to boot, answer or stop; the message says what happened."""


def _sweep_stale_ram_files() -> None:
    """Remove RAM files left by lab processes that died without cleaning up (SIGKILL)."""
    for path in SHM_DIR.glob(SHM_PREFIX + "*"):
        m = re.match(re.escape(SHM_PREFIX) + r"(\d+)-", path.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                path.unlink()
        except PermissionError:
            pass


def _die_with_parent_prefix() -> list[str]:
    """`setpriv --pdeathsig KILL`: QEMU gets SIGKILL when the thread that started it goes
    away, so a killed test run never leaves a guest behind (no fork-unsafe preexec_fn)."""
    setpriv = shutil.which("setpriv")  # util-linux, Essential in Debian
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def _plugin_arg_value(key: str, value: Any) -> str:
    text = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else str(value)
    if "," in text or "=" in key or "," in key:
        raise ValueError(f"plugin option {key}={text!r}: ',' and '=' cannot be passed to QEMU")
    return f"{key}={text}"


class Guest:
    """One lab guest. Use as a context manager::

        with Guest(kernel="6.1", vcpus=2) as guest:   # boots and waits for the ready marker
            status, output = guest.run("/workload once")

    ``plugin_options`` loads the vmitrace KVMI plugin with those key=value arguments, after
    ``ram``, ``name`` and ``uuid`` filled in from this guest; ``kvmi_socket=PATH`` is short for
    ``plugin_options={"socket": PATH}`` (the introspector's listening socket).
    ``max_vcpus`` leaves room for vCPUs added later (QMP ``device_add``; the guest then onlines
    them through sysfs). ``workload="steady"`` starts the workload driver at boot
    (output in /tmp/workload.log), with ``workload_period_ms`` between rounds. The run
    directory (serial log, sockets) is removed by stop(); with ``log_dir`` the serial and QEMU
    logs are first copied there as ``<name>-serial.log`` and ``<name>-qemu.log``.

    QEMU is killed if the thread that started it ends (PR_SET_PDEATHSIG) or the Python process
    exits (atexit), so start guests from a thread that outlives them (normally the main one).
    """

    def __init__(self, kernel: str = "6.1", vcpus: int = 1, memory_mb: int = 512,
                 kvmi_socket: str | Path | None = None,
                 plugin_options: Mapping[str, Any] | None = None, name: str | None = None,
                 workload: str | None = None, workload_period_ms: int | None = None,
                 kaslr: bool = True, extra_cmdline: str = "", cpu: str = "qemu64",
                 boot_timeout: float = 180.0, plugin_path: Path | None = None,
                 log_dir: Path | None = None, max_vcpus: int | None = None) -> None:
        if not 1 <= vcpus <= 4:
            raise ValueError(f"vcpus must be 1..4, not {vcpus}")
        if max_vcpus is not None and not vcpus <= max_vcpus <= 4:
            raise ValueError(f"max_vcpus must be {vcpus}..4, not {max_vcpus}")
        if not 64 <= memory_mb <= MAX_MEMORY_MB:
            raise ValueError(f"memory_mb must be 64..{MAX_MEMORY_MB}, not {memory_mb}")
        if workload not in (None, "none", "steady", "once"):
            raise ValueError(f"workload must be none, steady or once, not {workload!r}")
        self.kernel = kernel
        self.vcpus = vcpus
        self.max_vcpus = max_vcpus
        self.memory_mb = memory_mb
        self.name = name or f"lab-{kernel}-{secrets.token_hex(3)}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,63}", self.name):
            raise ValueError(f"guest name {self.name!r}: use 1-63 of [A-Za-z0-9_.-]")
        self.uuid = uuid_module.uuid4()
        self.plugin_options = dict(plugin_options) if plugin_options is not None else None
        if kvmi_socket is not None:
            self.plugin_options = {"socket": str(kvmi_socket), **(self.plugin_options or {})}
        self.plugin_path = plugin_path or PLUGIN_PATH
        self.workload = None if workload == "none" else workload
        self.workload_period_ms = workload_period_ms
        self.kaslr = kaslr
        self.extra_cmdline = extra_cmdline
        self.cpu = cpu
        self.boot_timeout = boot_timeout
        self.log_dir = Path(log_dir) if log_dir is not None else None

        self.build: build.LabBuild | None = None
        self.run_dir: Path | None = None
        self.ram_path = SHM_DIR / f"{SHM_PREFIX}{os.getpid()}-{self.name}-{secrets.token_hex(4)}"
        self.process: subprocess.Popen | None = None
        self.boot_seconds: float | None = None  # QEMU start to ready marker
        self._started_at = 0.0
        self._control: socket.socket | None = None
        self._control_buffer = b""
        self._lock = threading.Lock()
        self._qmp: socket.socket | None = None
        self._qmp_file = None

    # --- paths ---------------------------------------------------------------------------
    @property
    def serial_log(self) -> Path:
        return self._dir() / "serial.log"

    @property
    def control_socket(self) -> Path:
        return self._dir() / "control.sock"

    @property
    def qmp_socket(self) -> Path:
        return self._dir() / "qmp.sock"

    @property
    def qemu_log(self) -> Path:
        return self._dir() / "qemu.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def release(self) -> str:
        if not self.build:
            raise GuestError("guest not started")
        return self.build.release

    def _dir(self) -> Path:
        if self.run_dir is None:
            raise GuestError("guest not started")
        return self.run_dir

    # --- life cycle ----------------------------------------------------------------------
    def __enter__(self) -> "Guest":
        self.start()
        try:
            self.wait_ready(self.boot_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cmdline(self) -> str:
        args = ["console=ttyS0", "panic=-1", "quiet"]
        if not self.kaslr:
            args.append("nokaslr")
        if self.workload:
            args.append(f"vmitrace.workload={self.workload}")
            if self.workload_period_ms:
                args.append(f"vmitrace.period_ms={int(self.workload_period_ms)}")
        if self.extra_cmdline:
            args.append(self.extra_cmdline)
        return " ".join(args)

    def qemu_argv(self) -> list[str]:
        assert self.build is not None
        mem = f"{self.memory_mb}M"
        accel = "tcg,thread=multi" if self.vcpus > 1 else "tcg"
        argv = [
            QEMU, "-name", self.name, "-uuid", str(self.uuid),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "pc,memory-backend=ram", "-accel", accel, "-cpu", self.cpu,
            "-smp", str(self.vcpus) + (f",maxcpus={self.max_vcpus}" if self.max_vcpus else ""),
            "-m", mem,
            "-object", f"memory-backend-file,id=ram,size={mem},mem-path={self.ram_path},share=on",
            "-chardev", f"file,id=console,path={self.serial_log}", "-serial", "chardev:console",
            "-chardev", f"socket,id=control,path={self.control_socket},server=on,wait=off",
            "-serial", "chardev:control",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-kernel", str(self.build.vmlinuz), "-initrd", str(self.build.initramfs),
            "-append", self.cmdline(),
        ]
        if self.plugin_options is not None:
            options = {"ram": str(self.ram_path), "name": self.name, "uuid": str(self.uuid),
                       **self.plugin_options}
            argv += ["-plugin", ",".join([str(self.plugin_path)] +
                                         [_plugin_arg_value(k, v) for k, v in options.items()])]
        return argv

    def start(self) -> None:
        """Build (cached) and launch QEMU; returns without waiting for the guest."""
        if self.process is not None:
            raise GuestError("guest already started")
        if shutil.which(QEMU) is None:
            raise GuestError(f"{QEMU} not found (run ./setup.sh)")
        if self.plugin_options is not None and not self.plugin_path.exists():
            raise GuestError(f"plugin {self.plugin_path} not built (make -C qemu-kvmi-plugin)")
        self.build = build.ensure(self.kernel, refresh=False)
        _sweep_stale_ram_files()
        free_mb = shutil.disk_usage(SHM_DIR).free >> 20
        if free_mb < self.memory_mb:
            # QEMU would start, then die of SIGBUS when the guest touches the missing pages.
            raise GuestError(f"{SHM_DIR} has {free_mb} MiB free, the guest needs {self.memory_mb}")
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"vmitrace-{self.name}-"))
        argv = self.qemu_argv()
        log.info("starting %s: %s", self.name, " ".join(argv))
        with open(self.qemu_log, "wb") as qemu_log:
            self._started_at = time.monotonic()
            self.process = subprocess.Popen(_die_with_parent_prefix() + argv,
                                            stdin=subprocess.DEVNULL, stdout=qemu_log,
                                            stderr=subprocess.STDOUT)
        _live.add(self)
        self._finalizer = weakref.finalize(self, _kill_leftovers, self.process, self.ram_path,
                                           self.run_dir)

    def _check_alive(self) -> None:
        if self.process is None:
            raise GuestError("guest not started")
        if self.process.poll() is not None:
            raise GuestError(f"QEMU exited with status {self.process.returncode}: "
                             f"{self._tail(self.qemu_log)} | serial: {self._tail(self.serial_log)}")

    @staticmethod
    def _tail(path: Path, size: int = 1500) -> str:
        try:
            data = path.read_bytes()[-size:]
        except OSError:
            return "(none)"
        return data.decode(errors="replace").strip()

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Wait for the init's ready marker and a working control channel; returns the
        seconds from QEMU start to ready."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(OSError):
                if READY_MARKER.encode() in self.serial_log.read_bytes():
                    break
            if time.monotonic() > deadline:
                raise GuestError(f"{self.name}: no ready marker after {timeout:.0f}s; serial: "
                                 f"{self._tail(self.serial_log)}")
            time.sleep(0.1)
        if self.boot_seconds is None:
            self.boot_seconds = time.monotonic() - self._started_at
        status, output = self.run("echo ok", timeout=max(5.0, deadline - time.monotonic()))
        if status != 0 or output.strip() != "ok":
            raise GuestError(f"control channel answered {status} {output!r}")
        return self.boot_seconds

    # --- control channel -----------------------------------------------------------------
    def _connect_control(self, deadline: float) -> socket.socket:
        if self._control is None:
            while True:
                self._check_alive()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(self.control_socket))
                    break
                except OSError:
                    sock.close()
                    if time.monotonic() > deadline:
                        raise GuestError("control socket did not appear") from None
                    time.sleep(0.05)
            self._control = sock
        return self._control

    def run_bytes(self, command: str, timeout: float = 60.0,
                  compress: bool = False) -> tuple[int, bytes]:
        """Run a shell command in the guest (stdin /dev/null, stdout+stderr captured).
        The guest kills it after ``timeout`` seconds (status 137). ``compress`` gzips the
        output in the guest: worth it for large outputs (the serial line moves ~140 KB/s)."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        nonce = secrets.token_hex(8)
        shell = f"({command}) | gzip -1" if compress else command
        request = f"{nonce} {int(timeout) + 1} {base64.b64encode(shell.encode()).decode()}\n"
        if len(request) > 3800:  # the guest's tty line buffer holds 4095 bytes
            raise ValueError("command too long for the control channel (max ~2800 bytes)")
        begin = f"{nonce} BEGIN\n".encode()
        end = re.compile(rb"\n" + nonce.encode() + rb" END (\d+)\n")
        deadline = time.monotonic() + timeout + 10.0
        with self._lock:
            sock = self._connect_control(deadline)
            sock.sendall(request.encode())
            buffer = self._control_buffer
            while True:
                match = end.search(buffer)
                if match:
                    break
                if len(buffer) > MAX_OUTPUT_BYTES:
                    self._drop_control()
                    raise GuestError(f"output of {command!r} exceeds {MAX_OUTPUT_BYTES} bytes")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._drop_control()
                    raise TimeoutError(f"{self.name}: no reply to {command!r} within {timeout}s")
                sock.settimeout(min(remaining, 1.0))
                try:
                    chunk = sock.recv(1 << 16)
                except socket.timeout:
                    self._check_alive()
                    continue
                if not chunk:
                    self._drop_control()
                    self._check_alive()
                    raise GuestError("control channel closed")
                buffer += chunk
            start = buffer.find(begin)
            if start < 0 or start > match.start():
                self._drop_control()
                raise GuestError(f"malformed control reply to {command!r}")
            output = buffer[start + len(begin):match.start()]
            self._control_buffer = buffer[match.end():]
        if compress:
            output = gzip.decompress(output)
        return int(match.group(1)), output

    def run(self, command: str, timeout: float = 60.0, compress: bool = False) -> tuple[int, str]:
        """Like run_bytes, output decoded as UTF-8 (invalid bytes replaced)."""
        status, output = self.run_bytes(command, timeout, compress)
        return status, output.decode(errors="replace")

    def _drop_control(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        self._control_buffer = b""

    # --- QMP -----------------------------------------------------------------------------
    def qmp(self, command: str, arguments: Mapping[str, Any] | None = None,
            timeout: float = 10.0) -> Any:
        """Execute a QMP command; returns its "return" value, raises GuestError on "error"."""
        with self._lock:
            if self._qmp is None:
                self._check_alive()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(str(self.qmp_socket))
                self._qmp, self._qmp_file = sock, sock.makefile("rwb")
                self._qmp_read()  # greeting
                self._qmp_send({"execute": "qmp_capabilities"})
                self._qmp_read()
            self._qmp.settimeout(timeout)
            msg: dict[str, Any] = {"execute": command}
            if arguments:
                msg["arguments"] = dict(arguments)
            self._qmp_send(msg)
            reply = self._qmp_read()
        if "error" in reply:
            raise GuestError(f"QMP {command}: {reply['error']}")
        return reply.get("return")

    def _qmp_send(self, msg: dict[str, Any]) -> None:
        self._qmp_file.write(json.dumps(msg).encode() + b"\n")
        self._qmp_file.flush()

    def _qmp_read(self) -> dict[str, Any]:
        while True:  # skip asynchronous events
            line = self._qmp_file.readline(1 << 20)
            if not line:
                raise GuestError("QMP connection closed")
            reply = json.loads(line)
            if "event" not in reply:
                return reply

    # --- stop ----------------------------------------------------------------------------
    def stop(self, timeout: float = 20.0) -> int | None:
        """Power off cleanly (control channel), else QMP quit, else kill. Removes the RAM
        file and the run directory. Returns QEMU's exit status. Safe to call twice."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(Exception):
                with self._lock:
                    sock = self._connect_control(time.monotonic() + 2)
                    nonce = secrets.token_hex(8)
                    sock.sendall(f"{nonce} 0 {base64.b64encode(b'poweroff -f').decode()}\n".encode())
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout / 2)
        if process.poll() is None:
            log.warning("%s did not power off; QMP quit", self.name)
            with contextlib.suppress(Exception):
                self.qmp("quit", timeout=2)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout / 2)
        if process.poll() is None:
            log.warning("%s: killing QEMU %d", self.name, process.pid)
            process.kill()
            process.wait()
        if self.log_dir is not None:
            self._keep_logs(self.log_dir)
        self._drop_control()
        if self._qmp is not None:
            with contextlib.suppress(OSError):
                self._qmp_file.close()
                self._qmp.close()
            self._qmp = None
        self._finalizer()
        _live.discard(self)
        return process.returncode

    def _keep_logs(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for path in (self.serial_log, self.qemu_log):
            with contextlib.suppress(OSError):
                shutil.copy(path, directory / f"{self.name}-{path.name}")


def _kill_leftovers(process: subprocess.Popen, ram_path: Path, run_dir: Path | None) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    with contextlib.suppress(OSError):
        ram_path.unlink()
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)


@atexit.register
def _stop_all() -> None:
    for guest in list(_live):
        with contextlib.suppress(Exception):
            guest.stop(timeout=4)
