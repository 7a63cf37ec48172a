"""Where a model's edit statistics live: keyed by a fingerprint of its weights, cached in memory
and in $MODELQL_CACHE/memit/, always computed on the base weights."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from ..runtime.model import Model


def fingerprint(model: Model) -> str:
    """sha256 of the model's weights (names, shapes, and an evenly strided sample of ≤ 64k values
    per tensor, so a multi-GB model hashes in well under a second): the key of the on-disk
    statistics. Any retraining or fine-tune moves the sampled values too."""
    fp = model.__dict__.get("_memit_fingerprint")
    if fp is None:
        import hashlib

        h = hashlib.sha256()
        for name in sorted(model.weights):
            t = model.weights[name].detach()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.reshape(-1)
            h.update(flat[:: max(1, flat.numel() // 65536)].float().contiguous().numpy().tobytes())
        fp = model.__dict__["_memit_fingerprint"] = h.hexdigest()[:16]
    return fp


def stored_path(model: Model, name: str):
    from ..lql.default_vindex import cache_dir

    return cache_dir() / "memit" / f"{fingerprint(model)}-{name}.pt"


def stored(model: Model, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`compute()` cached in $MODELQL_CACHE/memit/<weights fingerprint>-<name>.pt, so a server or
    a new session pays for the base-weight statistics once per model, not once per INSERT
    (written to a temp file and renamed; an unreadable cache file is recomputed)."""
    from ..fsutil import atomic_open

    path = stored_path(model, name)
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 — a missing or damaged cache entry is simply recomputed
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb", encoding=None) as f:
            torch.save(value, f)
    except OSError:
        pass  # a read-only cache only costs time
    return value


@contextmanager
def base_ffn(model: Model):
    """Run `model` with its dense FFN for the block: the statistics below are of the base weights
    (that is what their cache key says), whatever overlay or pending edit `model` runs with."""
    saved = model.ffn
    model.ffn = model.dense_ffn or saved
    try:
        yield model
    finally:
        model.ffn = saved
