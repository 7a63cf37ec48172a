"""LARQL's expert routes for MoE layers: a client that routes a token itself asks a server (or the
shard owning the layer and the experts) for expert outputs and weighs them by its router weights.

* `GET /v1/expert/topology` → `{model_id, num_experts, num_layers, owned_start, owned_end}` (the
  inclusive `--experts` range; 404 on a server started without `--experts`, as LARQL);
* `POST /v1/expert/{layer}/{expert_id}` `{"residual": [H]}` → `{"output": [H], "latency_ms"}`;
* `POST /v1/expert/batch` `{"requests": [{"layer", "expert_id", "residual"}]}` →
  `{"results": [{"layer", "expert_id", "output"}], "latency_ms"}`, or the same as LARQL's binary
  `application/x-larql-expert` frames (`expert_wire`);
* `POST /v1/experts/layer-batch[-f16]`: one residual + K (expert_id, weight) pairs → Σ weight · output;
* `POST /v1/experts/multi-layer-batch[-q8k]`: N such tasks of any layers in one frame → N sums.

`residual` is what LARQL's client sends: the input of the layer's expert block before the experts'
own pre-norm. For Gemma 4 that is the post-attention residual and the server applies the experts'
norm (`pre_feedforward_layernorm_2`), as LARQL does; Mixtral, Qwen-MoE and OLMoE experts have no
norm of their own and read the FFN norm's output, so there the residual is that normalised input
(what `/v1/walk-ffn` takes). The `-q8k` variant carries the normalised input already (no norm).
An output is `down(act(gate·x) ⊙ up·x)` with no routing weight; the batch routes weigh and sum, and
apply no post-experts norm. Expert `num_experts` is the shared expert (Qwen2-MoE), unweighted.

The experts computed are the served model's (`ffn.moe.MoeFfn`, with a patch overlay's edited copy
when the served session edits one). A dense model answers 404, as LARQL does without experts; a
layer outside a shard's `--layers`, an expert outside its `--experts`, an unknown expert or a wrong
width is a 400.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ..errors import WireError
from ..server.body import BodyError, JsonRoute, read_json
from ..server.errors import HttpError, ServiceUnavailable
from . import expert_wire
from .expert_wire import ExpertTask
from .routes import owned_layers

router = APIRouter(tags=["remote ffn"], route_class=JsonRoute)
MAX_BATCH = 4096
_ERRORS = {400: {"description": "unknown or unowned layer or expert, wrong residual width, malformed frame"},
           404: {"description": "the served model has no experts"},
           503: {"description": "not served in this mode, or still loading"}}


class ExpertRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    residual: list[float] = Field(max_length=1 << 16)


class ExpertCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    layer: int
    expert_id: int
    residual: list[float] = Field(max_length=1 << 16)


class ExpertBatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    requests: list[ExpertCall] = Field(max_length=MAX_BATCH)


class Served:
    """The served model's experts: the model, its expert FFN (maybe overlay-patched), the shard's
    owned layer range (None: all)."""

    def __init__(self, model, ffn, owned):
        self.model, self.ffn, self.owned = model, ffn, owned
        self.moe = getattr(ffn, "moe_ffn", ffn)
        self.spec = model.spec

    def run(self, task: ExpertTask, prenormed: bool = False) -> np.ndarray:
        """Σ weights · experts of one task, float32 [H]; every bad input is a 400."""
        spec, layer = self.spec, task.layer
        if not 0 <= layer < spec.num_layers:
            raise HttpError(400, f"layer {layer} out of range (the model has {spec.num_layers} layers)", param="layer")
        if self.owned is not None and not self.owned[0] <= layer <= self.owned[1]:
            raise HttpError(400, f"layer {layer} not served by this shard (owned: {self.owned[0]}–{self.owned[1]})",
                            param="layer")
        moe = spec.moe
        blocks = moe.num_experts + (1 if moe.shared_size else 0)
        if len(task.ids) != len(task.weights):
            raise HttpError(400, f"{len(task.ids)} expert ids but {len(task.weights)} weights")
        for e in task.ids:
            if not 0 <= e < blocks:
                raise HttpError(400, f"expert {e} out of range (layer {layer} has {moe.num_experts} experts"
                                     f"{' and a shared one, id ' + str(moe.num_experts) if moe.shared_size else ''})",
                                param="expert_id")
            if e not in self.moe.held:
                held = sorted(self.moe.held)
                raise HttpError(400, f"expert {e} not owned by this shard (owns {held[0]}–{held[-1]})"
                                if held else f"expert {e} not owned by this shard", param="expert_id")
        if not all(math.isfinite(w) for w in task.weights):
            raise HttpError(400, "expert weights must be finite numbers", param="weights")
        row = task.q8k.dequantize() if task.q8k is not None else np.asarray(task.residual, dtype=np.float32)
        if row.size != spec.hidden_size:
            raise HttpError(400, f"residual has {row.size} values, the model's hidden size is {spec.hidden_size}",
                            param="residual")
        if not np.isfinite(row).all():
            raise HttpError(400, "residual values must be finite numbers", param="residual")
        edits = self.ffn.source.layer_edits(layer) if hasattr(self.ffn, "source") else None
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(row))[None].to(self.model.dtype)
            if not prenormed:
                x = self.moe.expert_input(layer, x)
            out = self.moe.weighted_sum(layer, x, task.ids, task.weights, edits)[0].float().numpy()
        if not np.isfinite(out).all():
            raise HttpError(400, f"the experts of layer {layer} overflow float32 on this residual")
        return out


def _served(request: Request) -> Served:
    """The served model's experts, or the HTTP error why not (a dense model: 404)."""
    st = request.app.state.modelql
    reason = st.config.unavailable_reason(request.url.path, "walk_ffn")
    if reason:
        raise ServiceUnavailable(reason)
    model = st.require_model()
    ffn = getattr(model, "moe_ffn", None) or model.ffn
    if model.spec.moe is None or not hasattr(getattr(ffn, "moe_ffn", ffn), "weighted_sum"):
        raise HttpError(404, f"{model.spec.family} has no experts: the expert routes serve mixture-of-experts "
                             "models", code="not_found")
    return Served(model, ffn, owned_layers(st, model))


