"""Body strategies for the fuzz runs' binary media types (schemathesis cannot generate them from a
`format: binary` schema): the Q8K batch frame of `/v1/walk-ffn-q8k` — well-formed frames of any
layer and block count, and raw bytes — and raw bytes for LARQL's expert frames (`expert_wire`)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import schemathesis
from hypothesis import strategies as st

from modelql.remote import expert_wire, q8k_wire


def _frame(layers: list[int], blocks: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return q8k_wire.encode_request([(layer, q8k_wire.quantize(rng.standard_normal(blocks * 256).astype(np.float32)))
                                    for layer in layers])


Q8K_FRAMES = st.one_of(
    st.builds(_frame, st.lists(st.integers(0, 40), max_size=4), st.integers(0, 3), st.integers(0, 1000)),
    st.binary(max_size=4096),
)


#: Cases sent per operation label (both runs), reported by the `fuzz_report` fixture.
CASES: Counter = Counter()


def register() -> None:
    schemathesis.openapi.media_type(q8k_wire.MEDIA_Q8K, Q8K_FRAMES)
    for media in (expert_wire.MEDIA_EXPERT, expert_wire.MEDIA_LAYER, expert_wire.MEDIA_LAYER_F16,
                  expert_wire.MEDIA_MULTI, expert_wire.MEDIA_MULTI_Q8K):
        schemathesis.openapi.media_type(media, st.binary(max_size=4096))
