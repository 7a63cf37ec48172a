"""Shared helpers for vindex tests: tiny models with a tokenizer, numpy reference implementations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIAL = ["<pad>", "<s>", "</s>"]
BLANK_IDS = (3, 4)  # tokens that decode to whitespace only: dropped from down_meta


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A WordLevel tokenizer.json: 3 special tokens, 2 whitespace-only tokens, then words `w<i>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    vocab[" "] = 3
    vocab["  "] = 4
    for i in range(5, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}\n')


def make_model(name: str, directory: Path, seed: int = 0, dtype: str = "float32"):
    """A tiny random HF model of family `name` plus a tokenizer; returns the HF model."""
    from tests.tiny_models import make_tiny

    model = make_tiny(name, directory, seed=seed, dtype=dtype)
    write_tokenizer(directory, model.config.vocab_size)
    return model


def decoded_vocab(directory: Path, vocab_size: int) -> list[str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return [tok.decode([i], skip_special_tokens=True).strip() for i in range(vocab_size)]


def reference_down_meta(E: np.ndarray, D: np.ndarray, k: int, texts: list[str]):
    """Brute-force algorithms §1 per column: [(top_id, c_score, [(id, logit)...])]."""
    E = E.astype(np.float32)
    D = D.astype(np.float32)
    out = []
    for f in range(D.shape[1]):
        logits = E @ D[:, f]
        order = sorted(range(len(logits)), key=lambda i: (-float(logits[i]), i))[:k]
        kept = [(i, float(logits[i])) for i in order if texts[i] != ""]
        if kept:
            out.append((kept[0][0], kept[0][1], kept))
        else:
            out.append((0, 0.0, []))
    return out


def reference_knn(G: np.ndarray, q: np.ndarray, k: int) -> list[tuple[int, float]]:
    scores = G.astype(np.float64) @ q.astype(np.float64)
    order = sorted(range(len(scores)), key=lambda i: (-abs(float(scores[i])), i))[:k]
    return [(i, float(scores[i])) for i in order]


def assert_topk_matches(got: list[tuple[int, float]], ref: list[tuple[int, float]], full: np.ndarray,
                        tol: float = 1e-6) -> None:
    """Ranked (id, value) lists agree: same length and values; ids equal except where two candidates
    tie within float rounding (`full` = every candidate's value, computed independently)."""
    assert len(got) == len(ref), (got, ref)
    for (gi, gv), (ri, rv) in zip(got, ref):
        assert abs(gv - rv) <= tol + 1e-5 * abs(rv), (got, ref)
        if gi != ri:
            assert abs(float(full[gi]) - rv) <= tol, f"id {gi} vs {ri}: not a float tie ({full[gi]} vs {rv})"
