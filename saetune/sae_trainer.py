"""``saetune train-sae``: train one or several SAEs from an activation store or on the fly.

Resa's Stage I (SPEC_RESA.md) is the default recipe: TopK, FVU loss, no AuxK, b_dec from the
first batch's mean (also over a pretrained ``init_from`` SAE's), decoder rows re-normalised every
step with the gradient component parallel to each row removed first, sign-SGD under schedule-free
averaging, averaged weights saved. (The averaged weights are what Resa saves and evaluates; their
decoder rows are averages of unit rows, so slightly shorter than 1 — the renormalisation applies
to the training sequence, as in the reference.)

Several SAEs (hooks × widths × k) train from one stream of forwards. A checkpoint holds every
SAE's weights, its optimiser state, the dead-latent counters, the data position and the RNG
state, all in safetensors/JSON, written atomically; ``resume`` continues a killed run and ends
with the same SAE as an uninterrupted one.

Fault injection, for tests only: ``SAETUNE_FAULT_KILL_RANK=r`` with ``SAETUNE_FAULT_AT_STEP=n`` makes
rank r SIGKILL itself as it starts step n (1-based), as an OOM-killed or crashed worker dies.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from .activations import ActivationStore, prefetch, stream_batches
from .config import opt
from .data import DataConfig, load_chunks
from .errors import SaetuneError
from .io import atomic_write_json
from .metrics import l0 as l0_of, total_variance
from .models import resolve_device
from .optim import OPTIMIZERS, build_optimizer, default_lr, is_schedule_free
from .runs import Checkpoints, RunDir, record_path
from .sae import ARCHITECTURES, BATCH_TOPK_ARCHS, K_ARCHS, SAE, SAEConfig, check_matryoshka_widths, warn_hook_mismatch
from .sae_losses import (batchtopk_loss, jumprelu_loss, matryoshka_batchtopk_loss, standard_loss, topk_loss,
                         update_batch_topk_threshold_)
from saetune.kernels import sae_update

STAGE = "train-sae"


@dataclass
class TrainSAEConfig(DataConfig):
    """``saetune train-sae``: train sparse autoencoders on a model's activations."""

    model: str = opt("toy", "model whose activations are used: 'toy', a local HF dir, or a hub id")
    activations: str = opt("", "train from this activation store (a `saetune cache` run dir); empty = compute "
                               "activations on the fly from the model and data (Resa's way)")
    hooks: list[str] = opt(None, "hook points, one SAE set per hook (e.g. model.layers.2)",
                           factory=lambda: ["model.layers.2"])
    architecture: str = opt("topk", f"SAE architecture: {', '.join(ARCHITECTURES)}")
    d_sae: list[int] = opt(None, "latent counts (one SAE per width); empty = expansion_factor × d_in",
                           factory=list)
    expansion_factor: int = opt(8, "d_sae = expansion_factor × d_in when d_sae is empty")
    k: list[int] = opt(None, "active latents per token for topk, batchtopk and matryoshka_batchtopk (one SAE per "
                             "value; Resa: 32)", factory=lambda: [32])
    matryoshka_widths: list[int] = opt(None, "matryoshka_batchtopk: nested prefix sizes m_1 < … < m_n of the "
                                             "dictionary, the last = d_sae; each prefix [0, m_i) is trained to "
                                             "reconstruct the input (Bussmann et al. 2025)", factory=list)
    optimizer: str = opt("signum_sf", f"optimiser: {', '.join(OPTIMIZERS)} (signum_sf = Resa's sign-SGD + "
                                      "schedule-free)")
    lr: float = opt(0.0, "learning rate; 0 = width-scaled default (signum_sf 5e-3/√(d_sae/2¹⁴), adam "
                         "2e-4/√(d_sae/2¹⁴))")
    momentum: float = opt(0.95, "schedule-free momentum (signum_sf)")
    warmup_steps: int = opt(0, "linear lr warm-up steps (adam only; Resa uses none)")
    batch_size: int = opt(4096, "tokens per step (Resa: 65,536 over 2 GPUs); a multiple of context_size "
                                "when activations are computed on the fly")
    total_tokens: int = opt(0, "train on this many tokens (0 = one pass over the data); at most one pass, as in "
                               "Resa: epochs never cycle, and a larger value is capped with a warning")
    shuffle: bool = opt(False, "shuffle store reads across shards (Resa: no shuffle)")
    seed: int = opt(0, "seed of SAE init and shuffling")
    auxk_coef: float = opt(0.0, "weight of the AuxK loss on dead latents (Resa: 0; Gao et al.: 1/32)")
    auxk_k: int = opt(0, "dead latents used by AuxK per token (0 = d_in // 2)")
    dead_tokens: int = opt(10_000_000, "a latent is dead after this many tokens without firing (Resa: 10M)")
    normalize_decoder: bool = opt(True, "topk/batchtopk: unit-norm decoder rows every step and remove the "
                                        "gradient parallel to them")
    init_b_dec: Literal["mean", "zero", "keep"] = opt(
        "mean", "b_dec before the first step: 'mean' of the first batch (Resa; with init_from this re-centres the "
                "pretrained SAE on the new hook's activations, as the reference's trainer does), 'zero', or 'keep' "
                "(as initialised: zero for a fresh SAE, the pretrained b_dec with init_from)")
    l1_coefficient: float = opt(5.0, "standard SAEs: weight of the L1 penalty Σ f_j‖W_dec,j‖")
    l0_coefficient: float = opt(1.0, "jumprelu SAEs: weight of the L0 penalty")
    jumprelu_bandwidth: float = opt(0.001, "jumprelu SAEs: straight-through bandwidth ε")
    autocast: Literal["auto", "none", "bfloat16"] = opt("auto", "SAE forward under autocast: auto = bfloat16 on "
                                                                 "CUDA (Resa), none on CPU")
    device: str = opt("auto", "'auto' (cuda if present), 'cpu' or 'cuda'")
    model_dtype: str = opt("float32", "dtype the model runs in for on-the-fly activations (Resa: bfloat16)")
    prefetch: int = opt(-1, "batches of activations produced ahead (model forward or store reads) in a background "
                            "thread while the SAEs train; 0 = none, -1 = auto (2 on CUDA; 0 on CPU, where the thread "
                            "competes for the same cores: 15 % slower on 2 cores)")
    log_every: int = opt(10, "log metrics every N steps")
    checkpoint_every: int = opt(200, "write a resumable checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = opt(2, "how many checkpoints to keep")
    eval_seqs: int = opt(32, "held-out sequences for the spliced-in metrics (CE loss recovered, KL); 0 = skip")
    save_format: Literal["saelens", "sparsify"] = opt("saelens", "layout of the saved SAEs")
    init_from: str = opt("", "start from a pretrained SAE (SAELens or sparsify dir, or a multi-hook dir with "
                             "init_hook) instead of a fresh init — Resa's 'fine-tuned' mode; its weights, d_sae "
                             "and k are kept, b_dec is re-centred on the first batch's mean (init_b_dec 'keep' "
                             "keeps it)")
    init_hook: str = opt("", "which SAE of a multi-hook init_from dir to load (e.g. layers.12.mlp)")
    max_steps: int = opt(0, "stop after this many steps (0 = no limit); 0 steps with init_from = Resa's "
                            "'pretrained as is' mode (with skip_training)")
    skip_training: bool = opt(False, "only load init_from, evaluate and save it (Resa's 'pretrained as is' mode)")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise SaetuneError(f"unknown SAE architecture {self.architecture!r}; valid: {', '.join(ARCHITECTURES)}")
        if self.optimizer not in OPTIMIZERS:
            raise SaetuneError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if not self.hooks:
            raise SaetuneError("train-sae needs at least one hook point (hooks)")
        if self.batch_size < 1:
            raise SaetuneError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.auxk_coef > 0 and self.architecture != "topk":
            raise SaetuneError(f"AuxK (auxk_coef={self.auxk_coef}) is defined for topk SAEs only; this run is "
                               f"{self.architecture!r}")
        if self.save_format == "sparsify" and self.architecture != "topk":
            raise SaetuneError("save_format 'sparsify' holds topk SAEs only; use save_format 'saelens'")
        if self.architecture in K_ARCHS and not self.k:
            raise SaetuneError(f"architecture {self.architecture!r} needs k")
        if self.architecture == "matryoshka_batchtopk":
            if len(self.d_sae) != 1:
                raise SaetuneError(f"matryoshka_batchtopk trains one width per run (matryoshka_widths ends at d_sae); "
                                   f"give exactly one d_sae, got {self.d_sae or 'none (expansion_factor)'}")
            check_matryoshka_widths(self.matryoshka_widths, self.d_sae[0])
        elif self.matryoshka_widths:
            raise SaetuneError(f"matryoshka_widths {self.matryoshka_widths} is set, but architecture "
                               f"{self.architecture!r} has no nested prefixes; use 'matryoshka_batchtopk'")
        if self.skip_training and not self.init_from:
            raise SaetuneError("skip_training needs init_from (the pretrained SAE to evaluate and save)")
        if self.init_from and (len(self.hooks) > 1 or len(self.d_sae) > 1 or len(self.k) > 1):
            raise SaetuneError("init_from starts exactly one SAE: give one hook (its d_sae and k come from the "
                               "pretrained SAE)")


# ---- one SAE's training state ---------------------------------------------------------------

class SAETrainer:
    """One SAE, its optimiser and its dead-latent counter. ``step(x)`` → metrics dict."""

    def __init__(self, name: str, sae: SAE, cfg: TrainSAEConfig, device: str):
        self.name, self.sae, self.cfg = name, sae, cfg
        self.lr = cfg.lr or default_lr(cfg.optimizer, sae.d_sae)
        self.opt = build_optimizer(cfg.optimizer, sae.parameters(), self.lr, cfg.momentum)
        self.tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
        self.k_aux = cfg.auxk_k or sae.d_in // 2
        arch = sae.cfg.architecture
        self.renorm = cfg.normalize_decoder and arch in K_ARCHS
        self.dist = None  # saetune.distributed.Dist when several processes train (set by train_sae)

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(loss, metric tensors, fired-latent mask) for a batch x [B, d_in]: the architecture's loss from
        ``saetune.sae_losses`` (whose ops run Triton kernels on CUDA, plain torch elsewhere; SAETUNE_KERNELS
        forces), plus L0, the latents that fired and BatchTopK's inference threshold."""
        sae, cfg = self.sae, self.cfg
        arch, sc = sae.cfg.architecture, sae.cfg
        if arch == "topk":
            dead = self.dead_mask() if cfg.auxk_coef > 0 else None
            loss, terms, v, i = topk_loss(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sc.k, self._total_variance(x),
                                          dead, self.k_aux, cfg.auxk_coef)
            pos = (v.detach() > 0).to(torch.uint8)  # (B, k)
            l0 = pos.sum() / x.shape[0]
            fired = torch.zeros(sae.d_sae, dtype=torch.uint8, device=x.device).scatter_reduce_(
                0, i.reshape(-1), pos.reshape(-1), "amax").bool()
        else:
            pre = sae.pre_acts(x)
            if arch == "batchtopk":
                loss, terms, acts = batchtopk_loss(x, pre, sae.W_dec, sae.b_dec, sc.k)
            elif arch == "matryoshka_batchtopk":
                loss, terms, acts = matryoshka_batchtopk_loss(x, pre, sae.W_dec, sae.b_dec, sc.k, sc.matryoshka_widths)
            elif arch == "standard":
                loss, terms, acts = standard_loss(x, pre, sae.W_dec, sae.b_dec, sc.l1_coefficient)
            else:
                loss, terms, acts = jumprelu_loss(x, pre, sae.threshold, sae.W_dec, sae.b_dec, sc.l0_coefficient,
                                                  sc.jumprelu_bandwidth)
            if arch in BATCH_TOPK_ARCHS:
                update_batch_topk_threshold_(sae.threshold, acts)  # θ for inference
            l0 = l0_of(acts)
            fired = (acts > 0).any(0)
        return loss, {"l0": l0, **terms, "loss": loss}, fired

    def _total_variance(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_b ‖x_b − x̄‖² over the global batch (all ranks' rows), so FVU's denominator is the one-process one."""
        if self.dist is None or self.dist.world == 1:
            return total_variance(x)
        xd = x.detach().double()  # float64: Σ‖x‖² − N‖x̄‖² cancels digits in float32
        # [Σx (d), Σ‖x‖², N] summed over ranks; Σ‖x − x̄‖² = Σ‖x‖² − N‖x̄‖²
        t = torch.cat([xd.sum(0), xd.pow(2).sum().reshape(1), torch.tensor([float(x.shape[0])], device=x.device,
                                                                             dtype=torch.float64)])
        t = self.dist.all_reduce_(t, "sum")
        mean = t[:-2] / t[-1]
        return (t[-2] - t[-1] * mean.pow(2).sum()).float()

    def _sync_gradients(self) -> None:
        """Sum (topk: each rank's loss already carries the global denominator) or average the SAE's grads."""
        if self.dist is None or self.dist.world == 1:
            return
        op = "sum" if self.sae.cfg.architecture == "topk" else "mean"
        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        flat = self.dist.all_reduce_(torch.cat([g.reshape(-1) for g in grads]), op)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def step(self, x: torch.Tensor, autocast: torch.dtype | None) -> dict[str, torch.Tensor]:
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss, m, fired = self.loss(x)
        loss.backward()
        self._sync_gradients()
        # parallel-gradient removal, optimiser step, unit-norm decoder rows: one fused pass on CUDA
        sae_update(self.opt, self.sae, self.renorm)
        self.opt.zero_grad(set_to_none=True)
        if self.sae.cfg.architecture == "jumprelu":
            with torch.no_grad():
                self.sae.threshold.clamp_(min=1e-6)
        world = 1 if self.dist is None else self.dist.world
        if world > 1:
            fired = self.dist.all_reduce_(fired.to(torch.uint8), "max").bool()
            summed = ("fvu", "loss") if self.sae.cfg.architecture == "topk" else ()  # global denominators already
            m = {k: self.dist.all_reduce_(v.detach().float().clone(), "sum" if k in summed else "mean")
                 for k, v in m.items()}
        self.tokens_since_fired += x.shape[0] * world
        self.tokens_since_fired[fired] = 0
        m["dead_frac"] = self.dead_mask().float().mean()
        return {k: v.detach() for k, v in m.items()}

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr


# ---- helpers ------------------------------------------------------------------------------

def sae_specs(cfg: TrainSAEConfig, widths: dict[str, int]) -> list[tuple[str, str, int, int | None]]:
    """(name, hook, d_sae, k) for every SAE of the run; names are the hook when it is unique."""
    ks: list[int | None] = list(cfg.k) if cfg.architecture in K_ARCHS else [None]
    specs = []
    for hook in cfg.hooks:
        sizes = list(cfg.d_sae) or [cfg.expansion_factor * widths[hook]]
        combos = list(itertools.product(sizes, ks))
        for n, k in combos:
            name = hook if len(combos) == 1 else f"{hook}.w{n}" + (f".k{k}" if k is not None else "")
            specs.append((name, hook, n, k))
    return specs


def _initial_sae(cfg: TrainSAEConfig, sc: SAEConfig, hook: str) -> SAE:
    """The pretrained SAE of ``init_from``, checked against the run's shape (Resa's fine-tuned mode)."""
    sae = SAE.load(cfg.init_from, hook=cfg.init_hook or None)
    if sae.d_in != sc.d_in:
        raise SaetuneError(f"init_from SAE has d_in {sae.d_in}, but hook {hook!r} has width {sc.d_in}")
    if sae.cfg.architecture != sc.architecture:
        raise SaetuneError(f"init_from SAE is {sae.cfg.architecture!r}, this run trains {sc.architecture!r}")
    # Resa loads EleutherAI SAEs trained on layers.N.mlp into the block output model.layers.N
    warn_hook_mismatch("init_from SAE", sae.cfg.hook_name or cfg.init_hook, hook)
    sae.cfg.hook_name, sae.cfg.model_name = hook, cfg.model
    sae.train()
    return sae


# ---- the training step train_sae and fit_sae share ---------------------------------------------

def autocast_dtype(cfg: TrainSAEConfig, device: str) -> torch.dtype | None:
    """The SAE forward's autocast dtype: bfloat16 when asked, or on CUDA under ``auto`` (Resa); else none."""
    return torch.bfloat16 if (cfg.autocast == "bfloat16" or (cfg.autocast == "auto" and device != "cpu")) else None


def train_step(trainers: list[tuple[str, SAETrainer]], batch: dict[str, torch.Tensor], step: int,
               cfg: TrainSAEConfig, autocast: torch.dtype | None, dist=None,
               stopped: str = "training stopped") -> dict[str, torch.Tensor]:
    """Step ``step`` (0-based) of every SAE on ``batch`` (hook → [B, d_in]): the loop body of ``train_sae``
    and ``saetune.fit_sae``. Before the first step b_dec is set (``init_b_dec_``); adam's lr warms up
    linearly, lr·min(1, (step+1)/warmup_steps); each ``SAETrainer.step`` runs; a non-finite loss stops
    training with a SaetuneError that ends with ``stopped``. Returns the metrics, keyed
    ``<sae name>/<metric>`` when there are several SAEs."""
    if step == 0:
        init_b_dec_(trainers, batch, cfg.init_b_dec, dist)
    if cfg.optimizer == "adam" and cfg.warmup_steps:
        for _, t in trainers:
            t.set_lr(t.lr * min(1.0, (step + 1) / cfg.warmup_steps))
    row: dict[str, torch.Tensor] = {}
    for hook, t in trainers:
        m = t.step(batch[hook], autocast)
        if not torch.isfinite(m["loss"]):
            raise SaetuneError(f"non-finite loss ({m['loss'].item()}) for SAE {t.name!r} at step {step + 1}; "
                               f"{stopped} — lower the lr or check the activations")
        prefix = "" if len(trainers) == 1 else f"{t.name}/"
        row.update({prefix + k: v for k, v in m.items()})
    return row


def use_averaged_weights(trainers: list[tuple[str, SAETrainer]]) -> None:
    """Switch schedule-free optimisers to their averaged weights: what Resa saves and evaluates."""
    for _, t in trainers:
        if is_schedule_free(t.opt):
            t.opt.eval()


@torch.no_grad()
def init_b_dec_(trainers: list[tuple[str, SAETrainer]], batch: dict[str, torch.Tensor], how: str, dist=None) -> None:
    """Set every SAE's b_dec before its first step: the first global batch's mean (``mean``), zero, or
    leave it (``keep``). ``mean`` applies to SAEs loaded from ``init_from`` too: the reference's trainer
    (sparsify's ``Trainer.fit``) overwrites b_dec on its first step, re-centring an SAE trained elsewhere
    on this hook's activations while keeping its other weights. ``dist`` None = one process."""
    for hook, t in trainers:
        if how == "mean":
            mean = batch[hook].float().mean(0)
            t.sae.b_dec.copy_(mean if dist is None else dist.all_reduce_(mean, "mean"))  # equal slices: global mean
        elif how == "zero":
            t.sae.b_dec.zero_()


def b_dec_init_note(cfg: TrainSAEConfig) -> str:
    """How the saved SAE's b_dec started, for results.json and the manifest."""
    if cfg.skip_training:
        return "pretrained (no training)"
    if cfg.init_b_dec == "mean":
        return "first-batch mean (re-centred from the pretrained SAE)" if cfg.init_from else "first-batch mean"
    if cfg.init_b_dec == "keep":
        return "pretrained (kept)" if cfg.init_from else "as initialised (zero)"
    return "zero"


def check_world_size(cfg: TrainSAEConfig, world: int, resume: bool = False) -> None:
    """Refuse a process count that does not split every global batch evenly (new runs and resumes alike:
    a checkpoint holds the global-batch position, so any world size that divides the batch can resume it)."""
    if world <= 1:
        return
    what = "resume" if resume else "run"
    if cfg.batch_size % world:
        valid = [n for n in range(1, min(cfg.batch_size, 64) + 1) if cfg.batch_size % n == 0]
        raise SaetuneError(f"batch_size {cfg.batch_size} (the global batch) must divide evenly over {world} "
                           f"processes; {what} it on a process count that divides {cfg.batch_size} "
                           f"(e.g. {', '.join(map(str, valid))})")
    seqs, rem = divmod(cfg.batch_size, cfg.context_size)
    if not cfg.activations and seqs >= 1 and not rem and seqs % world:
        valid = [n for n in range(1, min(seqs, 64) + 1) if seqs % n == 0]
        raise SaetuneError(f"{seqs} sequences per batch (batch_size {cfg.batch_size} / context_size "
                           f"{cfg.context_size}) do not divide over {world} processes; {what} it on a process "
                           f"count that divides {seqs} (e.g. {', '.join(map(str, valid))})")


def check_store(cfg: TrainSAEConfig) -> None:
    """Refuse an activation store that cannot serve this run before the run dir is made, not after training:
    a hook it lacks, or a model it names (needed for the spliced-in evaluation) that cannot be found from here."""
    if not cfg.activations:
        return
    from .models import resolve_model_path
    store = ActivationStore(cfg.activations)
    for h in cfg.hooks:
        store._hook(h)
    if cfg.eval_seqs:
        try:
            resolve_model_path(store.model or cfg.model)
        except SaetuneError as e:
            raise SaetuneError(f"the activation store {cfg.activations!r} was made from model "
                               f"{store.manifest.get('model')!r}, which the evaluation after training (eval_seqs "
                               f"{cfg.eval_seqs}) needs, but it cannot be loaded: {e}; put the model back where the "
                               "store names it, or pass --eval-seqs 0 to train without that evaluation") from None


def checkpoints(run: RunDir, cfg: TrainSAEConfig) -> Checkpoints:
    """The run's ``checkpoints/step_NNNNNNN/`` (the newest ``cfg.keep_checkpoints`` kept): :class:`runs.Checkpoints`."""
    return Checkpoints(run, keep=cfg.keep_checkpoints)


def save_checkpoint(ckpts: Checkpoints, trainers: list[SAETrainer], step: int, tokens: int) -> None:
    """checkpoints/step_NNNNNNN/: ``<j>.sae.safetensors`` (SAE j's weights), ``<j>.optim.safetensors`` + ``.json``
    (its optimiser), ``state.safetensors`` (``<j>.tokens_since_fired`` and the RNG state), ``state.json`` (step,
    tokens, the SAE names); then latest.json (:meth:`runs.Checkpoints.save`)."""
    ckpts.save(step, {**{f"{j}.sae": t.sae.state_tensors() for j, t in enumerate(trainers)},
                      "state": {f"{j}.tokens_since_fired": t.tokens_since_fired for j, t in enumerate(trainers)}},
               {"tokens": tokens, "saes": [t.name for t in trainers]},
               optimizers={f"{j}.optim": t.opt for j, t in enumerate(trainers)}, rng=True)


def load_checkpoint(ckpts: Checkpoints, trainers: list[SAETrainer]) -> tuple[int, int]:
    """Restore the latest checkpoint into ``trainers``; returns (step, tokens), (0, 0) if none."""
    ck = ckpts.load()
    if ck is None:
        return 0, 0
    if ck.meta["saes"] != [t.name for t in trainers]:
        raise SaetuneError(f"checkpoint {str(ck.path)!r} holds SAEs {ck.meta['saes']}, this run has "
                           f"{[t.name for t in trainers]}")
    state = ck.tensors("state")
    for j, t in enumerate(trainers):
        t.sae._load_tensors(ck.tensors(f"{j}.sae"))
        ck.load_optimizer(t.opt, f"{j}.optim")
        t.tokens_since_fired.copy_(state[f"{j}.tokens_since_fired"])
    ck.restore_rng()
    return ck.step, int(ck.meta["tokens"])


# ---- the run: prepare → loop → finish ------------------------------------------------------------

@dataclass
class _TrainRun:
    """What ``train_sae``'s phases share: the run, the data, the SAEs and where training stands."""

    cfg: TrainSAEConfig
    dist: Any  # saetune.distributed.Dist
    run: Any  # RunDir on rank 0, FollowerRun elsewhere
    source: "_DataSource"
    trainers: list[tuple[str, SAETrainer]]
    ckpts: Checkpoints
    n_steps: int
    start: int
    tokens: int
    train_seconds: float = 0.0


def train_sae(cfg: TrainSAEConfig, out: str | Path | None = None, resume: bool = False,
              overwrite: bool = False) -> dict[str, Any]:
    """Train the SAEs of ``cfg`` into a run dir; returns the results (also in ``results.json``; ``{}`` on a
    rank other than 0). Phases: :func:`_prepare` (data, SAEs, the checkpoint to resume), :func:`_train_loop`
    (steps, metrics, checkpoints), :func:`_finish` (averaged weights, save, evaluate, results); ``with run:``
    records a failure, Ctrl-C or SIGTERM (:meth:`runs.RunDir.fail_with`)."""
    from .distributed import launched_world_size, start_run
    check_world_size(cfg, launched_world_size(), resume)  # before the run dir is touched
    check_store(cfg)
    dist, run = start_run(resolve_device(cfg.device), out, STAGE, cfg, resume=resume, overwrite=overwrite,
                          seed=cfg.seed, resume_ignore=("progress", "log_every"))
    with run:
        state = _prepare(cfg, dist, run, resume)
        _train_loop(state)
        return _finish(state)


def _prepare(cfg: TrainSAEConfig, dist, run, resume: bool) -> _TrainRun:
    """Load the data source, record the inputs, build every SAE and its trainer (fresh or from ``init_from``),
    restore the latest checkpoint when resuming and drop the metric rows past it."""
    device = dist.device
    with run.phase("load"):
        source = _DataSource(cfg, device, dist.rank, dist.world)
    run.add_input("model", source.model_path)
    if cfg.activations:
        run.add_input("activations", cfg.activations, digest=source.store_digest)
    trainers = []
    for j, (name, hook, n, k) in enumerate(sae_specs(cfg, source.widths)):
        sc = SAEConfig(d_in=source.widths[hook], d_sae=n, k=k, architecture=cfg.architecture,
                       l1_coefficient=cfg.l1_coefficient, l0_coefficient=cfg.l0_coefficient,
                       jumprelu_bandwidth=cfg.jumprelu_bandwidth, hook_name=hook, model_name=cfg.model,
                       matryoshka_widths=list(cfg.matryoshka_widths) or None)
        sae = _initial_sae(cfg, sc, hook) if cfg.init_from else SAE(sc, seed=cfg.seed + j)
        trainers.append((hook, SAETrainer(name, sae.to(device), cfg, device)))
        trainers[-1][1].dist = dist
    ckpts = checkpoints(run, cfg)
    start, tokens = load_checkpoint(ckpts, [t for _, t in trainers]) if resume else (0, 0)
    run.truncate_metrics(start)
    return _TrainRun(cfg, dist, run, source, trainers, ckpts, 0 if cfg.skip_training else source.n_steps, start,
                     tokens)


def _train_loop(st: _TrainRun) -> None:
    """Steps ``st.start`` … ``st.n_steps`` − 1: a metrics row every ``log_every`` steps and at the last, a
    checkpoint every ``checkpoint_every`` (rank 0 writes it, all ranks wait), the fault injection of the module
    docstring; sets ``st.tokens`` and ``st.train_seconds``."""
    from tqdm.auto import tqdm
    from .distributed import fault_step
    cfg, dist, run, start, n_steps = st.cfg, st.dist, st.run, st.start, st.n_steps
    trainers = st.trainers
    autocast = autocast_dtype(cfg, dist.device)
    bar = tqdm(total=n_steps, initial=start, desc="train-sae", unit="step", disable=not (cfg.progress and dist.is_main))
    t_train = time.perf_counter()
    last_ckpt = start
    die_at = fault_step(dist.rank)
    with run.phase("train"):
        for step, batch in enumerate(st.source.batches(start), start=start):
            if step >= n_steps:
                break
            if die_at == step + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            row = train_step(trainers, batch, step, cfg, autocast, dist,
                             stopped=f"training stopped, the last good checkpoint (step {last_ckpt}) is kept")
            st.tokens += cfg.batch_size
            done = step + 1
            if done % cfg.log_every == 0 or done == n_steps:
                elapsed = time.perf_counter() - t_train
                rec = {"step": done, "tokens": st.tokens, **{k: round(float(v), 6) for k, v in row.items()},
                       "tokens_per_s": round((done - start) * cfg.batch_size / max(elapsed, 1e-9), 1)}
                run.log(rec)
                bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k.endswith(("fvu", "l0"))})
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < n_steps:
                if dist.is_main:
                    save_checkpoint(st.ckpts, [t for _, t in trainers], done, st.tokens)
                dist.barrier()
                last_ckpt = done
            bar.update(1)
    bar.close()
    st.train_seconds = time.perf_counter() - t_train


def _finish(st: _TrainRun) -> dict[str, Any]:
    """Switch to the averaged weights; on rank 0 save every SAE, evaluate them, write ``results.json``, delete
    the checkpoints and finish the manifest; the other ranks wait for rank 0 and return ``{}``."""
    cfg, dist, run, trainers = st.cfg, st.dist, st.run, st.trainers
    use_averaged_weights(trainers)
    if not dist.is_main:
        dist.barrier()  # rank 0 saves and evaluates
        dist.end()
        return {}
    with run.phase("save"):
        for _, t in trainers:
            t.sae.eval()
            rel = "sae" if len(trainers) == 1 else f"sae/{t.name}"
            t.sae.cfg.model_name = record_path(st.source.model_path, run.path / rel, scope=run.path.parent)
            t.sae.save(run.path / rel, format=cfg.save_format)
            run.add_artifact(f"sae:{t.name}", rel)
    with run.phase("eval"):
        results = evaluate_saes(st.source, trainers, cfg)
    for r in results.values():
        r["train_tokens"] = st.tokens
        r["weights"] = "schedule-free averaged (optimizer.eval())" if cfg.optimizer == "signum_sf" else "final"
        r["b_dec_init"] = b_dec_init_note(cfg)
    atomic_write_json(run.path / "results.json", results)
    st.ckpts.clear()
    run.finish(results=results, train_seconds=round(st.train_seconds, 3), steps=st.n_steps)
    dist.barrier()
    dist.end()
    return results


class _DataSource:
    """Batches of activations: from a store, or computed on the fly from the model."""

    def __init__(self, cfg: TrainSAEConfig, device: str, rank: int = 0, world: int = 1):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.model = self.tok = None
        self.store_digest = None
        if cfg.activations:
            self.store = ActivationStore(cfg.activations)
            for h in cfg.hooks:
                self.store._hook(h)
            self.widths = {h: self.store.d(h) for h in cfg.hooks}
            self.model_path = self.store.model or cfg.model
            self.store_digest = ",".join(s["checksum"].split(":")[-1][:16] for s in self.store.shards[:4])
            total = self.store.n_batches(cfg.batch_size)
        else:
            self._load_model()
            seqs = cfg.batch_size // cfg.context_size
            if seqs < 1 or cfg.batch_size % cfg.context_size:
                raise SaetuneError(f"batch_size ({cfg.batch_size} tokens) must be a positive multiple of "
                                   f"context_size ({cfg.context_size}) when activations are computed on the fly")
            chunks = load_chunks(cfg, self.tok)
            if cfg.eval_seqs and chunks.shape[0] > cfg.eval_seqs * 2:  # hold out the last sequences
                self.eval_chunks, chunks = chunks[-cfg.eval_seqs:], chunks[:-cfg.eval_seqs]
            total = chunks.shape[0] // seqs
            if world > 1:  # each rank computes its own slice of every global batch (check_world_size: it divides)
                per = seqs // world
                chunks = chunks[:total * seqs].view(total, seqs, -1)[:, rank * per:(rank + 1) * per].reshape(-1, chunks.shape[1])
                seqs = per
            self.chunks = chunks
            self.seqs = seqs
        want = cfg.total_tokens // cfg.batch_size if cfg.total_tokens else total
        if want > total and rank == 0:
            import warnings
            warnings.warn(f"total_tokens {cfg.total_tokens:,} is more than the data holds: one pass is "
                          f"{total * cfg.batch_size:,} tokens ({total:,} batches of {cfg.batch_size:,}), and train-sae "
                          "trains one pass at most (epochs do not cycle); training stops there — add data (e.g. "
                          "max_examples) to train on more tokens", stacklevel=2)
        self.n_steps = min(total, want, cfg.max_steps or total)
        if self.n_steps < 1:
            raise SaetuneError(f"the data gives no full batch of {cfg.batch_size} tokens; add data, lower "
                               "batch_size, or raise total_tokens")

    def _load_model(self):
        from .models import load_model, model_width, resolve_hook
        if self.model is None:
            name = (self.store.model or self.cfg.model) if self.cfg.activations else self.cfg.model
            self.model, self.tok = load_model(name, dtype=self.cfg.model_dtype, device=self.device)
            self.model.requires_grad_(False)
            self.hps = {h: resolve_hook(self.model, h) for h in self.cfg.hooks}
            self.widths = {h: model_width(self.model, hp) for h, hp in self.hps.items()}
            self.model_path = name
        return self.model

    def batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from ``start`` on, produced ``cfg.prefetch`` ahead while the SAEs train."""
        depth = self.cfg.prefetch if self.cfg.prefetch >= 0 else (2 if str(self.device).startswith("cuda") else 0)
        return prefetch(self._batches(start), depth)

    def _batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.cfg
        if cfg.activations:
            per = cfg.batch_size // self.world  # this rank's rows of each global batch
            lo = self.rank * per
            for b in self.store.iter_batches(cfg.hooks, cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed,
                                             start_batch=start):
                yield {h: v[lo:lo + per].to(self.device) for h, v in b.items()}
        else:
            yield from stream_batches(self.model, self.chunks, list(self.hps.values()), self.seqs, start)

    def eval_data(self) -> torch.Tensor | None:
        """Held-out [N, T] token ids for the spliced-in metrics."""
        if not self.cfg.eval_seqs:
            return None
        if getattr(self, "eval_chunks", None) is not None:
            return self.eval_chunks
        # store-trained: fresh text from the same source (toy: a different seed)
        self._load_model()
        from dataclasses import replace
        cfg = replace(self.cfg, data_seed=self.cfg.data_seed + 1) if self.cfg.dataset == "toy" else self.cfg
        chunks = load_chunks(cfg, self.tok)
        return chunks[-self.cfg.eval_seqs:]


def _trainer_summaries(trainers: list[tuple[str, SAETrainer]]) -> dict[str, dict[str, Any]]:
    """Per SAE: its shape, hook and the training-time ``dead_frac`` (the start of :func:`evaluate_saes`'s record)."""
    return {t.name: {"dead_frac": round(float(t.dead_mask().float().mean()), 6), "d_sae": t.sae.d_sae,
                     "k": t.sae.cfg.k, "hook": hook, "architecture": t.sae.cfg.architecture}
            for hook, t in trainers}


def _add_dead_window(results: dict[str, dict[str, Any]], trainers: list[tuple[str, SAETrainer]],
                     cfg: TrainSAEConfig, train_tokens: int) -> None:
    """Whether the dead-latent window could trigger in ``train_tokens``, and the never-fired fraction."""
    for hook, t in trainers:
        r = results[t.name]
        r["dead_tokens"] = cfg.dead_tokens
        r["dead_window_could_trigger"] = train_tokens >= cfg.dead_tokens
        if not r["dead_window_could_trigger"]:
            r["note"] = (f"dead window could not trigger: dead_tokens={cfg.dead_tokens:,} > "
                         f"{train_tokens:,} training tokens, so dead_frac is 0 by construction; see frac_alive")
        silent = getattr(t, "tokens_since_fired", None)
        if silent is not None and train_tokens > 0:
            r["frac_never_fired_in_training"] = round(float((silent >= train_tokens).float().mean()), 6)


def _add_train_alive(results: dict[str, dict[str, Any]], source: _DataSource,
                     trainers: list[tuple[str, SAETrainer]], cfg: TrainSAEConfig, train_tokens: int) -> None:
    """``frac_alive_train``: latents firing at least once over (up to 2²² of) the store's training tokens."""
    from .sae_eval import fire_counts
    from .sae_quality import density_stats, feature_density
    counts, n = fire_counts({t.name: (hook, t.sae) for hook, t in trainers},
                            source.store.iter_batches(sorted({h for h, _ in trainers}), cfg.batch_size,
                                                      shuffle=cfg.shuffle, seed=cfg.seed),
                            max_tokens=min(train_tokens, 1 << 22))
    for name, c in counts.items():
        results[name]["frac_alive_train"] = round(density_stats(feature_density(c, n))["frac_alive"], 6)
        results[name]["n_alive_train_tokens"] = n


def _add_training_liveness(results: dict[str, dict[str, Any]], source: _DataSource,
                           trainers: list[tuple[str, SAETrainer]], cfg: TrainSAEConfig) -> None:
    """The liveness facts that need the run's config: the dead window, never-fired and store-trained alive."""
    train_tokens = (0 if cfg.skip_training else source.n_steps) * cfg.batch_size
    _add_dead_window(results, trainers, cfg, train_tokens)
    if getattr(source, "store", None) is not None and train_tokens > 0:
        _add_train_alive(results, source, trainers, cfg, train_tokens)


def _note_no_heldout(results: dict[str, dict[str, Any]]) -> None:
    """Append to each ``note`` that there was no held-out text, and which command measures the metrics."""
    for r in results.values():
        r["note"] = "; ".join(filter(None, [r.get("note"), "no held-out text (eval_seqs 0): `saetune eval-sae "
                                            "--sae RUN_DIR` measures ce_loss_score, kl_div_score, EV and alive"]))


def _add_core_eval(results: dict[str, dict[str, Any]], source: _DataSource, trainers: list[tuple[str, SAETrainer]],
                   ids_all: Any, batch_seqs: int) -> None:
    """SAEBench's core metrics on the held-out ``ids_all`` (:func:`saetune.sae_eval.core_eval`), merged in."""
    from .sae_eval import core_eval, special_ids
    from .sae_quality import SAEBENCH_SOURCE
    model = source._load_model()
    evaluated, _ = core_eval(model, [(t.name, source.hps[hook], t.sae) for hook, t in trainers], ids_all,
                             batch_seqs, special_ids(getattr(source, "tok", None)))
    for name, r in evaluated.items():
        results[name].update(r)
        results[name].update({"n_eval_tokens": int(ids_all.numel()), "batch_seqs": batch_seqs,
                              "definition": SAEBENCH_SOURCE})


@torch.no_grad()
def evaluate_saes(source: _DataSource, trainers: list[tuple[str, SAETrainer]], cfg: TrainSAEConfig,
                  batch_seqs: int = 8) -> dict[str, dict[str, Any]]:
    """Per SAE, with the weights as saved: SAEBench's core metrics on the held-out text and honest liveness.

    The metrics are ``saetune eval-sae``'s, from the same loop (:func:`saetune.sae_eval.core_eval`; definitions
    and the SAEBench version they follow in :mod:`saetune.sae_quality`): ``ce_loss_score`` (= ``ce_loss_recovered``,
    zero-ablation baseline), ``kl_div_score``, explained variance, FVU, L0, ``frac_alive`` (latents that fired at
    least once over the evaluation tokens) and the log10 firing-density histogram, with pad/eos/bos positions
    left out as SAEBench does. ``batch_seqs`` sequences per forward (also the batch of SAEBench's explained
    variance; 8 keeps the memory of the dense latents and three logit tensors as before).

    Liveness: ``dead_frac`` is the training-time counter (latents silent for the last ``dead_tokens`` tokens); when
    the run is shorter than that window it could not count anything, so ``dead_window_could_trigger`` is False and
    ``note`` says so. ``frac_never_fired_in_training`` counts latents silent for the whole run (the training weights,
    not the averaged ones). A store-trained run also gets ``frac_alive_train``: latents firing at least once over
    (up to 2²² of) its training tokens with the saved weights.
    """
    results = _trainer_summaries(trainers)
    if cfg is not None:
        _add_training_liveness(results, source, trainers, cfg)
    ids_all = source.eval_data()
    if ids_all is None:
        _note_no_heldout(results)
        return results
    _add_core_eval(results, source, trainers, ids_all, batch_seqs)
    return results
