"""The embedded default model's vindex: extracted on first use into a cache, reused afterwards.

With no USE, LQL runs against the vindex of ``modelql.defaults.DEFAULT_MODEL_DIR``. It is built
the first time it is needed (inference level, so INFER and TRACE work too) into::

    $MODELQL_CACHE/vindex/modelql-default-<fingerprint>.vindex     (default cache: ~/.cache/modelql)

The fingerprint hashes the model's files (names, sizes, contents) and ``RECIPE`` (what we build
into the vindex), so a retrained model, or a new recipe, extracts afresh while an unchanged one
is reused. The same machinery serves ``USE MODEL "dir" AUTO_EXTRACT`` (``ensure_vindex``).

Concurrency: two processes asking at once are safe. Extraction runs in a private staging
directory next to the target and is renamed into place in one step; an advisory lock makes the
second process wait for the first instead of extracting twice (and if locking is unavailable,
the loser of the rename simply discards its copy). A cached directory whose ``index.json`` no
longer reads is moved aside and rebuilt.

Progress goes to stderr (a bar on a terminal, a start and an end line otherwise) so batch output
on stdout stays clean.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from modelql.errors import ModelNotFoundError, VindexError

__all__ = [
    "RECIPE", "DEFAULT_NAME", "cache_dir", "fingerprint", "cached_path", "ensure_vindex",
    "default_vindex_path", "default_model_installed",
]

#: Bump when what goes into a cached vindex changes (level, dtype, labelling): old caches are
#: then ignored (and can be deleted) instead of being served stale.
RECIPE = "lql-default/2 level=inference dtype=f16"  # 2: probe_meta records objects_per_subject
LEVEL = "inference"
DTYPE = "f16"
#: The model id of the embedded model (as `/v1/models` reports it).
DEFAULT_NAME = "modelql-default"

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """``$MODELQL_CACHE`` or ``~/.cache/modelql``."""
    env = os.environ.get("MODELQL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modelql"


def default_model_dir() -> Path:
    from modelql.defaults import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR


def default_model_installed() -> bool:
    """Whether the embedded default model ships with this installation."""
    return (default_model_dir() / "config.json").is_file()


def _labeller():
    """``modelql.knowledge.labels.label_vindex``, or None where the labeller is unavailable."""
    try:
        from modelql.knowledge.labels import label_vindex
    except ImportError:
        return None
    return label_vindex


def recipe(label: bool) -> str:
    """What a cached vindex is built with: RECIPE, plus whether probe labels are added."""
    if not label or _labeller() is None:
        return RECIPE
    from modelql.knowledge import labels

    return RECIPE + f" labels=default-facts min_z={getattr(labels, 'DEFAULT_MIN_Z', '?')}"


def fingerprint(model_dir: str | Path, label: bool = False) -> str:
    """A hex digest of every regular file of ``model_dir`` (relative name, size, bytes) and of
    the recipe (``recipe(label)``)."""
    root = Path(model_dir)
    h = hashlib.sha256(recipe(label).encode())
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    for p in files:
        rel = p.relative_to(root).as_posix()
        h.update(f"\0{rel}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()[:16]


def cached_path(model_dir: str | Path, name: str | None = None, *, label: bool = False) -> Path:
    """Where the vindex of ``model_dir`` lives in the cache (whether or not it exists yet)."""
    model_dir = Path(model_dir)
    name = name or _safe_name(model_dir.resolve().name or "model")
    return cache_dir() / "vindex" / f"{name}-{fingerprint(model_dir, label)}.vindex"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "model"


def default_vindex_path(*, progress: bool | None = None) -> Path:
    """The embedded default model's vindex, extracted into the cache first if needed."""
    model_dir = default_model_dir()
    if not default_model_installed():
        raise ModelNotFoundError(f"the embedded default model is not installed ({model_dir} is missing)")
    return ensure_vindex(model_dir, name=DEFAULT_NAME, model_id=DEFAULT_NAME, progress=progress, label=True)


def ensure_vindex(
    model_dir: str | Path,
    *,
    name: str | None = None,
    model_id: str | None = None,
    progress: bool | None = None,
    label: bool = False,
    extract_fn: Callable[..., object] | None = None,
) -> Path:
    """The cached inference-level vindex of the HF model directory ``model_dir``; extract it first
    if it is not in the cache. ``progress``: None = a bar when stderr is a terminal. ``label``:
    also probe-label it with the default facts (the embedded model's ground truth)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    final = cached_path(model_dir, name, label=label)
    if _usable(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{final.name}.lock"):
        if _usable(final):  # another process finished while we waited
            return final
        if final.exists():  # unreadable leftovers: move aside, rebuild
            _discard(final)
        _build(model_dir, final, model_id or name or model_dir.name, progress, label, extract_fn)
    return final


def _usable(path: Path) -> bool:
    if not (path / "index.json").is_file():
        return False
    from modelql.vindex.format import IndexJson

    try:
        IndexJson.read(path)
    except (VindexError, OSError):
        return False
    return True


def _discard(path: Path) -> None:
    aside = path.parent / f".{path.name}.broken.{os.getpid()}.{time.monotonic_ns()}"
    try:
        os.rename(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no-op where flock is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # pragma: no cover - e.g. some network filesystems
            pass
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:  # pragma: no cover
            pass
        os.close(fd)


def _build(model_dir: Path, final: Path, model_id: str, progress: bool | None, label: bool,
           extract_fn: Callable[..., object] | None) -> None:
    if extract_fn is None:
        from modelql.vindex import extract as extract_fn
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging.", dir=final.parent))
    out = staging / final.name
    try:
        with Progress(f"Extracting the vindex of {model_dir.name} (first use) into {final} ...", progress) as show:
            extract_fn(model_dir, out, level=LEVEL, dtype=DTYPE, progress=False, model_id=model_id,
                       on_layer=show.layer)
            if label and _labeller() is not None:
                show.stage("probe labels (default facts)")
                _labeller()(out)
            try:
                os.rename(out, final)
            except OSError:
                if not _usable(final):  # not a lost race: a real failure
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class Progress:
    """Progress of a long step on stderr: a rich bar on a terminal, two plain lines otherwise.

    ``layer`` is extract's ``on_layer`` callback; ``enabled`` None = a bar when stderr is a tty.
    As a context manager: started on entry, "Done in …" on success, the bar removed on error.
    """

    def __init__(self, message: str, enabled: bool | None):
        self.message = message
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        self.task = None
        self.t0 = time.perf_counter()

    def __enter__(self) -> "Progress":
        self.start()
        return self

    def __exit__(self, kind, _exc, _tb) -> None:
        if kind is None:
            self.done()
        else:
            self.abort()

    def _console(self):
        from rich.console import Console

        return Console(stderr=True, highlight=False, soft_wrap=True)

    def start(self) -> None:
        msg = self.message
        if not self.tty:
            print(msg, file=sys.stderr, flush=True)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        console = self._console()
        console.print(msg, markup=False)
        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("layers", total=None)

    def layer(self, i: int, n: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, total=n, completed=i + 1,
                            description="layers" if i + 1 < n else "relation clusters")

    def stage(self, name: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=name)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        secs = time.perf_counter() - self.t0
        print(f"Done in {secs:.1f}s.", file=sys.stderr, flush=True)

    def abort(self) -> None:
        if self.bar is not None:
            self.bar.stop()
