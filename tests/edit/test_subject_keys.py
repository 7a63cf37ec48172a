"""The subject-key capture of weight-level edits stops its forward at the last hook it needs:
the activations equal a full forward's (brute force)."""

from __future__ import annotations

import torch

from modelql.knowledge import memit_subject as MS
from modelql.runtime.interp import padded


def test_early_stopped_capture_equals_a_full_forward(base_model):
    m = base_model
    seqs = [m.tokenizer.encode(t) for t in ("The capital of France is", "Once upon a time there", "def f(x):")]
    names = ["blocks.0.mlp.hook_post", f"blocks.{m.spec.num_layers - 2}.hook_resid_post"]
    got = MS._multi(m, seqs, names)
    full = {}

    def cap(t, n):
        full[n] = t.clone()

    m.forward(padded(seqs), hooks={n: cap for n in names}, logits="none")
    for n in names:
        for j, s in enumerate(seqs):
            assert torch.equal(got[n][j], full[n][j, : len(s)].float()), n


def test_generic_sampling_fits_a_small_models_window_and_vocabulary(base_model):
    """The sampled statistics text stops at the context window (and top-k at the vocabulary size)
    instead of failing the first weight-level INSERT on a small model."""
    from modelql.knowledge.generic_text import sample

    seqs = sample(base_model, openers=("Once upon a time",), per_opener=2, tokens=10 * base_model.spec.max_position)
    assert len(seqs) == 2 and all(len(s) == base_model.spec.max_position for s in seqs)
