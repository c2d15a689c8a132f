"""The Colab notebook runs top to bottom on a CPU with the tiny preset."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "planet_colab.ipynb"


def _text(cell):
    return "".join(out.get("text", "") for out in cell.outputs if out.get("output_type") == "stream")


def test_notebook_executes_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert "tiny" in "".join(cell.source for cell in nb.cells)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell, on any error

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert "skipping the install" in _text(code[0])
    assert "cpu device(s)" in _text(code[1])
    run = tmp_path / "runs" / "cartpole_swingup_tiny"
    assert len(list((run / "episodes").glob("episode_*.npz"))) == 4
    images = [cell for cell in code if any("image/png" in out.get("data", {}) for out in cell.outputs)]
    assert len(images) == 2  # the returns plot and the open-loop frames
    assert any("text/html" in out.get("data", {}) for out in code[4].outputs)  # the embedded video
    plan = [float(a) for a in _text(code[5]).split("plan:")[1].split("(")[0].split()]
    assert len(plan) == 8 and abs(plan[0] - 0.7) < 0.1 and max(abs(a) for a in plan[1:]) < 0.15, plan
    assert "ms per decision" in _text(code[6])
