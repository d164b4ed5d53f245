"""The `vmitrace` command line. Logs go to stderr, data to stdout or files.

The command modules import their heavy dependencies (pyarrow, pandas, the collector) inside
the commands, so registering them here keeps `vmitrace --help` fast.
"""
from __future__ import annotations

import logging

import click

from guestlab.cli import lab
from profiles.cli import profile
from tracer.demo import demo
from tracer.kvmi.cli import kvmi
from tracer.probe import probe
from tracer.trace_cli import replay, trace


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """vmitrace: agentless tracing of virtual machines over KVMI."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for _command in (demo, trace, replay, probe, profile, lab, kvmi):
    main.add_command(_command)
