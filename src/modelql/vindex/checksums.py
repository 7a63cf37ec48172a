"""SHA-256 checksums of vindex files (vindex-format spec §10)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 8 << 20

# LARQL's hashed files, plus modelql's (*.safetensors, knn_store.bin)
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
    """The files of a vindex directory that carry a checksum, sorted."""
    d = Path(directory)
    names = {n for n in HASHED_FILES if (d / n).is_file()}
    names.update(p.name for p in d.glob("*.safetensors") if p.is_file())
    return sorted(names)


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

    @property
    def ok(self) -> bool:
        return not self.failures and not self.problems


def verify_checksums(directory: str | Path, checksums: dict[str, str] | None, workers: int = 2) -> VerifyReport:
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
    return report
