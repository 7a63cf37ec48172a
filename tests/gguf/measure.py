"""Measured GGUF fidelity per family and type (the figures quoted in reports).

    python -m tests.gguf.measure [FAMILY ...]

For each tiny random family: max |logit difference| against transformers on the safetensors model
for F32 and F16 (F16 of the float32 checkpoint, and of an f16 checkpoint, which F16 stores exactly),
Q8_0 against transformers run on the dequantised weights, and Q8_0 top-1 agreement with the float
model over 100 positions (random ids) and over 100 greedy-continuation positions. Then, for each
family's briefly trained tiny model (`make_trained_tiny`), F16 and Q8_0 against the float model on
its greedy continuation. With the embedded default model present, the same for it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def family_row(name: str, root: Path) -> dict:
    import transformers as T

    from modelql.models.gguf import GgufSource
    from modelql.models.gguf_convert import convert
    from modelql.runtime import load_model
    from tests.tiny_models import make_tiny

    hf = make_tiny(name, root / "hf")
    hf16 = make_tiny(name, root / "hf16")
    with torch.no_grad():
        for p in hf16.parameters():
            p.copy_(p.half().float())
    hf16.save_pretrained(root / "hf16")
    ids = torch.randint(0, 211, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ref16 = hf(ids).logits, hf16(ids).logits
        greedy = hf.generate(ids[:, :8], max_new_tokens=100, min_new_tokens=100, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
        ref_greedy = hf(greedy).logits[:, 7:-1]
    row = {}
    for t in ("f32", "f16", "q8_0"):
        path = convert(root / "hf", root / f"{t}.gguf", t).path
        out = load_model(path).forward(ids)
        row[t] = (out - ref).abs().max().item()
        if t == "q8_0":
            src = GgufSource(path)
            quant = T.AutoModelForCausalLM.from_config(hf.config, attn_implementation="eager").eval()
            quant.load_state_dict({n: src.get(n) for n in src.names()}, strict=False)
            if quant.config.tie_word_embeddings:
                quant.tie_weights()
            with torch.no_grad():
                row["q8_0_vs_dequant"] = (out - quant(ids).logits).abs().max().item()
            row["q8_0_agree_random"] = _agreement(out, ref)
            row["q8_0_agree_greedy"] = _agreement(load_model(path).forward(greedy)[:, 7:-1], ref_greedy)
    path = convert(root / "hf16", root / "f16c.gguf", "f16").path
    row["f16_ckpt"] = (load_model(path).forward(ids) - ref16).abs().max().item()
    return row


def trained_row(name: str, root: Path) -> dict:
    from modelql.models.gguf_convert import convert
    from modelql.runtime import load_model
    from tests.gguf.test_roundtrip import PROMPT_LEN, _greedy_continuation
    from tests.tiny_models import make_trained_tiny

    hf = make_trained_tiny(name, root / "hf")
    seq = _greedy_continuation(hf)
    with torch.no_grad():
        ref = hf(seq).logits[:, PROMPT_LEN - 1:-1]
    top2 = ref.topk(2, -1).values
    row = {"margin": (top2[..., 0] - top2[..., 1]).min().item()}
    for t in ("f16", "q8_0"):
        out = load_model(convert(root / "hf", root / f"{t}.gguf", t).path).forward(seq)[:, PROMPT_LEN - 1:-1]
        row[t] = (out - ref).abs().max().item()
        if t == "q8_0":
            row["agree"] = _agreement(out, ref)
    return row


def main(names: list[str]) -> None:
    from tests.tiny_models import FAMILIES

    names = names or FAMILIES
    print(f"{'family':8} {'F32':>9} {'F16(f16 ckpt)':>14} {'F16(f32 ckpt)':>14} {'Q8_0':>9} "
          f"{'Q8_0 vs dequant':>16} {'Q8_0 top-1 random':>18} {'greedy':>7}")
    for name in names:
        with tempfile.TemporaryDirectory() as d:
            r = family_row(name, Path(d))
        print(f"{name:8} {r['f32']:9.1e} {r['f16_ckpt']:14.1e} {r['f16']:14.1e} {r['q8_0']:9.1e} "
              f"{r['q8_0_vs_dequant']:16.1e} {r['q8_0_agree_random']:18.2f} {r['q8_0_agree_greedy']:7.2f}",
              flush=True)
    print(f"\n{'trained':8} {'F16 max|Δ|':>11} {'Q8_0 max|Δ|':>12} {'Q8_0 greedy top-1':>18} {'min margin':>11}")
    for name in names:
        with tempfile.TemporaryDirectory() as d:
            r = trained_row(name, Path(d))
        print(f"{name:8} {r['f16']:11.1e} {r['q8_0']:12.1e} {r['agree']:18.3f} {r['margin']:11.2f}", flush=True)
    from modelql import defaults as D

    if (D.DEFAULT_MODEL_DIR / "config.json").exists():
        from modelql.models.gguf_convert import convert
        from modelql.runtime import load_model
        from tests.gguf.test_embedded import PROMPTS, greedy_positions

        reference = load_model(D.DEFAULT_MODEL_DIR)
        with tempfile.TemporaryDirectory() as d:
            for t in ("f32", "f16", "q8_0"):
                model = load_model(convert(D.DEFAULT_MODEL_DIR, Path(d) / f"{t}.gguf", t).path)
                diff = max((model.forward(torch.tensor([reference.tokenizer.encode(p)]))
                            - reference.forward(torch.tensor([reference.tokenizer.encode(p)]))).abs().max().item()
                           for p in PROMPTS)
                agree = total = 0
                for seq, start in greedy_positions(reference):
                    a = reference.forward(seq)[0, start - 1:-1]
                    b = model.forward(seq)[0, start - 1:-1]
                    agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                    total += a.shape[0]
                print(f"embedded {t}: max |Δlogit| {diff:.1e}, greedy top-1 agreement {agree}/{total}")


if __name__ == "__main__":
    main(sys.argv[1:])
