"""Sparse autoencoders: TopK (Resa's), BatchTopK, Matryoshka BatchTopK, standard (ReLU + L1) and JumpReLU.

Parameters use SAELens' names and shapes: ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae),
``W_dec`` (d_sae, d_in), ``b_dec`` (d_in); JumpReLU (and BatchTopK at inference) adds
``threshold`` (d_sae)::

    pre = (x − b_dec) · W_enc + b_enc
    topk:      f = TopK_k(ReLU(pre))                      (Gao et al. 2024)
    batchtopk: keep the k·B largest ReLU(pre) of a batch   (Bussmann et al. 2024); at inference
               f = pre · 1[pre > θ] with θ the running mean of the smallest kept activation
    matryoshka_batchtopk: batchtopk's f (selection over the whole dictionary, same θ at inference),
               trained so that every prefix [0, m_i) of the latents reconstructs x on its own
               (Bussmann, Nabeshima, Karvonen, Nanda 2025; loss in ``saetune.sae_losses``)
    standard:  f = ReLU(pre)                                (L1 penalty Σ f_j ‖W_dec,j‖)
    jumprelu:  f = pre · 1[pre > θ_j]                       (Rajamanoharan et al. 2024)
    x̂ = f · W_dec + b_dec

Init (Resa / sparsify): encoder as ``nn.Linear``'s default, b_enc = 0, W_dec = W_encᵀ with
unit-norm rows, b_dec = 0 (the trainer sets it to the first batch's mean).

Formats: SAELens (``cfg.json`` + ``sae_weights.safetensors``) and sparsify (``cfg.json`` +
``sae.safetensors`` with ``encoder.weight`` (d_sae, d_in), ``encoder.bias``, ``W_dec``,
``b_dec``); a directory of several hooks holds one such dir per hook. BatchTopK and Matryoshka
BatchTopK save as SAELens saves them after training: a JumpReLU SAE with θ in every latent.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .errors import SaetuneError
from .io import atomic_save_safetensors, atomic_write_json
from .sae_losses import jumprelu  # JumpReLU with its straight-through estimator

ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk", "standard", "jumprelu")
BATCH_TOPK_ARCHS = ("batchtopk", "matryoshka_batchtopk")  # one global top-k·B selection; θ at inference
K_ARCHS = ("topk",) + BATCH_TOPK_ARCHS  # architectures that need k
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"


@dataclass
class SAEConfig:
    """Shape and kind of an SAE."""

    d_in: int
    d_sae: int
    k: int | None = None
    architecture: str = "topk"
    l1_coefficient: float = 5.0
    l0_coefficient: float = 1.0
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001
    matryoshka_widths: list[int] | None = None  # prefix sizes m_1 < … < m_n = d_sae (SAELens' name)
    hook_name: str = ""
    model_name: str = ""
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise SaetuneError(f"unknown SAE architecture {self.architecture!r}; valid: {', '.join(ARCHITECTURES)}")
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SaetuneError(f"SAE {name} must be a positive integer, got {v!r}")
        if self.architecture in K_ARCHS:
            if self.k is None:
                raise SaetuneError(f"architecture {self.architecture!r} needs k (active latents per token)")
            if not 1 <= self.k < self.d_sae:
                raise SaetuneError(f"k must satisfy 1 ≤ k < d_sae; got k={self.k}, d_sae={self.d_sae}")
        if self.architecture == "matryoshka_batchtopk":
            self.matryoshka_widths = check_matryoshka_widths(self.matryoshka_widths, self.d_sae)
        elif self.matryoshka_widths:
            raise SaetuneError(f"matryoshka_widths {self.matryoshka_widths} is set, but architecture "
                               f"{self.architecture!r} has no nested prefixes; use 'matryoshka_batchtopk'")


def check_matryoshka_widths(widths, d_sae: int) -> list[int]:
    """Prefix sizes of a Matryoshka SAE, checked: integers ≥ 1, strictly increasing, the last = d_sae."""
    example = f"e.g. [{max(1, d_sae // 16)}, {max(1, d_sae // 4)}, {d_sae}]"
    if not widths:
        raise SaetuneError(f"architecture 'matryoshka_batchtopk' needs matryoshka_widths (nested prefix sizes "
                           f"ending at d_sae={d_sae}), {example}")
    if isinstance(widths, (str, bytes)) or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
        raise SaetuneError(f"matryoshka_widths must be a list of integers, got {widths!r}")
    widths = list(widths)
    if widths[0] < 1:
        raise SaetuneError(f"matryoshka_widths must all be ≥ 1; got {widths}")
    for a, b in zip(widths, widths[1:]):
        if b <= a:
            raise SaetuneError(f"matryoshka_widths must be strictly increasing; got {widths} ({b} after {a})")
    if widths[-1] != d_sae:
        raise SaetuneError(f"the last of matryoshka_widths must equal d_sae={d_sae} (the whole dictionary); "
                           f"got {widths}, {example}")
    return widths


def _saelens_architecture(cfg: SAEConfig) -> str:
    return "jumprelu" if cfg.architecture in BATCH_TOPK_ARCHS else cfg.architecture


class SAE(nn.Module):
    """A sparse autoencoder; see the module docstring for the maths."""

    def __init__(self, cfg: SAEConfig, device: str | torch.device | None = None, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.d_sae
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # nn.Linear's default init: U(−1/√d, 1/√d) (kaiming_uniform with a=√5)
        bound = 1.0 / math.sqrt(d)
        w = torch.empty(n, d).uniform_(-bound, bound, generator=gen)  # (n, d) like Linear.weight
        self.W_enc = nn.Parameter(w.t().contiguous())  # (d, n)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(w / w.norm(dim=1, keepdim=True).clamp_min(1e-12))  # (n, d) unit rows
        self.b_dec = nn.Parameter(torch.zeros(d))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((n,), cfg.jumprelu_init_threshold))
        elif cfg.architecture in BATCH_TOPK_ARCHS:
            self.register_buffer("threshold", torch.zeros(n))
        if device is not None:
            self.to(device)

    # ---- maths ---------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise SaetuneError(f"SAE input has width {x.shape[-1]}, but this SAE's d_in is {self.cfg.d_in}"
                               f" (hook {self.cfg.hook_name or '?'}); use an SAE trained on this model's width")

    def pre_acts(self, x: Tensor) -> Tensor:
        """(x − b_dec) · W_enc + b_enc."""
        self._check_input(x)
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations [..., d_sae]."""
        pre = self.pre_acts(x)
        arch = self.cfg.architecture
        if arch == "topk":
            v, i = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, i, v.relu())
        if arch == "standard":
            return pre.relu()
        if arch == "jumprelu":
            return jumprelu(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        # batchtopk, matryoshka_batchtopk
        if self.training or not bool((self.threshold > 0).any()):
            return self.batch_topk(pre)
        return pre * (pre > self.threshold)

    def batch_topk(self, pre: Tensor) -> Tensor:
        """Keep the k·B largest ReLU(pre) over the whole batch (B = tokens in it): ``batch_topk``'s torch path."""
        from saetune.kernels.topk_sae import batch_topk_torch
        return batch_topk_torch(pre, self.cfg.k)

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """TopK SAEs: (values, indices) of the k active latents, each [..., k]."""
        if self.cfg.architecture != "topk":
            raise SaetuneError(f"encode_topk needs a topk SAE, this one is {self.cfg.architecture!r}")
        v, i = self.pre_acts(x).topk(self.cfg.k, dim=-1, sorted=False)
        return v.relu(), i

    def decode(self, f: Tensor) -> Tensor:
        """f · W_dec + b_dec."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction x̂. Never renormalises anything."""
        if self.cfg.architecture == "topk" and x.dim() >= 1:
            from saetune.kernels import topk_autoencode, use_triton
            from saetune.kernels.topk_sae import gather_rows_dot
            shape = x.shape
            if use_triton(x, self.W_enc):  # CUDA: Triton top-k, gather decoder, sparse backward
                self._check_input(x)
                x_hat, _, _ = topk_autoencode(x.reshape(-1, shape[-1]), self.W_enc, self.b_enc, self.W_dec,
                                              self.b_dec, self.cfg.k)
                return x_hat.reshape(shape)
            v, i = self.encode_topk(x.reshape(-1, shape[-1]))
            return (gather_rows_dot(self.W_dec, i, v) + self.b_dec).reshape(shape)
        return self.decode(self.encode(x))

    # ---- decoder geometry (used by the trainer) ------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """g ← g − ⟨g, w⟩ w for each unit decoder row w: the step cannot change the row's norm to first order."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        par = (self.W_dec.grad * w).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(par * w)

    # ---- saving ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if hasattr(self, "threshold"):
            out["threshold"] = self.threshold
        return {k: v.detach() for k, v in out.items()}

    def save(self, path: str | Path, format: Literal["saelens", "sparsify"] = "saelens") -> Path:
        """Write this SAE to ``path`` in SAELens or sparsify layout (atomic file writes)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        if format == "saelens":
            tensors = self.state_tensors()
            if cfg.architecture in BATCH_TOPK_ARCHS:
                tensors["threshold"] = self.threshold.detach().clone()
            st = {"architecture": cfg.architecture, "k": cfg.k, "l1_coefficient": cfg.l1_coefficient,
                  "l0_coefficient": cfg.l0_coefficient, "jumprelu_bandwidth": cfg.jumprelu_bandwidth}
            if cfg.matryoshka_widths:
                st["matryoshka_widths"] = list(cfg.matryoshka_widths)
            meta = {**cfg.metadata, "hook_name": cfg.hook_name, "model_name": cfg.model_name, "saetune": st}
            d = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
                 "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
                 "metadata": meta, "architecture": _saelens_architecture(cfg)}
            if cfg.architecture == "topk":
                d["k"] = cfg.k
                d["rescale_acts_by_decoder_norm"] = False
            atomic_save_safetensors(path / SAELENS_WEIGHTS, tensors)
            atomic_write_json(path / "cfg.json", d)
        elif format == "sparsify":
            if cfg.architecture != "topk":
                raise SaetuneError(f"the sparsify layout holds TopK SAEs only; this SAE is {cfg.architecture!r} "
                                   "(save it with format='saelens')")
            tensors = {"encoder.weight": self.W_enc.detach().t(), "encoder.bias": self.b_enc.detach(),
                       "W_dec": self.W_dec.detach(), "b_dec": self.b_dec.detach()}
            atomic_save_safetensors(path / SPARSIFY_WEIGHTS, tensors)
            atomic_write_json(path / "cfg.json", {
                "activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "normalize_decoder": True,
                "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False, "skip_connection": False,
                "transcode": False, "d_in": cfg.d_in})
        else:
            raise SaetuneError(f"unknown SAE format {format!r}; valid: saelens, sparsify")
        return path

    # ---- loading --------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, hook: str | None = None, device: str | torch.device = "cpu") -> "SAE":
        """Load an SAE in SAELens or sparsify layout; a dir of several hooks needs ``hook``. ``path`` may also
        name a pretrained release (:mod:`saetune.releases`: local HF cache, else the hub)."""
        from .releases import resolve_release
        path = resolve_release(path, hook)  # an existing path as given; a release name → its files
        if not path.exists():
            raise SaetuneError(f"SAE path {str(path)!r} does not exist")
        if (path / "sae").is_dir() and not (path / "cfg.json").exists():
            path = path / "sae"  # a train-sae run dir
        if not (path / "cfg.json").exists():
            path = _pick_hook_dir(path, hook)
        cfg_file = path / "cfg.json"
        cfg_d = _read_json(cfg_file)
        weights = SAELENS_WEIGHTS if (path / SAELENS_WEIGHTS).exists() else SPARSIFY_WEIGHTS
        try:
            if (path / SAELENS_WEIGHTS).exists():
                sae = cls._from_saelens(cfg_d, _read_safetensors(path / SAELENS_WEIGHTS))
            elif (path / SPARSIFY_WEIGHTS).exists():
                sae = cls._from_sparsify(cfg_d, _read_safetensors(path / SPARSIFY_WEIGHTS), hook or path.name)
            else:
                raise SaetuneError(f"{str(path)!r} holds cfg.json but neither {SAELENS_WEIGHTS} (SAELens) nor "
                                   f"{SPARSIFY_WEIGHTS} (sparsify)")
        except (KeyError, TypeError, ValueError) as e:  # a cfg.json that parses but lacks a key or has a bad value
            raise SaetuneError(f"{str(cfg_file)!r} is not a valid SAE config ({type(e).__name__}: {e})") from None
        except SaetuneError as e:
            if str(path) in str(e):
                raise
            raise SaetuneError(f"cannot load the SAE in {str(path)!r} (cfg.json + {weights}): {e}") from None
        return sae.to(device).eval()

    @classmethod
    def _from_saelens(cls, d: dict, tensors: dict[str, Tensor]) -> "SAE":
        meta = d.get("metadata") or {}
        st = meta.get("saetune") or {}
        # SAELens options this SAE class does not implement: refuse rather than compute something else
        for key, ok in (("apply_b_dec_to_input", (True,)), ("normalize_activations", ("none", None)),
                        ("rescale_acts_by_decoder_norm", (False,)), ("reshape_activations", ("none", None))):
            if key in d and d[key] not in ok:
                raise SaetuneError(f"SAELens option {key}={d[key]!r} is not supported (supported: "
                                   f"{' or '.join(map(repr, ok))})")
        arch = st.get("architecture", d.get("architecture", "standard"))
        if arch not in ARCHITECTURES:
            raise SaetuneError(f"SAELens architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        cfg = SAEConfig(d_in=int(d["d_in"]), d_sae=int(d["d_sae"]), k=d.get("k", st.get("k")), architecture=arch,
                        l1_coefficient=st.get("l1_coefficient", 5.0), l0_coefficient=st.get("l0_coefficient", 1.0),
                        jumprelu_bandwidth=st.get("jumprelu_bandwidth", 0.001),
                        matryoshka_widths=st.get("matryoshka_widths"),
                        hook_name=meta.get("hook_name") or d.get("hook_name") or "",
                        model_name=meta.get("model_name") or d.get("model_name") or "",
                        metadata={k: v for k, v in meta.items() if k not in ("saetune", "hook_name", "model_name")})
        sae = cls(cfg)
        sae._load_tensors(tensors)
        return sae

    @classmethod
    def _from_sparsify(cls, d: dict, tensors: dict[str, Tensor], hook: str) -> "SAE":
        if d.get("activation", "topk") != "topk" or d.get("transcode") or d.get("skip_connection"):
            raise SaetuneError("only plain TopK sparse coders (no transcoder, no skip connection, activation "
                               "'topk') load from the sparsify layout")
        missing = [key for key in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if key not in tensors]
        if missing:
            raise SaetuneError(f"sparsify weights lack {', '.join(map(repr, missing))}; keys: {', '.join(tensors)}")
        W = tensors["encoder.weight"]
        n, d_in = W.shape
        cfg = SAEConfig(d_in=int(d.get("d_in", d_in)), d_sae=int(d.get("num_latents") or n), k=int(d["k"]),
                        architecture="topk", hook_name=hook)
        sae = cls(cfg)
        sae._load_tensors({"W_enc": W.t(), "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
                           "b_dec": tensors["b_dec"]})
        return sae

    @torch.no_grad()
    def _load_tensors(self, tensors: dict[str, Tensor]) -> None:
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        for name, p in own.items():
            if name not in tensors:
                raise SaetuneError(f"SAE weights lack {name!r}; found: {', '.join(tensors)}")
            t = tensors[name]
            if t.shape != p.shape:
                raise SaetuneError(f"SAE weight {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)} "
                                   f"for d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}")
            p.copy_(t.to(p.dtype))


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SaetuneError(f"{str(path)!r} is not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise SaetuneError(f"{str(path)!r} must hold a JSON object, got {type(d).__name__}")
    return d


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SaetuneError(f"SAE weights file {str(path)!r} is truncated or corrupted ({e})") from None


def hook_dirs(path: Path) -> dict[str, Path]:
    """Sub-dirs of ``path`` that each hold one SAE (cfg.json), by name."""
    return {p.name: p for p in sorted(path.iterdir()) if p.is_dir() and (p / "cfg.json").exists()}


def _pick_hook_dir(path: Path, hook: str | None) -> Path:
    subs = hook_dirs(path)
    if not subs:
        raise SaetuneError(f"{str(path)!r} holds no SAE: no cfg.json in it or in a sub-directory")
    if hook is None:
        if len(subs) == 1:
            return next(iter(subs.values()))
        raise SaetuneError(f"{str(path)!r} holds SAEs for several hooks; pass hook= one of: {', '.join(subs)}")
    for cand in (hook, hook.removeprefix("model."), f"model.{hook}"):
        if cand in subs:
            return subs[cand]
    raise SaetuneError(f"{str(path)!r} has no SAE for hook {hook!r}; it holds: {', '.join(subs)}")


def load_saes(path: str | Path, device: str = "cpu") -> dict[str, SAE]:
    """Every SAE in a (multi-hook) dir, by sub-dir name."""
    path = Path(path)
    if (path / "cfg.json").exists():
        return {path.name: SAE.load(path, device=device)}
    if (path / "sae").is_dir():
        path = path / "sae"
    return {name: SAE.load(p, device=device) for name, p in hook_dirs(path).items()}


def config_dict(sae: SAE) -> dict[str, Any]:
    return asdict(sae.cfg)


def warn_hook_mismatch(what: str, trained_at: str, used_at: str, model: nn.Module | None = None) -> bool:
    """Warn when an SAE trained at hook ``trained_at`` is used at ``used_at``; returns whether it warned.

    Names are compared canonically (through ``model``'s hook names when given, else with a leading
    ``model.`` ignored). A warning, not an error: Resa's reference code loads SAEs trained on
    ``layers.N.mlp`` into the block output ``model.layers.N`` on purpose.
    """
    import warnings

    def canonical(name: str) -> str:
        if model is not None:
            from .models import resolve_hook
            try:
                name = resolve_hook(model, name).name
            except SaetuneError:
                pass  # a name this model does not know: compare the spelling
        return name.removeprefix("model.")

    if not trained_at or not used_at or canonical(trained_at) == canonical(used_at):
        return False
    warnings.warn(f"{what} was trained at hook {trained_at!r} but is used at {used_at!r}: the hook points differ "
                  "(as in Resa's reference code); its reconstructions start off-distribution", stacklevel=3)
    return True
