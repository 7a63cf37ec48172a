"""The forward pass matches HF transformers for every family, with and without the KV cache."""

from __future__ import annotations

import pytest
import torch

from modelql.runtime import load_model
from tests.tiny_models import RUNTIME_FAMILIES, make_tiny


@pytest.fixture(scope="module", params=RUNTIME_FAMILIES)
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


def test_packed_block_decode_matches_per_sequence(pair):
    """Decode steps of sequences packed in a KVBlock (one fused, masked attention call per layer;
    window-masked on sliding layers) give the logits each sequence gets alone — also after the
    block grows and after a sequence leaves and the others are moved down."""
    from modelql.runtime.model import KVBlock

    _, _, model = pair
    prompts = [_ids(3, seed=4), _ids(9, seed=5), _ids(14, seed=6)]
    alone, packed = [model.new_cache() for _ in prompts], [model.new_cache() for _ in prompts]
    last_alone = [model.forward(p, c, logits="last") for p, c in zip(prompts, alone)]
    for p, c in zip(prompts, packed):
        model.forward(p, c, logits="none")
    block = KVBlock(model.spec, model.dtype, slots=4, capacity=4)  # forces growth while decoding
    for i, c in enumerate(packed):
        block.place(c, i)
    toks = [int(x.argmax(-1)) for x in last_alone]
    live = [0, 1, 2]
    for stepno in range(12):
        if stepno == 5:  # sequence 0 leaves; the others move down to slots 0..1
            live = [1, 2]
            for slot, i in enumerate(live):
                block.move(packed[i].slot, slot)
        assert block.packed([packed[i] for i in live])
        out = model.forward([[toks[i]] for i in live], [packed[i] for i in live], logits="last")
        for row, i in enumerate(live):
            ref = model.forward([[toks[i]]], alone[i], logits="last")[0]
            assert (out[row] - ref).abs().max().item() < 1e-4, (stepno, i)
            toks[i] = int(ref.argmax(-1))
    assert block.capacity >= 14 + 12


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "one-by-one"])
def test_packed_sequences_match_each_alone(pair, fused, monkeypatch):
    """`forward_packed`: sequences of different lengths in one row, each after its own cache (one
    empty, two holding a prompt), give the residuals each gets alone, and leave the caches as a
    sequence-by-sequence run does (the next step reads the same logits) — with the attention of
    every sequence in one block-masked call and with one call per sequence (a large pass)."""
    from modelql.errors import CapabilityError
    from modelql.runtime import model as model_mod

    if not fused:
        monkeypatch.setattr(model_mod, "PACKED_FUSED_SCORES", 0)
    _, _, model = pair
    heads = [None, _ids(5, seed=7), _ids(11, seed=8)]
    tails = [_ids(4, seed=9)[0].tolist(), _ids(1, seed=10)[0].tolist(), _ids(7, seed=11)[0].tolist()]

    def caches():
        out = []
        for hd in heads:
            c = model.new_cache()
            if hd is not None:
                model.forward(hd, c, logits="none")
            out.append(c)
        return out

    alone_c, packed_c = caches(), caches()
    alone = [model.forward([t], c, logits="none")[0] for t, c in zip(tails, alone_c)]
    try:
        h, offsets = model.forward_packed(tails, packed_c)
    except CapabilityError:
        assert model.spec.per_layer_input or model.spec.learned_positions
        return
    for a, o, t in zip(alone, offsets, tails):
        assert (h[o:o + len(t)] - a).abs().max().item() < 1e-4
    nxt = [[3], [5], [7]]
    for c_a, c_p, t in zip(alone_c, packed_c, nxt):
        assert c_a.length == c_p.length
        assert (model.forward([t], c_a, logits="last") - model.forward([t], c_p, logits="last")).abs().max() < 1e-4
