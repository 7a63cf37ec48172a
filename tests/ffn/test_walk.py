"""The walk FFN equals the dense FFN with all features, and is the exact top-K sum when sparse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelql.ffn import RoutedFfn, WalkFfn
from modelql.runtime import load_model
from tests.tiny_models import FAMILIES, make_tiny

IDS = torch.randint(0, 211, (1, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_tiny(request.param, d)
    return load_model(d)


def test_walk_full_equals_dense_logits(model):
    dense = model.forward(IDS)
    model.ffn = WalkFfn.from_model(model)
    try:
        walk = model.forward(IDS)
    finally:
        model.ffn = model.dense_ffn
    assert (walk - dense).abs().max() < 1e-4


def test_sparse_with_every_feature_equals_dense(model):
    walk = WalkFfn.from_model(model, k=model.spec.intermediate_size)
    # forward() would take the dense-equivalent path at K = F: call the sparse path directly
    x = torch.randn(5, model.spec.hidden_size, generator=torch.Generator().manual_seed(1))
    full = model.dense_ffn.forward(1, x)
    sparse = walk._sparse(1, x, model.spec.intermediate_size, None)
    if walk.rows[1].down_bias is not None:
        sparse = sparse + walk.rows[1].down_bias
    assert (sparse - full).abs().max() < 1e-4


def test_sparse_top_k_is_the_brute_force_sum(model):
    k = 7
    walk = WalkFfn.from_model(model, k=k)
    x = torch.randn(3, model.spec.hidden_size, generator=torch.Generator().manual_seed(2)).double().numpy()
    out = walk.forward(0, torch.from_numpy(x).float()).double().numpy()
    r = walk.rows[0]
    gate, down_t = r.gate.double().numpy(), r.down_t.double().numpy()
    act = walk.act
    for n in range(3):
        g = gate @ x[n] + (r.gate_bias.double().numpy() if r.gate_bias is not None else 0)
        top = np.argsort(-np.abs(g), kind="stable")[:k]
        a = act(torch.from_numpy(g[top])).numpy()
        if r.up is not None:
            a = a * (r.up.double().numpy()[top] @ x[n])
        ref = a @ down_t[top] + (r.down_bias.double().numpy() if r.down_bias is not None else 0)
        assert np.abs(out[n] - ref).max() < 1e-4


def test_boundary_sweep_dense_below_walk_above_keeps_greedy_top1(model):
    walk = WalkFfn.from_model(model)
    ref = model.forward(IDS)[0].argmax(-1)
    for b in range(model.spec.num_layers + 1):
        model.ffn = RoutedFfn([model.dense_ffn] * b + [walk] * (model.spec.num_layers - b))
        try:
            assert torch.equal(model.forward(IDS)[0].argmax(-1), ref), b
        finally:
            model.ffn = model.dense_ffn
