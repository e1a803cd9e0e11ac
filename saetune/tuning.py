"""``saetune tune``: SAE-Tuning, Resa's Stage II (SPEC_RESA.md).

A frozen SAE replaces the target model's activation at one block; LoRA adapters learn to make
the model's outputs through that bottleneck match the model's own outputs without it::

    x̂      = SAE(x)                      x the block output; under no_grad (stop_grad, default)
    out    = x̂                           (error_term: x̂ + (x − x̂), the error carrying gradient)
    loss   = Σ_t KL(p_t ‖ q_t) / B       p: target, adapters off, SAE off (teacher, no grad)
                                          q: target, adapters on, SAE in (student)
    (loss "ce": mean next-token cross-entropy of the student instead)

AdamW (lr 1e-6, weight decay 0.01), grad-norm clip 1.0, constant lr, packed chunks, 2 epochs:
the reference code's settings. With the defaults (stop-gradient, no error term, LoRA B = 0 at
init) adapters in blocks up to the hook never receive gradient, so the student's blocks up to
the hook equal the teacher's. ``shared_prefix`` uses that: those blocks run once per step
(shared by teacher and student) and LoRA goes only on the blocks after the hook. Any setting
that lets gradient reach the earlier blocks switches it off. The KL is computed a block of
positions at a time from the final hidden states (``saetune.distill``), never as two full fp32
logit tensors; in fp32 by default, more exact than the reference's bf16 (``kl_dtype`` bfloat16
reproduces that).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from .config import opt
from .data import DataConfig, load_chunks
from .distill import ce_from_hidden, kl_from_hidden
from .distributed import Dist, fault_step, launched_world_size, start_run
from .errors import SaetuneError
from .io import atomic_replace_dir, atomic_write_json, atomic_write_text
from .metrics import fvu as fvu_of
from .models import (LORA_TARGETS, HookPoint, StopForward, decoder_layers, first_tensor, load_model, model_width,
                     resolve_device, resolve_hook)
from .runs import Checkpoint, Checkpoints, RunDir, record_path

STAGE = "tune"


@dataclass
class TuneConfig(DataConfig):
    """``saetune tune``: SAE-Tuning (Resa Stage II) — LoRA through a frozen SAE bottleneck."""

    model: str = opt("toy", "target model: 'toy', a local HF dir, or a hub id")
    sae: str = opt("", "the frozen SAE: an SAE dir (SAELens or sparsify layout), a multi-hook dir (with "
                       "sae_hook), or a `saetune train-sae` run dir; empty = no SAE (plain LoRA fine-tuning "
                       "with loss 'ce', the no-SAE control)")
    sae_hook: str = opt("", "which SAE of a multi-hook dir to load (e.g. model.layers.12)")
    hook: str = opt("", "hook point whose output the SAE replaces (default: the SAE's own hook name)")
    loss: Literal["kl", "ce"] = opt("kl", "'kl': KL(target without SAE ‖ target with SAE and adapters), summed "
                                          "over positions (Resa's code); 'ce': next-token cross-entropy (the paper's "
                                          "prose: SFT)")
    stop_grad: bool = opt(True, "compute the SAE reconstruction without gradient (Resa): only blocks after the "
                                "hook learn")
    error_term: bool = opt(False, "add the SAE error x − x̂ back, with gradient (the bottleneck then passes x)")
    lora_r: int = opt(32, "LoRA rank")
    lora_alpha: int = opt(128, "LoRA alpha")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    target_modules: list[str] = opt(None, "module names that get LoRA (Resa: all seven projections)",
                                    factory=lambda: list(LORA_TARGETS))
    lr: float = opt(1e-6, "AdamW learning rate (Resa: 1e-6)")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = off)")
    lr_schedule: Literal["constant", "cosine", "linear"] = opt("constant", "lr schedule after warm-up (Resa's "
                                                                         "code: constant; its paper: cosine)")
    warmup_steps: int = opt(0, "linear lr warm-up steps")
    epochs: int = opt(2, "passes over the packed data")
    batch_size: int = opt(1, "sequences per process and step (Resa: 1 per GPU); 0 = global_batch ÷ processes")
    global_batch: int = opt(0, "sequences per step over all processes (Resa: 1 per GPU × 2 GPUs = 2); when set, "
                               "processes × batch_size must equal it (a mismatch is refused); 0 = not checked")
    max_steps: int = opt(0, "stop after this many steps (0 = all epochs)")
    shuffle: bool = opt(False, "shuffle the chunks each epoch (seeded)")
    model_dtype: str = opt("float32", "dtype of the target model and the SAE (Resa: bfloat16)")
    device: str = opt("auto", "'auto' (cuda if present), 'cpu' or 'cuda'")
    shared_prefix: bool = opt(True, "run the blocks up to the hook once for teacher and student and put LoRA only "
                                    "after the hook — exact with stop_grad and no error term, switched off otherwise")
    kl_chunk: int = opt(1024, "positions per block when forming logits for the loss")
    kl_dtype: Literal["float32", "bfloat16"] = opt("float32", "dtype of the logits, softmaxes and KL: float32 (more "
                                                              "exact) or bfloat16 (as the reference's bf16 stack "
                                                              "computes them)")
    eval_seqs: int = opt(8, "held-out chunks (the last ones, never trained on) on which the loss is measured "
                            "before and after tuning; 0 = none")
    seed: int = opt(0, "seed of LoRA init, dropout and shuffling")
    gpu_hour_usd: float = opt(1.0, "price of one GPU-hour for the cost estimate (Resa's costing: about $1)")
    log_every: int = opt(10, "log metrics every N steps")
    checkpoint_every: int = opt(500, "write a resumable checkpoint every N steps (Resa: 500; 0 = only at the end)")
    keep_checkpoints: int = opt(2, "how many checkpoints to keep")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self):
        if not self.sae and self.loss != "ce":
            raise SaetuneError("loss 'kl' needs an SAE (sae: an SAE dir or a train-sae run dir): without one the "
                               "student is the teacher; for plain LoRA fine-tuning (a control) use loss 'ce'")
        if self.loss not in ("kl", "ce"):
            raise SaetuneError(f"unknown loss {self.loss!r}; valid: kl, ce")
        for name in ("lora_r", "lora_alpha", "epochs", "kl_chunk", "log_every"):
            if getattr(self, name) < 1:
                raise SaetuneError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "max_steps", "eval_seqs", "checkpoint_every",
                     "keep_checkpoints", "gpu_hour_usd", "max_examples", "global_batch"):
            if not getattr(self, name) >= 0:  # `not >=`: NaN fails too
                raise SaetuneError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.batch_size < 0 or (self.batch_size == 0 and not self.global_batch):
            raise SaetuneError(f"batch_size must be at least 1 (0 only with global_batch, which it is then derived "
                               f"from), got {self.batch_size}")
        if self.kl_dtype not in ("float32", "bfloat16"):
            raise SaetuneError(f"unknown kl_dtype {self.kl_dtype!r}; valid: float32, bfloat16")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SaetuneError(f"lr must be a positive number (Resa: 1e-6), got {self.lr}")
        if not 0 <= self.lora_dropout < 1:
            raise SaetuneError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.context_size < 2:
            raise SaetuneError(f"context_size must be at least 2 (a next-token loss needs two positions), got "
                               f"{self.context_size}")
        if not self.target_modules:
            raise SaetuneError("target_modules is empty; name the modules that get LoRA (e.g. q_proj v_proj)")

    @property
    def exact_prefix(self) -> bool:
        """Whether blocks up to the hook provably equal the teacher's (the shared-prefix saving)."""
        return bool(self.sae) and self.shared_prefix and self.stop_grad and not self.error_term


