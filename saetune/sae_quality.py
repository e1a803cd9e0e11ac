"""SAE quality as SAEBench's core evaluation computes it, plus liveness and one quality table.

Source followed: SAEBench 0.5.0, ``sae_bench/evals/core/main.py`` at commit 10e0728 (functions
``get_recons_loss``, ``get_downstream_reconstruction_metrics``, ``get_sparsity_and_variance_metrics``,
``calculate_misc_metrics``), with ``multiple_evals``'s ``ignore_tokens = {pad, eos, bos}``. The code, not
the paper (Karvonen et al. 2025, arXiv 2503.09532), is the definition here: where a reading of the paper
could differ from what the code computes (the KL's direction, which mean the explained variance takes,
which positions count), we do what the code does and say so below.

Per token t of the evaluation text (positions whose input token is pad / eos / bos are left out, as
``multiple_evals`` does; the reconstruction is still spliced in at every position, as SAEBench's default
``exclude_special_tokens_from_reconstruction=False``):

- ``ce_loss_score = (CE_zero − CE_sae) / (CE_zero − CE_clean)`` — each CE the mean next-token
  cross-entropy over the kept positions (a position is kept when its *input* token is kept: SAEBench
  drops the last column of the token mask), with the hook's activation replaced by the SAE's
  reconstruction (``CE_sae``), by zeros at every position (``CE_zero``, zero ablation), or left alone.
  1 = the SAE loses nothing, 0 = as bad as zeros.
- ``kl_div_score = (KL_zero − KL_sae) / KL_zero`` with ``KL_x = mean_t KL(P_clean,t ‖ P_x,t)
  = mean_t Σ_v p_clean (log p_clean − log p_x)``: the clean distribution first, the direction
  ``get_recons_loss``'s ``kl()`` computes (the code, not the paper's prose, fixes it); every position, the
  last included. 1 = the SAE moves nothing, 0 = as far as zeros.
- ``explained_variance`` (SAEBench's code) = mean over tokens of ``1 − ‖x_t − x̂_t‖² / ‖x_t − x̄_B‖²``,
  x̄_B the mean of the kept tokens of the token's *batch* (so it depends on the batch size; SAEBench's is 16
  prompts). SAELens ≥ 6 calls this the "legacy" formula; its pooled R² is reported too as
  ``explained_variance_pooled = 1 − Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − x̄‖²`` (x̄ over all tokens).
- ``l0`` = mean over tokens of #{j : f_j ≠ 0}; ``l1`` = mean of Σ_j f_j.
- ``cossim`` = mean cosine of x and x̂ (a zero vector gives 0 here, where SAEBench's code gives NaN);
  ``l2_ratio`` = mean ‖x̂‖ / ‖x‖ (‖x‖ < 1e-4 counts as 1, as SAEBench).
- feature density d_j = #{kept tokens with f_j > 0} / #kept tokens; ``frac_alive`` = share of latents with
  d_j > 0 (fired at least once over the evaluation tokens); ``freq_over_1_percent`` / ``freq_over_10_percent``
  = share with d_j > 0.01 / 0.1; ``normalized_freq_over_*`` = their share of Σ d_j. Beside SAEBench's:
  mean and median of log10 d_j over the alive latents and the log10-density histogram (dead counted apart).

Beside them, the names ``train-sae`` has always reported, over the same kept positions: ``fvu`` (per batch
``Σ‖x − x̂‖² / Σ‖x − x̄_B‖²``, averaged over batches by tokens; saetune's training loss), ``mse`` (mean
``‖x − x̂‖²``), and aliases of SAEBench's: ``ce_clean`` = ``ce_loss_without_sae``, ``ce_spliced`` =
``ce_loss_with_sae``, ``ce_zero`` = ``ce_loss_with_ablation``, ``ce_loss_recovered`` = ``ce_loss_score``,
``kl_spliced`` = ``kl_div_with_sae``. One definition, two names: no near-duplicate numbers.

Everything here is a pure function of tensors (or the small accumulator :class:`CoreMetrics` over them);
``saetune.sae_eval`` runs the model and feeds it, for both ``saetune eval-sae`` and ``train-sae``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import ablation_score, ce_loss_recovered, ce_per_position, kl_from_logp, kl_per_position  # noqa: F401

SAEBENCH_SOURCE = "SAEBench 0.5.0, sae_bench/evals/core/main.py @ 10e0728"


# ---- per-position pieces ------------------------------------------------------------------------

def keep_mask(ids: Tensor, ignore_ids: Iterable[int] = ()) -> Tensor:
    """[B, T] bool: True where the token is not one of ``ignore_ids`` (SAEBench: pad, eos, bos)."""
    keep = torch.ones_like(ids, dtype=torch.bool)
    for i in set(int(i) for i in ignore_ids if i is not None):
        keep &= ids != i
    return keep


def explained_variance_per_token(x: Tensor, x_hat: Tensor) -> Tensor:
    """[N, d] → [N]: ``1 − ‖x_t − x̂_t‖² / ‖x_t − x̄‖²`` with x̄ the mean of these N tokens (SAEBench's code).

    The denominator is clamped at 1e-12 (a token exactly at the mean would give 0/0 in SAEBench)."""
    resid = (x - x_hat).pow(2).sum(-1)
    total = (x - x.mean(0)).pow(2).sum(-1)
    return 1 - resid / total.clamp_min(1e-12)


def ce_loss_score(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """SAEBench's ``(CE_zero − CE_sae) / (CE_zero − CE_clean)``: 1 = perfect SAE, 0 = as bad as zero ablation."""
    return ce_loss_recovered(ce_clean, ce_sae, ce_zero)


def kl_div_score(kl_sae: float, kl_zero: float) -> float:
    """SAEBench's ``(KL_zero − KL_sae) / KL_zero``: 1 = the SAE changes no prediction, 0 = as far as zeros."""
    return ablation_score(kl_zero, kl_sae, 0.0)


# ---- feature density ------------------------------------------------------------------------------

def feature_density(fire_counts: Tensor, n_tokens: int) -> Tensor:
    """[d_sae] float64: share of the ``n_tokens`` evaluation tokens on which each latent fired (f > 0)."""
    if n_tokens <= 0:
        return torch.zeros(fire_counts.shape, dtype=torch.float64)
    return fire_counts.double() / n_tokens


def density_stats(density: Tensor) -> dict[str, float]:
    """SAEBench's ``calculate_misc_metrics`` density numbers, plus log10-density mean/median over alive latents.

    ``frac_alive`` = mean(d > 0); ``freq_over_1_percent`` = mean(d > 0.01); ``normalized_freq_over_1_percent`` =
    Σ_{d > 0.01} d / Σ d (0 when nothing fires); the same at 10 %."""
    d = density.double().flatten()
    alive = d > 0
    total = float(d.sum())
    out = {
        "frac_alive": float(alive.double().mean()) if d.numel() else float("nan"),
        "n_alive": int(alive.sum()), "n_dead": int((~alive).sum()),
        "freq_over_1_percent": float((d > 0.01).double().mean()) if d.numel() else float("nan"),
        "freq_over_10_percent": float((d > 0.1).double().mean()) if d.numel() else float("nan"),
        "normalized_freq_over_1_percent": float(d[d > 0.01].sum()) / total if total > 0 else 0.0,
        "normalized_freq_over_10_percent": float(d[d > 0.1].sum()) / total if total > 0 else 0.0,
    }
    logs = d[alive].log10()
    out["log10_density_mean"] = float(logs.mean()) if logs.numel() else float("nan")
    # the lower middle value for an even count (torch.median's convention), so it is one latent's density
    out["log10_density_median"] = float(logs.median()) if logs.numel() else float("nan")
    return out


def density_histogram(density: Tensor, n_tokens: int, bins: int = 40) -> dict[str, Any]:
    """Histogram of log10 density over the alive latents; dead latents (d = 0) counted apart.

    Edges run from ``floor(log10(1 / n_tokens))`` (one firing in the whole evaluation) to 0 (every token), so
    every alive latent falls in a bin. Returns ``{"edges": [bins+1], "counts": [bins], "dead": int,
    "n_tokens": int}`` (plain lists: JSON-ready)."""
    if bins < 1:
        from .errors import SaetuneError
        raise SaetuneError(f"density histogram bins must be at least 1, got {bins}")
    lo = math.floor(math.log10(1.0 / n_tokens)) if n_tokens > 0 else -1.0
    edges = torch.linspace(lo, 0.0, bins + 1, dtype=torch.float64)
    d = density.double().flatten()
    logs = d[d > 0].log10().clamp(lo, 0.0)
    idx = torch.bucketize(logs, edges[1:-1], right=True)  # bin j holds edges[j] ≤ v < edges[j+1]; 0 in the last
    counts = torch.bincount(idx, minlength=bins)
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts],
            "dead": int((d <= 0).sum()), "n_tokens": int(n_tokens)}


