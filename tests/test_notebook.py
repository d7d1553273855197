"""The walkthrough notebook runs top to bottom (so it cannot rot) and its reward rises."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "ppo_walkthrough.ipynb"


@pytest.mark.slow
def test_walkthrough_notebook_executes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    outputs = "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "max |sampler - forward| =" in outputs
    first, last = outputs.split("score: first 5 iterations")[1].split("-> last 5")
    assert float(last.split()[0]) > float(first.split()[0]) + 0.1, outputs[-300:]