# ---- pure pieces ------------------------------------------------------------------------------

def lr_at(step: int, total: int, base: float, schedule: str, warmup: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then constant / cosine / linear decay to 0."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * frac))
    if schedule == "linear":
        return base * (1 - frac)
    raise SaetuneError(f"unknown lr_schedule {schedule!r}; valid: constant, cosine, linear")


def epoch_order(n: int, epoch: int, shuffle: bool, seed: int) -> torch.Tensor:
    """Chunk order of one epoch: 0…n−1, or a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def bottleneck(sae: nn.Module, stop_grad: bool, error_term: bool,
               stash: dict | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The hook function: ``x ↦ x̂`` (or ``x̂ + (x − x̂)``), x̂ computed in the SAE's dtype.

    ``stash`` (if given) receives the last ``x`` and ``x̂`` (detached) for the FVU metric.
    """
    def fn(x: torch.Tensor) -> torch.Tensor:
        dtype = next(sae.parameters()).dtype
        with torch.no_grad() if stop_grad else contextlib.nullcontext():
            x_hat = sae(x.to(dtype)).to(x.dtype)
        if stash is not None:
            stash["x"], stash["x_hat"] = x.detach(), x_hat.detach()
        if error_term:
            x_hat = x_hat + (x - x_hat.detach() if stop_grad else x - x_hat)
        return x_hat
    return fn


class _Skip(nn.Module):
    """Stands in for a decoder block whose output is already known: returns ``value`` (or its input)."""

    def __init__(self, orig: nn.Module, value: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.__dict__["_orig"] = orig  # not a submodule: parameters stay where they are
        self.value, self.as_tuple = value, as_tuple

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_orig"], name)  # e.g. a block's attention_type

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.value is None else self.value
        return (out,) if self.as_tuple else out


@contextlib.contextmanager
def skip_prefix(layers: nn.ModuleList, last: int, value: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Within the block, blocks 0…``last`` do nothing and block ``last`` outputs ``value``."""
    saved = [layers[i] for i in range(last + 1)]
    try:
        for i in range(last + 1):
            layers[i] = _Skip(saved[i], value if i == last else None, as_tuple)
        yield
    finally:
        for i, m in enumerate(saved):
            layers[i] = m


def prefix_output(model: nn.Module, layers: nn.ModuleList, last: int, ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Output of block ``last`` for ``ids`` (no grad; the forward stops there) and whether blocks return tuples."""
    box: dict[str, Any] = {}

    def hook(mod, args, out):
        box["h"], box["tuple"] = first_tensor(out), isinstance(out, tuple)
        raise StopForward

    handle = layers[last].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return box["h"], box["tuple"]


def check_logit_head(model: nn.Module) -> None:
    """The chunked loss forms logits as h·Wᵀ + b; refuse models whose logits are post-processed."""
    cfg = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        v = getattr(cfg, key, None)
        if v not in (None, 1, 1.0):
            raise SaetuneError(f"model config has {key}={v}: its logits are not h·Wᵀ + b, which the chunked "
                               "SAE-Tuning loss assumes; this architecture is not supported yet")


# ---- the model under tuning ---------------------------------------------------------------------

class SAETuner:
    """Target model + frozen SAE + LoRA; ``loss(ids)`` → (loss, metrics) for one batch."""

    def __init__(self, cfg: TuneConfig, device: str):
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = load_model(cfg.model, dtype=cfg.model_dtype, device=device)
        check_logit_head(self.model)
        self.sae, self.hp = None, None
        if cfg.sae:
            self._load_sae(cfg, device)
        prefix, self.layers = decoder_layers(self.model)
        n_layers = len(self.layers)
        self.exact = cfg.exact_prefix and self.hp is not None and self.hp.site == "block"
        layers = list(range(self.hp.layer + 1, n_layers)) if self.exact else None
        if layers is not None and not layers:
            raise SaetuneError(f"hook {self.hp.name} is the last block: no block after it could learn; hook an "
                               "earlier block")
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
                          layers_to_transform=layers, layers_pattern=prefix.split(".")[-1] if layers else None)
        try:
            self.peft = get_peft_model(self.model, lora)
        except ValueError as e:
            linear = sorted({n.split(".")[-1] for n, m in self.model.named_modules() if isinstance(m, nn.Linear)})
            raise SaetuneError(f"LoRA target_modules {cfg.target_modules} do not fit this model ({e}); its linear "
                               f"modules are named: {', '.join(linear)}") from None
        self.lora_layers = layers if layers is not None else list(range(n_layers))
        self.decoder = self.model.get_decoder()
        self.stash: dict[str, torch.Tensor] = {}
        self.fn = bottleneck(self.sae, cfg.stop_grad, cfg.error_term, self.stash) if self.sae is not None else None

    def _load_sae(self, cfg: TuneConfig, device: str) -> None:
        from .sae import SAE, warn_hook_mismatch
        self.sae = SAE.load(cfg.sae, hook=cfg.sae_hook or None, device=device)
        hook = cfg.hook or self.sae.cfg.hook_name or cfg.sae_hook
        if not hook:
            raise SaetuneError(f"the SAE in {cfg.sae!r} names no hook point; pass hook (e.g. model.layers.12)")
        self.hp: HookPoint = resolve_hook(self.model, hook)
        width = model_width(self.model, self.hp)
        if self.sae.d_in != width:
            raise SaetuneError(f"SAE width d_in={self.sae.d_in} does not match the target model's width {width} at "
                               f"{self.hp.name}; train the SAE on a model of the same width or pick another SAE")
        warn_hook_mismatch("the SAE", self.sae.cfg.hook_name or cfg.sae_hook, self.hp.name, self.model)
        self.sae.to(self.model.dtype).requires_grad_(False).eval()

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.peft.parameters() if p.requires_grad]

    def hidden(self, ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Final hidden states of teacher (None for loss 'ce') and student, (B, T, D) each."""
        need_teacher = self.cfg.loss == "kl"
        h_t = None
        if self.exact:
            with self.peft.disable_adapter():
                x, as_tuple = prefix_output(self.model, self.layers, self.hp.layer, ids)
                if need_teacher:
                    with torch.no_grad(), skip_prefix(self.layers, self.hp.layer, x, as_tuple):
                        h_t = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
            with skip_prefix(self.layers, self.hp.layer, self.fn(x), as_tuple):
                h_s = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
            return h_t, h_s
        from .models import replace_activation
        if self.sae is None:
            return None, self.decoder(input_ids=ids, use_cache=False).last_hidden_state
        if need_teacher:
            with torch.no_grad(), self.peft.disable_adapter():
                h_t = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
        with replace_activation(self.model, self.hp, self.fn):
            h_s = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
        return h_t, h_s

    @torch.no_grad()
    def eval_loss(self, chunks: torch.Tensor, device: str, forward: Callable | None = None) -> float:
        """Mean per-sequence loss on ``chunks`` with dropout off (the held-out measurement); ``forward``: the
        loss through the data-parallel wrapper (every rank must then call this), default :meth:`loss`."""
        forward = forward or self.loss
        was_training = self.peft.training
        self.peft.eval()
        try:
            bs = self.cfg.batch_size
            total = sum(forward(chunks[i:i + bs].to(device))[0].item() * len(chunks[i:i + bs])
                        for i in range(0, len(chunks), bs))
        finally:
            self.peft.train(was_training)
        return total / len(chunks)

    def loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        B, T = ids.shape
        h_t, h_s = self.hidden(ids)
        head = self.model.get_output_embeddings()  # read now: under FSDP the weight is whole only within forward
        head_w, head_b = head.weight, getattr(head, "bias", None)
        if self.cfg.loss == "kl":
            kl = kl_from_hidden(h_t, h_s, head_w, head_b, self.cfg.kl_chunk, dtype=getattr(torch, self.cfg.kl_dtype))
            loss = kl / B  # kl_div(..., reduction="batchmean") on (B, T, V): per-sequence sum
            m = {"kl": loss.item(), "kl_per_token": kl.item() / (B * T)}
        else:
            loss = ce_from_hidden(h_s[:, :-1], ids[:, 1:], head_w, head_b, self.cfg.kl_chunk) / (B * (T - 1))
            m = {"ce": loss.item()}
        if self.sae is None:
            return loss, m
        x, x_hat = self.stash["x"], self.stash["x_hat"]
        m["fvu"] = fvu_of(x.reshape(-1, x.shape[-1]).float(), x_hat.reshape(-1, x.shape[-1]).float()).item()
        return loss, m


# ---- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(ckpts: Checkpoints, tuner: SAETuner, opt: torch.optim.Optimizer, dist: Dist, step: int,
                    tokens: int) -> None:
    """``checkpoints/step_NNNNNNN/``: ``adapter.safetensors``, ``optim.*`` (the layout one process writes), RNG and
    ``state.json`` (step, tokens, global batch); see :class:`saetune.runs.Checkpoints`.

    Every rank calls it (sharded adapter and optimizer state are gathered whole); rank 0 writes.
    """
    from peft import get_peft_model_state_dict
    adapter = get_peft_model_state_dict(tuner.peft, state_dict=dist.full_params(tuner.peft))
    optim = dist.full_optimizer_state(opt, tuner.trainable())
    if not dist.is_main:
        return
    ckpts.save(step, {"adapter": {k: v.contiguous() for k, v in adapter.items()}},
               {"tokens": tokens, "global_batch": tuner.cfg.batch_size * dist.world}, optimizers={"optim": optim},
               rng=True)


def per_process_batch(cfg: TuneConfig, world: int) -> int:
    """Sequences each of ``world`` processes takes per step: ``batch_size``, or ``global_batch ÷ world``
    when ``batch_size`` is 0.

    The global batch sets the step count and the effective learning rate, so a recipe that
    reproduces the paper fixes it (``global_batch: 2``, the reference's 1 per GPU × 2 GPUs) and a
    launch whose ``world × batch_size`` gives another is refused with the ``--batch-size`` that keeps
    it. Runs before the run dir is opened.
    """
    if not cfg.global_batch:
        return cfg.batch_size
    if cfg.batch_size * world == cfg.global_batch:
        return cfg.batch_size
    if cfg.global_batch % world:
        raise SaetuneError(f"global_batch {cfg.global_batch} does not divide over {world} processes; launch a "
                           f"process count that divides {cfg.global_batch}, or change --global-batch on purpose")
    keep = cfg.global_batch // world
    if cfg.batch_size == 0:
        return keep
    raise SaetuneError(f"{world} processes × batch_size {cfg.batch_size} make a global batch of "
                       f"{world * cfg.batch_size} sequences, but this config's global_batch is {cfg.global_batch}: "
                       f"pass --batch-size {keep} (or 0 to derive it), or --global-batch {world * cfg.batch_size} to "
                       "change the global batch on purpose")


def check_resume_global_batch(out: str | Path, cfg: TuneConfig, world: int) -> None:
    """Refuse a resume whose ``world × batch_size`` differs from its checkpoint's global batch.

    A checkpoint's step counts global batches of the data order, so another global batch would
    silently train on other data with another effective learning rate; another process count is
    fine when ``batch_size`` keeps the product. Runs before the run dir is opened: a refused
    resume changes nothing in it.
    """
    from .runs import LOCK
    if (Path(out) / LOCK).exists():
        RunDir._check_lock(Path(out) / LOCK)  # a live run's dir: that comes first
    ck = Checkpoints(out).load()
    if ck is None:
        return
    meta = ck.meta
    saved = meta.get("global_batch") or meta["tokens"] // (meta["step"] * cfg.context_size)  # older checkpoints
    now = world * cfg.batch_size
    if saved != now:
        fix = (f"resume with --batch-size {saved // world}" if saved % world == 0
               else f"resume on a process count that divides {saved}")
        raise SaetuneError(f"cannot resume {str(out)!r} with a global batch of {now} sequences ({world} processes × "
                           f"batch_size {cfg.batch_size}): its checkpoint (step {meta['step']}) was trained with a "
                           f"global batch of {saved}; {fix}")


def load_checkpoint(ck: Checkpoint, tuner: SAETuner) -> tuple[int, int]:
    """Restore adapter and RNG from checkpoint ``ck`` (before the model is wrapped); returns (step, tokens).
    The optimizer state follows once it is wrapped: :func:`load_optimizer_state`."""
    from peft import set_peft_model_state_dict
    set_peft_model_state_dict(tuner.peft, ck.tensors("adapter"))
    ck.restore_rng()
    return ck.step, int(ck.meta["tokens"])


def load_optimizer_state(ck: Checkpoint, opt: torch.optim.Optimizer, params: list[nn.Parameter], dist: Dist) -> None:
    """The optimizer state of checkpoint ``ck`` into ``opt`` as wrapped (sharded under FSDP / ZeRO)."""
    from types import SimpleNamespace
    ck.load_optimizer(SimpleNamespace(load_state_dict=lambda sd: dist.load_full_optimizer_state(opt, params, sd)))


# ---- the run -----------------------------------------------------------------------------------

class _Step(nn.Module):
    """The tuner's loss as a module, so DDP / FSDP / DeepSpeed wrap one forward (their gradient hooks need it).

    Under FSDP2 this is the root unit (embeddings, final norm and output head, all whole during its
    forward, where the loss uses the head) and each decoder block (``_no_split_modules``) its own
    unit; the frozen SAE is no submodule, so every rank holds it whole.
    """

    def __init__(self, tuner: SAETuner):
        super().__init__()
        self.peft = tuner.peft
        self.__dict__["tuner"] = tuner
        self._no_split_modules = list(getattr(tuner.model, "_no_split_modules", None) or [])

    def forward(self, ids: torch.Tensor):
        return self.tuner.loss(ids)


@dataclass
class _TuneRun:
    """What :func:`_prepare` sets up and the loop and :func:`_finish` work on."""

    cfg: TuneConfig
    dist: Dist
    run: Any  # RunDir on rank 0, FollowerRun elsewhere
    tuner: SAETuner
    chunks: torch.Tensor  # (N, T) training chunks
    held: torch.Tensor  # (H, T) held-out chunks
    per_epoch: int
    total: int
    opt: torch.optim.Optimizer
    step_fn: Callable
    opt_w: Any  # the optimizer as the engine wrapped it
    params: list[nn.Parameter]
    ckpts: Checkpoints
    start: int = 0
    tokens: int = 0
    first_loss: float | None = None
    train_seconds: float = 0.0

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.dist.world


def tune(cfg: TuneConfig, out: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """SAE-Tune ``cfg.model`` through ``cfg.sae`` into a run dir (``adapter/`` in peft layout).

    Returns the results (also in ``results.json``): losses, FVU inside the target, tokens/s,
    and the run's wall time and cost. Under ``torchrun`` / ``accelerate launch`` each process
    takes its slice of a ``world × batch_size`` global batch (DDP, or DeepSpeed as accelerate is
    configured); rank 0 writes the run dir, and ``out`` must be given.
    """
    from dataclasses import replace
    batch_size = per_process_batch(cfg, launched_world_size())  # refused before the run dir is touched
    if resume and out is not None:
        check_resume_global_batch(out, replace(cfg, batch_size=batch_size), launched_world_size())
    # batch_size may change on resume when the process count does (the global batch is checked above)
    dist, run = start_run(resolve_device(cfg.device), out, STAGE, cfg, resume=resume, overwrite=overwrite,
                          seed=cfg.seed, resume_ignore=("progress", "log_every", "batch_size"),
                          gpu_hour_usd=cfg.gpu_hour_usd)
    cfg = replace(cfg, batch_size=batch_size)  # config.yaml keeps the batch_size as given (0: derived again on resume)
    with run:  # failure, Ctrl-C and SIGTERM (torchrun's, to the survivors when a rank dies) are recorded
        st = _prepare(cfg, dist, run, resume)
        _train_loop(st)
        return _finish(st)


def _prepare(cfg: TuneConfig, dist: Dist, run: Any, resume: bool) -> _TuneRun:
    """Load the tuner and data, size the run, restore the latest checkpoint (on resume), wrap the model for the
    engine and measure the held-out loss before training."""
    device = dist.device
    with run.phase("load"):
        tuner = SAETuner(cfg, device)
        chunks = load_chunks(cfg, tuner.tokenizer)  # (N, T)
        held = chunks[-cfg.eval_seqs:] if 0 < cfg.eval_seqs < chunks.shape[0] else chunks[:0]
        chunks = chunks[:chunks.shape[0] - held.shape[0]]
    run.add_input("model", tuner.model.name_or_path)
    if cfg.sae:
        run.add_input("sae", cfg.sae)
    global_batch = cfg.batch_size * dist.world
    run.manifest["global_batch"] = global_batch
    per_epoch = chunks.shape[0] // global_batch
    if per_epoch == 0:
        raise SaetuneError(f"the data packs into {chunks.shape[0]} chunks of {cfg.context_size} tokens, fewer "
                           f"than one global batch of {global_batch} ({dist.world} processes × batch_size "
                           f"{cfg.batch_size}); add data or lower batch_size/context_size")
    total = per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    opt = torch.optim.AdamW(tuner.trainable(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpts = Checkpoints(run, keep=cfg.keep_checkpoints)
    ckpt = ckpts.load() if resume else None
    start, tokens = load_checkpoint(ckpt, tuner) if ckpt else (0, 0)
    step_fn, opt_w = dist.prepare(_Step(tuner), opt, cfg.batch_size, cfg.grad_clip)
    params = tuner.trainable()  # after prepare: FSDP has replaced them by their shards
    run.manifest["engine"] = dist.engine
    if ckpt:
        load_optimizer_state(ckpt, opt, params, dist)
    run.truncate_metrics(start)
    if dist.broadcast_object(len(held) > 0 and "eval_loss_before" not in run.manifest):
        with run.phase("eval"):  # on every rank: a sharded model's forward is a collective
            run.manifest["eval_loss_before"] = tuner.eval_loss(held, device, step_fn)
        run.write_manifest()
    tuner.peft.train()
    if tuner.sae is not None:
        tuner.sae.eval()
    return _TuneRun(cfg, dist, run, tuner, chunks, held, per_epoch, total, opt, step_fn, opt_w, params, ckpts,
                    start, tokens)


def _batch(st: _TuneRun, step: int) -> torch.Tensor:
    """This process's sequences of global step ``step``: its slice of the epoch's (seeded) order."""
    cfg = st.cfg
    epoch, j = divmod(step, st.per_epoch)
    order = epoch_order(st.chunks.shape[0], epoch, cfg.shuffle, cfg.seed)
    lo = j * st.global_batch + st.dist.rank * cfg.batch_size
    return st.chunks[order[lo:lo + cfg.batch_size]].to(st.dist.device)


def _train_step(st: _TuneRun, step: int) -> dict[str, float]:
    """One optimizer step at 0-based ``step``; its metrics (loss, grad norm, lr and the tuner's own)."""
    cfg, dist = st.cfg, st.dist
    ids = _batch(st, step)
    lr = lr_at(step, st.total, cfg.lr, cfg.lr_schedule, cfg.warmup_steps)
    for g in st.opt.param_groups:
        g["lr"] = lr
    loss, m = st.step_fn(ids)
    if not torch.isfinite(loss):
        raise SaetuneError(f"non-finite loss ({loss.item()}) at step {step + 1}; the last checkpoint is "
                           "kept — lower lr or check the SAE")
    st.opt_w.zero_grad(set_to_none=True)
    dist.backward(loss)
    gn = dist.clip_grad_norm(st.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    st.opt_w.step()
    st.tokens += st.global_batch * st.chunks.shape[1]
    m.update(loss=loss.item(), grad_norm=float("nan") if gn is None else float(gn), lr=lr)
    return m


def _train_loop(st: _TuneRun) -> None:
    """Steps ``start`` … ``total − 1``: a metrics row every ``log_every`` (means over the window, over every
    process), a checkpoint every ``checkpoint_every``."""
    from tqdm.auto import tqdm
    cfg, dist, run = st.cfg, st.dist, st.run
    bar = tqdm(total=st.total, initial=st.start, desc="tune", unit="step",
               disable=not (cfg.progress and dist.is_main))
    window: list[dict[str, float]] = []
    t0 = time.perf_counter()
    die_at = fault_step(dist.rank)  # None unless a test injects a crash
    with run.phase("train"):
        for step in range(st.start, st.total):
            if die_at == step + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            m = _train_step(st, step)
            st.first_loss = m["loss"] if st.first_loss is None and step == 0 else st.first_loss
            window.append(m)
            done = step + 1
            if done % cfg.log_every == 0 or done == st.total:
                elapsed = time.perf_counter() - t0
                last = dist.mean({k: sum(w[k] for w in window) / len(window) for k in window[0]})
                run.log({"step": done, "tokens": st.tokens, "epoch": step // st.per_epoch,
                         **{k: round(v, 6) for k, v in last.items()},
                         "tokens_per_s": round((done - st.start) * st.global_batch * st.chunks.shape[1]
                                               / max(elapsed, 1e-9), 1)})
                bar.set_postfix(loss=f"{last['loss']:.4g}")
                window = []
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < st.total:
                save_checkpoint(st.ckpts, st.tuner, st.opt, dist, done, st.tokens)
                dist.barrier()
            bar.update(1)
    bar.close()
    st.train_seconds = time.perf_counter() - t0


def _save_adapter(st: _TuneRun, adapter: dict[str, torch.Tensor]) -> str:
    """``adapter/`` in peft layout, its base model recorded for any cwd and a moved pipeline; its hash."""
    run = st.run
    tmp = run.path / ".tmp-adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    st.tuner.peft.save_pretrained(str(tmp), state_dict=adapter)
    # peft names the base as it was given (relative to this cwd): record it for any cwd, and a moved pipeline
    conf = json.loads((tmp / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = record_path(conf.get("base_model_name_or_path") or st.cfg.model,
                                                  run.path / "adapter", scope=run.path.parent)
    atomic_write_text(tmp / "adapter_config.json", json.dumps(conf, indent=2))
    atomic_replace_dir(tmp, run.path / "adapter")
    return run.add_artifact("adapter", "adapter")


def _finish(st: _TuneRun) -> dict:
    """Held-out loss after training, ``adapter/``, ``results.json``; the run marked complete (rank 0)."""
    cfg, dist, run, tuner = st.cfg, st.dist, st.run, st.tuner
    adapter = dist.full_params(tuner.peft)  # every rank: whole tensors from shards
    eval_after = None
    if len(st.held):
        with run.phase("eval"):
            eval_after = tuner.eval_loss(st.held, dist.device, st.step_fn)
    if not dist.is_main:
        dist.barrier()  # rank 0 saves
        dist.end()
        return {}
    with run.phase("save"):
        adapter_hash = _save_adapter(st, adapter)
    rows = run.metrics()
    results = {
        "hook": tuner.hp.name if tuner.hp else None, "sae_d_sae": tuner.sae.d_sae if tuner.sae else None,
        "sae_k": tuner.sae.cfg.k if tuner.sae else None, "loss": cfg.loss, "world_size": dist.world,
        "steps": st.total, "tokens": st.tokens, "first_loss": st.first_loss if st.first_loss is not None else (
            rows[0]["loss"] if rows else None),
        "final_loss": rows[-1]["loss"] if rows else None, "final_fvu": rows[-1].get("fvu") if rows else None,
        "eval_seqs": len(st.held), "eval_loss_before": run.manifest.get("eval_loss_before"),
        "eval_loss_after": eval_after,
        "tokens_per_s": round((st.total - st.start) * st.global_batch * st.chunks.shape[1]
                              / max(st.train_seconds, 1e-9), 1),
        "shared_prefix": tuner.exact, "lora_layers": tuner.lora_layers,
        "trainable_params": sum(p.numel() for p in st.params), "adapter_sha256": adapter_hash,
        "sae_sha256": run.manifest["inputs"]["sae"]["sha256"] if cfg.sae else None,
    }
    atomic_write_json(run.path / "results.json", results)
    st.ckpts.clear()
    run.finish(results=results, train_seconds=round(st.train_seconds, 3), steps=st.total)
    dist.barrier()
    dist.end()
    results["wall_seconds"] = run.manifest["wall_seconds"]
    results["estimated_cost_usd"] = run.manifest["estimated_cost_usd"]
    what = "SAE-Tuning" if cfg.sae else "LoRA fine-tuning (no SAE)"
    print(f"{what}: {run.manifest['wall_seconds'] / 60:.1f} minutes, ${run.manifest['estimated_cost_usd']:.2f} "
          f"({run.manifest['gpu_hours']:.3f} GPU-hours)")
    return results
