"""A ground-truth benchmark for SAEs: synthetic activations whose true features are known.

Data (SynthSAEBench's generator, Chanin & Garriga-Alonso 2026, ``sae_lens.synthetic``)::

    x = Σ_i a_i · d_i + b        d_i ∈ R^d unit feature directions (the true dictionary, F of them),
                                 b a fixed bias, a_i ≥ 0 the true feature activations

Feature i fires with a Zipfian probability (a few frequent, most rare); firings are correlated
through a low-rank Gaussian copula; a forest of hierarchies gates children on their parents (a
child fires only with its parent; siblings are mutually exclusive); a firing feature's magnitude
is drawn from N(mean, std) and clipped at 0. The directions are pushed apart by gradient
descent on their overlaps, as SynthSAEBench-16k does, but F > d keeps them in superposition.

Scores, with SynthSAEBench's definitions (as implemented in ``sae_lens.synthetic.evals``, so the
numbers compare with theirs); ``W`` are the SAE's decoder rows, ``D`` the true directions and
``C = |cos(W_j, D_i)|`` the [d_sae, F] matrix of absolute cosines:

- ``mcc``: mean correlation coefficient (Sharkey et al. 2022; "Mechanistic interpretability should
  prioritize feature consistency in SAEs", arXiv 2505.20254): the one-to-one matching π between
  latents and true features that maximises Σ C[j, π(j)] (Hungarian algorithm,
  ``scipy.optimize.linear_sum_assignment``), then the mean of the min(d_sae, F) matched cosines.
  1 = every true feature has its own latent pointing exactly along it (up to sign and scale).
- ``uniqueness``: each latent's best true feature m(j) = argmax_i C[j, i]; the number of distinct
  m(j) divided by d_sae. 1 = no two latents track the same true feature.
- ``f1_mean`` (with ``precision_mean``, ``recall_mean``): latent j as a detector of m(j): TP = samples
  where latent j ≠ 0 and a_{m(j)} > 0, and so on; per-latent F1 = 2PR/(P+R) (0 where undefined,
  e.g. a dead latent), averaged over all d_sae latents.
- ``explained_variance``: 1 − Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖² over the evaluation sample (= 1 − FVU).
- ``l0``: mean number of non-zero latents per sample; ``true_l0`` the same for the true features;
  ``dead_frac``: latents that never fire on the evaluation sample.

A dataset dir (:func:`save_ground_truth`, written atomically as a whole) holds ``data.safetensors``
(``feature_vectors`` [F, d], ``bias`` [d], ``activations`` [N, d], ``feature_acts`` [N, F]), ``meta.json``
(format, the generator's settings, counts) and ``generator/`` (SAELens's own ``SyntheticModel``
layout), from which :meth:`GroundTruthData.sample` draws fresh training data from the same
distribution.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import SaetuneError
from .io import atomic_replace_dir, atomic_save_safetensors, atomic_write_json

FORMAT = "saetune-ground-truth/1"
DATA_FILE = "data.safetensors"
META_FILE = "meta.json"
GENERATOR_DIR = "generator"
_TENSORS = ("feature_vectors", "bias", "activations", "feature_acts")


@dataclass
class GroundTruthConfig:
    """Settings of the synthetic generator (SynthSAEBench's knobs, CPU-sized defaults)."""

    num_features: int = 256  # F, true features
    hidden_dim: int = 64  # d, width of the activations (F > d: superposition)
    n_eval: int = 8192  # samples kept in the dataset for scoring
    zipf_exponent: float = 0.5  # firing probability ∝ rank^(−exponent), rescaled to [p_min, p_max]
    p_max: float = 0.3
    p_min: float = 0.01
    hierarchy_roots: int = 16  # trees of the hierarchy forest (0 = no hierarchy)
    hierarchy_branching: int = 3  # children per parent
    hierarchy_depth: int = 2  # levels below a root
    mutually_exclusive: float = 1.0  # share of parents whose children exclude each other
    correlation_rank: int = 8  # rank of the low-rank copula correlation (0 = independent firing)
    correlation_scale: float = 0.1
    mean_magnitude: float = 1.0  # magnitude of a firing feature ~ N(mean, std), clipped at 0
    std_magnitude: float = 0.2
    bias_norm: float = 1.0  # ‖b‖ (0 = no bias)
    orthogonalize_steps: int = 100  # gradient steps pushing the directions apart (0 = random directions)
    seed: int = 0

    def __post_init__(self):
        for name in ("num_features", "hidden_dim", "n_eval"):
            if int(getattr(self, name)) < 1:
                raise SaetuneError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.p_min <= self.p_max <= 1.0:
            raise SaetuneError(f"firing probabilities need 0 < p_min ≤ p_max ≤ 1, got p_min={self.p_min}, "
                               f"p_max={self.p_max}")
        if not 0.0 <= self.mutually_exclusive <= 1.0:
            raise SaetuneError(f"mutually_exclusive must lie in [0, 1], got {self.mutually_exclusive}")
        if self.hierarchy_roots > 0 and self.hierarchy_branching < 2:
            raise SaetuneError(f"hierarchy_branching must be at least 2, got {self.hierarchy_branching}")
        for name in ("hierarchy_roots", "correlation_rank", "orthogonalize_steps", "std_magnitude", "bias_norm"):
            if getattr(self, name) < 0:
                raise SaetuneError(f"{name} must be 0 or more, got {getattr(self, name)}")


def synthetic_model(cfg: GroundTruthConfig):
    """SAELens's ``SyntheticModel`` for ``cfg`` (deterministic in ``cfg.seed``)."""
    from sae_lens.synthetic import (FeatureDictionary, HierarchyConfig, LowRankCorrelationConfig,
                                    OrthogonalizationConfig, SyntheticModel, SyntheticModelConfig,
                                    ZipfianFiringProbabilityConfig, orthogonal_initializer)
    from sae_lens.util import temporary_seed

    hierarchy = None
    if cfg.hierarchy_roots > 0:
        hierarchy = HierarchyConfig(total_root_nodes=cfg.hierarchy_roots, branching_factor=cfg.hierarchy_branching,
                                    max_depth=cfg.hierarchy_depth, mutually_exclusive_portion=cfg.mutually_exclusive,
                                    compensate_probabilities=True)
    smc = SyntheticModelConfig(
        num_features=cfg.num_features, hidden_dim=cfg.hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=cfg.zipf_exponent, max_prob=cfg.p_max,
                                                          min_prob=cfg.p_min),
        hierarchy=hierarchy,
        orthogonalization=(OrthogonalizationConfig(num_steps=cfg.orthogonalize_steps, lr=0.01)
                           if cfg.orthogonalize_steps > 0 else None),
        correlation=(LowRankCorrelationConfig(rank=cfg.correlation_rank, correlation_scale=cfg.correlation_scale,
                                              seed=None) if cfg.correlation_rank > 0 else None),
        std_firing_magnitudes=float(cfg.std_magnitude), mean_firing_magnitudes=float(cfg.mean_magnitude),
        bias=float(cfg.bias_norm) if cfg.bias_norm > 0 else False, seed=cfg.seed)
    # The dictionary is built here as SyntheticModel builds it, minus the progress bar it prints
    # while orthogonalising.
    with temporary_seed(cfg.seed):
        init = (orthogonal_initializer(num_steps=cfg.orthogonalize_steps, lr=0.01, show_progress=False)
                if cfg.orthogonalize_steps > 0 else None)
        fd = FeatureDictionary(cfg.num_features, cfg.hidden_dim, bias=smc.bias, initializer=init, seed=cfg.seed)
    return SyntheticModel(smc, feature_dict=fd)


