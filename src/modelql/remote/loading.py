"""Loading the two halves of a split model: an FFN shard (the server) and an FFN-less client.

A shard reads only the FFN tensors of the layers it owns (safetensors are memory-mapped, so the
other layers' bytes are never touched); a client reads everything *but* the FFN tensors —
embeddings, attention, norms, lm_head — and computes each layer's FFN through a `RemoteFfn`.
Both work on an HF model directory, an inference-level vindex, or the matching slice
(`modelql slice --preset server|client`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from ..errors import CapabilityError, ModelFormatError
from ..ffn.dense import DenseFfn
from ..ffn.moe import MoeFfn
from ..models.families import spec_from_config
from ..models.source import canonical_tensor, resolve_prefix
from ..models.spec import ModelSpec

FFN_TENSORS = frozenset({"gate.weight", "up.weight", "down.weight", "up.bias", "down.bias"})
#: what routes a token to its experts: small, kept by the client (which routes, as LARQL's does) and
#: by a shard (whose /v1/walk-ffn routes itself); Gemma 4's expert input norm too
ROUTING_TENSORS = frozenset({"router.weight", "router.scale", "router.expert_scale", "shared_gate.weight",
                             "moe_norm.weight"})
_EXPERT = re.compile(r"^(?:experts\.(\d+)|shared)\.(?:gate|up|down)\.weight$")


def is_ffn_tensor(name: str) -> bool:
    """Whether a canonical tensor name (`layers.{i}.up.weight`, `layers.{i}.experts.{e}.down.weight`,
    ...) belongs to an FFN block: a dense FFN's or an expert's weights (not the router)."""
    if not name.startswith("layers."):
        return False
    rest = name.split(".", 2)[2]
    return rest in FFN_TENSORS or _EXPERT.match(rest) is not None


def expert_of_tensor(name: str, num_experts: int) -> int | None:
    """The expert id a canonical tensor belongs to (the shared expert: `num_experts`), else None."""
    m = _EXPERT.match(name.split(".", 2)[2]) if name.startswith("layers.") else None
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) is not None else num_experts


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
    """What an `--ffn-only` server holds: the spec and the FFN of layers `owned` (inclusive) — of
    an MoE model the router and the experts `experts` (inclusive ids; None: all, the shared one too).

    It stands where the engine expects a model (stats, /v1/models, overlays read `spec`, `dtype`,
    `dense_ffn`, `ffn`, `moe_ffn`) but cannot run a forward pass: generation routes are not served in
    this mode. `ffn` is what /v1/walk-ffn computes: the dense FFN, or a Mixtral-style MoE layer whole
    (which needs every expert); `moe_ffn` is what the expert routes compute.
    """

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 owned: tuple[int, int], path: Path | None = None, tokenizer=None,
                 experts: tuple[int, int] | None = None):
        self.spec = spec
        self.dtype = dtype
        self.weights = weights
        self.owned = owned
        self.owned_experts = experts
        self.path = path
        self.tokenizer = tokenizer
        layers = range(owned[0], owned[1] + 1)
        self.moe_ffn = None
        if spec.moe is not None:
            held = None if experts is None else range(experts[0], experts[1] + 1)
            self.moe_ffn = MoeFfn(spec, weights, layers, held)
        if spec.moe is not None and not spec.moe.beside_dense:
            self.dense_ffn = None
            self.ffn = self.moe_ffn
        else:
            self.dense_ffn = DenseFfn(spec, weights, layers)
            self.ffn = self.dense_ffn

    def forward(self, *args, **kwargs):
        raise CapabilityError(f"this FFN shard holds only the FFN of layers {self.owned[0]}–{self.owned[1]}: "
                              "it cannot run a forward pass")

    def new_cache(self):
        return self.forward()


def load_ffn_shard(model_ref: str | Path | None, layers: tuple[int, int] | None = None,
                   dtype: str | torch.dtype = "float32", experts: tuple[int, int] | None = None) -> FfnShardModel:
    """The FFN weights of layers a..b (all when None) of a model directory, vindex or server slice;
    of an MoE model, the router and experts e..f only (`--experts`; all when None)."""
    from ..runtime.loading import resolve_dtype

    source = _open(model_ref)
    spec = spec_from_config(source.config)
    n = spec.num_layers
    a, b = layers if layers is not None else (0, n - 1)
    if b >= n:
        raise CapabilityError(f"--layers {a}-{b}: the model has {n} layers (0-{n - 1})")
    moe = spec.moe
    if experts is not None:
        if moe is None:
            raise CapabilityError(f"--experts {experts[0]}-{experts[1]}: {spec.family} has no experts")
        blocks = moe.num_experts + (1 if moe.shared_size else 0)
        if experts[1] >= blocks:
            raise CapabilityError(f"--experts {experts[0]}-{experts[1]}: the model has experts 0-{blocks - 1}"
                                  + (f" ({moe.num_experts} is the shared expert)" if moe.shared_size else ""))
    torch_dtype = resolve_dtype(dtype)
    owned = set(range(a, b + 1))

    def keep(name: str) -> bool:
        if not name.startswith("layers.") or int(name.split(".")[1]) not in owned:
            return False
        rest = name.split(".", 2)[2]
        if rest in ROUTING_TENSORS:
            return True
        if not is_ffn_tensor(name):
            return False
        e = expert_of_tensor(name, moe.num_experts) if moe is not None else None
        return e is None or experts is None or experts[0] <= e <= experts[1]

    try:
        weights = load_tensors(source, spec, torch_dtype, keep)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{exc} (an --ffn-only shard needs the FFN weights of layers {a}-{b})") from None
    return FfnShardModel(spec, weights, torch_dtype, (a, b), path=Path(source.path), experts=experts)


def load_client_model(model_ref: str | Path | None, ffn, dtype: str | torch.dtype = "float32"):
    """A runtime `Model` with every weight but the FFN's, computing its FFN through `ffn`
    (a `RemoteFfn`, or a factory `ffn(spec, weights) -> backend`; an MoE model's routers stay here)."""
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
    backend = ffn(spec, weights) if callable(ffn) and not hasattr(ffn, "forward") else ffn
    return Model(spec, weights, torch_dtype, tokenizer=tokenizer, path=Path(source.path), ffn=backend)
