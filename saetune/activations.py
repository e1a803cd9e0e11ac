"""Activations: a streaming source (Resa computes them on the fly) and an on-disk store.

Store layout (``<run>/activations/``)::

    manifest.json           format, source model, hooks and widths, dtype, context size,
                            token count, one entry per shard with its xxh3-128 checksum
    shard_00000.safetensors one tensor per hook ([n_tokens, d], bf16 by default)
                            plus ``token_ids`` ([n_tokens], int32)

Shards hold a fixed number of packed sequences, so a killed ``cache`` run resumes at the first
missing shard and the finished store equals one written without interruption. Reads check
each shard's checksum once and shuffle across a window of shards, reproducibly from a seed and
a batch position (what a resumed SAE trainer needs).

Fault injection, for tests only: ``SAETUNE_FAULT_AFTER_SHARDS=n`` makes a ``cache`` run SIGKILL itself as
soon as the manifest lists n shards, as an OOM-killed or preempted job dies.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections import deque
from concurrent.futures import ThreadPoolExecutor
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .config import opt
from .data import DataConfig, load_chunks
from .errors import SaetuneError
from .io import atomic_save_safetensors, atomic_write_json, checksum_file
# resolve_device lives in models.py; cache() uses it here
from .models import HookPoint, load_model, parse_dtype, resolve_device, resolve_hook, run_to_hooks
from .runs import record_path, resolve_recorded

FORMAT = "saetune.activations"
TOKEN_KEY = "token_ids"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def estimate_bytes(n_tokens: int, widths: list[int], dtype: torch.dtype) -> int:
    """Bytes a store of ``n_tokens`` takes: one value per token and width, plus int32 token ids."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return n_tokens * (sum(widths) * itemsize + 4)


def check_free_disk(path: Path, need: int, margin: float = 1.1) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need * margin:
        raise SaetuneError(f"not enough disk for the activation cache at {str(path)!r}: it needs about "
                           f"{need / 2**20:.1f} MiB (+10% margin) but {free / 2**20:.1f} MiB are free; free space, "
                           "pick another --out, or lower max_tokens")


