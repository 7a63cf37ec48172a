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
