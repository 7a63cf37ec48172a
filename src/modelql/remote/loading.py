"""Loading the two halves of a split model: an FFN shard (the server) and an FFN-less client.

A shard reads only the FFN tensors of the layers it owns (safetensors are memory-mapped, so the
other layers' bytes are never touched); a client reads everything *but* the FFN tensors —
embeddings, attention, norms, lm_head — and computes each layer's FFN through a `RemoteFfn`.
Both work on an HF model directory, an inference-level vindex, or the matching slice
(`modelql slice --preset server|client`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import CapabilityError, ModelFormatError
from ..ffn.dense import DenseFfn
from ..models.families import spec_from_config
from ..models.source import canonical_tensor, resolve_prefix
from ..models.spec import ModelSpec

FFN_TENSORS = frozenset({"gate.weight", "up.weight", "down.weight", "up.bias", "down.bias"})


def is_ffn_tensor(name: str) -> bool:
    """Whether a canonical tensor name (`layers.{i}.up.weight`, ...) belongs to an FFN block."""
    return name.startswith("layers.") and name.split(".", 2)[2] in FFN_TENSORS


def load_tensors(source, spec: ModelSpec, dtype: torch.dtype, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The canonical tensors `keep` selects, converted to `dtype` (absent optional ones skipped)."""
    names = source.names()
    prefix = resolve_prefix(names, next(iter(spec.global_map.values())).hf_name)
    wanted = [n for n in spec.global_map] + [
        f"layers.{i}.{n}" for i in range(spec.num_layers) for n in spec.layer_map]
    out: dict[str, torch.Tensor] = {}
    for name in wanted:
        if not keep(name):
            continue
        t = canonical_tensor(source, spec, name, prefix)
        if t is not None:
            out[name] = t.to(dtype).contiguous()
    return out


def _open(model_ref: str | Path | None):
    from ..runtime.loading import open_source

    return open_source(model_ref)


class FfnShardModel:
    """What an `--ffn-only` server holds: the spec and the FFN of layers `owned` (inclusive).

    It stands where the engine expects a model (stats, /v1/models, overlays read `spec`, `dtype`,
    `dense_ffn`, `ffn`) but cannot run a forward pass: generation routes are not served in this mode.
    """

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 owned: tuple[int, int], path: Path | None = None, tokenizer=None):
        self.spec = spec
        self.dtype = dtype
        self.weights = weights
        self.owned = owned
        self.path = path
        self.tokenizer = tokenizer
        self.dense_ffn = DenseFfn(spec, weights, range(owned[0], owned[1] + 1))
        self.ffn = self.dense_ffn

    def forward(self, *args, **kwargs):
        raise CapabilityError(f"this FFN shard holds only the FFN of layers {self.owned[0]}–{self.owned[1]}: "
                              "it cannot run a forward pass")

    def new_cache(self):
        return self.forward()


def load_ffn_shard(model_ref: str | Path | None, layers: tuple[int, int] | None = None,
                   dtype: str | torch.dtype = "float32") -> FfnShardModel:
    """The FFN weights of layers a..b (all when None) of a model directory, vindex or server slice."""
    from ..runtime.loading import resolve_dtype

    source = _open(model_ref)
    spec = spec_from_config(source.config)
    n = spec.num_layers
    a, b = layers if layers is not None else (0, n - 1)
    if b >= n:
        raise CapabilityError(f"--layers {a}-{b}: the model has {n} layers (0-{n - 1})")
    torch_dtype = resolve_dtype(dtype)
    owned = set(range(a, b + 1))

    def keep(name: str) -> bool:
        return is_ffn_tensor(name) and int(name.split(".")[1]) in owned

    try:
        weights = load_tensors(source, spec, torch_dtype, keep)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{exc} (an --ffn-only shard needs the FFN weights of layers {a}-{b})") from None
    return FfnShardModel(spec, weights, torch_dtype, (a, b), path=Path(source.path))


def load_client_model(model_ref: str | Path | None, ffn, dtype: str | torch.dtype = "float32"):
    """A runtime `Model` with every weight but the FFN's, computing its FFN through `ffn`
    (a `RemoteFfn`, or a factory `ffn(spec) -> backend`)."""
    from ..runtime.loading import resolve_dtype
    from ..runtime.model import Model

    source = _open(model_ref)
    spec = spec_from_config(source.config)
    torch_dtype = resolve_dtype(dtype)
    weights = load_tensors(source, spec, torch_dtype, lambda name: not is_ffn_tensor(name))
    tokenizer = None
    load_tok = getattr(source, "tokenizer", None)
    if load_tok is not None:
        tokenizer = load_tok()
    elif (Path(source.path) / "tokenizer.json").exists():
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.load(source.path)
    backend = ffn(spec) if callable(ffn) and not hasattr(ffn, "forward") else ffn
    return Model(spec, weights, torch_dtype, tokenizer=tokenizer, path=Path(source.path), ffn=backend)