def expert_output(served: Served, layer: int, expert: int, residual) -> list[float]:
    """One expert's output for one residual (no routing weight)."""
    return served.run(ExpertTask(layer, np.asarray(residual, dtype=np.float32), [expert], [1.0])).tolist()


def _body(raw: bytes, schema: type[BaseModel]):
    """The JSON body as `schema`, parsed after the MoE check (a dense server answers 404 first)."""
    try:
        return schema.model_validate(read_json(raw or b"null"))
    except BodyError as exc:
        raise HttpError(400, f"We could not parse the JSON body of your request: {exc.msg}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        raise HttpError(400, f"{where}: {err.get('msg')}", param=where) from None


def _schema(model: type[BaseModel], binary: str | None = None) -> dict:
    content = {"application/json": {"schema": model.model_json_schema()}}
    if binary:
        content[binary] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def _binary_schema(media: str) -> dict:
    return {"requestBody": {"required": True, "content": {media: {"schema": {"type": "string", "format": "binary"}}}}}


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 3)


@router.get("/v1/expert/topology", responses={
    200: {"description": "the expert range this shard owns (`--experts`, inclusive)"},
    404: {"description": "the server was not started with --experts (it owns every expert, or has none)"}})
async def expert_topology(request: Request):
    st = request.app.state.modelql
    owned = getattr(st.config, "owned_experts", None)
    model = st.model
    if owned is None or model is None or model.spec.moe is None:
        raise HttpError(404, "this server was not started with --experts: it owns every expert of its layers "
                             "(or its model has none)", code="not_found")
    return {"model_id": st.model_id, "num_experts": model.spec.moe.num_experts, "num_layers": model.spec.num_layers,
            "owned_start": owned[0], "owned_end": owned[1]}