def sample_synthetic(model, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(activations [n, d], feature_acts [n, F])`` drawn with torch RNG seeded by ``seed``.

    The caller's global RNG is left as it was (SAELens samples from the global RNG).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x, f = model.sample_with_features(int(n))
    return x.float().contiguous(), f.float().contiguous()


@dataclass
class GroundTruthData:
    """A synthetic dataset: the true dictionary, an evaluation sample, and how it was made."""

    feature_vectors: Tensor  # [F, d] true directions (unit rows)
    bias: Tensor  # [d]
    activations: Tensor  # [N, d] evaluation sample
    feature_acts: Tensor  # [N, F] its true feature activations (≥ 0)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    _model: Any = field(default=None, repr=False)

    @property
    def config(self) -> GroundTruthConfig:
        return GroundTruthConfig(**self.meta["config"])

    def generator(self):
        """The SAELens ``SyntheticModel`` behind the data (read from ``generator/`` or rebuilt from the config)."""
        if self._model is None:
            if not self.meta.get("config"):
                raise SaetuneError("this GroundTruthData has no generator settings (meta['config']); only data "
                                   "made by make_ground_truth or load_ground_truth can draw more samples or be saved")
            if self.path is not None and (self.path / GENERATOR_DIR).is_dir():
                from sae_lens.synthetic import SyntheticModel
                self._model = SyntheticModel.load_from_disk(self.path / GENERATOR_DIR)
            else:
                self._model = synthetic_model(self.config)
        return self._model

    def _check_seed(self, seed: int) -> None:
        if seed == self.meta.get("eval_seed"):
            raise SaetuneError(f"seed {seed} is the evaluation sample's seed; pick another so training data "
                               "and evaluation data differ")

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` fresh samples (activations [n, d], feature_acts [n, F]) from the same distribution."""
        self._check_seed(seed)
        return sample_synthetic(self.generator(), n, seed)

    @torch.no_grad()
    def sample_activations(self, n: int, seed: int, chunk: int = 65536) -> Tensor:
        """``n`` fresh activations [n, d] for training, drawn ``chunk`` rows at a time.

        Only the activations are kept, so memory stays at n·d floats (a one-shot draw also holds the
        [n, F] feature activations and SAELens's [n, F] copula noise). One seeded stream; the same
        (seed, chunk) always gives the same tensor.
        """
        self._check_seed(seed)
        model = self.generator()
        out = torch.empty(int(n), self.feature_vectors.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, int(n), chunk):
                m = min(chunk, int(n) - start)
                out[start:start + m] = model.sample(m).float()
        return out


def make_ground_truth(cfg: GroundTruthConfig | None = None) -> GroundTruthData:
    """Build the generator for ``cfg`` and draw the evaluation sample (seed ``cfg.seed``)."""
    import sae_lens

    cfg = cfg or GroundTruthConfig()
    model = synthetic_model(cfg)
    eval_seed = cfg.seed
    x, f = sample_synthetic(model, cfg.n_eval, eval_seed)
    meta = {"format": FORMAT, "config": asdict(cfg), "eval_seed": eval_seed, "n_eval": cfg.n_eval,
            "true_l0": float((f > 0).float().sum(-1).mean()), "sae_lens": sae_lens.__version__,
            "generator": "sae_lens.synthetic.SyntheticModel"}
    return GroundTruthData(model.feature_dict.feature_vectors.detach().float().clone(),
                           model.feature_dict.bias.detach().float().clone(), x, f, meta, None, model)


def save_ground_truth(data: GroundTruthData, path: str | Path) -> Path:
    """Write ``data`` as a dataset dir at ``path`` (built in a temporary sibling, then renamed into place)."""
    path = Path(path)
    if path.exists() and not (path / META_FILE).exists():
        raise SaetuneError(f"{str(path)!r} exists and is not a ground-truth dataset dir (no {META_FILE}); "
                           "refusing to replace it — pick a new path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        atomic_save_safetensors(tmp / DATA_FILE, {name: getattr(data, name) for name in _TENSORS})
        data.generator().save(tmp / GENERATOR_DIR)
        atomic_write_json(tmp / META_FILE, data.meta)
        atomic_replace_dir(tmp, path)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    data.path = path
    return path


def load_ground_truth(path: str | Path) -> GroundTruthData:
    """Read a dataset dir written by :func:`save_ground_truth`."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.exists():
        raise SaetuneError(f"{str(path)!r} is not a ground-truth dataset dir: {META_FILE} is missing "
                           "(make one with saetune.ground_truth.save_ground_truth)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise SaetuneError(f"{str(meta_file)!r} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise SaetuneError(f"{str(meta_file)!r} has format {meta.get('format')!r}; this saetune reads {FORMAT!r}")
    tensors = load_file(str(path / DATA_FILE))
    missing = [t for t in _TENSORS if t not in tensors]
    if missing:
        raise SaetuneError(f"{str(path / DATA_FILE)!r} lacks {', '.join(missing)}")
    return GroundTruthData(*(tensors[t] for t in _TENSORS), meta=meta, path=path)


# ---- scores: pure functions --------------------------------------------------------------------

def abs_cosines(a: Tensor, b: Tensor) -> Tensor:
    """|cos| between every row of ``a`` [m, d] and every row of ``b`` [n, d] → [m, n] (float64)."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape[-1] != b.shape[-1]:
        raise SaetuneError(f"directions of width {a.shape[-1]} cannot be compared with directions of width "
                           f"{b.shape[-1]}; the SAE's d_in must equal the data's hidden_dim")
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).abs()


def mcc(learned: Tensor, true: Tensor) -> float:
    """Mean |cos| over the optimal one-to-one matching of ``learned`` rows to ``true`` rows (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    c = abs_cosines(learned, true)
    rows, cols = linear_sum_assignment(c.numpy(), maximize=True)
    return float(c[rows, cols].mean())


def best_matches(learned: Tensor, true: Tensor) -> Tensor:
    """Index of each learned row's closest true row by |cos| → [m] long."""
    return abs_cosines(learned, true).argmax(dim=1)


def uniqueness(learned: Tensor, true: Tensor) -> float:
    """Distinct best-matched true features / number of learned rows (SynthSAEBench)."""
    if learned.shape[0] == 0:
        return 0.0
    return best_matches(learned, true).unique().numel() / learned.shape[0]


def firing_counts(latent_acts: Tensor, true_acts: Tensor, match: Tensor) -> dict[str, Tensor]:
    """Per-latent TP, FP, FN, TN of "latent j ≠ 0" against "true feature match[j] > 0" → each [m]."""
    fires = latent_acts != 0  # [N, m]
    truth = true_acts[:, match] > 0  # [N, m]
    return {"tp": (fires & truth).sum(0), "fp": (fires & ~truth).sum(0),
            "fn": (~fires & truth).sum(0), "tn": (~fires & ~truth).sum(0)}


def f1_from_counts(tp: Tensor, fp: Tensor, fn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-latent (precision, recall, F1), each 0 where its denominator is 0."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    p = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
    r = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(p + r > 0, 2 * p * r / (p + r).clamp_min(1e-300), torch.zeros_like(tp))
    return p, r, f1


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (float64)."""
    x, x_hat = x.double(), x_hat.double()
    total = (x - x.mean(0)).pow(2).sum()
    if total <= 0:
        raise SaetuneError("explained variance is undefined for activations without variance")
    return float(1 - (x - x_hat).pow(2).sum() / total)


# ---- the shell -------------------------------------------------------------------------------------

def _as_data(data) -> GroundTruthData:
    if isinstance(data, GroundTruthData):
        return data
    if isinstance(data, (str, Path)):
        return load_ground_truth(data)
    raise SaetuneError(f"ground-truth data must be a GroundTruthData or a dataset dir path, got {type(data).__name__}")


def _decoder_rows(sae) -> Tensor:
    w = getattr(sae, "W_dec", None)
    if w is None:
        raise SaetuneError(f"{type(sae).__name__} has no W_dec; ground-truth scores need an SAE with decoder rows "
                           "W_dec [d_sae, d_in] (saetune.SAE or a SAELens SAE)")
    return w.detach().float().cpu()


@torch.no_grad()
def ground_truth_scores(sae, data: GroundTruthData | str | Path, batch_size: int = 4096) -> dict[str, float]:
    """Score ``sae`` against the true features of ``data`` (see the module docstring for each score).

    ``sae`` is any module with ``encode(x)`` → latents [n, d_sae], ``decode(f)`` → x̂ and ``W_dec``
    [d_sae, d_in]: a :class:`saetune.SAE` or a SAELens SAE. It is put in eval mode (a batchtopk SAE
    then uses its threshold, as at inference). Returns ``mcc``, ``f1_mean``, ``precision_mean``,
    ``recall_mean``, ``uniqueness``, ``explained_variance``, ``l0``, ``true_l0``, ``dead_frac``, ``n_samples``.
    """
    data = _as_data(data)
    W = _decoder_rows(sae)
    if W.shape[1] != data.feature_vectors.shape[1]:
        raise SaetuneError(f"the SAE's d_in is {W.shape[1]} but the data's hidden_dim is "
                           f"{data.feature_vectors.shape[1]}; train the SAE on this dataset's activations")
    was_training = getattr(sae, "training", False)
    sae.eval()
    device = W.device
    try:
        device = next(sae.parameters()).device
    except (AttributeError, StopIteration):
        pass
    match = best_matches(W, data.feature_vectors)
    counts = {key: torch.zeros(W.shape[0], dtype=torch.long) for key in ("tp", "fp", "fn", "tn")}
    fired = torch.zeros(W.shape[0], dtype=torch.bool)
    x_hats, l0_sum = [], 0.0
    x_all = data.activations
    for start in range(0, x_all.shape[0], batch_size):
        x = x_all[start:start + batch_size]
        f = sae.encode(x.to(device)).float()
        x_hat = sae.decode(f).float().cpu()
        f = f.cpu()
        x_hats.append(x_hat)
        l0_sum += float((f != 0).sum())
        fired |= (f != 0).any(0)
        for key, v in firing_counts(f, data.feature_acts[start:start + batch_size], match).items():
            counts[key] += v
    if was_training:
        sae.train()
    n = x_all.shape[0]
    p, r, f1 = f1_from_counts(counts["tp"], counts["fp"], counts["fn"])
    return {"mcc": mcc(W, data.feature_vectors), "f1_mean": float(f1.mean()), "precision_mean": float(p.mean()),
            "recall_mean": float(r.mean()), "uniqueness": uniqueness(W, data.feature_vectors),
            "explained_variance": explained_variance(x_all, torch.cat(x_hats)), "l0": l0_sum / n,
            "true_l0": float((data.feature_acts > 0).float().sum(-1).mean()),
            "dead_frac": float((~fired).float().mean()), "n_samples": n}
