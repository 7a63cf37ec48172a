"""Rotary position embeddings: inverse frequencies per scaling scheme, and their application.

Frequencies follow HF's `modeling_rope_utils` exactly (computed in float32, cos/sin cast to the
compute dtype), so logits match transformers to float32 rounding.
"""

from __future__ import annotations

import math

import torch

from ..models.spec import RopeSpec


def rotary_dim(rope: RopeSpec, head_dim: int) -> int:
    if rope.kind == "proportional":  # rotates the whole head; the unrotated pairs get frequency 0
        return head_dim
    return int(head_dim * rope.partial_rotary_factor)


def inverse_frequencies(rope: RopeSpec, head_dim: int, max_position: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2] float32, attention scaling) for a sequence of total length `seq_len`."""
    dim = rotary_dim(rope, head_dim)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv = 1.0 / (rope.theta**exponents)
    scale = 1.0
    if rope.kind == "proportional":
        # Gemma 4's full layers: the first partial·head_dim/2 pairs of each half rotate at the
        # frequencies a full head would give them; the rest do not rotate
        angles = int(rope.partial_rotary_factor * head_dim // 2)
        inv = torch.cat([inv[:angles], torch.zeros(head_dim // 2 - angles)]) / rope.factor
    elif rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        orig = rope.original_max_position or max_position
        low_wavelen = orig / rope.low_freq_factor
        high_wavelen = orig / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    elif rope.kind == "longrope":
        orig = rope.original_max_position or max_position
        factors = rope.long_factor if seq_len > orig else rope.short_factor
        if factors is not None:
            ext = torch.tensor(factors, dtype=torch.float32)
            inv = 1.0 / (ext * rope.theta**exponents)
        factor = max_position / orig
        if rope.attention_factor is not None:
            scale = float(rope.attention_factor)
        elif factor > 1.0:
            scale = math.sqrt(1 + math.log(factor) / math.log(orig))
    elif rope.kind == "yarn":
        orig = rope.original_max_position or max_position
        factor = rope.factor
        scale = float(rope.attention_factor) if rope.attention_factor is not None else (
            0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        )

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

        low = max(math.floor(correction_dim(rope.beta_fast)), 0)
        high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
    return inv, scale


def cos_sin(
    rope: RopeSpec, head_dim: int, max_position: int, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, rotary_dim] for integer `positions` [T]."""
    seq_len = int(positions.max()) + 1 if positions.numel() else 1
    inv, scale = inverse_frequencies(rope, head_dim, max_position, seq_len)
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x [..., T, head_dim] (HF's rotate_half layout)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out
