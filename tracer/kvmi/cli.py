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


@kvmi.command("dump")
@click.argument("recording", type=click.Path(exists=True, dir_okay=False))
@click.option("--limit", type=click.IntRange(min=0), default=0,
              help="Stop after this many messages (0: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
def dump_cmd(recording: str, limit: int, as_json: bool) -> None:
    """List the messages of a session recording (.kvmirec), in recorded order.

    \b
    Examples:
      vmitrace kvmi dump vm1.kvmirec --limit 20
      vmitrace kvmi dump vm1.kvmirec --json | jq 'select(.event == "KVMI_EVENT_CR")'
    """
    from .errors import ProtocolError
    from .protocol import decode_event, parse_handshake
    from .recording import RecordingError, RecordingReader

    try:
        reader = RecordingReader(recording)
        if not as_json:
            click.echo(f"# {reader.name} {reader.uuid} start_time={reader.start_time}")
        seen = {"in": False, "out": False}
        first = None
        hdr = abi.KVMI_MSG_HDR.struct
        for n, rec in enumerate(reader):
            if limit and n >= limit:
                break
            first = rec.monotonic_ns if first is None else first
            row: dict = {"t_ns": rec.monotonic_ns - first, "dir": rec.direction,
                         "bytes": len(rec.raw)}
            if not seen[rec.direction]:
                seen[rec.direction] = True
                row["message"] = ("kvmi_qemu2introspector" if rec.direction == "in"
                                  else "kvmi_introspector2qemu")
                if rec.direction == "in":
                    row["vm"] = parse_handshake(rec.raw).name
            elif len(rec.raw) >= hdr.size:
                msg_id, size, seq = hdr.unpack_from(rec.raw)
                row.update(message=abi.COMMAND_NAMES.get(msg_id, hex(msg_id)), seq=seq)
                if msg_id == abi.KVMI_EVENT and rec.direction == "in":
                    try:
                        ev = decode_event(rec.raw, size, seq)
                        row.update(event=ev.name, vcpu=ev.vcpu, rip=ev.regs.rip, **ev.values())
                    except ProtocolError as exc:
                        row["error"] = str(exc)
            if as_json:
                click.echo(json.dumps(row))
            else:
                extra = " ".join(f"{k}={v:#x}" if isinstance(v, int) else f"{k}={v}"
                                 for k, v in row.items()
                                 if k not in ("t_ns", "dir", "bytes", "message"))
                click.echo(f"{row['t_ns'] / 1e6:12.3f} ms {row['dir']:>3} {row['bytes']:6d}B "
                           f"{row['message']} {extra}")
    except RecordingError as exc:
        raise click.ClickException(str(exc)) from None
