"""notebooks/forensic_replay.ipynb runs headless (nbclient) against the dataset of a real trace
of a lab guest (the demo run shared with tests/test_demo.py), renders its figures and finds the
workload's processes, files and connections."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from guestlab import workloads as wl
from test_demo import demo_run

pytestmark = pytest.mark.guest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "forensic_replay.ipynb"
FIGURES = 6  # process tree, timelines, heatmap, paths, connections, rarity


def _execute(env_dataset: str | None, cwd: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    saved = os.environ.get("VMITRACE_DATASET")
    # The kernel inherits this process's environment.
    if env_dataset is None:
        os.environ.pop("VMITRACE_DATASET", None)
    else:
        os.environ["VMITRACE_DATASET"] = env_dataset
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        if saved is None:
            os.environ.pop("VMITRACE_DATASET", None)
        else:
            os.environ["VMITRACE_DATASET"] = saved
    return notebook


def _outputs(notebook: nbformat.NotebookNode) -> list[dict[str, Any]]:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


def _text(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for out in _outputs(notebook):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        parts.append(out.get("data", {}).get("text/plain", ""))
        parts.append(out.get("data", {}).get("text/html", ""))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    run = demo_run()
    run.summary()  # fails with the demo's stderr if the shared trace failed
    notebook = _execute(str(run.dataset), tmp_path_factory.mktemp("nb"))
    nbformat.write(notebook, tmp_path_factory.getbasetemp() / "forensic_replay.out.ipynb")
    return notebook


def test_every_cell_ran_without_error(executed: nbformat.NotebookNode) -> None:
    code_cells = [c for c in executed.cells if c.cell_type == "code"]
    assert code_cells and all(c.execution_count for c in code_cells)
    assert not [o for o in _outputs(executed) if o.get("output_type") == "error"]


def test_figures_are_rendered(executed: nbformat.NotebookNode) -> None:
    images = [o for o in _outputs(executed) if "image/png" in o.get("data", {})]
    assert len(images) >= FIGURES
    for image in images:
        assert len(image["data"]["image/png"]) > 2000  # base64 of a real PNG, not a stub


def test_tables_hold_the_workload(executed: nbformat.NotebookNode) -> None:
    text = _text(executed)
    for comm in wl.WORKLOAD_COMMS.values():
        assert comm in text
    for path in (wl.FILE_PATH, wl.ENOENT_PATH, *wl.WORKLOAD_BINARIES.values(), wl.EXEC_PATH):
        assert path in text
    assert wl.TCP_ADDRESS in text and str(wl.TCP_PORT) in text
    assert "ENOENT" in text and hex(wl.VMCALL_RAX) in text


def test_process_tree_folds_the_workload(executed: nbformat.NotebookNode) -> None:
    tree = next(o["text"] for o in _outputs(executed)
                if o.get("output_type") == "stream" and "─ workload" in o["text"])
    lines = tree.splitlines()
    driver = next(i for i, line in enumerate(lines) if line.lstrip("│ ├└─").startswith("workload"))
    indent = lines[driver].index("workload")
    children = []
    for line in lines[driver + 1:]:
        name_at = len(line) - len(line.lstrip("│ ├└─"))
        if name_at <= indent:
            break
        if name_at == indent + 3:
            children.append(line[name_at:].split()[0])
    assert set(wl.WORKLOAD_COMMS.values()) <= set(children)


def test_missing_dataset_says_what_to_do(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CellExecutionError) as failure:
        _execute(str(empty), tmp_path)
    assert "VMITRACE_DATASET" in str(failure.value) and "vmitrace demo" in str(failure.value)


def test_default_dataset_is_the_demo_output(tmp_path: Path) -> None:
    """Without VMITRACE_DATASET the notebook reads ./vmitrace-demo-out (what the demo writes)."""
    run = demo_run()
    (tmp_path / "vmitrace-demo-out").symlink_to(run.out, target_is_directory=True)
    notebook = _execute(None, tmp_path)
    first = next(o["text"] for o in _outputs(notebook) if o.get("output_type") == "stream")
    assert f"dataset: {run.dataset.resolve()}" in first
    assert json.dumps(wl.FILE_PATH)[1:-1] in _text(notebook)


def test_dataset_without_syscalls_runs(tmp_path: Path) -> None:
    """A dataset holding no system calls or processes (e.g. a trace filtered to nothing) still
    runs to the end: every step says there is nothing to show instead of failing. The dataset is
    written by the real Parquet sink from schema records; no guest is needed for this case."""
    import time

    from sinks.parquet import ParquetSink
    from sinks.schema import RecordFactory

    factory = RecordFactory("vm-empty", "empty", "host", 1)
    now = time.time_ns()
    sink = ParquetSink(tmp_path / "dataset")
    sink.write([factory.new("hypercall", "hypercall", now, action="vmcall", pid=7, comm="probe",
                            process_uid="vm-empty/7/1", hypercall_nr=wl.VMCALL_RAX),
                factory.loss("collector.events_lost", 3, now - 1000, now)])
    sink.close()
    notebook = _execute(str(tmp_path / "dataset"), tmp_path)
    text = _text(notebook)
    assert "no system calls in this dataset" in text and "no processes in this dataset" in text
    assert hex(wl.VMCALL_RAX) in text and "collector.events_lost" in text
