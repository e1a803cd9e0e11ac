"""Token-highlight HTML: pure functions from tokens and numbers to a safe HTML string.

Model outputs and dataset text are untrusted. Every string that reaches the HTML — token text,
tooltips, labels, phrases — goes through :func:`esc` (``html.escape`` with quotes), so a trace
holding ``<script>`` or ``<img onerror=…>`` renders as text. Colours and widths are numbers this
module formats itself; nothing else is interpolated.
"""

from __future__ import annotations

import html
import math
from typing import Iterable, Mapping, Sequence

#: base colours (r, g, b) of the highlight scales
COLORS = {"activation": (255, 140, 0), "entropy": (220, 40, 60), "positive": (30, 120, 230), "rpr": (20, 160, 80)}

_STYLE = (
    "<style>.sx-tokens{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:0.92em;"
    "line-height:1.9;white-space:pre-wrap;word-break:break-word}"
    ".sx-tok{border-radius:3px;padding:1px 0}"
    ".sx-peak{font-weight:700;outline:1px solid #555}"
    ".sx-cand{border-bottom:2px dotted #7a2be2}"
    ".sx-crit{outline:2px solid #7a2be2;font-weight:700}"
    ".sx-rpr{text-decoration:underline;text-decoration-color:#14a050;text-decoration-thickness:3px}"
    ".sx-excl{color:#888}"
    "mark.sx-mark{background:rgba(20,160,80,0.25);border-radius:3px}</style>"
)


def esc(s: object) -> str:
    """HTML-escape any value's text (quotes too, so it is safe inside attributes)."""
    return html.escape(str(s), quote=True)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def color_for(value: float, vmax: float, kind: str = "activation") -> str:
    """``rgba(...)`` with alpha ∝ value / vmax in [0, 0.85]; non-finite or ≤ 0 values → transparent."""
    r, g, b = COLORS.get(kind, COLORS["activation"])
    if not (isinstance(value, (int, float)) and math.isfinite(value)) or value <= 0 or vmax <= 0:
        return "transparent"
    a = min(value / vmax, 1.0) * 0.85
    return f"rgba({r},{g},{b},{a:.3f})"


def visible(token: str) -> str:
    """Token text with a newline shown as ↵ (and kept as a line break)."""
    return token.replace("\r", "").replace("\n", "↵\n")


def token_highlight_html(tokens: Sequence[str], values: Sequence[float] | None = None, *, vmax: float | None = None,
                         kind: str = "activation", value_name: str = "act", peak: int | None = None,
                         candidates: Iterable[int] = (), critical: int | None = None,
                         rpr: Mapping[int, Sequence[str]] | None = None, excluded: Iterable[int] = (),
                         extra_titles: Mapping[int, str] | None = None, style: bool = True) -> str:
    """Tokens as spans coloured by ``values``; markers for the peak, CURE candidates and the chosen
    critical token, RPR phrases (token index → phrases) and excluded tokens. All text escaped."""
    n = len(tokens)
    vals = [float(v) for v in values] if values is not None else [0.0] * n
    if len(vals) != n:
        raise ValueError(f"{n} tokens but {len(vals)} values")
    finite = [v for v in vals if math.isfinite(v)]
    top = vmax if vmax is not None else (max(finite) if finite else 0.0)
    cands, excl = set(candidates), set(excluded)
    rpr = rpr or {}
    extra_titles = extra_titles or {}
    out = [_STYLE] if style else []
    out.append('<div class="sx-tokens">')
    for i, (tok, v) in enumerate(zip(tokens, vals)):
        cls = ["sx-tok"]
        title = [f"#{i} {tok!r}", f"{value_name} {_fmt(v)}"]
        if i == peak:
            cls.append("sx-peak")
        if i in cands:
            cls.append("sx-cand")
            title.append("CURE candidate")
        if i == critical:
            cls.append("sx-crit")
            title.append("CURE critical token (branch point)")
        if i in rpr:
            cls.append("sx-rpr")
            title.append("RPR: " + ", ".join(repr(p) for p in rpr[i]))
        if i in excl:
            cls.append("sx-excl")
            title.append("excluded from statistics")
        if i in extra_titles:
            title.append(extra_titles[i])
        out.append(f'<span class="{" ".join(cls)}" style="background:{color_for(v, top, kind)}" '
                   f'title="{esc(" | ".join(title))}">{esc(visible(tok))}</span>')
    out.append("</div>")
    return "".join(out)


def span_highlight_html(text: str, spans: Mapping[str, Sequence[tuple[int, int]]], style: bool = True) -> str:
    """``text`` with character ``spans`` (label → [(start, end)]) marked; overlaps merge, labels join."""
    n = len(text)
    cover: list[list[str]] = [[] for _ in range(n)]
    for label, ss in spans.items():
        for s, e in ss:
            for j in range(max(0, int(s)), min(n, int(e))):
                cover[j].append(label)
    out = [_STYLE] if style else []
    out.append('<div class="sx-tokens">')
    i = 0
    while i < n:
        j = i
        while j < n and bool(cover[j]) == bool(cover[i]) and (not cover[i] or cover[j] == cover[i]):
            j += 1
        seg = esc(text[i:j])
        if cover[i]:
            labels = ", ".join(dict.fromkeys(cover[i]))
            out.append(f'<mark class="sx-mark" title="{esc("RPR: " + labels)}">{seg}</mark>')
        else:
            out.append(seg)
        i = j
    out.append("</div>")
    return "".join(out)


def legend_html(items: Sequence[tuple[str, str]]) -> str:
    """A one-line legend: (css class of the marker, label)."""
    parts = [f'<span class="{esc(c)}" style="padding:0 4px">{esc(label)}</span>' for c, label in items]
    return _STYLE + '<div style="font-size:0.85em">' + " · ".join(parts) + "</div>"
