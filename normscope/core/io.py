"""Atomic file writes: a temporary file (or folder) in the same place, fsync, ``os.replace``."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a unique temp file in the same folder, fsync, ``os.replace``.

    Parent folders are created. On any failure the temp file is removed and an existing ``path`` is left
    untouched. The new file gets the mode of the file it replaces, or ``0o666 & ~umask``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _target_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a new temporary folder beside ``target`` to fill; when the block ends without error it takes
    ``target``'s place (an existing ``target`` is moved aside first, then removed). On any error the temporary
    folder is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():  # os.replace cannot overwrite a non-empty folder
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _target_mode(path: Path) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def slugify(spec: str) -> str:
    """A folder name for ``reports/<slug>/`` that cannot escape ``reports/``."""
    base = spec.rstrip("/\\")
    if os.sep in base or "/" in base:
        parts = [p for p in re.split(r"[\\/]", base) if p not in ("", ".", "..")]
        base = "-".join(parts[-2:]) if parts else "model"
    base = re.sub(r"\.gguf$", "", base)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip(".-_")
    return slug[:80] or "model"
