"""Shards that own experts: a tiny random MoE model split by expert across two `--ffn-only --experts`
shard servers (127.0.0.1, free ports, always stopped); a client that routes each token's experts to
the shards owning them gives the local model's logits (transformers' logits are the local model's
reference in tests/runtime/test_forward.py)."""

from __future__ import annotations

import contextlib

import httpx
import pytest
import torch

from modelql.errors import RemoteError
from modelql.remote.client import load_remote_model
from modelql.runtime import load_model
from tests.tiny_models import make_tiny

from .conftest import shard_inprocess, shard_process

IDS = [[5, 17, 33, 2, 99, 150, 7, 8, 61, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]


def logits_gap(local, remote) -> float:
    with torch.inference_mode():
        return (local.forward(IDS) - remote.forward(IDS)).abs().max().item()


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    make_tiny("mixtral", d)
    return d


def test_mixtral_split_by_expert_across_two_shard_processes(mixtral_dir):
    """`modelql serve --ffn-only --experts 0-3` and `--experts 4-7`: each shard loads half the experts,
    advertises its range, refuses the other half; the client's logits are the local model's."""
    local = load_model(mixtral_dir)
    ref = str(mixtral_dir)
    with shard_process("--experts", "0-3", ref=ref) as (_, a), shard_process("--experts", "4-7", ref=ref) as (_, b):
        ta, tb = httpx.get(a + "/v1/expert/topology").json(), httpx.get(b + "/v1/expert/topology").json()
        assert (ta["owned_start"], ta["owned_end"], tb["owned_start"], tb["owned_end"]) == (0, 3, 4, 7)
        assert ta["num_experts"] == 8 and ta["num_layers"] == 2
        r = httpx.post(a + "/v1/expert/1/5", json={"residual": [0.0] * 64})
        assert r.status_code == 400 and "not owned by this shard" in r.json()["error"]["message"]
        r = httpx.post(a + "/v1/walk-ffn", json={"layers": [0], "residual": [0.0] * 64, "full_output": True})
        assert r.status_code == 400 and "every expert" in r.json()["error"]["message"]
        model = load_remote_model(mixtral_dir, f"{a},{b}")
        try:
            assert not any(".experts." in k for k in model.weights)  # the client holds no expert weights
            assert [s.experts for s in model.ffn.shards] == [(0, 3), (4, 7)]
            assert logits_gap(local, model) < 1e-4
            assert model.ffn.stats.requests == 2 * 2  # one multi-layer-batch per shard and layer
            cache = model.new_cache()  # decode with the KV cache: one token at a time, same logits
            with torch.inference_mode():
                steps = [model.forward([[t]], caches=[cache])[0, -1] for t in IDS[0]]
                full = local.forward([IDS[0]])[0]
            assert (torch.stack(steps) - full).abs().max().item() < 1e-4
        finally:
            model.ffn.close()


@pytest.mark.parametrize("family,split", [("qwen2_moe", ("0-3", "4-8")), ("gemma4_moe", ("0-3", "4-7"))])
def test_shared_expert_and_gemma4_experts_across_shards(family, split, tmp_path):
    """Qwen2-MoE's shared expert (id 8, sigmoid-gated by the client) lives on the second shard; Gemma 4's
    dense FFN comes from /v1/walk-ffn and its experts (normed by the shards) from the expert routes."""
    make_tiny(family, tmp_path / family)
    local = load_model(tmp_path / family)
    with shard_inprocess(tmp_path / family, experts=split[0]) as a, shard_inprocess(tmp_path / family, experts=split[1]) as b:
        model = load_remote_model(tmp_path / family, f"{a},{b}")
        try:
            assert logits_gap(local, model) < 1e-4
        finally:
            model.ffn.close()


def test_layers_and_experts_split_with_failover(mixtral_dir):
    """Shards by layer and by expert at once; when the preferred owner of experts 4-7 goes away, its
    experts fail over to a replica; an expert nobody owns is refused when connecting."""
    local = load_model(mixtral_dir)
    with contextlib.ExitStack() as stack:
        whole0 = stack.enter_context(shard_inprocess(mixtral_dir, layers="0-0"))
        low1 = stack.enter_context(shard_inprocess(mixtral_dir, layers="1-1", experts="0-3"))
        with pytest.raises(RemoteError, match="no FFN shard owns experts 4, 5, 6, 7 of layer 1"):
            load_remote_model(mixtral_dir, f"{whole0},{low1}")
        doomed = contextlib.ExitStack()
        stack.callback(doomed.close)
        high1 = doomed.enter_context(shard_inprocess(mixtral_dir, layers="1-1", experts="4-7"))
        replica = stack.enter_context(shard_inprocess(mixtral_dir, layers="1-1", experts="4-7"))
        model = load_remote_model(mixtral_dir, f"{whole0},{low1},{high1},{replica}")
        try:
            assert logits_gap(local, model) < 1e-4 and model.ffn.stats.failovers == 0
            doomed.close()  # the preferred owner of experts 4-7 goes away
            assert logits_gap(local, model) < 1e-4
            assert model.ffn.stats.failovers == 1
            assert not [s for s in model.ffn.shards if s.url == high1][0].healthy
        finally:
            model.ffn.close()
