"""examples/sae_analysis.ipynb runs top to bottom on the toy model, and what it prints says what it claims.

The notebook trains a small SAE, finds selective latents with ``saetune.run_with_cache``, ablates one with
``saetune.run_with_hooks`` and steers during generation with ``saetune.steering``; the checks below read its
printed output (the numbers it reports must be consistent with the claims in its text).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "sae_analysis.ipynb"


def test_sae_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SAETUNE_KERNELS", "torch")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors[0].get("evalue")
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    html = "".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)

    m = re.search(r"FVU (\d\.\d+), L0 (\d+\.\d)", text)
    assert m and float(m.group(1)) < 0.5 and abs(float(m.group(2)) - 8) < 0.5  # a working TopK SAE, k = 8
    assert "model.layers.2.hook_sae_acts_post" in text and "features on <think>, wait" in text
    assert "sx-tokens" in html  # the highlighted trace

    m = re.search(r"ablating latent \d+ at position \d+: p\(correct\) (\d\.\d+) → (\d\.\d+)", text)
    assert m and float(m.group(2)) < float(m.group(1))  # the chosen ablation hurts the correct result

    lines = {k: v for k, v in re.findall(r"^(plain|ablated \(\d+ = 0\)|steered \(\+wait latent \d+\)):\s*(.*)$", text,
                                          re.M)}
    assert len(lines) == 3 and all(v.startswith("<think>") for v in lines.values())
    plain = lines["plain"]
    assert any(v != plain for k, v in lines.items() if k != "plain")  # steering during generation changes it
    assert "EleutherAI/sae-DeepSeek-R1-Distill-Qwen-1.5B-65k" in text  # the releases table