# ---- the accumulator ------------------------------------------------------------------------------

@torch.no_grad()
def reference_terms(clean_logits: Tensor, zero_logits: Tensor, ids: Tensor) -> dict[str, Tensor]:
    """What every SAE on one hook compares against, per position: the clean run's log-probs (``logp_clean``),
    ``ce_clean``, ``ce_zero`` and ``kl_zero`` (KL(clean ‖ zero-ablated))."""
    logp_clean = clean_logits.float().log_softmax(-1)
    return {"logp_clean": logp_clean, "ce_clean": ce_per_position(clean_logits, ids),
            "ce_zero": ce_per_position(zero_logits, ids), "kl_zero": kl_from_logp(logp_clean, zero_logits)}


class CoreMetrics:
    """Sums over evaluation batches for one SAE; :meth:`result` gives the metrics above.

    Feed each batch once with :meth:`add_batch`. Token-level means weigh every kept token equally (SAEBench
    concatenates per-token values over batches, then takes the mean); ``fvu`` averages per-batch values
    weighted by the batch's kept tokens."""

    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.s: dict[str, float] = {}
        self.n: dict[str, float] = {}
        self.sum_x: Tensor | None = None  # float64 [d]: for the pooled explained variance
        self.batches = 0

    def _add(self, key: str, total: float, count: float) -> None:
        self.s[key] = self.s.get(key, 0.0) + float(total)
        self.n[key] = self.n.get(key, 0.0) + float(count)

    def mean(self, key: str) -> float:
        return self.s[key] / self.n[key] if self.n.get(key) else float("nan")

    @torch.no_grad()
    def add_batch(self, ids: Tensor, keep: Tensor, clean_logits: Tensor | None, sae_logits: Tensor | None,
                  zero_logits: Tensor | None, x: Tensor, acts: Tensor, x_hat: Tensor,
                  reference: dict[str, Tensor] | None = None) -> None:
        """One batch: ``ids``/``keep`` [B, T]; logits [B, T, V] (None: no downstream metrics); the hook's
        activations ``x`` [B, T, d] (or [B·T, d]), the SAE's latents ``acts`` [.., d_sae] and ``x_hat``.
        ``reference``: :func:`reference_terms` of this batch's clean and zero-ablated logits, when several SAEs
        share them (computed here otherwise)."""
        B, T = ids.shape
        keep = keep.to(ids.device)
        if clean_logits is not None:
            ref = reference if reference is not None else reference_terms(clean_logits, zero_logits, ids)
            ce_keep = keep[:, :-1]  # SAEBench: a CE position is kept when its input token is
            per_pos = {"ce_clean": ref["ce_clean"], "ce_sae": ce_per_position(sae_logits, ids), "ce_zero": ref["ce_zero"]}
            for name, ce in per_pos.items():
                self._add(name, ce[ce_keep].double().sum(), ce_keep.sum())
            for name, kl in (("kl_sae", kl_from_logp(ref["logp_clean"], sae_logits)), ("kl_zero", ref["kl_zero"])):
                self._add(name, kl[keep].double().sum(), keep.sum())
        k = keep.reshape(-1).to(x.device)
        n = int(k.sum())
        if n == 0:
            return
        self.batches += 1
        xk = x.reshape(B * T, -1)[k].double()
        xhk = x_hat.reshape(B * T, -1)[k].double()
        resid = (xk - xhk).pow(2).sum(-1)
        self._add("fvu", float(resid.sum() / (xk - xk.mean(0)).pow(2).sum().clamp_min(1e-12)) * n, n)
        self._add("mse", resid.sum(), n)
        self._add("explained_variance", explained_variance_per_token(xk, xhk).sum(), n)
        nx, nxh = xk.norm(dim=-1), xhk.norm(dim=-1)
        self._add("cossim", ((xk * xhk).sum(-1) / (nx * nxh).clamp_min(1e-12)).sum(), n)
        self._add("l2_ratio", (nxh / torch.where(nx.abs() < 1e-4, torch.ones_like(nx), nx)).sum(), n)
        self._add("pooled_sq", xk.pow(2).sum(), n)
        sx = xk.sum(0).cpu()
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        # the latents: [tokens, d_sae] can be large (16k tokens × 65k latents), so no masked copy of it
        a = acts.reshape(B * T, -1)
        for lo in range(0, a.shape[0], 4096):
            ac, kc = a[lo:lo + 4096], k[lo:lo + 4096]
            self._add("l0", (ac != 0).sum(-1)[kc].sum(), int(kc.sum()))
            self._add("l1", ac.sum(-1, dtype=torch.float64)[kc].sum(), int(kc.sum()))
            self.fires += ((ac > 0) & kc[:, None]).sum(0).cpu().long()

    @property
    def n_tokens(self) -> int:
        return int(self.n.get("l0", 0))

    def density(self) -> Tensor:
        return feature_density(self.fires, self.n_tokens)

    def result(self, bins: int = 40) -> dict[str, Any]:
        """Every metric as a plain float (rounded to 1e-6), the density histogram, and the token count."""
        r: dict[str, Any] = {}
        if "ce_clean" in self.s:
            ce = {k: self.mean(k) for k in ("ce_clean", "ce_sae", "ce_zero")}
            kl = {k: self.mean(k) for k in ("kl_sae", "kl_zero")}
            r.update({"ce_loss_score": ce_loss_score(ce["ce_clean"], ce["ce_sae"], ce["ce_zero"]),
                      "ce_loss_with_sae": ce["ce_sae"], "ce_loss_without_sae": ce["ce_clean"],
                      "ce_loss_with_ablation": ce["ce_zero"],
                      "kl_div_score": kl_div_score(kl["kl_sae"], kl["kl_zero"]),
                      "kl_div_with_sae": kl["kl_sae"], "kl_div_with_ablation": kl["kl_zero"]})
        n = self.n_tokens
        r.update({k: self.mean(k) for k in ("explained_variance", "l0", "l1", "cossim", "l2_ratio", "fvu", "mse")})
        total = self.s.get("pooled_sq", 0.0) - (float(self.sum_x.pow(2).sum()) / n if n else 0.0)
        r["explained_variance_pooled"] = (1 - self.s["mse"] / total) if n and total > 1e-12 else float("nan")
        r.update(density_stats(self.density()))
        r = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()}
        if "ce_loss_score" in r:  # train-sae's names for the same numbers
            r.update({"ce_clean": r["ce_loss_without_sae"], "ce_spliced": r["ce_loss_with_sae"],
                      "ce_zero": r["ce_loss_with_ablation"], "ce_loss_recovered": r["ce_loss_score"],
                      "kl_spliced": r["kl_div_with_sae"]})
        r["n_tokens"] = n
        r["density_histogram"] = density_histogram(self.density(), n, bins)
        return r


