"""Lazy reader of the explorer's feature data (layout: :mod:`saetune.analysis.feature_build`).

Opening costs a ``meta.json`` read; each per-feature array loads on first use (one tensor of
``stats.safetensors``), and one feature's contexts are one ``seek`` + one line of
``examples.jsonl`` — thousands of features never load at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saetune.errors import SaetuneError

FORMAT = "saetune.features"
VERSION = 1


def feature_dirs(path: str | Path) -> dict[str, Path]:
    """Feature-data dirs by hook under a features dir, a run dir or a pipeline dir."""
    p = Path(path)
    cands = [p, p / "features"]
    if p.is_dir():
        cands += [c / "features" for c in sorted(p.iterdir()) if c.is_dir()]
    out: dict[str, Path] = {}
    for c in cands:
        if (c / "meta.json").exists():
            out.setdefault(c.name, c)
        elif c.is_dir():
            for h in sorted(c.iterdir()):
                if h.is_dir() and (h / "meta.json").exists():
                    out.setdefault(h.name, h)
    return out


class FeatureData:
    """One hook's feature data. ``FeatureData.open(run_dir, hook=None)`` finds it in a run dir."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.meta: dict[str, Any] = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            raise SaetuneError(f"{str(self.path)!r} holds no readable meta.json: the features stage has not "
                               "finished writing it (run `saetune features`)") from None
        if self.meta.get("format") != FORMAT:
            raise SaetuneError(f"{str(self.path / 'meta.json')!r} is not saetune feature data")
        for f in ("stats.safetensors", "examples.jsonl", "examples.index.npy", "tokens.json"):
            if not (self.path / f).exists():
                raise SaetuneError(f"feature data in {str(self.path)!r} is incomplete: {f} is missing")
        self._arrays: dict[str, np.ndarray] = {}
        self._index: np.ndarray | None = None
        self._vocab: dict[int, str] | None = None

    @classmethod
    def open(cls, path: str | Path, hook: str | None = None) -> "FeatureData":
        dirs = feature_dirs(path)
        if not dirs:
            raise SaetuneError(f"no feature data under {str(path)!r}; make it with `saetune features --sae SAE_RUN`")
        if hook is None:
            return cls(next(iter(dirs.values())))
        if hook not in dirs:
            raise SaetuneError(f"no feature data for hook {hook!r} under {str(path)!r}; found: {', '.join(dirs)}")
        return cls(dirs[hook])

    # ---- facts ---------------------------------------------------------------------------
    @property
    def hook(self) -> str:
        return self.meta["hook"]

    @property
    def d_sae(self) -> int:
        return int(self.meta["d_sae"])

    def array(self, name: str) -> np.ndarray:
        """One per-feature array of ``stats.safetensors`` (loaded on first use)."""
        if name not in self._arrays:
            from safetensors import safe_open
            with safe_open(str(self.path / "stats.safetensors"), framework="numpy") as f:
                if name not in f.keys():
                    raise SaetuneError(f"feature data has no array {name!r}; it has: {', '.join(f.keys())}")
                self._arrays[name] = f.get_tensor(name)
        return self._arrays[name]

    @property
    def vocab(self) -> dict[int, str]:
        if self._vocab is None:
            self._vocab = {int(k): v for k, v in json.loads((self.path / "tokens.json").read_text()).items()}
        return self._vocab

    def token(self, tid: int) -> str:
        return self.vocab.get(int(tid), f"<{int(tid)}>")

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.d_sae:
            raise SaetuneError(f"feature {i} does not exist; this SAE has features 0…{self.d_sae - 1}")
        return i

    # ---- one feature ---------------------------------------------------------------------
    def examples(self, i: int) -> dict[str, Any]:
        """The contexts of feature ``i`` (one line of examples.jsonl), token ids turned to text."""
        i = self._check(i)
        if self._index is None:
            self._index = np.load(self.path / "examples.index.npy")
        a, b = int(self._index[i]), int(self._index[i + 1])
        with open(self.path / "examples.jsonl", "rb") as f:
            f.seek(a)
            rec = json.loads(f.read(b - a))
        for ex in rec["top"] + [e for g in rec["quantiles"] for e in g["examples"]]:
            ex["tokens"] = [self.token(t).lstrip() if j == 0 else self.token(t) for j, t in enumerate(ex["ids"])]
        return rec

    def histogram(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(bin edges [B+1], counts [B]) of feature ``i``'s non-zero activations."""
        i = self._check(i)
        counts = self.array("hist")[i]
        return np.linspace(0.0, float(self.array("max_act")[i]), len(counts) + 1), counts

    def logits(self, i: int) -> pd.DataFrame:
        """Top positive and negative direct logit effects: columns sign, token, effect."""
        i = self._check(i)
        rows = [{"sign": "+", "token": self.token(t), "effect": float(v)}
                for t, v in zip(self.array("logit_pos_ids")[i], self.array("logit_pos")[i])]
        rows += [{"sign": "−", "token": self.token(t), "effect": float(v)}
                 for t, v in zip(self.array("logit_neg_ids")[i], self.array("logit_neg")[i])]
        return pd.DataFrame(rows, columns=["sign", "token", "effect"])

    def neighbours(self, i: int) -> pd.DataFrame:
        """Nearest features by decoder cosine and by co-activation (Jaccard), side by side."""
        i = self._check(i)
        dec = list(zip(self.array("dec_nn_ids")[i].tolist(), self.array("dec_nn_cos")[i].tolist()))
        co = [(int(f), j) for f, j in zip(self.array("coact_nn_ids")[i].tolist(),
                                          self.array("coact_nn_jaccard")[i].tolist())]
        n = max(len(dec), len(co))
        rows = []
        for r in range(n):
            d = dec[r] if r < len(dec) else (None, None)
            c = co[r] if r < len(co) and co[r][0] >= 0 else (None, None)
            rows.append({"decoder_cosine_feature": d[0], "cosine": d[1],
                         "coactivation_feature": c[0], "jaccard": c[1]})
        return pd.DataFrame(rows)

    def summary(self, i: int) -> dict[str, Any]:
        i = self._check(i)
        return {"feature": i, "count": int(self.array("count")[i]), "density": float(self.array("density")[i]),
                "mean_act": float(self.array("mean_act")[i]), "max_act": float(self.array("max_act")[i]),
                "top_tokens": self.top_tokens(i)}

    def top_tokens(self, i: int) -> list[str]:
        return [self.token(t) for t in self.array("top_token_ids")[i] if t >= 0]

    # ---- all features --------------------------------------------------------------------
    def table(self) -> pd.DataFrame:
        """One row per feature: density, log10 density, mean/max activation, top tokens, top logit."""
        dens = self.array("density").astype(np.float64)
        top_ids = self.array("top_token_ids")
        pos_ids = self.array("logit_pos_ids")[:, 0]
        return pd.DataFrame({
            "feature": np.arange(self.d_sae),
            "density": dens,
            "log10_density": np.where(dens > 0, np.log10(np.maximum(dens, 1e-12)), -np.inf),
            "mean_act": self.array("mean_act"),
            "max_act": self.array("max_act"),
            "top_tokens": [" ".join(repr(self.token(t))[1:-1] for t in row if t >= 0) for row in top_ids],
            "top_logit": [self.token(t) for t in pos_ids],
        })

    def search_token(self, token: str) -> list[int]:
        """Features whose top contexts peak on exactly ``token`` (surrounding spaces ignored)."""
        want = token.strip()
        ids = [t for t, s in self.vocab.items() if s.strip() == want]
        if not ids:
            return []
        hit = np.isin(self.array("top_token_ids"), ids)
        # rank by how early the token comes in the feature's list of peak tokens
        first = np.where(hit.any(1), hit.argmax(1), 99)
        feats = np.flatnonzero(hit.any(1))
        return feats[np.argsort(first[feats], kind="stable")].tolist()

    def search_text(self, text: str) -> list[int]:
        """Features whose peak tokens or top positive logit tokens contain ``text`` (case-insensitive)."""
        q = text.strip().lower()
        if not q:
            return []
        ids = [t for t, s in self.vocab.items() if q in s.lower()]
        if not ids:
            return []
        hit = np.isin(self.array("top_token_ids"), ids).any(1) | np.isin(self.array("logit_pos_ids"), ids).any(1)
        feats = np.flatnonzero(hit)
        return feats[np.argsort(-self.array("density")[feats], kind="stable")].tolist()
