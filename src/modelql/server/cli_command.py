"""`modelql serve`: the command body (registered in `modelql.cli`). Imports only typer at module
level; the server stack loads when the command runs."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..cli_options import FfnApiKeyOpt, FfnOpt, WireOpt


def serve_command(
    models: Annotated[Optional[list[str]], typer.Argument(
        metavar="MODEL_OR_VINDEX...", show_default=False,
        help="HF model directory, vindex with weights, or GGUF file (default: the embedded model). The "
             "knowledge routes browse the vindex; a model directory's vindex is extracted into the cache "
             "($MODELQL_CACHE) on first use, in the background (browse routes answer 503 until it is ready). "
             "Several: multi-model mode (OpenAI routes pick by `model`, knowledge routes under /v1/{id}/)")] = None,
    model_dir: Annotated[Optional[str], typer.Option(
        "--dir", help="multi-model mode: serve every *.vindex directory in DIR (id = name without .vindex)")] = None,
    host: Annotated[str, typer.Option("--host", help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="port (0 = any free port)")] = 8080,
    model_id: Annotated[Optional[str], typer.Option("--model-id", help="id reported by /v1/models")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="MODELQL_API_KEY", help="require 'Authorization: Bearer KEY' (not on /health)")] = None,
    rate_limit: Annotated[Optional[str], typer.Option(
        "--rate-limit", help="per-client token bucket: N/sec, N/min or N/hour")] = None,
    trust_forwarded_for: Annotated[bool, typer.Option(
        "--trust-forwarded-for", help="rate-limit by the first X-Forwarded-For address")] = False,
    max_body: Annotated[int, typer.Option(
        "--max-body", "--max-body-bytes", min=1, help="request body limit in bytes (413 beyond)")] = 64 * 1024 * 1024,
    patch_dir: Annotated[Optional[str], typer.Option(
        "--patch-dir", help="directory of .vlp files clients may apply by name (POST /v1/patches/apply "
                            "{\"url\": NAME}); without it only inline patches are accepted")] = None,
    max_patch_bytes: Annotated[int, typer.Option(
        "--max-patch-bytes", min=1, help="largest .vlp file read from --patch-dir")] = 64 * 1024 * 1024,
    cors: Annotated[bool, typer.Option("--cors", help="permissive CORS headers; preflights need no key")] = False,
    no_infer: Annotated[bool, typer.Option("--no-infer", help="serve no generation (503 on those routes)")] = False,
    embed_only: Annotated[bool, typer.Option("--embed-only", help="embedding service mode")] = False,
    ffn_only: Annotated[bool, typer.Option("--ffn-only", help="FFN service mode (walk-ffn)")] = False,
    layers: Annotated[Optional[str], typer.Option("--layers", help="own only layers a-b (walk-ffn shards)")] = None,
    experts: Annotated[Optional[str], typer.Option(
        "--experts", help="MoE shard: own only experts a-b of its layers (the shared expert is id num_experts); "
                          "served by the /v1/expert* routes")] = None,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", min=1, help="sequences decoded together in one batched step")] = 16,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=0, help="sequences waiting for a batch slot before requests are refused")] = 64,
    queue_full_status: Annotated[int, typer.Option(
        "--queue-full-status", help="status when the queue is full: 503 or 429")] = 503,
    max_n: Annotated[int, typer.Option(
        "--max-n", min=1, help="largest OpenAI `n` (choices per request); 1 = n > 1 is a 400")] = 1,
    strict_model_name: Annotated[bool, typer.Option(
        "--strict-model-name", help="404 for a request naming another model")] = False,
    graceful_timeout: Annotated[float, typer.Option(
        "--graceful-timeout", min=0.0, help="seconds in-flight requests get at shutdown")] = 10.0,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, help="torch intra-op threads (default: torch's choice)")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="compute dtype: float32 or bfloat16")] = "float32",
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level")] = "warning",
    ffn: FfnOpt = None,
    wire: WireOpt = "f32",
    ffn_api_key: FfnApiKeyOpt = None,
    enable_i8_wire: Annotated[bool, typer.Option(
        "--enable-i8-wire", envvar="MODELQL_I8_WIRE", help="walk-ffn may answer i8 when asked")] = False,
    disable_f16_wire: Annotated[bool, typer.Option(
        "--disable-f16-wire", envvar="MODELQL_F16_WIRE_DISABLE", help="walk-ffn never answers f16")] = False,
    patch: Annotated[Optional[list[str]], typer.Option(
        "--patch", help="apply a .vlp patch before serving (repeatable): generation, GET /v1/patches and DESCRIBE see it, "
                          "DELETE /v1/patches/NAME removes it")] = None,
) -> None:
    from ..cli import load
    from .config import ServerConfig, ServerConfigError
    from .serve import serve

    config = ServerConfig(
        host=host, port=port, model_id=model_id, api_key=api_key, rate_limit=rate_limit,
        trust_forwarded_for=trust_forwarded_for, max_body_bytes=max_body, cors=cors, no_infer=no_infer,
        embed_only=embed_only, ffn_only=ffn_only, layers=layers, experts=experts, max_batch=max_batch, max_queue=max_queue,
        queue_full_status=queue_full_status, max_n=max_n, strict_model_name=strict_model_name,
        graceful_timeout=graceful_timeout, log_level=log_level, i8_wire=enable_i8_wire,
        f16_wire=not disable_f16_wire, patch_dir=patch_dir,
        max_patch_bytes=max_patch_bytes)
    if ffn and ffn_only:
        raise ServerConfigError("--ffn and --ffn-only cannot be combined (a shard computes its FFN locally)")
    if ffn:
        from ..remote.client import load_remote_model

        def load(ref, dtype):  # noqa: F811 - the client half of a split model
            return load_remote_model(ref, ffn, wire, dtype, api_key=ffn_api_key)
    if patch and (ffn or ffn_only or model_dir is not None or (models and len(models) > 1)):
        raise ServerConfigError("--patch applies to one locally computed model: not with --ffn, --ffn-only, "
                                "--dir or several models")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if model_dir is not None:
        from .config import ServerConfigError
        from .multi import vindex_children

        if models:
            raise ServerConfigError("give models as arguments or --dir, not both")
        models = [str(p) for p in vindex_children(model_dir)]
    refs = models or [None]
    serve(refs if len(refs) > 1 else refs[0], config, dtype=dtype, loader=load, multi=model_dir is not None,
          patches=patch)
