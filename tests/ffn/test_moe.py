"""The MoE FFN: routing per family flags against a brute-force reference; a token reads only its experts."""

from __future__ import annotations

import pytest
import torch

from modelql.ffn.moe import MoeFfn, route
from modelql.runtime import load_model
from tests.tiny_models import make_tiny


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe_model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_tiny(request.param, d)
    return load_model(d)


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_is_softmax_then_topk(renormalize):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=g)
    weights, ids = route(logits, 2, renormalize)
    for n in range(50):
        probs = [(float(p), e) for e, p in enumerate(torch.softmax(logits[n].double(), -1))]
        best = sorted(probs, reverse=True)[:2]
        total = sum(p for p, _ in best) if renormalize else 1.0
        assert ids[n].tolist() == [e for _, e in best]
        assert weights[n].tolist() == pytest.approx([p / total for p, _ in best], abs=1e-6)


def test_one_token_reads_only_its_experts(moe_model):
    """Poisoning every expert the router did not pick (NaN weights) leaves a token's output unchanged."""
    ffn: MoeFfn = moe_model.ffn
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = ffn.forward(0, x)
        _, ids = ffn.route(0, x)
        chosen = set(ids[0].tolist())
        saved = {}
        for e in range(moe_model.spec.moe.num_experts):
            if e not in chosen:
                saved[e] = (ffn.w_in[0][e], ffn.w_down[0][e])
                ffn.w_in[0][e] = torch.full_like(ffn.w_in[0][e], float("nan"))
                ffn.w_down[0][e] = torch.full_like(ffn.w_down[0][e], float("nan"))
        try:
            out = ffn.forward(0, x)
        finally:
            for e, (w_in, w_down) in saved.items():
                ffn.w_in[0][e], ffn.w_down[0][e] = w_in, w_down
    assert len(saved) == moe_model.spec.moe.num_experts - moe_model.spec.moe.top_k
    assert torch.equal(out, ref)


def test_batch_grouped_by_expert_equals_token_by_token(moe_model):
    ffn: MoeFfn = moe_model.ffn
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        batch = ffn.forward(1, x)
        single = torch.stack([torch.stack([ffn.forward(1, x[b, t][None])[0] for t in range(7)]) for b in range(3)])
    assert (batch - single).abs().max().item() < 1e-5


@pytest.mark.parametrize("model_type", ["stablelm", "starcoder2", "mamba", "deepseek_v3"])
def test_unknown_families_get_a_one_line_refusal(model_type):
    from modelql.errors import UnsupportedModelError
    from modelql.models.families import spec_from_config

    with pytest.raises(UnsupportedModelError) as err:
        spec_from_config({"model_type": model_type, "hidden_size": 64})
    assert "\n" not in str(err.value) and f"unsupported model_type {model_type!r}" in str(err.value)


def test_moe_with_dense_layers_between_is_refused():
    from modelql.errors import UnsupportedModelError
    from modelql.models.families import spec_from_config
    from tests.tiny_models import _configs

    cfg = _configs()["qwen2_moe"]().to_dict()
    cfg["mlp_only_layers"] = [0]
    with pytest.raises(UnsupportedModelError, match="mlp_only_layers"):
        spec_from_config(cfg)


def test_info_shows_experts_and_counts_every_parameter(moe_model):
    import transformers as T
    from typer.testing import CliRunner

    from modelql.cli import app

    result = CliRunner().invoke(app, ["info", str(moe_model.path)])
    assert result.exit_code == 0, result.output
    assert "8 experts × 32, top-2" in result.output or "8 experts × 48, top-2" in result.output
    hf = T.AutoModelForCausalLM.from_pretrained(moe_model.path)
    assert f"({hf.num_parameters():,})" in result.output


@pytest.mark.parametrize("family", ["gemma4", "gemma4_moe"])
def test_info_counts_gemma4_parameters_as_transformers_does(family, tmp_path):
    """Gemma 4's per-block `layer_scalar` is in the checkpoint but is a buffer, not a parameter, in
    transformers: the count leaves it out (and counts the stacked experts once each)."""
    from typer.testing import CliRunner

    from modelql.cli import app

    hf = make_tiny(family, tmp_path / family)
    result = CliRunner().invoke(app, ["info", str(tmp_path / family), "--json"])
    assert result.exit_code == 0, result.output
    import json

    assert json.loads(result.output)["parameters"] == hf.num_parameters()


def test_gemma4_moe_vindex_has_the_dense_ffns_features_as_larql(tmp_path):
    """Gemma 4's experts run beside a dense FFN: as in LARQL's hybrid-MoE vindex, a layer's features
    are the dense FFN's (gate rows = `mlp.gate_proj`), the experts are weights only (`model_config.moe`
    says hybrid); the model read back from the vindex gives transformers' logits, and an edit
    compiles into a checkpoint transformers loads with the experts untouched."""
    import transformers as T
    from safetensors.torch import load_file

    from modelql.knowledge import edit
    from modelql.vindex import Vindex, extract
    from modelql.vindex.compile import compile_model
    from modelql.vindex.overlay import PatchSession
    from tests.edit.moe_model import write_word_tokenizer

    hf = make_tiny("gemma4_moe", tmp_path / "g")
    write_word_tokenizer(tmp_path / "g")
    extract(tmp_path / "g", tmp_path / "g.vindex", level="inference", dtype="f32", clusters=False)
    vx = Vindex.load(tmp_path / "g.vindex")
    w = load_file(str(tmp_path / "g" / "model.safetensors"))
    for layer in range(3):
        info = vx.layer_info(layer)
        assert info.num_features == 48 and info.num_experts is None
        assert torch.equal(vx.gate(layer), w[f"model.layers.{layer}.mlp.gate_proj.weight"])
    moe = vx.index.model_config["moe"]
    assert moe["hybrid"] is True and moe["num_experts"] == 8 and moe["moe_intermediate_size"] == 32
    ids = torch.tensor([[3, 9, 14, 5, 22, 7]])
    model = load_model(tmp_path / "g.vindex")
    with torch.no_grad():
        assert (model.forward(ids) - hf(ids).logits).abs().max().item() < 1e-4
    ps = PatchSession(vx)
    edit.insert(ps, "France", "capital", "Tokyo", mode="compose")
    compile_model(ps, tmp_path / "out", dtype="float32", materialise_knn=False)
    out = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    for layer in range(3):
        got, src = out.model.layers[layer].experts, hf.model.layers[layer].experts
        assert torch.equal(got.gate_up_proj, src.gate_up_proj) and torch.equal(got.down_proj, src.down_proj)
    with torch.no_grad():
        assert (out(ids).logits - ps.model().forward(ids)).abs().max().item() < 1e-4
