"""Reasoning traces (``traces/*.jsonl``, DESIGN.md): tables, entropy views, CURE and RPR markers.

One record per sampled response: ``prompt``, ``response``, ``tokens`` (strings), ``token_ids``,
``logprobs``, ``entropies``, ``critical_candidates``, ``critical_position``, ``rpr_hits``
(phrase → character spans of ``response``), ``reward`` and its parts, ``correct``. Every field
but ``response`` is optional here: a view that needs a missing one says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .html import esc, token_highlight_html


class TraceFile:
    """A traces JSONL read lazily: a byte-offset index on open, one record parsed per access."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offsets: list[tuple[int, int]] = []
        pos = 0
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip() and line.rstrip().endswith(b"}"):  # a line cut by a kill is skipped
                    self._offsets.append((pos, len(line)))
                pos += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        a, n = self._offsets[i]
        with open(self.path, "rb") as f:
            f.seek(a)
            try:
                rec = json.loads(f.read(n))
            except ValueError:
                return {"response": "", "_error": f"line {i + 1} of {self.path.name} is not valid JSON"}
        return rec if isinstance(rec, dict) else {"response": "", "_error": f"line {i + 1} is not an object"}

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def trace_files(run: str | Path) -> list[Path]:
    """``traces/*.jsonl`` of a run dir (sorted), or []."""
    d = Path(run) / "traces"
    return sorted(d.glob("*.jsonl")) if d.is_dir() else []


def reward_parts(rec: dict[str, Any]) -> dict[str, float]:
    """The reward and its parts as a flat dict (``reward_parts`` / ``rewards`` dicts, or a dict ``reward``)."""
    out: dict[str, float] = {}
    r = rec.get("reward")
    if isinstance(r, dict):
        out.update({str(k): v for k, v in r.items() if isinstance(v, (int, float))})
    elif isinstance(r, (int, float)):
        out["reward"] = float(r)
    for key in ("reward_parts", "rewards", "parts"):
        parts = rec.get(key)
        if isinstance(parts, dict):
            out.update({str(k): v for k, v in parts.items() if isinstance(v, (int, float))})
    return out


