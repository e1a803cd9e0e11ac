"""``saetune.fit_sae``: train an SAE on activations already in memory, with train-sae's trainer.

    sae, metrics = fit_sae(acts, SAEConfig(d_in=64, d_sae=512, k=8), batch_size=256, max_steps=500)

``data`` is a [N, d_in] tensor (or numpy array) or an iterable of [B, d_in] batches. Every step is
``saetune.sae_trainer.train_step`` — the loop body ``train_sae`` runs: b_dec set to the first batch's
mean, adam's lr warm-up, ``SAETrainer.step`` (each architecture's loss through the
``saetune.kernels`` ops, AuxK, the optimiser with decoder upkeep) and the non-finite stop; at the
end a schedule-free optimiser switches to its averaged weights, as train-sae saves them.

Options are ``TrainSAEConfig`` fields (``FIT_OPTIONS``) with their train-sae defaults, plus
``holdout`` (fraction of a tensor's rows, from the end, kept out of training for the final
metrics) and ``eval_data`` (a [M, d_in] tensor for them). A tensor is read in order (``shuffle``:
a fresh seeded permutation per epoch) in whole batches of ``batch_size`` rows; one pass by default,
and ``total_tokens`` / ``max_steps`` may ask for several (train-sae never cycles its data). An
iterable's batches are used as they come, or re-cut into ``batch_size`` rows when ``batch_size``
is given.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from .errors import SaetuneError
from .sae import SAE, SAEConfig

# TrainSAEConfig fields that mean something for one SAE on in-memory data (the rest name models, hooks, stores)
FIT_OPTIONS = ("optimizer", "lr", "momentum", "warmup_steps", "batch_size", "total_tokens", "max_steps", "shuffle",
               "seed", "auxk_coef", "auxk_k", "dead_tokens", "normalize_decoder", "init_b_dec", "autocast", "device",
               "progress")
EXTRA_OPTIONS = ("holdout", "eval_data")
NAME = "sae"  # the one SAE's name in the shared step's batch dict


def fit_sae(data: Tensor | Iterable[Tensor], sae_config: SAEConfig | SAE, **trainer_options: Any
            ) -> tuple[SAE, dict[str, Any]]:
    """Train an SAE on ``data`` with train-sae's trainer; returns ``(sae, metrics)``.

    ``sae_config``: an ``SAEConfig`` (a fresh SAE, seeded with ``seed``) or an ``SAE`` (trained in place; its
    b_dec is re-set to the first batch's mean unless ``init_b_dec="keep"``).
    ``metrics``: ``history`` (one dict per step: ``step``, ``tokens``, ``loss``, ``fvu``, ``l0``, ``mse``,
    ``dead_frac``, …, as train-sae's metrics.jsonl) and the final ``fvu`` = Σ‖x − x̂‖² / Σ‖x − x̄‖²,
    ``l0`` (mean active latents per row), ``mse`` and ``dead_frac`` (latents that never fire) of the
    trained SAE in inference mode on ``eval_on``: the held-out rows (``holdout``), ``eval_data``, the
    training tensor, a re-iterable ``data`` once more, or else its last batch.

    Phases: :func:`_prepare_fit` (options, data checks, the SAE and its trainer), :func:`_fit_loop` (the
    steps), :func:`_fit_metrics` (averaged weights, the final metrics).
    """
    fit = _prepare_fit(data, sae_config, trainer_options)
    history, tokens, last = _fit_loop(fit)
    return fit.sae, _fit_metrics(fit, data, history, tokens, last)


@dataclasses.dataclass
class _Fit:
    """What ``fit_sae``'s phases share: train-sae's config, the SAE and its trainer, the batches, and the rows
    the final metrics are measured on (``eval_on`` names them; ``eval_data`` holds them when given or held out)."""

    tc: Any  # sae_trainer.TrainSAEConfig
    sc: SAEConfig
    sae: SAE
    device: str
    source: "_Batches"
    trainers: list
    eval_on: str
    eval_data: Tensor | None


def _prepare_fit(data: Any, sae_config: SAEConfig | SAE, trainer_options: dict[str, Any]) -> _Fit:
    """Split the options, check the data (and ``holdout`` / ``eval_data``, never both), build the SAE (fresh,
    seeded like train_sae's first SAE, or the one given) on its device and its trainer."""
    from .models import resolve_device
    from .sae_trainer import SAETrainer, TrainSAEConfig

    sae, sc = _sae_and_config(sae_config)
    holdout, eval_data, opts = _split_options(trainer_options)
    tc = TrainSAEConfig(architecture=sc.architecture, d_sae=[sc.d_sae], k=[sc.k] if sc.k else [32],
                        matryoshka_widths=list(sc.matryoshka_widths or []), l1_coefficient=sc.l1_coefficient,
                        l0_coefficient=sc.l0_coefficient, jumprelu_bandwidth=sc.jumprelu_bandwidth,
                        hooks=[sc.hook_name or NAME], **opts)
    device = resolve_device(tc.device)
    source = _Batches(data, sc.d_in, tc, holdout, explicit_batch="batch_size" in opts)  # checks the data first
    if eval_data is not None:
        if source.holdout is not None:
            raise SaetuneError("give holdout or eval_data, not both: both name the rows of the final metrics")
        eval_data, eval_on = _as_matrix(eval_data, sc.d_in, "eval_data"), "eval_data"
    elif source.holdout is not None:
        eval_data, eval_on = source.holdout, "holdout"
    else:
        eval_on = source.eval_on
    if sae is None:
        sae = SAE(sc, seed=tc.seed)  # train_sae seeds its (first) SAE the same way
    sae.to(device).train()
    trainers = [(NAME, SAETrainer(NAME, sae, tc, device))]
    return _Fit(tc, sc, sae, device, source, trainers, eval_on, eval_data)


def _fit_loop(fit: _Fit) -> tuple[list[dict[str, float]], int, Tensor]:
    """One train-sae step per batch; returns the per-step history, the rows trained on and the last batch.
    Raises :class:`SaetuneError` when ``data`` gave no batch."""
    from tqdm.auto import tqdm
    from .sae_trainer import autocast_dtype, train_step

    tc, device, source = fit.tc, fit.device, fit.source
    autocast = autocast_dtype(tc, device)
    rows: list[tuple[int, int, dict[str, Tensor]]] = []  # detached metrics: no host sync per step
    tokens = 0
    bar = tqdm(total=source.n_steps, desc="fit_sae", unit="step", disable=not tc.progress)
    last = None
    for step, x in enumerate(source):
        x = x.to(device=device, dtype=torch.float32, non_blocking=True)
        m = train_step(fit.trainers, {NAME: x}, step, tc, autocast, stopped="training stopped")
        tokens += x.shape[0]
        rows.append((step + 1, tokens, m))
        if tc.progress and (step % 10 == 0 or step + 1 == source.n_steps):
            bar.set_postfix({k: f"{float(m[k]):.3g}" for k in ("fvu", "l0")})
        bar.update(1)
        last = x
    bar.close()
    history = [{"step": n, "tokens": t, **{k: float(v) for k, v in m.items()}} for n, t, m in rows]
    if last is None:
        raise SaetuneError("fit_sae got no training batch: the iterable yielded no batches (or, with batch_size "
                           f"given, fewer than batch_size={tc.batch_size} rows)")
    return history, tokens, last


def _fit_metrics(fit: _Fit, data: Any, history: list[dict[str, float]], tokens: int, last: Tensor
                 ) -> dict[str, Any]:
    """Switch to the averaged weights (schedule-free) and measure the SAE in inference mode on ``fit.eval_on``'s
    rows; returns ``fit_sae``'s metrics (its docstring)."""
    from .sae_trainer import use_averaged_weights

    use_averaged_weights(fit.trainers)
    sae = fit.sae
    sae.eval()
    if fit.eval_on == "last batch":
        final = evaluate_sae(sae, [last])
    elif fit.eval_on == "data (again)":
        final = evaluate_sae(sae, (_check_batch(b, fit.sc.d_in, j) for j, b in enumerate(data)))
    else:
        final = evaluate_sae(sae, (fit.eval_data if fit.eval_on != "data" else fit.source.train).split(4096))
    return {**final, "eval_on": fit.eval_on, "steps": len(history), "train_tokens": tokens,
            "weights": "schedule-free averaged (optimizer.eval())" if fit.tc.optimizer == "signum_sf" else "final",
            "history": history}


@torch.no_grad()
def evaluate_sae(sae: SAE, batches: Iterable[Tensor]) -> dict[str, float]:
    """fvu = Σ‖x − x̂‖² / Σ‖x − x̄‖² over all rows, mse = mean ‖x − x̂‖², l0 = mean active latents per row,
    dead_frac = fraction of latents that fire on no row; x̄ over all rows (running float64 sums)."""
    dev = sae.W_enc.device
    sq = n = 0.0
    l0 = 0.0
    s1 = s2 = None
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=dev)
    for x in batches:
        x = x.to(device=dev, dtype=torch.float32)
        f = sae.encode(x)
        x_hat = sae.decode(f)
        sq += float((x_hat - x).double().pow(2).sum())
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
        xd = x.double()
        s1 = xd.sum(0) if s1 is None else s1 + xd.sum(0)
        s2 = float(xd.pow(2).sum()) + (0.0 if s2 is None else s2)
        n += x.shape[0]
    if not n:
        raise SaetuneError("no rows to evaluate the SAE on")
    tv = s2 - float(s1.pow(2).sum()) / n  # Σ‖x − x̄‖² = Σ‖x‖² − N‖x̄‖²
    return {"fvu": sq / max(tv, 1e-12), "mse": sq / n, "l0": l0 / n, "dead_frac": float((~fired).float().mean()),
            "eval_tokens": int(n)}


# ---- inputs ---------------------------------------------------------------------------------

def _sae_and_config(sae_config) -> tuple[SAE | None, SAEConfig]:
    if isinstance(sae_config, SAE):
        sc = sae_config.cfg
        SAEConfig.__post_init__(sc)
        return sae_config, sc
    if not isinstance(sae_config, SAEConfig):
        raise SaetuneError(f"fit_sae needs an SAEConfig (or an SAE to train further), got {type(sae_config).__name__}")
    sc = dataclasses.replace(sae_config)  # re-runs its checks (k < d_sae, matryoshka widths) on the current values
    return None, sc


def _split_options(options: dict[str, Any]) -> tuple[float, Any, dict[str, Any]]:
    unknown = [k for k in options if k not in FIT_OPTIONS + EXTRA_OPTIONS]
    if unknown:
        from .sae_trainer import TrainSAEConfig
        train_only = {f.name for f in dataclasses.fields(TrainSAEConfig)}
        sae_fields = {f.name for f in dataclasses.fields(SAEConfig)}
        why = [f"{k!r} (set it in the SAEConfig)" if k in sae_fields else
               f"{k!r} (a train-sae option that does not apply to in-memory data)" if k in train_only else repr(k)
               for k in unknown]
        raise SaetuneError(f"fit_sae got unknown option{'s' if len(unknown) > 1 else ''} {', '.join(why)}; valid: "
                           f"{', '.join(FIT_OPTIONS + EXTRA_OPTIONS)} (the SAE's own settings — architecture, k, "
                           "d_sae, matryoshka_widths, l1_coefficient, … — go in the SAEConfig)")
    opts = dict(options)
    holdout = opts.pop("holdout", 0.0)
    eval_data = opts.pop("eval_data", None)
    if not isinstance(holdout, (int, float)) or isinstance(holdout, bool) or not 0 <= holdout < 1:
        raise SaetuneError(f"holdout is the fraction of rows kept out of training, in [0, 1); got {holdout!r}")
    return float(holdout), eval_data, opts


def _as_matrix(data: Any, d_in: int, what: str) -> Tensor:
    if not isinstance(data, Tensor) and hasattr(data, "__array__"):
        data = torch.as_tensor(data)
    if not isinstance(data, Tensor):
        raise SaetuneError(f"{what} must be a [N, d_in] tensor, got {type(data).__name__}")
    if data.dim() != 2:
        hint = f" (flatten with .reshape(-1, {data.shape[-1]}))" if data.dim() > 2 else ""
        raise SaetuneError(f"{what} must be 2-D [N, d_in={d_in}], got shape {tuple(data.shape)}{hint}")
    if data.shape[1] != d_in:
        raise SaetuneError(f"{what} has width {data.shape[1]}, but the SAE's d_in is {d_in}")
    if data.shape[0] == 0:
        raise SaetuneError(f"{what} is empty (shape {tuple(data.shape)}): no rows to train or evaluate on")
    if not data.is_floating_point():
        raise SaetuneError(f"{what} must hold floating-point activations, got dtype {data.dtype}")
    return data


def _check_batch(b: Any, d_in: int, j: int) -> Tensor:
    if not isinstance(b, Tensor) and hasattr(b, "__array__"):
        b = torch.as_tensor(b)
    if not isinstance(b, Tensor):
        raise SaetuneError(f"batch {j} of data is a {type(b).__name__}; data must yield [B, d_in] tensors")
    return _as_matrix(b, d_in, f"batch {j} of data")


class _Batches:
    """The training batches of ``data``, ``n_steps`` of them (None when an iterable's length is unknown)."""

    def __init__(self, data: Any, d_in: int, tc, holdout: float, explicit_batch: bool):
        self.tc, self.d_in, self.holdout, self.explicit_batch = tc, d_in, None, explicit_batch
        self.data = data
        self.is_tensor = isinstance(data, Tensor) or hasattr(data, "__array__")
        bs = tc.batch_size
        if self.is_tensor:
            data = _as_matrix(data, d_in, "data")
            if holdout:
                n_out = max(1, math.ceil(holdout * data.shape[0]))
                if n_out >= data.shape[0]:
                    raise SaetuneError(f"holdout {holdout} keeps all {data.shape[0]} rows out of training")
                data, self.holdout = data[:-n_out], data[-n_out:]
            self.train = data
            self.per_epoch = data.shape[0] // bs
            if self.per_epoch < 1:
                raise SaetuneError(f"data has {data.shape[0]} training rows, fewer than one batch of batch_size={bs}; "
                                   "lower batch_size or pass more rows")
            # one pass by default; total_tokens and max_steps (the smaller, when both are given) may ask for more
            asked = ([tc.total_tokens // bs] if tc.total_tokens else []) + ([tc.max_steps] if tc.max_steps else [])
            self.n_steps = min(asked) if asked else self.per_epoch
            if self.n_steps < 1:
                raise SaetuneError(f"total_tokens={tc.total_tokens} is less than one batch of batch_size={bs}")
            self.eval_on = "data"
        else:
            if holdout:
                raise SaetuneError("holdout splits a [N, d_in] tensor; for an iterable of batches pass eval_data")
            if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
                raise SaetuneError(f"data must be a [N, d_in] tensor or an iterable of [B, d_in] batches, got "
                                   f"{type(data).__name__}")
            n = len(data) if hasattr(data, "__len__") and not explicit_batch else None
            limit = tc.max_steps or (tc.total_tokens // bs if tc.total_tokens and explicit_batch else 0)
            self.n_steps = min(n, limit) if n is not None and limit else (n or limit or None)
            # a list, tuple or DataLoader can be read again for the final metrics; a generator cannot
            self.eval_on = "last batch" if isinstance(data, collections.abc.Iterator) else "data (again)"

    def __iter__(self) -> Iterator[Tensor]:
        tc = self.tc
        if self.is_tensor:
            x, bs = self.train, tc.batch_size
            for step in range(self.n_steps):
                epoch, j = divmod(step, self.per_epoch)
                if tc.shuffle:
                    if j == 0:
                        g = torch.Generator().manual_seed(tc.seed + epoch)
                        perm = torch.randperm(x.shape[0], generator=g)
                    yield x[perm[j * bs:(j + 1) * bs].to(x.device)]
                else:
                    yield x[j * bs:(j + 1) * bs]
            return
        yield from self._iterable()

    def _iterable(self) -> Iterator[Tensor]:
        tc, bs = self.tc, self.tc.batch_size
        tokens = steps = 0
        buf: list[Tensor] = []
        held = 0
        for j, b in enumerate(self.data):
            b = _check_batch(b, self.d_in, j)
            if not self.explicit_batch:
                if tc.max_steps and steps >= tc.max_steps or tc.total_tokens and tokens >= tc.total_tokens:
                    return
                yield b
                steps, tokens = steps + 1, tokens + b.shape[0]
                continue
            buf.append(b)
            held += b.shape[0]
            while held >= bs:  # re-cut into batch_size rows
                if self.n_steps and steps >= self.n_steps:
                    return
                cat = torch.cat(buf)
                yield cat[:bs]
                steps += 1
                buf, held = ([cat[bs:]] if cat.shape[0] > bs else []), cat.shape[0] - bs
        # rows left over (< batch_size) are dropped, as train-sae drops a partial last batch
