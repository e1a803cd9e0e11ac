"""Sparse probing on the toy model organism: which SAE latents carry a concept the task defines?

No LLM judge: the toy task (:mod:`saetune.toy.task`) writes every fact about a trace into its text,
so each concept has exact labels. A trace reads::

    User : compute ( 3 + 4 ) * 2 . Assistant : <think> 3 + 4 = 7 . wait , let me check : 3 + 4 = 7 .
    7 * 2 = 14 . therefore the answer is 14 . </think> <answer> 14 </answer>

Every concept is labelled at the ``=`` token of every step in ``<think>``: there the model must
emit the step's result next, so the step's operation, whether it is a re-check, which step it is,
and the sign and parity of the result it is about to write are all decided at that position.
Concepts (binary; 1 = the named property holds for the step):

- ``op_add``, ``op_sub``, ``op_mul``: the step's operation is ``+``, ``-`` or ``*`` (one vs. rest);
- ``is_check``: the step restates an earlier one after ``wait , let me check :``;
- ``second_step``: it is the task's second operation (a re-check counts as the step it restates);
- ``result_negative``: the step's result is below 0;
- ``result_even``: the step's result is even.

Method (SAEBench's sparse probing, Karvonen et al. 2025, "SAEBench: a comprehensive benchmark for
sparse autoencoders"; ``get_top_k_mean_diff_mask`` and ``train_sklearn_probe`` in
``sae_bench/evals/sparse_probing/probe_training.py``):

1. Problems are split into train and test (a problem's positions all go to one side). In each
   split the larger class is down-sampled to the size of the smaller, so chance is 0.5.
2. Selection by mean difference: on the train split, rank latents by
   ``|mean(f_j | y = 1) − mean(f_j | y = 0)|`` (descending; ties to the lower index) and keep the
   top k.
3. A logistic-regression probe on those k latents, L2-regularised like sklearn's default
   ``LogisticRegression`` that SAEBench uses: minimise ``C · Σ_n logloss(w·x_n + b, y_n) + ½‖w‖²``
   with C = 1 and the intercept not penalised (here with torch's L-BFGS in float64; sklearn is not
   a dependency). ``sae_acc`` is its accuracy on the test split.
4. Baselines on the model's raw activations at the same positions: ``raw_acc``, the same probe on
   all d dimensions, and ``raw_topk_acc``, k dimensions chosen by the same rule (SAEBench's
   ``llm_top_k``).

:func:`sparse_probe_scores` returns one row per concept × k; :func:`probe_summary` reduces it to
the scalars of a quality table; :func:`concept_latents` lists which latents carry which concept.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SaetuneError
from .toy import task

CONCEPTS = ("op_add", "op_sub", "op_mul", "is_check", "second_step", "result_negative", "result_even")
_CHECK_WORDS = tuple(task.CHECK_PHRASE.split())
MIN_TRAIN_PER_CLASS = 4
MIN_TEST_PER_CLASS = 2


# ---- labels (pure) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepPosition:
    """One ``=`` of a trace: where it is, what the step computes, and the concept labels there."""

    char: int  # character offset of the '=' in the text
    word: int  # index of the '=' in text.split()
    step: int  # 1-based operation index (a re-check has the index of the step it restates)
    op: str
    is_check: bool
    result: int

    @property
    def labels(self) -> dict[str, int]:
        return {"op_add": int(self.op == "+"), "op_sub": int(self.op == "-"), "op_mul": int(self.op == "*"),
                "is_check": int(self.is_check), "second_step": int(self.step == 2),
                "result_negative": int(self.result < 0), "result_even": int(self.result % 2 == 0)}


def toy_step_positions(text: str) -> list[StepPosition]:
    """Every ``x op y = r`` step inside ``<think> … </think>`` of a toy text, in order.

    Raises :class:`SaetuneError` naming the word when a step does not read ``x op y = r``.
    """
    matches = list(re.finditer(r"\S+", text))
    words = [m.group() for m in matches]
    if task.THINK_OPEN not in words:
        raise SaetuneError(f"no {task.THINK_OPEN} in the text, so it holds no reasoning steps: {text[:80]!r}")
    start = words.index(task.THINK_OPEN) + 1
    end = words.index(task.THINK_CLOSE, start) if task.THINK_CLOSE in words[start:] else len(words)
    out, step = [], 0
    for i in range(start, end):
        if words[i] != "=":
            continue
        try:
            x, op, y, r = words[i - 3], words[i - 2], words[i - 1], words[i + 1]
            int(x), int(y)
            result = int(r)
        except (IndexError, ValueError):
            raise SaetuneError(f"word {i} of the text is '=' but the step around it does not read 'x op y = r': "
                               f"{' '.join(words[max(i - 3, 0):i + 2])!r}") from None
        if op not in task.OPS or i - 3 < start:
            raise SaetuneError(f"word {i} of the text is '=' but {op!r} before it is not an op "
                               f"({', '.join(task.OPS)}) inside the think")
        is_check = tuple(words[i - 3 - len(_CHECK_WORDS):i - 3]) == _CHECK_WORDS
        if not is_check:
            step += 1
        out.append(StepPosition(char=matches[i].start(), word=i, step=max(step, 1), op=op, is_check=is_check,
                                result=result))
    return out


def char_to_token(offsets: Sequence[tuple[int, int]], chars: Sequence[int]) -> list[int]:
    """For each character offset, the index of the token whose span ``[start, end)`` holds it."""
    out = []
    for c in chars:
        hit = [i for i, (s, e) in enumerate(offsets) if s <= c < e]
        if not hit:
            raise SaetuneError(f"no token covers character {c}; the tokenizer's offsets do not reach it")
        out.append(hit[0])
    return out


# ---- selection and probes (pure) ------------------------------------------------------------------

def mean_diff(x: Tensor, y: Tensor) -> Tensor:
    """``mean(x | y = 1) − mean(x | y = 0)`` per column of ``x`` [n, d] → [d] (signed)."""
    y = y.bool()
    if not y.any() or y.all():
        raise SaetuneError("mean-difference selection needs examples of both classes")
    return x[y].double().mean(0) - x[~y].double().mean(0)


def select_by_mean_diff(x: Tensor, y: Tensor, k: int) -> tuple[list[int], list[float]]:
    """SAEBench's rule: the k columns with the largest ``|mean difference|`` (descending, ties → lower index).

    Returns the column indices and their signed mean differences, in rank order.
    """
    if not 1 <= k <= x.shape[1]:
        raise SaetuneError(f"k must lie in 1…{x.shape[1]} (the number of columns), got {k}")
    diff = mean_diff(x, y)
    order = torch.sort(-diff.abs(), stable=True).indices[:k]
    return order.tolist(), diff[order].tolist()


def fit_logistic(x: Tensor, y: Tensor, C: float = 1.0, max_iter: int = 100) -> tuple[Tensor, float]:
    """L2 logistic regression: argmin over (w, b) of ``C·Σ logloss(x·w + b, y) + ½‖w‖²`` → (w [d], b).

    sklearn's ``LogisticRegression(penalty="l2", C=C)`` objective (intercept unpenalised), solved by
    Newton's method with a backtracking (Armijo) line search in float64: gradient
    ``g = C·Xᵀ(σ(z) − y) + R·p``, Hessian ``C·Xᵀ diag(σ(1−σ)) X + R`` (R = diag(1, …, 1, 0)), stopping
    when ``max|g| ≤ 1e-9·C·n``. The objective is strictly convex in w, so the minimiser is unique;
    probes here have at most a few hundred inputs, so the (d+1)² Hessian is cheap. Deterministic.
    """
    if C <= 0:
        raise SaetuneError(f"C must be positive, got {C}")
    n, d = x.shape
    X = torch.cat([x.detach().double().cpu(), torch.ones(n, 1, dtype=torch.float64)], 1)  # (n, d+1)
    Y = y.detach().double().cpu()  # (n,)
    reg = torch.ones(d + 1, dtype=torch.float64)
    reg[d] = 0.0  # the intercept is not penalised

    def objective(p: Tensor) -> float:
        z = X @ p
        return float(C * (F.softplus(z) - Y * z).sum() + 0.5 * (reg * p * p).sum())

    p = torch.zeros(d + 1, dtype=torch.float64)
    f = objective(p)
    eye = torch.eye(d + 1, dtype=torch.float64)
    for _ in range(max_iter):
        s = torch.sigmoid(X @ p)  # (n,)
        g = C * (X.T @ (s - Y)) + reg * p  # (d+1,)
        if float(g.abs().max()) <= 1e-9 * C * n:
            break
        H = C * (X.T * (s * (1 - s))) @ X + torch.diag(reg) + 1e-12 * eye  # (d+1, d+1)
        step = torch.linalg.solve(H, g)
        t, slope = 1.0, float(g @ step)
        while True:
            p_new = p - t * step
            f_new = objective(p_new)
            if f_new <= f - 1e-4 * t * slope or t < 1e-12:
                break
            t *= 0.5
        p, f = p_new, f_new
    return p[:d].clone(), float(p[d])


def probe_accuracy(x: Tensor, y: Tensor, w: Tensor, b: float) -> float:
    """Share of rows where ``x·w + b > 0`` agrees with ``y``."""
    pred = (x.double() @ w + b) > 0
    return float((pred == y.bool()).double().mean())


def balanced_indices(y: Tensor, gen: torch.Generator) -> Tensor:
    """Indices with every example of the smaller class and as many drawn (without replacement) of the larger."""
    pos, neg = torch.nonzero(y.bool()).flatten(), torch.nonzero(~y.bool()).flatten()
    m = min(len(pos), len(neg))
    pos = pos[torch.randperm(len(pos), generator=gen)[:m]]
    neg = neg[torch.randperm(len(neg), generator=gen)[:m]]
    return torch.cat([pos, neg]).sort().values


def probe_concept(sae_train: Tensor, sae_test: Tensor, raw_train: Tensor, raw_test: Tensor,
                  y_train: Tensor, y_test: Tensor, ks: Sequence[int], C: float = 1.0) -> list[dict[str, Any]]:
    """One concept on balanced splits: for each k, the selected latents and the three accuracies."""
    w, b = fit_logistic(raw_train, y_train, C)
    raw_acc = probe_accuracy(raw_test, y_test, w, b)
    rows = []
    for k in ks:
        latents, diffs = select_by_mean_diff(sae_train, y_train, k)
        w, b = fit_logistic(sae_train[:, latents], y_train, C)
        sae_acc = probe_accuracy(sae_test[:, latents], y_test, w, b)
        dims, _ = select_by_mean_diff(raw_train, y_train, min(k, raw_train.shape[1]))
        w, b = fit_logistic(raw_train[:, dims], y_train, C)
        raw_topk_acc = probe_accuracy(raw_test[:, dims], y_test, w, b)
        rows.append({"k": k, "latents": latents, "mean_diffs": diffs, "sae_acc": sae_acc, "raw_acc": raw_acc,
                     "raw_topk_acc": raw_topk_acc, "n_train": len(y_train), "n_test": len(y_test)})
    return rows


# ---- the shell ------------------------------------------------------------------------------------

@dataclass
class ProbeData:
    """Model activations at every labelled position of the probing problems."""

    acts: Tensor  # [N, d] at the hook, one row per '=' position
    problem: Tensor  # [N] index of the problem each row comes from
    labels: dict[str, Tensor]  # concept → [N] in {0, 1}
    n_problems: int


def probe_texts(n_problems: int, seed: int, check_prob: float = 0.3) -> list[str]:
    """Toy texts for probing, from a random stream of their own (not the toy's training or eval streams)."""
    rng = random.Random(f"saetune-probe:{seed}")
    return [task.example(rng, check_prob)["text"] for _ in range(n_problems)]


@torch.no_grad()
def collect_probe_data(model, tokenizer, hook: str, texts: Sequence[str], batch_size: int = 64) -> ProbeData:
    """Run ``model`` over ``texts`` and keep the activation at ``hook`` at every step's ``=``."""
    from .generation import pad_token_id
    from .models import resolve_hook, run_to_hooks

    if not getattr(tokenizer, "is_fast", False):
        raise SaetuneError("sparse probing needs a fast tokenizer (it maps the labelled characters to tokens "
                           "through offset mappings)")
    hp = resolve_hook(model, hook)
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer, model)  # padded positions are masked: any real id will do
    was_training = model.training
    model.eval()
    acts, problems, labels = [], [], {c: [] for c in CONCEPTS}
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        enc = [tokenizer(t, return_offsets_mapping=True) for t in chunk]
        width = max(len(e["input_ids"]) for e in enc)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, cols = [], []
        for b, (text, e) in enumerate(zip(chunk, enc)):
            ids[b, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[b, :len(e["input_ids"])] = 1
            steps = toy_step_positions(text)
            toks = char_to_token(e["offset_mapping"], [s.char for s in steps])
            rows += [b] * len(steps)
            cols += toks
            problems += [start + b] * len(steps)
            for s in steps:
                for c, v in s.labels.items():
                    labels[c].append(v)
        h = run_to_hooks(model, ids.to(device), [hp], attention_mask=mask.to(device))[hp.name]  # (B, T, d)
        acts.append(h[torch.tensor(rows), torch.tensor(cols)].float().cpu())
    if was_training:
        model.train()
    return ProbeData(torch.cat(acts), torch.tensor(problems), {c: torch.tensor(v) for c, v in labels.items()},
                     len(texts))


def split_problems(n_problems: int, test_frac: float, seed: int) -> Tensor:
    """Boolean [n_problems]: True for the problems of the test split (a seeded draw of round(n·test_frac))."""
    if not 0 < test_frac < 1:
        raise SaetuneError(f"test_frac must lie strictly between 0 and 1, got {test_frac}")
    n_test = max(1, round(n_problems * test_frac))
    if n_test >= n_problems:
        raise SaetuneError(f"n_problems={n_problems} leaves no training problems at test_frac={test_frac}")
    order = torch.randperm(n_problems, generator=torch.Generator().manual_seed(seed))
    is_test = torch.zeros(n_problems, dtype=torch.bool)
    is_test[order[:n_test]] = True
    return is_test


@torch.no_grad()
def sae_latents(sae, acts: Tensor, batch_size: int = 4096) -> Tensor:
    """``sae.encode`` in eval mode over ``acts`` [N, d] → [N, d_sae] on the CPU."""
    was_training = getattr(sae, "training", False)
    sae.eval()
    device = next(sae.parameters()).device
    out = torch.cat([sae.encode(acts[i:i + batch_size].to(device)).float().cpu()
                     for i in range(0, acts.shape[0], batch_size)])
    if was_training:
        sae.train()
    return out


def sparse_probe_scores(sae, model, tokenizer, hook: str, n_problems: int = 512, ks: Sequence[int] = (1, 2, 5),
                        seed: int = 0, test_frac: float = 0.25, C: float = 1.0, check_prob: float = 0.3,
                        batch_size: int = 64):
    """k-sparse probes on the SAE's latents vs. probes on the raw activations, per toy concept.

    ``sae`` must read ``hook`` of ``model`` (d_in = the hook's width); ``tokenizer`` is the model's
    (fast) tokenizer. ``n_problems`` toy problems are drawn with ``seed``, a ``test_frac`` share
    held out; see the module docstring for labels, selection and probe.

    Returns a pandas DataFrame with one row per concept × k: ``concept``, ``k``, ``latents``
    (selected latent ids, in rank order), ``mean_diffs`` (their signed mean differences, positive =
    higher on the concept), ``sae_acc``, ``raw_acc`` (all dims), ``raw_topk_acc`` (k dims, same rule),
    ``n_train``, ``n_test`` (balanced sizes).
    """
    import pandas as pd

    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise SaetuneError(f"ks must be positive integers, got {list(ks)}")
    d_sae = sae.W_dec.shape[0]
    if max(ks) > d_sae:
        raise SaetuneError(f"k={max(ks)} exceeds the SAE's {d_sae} latents; use ks ≤ {d_sae}")
    if n_problems < 8:
        raise SaetuneError(f"n_problems must be at least 8 to leave both classes in both splits, got {n_problems}")
    data = collect_probe_data(model, tokenizer, hook, probe_texts(n_problems, seed, check_prob), batch_size)
    d_in = getattr(getattr(sae, "cfg", None), "d_in", sae.W_dec.shape[1])
    if data.acts.shape[1] != d_in:
        raise SaetuneError(f"hook {hook!r} has width {data.acts.shape[1]} but the SAE's d_in is {d_in}; "
                           "probe with the SAE trained on this hook")
    latents = sae_latents(sae, data.acts)
    is_test = split_problems(n_problems, test_frac, seed)[data.problem]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for concept in CONCEPTS:
        y = data.labels[concept]
        for name, part, need in (("train", ~is_test, MIN_TRAIN_PER_CLASS), ("test", is_test, MIN_TEST_PER_CLASS)):
            pos, neg = int(y[part].sum()), int((1 - y[part]).sum())
            if min(pos, neg) < need:
                raise SaetuneError(f"concept {concept!r} has {pos} positive and {neg} negative examples in the "
                                   f"{name} split, fewer than {need}; raise n_problems (got {n_problems})")
        tr = torch.nonzero(~is_test).flatten()
        te = torch.nonzero(is_test).flatten()
        tr = tr[balanced_indices(y[tr], gen)]
        te = te[balanced_indices(y[te], gen)]
        for row in probe_concept(latents[tr], latents[te], data.acts[tr], data.acts[te], y[tr], y[te], ks, C):
            rows.append({"concept": concept, **row})
    cols = ["concept", "k", "latents", "mean_diffs", "sae_acc", "raw_acc", "raw_topk_acc", "n_train", "n_test"]
    return pd.DataFrame(rows, columns=cols)


def _check_frame(df) -> None:
    missing = [c for c in ("concept", "k", "latents", "sae_acc", "raw_acc") if c not in df.columns]
    if missing:
        raise SaetuneError(f"not a sparse_probe_scores table: it lacks the columns {', '.join(missing)}")


def probe_summary(df) -> dict[str, float]:
    """Scalars for a quality table: means over concepts.

    ``probe_acc_k{k}`` (SAE latents, for each k in the table), ``probe_raw_acc`` (all raw dims),
    ``probe_raw_acc_k{k}`` (k raw dims, when the table has ``raw_topk_acc``), ``probe_n_concepts``.
    """
    _check_frame(df)
    out: dict[str, float] = {}
    for k, part in df.groupby("k", sort=True):
        out[f"probe_acc_k{int(k)}"] = float(part["sae_acc"].mean())
    for k, part in df.groupby("k", sort=True):
        if "raw_topk_acc" in df.columns:
            out[f"probe_raw_acc_k{int(k)}"] = float(part["raw_topk_acc"].mean())
    out["probe_raw_acc"] = float(df.groupby("concept")["raw_acc"].first().mean())
    out["probe_n_concepts"] = int(df["concept"].nunique())
    return out


def concept_latents(df):
    """Which latents carry which concept: from each concept's largest-k row, one row per selected latent.

    Columns: ``concept``, ``rank`` (0 = largest |mean difference|), ``latent``, ``mean_diff`` (signed;
    positive = the latent is higher when the concept holds), ``sae_acc`` (the probe on all of them),
    ``k1_acc`` (the probe on the top latent alone, when the table has k = 1).
    """
    import pandas as pd

    _check_frame(df)
    rows = []
    for concept, part in df.groupby("concept", sort=False):
        top = part.loc[part["k"].idxmax()]
        k1 = part[part["k"] == 1]
        k1_acc = float(k1["sae_acc"].iloc[0]) if len(k1) else float("nan")
        diffs = top["mean_diffs"] if "mean_diffs" in part.columns else [float("nan")] * len(top["latents"])
        for rank, (latent, diff) in enumerate(zip(top["latents"], diffs)):
            rows.append({"concept": concept, "rank": rank, "latent": int(latent), "mean_diff": float(diff),
                         "sae_acc": float(top["sae_acc"]), "k1_acc": k1_acc})
    return pd.DataFrame(rows, columns=["concept", "rank", "latent", "mean_diff", "sae_acc", "k1_acc"])
