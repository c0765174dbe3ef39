"""Every notebook runs top to bottom, headless, on this CPU.

Each notebook's first code cell is tagged `parameters` (papermill's convention) and holds the
switches a CPU run turns off: installing from GitHub, downloads, accelerators, and the sizes
of slow steps. The values below are injected as a cell right after it, as papermill does;
any error in any cell fails the test. Each notebook opens with an "Open in Colab" badge.
"""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# what a CI run changes, per notebook (everything else keeps its Colab default)
CPU_PARAMETERS = {
    "quickstart.ipynb": {"INSTALL": False},
    "parity.ipynb": {"INSTALL": False, "TESTS": ["tests/test_vae.py"], "SELECT": "test_pixel_pipeline and decode"},
    "released_weights.ipynb": {"INSTALL": False, "DOWNLOAD": False, "ACCELERATOR": False, "SIZE": "480x480"},
    "finetune_lora.ipynb": {"INSTALL": False, "CLIPS": 4, "STEPS": 2},
}


def test_every_notebook_is_run_here():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CPU_PARAMETERS)


def _with_parameters(nb, values: dict):
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "one code cell tagged 'parameters'"
    names = set()
    for line in nb.cells[tagged[0]].source.splitlines():
        if "=" in line and not line.startswith((" ", "#")):
            names.add(line.split("=")[0].strip())
    unknown = set(values) - names
    assert not unknown, f"not parameters of this notebook: {unknown}"
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CPU_PARAMETERS))
def test_notebook_runs_headless_on_cpu(name, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "colab.research.google.com/github/" in first.source
    assert f"/blob/main/notebooks/{name}" in first.source
    nb = _with_parameters(nb, CPU_PARAMETERS[name])
    # the kernel works in tmp_path (the notebook's outputs land there) and finds this checkout
    # through MAGI_JAX_ROOT, as the setup cell reads it
    monkeypatch.setenv("MAGI_JAX_ROOT", str(ROOT))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, json.dumps(errors)[:2000]
