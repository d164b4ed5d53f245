"""`vmitrace profile ...`: build and inspect Linux profiles (ISF)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .errors import ProfileError


class ProfileCliError(click.ClickException):
    """A profile that cannot be built, written or read: one line on stderr, exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever the cause said


class LabSeriesOrImage(click.ParamType):
    """`--kernel`: a lab kernel series name (as in every other command) or a kernel image file."""

    name = "6.1|6.12|PATH"
    lab_series = ("6.1", "6.12")  # guestlab.build.KERNELS, without importing the lab here

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if text in self.lab_series or Path(text).is_file():
            return text
        self.fail(f"{text!r} is neither a lab kernel series ({', '.join(self.lab_series)}) "
                  "nor a kernel image file", param, ctx)


def _kernel_image(kernel: str) -> tuple[str, str | None]:
    """The kernel image `--kernel` names, and the lab series when it names one.

    A lab series name (6.1, 6.12) means that series' lab kernel image (built or reused from the
    lab cache, as `vmitrace lab build` does); anything else is a path to a kernel image.
    """
    if kernel not in LabSeriesOrImage.lab_series:
        return kernel, None
    from guestlab import build

    click.echo(f"[profile] lab kernel {kernel}: building or reusing the lab cache", err=True)
    try:
        lab = build.ensure(kernel, progress=lambda m: click.echo(f"[profile]   {m}", err=True),
                           refresh=False)
    except build.BuildError as exc:
        raise ProfileCliError(f"cannot get the lab kernel {kernel}: {exc}") from exc
    return str(lab.vmlinuz), kernel


@click.group("profile")
def profile() -> None:
    """Build Linux profiles (volatility3 ISF) from a kernel's own BTF and kallsyms, and show them."""


@profile.command("build")
@click.option("--kernel", "kernel", type=LabSeriesOrImage(),
              help="Lab kernel series (its image from the lab cache) or a kernel image file: "
                   "vmlinuz (bzImage: xz/zstd/gzip/lz4) or vmlinux. With --from-guest --lab: "
                   "the lab kernel series to boot (default 6.1).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output ISF (.json or .json.xz); default: the profile cache.")
@click.option("--from-guest", is_flag=True, help="Read the kernel from a running guest's memory.")
@click.option("--lab", is_flag=True, help="With --from-guest: boot a lab guest (guestlab) and read its RAM.")
@click.option("--ram", type=click.Path(exists=True, dir_okay=False),
              help="With --from-guest: a guest RAM file or raw dump (guest-physical address = file offset).")
@click.option("--validate/--no-validate", default=True,
              help="Validate the ISF against volatility3's schema before writing (default: on).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a summary of what was built (path, banner, source, counts) as JSON.")
def build_cmd(kernel: str | None, output: str | None, from_guest: bool, lab: bool, ram: str | None,
              validate: bool, as_json: bool) -> None:
    """Build a profile from a kernel image or from a guest's memory.

    --kernel is a lab kernel series (6.1, 6.12: its image from the lab cache, built once) or a
    kernel image file. Writes the ISF to -o FILE or to the profile cache and prints
    `wrote PATH: BANNER` (or, with --json, a summary).

    \b
    Examples:
      vmitrace profile build --kernel 6.12 -o /tmp/p.json.xz
      vmitrace profile build --kernel 6.1 --json | jq .counts
      vmitrace profile build --kernel /boot/vmlinuz-$(uname -r) -o host.json.xz
      vmitrace profile build --from-guest --lab --kernel 6.12

    Exit status: 0 done, 1 the profile could not be built or written, 2 bad usage.
    """
    from . import cache, isf

    series = None
    try:
        if from_guest:
            from .guest import build_from_guest_cli

            result = build_from_guest_cli(lab=lab, kernel=kernel, ram=ram)
            series = (kernel or "6.1") if lab else None
        else:
            if not kernel:
                raise click.UsageError("give --kernel 6.1|6.12|PATH (or --from-guest)")
            from .build import build_from_image

            image, series = _kernel_image(kernel)
            result = build_from_image(image)
        if validate:
            isf.validate(result)
        path = isf.write(result, output) if output else cache.store(result)
    except ProfileError as exc:
        raise ProfileCliError(str(exc)) from exc
    except OSError as exc:
        raise ProfileCliError(f"cannot write the profile: {exc}") from exc
    prov = isf.embedded(result, "provenance")
    if not as_json:
        click.echo(f"wrote {path}: {prov['banner'].strip()}")
        return
    summary = {"path": str(Path(path).resolve()), "banner": prov["banner"].strip(),
               "lab_kernel": series, "validated": validate, "provenance": prov,
               "counts": _load(str(path)).counts()}
    click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))


def _load(profile_path: str) -> Any:
    from .loader import load

    try:
        return load(profile_path)
    except ProfileError as exc:
        raise ProfileCliError(str(exc)) from exc


@profile.command("show")
@click.argument("profile_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_cmd(profile_path: str, as_json: bool) -> None:
    """Banner, counts of symbols, types and syscalls, and provenance of a profile.

    \b
    Examples:
      vmitrace profile show /tmp/p.json.xz
      vmitrace profile show /tmp/p.json.xz --json | jq .counts

    Exit status: 0 done, 1 the file is not a readable profile, 2 bad usage.
    """
    prof = _load(profile_path)
    info = {"path": str(Path(profile_path).resolve()), "banner": prof.banner.strip(), "counts": prof.counts(),
            "provenance": prof.provenance,
            "syscall_prototypes": prof.syscall_record.get("prototype_source", "none")}
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(f"profile:  {info['path']}")
    click.echo(f"banner:   {info['banner']}")
    for key, value in info["counts"].items():
        click.echo(f"{key + ':':<17}{value}")
    click.echo(f"prototypes from: {info['syscall_prototypes']}")
    for key, value in sorted(prof.provenance.items()):
        if key != "banner":
            click.echo(f"provenance.{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
