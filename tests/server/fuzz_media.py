"""Body strategies for the fuzz runs' binary media types (schemathesis cannot generate them from a
`format: binary` schema): the Q8K batch frame of `/v1/walk-ffn-q8k` — well-formed frames of any
layer and block count, and raw bytes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import schemathesis
from hypothesis import strategies as st

from modelql.remote import q8k_wire


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