# ---- the quality table ----------------------------------------------------------------------------

#: (column, results key or keys tried in order, what it means) — the table's fixed columns, in order
COLUMNS: list[tuple[str, tuple[str, ...], str]] = [
    ("sae", ("label",), "the SAE (its dir, or dir/hook)"),
    ("hook", ("hook",), "hook point it was evaluated at"),
    ("d_sae", ("d_sae",), "latents"),
    ("k", ("k",), "active latents per token (topk / batchtopk)"),
    ("L0", ("l0",), "mean active latents per token"),
    ("EV", ("explained_variance",), "explained variance, SAEBench's per-token formula"),
    ("FVU", ("fvu",), "fraction of variance unexplained (saetune's training loss)"),
    ("ce_loss_score", ("ce_loss_score",), "(CE_zero − CE_sae)/(CE_zero − CE_clean); 1 = lossless"),
    ("kl_div_score", ("kl_div_score",), "(KL_zero − KL_sae)/KL_zero; 1 = lossless"),
    ("alive", ("frac_alive",), "share of latents firing at least once over the evaluation tokens"),
]
#: columns shown only when some row has them (probe accuracies are added per k: see :func:`quality_table`)
OPTIONAL_COLUMNS: list[tuple[str, tuple[str, ...], str]] = [
    ("alive (train)", ("frac_alive_train",), "share firing at least once over the training tokens (saved weights)"),
    ("probe raw", ("probe_raw_acc",), "sparse-probing baseline: a probe on all raw activation dims (saetune.probing)"),
    ("MCC", ("gt_mcc",), "mean correlation coefficient with the true features (saetune.ground_truth)"),
    ("F1", ("gt_f1_mean",), "mean per-latent F1 as a detector of its best-matching true feature "
                            "(saetune.ground_truth)"),
]
TAIL_COLUMNS: list[tuple[str, tuple[str, ...], str]] = [
    ("tokens", ("n_tokens",), "evaluation tokens the metrics are over (special tokens left out)"),
    ("note", ("note",), "caveats (e.g. a training-time dead window that could not trigger)"),
]


