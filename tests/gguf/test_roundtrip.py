"""Every family's tiny model, converted to GGUF (F32, F16, Q8_0) and loaded back.

Exactness is checked on random-weight models (every weight, norm and bias random, so every tensor
mapping matters). Q8_0's greedy fidelity is checked on briefly trained models
(`make_trained_tiny`): random models have near-tied logits whose top-1 flips under any
perturbation, so their agreement measures chaos, not quantisation.

References are independent of the code under test: HF transformers logits of the safetensors
model; transformers' own GGUF reader (`load_gguf_checkpoint`, its llama.cpp name map, reverse
permutation, norm offsets and dequantisers) for the tensors of our files; and a transformers
model built from the *reconstructed* config holding the GGUF's tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelql.models.families import spec_from_config
from modelql.models.gguf import GgufSource
from modelql.models.gguf_convert import convert
from modelql.runtime import load_model
from tests.tiny_models import COUNTING_PERIOD, FAMILIES, make_tiny, make_trained_tiny

# transformers' GGUF reader knows these llama.cpp architectures (not gemma 1; mistral is "llama")
HF_GGUF_READER = {"llama", "llama3", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2"}


def _ids(n=24, seed=1, vocab=211):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (hf model, {type: gguf path}, hf model with f16-rounded weights, its F16 gguf)."""
    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            hf = make_tiny(name, d / "hf")
            files = {t: convert(d / "hf", d / f"{name}.{t}.gguf", t).path for t in ("f32", "q8_0")}
            # an f16 checkpoint (weights exactly representable in half precision), as real models are
            hf16 = make_tiny(name, d / "hf16")
            with torch.no_grad():
                for p in hf16.parameters():
                    p.copy_(p.half().float())
            hf16.save_pretrained(d / "hf16", safe_serialization=True)
            f16 = convert(d / "hf16", d / f"{name}.f16.gguf", "f16").path
            cache[name] = (hf, files, hf16, f16)
        return cache[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_f32_logits_match_safetensors(name, converted):
    hf, files, _, _ = converted(name)
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
    model = load_model(files["f32"])
    diff = (model.forward(ids) - ref).abs().max().item()
    assert diff < 1e-3, diff
    # and the runtime sees the same architecture it sees for the safetensors checkpoint
    a, b = model.spec, spec_from_config(hf.config.to_dict())
    for field in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size", "norm", "norm_weight_offset", "embed_scale", "qk_norm", "post_attn_norm",
                  "post_ffn_norm", "attn_bias", "activation", "query_scale", "attn_softcap", "final_softcap",
                  "sliding_window", "layer_sliding", "tie_embeddings", "learned_positions"):
        va, vb = getattr(a, field), getattr(b, field)
        assert va == pytest.approx(vb) if isinstance(vb, float) else va == vb, (field, va, vb)


@pytest.mark.parametrize("name", FAMILIES)
def test_f16_logits_match_f16_checkpoint(name, converted):
    _, _, hf16, f16 = converted(name)
    ids = _ids(seed=2)
    with torch.no_grad():
        ref = hf16(ids).logits
    diff = (load_model(f16).forward(ids) - ref).abs().max().item()
    assert diff < 1e-3, diff


