"""Several processes for one job, through the engines people use: ``torchrun`` or
``accelerate launch`` (DDP over NCCL on GPUs, gloo on CPUs; FSDP2 and DeepSpeed ZeRO-2 through
their accelerate configs). One process is a no-op wrapper, so single-process runs pay nothing.

Conventions shared by the stages that use it: rank 0 writes the run dir (config, manifest,
metrics, checkpoints, artifacts); every rank reads checkpoints on resume; a step's global
batch is ``world × batch_size`` sequences, rank r taking the r-th slice, so gradients averaged
over ranks equal a single process's gradient on the whole global batch. FSDP shards the
trainable parameters and their optimizer state (DTensors), ZeRO-2 the optimizer state and fp32
master weights (flat partitions): :meth:`Dist.full_params` and :meth:`Dist.full_optimizer_state`
gather them (collectives: every rank calls them) into the layout one process has, so checkpoints
and adapters do not depend on the engine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn

from .runs import RecordsFailure


def requested_engine() -> str:
    """The engine ``accelerate launch`` was configured for: 'fsdp', 'deepspeed', or 'ddp' (also plain torchrun)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp"


def _engine_on_cpu(acc, engine: str) -> None:
    """Switch ``acc`` to FSDP / DeepSpeed on CPU processes (gloo), set up as accelerate sets them up on GPUs.

    accelerate enables both only on accelerators and otherwise runs DDP without a word; setting
    the engine the launcher asked for keeps a CPU run on the code path a GPU run takes (the
    CPU tests of FSDP and ZeRO-2 rely on it).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    state, mp = acc.state, acc.state.mixed_precision
    if engine == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin
        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
        if mp != "no":
            plugin.set_mixed_precision(mp)
        state.fsdp_plugin = plugin
        kind = DistributedType.FSDP
    else:
        from accelerate.utils import DeepSpeedPlugin
        plugin = DeepSpeedPlugin()  # from the launcher's ACCELERATE_DEEPSPEED_* variables
        plugin.set_mixed_precision(mp)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        acc.native_amp = False  # DeepSpeed casts by itself
        kind = DistributedType.DEEPSPEED
    # both shared states: each AcceleratorState() accelerate creates later copies the process state's type
    state.distributed_type = PartialState().distributed_type = kind


def _configure_zero(ds: dict[str, Any], batch_size: int, grad_clip: float) -> None:
    """Fill DeepSpeed's config with the trainer's micro-batch and clipping; refuse settings that would train
    differently from the trainer's loop (it steps after every batch, and DeepSpeed clips inside its step)."""
    from .errors import SaetuneError
    ds["train_micro_batch_size_per_gpu"] = batch_size
    for key, want in (("gradient_clipping", float(grad_clip)), ("gradient_accumulation_steps", 1)):
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = want
        elif float(have) != want:
            raise SaetuneError(f"{key}: {have} in the DeepSpeed config, but the trainer needs {want:g} (grad_clip of "
                               f"its config; one optimizer step per batch); set {key} to {want:g} or 'auto'")


