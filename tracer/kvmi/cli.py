"""``vmitrace kvmi ...``: inspect the KVMI dialect this client speaks."""
from __future__ import annotations

import json

import click

from . import abi


@click.group("kvmi")
def kvmi() -> None:
    """KVMI (kvmi-v7 dialect) client tools."""


@kvmi.command("abi")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--struct", "only", multiple=True, metavar="NAME",
              help="Show only these structs (C names; repeatable).")
def abi_cmd(as_json: bool, only: tuple[str, ...]) -> None:
    """Print every wire struct (size, field offsets) and every constant, under C names.

    Use it to debug a dialect mismatch between kernel, QEMU and introspector: compare the
    sizes and offsets with `pahole` output or the host's headers.

    \b
    Examples:
      vmitrace kvmi abi                          # readable tables
      vmitrace kvmi abi --json | jq '.structs.kvmi_event'
      vmitrace kvmi abi --struct kvmi_event --struct kvmi_event_arch
      vmitrace kvmi abi --json | jq '.constants.KVMI_GET_VERSION'
    """
    desc = abi.describe()
    if only:
        unknown = [n for n in only if n not in desc["structs"]]
        if unknown:
            raise click.BadParameter(f"unknown struct(s): {', '.join(unknown)}",
                                     param_hint="--struct")
        desc["structs"] = {n: desc["structs"][n] for n in only}
    if as_json:
        click.echo(json.dumps(desc, indent=2))
        return
    for name, sd in desc["structs"].items():
        click.echo(f"struct {name}  /* {sd['size']} bytes */")
        for fname, f in sd["fields"].items():
            note = "  (padding, must be 0)" if f.get("padding") else ""
            click.echo(f"  {f['offset']:5d} {f['size']:5d}  {f['type']:<24} {fname}{note}")
        click.echo("")
    if only:
        return
    click.echo("commands:")
    for cname, c in desc["commands"].items():
        vcpu = "vcpu" if c["vcpu_hdr"] else "vm  "
        click.echo(f"  {c['id']:#06x} {vcpu} {cname:<32} req={c['request'] or '-'} "
                   f"reply={c['reply'] or '-'}")
    click.echo("\nevents:")
    for ename, e in desc["events"].items():
        click.echo(f"  {e['id']:3d} {ename:<26} payload={e['payload'] or '-'} "
                   f"reply={e['reply'] or '-'}")
    click.echo("\nconstants:")
    for cname, value in desc["constants"].items():
        click.echo(f"  {cname:<36} {value:#x} ({value})")
