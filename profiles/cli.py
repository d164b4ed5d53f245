"""`vmitrace profile ...`: build and inspect Linux profiles (ISF)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import ProfileError


def _fail(exc: ProfileError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.group("profile")
def profile() -> None:
    """Build Linux profiles (volatility3 ISF) from a kernel's own BTF and kallsyms, and show them."""


@profile.command("build")
@click.option("--kernel", "kernel", type=click.Path(dir_okay=False),
              help="vmlinuz (bzImage: xz/zstd/gzip/lz4) or vmlinux file; with --lab: lab kernel series (6.1, 6.12).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output ISF (.json or .json.xz); default: the profile cache.")
@click.option("--from-guest", is_flag=True, help="Read the kernel from a running guest's memory.")
@click.option("--lab", is_flag=True, help="With --from-guest: boot a lab guest (guestlab) and read its RAM.")
@click.option("--ram", type=click.Path(exists=True, dir_okay=False),
              help="With --from-guest: a guest RAM file or raw dump (guest-physical address = file offset).")
@click.option("--validate/--no-validate", default=True,
              help="Validate the ISF against volatility3's schema before writing (default: on).")
def build_cmd(kernel: str | None, output: str | None, from_guest: bool, lab: bool, ram: str | None,
              validate: bool) -> None:
    """Build a profile from a kernel image or from a guest's memory."""
    from . import cache, isf

    try:
        if from_guest:
            from .guest import build_from_guest_cli

            result = build_from_guest_cli(lab=lab, kernel=kernel, ram=ram)
        else:
            if not kernel:
                raise click.UsageError("give --kernel PATH (or --from-guest)")
            from .build import build_from_image

            result = build_from_image(kernel)
        if validate:
            isf.validate(result)
        path = isf.write(result, output) if output else cache.store(result)
    except ProfileError as exc:
        _fail(exc)
        return
    except OSError as exc:
        click.echo(f"error: cannot write the profile: {exc}", err=True)
        sys.exit(2)
    prov = isf.embedded(result, "provenance")
    click.echo(f"wrote {path}: {prov['banner'].strip()}")


@profile.command("show")
@click.argument("profile_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_cmd(profile_path: str, as_json: bool) -> None:
    """Banner, counts of symbols, types and syscalls, and provenance of a profile."""
    from .loader import load

    try:
        prof = load(profile_path)
    except ProfileError as exc:
        _fail(exc)
        return
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
