"""Several processes for one job, through the engines people use: ``torchrun`` or
``accelerate launch`` (DDP over NCCL on GPUs, gloo on CPUs; DeepSpeed ZeRO-2 through its
accelerate config). One process is a no-op wrapper, so single-process runs pay nothing.

Conventions shared by the stages that use it: rank 0 writes the run dir (config, manifest,
metrics, checkpoints, artifacts); every rank reads checkpoints on resume; a step's global
batch is ``world × batch_size`` sequences, rank r taking the r-th slice, so gradients averaged
over ranks equal a single process's gradient on the whole global batch.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun / accelerate launch (1 when launched plainly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class Dist:
    """rank / world / device and the few collective operations a trainer needs."""

    def __init__(self, device: str):
        self.world = launched_world_size()
        self.acc = None
        self.rank = 0
        self.device = device
        if self.world > 1:
            from accelerate import Accelerator
            self.acc = Accelerator(cpu=not device.startswith("cuda"))
            self.rank = self.acc.process_index
            dev = self.acc.device  # may read "cpu:0": code elsewhere compares device strings with "cpu"
            self.device = "cpu" if dev.type == "cpu" else str(dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, module: nn.Module, opt: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap for data parallelism (DDP / DeepSpeed as accelerate is configured); identity for one process."""
        if self.acc is None:
            return module, opt
        return self.acc.prepare(module, opt)

    def backward(self, loss: torch.Tensor) -> None:
        if self.acc is None:
            loss.backward()
        else:
            self.acc.backward(loss)

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        if self.acc is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return self.acc.clip_grad_norm_(params, max_norm)

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


class FollowerRun:
    """What a non-zero rank holds instead of a :class:`RunDir`: the path, and writes that do nothing."""

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
