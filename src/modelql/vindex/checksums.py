"""SHA-256 checksums of vindex files (vindex-format spec §10): every file of the directory but
`index.json` (which holds them), taken when the file is written — by extract and COMPILE over the
staging directory, and by `record` for files written into a vindex later (probe labels, clusters).

`verify_checksums` re-hashes what is listed; `check_once` does so for a vindex about to be used
(LQL `USE`, `modelql serve`) and remembers, per file size and mtime, that it passed — so corrupted
gate vectors are an error the first time they would be read, and a clean vindex costs one hash pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 8 << 20
INDEX_FILE = "index.json"

# LARQL's hashed files (modelql hashes these and every other file of the directory)
HASHED_FILES = (
    "gate_vectors.bin", "embeddings.bin", "down_meta.bin", "down_meta.jsonl", "attn_weights.bin",
    "up_weights.bin", "down_weights.bin", "norms.bin", "lm_head.bin", "knn_store.bin",
)


def sha256_file(path: str | Path) -> str:
    """Lowercase hex SHA-256 of a whole file (hashlib releases the GIL, so threads overlap)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_to_hash(directory: str | Path) -> list[str]:
    """The files of a vindex directory that carry a checksum, sorted: all regular files but
    `index.json` and hidden (staging, temporary) ones."""
    d = Path(directory)
    return sorted(p.name for p in d.iterdir() if p.is_file() and p.name != INDEX_FILE and not p.name.startswith("."))


def record(directory: str | Path, names: list[str]) -> None:
    """Re-hash `names` (just written into an existing vindex) into its index.json's checksums. A
    directory without index.json or without checksums (not a vindex, or one from before checksums)
    is left alone."""
    from ..fsutil import atomic_write_json

    d = Path(directory)
    try:
        index = json.loads((d / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(index, dict) or not isinstance(index.get("checksums"), dict):
        return
    index["checksums"].update(compute_checksums(d, [n for n in names if (d / n).is_file()]))
    atomic_write_json(d / INDEX_FILE, index, indent=2)


def compute_checksums(directory: str | Path, names: list[str] | None = None, workers: int = 2) -> dict[str, str]:
    d = Path(directory)
    names = files_to_hash(d) if names is None else names
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = list(pool.map(lambda n: sha256_file(d / n), names))
    return dict(zip(names, digests))


@dataclass
class VerifyReport:
    """Result of `verify`: every listed file re-hashed; `failures` maps file → reason."""

    path: Path
    checked: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # structural errors found while opening
    unlisted: list[str] = field(default_factory=list)  # files without a checksum (older vindexes)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.problems


def structure_problems(directory: str | Path, names: list[str]) -> list[str]:
    """Files among `names` that cannot be what their name says: JSON files that do not parse (or, for
    `feature_labels.json`, keys that are not `L<layer>_F<feature>`), JSON-lines files with a bad line."""
    import re

    d = Path(directory)
    out = []
    for name in names:
        p = d / name
        try:
            if name.endswith(".json"):
                data = json.loads(p.read_text(encoding="utf-8"))
                if name == "feature_labels.json":
                    if not isinstance(data, dict) or not all(re.fullmatch(r"L\d+_F\d+", k) for k in data):
                        raise ValueError("expected an object keyed L<layer>_F<feature>")
                elif not isinstance(data, (dict, list)):
                    raise ValueError("expected a JSON object")
            elif name.endswith(".jsonl"):
                with p.open(encoding="utf-8") as fh:
                    for n, line in enumerate(fh, 1):
                        if line.strip():
                            try:
                                json.loads(line)
                            except ValueError as exc:
                                raise ValueError(f"line {n}: {exc}") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            out.append(f"{name}: not valid ({exc})")
    return out


def verify_checksums(directory: str | Path, checksums: dict[str, str] | None, workers: int = 2) -> VerifyReport:
    """Re-hash every listed file; files present but unlisted are named in `unlisted`; every JSON /
    JSON-lines file is also checked structurally (a file without a checksum is still parsed)."""
    d = Path(directory)
    report = VerifyReport(d)
    listed = dict(checksums or {})
    present = [n for n in listed if (d / n).is_file()]
    for n in listed:
        if n not in present:
            report.failures[n] = "missing"
    actual = compute_checksums(d, present, workers=workers)
    for n in present:
        report.checked.append(n)
        expected = str(listed[n]).lower()
        if actual[n] != expected:
            report.failures[n] = f"checksum mismatch (expected {expected[:12]}…, got {actual[n][:12]}…)"
    if d.is_dir():
        report.unlisted = [n for n in files_to_hash(d) if n not in listed]
        report.problems += structure_problems(d, [n for n in files_to_hash(d) if n not in report.failures])
    return report


def _stamp_dir() -> Path:
    env = os.environ.get("MODELQL_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "modelql") / "verified"


def _stamp(path: Path, expected: str) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{expected.lower()}"
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def check_once(directory: str | Path, checksums: dict[str, str] | None, workers: int = 2) -> dict[str, str]:
    """Failures (file → reason) among the listed files not yet seen intact at their current size
    and mtime; files that pass are remembered under `$MODELQL_CACHE/verified/`."""
    d = Path(directory)
    stamps = _stamp_dir()
    todo: dict[str, tuple[str, Path | None]] = {}
    failures: dict[str, str] = {}
    for name, expected in (checksums or {}).items():
        p = d / name
        if not p.is_file():
            failures[name] = "missing"
            continue
        stamp = stamps / _stamp(p, str(expected))
        if not stamp.exists():
            todo[name] = (str(expected).lower(), stamp)
    if todo:
        actual = compute_checksums(d, list(todo), workers=workers)
        for name, (expected, stamp) in todo.items():
            if actual[name] != expected:
                failures[name] = f"checksum mismatch (expected {expected[:12]}…, got {actual[name][:12]}…)"
                continue
            try:
                stamps.mkdir(parents=True, exist_ok=True)
                stamp.touch()
            except OSError:  # a read-only cache only costs a re-hash next time
                pass
    return failures
