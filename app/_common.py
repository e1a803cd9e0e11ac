"""Shared helpers of the explorer pages: the run dir, cached readers, messages.

Caching: big artifacts (feature data, a loaded model) with ``st.cache_resource``, small records
(manifests, tables) with ``st.cache_data``; every key includes the path and its modification
time, so a stage that writes more shows up on the next rerun.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import streamlit as st

from saetune.analysis import rundirs
from saetune.errors import SaetuneError

ENV = "SAETUNE_RUN_DIR"


def run_dir() -> str:
    return os.environ.get(ENV, "")


@st.cache_data(show_spinner=False, max_entries=16)
def _discover(path: str, mtime: float) -> rundirs.Discovery:
    return rundirs.discover(path)


def discovery() -> rundirs.Discovery:
    """What ``SAETUNE_RUN_DIR`` holds (cached on its path and modification time)."""
    p = run_dir()
    return _discover(p, rundirs.mtime_key(p) if p else 0.0)


def header(title: str, caption: str | None = None) -> rundirs.Discovery | None:
    """Page title plus the run dir line; returns the discovery, or None after showing why not."""
    st.set_page_config(page_title=f"saetune · {title}", layout="wide")
    st.title(title)
    d = discovery()
    if d.kind in ("missing", "empty"):
        st.warning(d.message)
        return None
    st.caption(f"run dir: `{d.root}` ({'pipeline with ' + str(len(d.runs)) + ' stages' if d.kind == 'pipeline' else 'single run'})"
               + (f" · {caption}" if caption else ""))
    for r in d.runs:
        for p in r.problems:
            st.info(p)
    return d


@contextlib.contextmanager
def guard(what: str) -> Iterator[None]:
    """Show a clear message instead of a traceback when ``what`` cannot be read or computed."""
    try:
        yield
    except SaetuneError as e:
        st.error(f"{what}: {e}")
    except (OSError, ValueError, KeyError, EOFError) as e:  # a half-written artifact (JSON, safetensors): say so
        st.error(f"{what} could not be read ({type(e).__name__}: {e}). If a stage is still writing "
                 "this run dir, reload when it has finished.")
    except Exception as e:  # anything else is not the run dir's fault: no hint about half-written files
        st.error(f"{what} failed ({type(e).__name__}: {e}): an error in saetune or its environment, not in "
                 "the run dir; the traceback follows.")
        st.exception(e)


@st.cache_resource(show_spinner=False, max_entries=8)
def _feature_data(path: str, mtime: float):
    from saetune.analysis.feature_data import FeatureData
    return FeatureData(path)


def feature_data(path: str | Path):
    """A lazily-reading FeatureData, shared across reruns (keyed on path and mtime)."""
    return _feature_data(str(path), rundirs.mtime_key(path))


@st.cache_data(show_spinner=False, max_entries=32)
def _json(path: str, mtime: float) -> Any:
    return rundirs.read_json(path)


def read_json(path: str | Path) -> Any:
    return _json(str(path), rundirs.mtime_key(path))


@st.cache_data(show_spinner=False, max_entries=64)
def _metrics(path: str, mtime: float) -> list[dict]:
    return rundirs.read_jsonl(Path(path) / "metrics.jsonl")


def metrics(run: Path) -> list[dict]:
    return _metrics(str(run), rundirs.mtime_key(Path(run) / "metrics.jsonl"))


@st.cache_data(show_spinner=False, max_entries=8)
def _traces_table(path: str, mtime: float):
    from saetune.analysis.traces import TraceFile, traces_table
    return traces_table(list(TraceFile(path)))


def traces_table(path: str | Path):
    """The one-row-per-trace table of a traces file (parsed once per modification)."""
    return _traces_table(str(path), rundirs.mtime_key(path))


@st.cache_resource(show_spinner=False, max_entries=2)
def _model_and_sae(model: str, sae: str, hook: str | None):
    from saetune.models import load_model
    from saetune.sae import SAE
    m, tok = load_model(model, device="cpu")
    return m, tok, SAE.load(sae, hook=hook)


def model_and_sae(model: str, sae: str, hook: str | None = None):
    """The live model, tokenizer and SAE, loaded once on first use (cache_resource)."""
    return _model_and_sae(model, sae, hook)


def find_sae_and_model(d: rundirs.Discovery) -> tuple[str, str, str, str] | None:
    """(model path, SAE dir, hook, run holding every SAE) for live views: the first SAE in the
    run and its recorded model."""
    from saetune.analysis.rundirs import find_saes, recorded_model
    for r in d.runs:
        if (r.path / "sae").is_dir():
            try:
                saes, run = find_saes(r.path)
                hook, path = next(iter(saes.items()))
                return recorded_model(saes, run), str(path), hook, str(r.path)
            except (SaetuneError, OSError, ValueError):
                continue
    return None


@st.cache_resource(show_spinner=False, max_entries=2)
def all_saes(run: str) -> dict:
    """Every SAE of a run dir by hook, loaded once (cache_resource)."""
    from saetune.analysis.rundirs import find_saes
    from saetune.sae import SAE
    return {h: SAE.load(p) for h, p in find_saes(run)[0].items()}


def html(body: str) -> None:
    """Render HTML built by saetune.analysis.html (every untrusted string in it is escaped)."""
    st.html(body)
