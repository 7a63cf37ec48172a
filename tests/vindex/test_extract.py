"""Extraction is exact: gates, down_meta, embeddings; f16 within rounding; weights form a HF checkpoint."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from modelql.errors import ModelqlError, VindexError
from modelql.vindex import Vindex, extract
from modelql.vindex import format as fmt
from tests.tiny_models import FAMILIES
from tests.vindex.helpers import (BLANK_IDS, assert_topk_matches, decoded_vocab, make_model,
                                  reference_down_meta)


def hf_gate_down(model, name: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(gate rows [F, H], down [H, F]) straight from the HF state dict (up rows for GPT-2)."""
    sd = model.state_dict()
    if name == "gpt2":
        p = f"transformer.h.{layer}.mlp."
        return sd[p + "c_fc.weight"].T.numpy(), sd[p + "c_proj.weight"].T.numpy()
    p = f"model.layers.{layer}.mlp."
    if name == "phi3":
        gu = sd[p + "gate_up_proj.weight"]
        return gu[: gu.shape[0] // 2].numpy(), sd[p + "down_proj.weight"].numpy()
    return sd[p + "gate_proj.weight"].numpy(), sd[p + "down_proj.weight"].numpy()


@pytest.mark.parametrize("name", FAMILIES)
def test_f32_extraction_is_exact(name, tiny, extracted):
    model_dir, model = tiny[name]
    vx = Vindex.load(extracted(name))
    E_src = model.get_input_embeddings().weight.detach().numpy()
    assert vx.layers() == list(range(model.config.num_hidden_layers))
    # embeddings bit-for-bit
    assert vx.embeddings().numpy().tobytes() == E_src.astype(np.float32).tobytes()
    texts = decoded_vocab(model_dir, E_src.shape[0])
    exact = total = 0
    for layer in vx.layers():
        G, D = hf_gate_down(model, name, layer)
        # gate rows bit-for-bit (up rows for the non-gated GPT-2 FFN)
        assert vx.gate(layer).numpy().tobytes() == G.astype(np.float32).tobytes()
        assert vx.num_features(layer) == G.shape[0]
        # down_meta equals brute-force numpy
        ref = reference_down_meta(E_src, D, vx.down_top_k, texts)
        for f, (top, c, pairs) in enumerate(ref):
            meta = vx.feature_meta(layer, f)
            if not pairs:
                assert meta is None
                continue
            full = E_src.astype(np.float64) @ D[:, f].astype(np.float64)
            assert_topk_matches([(i, v) for _, i, v in meta.top_k], pairs, full)
            assert (meta.top_token_id, meta.c_score) == meta.top_k[0][1:]
            assert meta.top_token == texts[meta.top_token_id] != ""
            exact += meta.top_token_id == top and [i for _, i, _ in meta.top_k] == [i for i, _ in pairs]
            total += 1
            assert all(i not in BLANK_IDS and i > 2 for _, i, _ in meta.top_k)
    assert exact >= total - 2  # only float-rounding ties may reorder


def test_index_fields(tiny, extracted):
    vx = Vindex.load(extracted("gemma3"))
    idx = vx.index
    cfg = tiny["gemma3"][1].config
    assert idx.version == 2 and idx.family == "gemma3" and idx.dtype == "f32"
    assert idx.embed_scale == pytest.approx(cfg.hidden_size ** 0.5)
    assert (idx.num_layers, idx.hidden_size, idx.intermediate_size, idx.vocab_size) == (4, 64, 96, 211)
    assert idx.layer_bands == {"syntax": [0, 3], "knowledge": [0, 3], "output": [0, 3]}
    assert idx.model_config["model_type"] == "gemma3_text"
    assert idx.model_config["num_q_heads"] == 4 and idx.model_config["num_kv_heads"] == 2
    assert idx.model_config["rope_local_base"] == 10000.0
    assert idx.modelql["format"] == 1 and "created_by" in idx.modelql
    assert idx.has_model_weights is False and idx.extract_level == "browse"
    offsets = [(x.offset, x.length) for x in idx.layers]
    assert offsets == [(i * 96 * 64 * 4, 96 * 64 * 4) for i in range(4)]
    # every file but index.json carries a checksum (LARQL's three binaries among them)
    assert {"gate_vectors.bin", "embeddings.bin", "down_meta.bin"} <= set(idx.checksums)
    assert set(idx.checksums) == {p.name for p in vx.path.iterdir() if p.name != "index.json"}
    assert vx.verify().ok
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (vx.path / f).exists()
    raw = json.loads((vx.path / "index.json").read_text())
    assert list(raw)[:3] == ["version", "model", "family"]


def test_gpt2_bands_and_non_gated(extracted):
    vx = Vindex.load(extracted("gpt2"))
    assert vx.family == "gpt2" and vx.embed_scale == 1.0
    assert vx.num_features(0) == 256  # n_inner = 4·n_embd: up rows are the gates


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2"])
def test_f16_extraction_within_rounding(name, tiny, extracted):
    model = tiny[name][1]
    vx = Vindex.load(extracted(name, dtype="f16"))
    assert vx.dtype == "f16"
    assert (vx.path / "gate_vectors.bin").stat().st_size == sum(
        vx.num_features(l) * vx.hidden_size * 2 for l in vx.layers())
    for layer in vx.layers():
        G, _ = hf_gate_down(model, name, layer)
        got = vx.gate(layer).numpy()
        assert got.tobytes() == G.astype(np.float16).astype(np.float32).tobytes()  # round-to-nearest-even
        np.testing.assert_allclose(got, G, rtol=2 ** -11, atol=1e-7)
    E = model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_allclose(vx.embeddings().numpy(), E, rtol=2 ** -11, atol=1e-7)
    # down_meta is computed from the f32 source, not the rounded copies
    f32 = Vindex.load(extracted(name))
    assert (f32.path / "down_meta.bin").read_bytes() == (vx.path / "down_meta.bin").read_bytes()


def test_hand_set_down_column(tmp_path):
    """Conformance check 3: a down column aimed at token 7 gives top id 7 and c_score E[7]·d."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    make_model("llama", d)
    sd = load_file(d / "model.safetensors")
    E = sd["model.embed_tokens.weight"]
    col = E[7] * 10.0
    sd["model.layers.1.mlp.down_proj.weight"][:, 5] = col
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    vx = Vindex.load(extract(d, tmp_path / "v.vindex", dtype="f32").path)
    meta = vx.feature_meta(1, 5)
    assert meta.top_token_id == 7 and meta.top_token == "w7"
    assert meta.c_score == pytest.approx(float(E[7] @ col), rel=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_inference_level_is_a_hf_model_dir(name, tiny, extracted):
    import transformers as T

    model = tiny[name][1]
    out = extracted(name, level="inference")
    vx = Vindex.load(out)
    assert vx.has_weights and vx.index.has_model_weights and vx.extract_level == "inference"
    assert vx.index.modelql["weights_format"] == "safetensors"
    assert vx.index.modelql["weights_dtype"] == "f32"
    wmap = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    n = model.config.num_hidden_layers
    assert set(wmap.values()) == {"model-embed.safetensors", f"model-attn-L000-L{n - 1:03d}.safetensors",
                                  f"model-ffn-L000-L{n - 1:03d}.safetensors"}
    for tensor, file in wmap.items():
        if ".mlp." in tensor:
            assert file.startswith("model-ffn-")
        elif ".h." in tensor or ".layers." in tensor:
            assert file.startswith("model-attn-")
    assert set(vx.index.checksums) >= set(wmap.values())
    loaded = T.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert set(loaded.state_dict()) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = torch.tensor([[1, 9, 40, 7, 100]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_attention_level_has_no_ffn(extracted):
    out = extracted("qwen2", level="attention")
    vx = Vindex.load(out)
    wmap = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(".mlp." in k for k in wmap)
    assert any("self_attn" in k for k in wmap) and "model.embed_tokens.weight" in wmap
    assert vx.index.has_model_weights and not vx.has_weights
    from modelql.errors import CapabilityError

    with pytest.raises(CapabilityError, match="re-extract with --level inference"):
        vx.load_model()


def test_vindex_load_model_runs(tiny, extracted):
    vx = Vindex.load(extracted("llama", level="inference"))
    m = vx.load_model()
    ids = torch.tensor([[1, 9, 40, 7]])
    with torch.no_grad():
        ref = tiny["llama"][1](ids).logits
        got = m.forward(ids)
    torch.testing.assert_close(got.float(), ref, rtol=1e-4, atol=1e-4)


def test_browse_load_model_is_a_capability_error(extracted):
    from modelql.errors import CapabilityError

    vx = Vindex.load(extracted("llama"))
    assert not vx.has_weights
    with pytest.raises(CapabilityError, match="requires model weights"):
        vx.load_model()


def test_shards_split_at_the_limit(tiny, tmp_path):
    out = extract(tiny["llama"][0], tmp_path / "s.vindex", level="inference", dtype="f32",
                  shard_bytes=60_000, clusters=False).path
    files = sorted(p.name for p in out.glob("model-ffn-*.safetensors"))
    assert files == ["model-ffn-L000-L000.safetensors", "model-ffn-L001-L001.safetensors",
                     "model-ffn-L002-L002.safetensors"]
    import transformers as T

    loaded = T.AutoModelForCausalLM.from_pretrained(out)
    for k, v in tiny["llama"][1].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_bf16_source_keeps_dtype(tmp_path):
    d = tmp_path / "m"
    model = make_model("qwen3", d, dtype="bfloat16")
    model.to(torch.bfloat16).save_pretrained(d)
    out = extract(d, tmp_path / "v.vindex", level="inference", dtype="f16").path
    vx = Vindex.load(out)
    assert vx.index.modelql["weights_dtype"] == "bf16"
    G = model.state_dict()["model.layers.0.mlp.gate_proj.weight"]
    assert torch.equal(vx.gate(0), G.float().half().float())


def test_extract_errors(tiny, tmp_path):
    with pytest.raises(ModelqlError, match="does not exist"):
        extract(tmp_path / "nope", tmp_path / "o.vindex")
    no_tok = tmp_path / "notok"
    make_model("llama", no_tok)
    os.remove(no_tok / "tokenizer.json")
    with pytest.raises(VindexError, match="tokenizer.json"):
        extract(no_tok, tmp_path / "o.vindex")
    with pytest.raises(VindexError, match="extract level"):
        extract(tiny["llama"][0], tmp_path / "o.vindex", level="everything")
    with pytest.raises(VindexError, match="dtype"):
        extract(tiny["llama"][0], tmp_path / "o.vindex", dtype="q4")
    out = tmp_path / "exists.vindex"
    out.mkdir()
    with pytest.raises(VindexError, match="already exists"):
        extract(tiny["llama"][0], out)
    # a browse vindex is not a model
    browse = extract(tiny["llama"][0], tmp_path / "b.vindex", clusters=False).path
    os.remove(browse / "config.json")
    with pytest.raises(ModelqlError, match="browse-only vindex"):
        extract(browse, tmp_path / "o2.vindex")


def test_failure_leaves_nothing(tiny, tmp_path):
    def boom(i, n):
        if i == 1:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        extract(tiny["llama"][0], tmp_path / "x.vindex", level="inference", on_layer=boom)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces(tiny, tmp_path):
    out = tmp_path / "r.vindex"
    extract(tiny["llama"][0], out, dtype="f32", clusters=False)
    extract(tiny["gpt2"][0], out, dtype="f16", clusters=False, force=True)
    assert Vindex.load(out).family == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.vindex"]


def test_down_top_k_and_blank_tokens(tiny, tmp_path):
    """With K = V every blank/special id is dropped without replacement, leaving V − 5 pairs."""
    out = extract(tiny["llama"][0], tmp_path / "k.vindex", down_top_k=211, clusters=False).path
    dm = fmt.DownMetaFile(out / "down_meta.bin")
    assert dm.top_k == 211
    rec = dm.get(0, 0)
    assert len(rec.top_k) == 211 - 5
    assert (out / "down_meta.bin").stat().st_size == 16 + 4 * 3 + 3 * 96 * (8 + 8 * 211)


def test_multimodal_source_is_flattened(tiny, extracted, tmp_path):
    """A Gemma-3-style multimodal checkpoint: text weights under model.language_model., a vision
    tower to drop, config with text_config → a CausalLM vindex identical to the text-only one."""
    import transformers as T
    from safetensors.torch import load_file, save_file

    src_dir, model = tiny["gemma3"]
    mm = tmp_path / "mm"
    mm.mkdir()
    sd = load_file(src_dir / "model.safetensors")
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in sd.items()}
    renamed["model.vision_tower.patch.weight"] = torch.ones(4, 4)
    save_file(renamed, mm / "model.safetensors", metadata={"format": "pt"})
    text_cfg = json.loads((src_dir / "config.json").read_text())
    text_cfg.pop("architectures", None)
    (mm / "config.json").write_text(json.dumps({
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text_cfg, "vision_config": {"hidden_size": 4}, "_name_or_path": "google/gemma-3-tiny",
    }))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (mm / f).write_bytes((src_dir / f).read_bytes())
    out = extract(mm, tmp_path / "mm.vindex", level="inference", dtype="f32", clusters=False).path
    vx = Vindex.load(out)
    ref = extracted("gemma3", level="inference")
    assert vx.model == "google/gemma-3-tiny" and vx.family == "gemma3"
    for f in ("gate_vectors.bin", "embeddings.bin", "down_meta.bin"):
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    wmap = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(wmap) == set(sd) and not any("vision" in k for k in wmap)
    loaded = T.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.tensor([[1, 9, 40, 7, 100]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
