"""Atomic, durable file writes and hashing.

A write goes to a temporary name in the same directory, is fsync'ed, then renamed over the
target: a reader sees either the old file or the new one, never half of one. Text inputs are
read as UTF-8, a bad byte named by file, line and offset; :func:`check_writable_dir` refuses an
output dir that cannot be written before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import SaetuneError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """0666 less the umask: the mode ``open`` gives a new file. Read from /proc on Linux, which leaves the
    umask alone (setting it to read it back races with threads creating files); elsewhere set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, fsync the result, then rename it onto ``path``.

    The file gets the mode ``open`` would give ``path`` (0666 less the umask): ``mkstemp`` and
    safetensors make theirs 0600, which would leave every run output private to its owner.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, new_file_mode())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written ``tmp_dir`` onto ``final_dir`` (replacing an older one). Its files get the mode
    ``open`` would give them (:func:`new_file_mode`; safetensors writes 0600, e.g. a merged model's weights)."""
    mode = new_file_mode()
    for root, _, files in os.walk(tmp_dir):
        for name in files:
            with open(Path(root) / name, "rb+") as f:
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), mode)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)


def _hash_file(h, path: str | Path, chunk: int) -> None:
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    _hash_file(h, path, chunk)
    return h.hexdigest()


def sha256_dir(path: str | Path) -> str:
    """Hash of every file's relative name and bytes below ``path`` (order-independent)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def checksum_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """Fast content checksum for large data files: ``xxh3_128:<hex>`` (about 10× faster than sha256)."""
    import xxhash
    h = xxhash.xxh3_128()
    _hash_file(h, path, chunk)
    return f"xxh3_128:{h.hexdigest()}"


# ---- reading user text ------------------------------------------------------------------------

def _not_utf8(path: Path, what: str, line: int, offset: int, byte: int) -> SaetuneError:
    return SaetuneError(f"{what} {str(path)!r} is not valid UTF-8: byte 0x{byte:02x} at line {line} (byte offset "
                        f"{offset} in the file); save the file as UTF-8")


def read_text_utf8(path: str | Path, what: str = "file") -> str:
    """The whole file as text; a byte that is not UTF-8 is an error naming ``what``, the file, line and offset."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, what, data.count(b"\n", 0, e.start) + 1, e.start, data[e.start]) from None


def iter_lines_utf8(path: str | Path, what: str = "file") -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line (1-based, newline kept), decoded as UTF-8 as :func:`read_text_utf8`."""
    path = Path(path)
    offset = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                yield i, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, what, i, offset + e.start, raw[e.start]) from None
            offset += len(raw)


# ---- output dirs ------------------------------------------------------------------------------

def check_writable_dir(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output dir that this process cannot create or write, before anything is written: ``path``
    itself when it exists, else its nearest existing ancestor (where it would be created)."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SaetuneError(f"output dir {str(path)!r} cannot be created: {str(probe)!r} is a file, not a directory; "
                           f"choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "it is" if probe == path else f"{str(probe)!r}, where it would be created, is"
        raise SaetuneError(f"output dir {str(path)!r} is not writable: {where} read-only for this user (or on a "
                           f"read-only file system); choose a writable {flag} or change its permissions")
