"""INSERT MODE MEMIT: the weight-level batch edit (`knowledge.memit`), recorded as `down_delta` ops."""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterable

import numpy as np

from ..vindex import patch as vlp
from ..vindex.overlay import PatchSession
from .edit_common import InsertResult, fact_triples, install_layer, require_weights, target_id


def insert_memit(ps: PatchSession, items: list[tuple[str, str, str]], layer: int | None,
                  confidence: float | None, hparams: dict) -> list[InsertResult]:
    t0 = time.perf_counter()
    require_weights(ps, "a weight-level INSERT (MODE MEMIT)")
    from . import memit as M

    model = ps.model()
    layers, params = _memit_args(ps, layer, hparams)
    requests = [M.EditRequest(e, r, t) for e, r, t in items]
    deltas = M.memit_edit(model, requests, layers=layers, params=params)
    edit_id = uuid.uuid4().hex[:12]
    conf = None if confidence is None else float(confidence)
    ops = [vlp.DownDeltaOp(int(d.layer), _f32(d.u), _f32(d.v),
                           entity=tuple(e for e, _, _ in items), relation=tuple(r for _, r, _ in items),
                           target=tuple(t for _, _, t in items), edit_id=edit_id,
                           method="memit-neurons" if d.neurons else "memit", confidence=conf,
                           gate=_f32(d.gate), up=_f32(d.up))
           for d in deltas]
    auto = ps.record(ops)
    used = tuple(sorted(int(d.layer) for d in deltas))
    ms = (time.perf_counter() - t0) * 1000
    vx = ps.view
    return [InsertResult(e, r, t, "memit", used[-1] if used else None, target_id(vx, t),
                         1.0 if conf is None else conf, layers=used, auto_patch=auto and i == 0,
                         latency_ms=ms / len(items), neurons=sum(int(d.u.shape[1]) for d in deltas if d.neurons))
            for i, (e, r, t) in enumerate(items)]


def _f32(t) -> np.ndarray | None:
    return None if t is None else t.detach().float().numpy().astype(np.float32)


def _memit_args(ps: PatchSession, layer: int | None, hparams: dict):
    """(edit layers, MemitParams) of an INSERT: `AT LAYER`, else the hyper-parameters' `layers`,
    else MEMIT's default; the other hyper-parameters override `MemitParams` fields."""
    from . import memit as M

    hparams = dict(hparams)
    layers = [install_layer(ps.view, layer)] if layer is not None else None
    if "layers" in hparams:
        layers = list(hparams.pop("layers"))
    params = hparams.pop("params", None)
    if hparams:
        import dataclasses

        params = dataclasses.replace(params or M.MemitParams(), **hparams)
    return layers, params


def memit_statistics_ready(ps: PatchSession, layer: int | None = None, **hparams) -> bool:
    """Whether a weight-level INSERT finds the model's statistics cached; the first one on a
    model computes them (tens of seconds on the embedded model), so LQL shows progress around
    `prepare_memit_statistics` first. True without weights (the INSERT will refuse anyway)."""
    from . import memit as M

    if not ps.has_weights:
        return True
    return M.statistics_ready(ps.model(), *_memit_args(ps, layer, hparams))


def prepare_memit_statistics(ps: PatchSession, layer: int | None = None, facts: Iterable[Any] = (),
                             **hparams) -> None:
    """Compute the model's edit site (traced over `facts`' own prompts when given) and statistics."""
    from . import memit as M

    require_weights(ps, "a weight-level INSERT (MODE MEMIT)")
    reqs = [M.EditRequest(e, r, t) for e, r, t in fact_triples(facts)] if facts else []
    M.prepare_statistics(ps.model(), *_memit_args(ps, layer, hparams), requests=reqs)

