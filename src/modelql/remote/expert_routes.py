"""LARQL's single-expert routes for MoE layers: a client that routes a token itself asks a server
(or the shard owning the layer) for one expert's FFN output and weighs it by its router weight.

* `POST /v1/expert/{layer}/{expert_id}` `{"residual": [H floats]}` → `{"output": [H], "latency_ms"}`;
* `POST /v1/expert/batch` `{"requests": [{"layer", "expert_id", "residual"}]}` →
  `{"results": [{"layer", "expert_id", "output"}], "latency_ms"}`.

`residual` is the layer's normalised FFN input (what `/v1/walk-ffn` takes); `output` is
`down(act(gate·x) ⊙ up·x)` of that expert alone — no routing weight (LARQL's shapes, `routes/expert`).
The expert computed is the served model's (`ffn.moe.MoeFfn.expert_weights`, with a patch overlay's
edited copy when the served session edits it). A dense model answers 404, as LARQL does without
`--experts`; a layer outside a shard's `--layers`, an unknown expert or a wrong width is a 400.
"""

from __future__ import annotations

import math
import time

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from ..server.body import BodyError, JsonRoute, read_json
from ..server.errors import HttpError, ServiceUnavailable
from .routes import owned_layers

router = APIRouter(tags=["remote ffn"], route_class=JsonRoute)
MAX_BATCH = 4096
_ERRORS = {400: {"description": "unknown or unowned layer, unknown expert, wrong residual width"},
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


def _moe(request: Request):
    """(model, its MoeFfn, owned layer range) of the served model, or the HTTP error why not."""
    st = request.app.state.modelql
    reason = st.config.unavailable_reason(request.url.path, "walk_ffn")
    if reason:
        raise ServiceUnavailable(reason)
    model = st.require_model()
    ffn = getattr(model, "moe_ffn", None) or model.ffn
    if model.spec.moe is None or (not hasattr(ffn, "expert_weights") and not hasattr(ffn, "moe_ffn")):
        raise HttpError(404, f"{model.spec.family} has no experts: the expert routes serve mixture-of-experts "
                             "models", code="not_found")
    return model, ffn, owned_layers(st, model)


def expert_output(model, ffn, owned, layer: int, expert: int, residual: list[float]) -> list[float]:
    """One expert's FFN output for one normalised FFN input (no routing weight)."""
    spec = model.spec
    if not 0 <= layer < spec.num_layers:
        raise HttpError(400, f"layer {layer} out of range (the model has {spec.num_layers} layers)", param="layer")
    if owned is not None and not owned[0] <= layer <= owned[1]:
        raise HttpError(400, f"layer {layer} not served by this shard (owned: {owned[0]}–{owned[1]})", param="layer")
    blocks = spec.moe.num_experts + (1 if spec.moe.shared_size else 0)
    if not 0 <= expert < blocks:
        raise HttpError(400, f"expert {expert} out of range (layer {layer} has {spec.moe.num_experts} experts"
                             f"{' and a shared one, id ' + str(spec.moe.num_experts) if blocks > spec.moe.num_experts else ''})",
                        param="expert_id")
    if len(residual) != spec.hidden_size:
        raise HttpError(400, f"residual has {len(residual)} values, the model's hidden size is {spec.hidden_size}",
                        param="residual")
    if not all(math.isfinite(v) for v in residual):
        raise HttpError(400, "residual values must be finite numbers", param="residual")
    moe = getattr(ffn, "moe_ffn", ffn)  # a patched FFN: its edited copy of the expert, if any
    edits = ffn.source.layer_edits(layer) if hasattr(ffn, "source") else None
    w_in, w_down = (edits or {}).get(expert) or moe.expert_weights(layer, expert)
    with torch.inference_mode():
        x = torch.tensor([residual], dtype=model.dtype)
        out = moe._expert(x, w_in, w_down)[0].float()
    if not torch.isfinite(out).all():
        raise HttpError(400, f"expert {expert} of layer {layer} overflows float32 on this residual")
    return out.tolist()


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


def _schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@router.post("/v1/expert/batch", responses=_ERRORS, openapi_extra=_schema(ExpertBatchRequest))
async def expert_batch(request: Request):
    t0 = time.perf_counter()
    model, ffn, owned = _moe(request)
    body = _body(await request.body(), ExpertBatchRequest)

    def run():
        return [{"layer": c.layer, "expert_id": c.expert_id,
                 "output": expert_output(model, ffn, owned, c.layer, c.expert_id, c.residual)} for c in body.requests]

    results = await run_in_threadpool(run)
    return {"results": results, "latency_ms": round((time.perf_counter() - t0) * 1e3, 3)}


@router.post("/v1/expert/{layer}/{expert_id}", responses=_ERRORS, openapi_extra=_schema(ExpertRequest))
async def expert(layer: int, expert_id: int, request: Request):
    t0 = time.perf_counter()
    model, ffn, owned = _moe(request)
    body = _body(await request.body(), ExpertRequest)
    out = await run_in_threadpool(expert_output, model, ffn, owned, layer, expert_id, body.residual)
    return {"output": out, "latency_ms": round((time.perf_counter() - t0) * 1e3, 3)}
