"""The checkout's top-level folders are ``saetune.kernels``, ``saetune.rl``, … — never top-level packages.

The repository keeps ``kernels/``, ``rl/``, ``analysis/`` and ``app/`` at its root and installs
them as sub-packages of ``saetune`` (setuptools ``package-dir``). A process whose import path
starts at the checkout root (``python -m saetune.cli`` run there, ``torchrun -m …``, pytest, a
script that inserts the root) would otherwise find those folders as top-level packages named
``kernels``, ``rl``, … — and ``kernels`` is a real distribution that transformers imports.

Each folder's ``__init__`` therefore checks the name it was imported under. Under
``saetune.<folder>`` it runs as usual. Under the bare ``<folder>`` name it calls
:func:`hand_over`, which looks the name up again on the import path *without* the checkout root:

- an installed package of that name (the ``kernels`` distribution) is loaded and put in
  ``sys.modules`` in the folder's place, so ``import kernels`` gives the installed package;
- with none installed, the import fails with ``ModuleNotFoundError``, exactly as it would
  outside the checkout.

This module imports only the standard library: it runs before anything of saetune's is loaded.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _same_dir(entry: str, root: str) -> bool:
    """Whether the ``sys.path`` entry names the directory ``root`` (``''`` is the working directory)."""
    try:
        return os.path.samefile(entry or os.getcwd(), root)
    except OSError:
        return False


def hand_over(name: str, init_file: str) -> None:
    """Replace the checkout folder imported as top-level ``name`` with the installed package of that name.

    ``init_file`` is the folder's ``__init__.py``; its parent's parent is the checkout root,
    which is left out of the search. Raises ``ModuleNotFoundError`` when nothing else is installed
    under ``name``.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [p for p in sys.path if isinstance(p, str) and not _same_dir(p, root)]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the checkout's {name}/ folder is saetune.{name}: "
            f"import saetune.{name} instead)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import in progress returns what sys.modules holds once this body ends
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
