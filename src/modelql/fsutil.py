"""Atomic writes: a reader never sees half a file or directory, and a failure leaves none behind.

A file is written under a unique temporary name in the destination's own directory (the same
filesystem, so the final `os.replace` is atomic) and renamed over the destination; on any failure,
KeyboardInterrupt included, the temporary file is removed. A directory is built in a staging
directory next to the destination and renamed into place the same way.

Temporary names are `.<name>.<pid>.<random>.tmp`: unique per writer (threads and processes may
write the same destination at once; the last rename wins), hidden, and recognisable. Files are
created with the usual permissions (0666 less the umask), unlike `tempfile.mkstemp`'s 0600.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


def _temp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


def _create(path: Path) -> tuple[int, Path]:
    """A new, empty temporary file next to `path`: (its descriptor, its path)."""
    while True:
        tmp = _temp_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """`open(path, mode)` for writing ("w" or "wb"), made atomic: the file appears at `path`, whole,
    when the block ends without an exception."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    fd, tmp = _create(path)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path` for writers that open files themselves (e.g. gguf's
    writer); renamed onto `path` when the block ends without an exception, else deleted."""
    path = Path(path)
    fd, tmp = _create(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` as UTF-8."""
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    """Write `obj` as UTF-8 JSON (non-ASCII characters kept as they are) ending in a newline."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


# -- directories -------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or not a pid we can test): leave its files alone
    return True


def remove_stale(out: str | Path) -> list[Path]:
    """Delete the staging directories and temporary files of `out` left by writers that died
    (killed extract / COMPILE runs): `.<name>.<pid>.<random>.tmp|old` whose process is gone."""
    out = Path(out)
    removed = []
    try:
        candidates = list(out.parent.glob(f".{glob_escape(out.name)}.*.*.*"))
    except OSError:
        return removed
    for p in candidates:
        parts = p.name[len(out.name) + 2:].split(".")
        if len(parts) != 3 or parts[2] not in ("tmp", "old") or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def staging_directory(out: str | Path) -> Path:
    """Create and return an empty staging directory next to `out` (its parents are created),
    first removing the staging left next to it by killed runs (`remove_stale`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    while True:
        tmp = _temp_name(out)
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:  # pragma: no cover
            continue


def replace_directory(staging: str | Path, out: str | Path) -> None:
    """Rename `staging` to `out`. Whatever `out` held is first moved aside (one rename, so `out`
    is never missing for longer than between two renames) and deleted after."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        os.replace(staging, out)
        return
    aside = _temp_name(out, "old")
    os.replace(out, aside)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(aside, out)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """A staging directory to fill; it replaces `out` when the block ends without an exception,
    and is deleted when it raises."""
    staging = staging_directory(out)
    try:
        yield staging
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
