"""What `POST /v1/patches/apply {"url": NAME}` may read: a `.vlp` file inside the server's patch
directory (`modelql serve --patch-dir DIR`), nothing else.

Why: a path taken from a client and opened as given let any client probe the server's file system
(whether a file exists, whether it parses as JSON, field values echoed in errors) and apply any
`.vlp` on the disk to the shared model. Here a name is resolved inside the directory the operator
chose (symlinks included: the resolved file must still be inside it), must end in `.vlp`, is read
up to a size limit, and every error names only what the client sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .body import BodyError, read_json
from .errors import HttpError

SUFFIX = ".vlp"


def resolve(patch_dir: str | None, name: str) -> Path:
    """The file `name` names inside `patch_dir`; `HttpError` (403 without a patch directory, 400 for a
    name that leaves it or is not a `.vlp`, 404 for a missing file)."""
    if patch_dir is None:
        raise HttpError(403, "this server applies patch files only from its patch directory (start it with "
                             "--patch-dir DIR); send the patch inline as 'patch' instead")
    if name.startswith("file://"):
        name = name[len("file://"):]
    if not name or "://" in name or "\x00" in name or "\\" in name or name.startswith(("/", "~")) \
            or any(part == "" or part.startswith(".") for part in name.split("/")) or not name.endswith(SUFFIX):
        raise HttpError(400, f"invalid patch name {name!r}: give a {SUFFIX} file name relative to the server's "
                             f"patch directory (no absolute paths, no '..')")
    root = Path(patch_dir).expanduser().resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise HttpError(404, f"patch {name!r} not found in the server's patch directory")
    return path


def listing(patch_dir: str | None) -> list[dict]:
    """The `.vlp` files directly inside `patch_dir` (name, bytes, modified): what a client may apply by name."""
    if patch_dir is None:
        raise HttpError(403, "this server has no patch directory (start it with --patch-dir DIR)")
    root = Path(patch_dir).expanduser().resolve()
    rows = []
    for p in sorted(root.iterdir()):
        if p.name.endswith(SUFFIX) and not p.name.startswith(".") and p.is_file() \
                and p.resolve().is_relative_to(root):
            st = p.stat()
            rows.append({"name": p.name, "bytes": st.st_size, "modified": int(st.st_mtime)})
    return rows


def read(path: Path, name: str, limit: int) -> Any:
    """The parsed JSON of a resolved patch file, at most `limit` bytes."""
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError:
        raise HttpError(404, f"patch {name!r} cannot be read from the server's patch directory") from None
    if len(raw) > limit:
        raise HttpError(413, f"patch {name!r} is larger than the limit of {limit} bytes", code="request_too_large")
    try:
        return read_json(raw)
    except BodyError as exc:
        raise HttpError(400, f"failed to load patch: {name} is not valid JSON ({exc.msg})") from None