def _zero_full_state(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, Any]:
    """ZeRO-1/2: ``opt`` steps one flat fp32 partition per group; each parameter's whole state is assembled
    from the partitions with DeepSpeed's ``safe_get_full_optimizer_state`` (a collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state
    if not opt.state:
        return {"state": {}, "param_groups": []}
    flat = next(iter(opt.state.values()))
    keys = [k for k, v in flat.items() if isinstance(v, torch.Tensor) and v.dim() > 0]  # exp_avg, exp_avg_sq, ...
    scalars = {k: v for k, v in flat.items() if k not in keys}  # step: one count for every parameter
    state = {i: {**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in scalars.items()},
                 **{k: safe_get_full_optimizer_state(p, k).cpu() for k in keys}}
             for i, p in enumerate(params)}
    if len(opt.param_groups) != 1:
        raise NotImplementedError(f"gathering ZeRO state of {len(opt.param_groups)} parameter groups; tune makes one")
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}


def _zero_load_full_state(zero, opt: torch.optim.Optimizer, params: list[nn.Parameter], sd: dict[str, Any]) -> None:
    """Inverse of :func:`_zero_full_state`: create ``opt``'s per-partition state (it is made lazily at the first
    step), link it to the parameters as DeepSpeed does after that step, then write each parameter's part."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_optimizer_state
    if not sd["state"]:
        return
    first = sd["state"][0]
    keys = [k for k, v in first.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
    for flat, lp in zip(zero.single_partition_of_fp32_groups, zero.bit16_groups):
        opt.state[flat] = {**{k: v.clone() if isinstance(v, torch.Tensor) else v
                              for k, v in first.items() if k not in keys},
                           **{k: torch.zeros_like(flat) for k in keys}}
        lazy_init_hp_params_optimizer_state(lp, flat, opt.state)
    for i, p in enumerate(params):
        for k in keys:
            safe_set_full_optimizer_state(p, sd["state"][i][k].to(p.device, torch.float32), k)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a sharded DTensor gathered (a collective), anything else as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def fault_step(rank: int) -> int | None:
    """Fault injection, for tests only: the step (1-based) at whose start this rank SIGKILLs itself, as an
    OOM-killed or crashed worker dies (``SAETUNE_FAULT_AT_STEP=n`` with ``SAETUNE_FAULT_KILL_RANK=r``, the
    variables train-sae reads); None, the normal case, when they are unset or name another rank."""
    at, who = os.environ.get("SAETUNE_FAULT_AT_STEP"), os.environ.get("SAETUNE_FAULT_KILL_RANK")
    if not at or who is None or who.strip() != str(rank):
        return None
    if not at.strip().isdigit():
        from .errors import SaetuneError
        raise SaetuneError(f"SAETUNE_FAULT_AT_STEP={at!r} is not a step number (a test-only fault injection)")
    return int(at)


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun / accelerate launch (1 when launched plainly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


TIMEOUT_ENV = "SAETUNE_DIST_TIMEOUT_S"


def dist_timeout_s() -> float | None:
    """``$SAETUNE_DIST_TIMEOUT_S``: seconds a collective may wait for a peer before the job fails (None when
    unset: torch's default, 30 min for gloo, 10 for NCCL). A dead rank ends the job at once (its sockets
    close); a rank that hangs (a stuck file system, a stopped process) holds the others this long."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        from .errors import SaetuneError
        raise SaetuneError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds (e.g. 600)")
    return value


def _timeout_handlers() -> list:
    seconds = dist_timeout_s()
    if seconds is None:
        return []
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs
    return [InitProcessGroupKwargs(timeout=timedelta(seconds=seconds))]


class Dist:
    """rank / world / device and the few collective operations a trainer needs."""

    def __init__(self, device: str):
        self.world = launched_world_size()
        self.acc = None
        self.rank = 0
        self.device = device
        self.engine = "none"
        if self.world > 1:
            from accelerate import Accelerator
            cpu = not device.startswith("cuda")
            self.engine = requested_engine()
            self.acc = Accelerator(cpu=cpu, kwargs_handlers=_timeout_handlers())
            if cpu and self.engine != "ddp":
                _engine_on_cpu(self.acc, self.engine)
            self.rank = self.acc.process_index
            dev = self.acc.device  # may read "cpu:0": code elsewhere compares device strings with "cpu"
            self.device = "cpu" if dev.type == "cpu" else str(dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, module: nn.Module, opt: torch.optim.Optimizer, batch_size: int,
                grad_clip: float) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap for data parallelism (DDP / FSDP2 / DeepSpeed as accelerate is configured); identity for one
        process. ``batch_size``: sequences per process and step; ``grad_clip``: the trainer's clipping norm
        (0 = off). DeepSpeed learns both here (no data loader tells it the micro-batch; it clips inside its
        own step). Under FSDP the module's parameters are replaced by sharded ones (``opt`` is switched to
        them in place): read parameters from the module again after this."""
        if self.acc is None:
            return module, opt
        if self.engine == "deepspeed":
            _configure_zero(self.acc.state.deepspeed_plugin.deepspeed_config, batch_size, grad_clip)
        if self.engine == "fsdp" and self.acc.state.fsdp_plugin.fsdp_version != 2:
            from .errors import SaetuneError
            raise SaetuneError(f"fsdp_version {self.acc.state.fsdp_plugin.fsdp_version} in the accelerate config: "
                               "saetune runs FSDP2 (fully_shard, which shards frozen and trainable parameters side "
                               "by side and keeps their names); set fsdp_version: 2")
        if self.engine != "deepspeed":
            return self.acc.prepare(module, opt)
        trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        wrapped, opt_w = self.acc.prepare(module, opt)
        self._zero = opt_w.optimizer  # ZeRO's optimizer: flat fp32 partitions around the one passed in
        # its fp32 masters were made from the model's weights, rounded to bf16 when DeepSpeed trains in bf16
        from deepspeed.utils import safe_set_full_fp32_param
        for n, p in module.named_parameters():
            if n in trained:
                safe_set_full_fp32_param(p, trained[n].to(p.device, torch.float32))
        return wrapped, opt_w

    def full_params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``{name: whole tensor on CPU}`` of ``module``'s trainable parameters (under DeepSpeed its fp32
        master copies); every rank must call it."""
        if self.engine == "deepspeed":
            from deepspeed.utils import safe_get_full_fp32_param
            return {n: safe_get_full_fp32_param(p).cpu() for n, p in module.named_parameters() if p.requires_grad}
        return {n: full_tensor(p.detach()).cpu() for n, p in module.named_parameters() if p.requires_grad}

    def full_optimizer_state(self, opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, Any]:
        """``opt.state_dict()`` as one process training ``params`` (in ``opt``'s order) would hold it, sharded
        state tensors gathered whole (on CPU); every rank must call it."""
        if self.engine == "deepspeed":
            return _zero_full_state(opt, params)
        sd = opt.state_dict()
        state = {i: {k: full_tensor(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                 for i, st in sorted(sd["state"].items())}
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_full_optimizer_state(self, opt: torch.optim.Optimizer, params: list[nn.Parameter],
                                  sd: dict[str, Any]) -> None:
        """Load a state from :meth:`full_optimizer_state` (or one process) into ``opt``, each rank keeping the
        shard of every state tensor that matches its shard of the parameter."""
        if self.engine == "deepspeed":
            return _zero_load_full_state(self._zero, opt, params, sd)
        from torch.distributed.tensor import DTensor, distribute_tensor
        state = {}
        for i, st in sd["state"].items():
            p = params[int(i)]
            if isinstance(p, DTensor):  # every rank read the same file: take the local shard, no communication
                st = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                      if isinstance(v, torch.Tensor) and v.shape == p.shape else v for k, v in st.items()}
            state[i] = st
        opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})

    def backward(self, loss: torch.Tensor) -> None:
        if self.acc is None:
            loss.backward()
        else:
            self.acc.backward(loss)

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor | None:
        """Clip the global gradient norm; returns it (None under DeepSpeed before its first step)."""
        if self.acc is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        gn = self.acc.clip_grad_norm_(params, max_norm)
        return full_tensor(gn) if isinstance(gn, torch.Tensor) else gn

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average each value over ranks (for logging)."""
        if self.acc is None or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], device=self.device, dtype=torch.float64)
        t = self.acc.reduce(t, reduction="mean")
        return dict(zip(keys, t.tolist()))

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over ranks: ``sum``, ``mean`` or ``max`` (identity for one process)."""
        if self.acc is None:
            return t
        import torch.distributed as dist
        if op == "mean":
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t.div_(self.world)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t

    def broadcast_object(self, obj: Any) -> Any:
        if self.acc is None:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def end(self) -> None:
        if self.acc is not None:
            self.acc.end_training()


class FollowerRun(RecordsFailure):
    """What a non-zero rank holds instead of a :class:`RunDir`: the path, and writes that do nothing (``with run:``
    still turns SIGTERM into ``KeyboardInterrupt``, as on rank 0)."""

    def __init__(self, path):
        from pathlib import Path
        self.path = Path(path)
        self.manifest: dict[str, Any] = {"inputs": {}, "phases": {}}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def metrics(self) -> list[dict[str, Any]]:
        return []

    def add_artifact(self, name: str, rel_path: str) -> str:
        return ""

    def __getattr__(self, name: str):
        return lambda *a, **k: None  # add_input, log, truncate_metrics, write_manifest, finish, fail


def start_run(device: str, out, stage: str, cfg: Any, *, resume: bool, overwrite: bool, seed: int | None,
              resume_ignore: tuple[str, ...] = (), gpu_hour_usd: float | None = None):
    """``(dist, run)`` for a stage that may run in several processes: rank 0 opens the :class:`RunDir`
    (creating, cleaning or resuming it), the others get a :class:`FollowerRun`; all wait for rank 0."""
    from .errors import SaetuneError
    from .runs import RunDir
    world = launched_world_size()
    if world > 1 and out is None:
        raise SaetuneError(f"a multi-process {stage} needs --out (every process must name the same run dir)")
    dist = Dist(device)
    if dist.is_main:
        run = RunDir.open(out, stage, cfg, resume=resume, overwrite=overwrite, seed=seed, device=dist.device,
                          resume_ignore=resume_ignore)
        run.manifest["n_gpus"] = dist.world if dist.device.startswith("cuda") else 0
        run.manifest["world_size"] = dist.world
        if gpu_hour_usd is not None:
            run.manifest["gpu_hour_usd"] = gpu_hour_usd
    else:
        run = FollowerRun(out)
    dist.barrier()  # rank 0 has created (or cleaned) the run dir
    return dist, run
