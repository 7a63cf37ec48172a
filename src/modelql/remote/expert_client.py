"""`RemoteExperts`: a mixture-of-experts layer whose experts run on expert shards, routed here.

The client holds each MoE layer's router (`MoeFfn` with no experts held) and routes every token
itself, as LARQL's client does; then each chosen expert goes to a shard owning its layer (`/v1/stats`
`owned_layers`) and its id (`GET /v1/expert/topology`: a shard started with `--experts a-b`; 404
means every expert). One `POST /v1/experts/multi-layer-batch` per shard and layer carries, for each
token with experts there, the token's residual and its (expert, router weight) pairs, and answers
their weighted sum; the client adds the shards' sums. The shared expert (Qwen2-MoE) is id
`num_experts`, weighted by its sigmoid gate computed here. Shards are asked in parallel.

What travels is what the expert routes take (`expert_routes`): the normalised FFN input, or for
Gemma 4 the post-attention residual, normalised by the shard. With `--wire q8k` (hidden size a
multiple of 256) the client normalises and quantises it to Q8_K (`/v1/experts/multi-layer-batch-q8k`).

A shard that fails (connection, timeout, 5xx, garbled answer) is marked down for `retry_after`
seconds and its experts go to another shard owning them; with none left the error names the
layer, the experts and every shard tried.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import CapabilityError, RemoteError, WireError
from ..ffn.base import Hooks
from ..ffn.moe import MoeFfn, routing_hooks
from . import expert_wire, q8k_wire
from .expert_wire import ExpertTask


def expert_range(url: str, client, blocks: int) -> tuple[int, int]:
    """The experts a shard owns (inclusive), from `GET /v1/expert/topology` (404: all of them)."""
    import httpx

    try:
        r = client.get("/v1/expert/topology")
    except httpx.HTTPError as exc:
        raise RemoteError(f"FFN shard {url}: cannot read /v1/expert/topology: {type(exc).__name__}: {exc}") from None
    if r.status_code == 404:
        return 0, blocks - 1
    try:
        body = r.json()
        a, b = int(body["owned_start"]), int(body["owned_end"])
    except (ValueError, KeyError, TypeError):
        raise RemoteError(f"FFN shard {url}: /v1/expert/topology answered {r.status_code} without "
                          "owned_start/owned_end") from None
    return a, b


class RemoteExperts:
    """An MoE layer over expert shards (see the module docstring). `remote` is the `RemoteFfn`
    whose shards (each with `.experts`, its inclusive expert range) and statistics it shares."""

    def __init__(self, router: MoeFfn, remote, q8k: bool = False):
        self.router, self.remote = router, remote
        self.moe, self.spec = router.moe, router.spec
        self.q8k = q8k and self.spec.hidden_size % q8k_wire.BLOCK == 0
        blocks = self.moe.num_experts + (1 if self.moe.shared_size else 0)
        self.blocks = blocks
        self.owners = [[[s for s in remote.by_layer[layer] if s.experts[0] <= e <= s.experts[1]]
                        for e in range(blocks)] for layer in range(self.spec.num_layers)]
        for layer, per in enumerate(self.owners):
            missing = [e for e, owners in enumerate(per) if not owners]
            if missing:
                raise RemoteError(f"no FFN shard owns expert{'s' if len(missing) > 1 else ''} "
                                  f"{', '.join(map(str, missing))} of layer {layer} (shards: "
                                  + ", ".join(f"{s.url} [layers {s.layers[0]}-{s.layers[1]}, experts "
                                              f"{s.experts[0]}-{s.experts[1]}]" for s in remote.shards) + ")")
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(remote.shards)), thread_name_prefix="experts")

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    def forward(self, layer: int, x: torch.Tensor, hooks: Hooks | None = None,
                route_input: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's experts on x [..., H] (routed from `route_input`, default x), as `MoeFfn.forward`."""
        if hooks and any(k.startswith(f"blocks.{layer}.mlp.") and "hook_expert" not in k for k in hooks):
            raise CapabilityError("FFN-internal hooks (mlp.hook_*) are not available with remote experts")
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        h = flat if route_input is None else route_input.reshape(flat.shape)
        with torch.inference_mode():
            weights, ids = self.router.route(layer, h)
            if hooks:
                ids, weights = routing_hooks(hooks, layer, ids, weights, tuple(shape[:-1]))
            shared = self.router.shared_weight(layer, flat)
            # what a shard reads: Gemma 4's experts norm the residual themselves (q8k: normalised here)
            send = h if self.moe.beside_dense else flat
            if self.q8k:
                send = self.router.expert_input(layer, send)
        rows = send.detach().float().numpy()
        routing = [(ids[n].tolist(), weights[n].float().tolist()) for n in range(flat.shape[0])]
        if shared is not None:
            routing = [(i + [self.moe.num_experts], w + [float(shared[n])]) for n, (i, w) in enumerate(routing)]
        out = self._dispatch(layer, rows, routing)
        return torch.from_numpy(out).to(x.dtype).reshape(shape)

    def _dispatch(self, layer: int, rows: np.ndarray, routing: list[tuple[list[int], list[float]]]) -> np.ndarray:
        """Σ over shards of their weighted expert sums, each shard asked once (in parallel)."""
        out = np.zeros_like(rows, dtype=np.float32)
        pending = {(n, e): w for n, (ids, ws) in enumerate(routing) for e, w in zip(ids, ws)}
        tried: dict[str, str] = {}
        while pending:
            plan: dict[object, dict[int, list[tuple[int, float]]]] = {}
            for (n, e), w in pending.items():
                owners = [s for s in self.owners[layer][e] if s.url not in tried]
                if not owners:
                    raise RemoteError(f"expert {e} of layer {layer} failed on every shard that owns it: "
                                      + "; ".join(f"{u}: {m}" for u, m in tried.items()))
                shard = next((s for s in owners if s.healthy), owners[0])
                plan.setdefault(shard, {}).setdefault(n, []).append((e, w))
            futures = {shard: self.pool.submit(self._ask, shard, layer, rows, per) for shard, per in plan.items()}
            for shard, fut in futures.items():
                try:
                    sums = fut.result()
                except _ShardFailed as exc:
                    shard.down_until = time.monotonic() + self.remote.retry_after
                    shard.last_error = tried[shard.url] = str(exc)
                    with self.remote._lock:
                        self.remote.stats.failovers += 1
                    continue
                shard.down_until = 0.0
                for n, s in sums.items():
                    out[n] += s
                for n, pairs in plan[shard].items():
                    for e, _w in pairs:
                        pending.pop((n, e), None)
        return out

    def _ask(self, shard, layer: int, rows: np.ndarray, per: dict[int, list[tuple[int, float]]]) -> dict[int, np.ndarray]:
        import httpx

        order = sorted(per)
        tasks = []
        for n in order:
            ids, ws = [e for e, _ in per[n]], [w for _, w in per[n]]
            if self.q8k:
                tasks.append(ExpertTask(layer, None, ids, ws, q8k_wire.quantize(rows[n])))
            else:
                tasks.append(ExpertTask(layer, rows[n], ids, ws))
        body = expert_wire.encode_multi_request(tasks)
        media = expert_wire.MEDIA_MULTI_Q8K if self.q8k else expert_wire.MEDIA_MULTI
        path = "/v1/experts/multi-layer-batch" + ("-q8k" if self.q8k else "")
        t0 = time.perf_counter()
        try:
            r = shard.client.post(path, content=body, headers={"Content-Type": media, "Accept": expert_wire.MEDIA_MULTI})
        except httpx.HTTPError as exc:
            raise _ShardFailed(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        if r.status_code >= 500:
            raise _ShardFailed(f"HTTP {r.status_code}: {r.text[:200]}")
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:200]
            raise RemoteError(f"FFN shard {shard.url} refused experts of layer {layer}: HTTP {r.status_code}: {msg}")
        try:
            results = expert_wire.decode_multi_response(r.content)
        except WireError as exc:
            raise _ShardFailed(f"malformed response: {exc}") from None
        if len(results) != len(order) or any(l != layer or v.size != rows.shape[1] for l, v in results):
            raise _ShardFailed(f"multi-layer-batch answered {len(results)} results, expected {len(order)} of "
                               f"layer {layer}")
        with self.remote._lock:
            st = self.remote.stats
            st.requests += 1
            st.bytes_sent += len(body)
            st.bytes_received += len(r.content)
            st.seconds += time.perf_counter() - t0
        return {n: v for n, (_l, v) in zip(order, results)}


class _ShardFailed(Exception):
    """A shard failure another shard owning the same experts may not have."""