class ActivationStore:
    """Read a store written by :func:`cache`. ``path`` is the store dir or a cache run dir."""

    def __init__(self, path: str | Path, verify: bool = True):
        path = Path(path)
        if (path / "activations" / "manifest.json").exists():
            path = path / "activations"
        mf = path / "manifest.json"
        if not mf.exists():
            raise SaetuneError(f"{str(path)!r} is not an activation store (no manifest.json); make one with "
                               "`saetune cache`")
        self.path = path
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format") != FORMAT:
            raise SaetuneError(f"{str(mf)!r} is not a saetune activation store manifest")
        self.verify = verify
        self._verified: set[int] = set()

    # ---- facts ---------------------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    def d(self, hook: str) -> int:
        return int(self.manifest["hooks"][self._hook(hook)]["d"])

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def n_tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.shards)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def model(self) -> str | None:
        """The model the store was made from, usable from any directory (recorded relative to the store when
        it sits in the same pipeline dir, so a moved pipeline dir keeps working)."""
        return resolve_recorded(self.manifest.get("model"), self.path)

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.manifest["dtype"])

    def _hook(self, hook: str) -> str:
        if hook not in self.manifest["hooks"]:
            raise SaetuneError(f"the activation store at {str(self.path)!r} has no hook {hook!r}; "
                               f"it holds: {', '.join(self.hooks)}")
        return hook

    # ---- shard access ----------------------------------------------------------------------
    def _file(self, i: int) -> Path:
        f = self.path / self.shards[i]["file"]
        if not f.exists():
            raise SaetuneError(f"activation shard {str(f)!r} is missing")
        if self.verify and i not in self._verified:
            digest = checksum_file(f)
            if digest != self.shards[i]["checksum"]:
                raise SaetuneError(f"activation shard {str(f)!r} is corrupted or truncated: its checksum does not "
                                   "match the manifest; delete it and resume the cache run to rewrite it")
            self._verified.add(i)
        return f

    def load_shard(self, i: int, hooks: list[str] | str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError, safe_open
        hooks = [hooks] if isinstance(hooks, str) else hooks
        f = self._file(i)
        try:
            with safe_open(str(f), framework="pt") as st:
                return {h: st.get_tensor(self._hook(h)).to(dtype) for h in hooks}
        except SafetensorError as e:
            raise SaetuneError(f"activation shard {str(f)!r} cannot be read ({e}); it is truncated or corrupted") from None

    def token_ids(self, i: int) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(str(self._file(i)), framework="pt") as st:
            return st.get_tensor(TOKEN_KEY)

    def n_batches(self, batch_size: int) -> int:
        return self.n_tokens // batch_size

    def iter_batches(self, hooks: list[str] | str, batch_size: int, shuffle: bool = True, seed: int = 0,
                     start_batch: int = 0, shuffle_window: int = 8, dtype: torch.dtype = torch.float32,
                     ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``batch_size`` tokens (dict hook → [batch_size, d]); the last partial batch is dropped.

        Shuffling permutes the shard order, then the rows of each window of ``shuffle_window``
        shards; batch ``b`` is always the same rows for the same seed, so ``start_batch``
        continues a stream exactly.
        """
        hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        for h in hooks:
            self._hook(h)
        n = len(self.shards)
        if n == 0:
            raise SaetuneError(f"the activation store at {str(self.path)!r} holds no shards")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
        windows = [order[i:i + shuffle_window] for i in range(0, n, shuffle_window)]
        skip = start_batch * batch_size  # tokens of the stream to skip
        carry: dict[str, torch.Tensor] | None = None
        for w_idx, window in enumerate(windows):
            w_tokens = sum(self.shards[i]["n_tokens"] for i in window)
            carried = 0 if carry is None else next(iter(carry.values())).shape[0]
            if skip >= w_tokens + carried:
                # the whole window (and the carry) lies before the start: only counts matter
                skip -= w_tokens + carried
                carry = None
                continue
            parts = [self.load_shard(i, hooks, dtype) for i in window]
            data = {h: torch.cat([p[h] for p in parts]) for h in hooks}
            if shuffle:
                perm = torch.randperm(w_tokens, generator=torch.Generator().manual_seed(seed * 1_000_003 + w_idx))
                data = {h: v[perm] for h, v in data.items()}
            if carry is not None:
                data = {h: torch.cat([carry[h], data[h]]) for h in hooks}
            total = next(iter(data.values())).shape[0]
            pos = skip
            skip = 0
            while pos + batch_size <= total:
                yield {h: data[h][pos:pos + batch_size] for h in hooks}
                pos += batch_size
            carry = {h: data[h][pos:] for h in hooks} if pos < total else None


# ---- writing ---------------------------------------------------------------------------------

@dataclass
class CacheConfig(DataConfig):
    """``saetune cache``: run a model over text and store activations at hook points."""

    model: str = opt("toy", "model: 'toy', a local HF model dir, or a hub id")
    hooks: list[str] = opt(None, "hook points to capture (e.g. model.layers.2); several come from one forward",
                           factory=lambda: ["model.layers.2"])
    dtype: str = opt("bfloat16", "storage dtype of the activations (bfloat16: 2 bytes a value, or float32)")
    model_dtype: str = opt("float32", "dtype the model runs in (Resa: bfloat16 on GPU)")
    device: str = opt("auto", "'auto' (cuda if present), 'cpu' or 'cuda'")
    batch_size: int = opt(16, "sequences per forward pass")
    seqs_per_shard: int = opt(64, "sequences per shard file")
    max_tokens: int = opt(0, "stop after this many tokens (0 = all the data)")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self):
        if not self.hooks:
            raise SaetuneError("cache needs at least one hook point (hooks)")
        if self.batch_size < 1 or self.seqs_per_shard < 1:
            raise SaetuneError(f"batch_size ({self.batch_size}) and seqs_per_shard ({self.seqs_per_shard}) "
                               "must be at least 1")
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise SaetuneError(f"cache dtype {self.dtype!r} is not valid; valid: bfloat16, float32, float16")


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], ready=None) -> str:
    if ready is not None:
        ready.synchronize()  # the non-blocking device→host copies of this shard have landed
    atomic_save_safetensors(path, tensors)
    return checksum_file(path)


def fault_after_shards() -> int | None:
    """Fault injection, for tests only: the shard count (``SAETUNE_FAULT_AFTER_SHARDS``) at which a cache run
    SIGKILLs itself once its manifest lists that many shards; None, the normal case, when unset."""
    raw = os.environ.get("SAETUNE_FAULT_AFTER_SHARDS", "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise SaetuneError(f"SAETUNE_FAULT_AFTER_SHARDS={raw!r} is not a shard count (a test-only fault injection)")
    return int(raw)


def write_store(model, tokenizer, chunks: torch.Tensor, hooks: list[HookPoint], store_dir: Path, *,
                model_name: str, dtype: torch.dtype, batch_size: int, seqs_per_shard: int,
                progress: bool = True, extra: dict | None = None, writers: int = 2) -> "ActivationStore":
    """Write (or continue writing) a store of the activations of ``chunks`` ([N, T] ids) at ``hooks``.

    Shard files are written, fsync'ed and checksummed by ``writers`` background threads while
    the model computes the next shard; the manifest lists shards in order, each only once its
    file is complete, so an interruption at any point leaves a valid prefix.

    Three phases: :func:`_prepare_store` (the manifest to continue, or a new one), the shard loop
    (:func:`_capture_shard` on the model, :class:`_ShardCommits` on the writer threads), and
    :func:`_finish_store` (totals, ``complete``).
    """
    from tqdm.auto import tqdm
    n_seqs, T = chunks.shape
    widths = {h.name: int(model.config.hidden_size) for h in hooks}
    manifest = _prepare_store(store_dir, n_seqs, T, widths, model_name=model_name, dtype=dtype,
                              seqs_per_shard=seqs_per_shard, extra=extra)
    done = len(manifest["shards"])
    bar = tqdm(total=n_seqs * T, initial=done * seqs_per_shard * T, unit="tok", unit_scale=True,
               desc="cache", disable=not progress)
    commits = _ShardCommits(store_dir / "manifest.json", manifest, writers)
    with ThreadPoolExecutor(max_workers=writers) as pool:
        try:
            for s in range(done, math.ceil(n_seqs / seqs_per_shard)):
                lo, hi = s * seqs_per_shard, min((s + 1) * seqs_per_shard, n_seqs)
                host, ready = _capture_shard(model, chunks, hooks, widths, lo, hi, batch_size=batch_size,
                                             dtype=dtype, bar=bar)
                f = store_dir / shard_name(s)
                entry = {"file": f.name, "n_tokens": (hi - lo) * T, "seq_start": lo, "seq_end": hi}
                commits.submit(entry, pool.submit(_write_shard, f, host, ready))
        finally:
            commits.drain()  # every shard computed so far reaches the disk and the manifest
    bar.close()
    return _finish_store(store_dir, manifest)


def _prepare_store(store_dir: Path, n_seqs: int, T: int, widths: dict[str, int], *, model_name: str,
                   dtype: torch.dtype, seqs_per_shard: int, extra: dict | None) -> dict:
    """The manifest a store write starts from: the existing one (refused if it was started with other
    settings), less shard entries whose file vanished, or a new one. Temp files of a killed write are
    removed and the free disk checked against what is still to write; the manifest is written."""
    store_dir.mkdir(parents=True, exist_ok=True)
    mf = store_dir / "manifest.json"
    if mf.exists():
        manifest = json.loads(mf.read_text())
        if manifest["hooks"].keys() != widths.keys() or manifest["context_size"] != T \
                or manifest["seqs_per_shard"] != seqs_per_shard or manifest["n_seqs_planned"] != n_seqs:
            raise SaetuneError(f"the activation store at {str(store_dir)!r} was started with other settings "
                               "(hooks, context size, shard size or data); start a new one")
    else:
        manifest = {"format": FORMAT, "version": 1, "model": model_name,
                    "hooks": {h: {"d": d} for h, d in widths.items()},
                    "dtype": str(dtype).removeprefix("torch."), "context_size": T,
                    "seqs_per_shard": seqs_per_shard, "n_seqs_planned": n_seqs, "checksum": "xxh3_128",
                    "shards": [], "complete": False, **(extra or {})}
    # drop shard entries whose file vanished; files past the manifest are rewritten identically
    manifest["shards"] = [s for s in manifest["shards"] if (store_dir / s["file"]).exists()]
    done = len(manifest["shards"])
    for p in store_dir.glob(".shard_*"):
        p.unlink(missing_ok=True)  # temp files of a killed write
    need = estimate_bytes((n_seqs - done * seqs_per_shard) * T, list(widths.values()), dtype)
    check_free_disk(store_dir, need)
    manifest["estimated_bytes"] = estimate_bytes(n_seqs * T, list(widths.values()), dtype)
    atomic_write_json(mf, manifest)
    return manifest


def _capture_shard(model, chunks: torch.Tensor, hooks: list[HookPoint], widths: dict[str, int], lo: int, hi: int,
                   *, batch_size: int, dtype: torch.dtype, bar) -> tuple[dict[str, torch.Tensor], object]:
    """Host tensors of one shard: the activations of sequences ``lo … hi−1`` at ``hooks`` ([n_tok, d] each,
    ``dtype``) plus ``token_ids``, and the CUDA event after which they are complete (None on CPU).

    On CUDA the host buffers are pinned and the copies non-blocking, so they overlap the next forward
    passes; non-finite activations are refused naming the hook and the batch.
    """
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    T = chunks.shape[1]
    n_tok = (hi - lo) * T
    host = {h.name: torch.empty(n_tok, widths[h.name], dtype=dtype, pin_memory=cuda) for h in hooks}
    for b in range(lo, hi, batch_size):
        ids = chunks[b:min(b + batch_size, hi)].to(device, non_blocking=True)
        acts = run_to_hooks(model, ids, hooks)
        for h in hooks:
            a = acts[h.name]
            if not torch.isfinite(a).all():
                raise SaetuneError(
                    f"non-finite activations (NaN/Inf) at hook {h.name!r} in the batch of sequences "
                    f"{b}…{b + ids.shape[0] - 1}; the shards before it are kept. Check the model's "
                    "weights and dtype")
            r0 = (b - lo) * T
            host[h.name][r0:r0 + ids.numel()].copy_(a.reshape(-1, a.shape[-1]).to(dtype), non_blocking=cuda)
        bar.update(ids.numel())
    ready = None
    if cuda:
        ready = torch.cuda.Event()
        ready.record()
    host[TOKEN_KEY] = chunks[lo:hi].reshape(-1).to(torch.int32)
    return host, ready


class _ShardCommits:
    """Shard writes in flight on the writer threads, committed to the manifest strictly in order.

    At most ``writers`` writes wait; each committed shard gets its checksum and the manifest is
    rewritten, so the manifest always lists a complete prefix of the store. The test-only fault
    (:func:`fault_after_shards`) fires here, once the manifest lists that many shards.
    """

    def __init__(self, mf: Path, manifest: dict, writers: int):
        self.mf, self.manifest, self.writers = mf, manifest, writers
        self.pending: deque = deque()
        self.die_after = fault_after_shards()

    def submit(self, entry: dict, future) -> None:
        self.pending.append((entry, future))
        while len(self.pending) > self.writers:
            self.commit_oldest()

    def commit_oldest(self) -> None:
        entry, fut = self.pending.popleft()
        entry["checksum"] = fut.result()
        self.manifest["shards"].append(entry)
        self.manifest["n_tokens"] = sum(x["n_tokens"] for x in self.manifest["shards"])
        atomic_write_json(self.mf, self.manifest)
        if len(self.manifest["shards"]) == self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def drain(self) -> None:
        while self.pending:
            self.commit_oldest()


def _finish_store(store_dir: Path, manifest: dict) -> "ActivationStore":
    """Mark the store complete with its token and byte totals; the store, opened for reading."""
    manifest["n_tokens"] = sum(x["n_tokens"] for x in manifest["shards"])
    manifest["bytes"] = sum((store_dir / x["file"]).stat().st_size for x in manifest["shards"])
    manifest["complete"] = True
    atomic_write_json(store_dir / "manifest.json", manifest)
    return ActivationStore(store_dir)


def cache(cfg: CacheConfig, out: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """``saetune cache``: a run dir with the activation store in ``activations/``. Returns a summary."""
    from .runs import RunDir
    device = resolve_device(cfg.device)
    run = RunDir.open(out, "cache", cfg, resume=resume, overwrite=overwrite, seed=cfg.data_seed, device=device)
    with run:  # records a failure, Ctrl-C or SIGTERM (RunDir.fail_with)
        with run.phase("load"):
            model, tok = load_model(cfg.model, dtype=cfg.model_dtype, device=device)
            hooks = [resolve_hook(model, h) for h in cfg.hooks]
            chunks = load_chunks(cfg, tok)
            if cfg.max_tokens:
                chunks = chunks[:max(1, cfg.max_tokens // cfg.context_size)]
        est = estimate_bytes(chunks.numel(), [int(model.config.hidden_size)] * len(hooks), parse_dtype(cfg.dtype))
        if cfg.progress:
            print(f"cache: {chunks.numel():,} tokens × {len(hooks)} hook(s) → about {est / 2**20:,.1f} MiB "
                  f"in {str(run.path / 'activations')!r}", flush=True)
        run.add_input("model", cfg.model if cfg.model != "toy" else str(Path(tok.name_or_path)))
        t0 = time.perf_counter()
        with run.phase("capture"):
            store = write_store(model, tok, chunks, hooks, run.path / "activations",
                                model_name=record_path(cfg.model, run.path / "activations", scope=run.path.parent),
                                dtype=parse_dtype(cfg.dtype), batch_size=cfg.batch_size,
                                seqs_per_shard=cfg.seqs_per_shard, progress=cfg.progress,
                                extra={"data": {k: getattr(cfg, k) for k in DataConfig.__dataclass_fields__}})
        dt = time.perf_counter() - t0
        summary = {"n_tokens": store.n_tokens, "n_shards": len(store.shards), "hooks": store.hooks,
                   "bytes": store.manifest["bytes"], "bytes_per_token": store.manifest["bytes"] / store.n_tokens,
                   "capture_seconds": round(dt, 3), "path": str(store.path)}
        run.log({"step": len(store.shards), "tokens": store.n_tokens, "capture_seconds": round(dt, 3)})
        run.manifest["artifacts"]["activations"] = {"path": "activations", "n_tokens": store.n_tokens}
        run.finish(summary=summary)
        return summary


def stream_batches(model, chunks: torch.Tensor, hooks: list[HookPoint], seqs_per_batch: int,
                   start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Activations computed on the fly (Resa's way): batch ``b`` is sequences ``b·S … (b+1)·S−1``.

    Yields dict hook → [S·T, d] float32; the forward stops after the deepest hook.
    """
    device = next(model.parameters()).device
    n = chunks.shape[0] // seqs_per_batch
    for b in range(start_batch, n):
        ids = chunks[b * seqs_per_batch:(b + 1) * seqs_per_batch].to(device)
        acts = run_to_hooks(model, ids, hooks)
        yield {h: a.reshape(-1, a.shape[-1]).float() for h, a in acts.items()}


def prefetch(batches: Iterator[dict[str, torch.Tensor]], depth: int = 2) -> Iterator[dict[str, torch.Tensor]]:
    """Produce up to ``depth`` batches ahead in a background thread while the consumer trains on the
    current one (the model forward and the SAE steps overlap; torch releases the GIL in its ops).

    The order is the producer's, so results do not change; an exception in the producer is raised
    here at the batch where it happened; closing this generator stops the producer.
    """
    if depth <= 0:
        yield from batches
        return
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=produce, name="saetune-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()  # at most the batch in flight: its hooks must not outlive this generator
