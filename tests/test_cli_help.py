"""The command line as a whole: every command's --help (through the installed `vmitrace` entry
point, as a user runs it), the examples that need no guest, usage errors, shared option names,
--json for tables, and docs/cli.md covering every command and option.

Examples that need a guest, a KVMI host or a file a trace produces (a recording, a profile path)
are run by the tests of those commands (tests/test_demo.py runs the demo and `kvmi dump` on its
recording). There are no known gaps left: the tests fail on any deviation from the conventions
of docs/cli.md.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tracer.cli import main

VMITRACE = str(Path(sys.executable).with_name("vmitrace"))
DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

# An example needs a guest or a host (or a file only a trace makes, or a file of the host's own)
# when it matches one of these.
NEEDS_GUEST = [r"--lab\b", r"--listen\b", r"^vmitrace lab run\b", r"^vmitrace demo\b",
               r"--from-guest\b", r"\.kvmirec\b", r"--profile \S+", r"^vmitrace replay\b",
               r"/boot/"]
# Files some examples read that an earlier example writes: run that one first.
MADE_BY_EXAMPLE = {"/tmp/p.json.xz": "vmitrace profile build --kernel 6.12 -o /tmp/p.json.xz"}
# Modules `vmitrace --help` and every command's --help must not import (pyarrow and pandas
# alone take seconds on a loaded machine).
HEAVY_MODULES = ("pandas", "pyarrow", "numpy", "tracer.collector", "sinks.schema", "duckdb")
RECORD_COMMANDS = {"trace", "replay"}  # print records (choose the format with --sink), no table


def _walk(command: click.Command, path: tuple[str, ...] = ()):
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from _walk(command.commands[name], path + (name,))


COMMANDS = dict(_walk(main))
LEAVES = {" ".join(p): c for p, c in COMMANDS.items() if not isinstance(c, click.Group)}


def _help_text(path: tuple[str, ...]) -> str:
    """--help text rendered in-process (for collecting the examples at collection time)."""
    command: click.Command = main
    ctx = click.Context(main, info_name="vmitrace")
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
        ctx = click.Context(command, info_name=name, parent=ctx)
    return command.get_help(ctx)


def _examples(help_text: str) -> list[str]:
    lines = help_text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Examples:")
    except StopIteration:
        return []
    out = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        out.append(line.split("  #")[0].strip())
    return out


ALL_EXAMPLES = [(" ".join(p), ex) for p in COMMANDS for ex in _examples(_help_text(p))]
RUNNABLE = [(c, ex) for c, ex in ALL_EXAMPLES
            if not any(re.search(pattern, ex) for pattern in NEEDS_GUEST)]


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VMITRACE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("path", [" ".join(p) for p in COMMANDS], ids=lambda p: p or "vmitrace")
def test_help_works(path: str) -> None:
    proc = _run([*path.split(), "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: vmitrace {path}".rstrip())
    assert "Options:" in proc.stdout and proc.stderr == ""
    command = COMMANDS[tuple(path.split())]
    if isinstance(command, click.Group):
        for name in command.commands:
            assert f"  {name} " in proc.stdout or f"  {name}\n" in proc.stdout


def test_short_help_flag() -> None:
    for path in ([], ["demo"], ["kvmi", "abi"]):
        proc = _run([*path, "-h"], timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith(" ".join(["Usage: vmitrace", *path]))


def test_every_command_is_registered() -> None:
    assert {"demo", "trace", "replay", "probe", "profile build", "profile show", "lab build",
            "lab run", "kvmi abi", "kvmi dump"} <= LEAVES.keys()


def test_leaf_commands_show_examples() -> None:
    without = {name for name in LEAVES if not _examples(_help_text(tuple(name.split())))}
    assert not without, f"commands without examples: {sorted(without)}"


def test_every_option_has_help() -> None:
    without = {(name, p.opts[0]) for name, cmd in LEAVES.items() for p in cmd.params
               if isinstance(p, click.Option) and not (p.help or "").strip()}
    assert not without, f"options without help: {sorted(without)}"


def test_help_imports_no_heavy_module() -> None:
    """Rendering every --help (as the entry point does) leaves pyarrow/pandas/the collector
    unimported: they load only when a command runs."""
    script = (
        "import sys\n"
        "from tracer.cli import main\n"
        f"for path in {[list(p) for p in COMMANDS]!r}:\n"
        "    try:\n"
        "        main([*path, '--help'], prog_name='vmitrace')\n"
        "    except SystemExit as end:\n"
        "        assert end.code == 0, (path, end.code)\n"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_there_are_examples_to_run() -> None:
    assert len(RUNNABLE) >= 4 and len(ALL_EXAMPLES) > len(RUNNABLE)


@pytest.mark.parametrize("command,example", RUNNABLE, ids=[ex for _, ex in RUNNABLE])
def test_example_runs(command: str, example: str) -> None:
    """Run the example as printed, in a shell (pipes into jq included)."""
    env = dict(os.environ, PATH=f"{Path(VMITRACE).parent}{os.pathsep}{os.environ['PATH']}")
    for path, maker in MADE_BY_EXAMPLE.items():
        if path in example and maker != example and not Path(path).exists():
            made = subprocess.run(["bash", "-c", maker], capture_output=True, text=True,
                                  timeout=600, env=env)
            assert made.returncode == 0, f"{maker}\n{made.stderr[-3000:]}"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", example], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{example}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip()
    if "--json" in example and "|" not in example:
        json.loads(proc.stdout)


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_usage_error_exits_2(name: str) -> None:
    proc = _run([*name.split(), "--no-such-option"], timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and "No such option" in proc.stderr


def test_json_wherever_a_table_is_printed() -> None:
    without = {name for name, cmd in LEAVES.items()
               if name not in RECORD_COMMANDS
               and not any("--json" in getattr(p, "opts", ()) for p in cmd.params)}
    assert not without, f"commands without --json: {sorted(without)}"


def _option(command: click.Command, name: str) -> click.Option | None:
    return next((p for p in command.params
                 if isinstance(p, click.Option) and name in p.opts), None)


def _lab_series(o: click.Option) -> set[str]:
    """The lab kernel series a --kernel option accepts by name (profile build: or a path)."""
    if isinstance(o.type, click.Choice):
        return set(o.type.choices)
    return set(getattr(o.type, "lab_series", ()))


SHARED_OPTIONS = {
    "--kernel": lambda o: {"6.1", "6.12"} <= _lab_series(o) <= {"6.1", "6.12", "all"},
    "--vcpus": lambda o: isinstance(o.type, click.IntRange) and (o.type.min, o.type.max) == (1, 4),
    "--duration": lambda o: isinstance(o.type, click.types.FloatParamType) and not o.is_flag,
    "--json": lambda o: o.is_flag,
    "--lab": lambda o: o.is_flag,
    "--listen": lambda o: not o.is_flag and o.type is click.STRING,
    "--sink": lambda o: o.multiple and o.type is click.STRING,
    "--profile": lambda o: not o.is_flag and not o.multiple,
}


def test_shared_option_names_mean_the_same_everywhere() -> None:
    deviations = {(name, opt) for name, cmd in LEAVES.items()
                  for opt, agrees in SHARED_OPTIONS.items()
                  if (o := _option(cmd, opt)) is not None and not agrees(o)}
    assert not deviations, f"options that differ: {sorted(deviations)}"


def test_logging_goes_to_stderr() -> None:
    proc = _run(["-vv", "kvmi", "abi", "--json"], timeout=120)
    assert proc.returncode == 0
    assert "structs" in json.loads(proc.stdout)


def _doc_sections() -> dict[str, str]:
    text = DOCS.read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    return {part.splitlines()[0]: part for part in parts[1:]}


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_docs_cover_the_command_and_its_options(name: str) -> None:
    section = next((body for heading, body in _doc_sections().items()
                    if f"`vmitrace {name}" in heading or
                    re.search(rf"`vmitrace {name.split()[0]} .*\b{name.split()[-1]}\b", heading)),
                   None)
    assert section is not None, f"docs/cli.md has no section for `vmitrace {name}`"
    assert "Exit status" in section
    for param in LEAVES[name].params:
        if isinstance(param, click.Option):
            longest = max(param.opts + param.secondary_opts, key=len)
            assert f"`{longest}" in section, f"{name}: option {longest} not documented"
