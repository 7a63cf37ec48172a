"""A vindex extracted from a low-bit GGUF keeps the file's blocks (modelql.vindex.blocks): its size, gate
KNN against brute-force numpy over gguf-py's dequantization of the file's own gate tensor, its model's
logits against the GGUF file loaded directly, and an INSERT + COMPILE round trip.

The model: a tiny random Llama (head size 16, rows of 64 and 128: whole Q4_0 / Q4_1 / Q8_0 blocks) with a
BPE tokenizer English prompts encode, exported to an F16 GGUF and quantized by gguf-py's own quantizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

TYPES = ("Q4_0", "Q4_1", "Q8_0")


@pytest.fixture(scope="module")
def f16_gguf(tmp_path_factory):
    import transformers as T
    from tokenizers import Tokenizer

    from modelql.models.gguf_convert import convert
    from tests.runtime.tiny_tokenizer import write_tokenizer

    d = tmp_path_factory.mktemp("block-vindex")
    write_tokenizer(d / "hf", "chatml")
    vocab = Tokenizer.from_file(str(d / "hf" / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(3)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, bos_token_id=0,
                           eos_token_id=1)
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(d / "hf", safe_serialization=True)
    convert(d / "hf", d / "tiny-F16.gguf", "f16")
    return d / "tiny-F16.gguf"


@pytest.fixture(scope="module")
def quantized(f16_gguf):
    """type → (GGUF file, its vindex at level inference)."""
    from modelql.vindex import extract
    from tests.random_gguf import requantized

    out = {}
    for qtype in TYPES:
        path = f16_gguf.parent / f"tiny-{qtype}.gguf"
        types = requantized(f16_gguf, path, qtype)
        assert set(types.values()) == {qtype} and len(types) == 2 + 2 * 7  # embedding, head, 7 matrices a layer
        vx = f16_gguf.parent / f"tiny-{qtype}.vindex"
        extract(path, vx, level="inference", clusters=False)
        out[qtype] = (path, vx)
    return out


def _tensor_bytes(path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


@pytest.mark.parametrize("qtype", TYPES)
def test_blocks_are_the_files_and_the_size_follows(quantized, qtype):
    from modelql.vindex import Vindex
    from modelql.vindex.blocks import FILES

    path, vx_dir = quantized[qtype]
    idx = json.loads((vx_dir / "index.json").read_text())
    assert idx["quant"] == qtype.lower() and idx["has_model_weights"]
    assert idx["modelql"]["weights_format"] == "blocks"
    assert set(idx["modelql"]["storage_types"]) == {qtype}
    names = {p.name for p in vx_dir.iterdir()}
    assert not {"gate_vectors.bin", "embeddings.bin", "model.safetensors.index.json"} & names
    # the weights are the file's tensors, byte for byte in count (norms as f32 either way)
    stored = sum((vx_dir / n).stat().st_size for n in FILES if (vx_dir / n).exists())
    assert stored == _tensor_bytes(path)
    # the whole vindex: blocks + down_meta + tokenizer + metadata; ≤ 1.5× the file needs the weights to
    # dominate, as they do in any real model (the tiny vocabulary's tokenizer.json is most of the rest)
    total = sum(p.stat().st_size for p in vx_dir.iterdir() if p.is_file())
    overhead = sum((vx_dir / n).stat().st_size for n in ("tokenizer.json", "down_meta.bin", "index.json"))
    assert total - overhead <= 1.1 * stored
    assert Vindex.load(vx_dir).verify().ok


@pytest.mark.parametrize("qtype", TYPES)
def test_gate_knn_is_brute_force_over_the_dequantized_gates(quantized, qtype):
    import gguf
    from gguf.quants import dequantize

    from modelql.vindex import Vindex

    path, vx_dir = quantized[qtype]
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    vx = Vindex.load(vx_dir)
    assert vx.quantized
    rng = np.random.default_rng(0)
    for layer in range(2):
        t = tensors[f"blk.{layer}.ffn_gate.weight"]
        G = dequantize(t.data, t.tensor_type).reshape(128, 64).astype(np.float64)  # gguf-py's own decoder
        for _ in range(3):
            q = rng.standard_normal(64).astype(np.float32)
            s = G @ q
            want = np.argsort(-np.abs(s), kind="stable")[:8]
            hits = vx.gate_knn(layer, torch.from_numpy(q), k=8)  # first use: scored block by block
            assert [h.feature for h in hits] == want.tolist()
            assert np.allclose([h.score for h in hits], s[want], rtol=1e-5, atol=1e-5)
            again = vx.gate_knn(layer, torch.from_numpy(q), k=8)  # second: the decoded, cached layer
            assert [h.feature for h in again] == want.tolist()
        assert np.allclose(vx.gate(layer).numpy(), G, atol=0)
        assert np.array_equal(vx.gate_row(layer, 5).numpy(), G[5].astype(np.float32))
    E = tensors["token_embd.weight"]
    emb = dequantize(E.data, E.tensor_type).reshape(vx.vocab_size, 64)
    assert np.array_equal(vx.embedding(7, scaled=False).numpy(), emb[7])
    assert np.array_equal(vx.embeddings().numpy(), emb)


@pytest.mark.parametrize("qtype", TYPES)
def test_the_vindex_model_is_the_file(quantized, qtype):
    from modelql.runtime import load_model

    path, vx_dir = quantized[qtype]
    a, b = load_model(path), load_model(vx_dir)
    assert a.quantized and b.quantized  # both on the low-bit kernels, from the same blocks
    assert [(w.source_type, w.bits, w.error_rms) for w in a.quant.info] == \
        [(w.source_type, w.bits, w.error_rms) for w in b.quant.info]
    fa, fb = load_model(path, quantize="none"), load_model(vx_dir, quantize="none")  # dequantized floats
    for prompt in ("The capital of France is", "Hello world"):
        ids = a.tokenizer.encode(prompt)
        assert ids == b.tokenizer.encode(prompt)
        assert torch.equal(a.forward(ids, logits="all"), b.forward(ids, logits="all"))
        assert torch.allclose(fa.forward(ids, logits="all"), fb.forward(ids, logits="all"), atol=1e-6)


def test_insert_and_compile_round_trip(quantized, tmp_path):
    from modelql.knowledge import edit
    from modelql.knowledge.infer import infer
    from modelql.vindex import Vindex
    from modelql.vindex.blocks import EDITS_FILE, FILES
    from modelql.vindex.compile import compile_vindex
    from modelql.vindex.overlay import PatchSession

    _, vx_dir = quantized["Q4_1"]
    base = Vindex.load(vx_dir)
    session = PatchSession(base)
    edit.insert(session, "France", "capital", "Tokyo", mode="compose")
    slot = next(k for k, s in session.state.slots.items() if s.relation == "capital")
    prompt = "The capital of France is"
    before = infer(session.model(), prompt, top=3)
    out = tmp_path / "edited.vindex"
    r = compile_vindex(session, out)
    assert r.layers_touched == 1 and EDITS_FILE in r.files_rewritten
    vx = Vindex.load(out)
    assert vx.quantized and vx.verify().ok
    # the edited layer's FFN matrices are full precision; every other block is the base's, hard-linked
    manifest = json.loads((out / "weight_manifest.json").read_text())
    edited = {e["key"] for e in manifest if e["file"] == EDITS_FILE}
    assert edited == {f"model.layers.{slot[0]}.mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
    for name in FILES:
        if (vx_dir / name).exists():
            assert (out / name).stat().st_ino == (vx_dir / name).stat().st_ino
    assert torch.equal(vx.gate_row(*slot), session.view.gate_row(*slot))
    fresh = PatchSession(vx)
    after = infer(fresh.model(), prompt, top=3)
    assert [p.token_id for p in after.predictions] == [p.token_id for p in before.predictions]
    # the compiled model is the edited one: on float weights as the session's; on the low-bit kernels up to
    # their 8-bit requantization of the three float32 matrices (its measured error bounds the gap); both far
    # from the unedited model's
    from modelql.runtime import load_model

    ids = session.model().tokenizer.encode(prompt)
    edited_logits = session.model().forward(ids, logits="last")[0]
    assert torch.allclose(fresh.model().forward(ids, logits="last")[0], edited_logits, atol=1e-4)
    kernel = load_model(out)
    assert kernel.quantized
    compiled = kernel.forward(ids, logits="last")[0]
    unedited = load_model(vx_dir).forward(ids, logits="last")[0]
    rms = max(w.error_rms for w in kernel.quant.info)
    scale = edited_logits.abs().max()
    gap, effect = (compiled - edited_logits).abs().max(), (unedited - edited_logits).abs().max()
    print(f"requantization rms {rms:.4f}, gap {gap / scale:.4f}, edit effect {effect / scale:.4f} (of max |logit|)")
    assert gap <= 4 * rms * scale and effect > 10 * gap


def test_neuron_edits_compile_a_block_vindex_into_a_float_one(quantized, tmp_path):
    """Neuron edits grow the FFN, so COMPILE INTO VINDEX re-extracts the edited model: a float vindex
    that answers as the session does, without the base's low-bit weight files beside it."""
    import numpy as np

    from modelql.vindex import Vindex
    from modelql.vindex import patch as vlp
    from modelql.vindex.blocks import FILES, MANIFESTS
    from modelql.vindex.compile import compile_vindex
    from modelql.vindex.overlay import PatchSession

    _, vx_dir = quantized["Q4_1"]
    session = PatchSession(Vindex.load(vx_dir))
    H = session.base.hidden_size
    g = np.random.default_rng(0)
    u, gate, up = ((g.standard_normal(s) * 0.5).astype(np.float32) for s in ((H, 2), (2, H), (2, H)))
    session.record([vlp.DownDeltaOp(1, u, None, ("France",) * 2, ("capital",) * 2, ("Lima",) * 2, edit_id="n",
                                    method="memit-neurons", gate=gate, up=up)])
    out = tmp_path / "grown.vindex"
    compile_vindex(session, out)
    vx = Vindex.load(out)
    assert vx.verify().ok and not vx.quantized
    assert not {p.name for p in out.iterdir()} & (set(FILES) | set(MANIFESTS))
    assert vx.num_features(1) == session.base.num_features(1) + 2
    ids = session.model().tokenizer.encode("The capital of France is")
    want = session.model().forward(ids, logits="last")[0]
    assert torch.allclose(PatchSession(vx).model().forward(ids, logits="last")[0], want, atol=1e-4)
