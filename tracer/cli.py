"""The `vmitrace` command line. Logs go to stderr, data to stdout or files."""
from __future__ import annotations

import logging

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """vmitrace: agentless tracing of virtual machines over KVMI."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


from guestlab.cli import lab  # noqa: E402  (the guest lab registers its group)
main.add_command(lab)
from tracer.kvmi.cli import kvmi  # noqa: E402
main.add_command(kvmi)
from profiles.cli import profile as _profile; main.add_command(_profile)  # noqa: E402,E702
from tracer.trace_cli import trace as _trace; main.add_command(_trace)  # noqa: E402,E702
from tracer.trace_cli import replay as _replay; main.add_command(_replay)  # noqa: E402,E702
from tracer.probe import probe as _probe; main.add_command(_probe)  # noqa: E402,E702
from tracer.demo import demo as _demo; main.add_command(_demo)  # noqa: E402,E702
