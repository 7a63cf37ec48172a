"""Keeping torch's thread pool out of the low-bit decode path's way.

On the low-bit path onnxruntime does a decode step's compute with its own threads; torch only does the
glue (stacking logits, the argmax or sampling over a 49k-wide vocabulary). Run multi-threaded, that glue
wakes torch's OpenMP workers, which then spin-wait for their next job while onnxruntime's threads need
the same cores. On 2 cores, SmolLM2 Q4_1 with int8 activations (in-process A/B, best of 5): 13.3–14.0 ms per
token with the glue on one thread, 19.4–22.0 ms with it on two. The glue is microseconds of work, so it
runs on the calling thread alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def glue_threads(model) -> Iterator[None]:
    """torch single-threaded for the block when `model` computes on onnxruntime (`Model.quant`), else a
    no-op. OpenMP's thread count is per calling thread, so other threads' torch work keeps its pool."""
    if getattr(model, "quant", None) is None or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
