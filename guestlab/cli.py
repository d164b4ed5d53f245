"""`vmitrace lab ...`: build the lab's guest artifacts and boot lab guests by hand."""
from __future__ import annotations

import json
import signal
import sys
import time

import click

from guestlab import build
from guestlab.guest import Guest, GuestError


def _progress(message: str) -> None:
    click.echo(f"[lab] {message}", err=True)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM behaves like Ctrl-C, so the guest is stopped cleanly either way."""
    raise KeyboardInterrupt


@click.group("lab")
def lab() -> None:
    """The guest lab: Debian kernels + busybox initramfs with workloads, booted in QEMU (TCG)."""


@lab.command("build")
@click.option("--kernel", type=click.Choice([*build.KERNELS, "all"]), default="all",
              show_default=True, help="Kernel series to build.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build_command(kernel: str, as_json: bool) -> None:
    """Download (cached) the kernel, busybox and strace packages and build the initramfs.

    \b
    Examples:
      vmitrace lab build                 # both kernels
      vmitrace lab build --kernel 6.12 --json
    """
    kernels = list(build.KERNELS) if kernel == "all" else [kernel]
    results = []
    for name in kernels:
        _progress(f"kernel {name}")
        try:
            results.append(build.ensure(name, progress=_progress))
        except build.BuildError as err:
            raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps([{"kernel": r.kernel, "release": r.release, "package": r.package,
                                "vmlinuz": str(r.vmlinuz), "initramfs": str(r.initramfs)}
                               for r in results], indent=2))
    else:
        for r in results:
            click.echo(f"{r.kernel:<5} {r.release:<24} {r.vmlinuz}  {r.initramfs}")


@lab.command("run")
@click.option("--kernel", type=click.Choice(list(build.KERNELS)), default="6.1", show_default=True,
              help="The lab kernel series.")
@click.option("--vcpus", type=click.IntRange(1, 4), default=1, show_default=True,
              help="Number of vCPUs.")
@click.option("--memory", "memory_mb", type=click.IntRange(64, 2048), default=512,
              show_default=True, help="Guest RAM in MiB.")
@click.option("--workload", type=click.Choice(["steady", "once", "none"]), default="none",
              show_default=True, help="Workload started at boot (output in /tmp/workload.log).")
@click.option("--period-ms", type=click.IntRange(1, 3_600_000), default=None,
              help="Steady workload: milliseconds between rounds (default 1000).")
@click.option("--kvmi-socket", type=click.Path(dir_okay=False), default=None,
              help="Load the vmitrace KVMI plugin and connect it to this introspector socket.")
@click.option("--plugin-option", "plugin_opts", multiple=True, metavar="KEY=VALUE",
              help="Extra plugin argument (repeatable).")
@click.option("--nokaslr", is_flag=True, help="Boot with KASLR off (debugging).")
@click.option("--append", "extra_cmdline", default="", help="Extra kernel command line.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the guest's details as JSON.")
def run_command(kernel: str, vcpus: int, memory_mb: int, workload: str, period_ms: int | None,
                kvmi_socket: str | None, plugin_opts: tuple[str, ...], nokaslr: bool,
                extra_cmdline: str, duration: float | None, as_json: bool) -> None:
    """Boot a lab guest and keep it running until Ctrl-C (or --duration).

    \b
    Examples:
      vmitrace lab run --kernel 6.12 --vcpus 2
      vmitrace lab run --workload steady --kvmi-socket /tmp/kvmi.sock --duration 60
      vmitrace lab run --json --duration 30
    """
    plugin_options: dict[str, str] | None = None
    if plugin_opts:
        plugin_options = {}
        for opt in plugin_opts:
            key, sep, value = opt.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"{opt!r} is not KEY=VALUE", param_hint="--plugin-option")
            plugin_options[key] = value
    guest = Guest(kernel=kernel, vcpus=vcpus, memory_mb=memory_mb, kvmi_socket=kvmi_socket,
                  plugin_options=plugin_options,
                  workload=workload, workload_period_ms=period_ms, kaslr=not nokaslr,
                  extra_cmdline=extra_cmdline)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _progress(f"booting {guest.name} (kernel {kernel}, {vcpus} vCPU)")
        guest.start()
        guest.wait_ready(guest.boot_timeout)
        info = {"name": guest.name, "uuid": str(guest.uuid), "kernel": kernel,
                "release": guest.release, "vcpus": vcpus, "memory_mb": memory_mb,
                "qemu_pid": guest.pid, "boot_seconds": round(guest.boot_seconds or 0, 2),
                "ram": str(guest.ram_path), "serial_log": str(guest.serial_log),
                "qmp": str(guest.qmp_socket), "control": str(guest.control_socket),
                "kvmi_socket": kvmi_socket}
        if as_json:
            click.echo(json.dumps(info, indent=2))
        else:
            for key, value in info.items():
                click.echo(f"{key:<13} {value}")
        sys.stdout.flush()
        _progress("running; Ctrl-C stops the guest")
        end = time.monotonic() + duration if duration is not None else None
        while end is None or time.monotonic() < end:
            if guest.process.poll() is not None:
                raise click.ClickException(f"QEMU exited with status {guest.process.returncode}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        _progress("interrupted")
    except GuestError as err:
        raise click.ClickException(str(err)) from err
    finally:
        _progress("stopping")
        guest.stop()
