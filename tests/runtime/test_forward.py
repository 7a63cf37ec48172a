"""The forward pass matches HF transformers for every family, with and without the KV cache."""

from __future__ import annotations

import pytest
import torch

from modelql.runtime import load_model
from tests.tiny_models import FAMILIES, make_tiny


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(request.param, d)
    return request.param, hf, load_model(d)


def _ids(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 211, (1, n), generator=g)


def test_full_sequence_logits_match_transformers(pair):
    _, hf, model = pair
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
    ours = model.forward(ids)
    assert (ours - ref).abs().max().item() < 1e-4


def test_incremental_decode_matches_full_recompute(pair):
    _, _, model = pair
    ids = _ids(20, seed=2)
    full = model.forward(ids)
    cache = model.new_cache()
    model.forward(ids[:, :7], cache)
    for t in range(7, 20):
        step = model.forward(ids[:, t : t + 1], cache, logits="last")
        assert (step - full[:, t]).abs().max().item() < 1e-4, t


def test_greedy_generation_matches_transformers(pair):
    _, hf, model = pair
    ids = _ids(6, seed=3)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                          pad_token_id=0, eos_token_id=None)[0, 6:].tolist()
    cache = model.new_cache()
    logits = model.forward(ids, cache, logits="last")
    out = []
    for _ in range(20):
        tok = int(logits.argmax(-1))
        out.append(tok)
        logits = model.forward([[tok]], cache, logits="last")
    assert out == ref
