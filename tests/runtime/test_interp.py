"""Hook-based interpretability: captures equal transformers' hidden states; interventions do what they say."""

from __future__ import annotations

import pytest
import torch

from modelql.runtime import load_model
from modelql.runtime import interp
from tests.tiny_models import RUNTIME_FAMILIES, make_tiny


@pytest.fixture(scope="module", params=RUNTIME_FAMILIES)
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(request.param, d)
    return hf, load_model(d)


IDS = torch.randint(0, 211, (1, 12), generator=torch.Generator().manual_seed(7))


def test_residual_captures_match_transformers_hidden_states(pair):
    hf, model = pair
    with torch.no_grad():
        ref = hf(IDS, output_hidden_states=True).hidden_states
    n = model.spec.num_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + ["ln_final.hook_normalized"]
    _, cache = interp.run_with_cache(model, IDS, names)
    for i in range(n):
        assert (cache[names[i]] - ref[i][0]).abs().max() < 1e-4, i
    assert (cache["ln_final.hook_normalized"] - ref[n][0]).abs().max() < 1e-4


def test_residual_is_the_sum_of_its_contributions(pair):
    _, model = pair
    if model.spec.layer_scalar:
        pytest.skip("Gemma 4 scales each block's output and adds per-layer embeddings: not a plain sum")
    _, cache = interp.run_with_cache(model, IDS)
    h = cache["blocks.0.hook_resid_pre"]
    for i in range(model.spec.num_layers):
        h = h + cache[f"blocks.{i}.hook_attn_out"] + cache[f"blocks.{i}.hook_mlp_out"]
        assert torch.allclose(h, cache[f"blocks.{i}.hook_resid_post"], atol=1e-5)


def test_ablating_every_feature_equals_zero_ablating_the_mlp(pair):
    _, model = pair
    layer = 1
    a = interp.run_with_hooks(model, IDS, interp.zero_ablate(layer, "mlp"))
    feats = range(model.spec.intermediate_size)
    moe = model.spec.moe
    if moe is not None and not moe.beside_dense:  # every expert's features, as the vindex numbers them
        feats = range(model.ffn.num_features(layer))
    if moe is not None and moe.beside_dense:  # Gemma 4: the experts run beside the dense features
        b = interp.run_with_hooks(model, IDS, interp.ablate_features(layer, feats))
        assert (a - b).abs().max() > 1e-3
    elif model.spec.gated_ffn:
        b = interp.run_with_hooks(model, IDS, interp.ablate_features(layer, feats))
        assert torch.allclose(a, b, atol=1e-5)
    base = model.forward(IDS)[0]
    assert (a - base).abs().max() > 1e-3


def test_zero_steering_is_identity_and_real_steering_moves_logits(pair):
    _, model = pair
    base = model.forward(IDS)[0]
    zero = torch.zeros(model.spec.hidden_size)
    assert torch.equal(interp.run_with_hooks(model, IDS, interp.steer(1, zero, 3.0)), base)
    v = torch.randn(model.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    assert (interp.run_with_hooks(model, IDS, interp.steer(1, v, 3.0)) - base).abs().max() > 1e-3


def test_patching_the_whole_residual_transplants_the_donor(pair):
    _, model = pair
    if model.spec.per_layer_input:
        pytest.skip("Gemma 4's per-layer embeddings read the token ids, not the residual")
    donor = torch.randint(0, 211, (1, 12), generator=torch.Generator().manual_seed(8))
    patched = interp.activation_patch(model, donor, IDS, ["blocks.0.hook_resid_pre"], positions=range(12))
    assert torch.allclose(patched, model.forward(donor)[0], atol=1e-5)


def test_logit_lens_last_layer_is_the_model_prediction(pair):
    _, model = pair
    rows = interp.logit_lens(model, IDS, k=3)
    assert len(rows) == model.spec.num_layers
    probs = torch.softmax(model.forward(IDS)[0, -1].double(), -1)
    top = torch.topk(probs, 3)
    assert [r.token_id for r in rows[-1]] == top.indices.tolist()
    assert rows[-1][0].prob == pytest.approx(float(top.values[0]), abs=1e-6)


def test_unknown_hook_point_is_a_clear_error(pair):
    _, model = pair
    from modelql.errors import ModelqlError

    with pytest.raises(ModelqlError, match="unknown hook point"):
        interp.run_with_cache(model, IDS, ["blocks.0.nope"])


def test_last_token_rerun_equals_the_full_forward_and_leaves_its_caches_as_they_were(pair):
    hf, model = pair
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (1, 5, 12, 9)]
    rerun = interp.LastTokenRerun(model, seqs)
    shift = torch.randn(model.spec.hidden_size, generator=g)
    name = f"blocks.{model.spec.num_layers // 2}.hook_mlp_out"
    for _ in range(2):  # the second call must see the same prefixes: nothing is left in the caches
        got = rerun.logits({name: lambda t, _n: t + shift})
        for i, s in enumerate(seqs):
            ids = torch.tensor([s])

            def at_last(t, _n, n=len(s)):
                t = t.clone()
                t[:, n - 1] += shift
                return t

            ref = model.forward(ids, hooks={name: at_last}, logits="last")[0]
            assert (got[i] - ref).abs().max() < 1e-4, (i, len(s))
    with torch.no_grad():  # and with no hook it is the model's own next-token prediction
        hf_last = torch.stack([hf(torch.tensor([s])).logits[0, -1] for s in seqs])
    assert (rerun.logits() - hf_last).abs().max() < 1e-3