def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if row.get(k) is not None:
            return row[k]
    return None


def _probe_ks(rows: Sequence[dict[str, Any]]) -> list[int]:
    """The k of the sparse-probing accuracies the rows hold (``probe_acc_k{k}``): the smallest and the largest."""
    import re
    ks = sorted({int(m.group(1)) for r in rows for key in r if (m := re.fullmatch(r"probe_acc_k(\d+)", key))
                 and r[key] is not None})
    return sorted({ks[0], ks[-1]}) if ks else []


def _columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, tuple[str, ...], str]]:
    probes = [(f"probe acc k={k}", (f"probe_acc_k{k}",), f"sparse-probing accuracy on the top {k} SAE latent(s) "
               "per concept, mean over the toy's concepts (saetune.probing)") for k in _probe_ks(rows)]
    optional = [c for c in OPTIONAL_COLUMNS if any(_pick(r, c[1]) is not None for r in rows)]
    alive = [c for c in optional if c[0] == "alive (train)"]
    return COLUMNS + alive + probes + [c for c in optional if c not in alive] + TAIL_COLUMNS


def quality_table(rows: Sequence[dict[str, Any]]) -> "pandas.DataFrame":  # noqa: F821
    """One row per SAE: L0, EV, FVU, ce_loss_score, kl_div_score, alive, then — when any row has them — liveness
    over the training tokens, sparse-probing accuracy (smallest and largest k, and the raw-activation baseline),
    MCC and F1 against a ground truth, then tokens and notes. ``rows`` are results dicts (each with a ``label``),
    as ``eval-sae`` and ``train-sae`` write them."""
    import pandas as pd
    cols = _columns(rows)
    data = [{name: _pick(r, keys) for name, keys, _ in cols} for r in rows]
    df = pd.DataFrame(data, columns=[c[0] for c in cols])
    if not df.empty and df["note"].isna().all():
        df = df.drop(columns=["note"])
    df.attrs["meanings"] = {name: text for name, _, text in cols}
    return df


