"""Executes the Colab tutorials top to bottom (nbclient) with small settings; any error fails.

As in TFF's own notebooks, cells marked `#@test {"skip": true}` (or tagged `skip-execution`) are
the Colab-only install steps: they are dropped. The cell tagged `parameters` is followed by one
that sets small values, so every cell runs once without training for minutes. The notebooks are
executed as background jobs (conftest.py) while the other tests run.
"""

from __future__ import annotations

import asyncio
import functools
import pathlib
from collections.abc import Mapping

import nbclient
import nbformat
import pytest

from tests import testing

TUTORIALS = testing.REPO_ROOT / "tutorials"

# The fewest rounds, clients and held-out clients that still run every cell: what is tested is that
# the notebook runs and draws, not what it learns (and building each algorithm costs more than its
# rounds).
SMALL_SETTINGS = {
    "meta_federated_learning.ipynb": (
        "ROUNDS = 2\nCLIENTS_PER_ROUND = 2\nEVAL_EVERY = 2\nEVAL_CLIENTS = 3\n"
        "HAND_BUILT_ROUNDS = 1"
    ),
    "custom_task.ipynb": "ROUNDS = 2\nCLIENTS_PER_ROUND = 2\nEVAL_CLIENTS = 3",
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


def _client(name: str) -> tuple[nbclient.NotebookClient, dict[str, str]]:
    """A client for the prepared tutorial `name`, and the environment of its kernel."""
    client = nbclient.NotebookClient(
        _prepared(TUTORIALS / name),
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    return client, testing.binary_env()


def _execute(name: str, scratch: pathlib.Path):
    """The tutorial `name` executed (cells run in tutorials/, as a reader runs them)."""
    client, env = _client(name)
    # Its own event loop: this may run in a background thread.
    return asyncio.run(client.async_execute(env=env, cwd=str(TUTORIALS)))


# Started early by conftest.py, one kernel a job.
BACKGROUND_JOBS = {
    "executed": {name: functools.partial(_execute, name) for name in sorted(SMALL_SETTINGS)}
}


@pytest.fixture(scope="module")
def executed(background) -> Mapping:
    """`{name: the executed notebook}`, read lazily (a notebook that failed raises its error in
    its own test)."""
    return background.results(__name__, "executed")


def _outputs(notebook) -> str:
    text = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", ""))
            text.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


@pytest.mark.parametrize("name", sorted(SMALL_SETTINGS))
def test_tutorial_runs_top_to_bottom(name, executed):
    notebook = _prepared(TUTORIALS / name)
    assert any(
        "parameters" in c.metadata.get("tags", []) for c in notebook.cells
    ), f"{name} needs a cell tagged 'parameters' for the small test settings"
    result = executed[name]
    outputs = _outputs(result)
    # The last cell stops the notebook's TFF worker and prints what is left.
    assert "workers still running: []" in outputs
    assert any(
        o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
        for c in result.cells
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
