"""Executes the Colab tutorials top to bottom (nbclient) with small settings; any error fails.

As in TFF's own notebooks, cells marked `#@test {"skip": true}` (or tagged `skip-execution`) are
the Colab-only install steps: they are dropped. The cell tagged `parameters` is followed by one
that sets small values, so the whole notebook runs in seconds rather than minutes.
"""

from __future__ import annotations

import os
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"

SMALL_SETTINGS = {
    "meta_federated_learning.ipynb": (
        "ROUNDS = 4\nCLIENTS_PER_ROUND = 5\nEVAL_EVERY = 4\nEVAL_CLIENTS = 10\n"
        "HAND_BUILT_ROUNDS = 2"
    ),
    "custom_task.ipynb": "ROUNDS = 3\nCLIENTS_PER_ROUND = 4\nEVAL_CLIENTS = 8",
}


def _skipped(cell) -> bool:
    return "skip-execution" in cell.metadata.get("tags", []) or cell.source.startswith(
        '#@test {"skip": true}'
    )


def _prepared(path: pathlib.Path):
    notebook = nbformat.read(path, as_version=4)
    cells = []
    for cell in notebook.cells:
        if cell.cell_type == "code" and _skipped(cell):
            continue
        cells.append(cell)
        if "parameters" in cell.metadata.get("tags", []):
            small = nbformat.v4.new_code_cell(SMALL_SETTINGS[path.name])
            small.id = f"{path.stem}-small-settings"
            cells.append(small)
    notebook.cells = cells
    return notebook


def _execute(path: pathlib.Path, tmp_path: pathlib.Path):
    notebook = _prepared(path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    client.execute(env=env, cwd=str(TUTORIALS))
    return notebook


def _outputs(notebook) -> str:
    text = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", ""))
            text.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


@pytest.mark.parametrize("name", sorted(SMALL_SETTINGS))
def test_tutorial_runs_top_to_bottom(name, tmp_path):
    path = TUTORIALS / name
    notebook = _prepared(path)
    assert any(
        "parameters" in c.metadata.get("tags", []) for c in notebook.cells
    ), f"{name} needs a cell tagged 'parameters' for the small test settings"
    executed = _execute(path, tmp_path)
    outputs = _outputs(executed)
    # The last cell stops the notebook's TFF worker and prints what is left.
    assert "workers still running: []" in outputs
    assert any(
        o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
        for c in executed.cells
        for o in c.get("outputs", [])
    ), f"{name} should draw its plot"


@pytest.mark.parametrize("name", sorted(SMALL_SETTINGS))
def test_tutorial_follows_tff_notebook_conventions(name):
    notebook = nbformat.read(TUTORIALS / name, as_version=4)
    nbformat.validate(notebook)
    first = notebook.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "a title comes first"
    text = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    assert "colab.research.google.com/github/" in text and f"tutorials/{name}" in text
    assert "What you will learn" in text
    installs = [c for c in notebook.cells if c.cell_type == "code" and "pip install" in c.source]
    assert installs and all(_skipped(c) for c in installs), "pip installs must be skipped in tests"
    assert all(
        not c.get("outputs") for c in notebook.cells if c.cell_type == "code"
    ), "notebooks are stored without outputs"