@pytest.mark.parametrize("name", FAMILIES)
def test_reconstructed_config_and_tensors_rebuild_the_hf_model(name, converted):
    """transformers, given only the GGUF's config dict and tensors, computes the original logits."""
    import transformers as T

    hf, files, _, _ = converted(name)
    src = GgufSource(files["f32"])
    cfg = dict(src.config)
    model_type = cfg.pop("model_type")
    rebuilt = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(model_type, **cfg),
                                                 attn_implementation="eager").eval()
    missing, unexpected = rebuilt.load_state_dict({n: src.get(n) for n in src.names()}, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"} and (not missing or rebuilt.config.tie_word_embeddings)
    ids = _ids(seed=3)
    with torch.no_grad():
        assert (rebuilt(ids).logits - hf(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", sorted(HF_GGUF_READER))
@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_transformers_gguf_reader_agrees_on_every_tensor(name, qtype, converted):
    """Our files follow llama.cpp's conventions as transformers reads them, and our dequantised
    tensors equal transformers' own dequantisation."""
    import transformers as T
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf, files, _, _ = converted(name)
    target = T.AutoModelForCausalLM.from_config(hf.config)
    theirs = load_gguf_checkpoint(str(files[qtype]), return_tensors=True, model_to_load=target)["tensors"]
    src = GgufSource(files[qtype])
    ours = {n: src.get(n) for n in src.names()}
    if "lm_head.weight" in theirs and "lm_head.weight" not in ours:  # GPT-2's copy of wte: tied for us
        assert np.array_equal(np.asarray(theirs.pop("lm_head.weight")), np.asarray(theirs["transformer.wte.weight"]))
    assert set(theirs) == set(ours)
    for n, t in theirs.items():
        t = torch.as_tensor(np.asarray(t), dtype=torch.float32).reshape(ours[n].shape)
        assert torch.allclose(ours[n], t, atol=1e-6, rtol=0), n


@pytest.mark.parametrize("name", FAMILIES)
def test_q8_0_is_the_model_with_q8_0_weights(name, converted):
    """Q8_0 logits equal transformers run on the dequantised weights; every weight is within half a
    quantisation step of the original. (Greedy agreement: `test_q8_0_greedy_agreement_on_trained_model`.)"""
    import transformers as T

    hf, files, _, _ = converted(name)
    src = GgufSource(files["q8_0"])
    state = {n: src.get(n) for n in src.names()}
    original = hf.state_dict()
    for n, t in state.items():
        ref = original[n]
        err = (t - ref).abs()
        # Q8_0: blocks of 32, scale amax/127 stored as f16: error ≤ half a step (+ the f16 scale rounding)
        assert err.max().item() <= ref.abs().max().item() / 127 * 0.6 + 1e-6, n
    quant = T.AutoModelForCausalLM.from_config(hf.config, attn_implementation="eager").eval()
    quant.load_state_dict(state, strict=False)
    if quant.config.tie_word_embeddings:
        quant.tie_weights()
    ids = _ids(100, seed=4)
    with torch.no_grad():
        ref_q = quant(ids).logits
    ours = load_model(files["q8_0"], quantize="none").forward(ids)
    assert (ours - ref_q).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """family -> (trained hf model, {type: gguf path}); see `make_trained_tiny`."""
    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(f"{name}-trained")
            hf = make_trained_tiny(name, d / "hf")
            cache[name] = hf, {t: convert(d / "hf", d / f"{name}.{t}.gguf", t).path for t in ("f16", "q8_0")}
        return cache[name]

    return get


PROMPT_LEN = 8


def _greedy_continuation(hf, new: int = 100) -> torch.Tensor:
    """A counting prompt that wraps around the period, and the float model's greedy continuation."""
    prompt = (torch.arange(COUNTING_PERIOD - 4, COUNTING_PERIOD - 4 + PROMPT_LEN) % COUNTING_PERIOD)[None]
    with torch.no_grad():
        return hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                           eos_token_id=None)


@pytest.mark.parametrize("name", FAMILIES)
def test_q8_0_greedy_agreement_on_trained_model(name, trained):
    """Issue 10: Q8_0 greedy top-1 agreement ≥ 99% over 100 positions, modelql's Q8_0 load against
    transformers' float model, teacher-forced on the float model's own greedy continuation (so one
    flip cannot cascade). The model must have learnt its task, or the test would judge a flat model."""
    hf, files = trained(name)
    seq = _greedy_continuation(hf)
    start = PROMPT_LEN
    generated = seq[0, start:]
    learnt = (generated == (seq[0, start - 1:-1] + 1) % COUNTING_PERIOD).float().mean().item()
    assert learnt >= 0.95, f"{name} did not learn to count ({learnt:.2f}): the agreement would mean nothing"
    with torch.no_grad():
        ref = hf(seq).logits[0, start - 1:-1]
    ours = load_model(files["q8_0"]).forward(seq)[0, start - 1:-1]
    assert ref.shape[0] >= 100
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    top2 = ref.topk(2, -1).values
    print(f"{name} Q8_0 greedy top-1 agreement {agree:.3f} over {ref.shape[0]} positions; "
          f"max |Δlogit| {(ours - ref).abs().max().item():.1e}, min top-1 margin {(top2[:, 0] - top2[:, 1]).min():.2f}")
    assert agree >= 0.99


@pytest.mark.parametrize("name", FAMILIES)
def test_f16_of_a_float32_checkpoint_is_the_model_with_rounded_weights(name, trained):
    """F16 of a float32 checkpoint: logits equal transformers on the half-rounded weights, and the
    greedy predictions are the float model's.

    Issue 10's "within 1e-3 of the safetensors model" holds for f16 checkpoints (real models ship in
    f16/bf16; `test_f16_logits_match_f16_checkpoint`, and the embedded model) because F16 stores
    their weights exactly. It cannot hold for a float32 checkpoint: rounding every weight to half
    precision is a relative error of up to 2^-11 ≈ 4.9e-4 per weight, and a trained model's logits
    of magnitude ~10 carry it as a few 1e-3 (measured 2-3e-3 on these models, 0.2-3.5e-3 on the random
    ones). So the conversion is checked exactly against the rounded model, and the rounding's effect
    is bounded by the half-precision step at the logits' scale."""
    import transformers as T

    hf, files = trained(name)
    seq = _greedy_continuation(hf)
    rounded = T.AutoModelForCausalLM.from_config(hf.config, attn_implementation="eager").eval()
    # llama.cpp's F16 keeps 1-D tensors and position embeddings in F32
    rounded.load_state_dict({n: p.half().float() if p.dim() > 1 and ".wpe." not in n else p
                             for n, p in hf.state_dict().items()})
    with torch.no_grad():
        ref, ref16 = hf(seq).logits, rounded(seq).logits
    ours = load_model(files["f16"]).forward(seq)
    assert (ours - ref16).abs().max().item() < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    diff = (ours - ref).abs().max().item()
    assert diff < 2 ** -11 * ref.abs().max().item() * 4, diff


def test_q8_0_keeps_llama_cpp_f32_tensors(converted):
    _, files, _, _ = converted("gpt2")
    src = GgufSource(files["q8_0"])
    assert src.tensor_type("position_embd.weight") == "F32"
    assert src.tensor_type("blk.0.attn_norm.weight") == "F32"
    assert src.tensor_type("blk.0.ffn_up.weight") == "Q8_0"
    # GPT-2's tied lm_head is written as a copy of wte (llama.cpp) and read back as tied
    assert "output.weight" in src._tensors and src.config["tie_word_embeddings"]


def test_kv_cache_generation_from_gguf_matches_transformers(converted):
    hf, files, _, _ = converted("llama")
    ids = _ids(6, seed=5)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[0, 6:].tolist()
    model = load_model(files["f32"])
    cache = model.new_cache()
    logits = model.forward(ids, cache, logits="last")
    out = []
    for _ in range(16):
        tok = int(logits.argmax(-1))
        out.append(tok)
        logits = model.forward([[tok]], cache, logits="last")
    assert out == ref