def traces_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per trace: index, reward, correct, tokens, mean/max entropy, critical position, RPR hits."""
    rows = []
    for i, r in enumerate(records):
        ent = [e for e in (r.get("entropies") or []) if isinstance(e, (int, float))]
        parts = reward_parts(r)
        rows.append({
            "trace": i, "reward": parts.get("reward", next(iter(parts.values()), None)),
            "correct": r.get("correct"),
            "n_tokens": len(r.get("tokens") or r.get("token_ids") or []) or None,
            "mean_entropy": float(np.mean(ent)) if ent else None,
            "max_entropy": float(np.max(ent)) if ent else None,
            "critical_position": r.get("critical_position"),
            "rpr_phrases": len(r.get("rpr_hits") or {}),
            "step": r.get("step"), "group": r.get("group"), "branch": r.get("is_branch"),
            "advantage": r.get("advantage"),
            "prompt": str(r.get("prompt", ""))[:80],
        })
    return pd.DataFrame(rows, columns=["trace", "reward", "correct", "n_tokens", "mean_entropy", "max_entropy",
                                       "critical_position", "rpr_phrases", "step", "group", "branch", "advantage",
                                       "prompt"])


def token_offsets(tokens: Sequence[str], text: str) -> list[tuple[int, int]]:
    """Character span of each token in ``text``: exact when the tokens concatenate to it, else
    found left to right (a token not found gets an empty span at the cursor)."""
    if "".join(tokens) == text:
        out, pos = [], 0
        for t in tokens:
            out.append((pos, pos + len(t)))
            pos += len(t)
        return out
    out, pos = [], 0
    for t in tokens:
        s = t.strip()
        j = text.find(s, pos) if s else -1
        if j < 0:
            out.append((pos, pos))
        else:
            out.append((j, j + len(s)))
            pos = j + len(s)
    return out


def rpr_token_hits(tokens: Sequence[str], text: str, hits: dict[str, Sequence[Sequence[int]]]) -> dict[int, list[str]]:
    """Map RPR hits (phrase → character spans of ``text``) onto token indices."""
    offs = token_offsets(tokens, text)
    out: dict[int, list[str]] = {}
    for phrase, spans in (hits or {}).items():
        for s, e in spans:
            for i, (a, b) in enumerate(offs):
                if b > a and a < e and b > s:
                    out.setdefault(i, []).append(phrase)
    return out


def trace_tokens(rec: dict[str, Any]) -> list[str]:
    """The trace's response tokens for display (whitespace split of the response when it lacks
    ``tokens``). Tokens decoded one by one lose the spaces between them (word-level and
    SentencePiece tokenizers); the whitespace the response has between two tokens is put back."""
    toks = rec.get("tokens")
    if isinstance(toks, list) and toks:
        toks = [str(t) for t in toks]
        resp = str(rec.get("response", ""))
        if not resp or "".join(toks) == resp:
            return toks
        out, cursor = [], 0
        for t, (a, b) in zip(toks, token_offsets(toks, resp)):
            gap = resp[cursor:a]
            out.append(gap + t if b > a and gap.isspace() and not t.startswith(gap) else t)
            cursor = max(cursor, b)
        return out
    resp = str(rec.get("response", ""))
    words = resp.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)] if resp else []


def trace_html(rec: dict[str, Any], color_by: str = "entropy", feature_acts: Sequence[float] | None = None,
               feature_name: str = "feature", show_rpr: bool = True, show_critical: bool = True) -> str:
    """One response as highlighted tokens: colour by entropy (or an SAE feature's activations),
    CURE candidates dotted, the chosen critical token boxed, RPR phrases underlined."""
    toks = trace_tokens(rec)
    if color_by == "feature" and feature_acts is not None:
        values, kind, name = list(feature_acts), "activation", feature_name
    elif color_by == "logprob" and rec.get("logprobs"):
        values, kind, name = [-float(x) for x in rec["logprobs"]], "entropy", "−logprob"
    else:
        values, kind, name = rec.get("entropies"), "entropy", "entropy"
    if values is not None and len(values) != len(toks):
        values = (list(values) + [0.0] * len(toks))[:len(toks)]
    hits = rpr_token_hits(toks, str(rec.get("response", "")), rec.get("rpr_hits") or {}) if show_rpr else {}
    crit = rec.get("critical_position") if show_critical else None
    cands = (rec.get("critical_candidates") or []) if show_critical else []
    return token_highlight_html(toks, values, kind=kind, value_name=name, candidates=cands,
                                critical=crit if isinstance(crit, int) and cands else None, rpr=hits)


def critical_markers(rec: dict[str, Any]) -> pd.DataFrame:
    """CURE candidates of a trace in descending entropy: rank, position, token, entropy, chosen."""
    toks = trace_tokens(rec)
    ent = rec.get("entropies") or []
    rows = []
    for rank, p in enumerate(rec.get("critical_candidates") or []):
        rows.append({"rank": rank, "position": p, "token": toks[p] if 0 <= p < len(toks) else None,
                     "entropy": ent[p] if 0 <= p < len(ent) else None,
                     "chosen": p == rec.get("critical_position")})
    return pd.DataFrame(rows, columns=["rank", "position", "token", "entropy", "chosen"])


def rpr_table(rec: dict[str, Any]) -> pd.DataFrame:
    """RPR phrases of a trace: phrase, occurrences, first span."""
    rows = [{"phrase": p, "count": len(s), "first_span": tuple(s[0]) if s else None}
            for p, s in (rec.get("rpr_hits") or {}).items()]
    return pd.DataFrame(rows, columns=["phrase", "count", "first_span"]).sort_values(
        "count", ascending=False, ignore_index=True)


def entropy_heatmap(rec: dict[str, Any], width: int = 32):
    """Per-token entropy of one trace as a heatmap (rows of ``width`` tokens), CURE positions marked.

    The colour bar sits right of the plot within the rows' height and the legend above the plot:
    plotly puts a horizontal legend at y = −0.1 by default, over the x tick labels. Rows and
    columns get integer ticks (autoticks on a 1-row axis are −0.5, 0, 0.5)."""
    import plotly.graph_objects as go

    toks = trace_tokens(rec)
    ent = [float(e) if isinstance(e, (int, float)) else math.nan for e in (rec.get("entropies") or [])]
    n = len(ent)
    rows = max(1, math.ceil(n / width))
    z = np.full((rows, width), np.nan)
    text = np.full((rows, width), "", dtype=object)
    for i, e in enumerate(ent):
        z[i // width, i % width] = e
        text[i // width, i % width] = esc(f"#{i} {toks[i] if i < len(toks) else ''!r}")
    fig = go.Figure(go.Heatmap(z=z, text=text, hovertemplate="%{text}<br>entropy %{z:.3f}<extra></extra>",
                               colorscale="Reds",
                               colorbar={"title": {"text": "nats", "side": "right"}, "x": 1.02, "xanchor": "left",
                                         "y": 0.5, "yanchor": "middle", "len": 1.0, "lenmode": "fraction",
                                         "thickness": 14}))
    cands = [p for p in (rec.get("critical_candidates") or []) if 0 <= p < n]
    if cands:
        fig.add_trace(go.Scatter(x=[p % width for p in cands], y=[p // width for p in cands], mode="markers",
                                 marker={"symbol": "circle-open", "size": 10, "color": "#7a2be2"},
                                 name="CURE candidates", hoverinfo="skip"))
    crit = rec.get("critical_position")
    if isinstance(crit, int) and cands and 0 <= crit < n:
        fig.add_trace(go.Scatter(x=[crit % width], y=[crit // width], mode="markers",
                                 marker={"symbol": "x", "size": 13, "color": "black"}, name="critical token",
                                 hoverinfo="skip"))
    fig.update_yaxes(autorange="reversed", title="row", tickmode="linear", tick0=0,
                     dtick=max(1, math.ceil(rows / 10)))
    fig.update_xaxes(title=f"token (rows of {width})", tickmode="linear", tick0=0, dtick=max(1, math.ceil(width / 8)))
    fig.update_layout(height=max(220, 60 + 22 * rows), margin={"l": 40, "r": 10, "t": 50, "b": 40},
                      title="token entropy",
                      legend={"orientation": "h", "x": 1.0, "xanchor": "right", "y": 1.02, "yanchor": "bottom"})
    return fig


def entropy_line(rec: dict[str, Any]):
    """Entropy along the response with CURE candidates and the critical token marked."""
    import plotly.graph_objects as go

    ent = list(rec.get("entropies") or [])
    toks = trace_tokens(rec)
    fig = go.Figure(go.Scatter(y=ent, mode="lines", name="entropy",
                               hovertext=[esc(repr(t)) for t in toks[:len(ent)]]))
    cands = [p for p in (rec.get("critical_candidates") or []) if 0 <= p < len(ent)]
    if cands:
        fig.add_trace(go.Scatter(x=cands, y=[ent[p] for p in cands], mode="markers", name="CURE candidates"))
    crit = rec.get("critical_position")
    if isinstance(crit, int) and cands and 0 <= crit < len(ent):
        fig.add_vline(x=crit, line_dash="dash", annotation_text="critical")
    fig.update_layout(height=260, margin={"l": 40, "r": 10, "t": 30, "b": 40}, xaxis_title="response token",
                      yaxis_title="entropy (nats)")
    return fig
