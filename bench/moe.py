"""One MoE decode step: modelql's routed FFN (reads only the top-k experts) vs an all-experts reference.

    python bench/moe.py                          # hidden 1024, expert FFN 2816, 8 experts, top-2, 4 layers
    python bench/moe.py --hidden 512 --expert-size 1408 --layers 2 --repeats 5

Builds random float32 expert weights for `--layers` MoE layers (Mixtral routing: softmax → top-2 →
renormalise) and times, interleaved in the same run, one token through every layer's FFN:

* routed: `modelql.ffn.moe.MoeFfn.forward` (router, then the 2 chosen experts' matmuls);
* all experts: the same router weights applied to the outputs of all 8 experts (each expert's
  weights read every step, the way a dense "compute everything, mask the rest" MoE runs).

Both give the same output (checked). The layers' weights together are larger than the CPU caches,
so each step streams them from memory: the expected ratio is about E/k = 4. Each figure is the
median of `--repeats` timed rounds of `--steps` steps; the machine may be shared, so read the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from modelql.ffn.moe import MoeFfn
from modelql.linear import linear
from modelql.models.spec import ModelSpec, MoeSpec


def build(hidden: int, size: int, experts: int, top_k: int, layers: int) -> MoeFfn:
    spec = ModelSpec(family="bench", model_type="bench", num_layers=layers, hidden_size=hidden,
                     intermediate_size=size, num_heads=1, num_kv_heads=1, head_dim=hidden, vocab_size=1,
                     max_position=1, moe=MoeSpec(num_experts=experts, top_k=top_k, expert_size=size,
                                                  renormalize=True))
    g = torch.Generator().manual_seed(0)
    w: dict[str, torch.Tensor] = {}
    for i in range(layers):
        w[f"layers.{i}.router.weight"] = torch.randn(experts, hidden, generator=g) * 0.05
        for e in range(experts):
            p = f"layers.{i}.experts.{e}."
            w[p + "gate.weight"] = torch.randn(size, hidden, generator=g) * 0.03
            w[p + "up.weight"] = torch.randn(size, hidden, generator=g) * 0.03
            w[p + "down.weight"] = torch.randn(hidden, size, generator=g) * 0.03
    return MoeFfn(spec, w)


def all_experts(ffn: MoeFfn, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Every expert runs; the router's top-k weights (zero elsewhere) combine them."""
    weights, ids = ffn.route(layer, x)
    dense = torch.zeros(x.shape[0], ffn.moe.num_experts).scatter(1, ids, weights)
    out = torch.zeros_like(x)
    for e in range(ffn.moe.num_experts):
        out = out + dense[:, e, None] * ffn._expert(x, ffn.w_in[layer][e], ffn.w_down[layer][e])
    return out


def step(fn, ffn: MoeFfn, x: torch.Tensor) -> torch.Tensor:
    for layer in range(ffn.spec.num_layers):
        x = x + fn(layer, x)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--expert-size", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ffn = build(args.hidden, args.expert_size, args.experts, args.top_k, args.layers)
    routed = lambda layer, x: ffn.forward(layer, x)  # noqa: E731
    full = lambda layer, x: all_experts(ffn, layer, x)  # noqa: E731
    expert_bytes = 3 * args.hidden * args.expert_size * 4
    x = torch.randn(1, args.hidden, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = (step(routed, ffn, x) - step(full, ffn, x)).abs().max().item()
        assert diff < 1e-4, diff
        times: dict[str, list[float]] = {"routed": [], "all experts": []}
        for _ in range(args.repeats):
            for name, fn in (("routed", routed), ("all experts", full)):
                t0 = time.perf_counter()
                for s in range(args.steps):
                    step(fn, ffn, x + s)
                times[name].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"MoE decode step: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of "
          f"{args.expert_size} (top-{args.top_k}), float32, {torch.get_num_threads()} threads, "
          f"max |routed - all| = {diff:.1e}")
    print(f"{'path':<12} {'ms/token':>9} {'expert MB read/token':>21}")
    reads = {"routed": args.top_k, "all experts": args.experts}
    for name, t in med.items():
        print(f"{name:<12} {t * 1e3:>9.2f} {reads[name] * expert_bytes * args.layers / 1e6:>21.0f}")
    print(f"speed-up of routed over all experts: {med['all experts'] / med['routed']:.2f}x")


if __name__ == "__main__":
    main()
