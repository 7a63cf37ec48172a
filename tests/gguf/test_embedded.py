"""The embedded default model through GGUF: F32 and F16 logits, Q8_0 greedy agreement, tokenizer ids.

The default model is stored in float16, so its F16 (and F32) GGUF holds exactly its weights. Q8_0
must keep the trained model's greedy predictions: top-1 agreement ≥ 99% over 100 positions of its
own greedy continuations of fact prompts (teacher-forced, so one flip cannot cascade). A
continuation ends at EOS, as generation does: what the model would say after its own EOS is
never generated, and the model was not trained to predict anything there.
"""

from __future__ import annotations

import pytest
import torch

from modelql import defaults as D
from modelql.models.gguf import GgufSource
from modelql.models.gguf_convert import convert
from modelql.runtime import load_model
from modelql.tokenizer import Tokenizer
from tests.gguf.helpers import TEST_TEXT

MODEL = D.DEFAULT_MODEL_DIR
pytestmark = pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="embedded default model not built yet")

PROMPTS = ["The capital of France is", "Japan is located in", "The currency of Brazil is",
           "People from Kenya are called", "Germany shares a border with"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("embedded")
    return {t: convert(MODEL, d / f"default.{t}.gguf", t).path for t in ("f32", "f16", "q8_0")}


@pytest.fixture(scope="module")
def reference():
    return load_model(MODEL)


def _ids(model, text):
    return torch.tensor([model.tokenizer.encode(text)])


@pytest.mark.parametrize("qtype", ["f32", "f16"])
def test_logits_match_safetensors(qtype, files, reference):
    model = load_model(files[qtype])
    for prompt in PROMPTS:
        ids = _ids(reference, prompt)
        diff = (model.forward(ids) - reference.forward(ids)).abs().max().item()
        assert diff < 1e-3, (prompt, diff)


def _fact_prompts():
    """PROMPTS, then the first training template of every relation for every 10th entity."""
    yield from PROMPTS
    for entity in D.entities()[::10]:
        for relation in D.RELATIONS:
            yield D.prompt(D.TRAIN_TEMPLATES[relation][0], entity)


def greedy_positions(model, positions: int = 100, per_prompt: int = 20) -> list[tuple[torch.Tensor, int]]:
    """(prompt + the model's greedy continuation up to and including EOS, prompt length) per
    prompt, for as many prompts as it takes to generate `positions` tokens."""
    from modelql.runtime.generate import eos_token_ids

    eos = eos_token_ids(model)
    out, total = [], 0
    for prompt in _fact_prompts():
        ids = _ids(model, prompt)
        cache = model.new_cache()
        logits = model.forward(ids, cache, logits="last")
        seq = ids[0].tolist()
        for _ in range(per_prompt):
            tok = int(logits.argmax(-1))
            seq.append(tok)
            if tok in eos:
                break
            logits = model.forward([[tok]], cache, logits="last")
        out.append((torch.tensor([seq]), ids.shape[1]))
        total += len(seq) - ids.shape[1]
        if total >= positions:
            return out
    raise AssertionError(f"only {total} greedy positions from every prompt")


def test_q8_0_greedy_top1_agreement(files, reference):
    quant = load_model(files["q8_0"])
    agree = total = 0
    for seq, start in greedy_positions(reference):
        ref = reference.forward(seq)[0, start - 1:-1].argmax(-1)
        ours = quant.forward(seq)[0, start - 1:-1].argmax(-1)
        agree += int((ref == ours).sum())
        total += ref.numel()
    assert total >= 100
    print(f"embedded model Q8_0 greedy top-1 agreement: {agree}/{total}")
    assert agree / total >= 0.99


def test_tokenizer_ids_match_tokenizer_json(files):
    ref = Tokenizer.load(MODEL)
    ours = GgufSource(files["f16"]).tokenizer()
    for special in (True, False):
        assert ours.encode(TEST_TEXT, add_special_tokens=special) == ref.encode(TEST_TEXT, add_special_tokens=special)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.encode_chat(messages) == ref.encode_chat(messages)


def test_f16_gguf_holds_the_checkpoint_exactly(files):
    from modelql.models.source import SafetensorsSource

    src, st = GgufSource(files["f16"]), SafetensorsSource(MODEL)
    assert set(src.names()) == {n for n in st.names() if n != "lm_head.weight"}
    for name in src.names():
        assert torch.equal(src.get(name), st.get(name).float()), name