def column_meanings(df) -> dict[str, str]:
    """What each column of ``df`` (a :func:`quality_table`) means."""
    meaning = {name: text for name, _, text in COLUMNS + OPTIONAL_COLUMNS + TAIL_COLUMNS}
    meaning.update(df.attrs.get("meanings", {}))
    return {c: meaning.get(c, "") for c in df.columns}


def _cell(v: Any, col: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int) or (isinstance(v, float) and col in ("d_sae", "k", "tokens") and float(v).is_integer()):
        return f"{int(v):,}" if col == "tokens" else str(int(v))
    if isinstance(v, float):
        return f"{v:.2f}" if col == "L0" else f"{v:.4f}"
    return str(v)


def _cells(df) -> tuple[list[str], list[list[str]]]:
    head = [str(c) for c in df.columns]
    body = [[_cell(None if (not isinstance(v, str) and v is not None and _isna(v)) else v, c)
             for c, v in zip(df.columns, row)] for row in df.itertuples(index=False)]
    return head, body


def _isna(v: Any) -> bool:
    try:
        return bool(v != v)
    except Exception:
        return False


def format_quality_table(df) -> str:
    """The table as aligned plain text (what ``saetune eval-sae`` prints): names left, numbers right."""
    head, body = _cells(df)
    w = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(head)]
    text_cols = {i for i, h in enumerate(head) if h in ("sae", "hook", "note")}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w[i]) if i in text_cols else c.rjust(w[i]) for i, c in enumerate(cells)).rstrip()

    rows = [line(head), *(line(r) for r in body)]
    rule = "-" * max(len(r) for r in rows)
    return "\n".join([rule, rows[0], rule, *rows[1:], rule])


def quality_markdown(df, meanings: bool = True) -> str:
    """The table as GitHub markdown (``quality.md``), with what each column means under it."""
    head, body = _cells(df)

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    out = ["| " + " | ".join(map(esc, head)) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in body]
    if meanings:
        out += ["", *(f"- **{c}**: {m}" for c, m in column_meanings(df).items() if m)]
    return "\n".join(out) + "\n"
