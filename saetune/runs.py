"""Run directories: the one contract between stages.

Layout (see ARCHITECTURE.md): ``config.yaml``, ``manifest.json`` (status, versions, seed,
device, phase times, artifacts with hashes), ``metrics.jsonl`` and the stage's artifacts.
``with run:`` records a failure, Ctrl-C and SIGTERM the one way (:meth:`RunDir.fail_with`);
:class:`Checkpoints` is the one writer and reader of ``checkpoints/step_NNNNNNN/``. An existing
run dir is refused unless ``resume`` or ``overwrite`` is given; a lock file keeps two live
processes out of one dir. ``overwrite`` deletes only a run dir of the same stage, never
the working directory or an input (:func:`check_overwrite`); paths a run records work from any
directory and after its pipeline dir is moved (:func:`record_path`, :func:`resolve_recorded`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from . import config as _config
from .errors import SaetuneError
from .io import (atomic_replace_dir, atomic_save_safetensors, atomic_write_json, atomic_write_text,
                 check_writable_dir, sha256_dir, sha256_file)

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOCK = ".lock"
GPU_HOUR_USD = 1.0  # Resa's costing: about one dollar per GPU-hour


def gpu_hour_usd(configured: float | None = None) -> float:
    """Price of one GPU-hour for cost estimates: $SAETUNE_GPU_HOUR_USD, else the run's setting, else $1 (Resa)."""
    env = os.environ.get("SAETUNE_GPU_HOUR_USD")
    if env:
        try:
            value = float(env)
        except ValueError:
            raise SaetuneError(f"SAETUNE_GPU_HOUR_USD={env!r} is not a number (e.g. 1.0 or 2.5)") from None
        if value < 0:
            raise SaetuneError(f"SAETUNE_GPU_HOUR_USD={env!r} is negative; give a price of 0 or more")
        return value
    return GPU_HOUR_USD if configured is None else float(configured)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def default_run_dir(stage: str, root: str | Path = "runs") -> Path:
    ts = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stage}-{ts}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("saetune", "torch", "transformers", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - version probing never fails a run
            pass
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
        if sha:
            out["git_sha"] = sha
    except Exception:
        pass
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- paths a run records --------------------------------------------------------------------

def record_path(path: str | Path, where: str | Path, scope: str | Path | None = None) -> str:
    """``path`` as a file in dir ``where`` records it, so that the record works from any working directory.

    A path inside ``scope`` (default ``where``'s parent: the pipeline dir around a run dir) is stored
    relative to ``where`` (``../rl-source/model``), so the pipeline dir can be moved whole; any other
    path is stored absolute. A string that names nothing on disk (a hub id like ``Qwen/Qwen2.5-1.5B``)
    and ``toy`` are kept as given. :func:`resolve_recorded` reads it back.
    """
    s = str(path)
    p = Path(s).expanduser()
    if not s or s == "toy" or not p.exists():
        return s
    p, where = p.resolve(), Path(where).resolve()
    scope = Path(scope).resolve() if scope is not None else where.parent
    if p == scope or scope in p.parents:
        return os.path.relpath(p, where)
    return str(p)


def resolve_recorded(recorded: str | None, where: str | Path) -> str | None:
    """A path recorded in dir ``where`` (see :func:`record_path`) as a path that works from here.

    A relative record is taken against ``where``. Older runs recorded paths relative to the directory
    they ran in: such a path is tried from here, then by its trailing components below ``where`` and
    its ancestors (``runs/demo-x/toy-base/model`` → ``<pipeline dir>/toy-base/model``), so a moved
    pipeline dir still finds its inputs. A record found nowhere (a hub id, ``toy``) comes back as it
    is, for the loader to accept or to name in its error.
    """
    if not recorded or recorded == "toy":
        return recorded
    p = Path(recorded).expanduser()
    base = Path(where).resolve()
    if not p.is_absolute() and (base / p).exists():
        return os.path.normpath(base / p)
    if p.exists():
        return os.path.abspath(p)
    parts = p.parts[1:] if p.is_absolute() else p.parts
    if parts[:1] == ("..",):
        return recorded  # a record relative to ``where`` (not an older cwd-relative one): its target is gone
    for anc in [base, *base.parents][:4]:
        for n in range(min(len(parts), 4), 1 if len(parts) > 1 else 0, -1):  # longest (most specific) first
            cand = anc.joinpath(*parts[-n:])
            if cand.exists():
                return str(cand)
    return recorded


def config_paths(cfg: Any) -> list[str]:
    """The values of ``cfg`` (a config dataclass or its dict) that name existing files or dirs: the run's inputs."""
    values = cfg if isinstance(cfg, dict) else _config.to_dict(cfg)
    out = []
    for v in values.values():
        for s in (v if isinstance(v, list) else [v]):
            if isinstance(s, str) and s and s != "toy" and Path(s).expanduser().exists():
                out.append(s)
    return out


# ---- what --overwrite may delete -------------------------------------------------------------

BOOKKEEPING = frozenset({CONFIG, MANIFEST, METRICS, LOCK})


def unworked_run(path: Path, stage: str | None = None) -> bool:
    """Whether ``path`` holds a run (of ``stage``, if given) that failed before doing any work: status failed and
    nothing but saetune's own bookkeeping files, without a metrics row. A check that needed the inputs (a batch
    larger than the data, a hook the model lacks) leaves such a dir; the corrected retry replaces it without
    --overwrite, since it holds nothing a user could lose. (A 'running' one may be alive on another host.)"""
    try:
        m = json.loads((path / MANIFEST).read_text())
        names = {c.name for c in path.iterdir()}
        metrics = (path / METRICS).read_text() if METRICS in names else ""
    except (OSError, ValueError):
        return False
    return (isinstance(m, dict) and m.get("status") == "failed" and names <= BOOKKEEPING
            and not metrics.strip() and stage in (None, m.get("stage")))


def refuse_unsafe_delete(path: Path, inputs: list[str | Path] = (), flag: str = "--out") -> None:
    """Refuse to delete ``path`` when it is (or holds) the working directory or an input of this command."""
    p, here = path.resolve(), Path.cwd().resolve()
    if p == here or p in here.parents:
        what = "the working directory" if p == here else f"a parent of the working directory {str(here)!r}"
        raise SaetuneError(f"--overwrite would delete {str(path)!r}, which is {what}; pass a new or empty "
                           f"sub-directory as {flag}")
    for i in inputs:
        q = Path(i).expanduser()
        if not q.exists():
            continue
        q = q.resolve()
        if q == p or p in q.parents:
            what = "is" if q == p else "holds"
            raise SaetuneError(f"--overwrite would delete {str(path)!r}, which {what} {str(i)!r}, an input of this "
                               f"run; write the run to another {flag}")


def check_overwrite(path: Path, stage: str, inputs: list[str | Path] = ()) -> None:
    """Refuse ``--overwrite`` of ``path`` unless it holds a '``stage``' run dir (its ``manifest.json``) that is
    neither the working directory nor an input of this run: files of any other kind are never deleted."""
    refuse_unsafe_delete(path, inputs)
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        held = sorted(c.name for c in path.iterdir())
        shown = ", ".join(repr(n) for n in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise SaetuneError(f"--overwrite refuses to delete {str(path)!r}: it is not a saetune run dir (no readable "
                           f"{MANIFEST}; it holds {shown}); choose another --out, or move those files away "
                           "yourself") from None
    other = m.get("stage") if isinstance(m, dict) else None
    if other != stage:
        raise SaetuneError(f"--overwrite refuses to delete {str(path)!r}: it holds a {other!r} run, and a '{stage}' "
                           f"run replaces only a '{stage}' run; choose another --out, or delete that run yourself "
                           "if it is no longer needed")


def _sub_runs_only(d: Path) -> bool:
    """A pipeline stage's dir: a run dir, a group of them (``eval/<label>/``), or empty (a stage killed at once)."""
    if not d.is_dir() or d.is_symlink():
        return False
    kids = list(d.iterdir())
    return (d / MANIFEST).exists() or all(g.is_dir() and ((g / MANIFEST).exists() or not any(g.iterdir()))
                                          for g in kids)


def check_overwrite_parent(path: Path, kind: str, inputs: list[str | Path] = ()) -> None:
    """Refuse ``--overwrite`` of a pipeline's parent dir (``kind``: 'demo' or 'pipeline') unless it holds only
    stage dirs (:func:`_sub_runs_only`) and the parent's own files: ``summary.json`` and, in a demo's, the
    ``config.yaml`` it writes first (a pipeline writes none: that tells the two apart)."""
    refuse_unsafe_delete(path, inputs)
    names = {c.name for c in path.iterdir()}
    strangers = sorted(n for n in names if not ((path / n).is_file() and n in ("summary.json", CONFIG))
                       and not _sub_runs_only(path / n))
    if strangers:
        shown = ", ".join(repr(n) for n in strangers[:3]) + (f" and {len(strangers) - 3} more" if len(strangers) > 3
                                                             else "")
        raise SaetuneError(f"--overwrite refuses to delete {str(path)!r}: it holds {shown}, which no saetune {kind} "
                           "wrote; choose another --out, or move those away yourself")
    if (kind == "demo") != (CONFIG in names) and names:
        what = "a pipeline's stages" if kind == "demo" else "a demo"
        raise SaetuneError(f"--overwrite refuses to delete {str(path)!r}: it holds {what}, not a {kind}'s; choose "
                           "another --out, or delete it yourself if it is no longer needed")


class RecordsFailure:
    """``with run:`` around a stage's work: an exception, Ctrl-C or SIGTERM that leaves the block is recorded by
    ``run.fail_with(exc)`` (status failed, the lock freed) and raised again. SIGTERM raises
    ``KeyboardInterrupt("terminated by SIGTERM")`` inside the block (:class:`SigtermInterrupts`), so a killed run
    records ``terminated by SIGTERM`` and Ctrl-C ``interrupted``, in every verb alike."""

    def __enter__(self):
        self._sigterm = SigtermInterrupts()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        sigterm = self._sigterm
        try:
            if exc is not None:
                sigterm.stopping = True  # a second SIGTERM must not cut the record short
                self.fail_with(exc)
        finally:
            sigterm.restore()
        return False


class RunDir(RecordsFailure):
    """A stage's output directory. Use :meth:`open`; then ``phase``, ``log``, ``finish``; ``with run:`` around
    the work records a failure (:class:`RecordsFailure`)."""

    def __init__(self, path: Path, stage: str, manifest: dict[str, Any]):
        self.path = path
        self.stage = stage
        self.manifest = manifest
        self._metrics_file = None

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | None, stage: str, cfg: Any, *, resume: bool = False,
             overwrite: bool = False, seed: int | None = None, device: str = "cpu",
             resume_ignore: tuple[str, ...] = (), inputs: tuple[str | Path, ...] = ()) -> "RunDir":
        """Create (or, with ``resume``, reopen) the run dir for ``stage`` with config ``cfg``.

        Refuses a dir that holds another run unless ``overwrite``; refuses a resumed run whose
        config differs from the saved one (naming the keys), except keys in ``resume_ignore``.
        ``overwrite`` replaces only a '``stage``' run dir that is neither the working directory nor
        one of the run's inputs (every path in ``cfg``, plus ``inputs``); a dir of a run that failed
        before doing any work is replaced without it.
        """
        if resume and overwrite:
            raise SaetuneError("--resume and --overwrite contradict each other; pass one of them")
        path = Path(path) if path is not None else default_run_dir(stage)
        cfg_dict = _config.to_dict(cfg)
        if path.exists() and not path.is_dir():
            raise SaetuneError(f"output path {str(path)!r} is a file, not a directory; choose another --out")
        check_writable_dir(path)  # a read-only dir: a sentence now, not an OSError halfway through
        exists = path.exists() and any(path.iterdir())
        if exists and (path / LOCK).exists():
            cls._check_lock(path / LOCK)  # a live run's dir: say so before anything else
        if resume:
            return cls._reopen(path, stage, cfg, cfg_dict, resume_ignore)
        if exists:
            cls._clear(path, stage, overwrite, [*config_paths(cfg_dict), *inputs])
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "stage": stage, "status": "running", "saetune_format": 1,
            "versions": versions(), "seed": seed, "device": device, "host": socket.gethostname(),
            "start_time": _now(), "end_time": None, "phases": {}, "inputs": {}, "artifacts": {},
        }
        run = cls(path, stage, manifest)
        run._lock()
        atomic_write_text(path / CONFIG, _config.dump_yaml(cfg))
        run.write_manifest()
        return run

    @classmethod
    def _reopen(cls, path: Path, stage: str, cfg: Any, cfg_dict: dict[str, Any],
                resume_ignore: tuple[str, ...]) -> "RunDir":
        """The '``stage``' run in ``path``, running again: refused when it holds none or when ``cfg`` differs from
        its saved config (keys in ``resume_ignore`` aside)."""
        if not (path / MANIFEST).exists():
            raise SaetuneError(f"cannot resume {str(path)!r}: it holds no run (no {MANIFEST})")
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("stage") != stage:
            raise SaetuneError(f"cannot resume {str(path)!r} as '{stage}': it holds a "
                               f"'{manifest.get('stage')}' run")
        saved = _config.read_yaml(path / CONFIG)
        # keys a newer saetune added take their defaults, so old runs stay resumable
        try:
            saved = _config.to_dict(_config.from_dict(type(cfg), saved))
        except SaetuneError:
            pass  # unknown or ill-typed saved keys: the diff below names them
        changed = _config.diff_configs(saved, cfg_dict, ignore=resume_ignore)
        if changed:
            details = "; ".join(f"{k}: {saved.get(k)!r} -> {cfg_dict.get(k)!r}" for k in changed)
            raise SaetuneError(f"cannot resume {str(path)!r} with a changed config ({details}); "
                               "resume with the saved config or start a new run dir")
        run = cls(path, stage, manifest)
        run._lock()
        manifest["status"] = "running"
        manifest.setdefault("resumed_at", []).append(_now())
        run.write_manifest()
        return run

    @staticmethod
    def _clear(path: Path, stage: str, overwrite: bool, inputs: list[str | Path]) -> None:
        """Make the non-empty ``path`` ready for a new run: a run refused before any work is replaced; anything
        else only with ``overwrite`` and only when :func:`check_overwrite` allows it."""
        if not overwrite and unworked_run(path, stage):
            for name in BOOKKEEPING:  # a run refused before any work: the corrected retry takes its place
                (path / name).unlink(missing_ok=True)
            return
        if not overwrite:
            if not (path / MANIFEST).exists():
                raise SaetuneError(f"output dir {str(path)!r} already holds files that are not a saetune run (no "
                                   f"{MANIFEST}), which neither --resume nor --overwrite will touch; choose "
                                   "another --out (a new or empty dir)")
            m = json.loads((path / MANIFEST).read_text())
            held = f"output dir {str(path)!r} already holds a '{m.get('stage')}' run (status {m.get('status')})"
            if m.get("stage") != stage:
                raise SaetuneError(f"{held}, which a '{stage}' run can neither --resume nor --overwrite; choose "
                                   "another --out")
            raise SaetuneError(f"{held}; pass --resume to continue it, --overwrite to replace it, or choose "
                               "another --out")
        check_overwrite(path, stage, inputs)
        shutil.rmtree(path)

    @staticmethod
    def _check_lock(lock: Path) -> None:
        """Refuse when ``lock`` names a live process other than this one (a dead process's lock is stale)."""
        try:
            pid = int(lock.read_text().strip() or 0)
        except (OSError, ValueError):
            return
        if pid and pid != os.getpid() and _pid_alive(pid):
            raise SaetuneError(f"run dir {str(lock.parent)!r} is in use by process {pid}; two runs cannot share one "
                               "output dir: wait for that run to end or stop it, or choose another --out (if process "
                               f"{pid} is no saetune run, delete {str(lock)!r})")

    def _lock(self) -> None:
        """Take the dir's lock file (this process's pid). It is written whole under another name and hard-linked
        into place, which fails when a lock is already there, so two processes opening one dir at the same moment
        cannot both take it; a dead process's lock (a killed run) is replaced."""
        lock = self.path / LOCK
        tmp = self.path / f"{LOCK}.{os.getpid()}.tmp"
        tmp.write_text(str(os.getpid()))
        try:
            try:
                os.link(tmp, lock)
                return
            except FileExistsError:
                self._check_lock(lock)
            except OSError:
                if lock.exists():  # a file system without hard links: check, then replace
                    self._check_lock(lock)
            os.replace(tmp, lock)
            self._check_lock(lock)  # another process taking over the same stale lock at this instant may have won
        finally:
            tmp.unlink(missing_ok=True)

    def _unlock(self) -> None:
        (self.path / LOCK).unlink(missing_ok=True)

    # ---- manifest -------------------------------------------------------------------------
    def write_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def add_input(self, name: str, path: str | Path, digest: str | None = None) -> None:
        """Record input ``name`` with its hash; its path as :func:`record_path` writes it (read it back with
        :func:`resolve_recorded` against this run dir)."""
        p = Path(path)
        if digest is None and p.exists():
            digest = sha256_dir(p) if p.is_dir() else sha256_file(p)
        self.manifest["inputs"][name] = {"path": record_path(path, self.path), "sha256": digest}
        self.write_manifest()

    def add_artifact(self, name: str, rel_path: str) -> str:
        p = self.path / rel_path
        digest = sha256_dir(p) if p.is_dir() else sha256_file(p)
        self.manifest["artifacts"][name] = {"path": rel_path, "sha256": digest}
        self.write_manifest()
        return digest

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; seconds add up across resumes."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.manifest["phases"][name] = round(self.manifest["phases"].get(name, 0.0) + dt, 3)
            self.write_manifest()

    # ---- metrics --------------------------------------------------------------------------
    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric rows past ``after_step`` (a resumed run re-logs them)."""
        f = self.path / METRICS
        if not f.exists():
            return
        keep = []
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a row cut by a kill
            if row.get("step", 0) <= after_step:
                keep.append(line)
        atomic_write_text(f, "".join(k + "\n" for k in keep))

    def log(self, row: dict[str, Any]) -> None:
        if "step" not in row or "tokens" not in row:
            raise ValueError("a metrics row needs 'step' and 'tokens'")
        if self._metrics_file is None:
            self._metrics_file = open(self.path / METRICS, "a")
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    # ---- ending ---------------------------------------------------------------------------
    def finish(self, status: str = "complete", **extra: Any) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        self.manifest.update(extra)
        self.manifest["status"] = status
        self.manifest["end_time"] = _now()
        wall = sum(self.manifest["phases"].values())
        self.manifest["wall_seconds"] = round(wall, 3)
        gpus = self.manifest.get("n_gpus", 0)
        rate = gpu_hour_usd(self.manifest.get("gpu_hour_usd"))
        self.manifest["gpu_hours"] = round(wall / 3600 * gpus, 6)
        self.manifest["gpu_hour_usd"] = rate
        self.manifest["estimated_cost_usd"] = round(self.manifest["gpu_hours"] * rate, 4)
        self.write_manifest()
        self._unlock()

    def fail(self, reason: str) -> None:
        self.finish("failed", error=reason)

    def fail_with(self, exc: BaseException) -> None:
        """Record the run as failed by ``exc``: its message, else ``interrupted`` for Ctrl-C / SIGTERM, else its type."""
        self.fail(str(exc) or ("interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__))


class SigtermInterrupts:
    """While a stage runs, SIGTERM raises ``KeyboardInterrupt("terminated by SIGTERM")`` as Ctrl-C would, so the
    stage's ``except`` records the stop in the run dir (status failed, lock freed) instead of the process vanishing
    with its manifest 'running'. torchrun SIGTERMs the surviving ranks when one dies; schedulers do on preemption.

    Set ``stopping`` once the stage is recording a failure: later SIGTERMs are then ignored, so the record is
    written whole (torchrun's SIGKILL 30 s on is the backstop). ``restore()`` puts the previous handler back.
    Only the main thread can set handlers; elsewhere this does nothing."""

    def __init__(self):
        self.stopping = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        if not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt("terminated by SIGTERM")

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# ---- checkpoints -----------------------------------------------------------------------------

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STATE = "state"  # state.json (step + the stage's meta) and state.safetensors (RNG + the stage's state tensors)


def capture_rng() -> tuple[dict[str, Any], dict[str, Any]]:
    """The process's RNG state as ``(tensors, json)``: torch's CPU generator (``torch_rng``), CUDA's when present
    (``cuda_rng``), numpy's Mersenne Twister key (``numpy_rng``) as tensors; Python's ``random`` and numpy's
    position as JSON. :func:`restore_rng` puts it back."""
    import random

    import numpy as np
    import torch
    tensors = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_rng"] = torch.from_numpy(np.asarray(key, dtype=np.int64))
    version, py_state, py_gauss = random.getstate()
    return tensors, {"python": [version, list(py_state), py_gauss],
                     "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def restore_rng(tensors: dict[str, Any], json_state: dict[str, Any] | None = None) -> None:
    """Put back what :func:`capture_rng` took; each generator only when the checkpoint holds it (older
    checkpoints hold ``torch_rng`` alone; ``cuda_rng`` needs CUDA here)."""
    import random

    import numpy as np
    import torch
    if "torch_rng" in tensors:
        torch.set_rng_state(tensors["torch_rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda_rng"])
    json_state = json_state or {}
    if "numpy_rng" in tensors and "numpy" in json_state:
        n = json_state["numpy"]
        np.random.set_state((n["kind"], tensors["numpy_rng"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["gauss"]))
    if "python" in json_state:
        version, py_state, py_gauss = json_state["python"]
        random.setstate((version, tuple(py_state), py_gauss))


class Checkpoint:
    """One written checkpoint dir: ``step``, ``meta`` (its ``state.json``), and readers of its files."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta: dict[str, Any] = json.loads((self.path / f"{STATE}.json").read_text())

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def tensors(self, name: str) -> dict[str, Any]:
        """The tensors saved under ``name`` (``<name>.safetensors``)."""
        from safetensors.torch import load_file
        return load_file(str(self.path / f"{name}.safetensors"))

    def load_optimizer(self, opt: Any, name: str = "optim") -> None:
        """Load the optimizer state saved under ``name`` into ``opt`` (anything with ``load_state_dict``)."""
        from .optim import load_optimizer
        load_optimizer(opt, self.path / name)

    def restore_rng(self) -> None:
        """Put the RNG state saved with this checkpoint back (see :func:`restore_rng`)."""
        f = self.path / f"{STATE}.safetensors"
        restore_rng(self.tensors(STATE) if f.exists() else {}, self.meta.get("rng"))


class Checkpoints:
    """The resumable state of a run: ``<run>/checkpoints/step_NNNNNNN/`` dirs and ``latest.json``.

    :meth:`save` writes a whole checkpoint under a temporary name (``.tmp-step_NNNNNNN``), renames it into place,
    then points ``latest.json`` at it (each write atomic), then deletes all but the newest ``keep`` step dirs
    (``keep`` 0 keeps all). A crash at any point leaves ``latest.json`` naming a complete checkpoint (or no
    ``latest.json``). A checkpoint dir holds ``state.json`` (``step`` and the stage's ``meta``), one
    ``<name>.safetensors`` per entry of ``tensors``, ``<name>.safetensors`` + ``<name>.json`` per optimizer, and,
    with ``rng``, the RNG state (:func:`capture_rng`: tensors in ``state.safetensors``, the rest in
    ``state.json['rng']``). Never pickle. ``root`` is a run (anything with ``.path``) or a dir.
    """

    def __init__(self, root: Any, keep: int = 2):
        base = Path(root.path if hasattr(root, "path") else root)
        self.root = base / CHECKPOINTS
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise SaetuneError(f"keep_checkpoints must be an integer of 0 or more (0 keeps all), got {keep!r}")
        self.keep = keep

    def save(self, step: int, tensors: dict[str, dict[str, Any]] | None = None, meta: dict[str, Any] | None = None,
             *, optimizers: dict[str, Any] | None = None, rng: bool = False) -> Path:
        """Write checkpoint ``step`` (see the class); returns its dir. ``optimizers`` maps a file name to an
        optimizer (anything with ``state_dict()``) or to its state dict."""
        from types import SimpleNamespace

        from .optim import save_optimizer
        tensors = {k: dict(v) for k, v in (tensors or {}).items()}
        state_json: dict[str, Any] = {"step": int(step), **(meta or {})}
        if rng:
            rng_tensors, rng_json = capture_rng()
            clash = sorted(set(rng_tensors) & set(tensors.get(STATE, {})))
            if clash:
                raise SaetuneError(f"checkpoint state tensors {clash} clash with the RNG state's names; rename them")
            tensors[STATE] = {**tensors.get(STATE, {}), **rng_tensors}
            state_json["rng"] = rng_json
        final, tmp = self.root / f"step_{step:07d}", self.root / f".tmp-step_{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written one from a killed run
        tmp.mkdir(parents=True)
        for name, ts in tensors.items():
            atomic_save_safetensors(tmp / f"{name}.safetensors", ts)
        for name, o in (optimizers or {}).items():
            save_optimizer(SimpleNamespace(state_dict=lambda o=o: o) if isinstance(o, dict) else o, tmp / name)
        atomic_write_json(tmp / f"{STATE}.json", state_json)
        atomic_replace_dir(tmp, final)
        atomic_write_json(self.root / LATEST, {"step": int(step), "dir": final.name})
        self.prune()
        return final

    def prune(self) -> None:
        """Delete all step dirs but the newest ``keep`` (0 keeps all)."""
        for old in sorted(self.root.glob("step_*"))[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The dir ``latest.json`` names (None without one)."""
        f = self.root / LATEST
        return self.root / json.loads(f.read_text())["dir"] if f.exists() else None

    def load(self, path: str | Path | None = None) -> Checkpoint | None:
        """The checkpoint in ``path`` (default: the latest; None without one). Reading it changes nothing: call
        its ``tensors``, ``load_optimizer`` and ``restore_rng`` in the order the stage needs."""
        d = Path(path) if path is not None else self.latest()
        return Checkpoint(d) if d is not None else None

    def clear(self) -> None:
        """Delete every checkpoint (a finished run keeps none)."""
        shutil.rmtree(self.root, ignore_errors=True)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    f = Path(path) / METRICS
    if not f.exists():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_manifest(path: str | Path) -> dict[str, Any]:
    f = Path(path) / MANIFEST
    if not f.exists():
        raise SaetuneError(f"{str(path)!r} is not a saetune run dir (no {MANIFEST})")
    return json.loads(f.read_text())