@router.post("/v1/expert/batch", responses=_ERRORS, openapi_extra=_schema(ExpertBatchRequest, expert_wire.MEDIA_EXPERT))
async def expert_batch(request: Request):
    t0 = time.perf_counter()
    served = _served(request)
    raw = await request.body()
    if _media(request) == expert_wire.MEDIA_EXPERT:
        items = expert_wire.decode_expert_request(raw)
        if len(items) > MAX_BATCH:
            raise WireError(f"binary expert request has {len(items)} items (at most {MAX_BATCH})")
        outs = await run_in_threadpool(lambda: [expert_output(served, l, e, r) for l, e, r in items])
        body = expert_wire.encode_expert_response(
            [(l, e, o) for (l, e, _), o in zip(items, outs)], _ms(t0))
        return Response(body, media_type=expert_wire.MEDIA_EXPERT)
    req = _body(raw, ExpertBatchRequest)

    def run():
        return [{"layer": c.layer, "expert_id": c.expert_id,
                 "output": expert_output(served, c.layer, c.expert_id, c.residual)} for c in req.requests]

    results = await run_in_threadpool(run)
    return {"results": results, "latency_ms": _ms(t0)}


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _layer_batch(request: Request, f16: bool) -> Response:
    t0 = time.perf_counter()
    served = _served(request)
    task = expert_wire.decode_layer_request(await request.body(), f16)
    out = await run_in_threadpool(served.run, task)
    return Response(expert_wire.encode_layer_response(out, _ms(t0), f16),
                    media_type=expert_wire.MEDIA_LAYER_F16 if f16 else expert_wire.MEDIA_LAYER)


@router.post("/v1/experts/layer-batch", responses=_ERRORS, openapi_extra=_binary_schema(expert_wire.MEDIA_LAYER))
async def experts_layer_batch(request: Request):
    """One residual and K (expert_id, weight) pairs of one layer → their weighted sum (f32)."""
    return await _layer_batch(request, False)


@router.post("/v1/experts/layer-batch-f16", responses=_ERRORS,
             openapi_extra=_binary_schema(expert_wire.MEDIA_LAYER_F16))
async def experts_layer_batch_f16(request: Request):
    """`/v1/experts/layer-batch` with the residual and the answer as half floats."""
    return await _layer_batch(request, True)


async def _multi(request: Request, q8k: bool) -> Response:
    served = _served(request)
    tasks = expert_wire.decode_multi_request(await request.body(), q8k)
    outs = await run_in_threadpool(lambda: [served.run(t, prenormed=q8k) for t in tasks])
    return Response(expert_wire.encode_multi_response([(t.layer, o) for t, o in zip(tasks, outs)]),
                    media_type=expert_wire.MEDIA_MULTI)


@router.post("/v1/experts/multi-layer-batch", responses=_ERRORS,
             openapi_extra=_binary_schema(expert_wire.MEDIA_MULTI))
async def experts_multi_layer_batch(request: Request):
    """N layer-batch tasks (any layers) in one frame → N weighted sums, in order."""
    return await _multi(request, False)


@router.post("/v1/experts/multi-layer-batch-q8k", responses=_ERRORS,
             openapi_extra=_binary_schema(expert_wire.MEDIA_MULTI_Q8K))
async def experts_multi_layer_batch_q8k(request: Request):
    """`/v1/experts/multi-layer-batch` with each task's normalised expert input quantised to Q8_K."""
    return await _multi(request, True)


@router.post("/v1/expert/{layer}/{expert_id}", responses=_ERRORS, openapi_extra=_schema(ExpertRequest))
async def expert(layer: int, expert_id: int, request: Request):
    t0 = time.perf_counter()
    served = _served(request)
    body = _body(await request.body(), ExpertRequest)
    out = await run_in_threadpool(expert_output, served, layer, expert_id, body.residual)
    return {"output": out, "latency_ms": _ms(t0)}
