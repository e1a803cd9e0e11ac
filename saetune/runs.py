"""Run directories: the one contract between stages.

Layout (see ARCHITECTURE.md): ``config.yaml``, ``manifest.json`` (status, versions, seed,
device, phase times, artifacts with hashes), ``metrics.jsonl`` and the stage's artifacts.
An existing run dir is refused unless ``resume`` or ``overwrite`` is given; a lock file keeps
two live processes out of one dir.
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
from .io import atomic_write_json, atomic_write_text, sha256_dir, sha256_file

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


class RunDir:
    """A stage's output directory. Use :meth:`open`; then ``phase``, ``log``, ``finish``."""

    def __init__(self, path: Path, stage: str, manifest: dict[str, Any]):
        self.path = path
        self.stage = stage
        self.manifest = manifest
        self._metrics_file = None

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | None, stage: str, cfg: Any, *, resume: bool = False,
             overwrite: bool = False, seed: int | None = None, device: str = "cpu",
             resume_ignore: tuple[str, ...] = ()) -> "RunDir":
        """Create (or, with ``resume``, reopen) the run dir for ``stage`` with config ``cfg``.

        Refuses a dir that holds another run unless ``overwrite``; refuses a resumed run whose
        config differs from the saved one (naming the keys), except keys in ``resume_ignore``.
        """
        if resume and overwrite:
            raise SaetuneError("--resume and --overwrite contradict each other; pass one of them")
        path = Path(path) if path is not None else default_run_dir(stage)
        cfg_dict = _config.to_dict(cfg)
        if path.exists() and not path.is_dir():
            raise SaetuneError(f"output path {str(path)!r} is a file, not a directory; choose another --out")
        exists = path.exists() and any(path.iterdir())
        if exists and (path / LOCK).exists():
            cls._check_lock(path / LOCK)  # a live run's dir: say so before anything else
        if resume:
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
        if exists:
            if not overwrite:
                what = "a run"
                if (path / MANIFEST).exists():
                    m = json.loads((path / MANIFEST).read_text())
                    what = f"a '{m.get('stage')}' run (status {m.get('status')})"
                raise SaetuneError(f"output dir {str(path)!r} already holds {what}; pass --resume to "
                                   "continue it, --overwrite to replace it, or choose another --out")
            shutil.rmtree(path)
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
        p = Path(path)
        if digest is None and p.exists():
            digest = sha256_dir(p) if p.is_dir() else sha256_file(p)
        self.manifest["inputs"][name] = {"path": str(path), "sha256": digest}
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
