"""The example notebook runs top to bottom against a demo-layout pipeline dir."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from explorer_fixtures import pipeline_dir

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "explore_demo.ipynb"


def test_example_notebook_executes(tmp_path_factory, monkeypatch):
    run = pipeline_dir(tmp_path_factory)
    monkeypatch.setenv("SAETUNE_RUN_DIR", str(run))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path_factory.getbasetemp())}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "pipeline" in text and "features at model.layers" in text and "no mixture" in text
    html = "".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "sx-tokens" in html and "<script>alert" not in html
