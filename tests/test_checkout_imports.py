"""The checkout root on the import path: its ``kernels/``, ``rl/``, ``analysis/`` and ``app/`` folders never
shadow an installed package, and everything saetune does still works from there.

transformers imports the ``kernels`` distribution when it loads a model; a process started in the
checkout root (``python -m saetune.cli``, ``torchrun -m saetune.cli``, pytest, a bench script)
used to find the checkout's ``kernels/`` instead. Each check runs in a fresh interpreter whose
working directory is the checkout root and whose ``sys.path`` starts with it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "rl", "analysis", "app")


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)  # the root first on sys.path, whatever the entry point
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _py(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-c", code], timeout)


def test_the_kernels_distribution_is_installed():
    """The checks below mean something only while the real ``kernels`` package is there to be shadowed."""
    assert importlib.metadata.version("kernels")


def test_top_level_names_never_resolve_to_the_checkout():
    code = f"""
import importlib, json, sys
assert sys.path[0] in ('', {str(ROOT)!r}), sys.path[:2]
out = {{}}
for name in {FOLDERS!r}:
    try:
        mod = importlib.import_module(name)
        out[name] = getattr(mod, '__file__', None) or str(list(mod.__path__))
    except ModuleNotFoundError as e:
        out[name] = 'missing: ' + str(e)
print(json.dumps(out))
"""
    found = json.loads(_py(code).stdout.strip().splitlines()[-1])
    for name, where in found.items():
        assert str(ROOT / name) not in where.split("missing:")[0], f"import {name} found the checkout: {where}"
    installed = Path(importlib.import_module("kernels").__file__).resolve()
    assert found["kernels"] == str(installed), found["kernels"]  # the real distribution, not an empty stand-in
    for name in ("rl", "analysis", "app"):
        assert found[name].startswith("missing:") and f"saetune.{name}" in found[name], found[name]


def test_load_the_toy_model_from_the_root():
    proc = _py("from saetune.models import load_model; import kernels, sys; m, t = load_model('toy');"
               "print(type(m).__name__, kernels.__file__)")
    assert str(ROOT / "kernels") not in proc.stdout, proc.stdout


def test_cli_help_from_the_root():
    proc = _run([sys.executable, "-m", "saetune.cli", "--help"])
    assert "train-sae" in proc.stdout and "tune" in proc.stdout


def _public_modules() -> list[str]:
    import pkgutil

    import saetune

    names = []
    for info in pkgutil.walk_packages(saetune.__path__, "saetune."):
        names.append(info.name)
    for sub in FOLDERS:
        pkg = importlib.import_module(f"saetune.{sub}")
        names.append(pkg.__name__)
        names += [i.name for i in pkgutil.walk_packages(pkg.__path__, f"saetune.{sub}.")]
    return sorted(n for n in set(names) if not n.startswith("saetune.app.explorer"))  # a Streamlit script


def test_every_public_module_imports_from_the_root():
    modules = _public_modules()
    assert len(modules) > 40 and "saetune.kernels.dispatch" in modules and "saetune.rl.trainer" in modules
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "bad = {n: getattr(m, '__file__', '') for n, m in sys.modules.items()\n"
            f"       if n.split('.')[0] in {FOLDERS!r}\n"
            f"       and (getattr(m, '__file__', '') or '').startswith({str(ROOT)!r} + '/' + n.split('.')[0] + '/')}}\n"
            "print(json.dumps(bad))\n")
    bad = json.loads(_py(code, timeout=400).stdout.strip().splitlines()[-1])
    assert bad == {}, f"top-level modules loaded from the checkout: {bad}"


@pytest.mark.slow
def test_torchrun_cli_from_the_root(tmp_path):
    """The README's multi-process form: ``torchrun -m saetune.cli …`` in the root loads the toy model and caches."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch, beside this interpreter"
    out = tmp_path / "acts"
    _run([torchrun, "--nproc-per-node", "1", "--standalone", "-m", "saetune.cli", "cache", "--model", "toy",
          "--hooks", "model.layers.2", "--dataset", "toy", "--max-examples", "20", "--context-size", "32",
          "--out", str(out), "--no-progress"], timeout=400)
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
