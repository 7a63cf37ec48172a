"""typer option types shared by several commands (`generate` and `serve` take the same remote-FFN
flags), so a flag is spelled and documented once."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

FfnOpt = Annotated[Optional[str], typer.Option(
    "--ffn", help="run each layer's FFN on remote shards: URL[,URL...] or a-b=URL[,...] (replicas fail over)")]
WireOpt = Annotated[str, typer.Option("--wire", help="--ffn encoding: f32, f16 or i8 answers, or q8k (LARQL's Q8_K requests)")]
FfnApiKeyOpt = Annotated[Optional[str], typer.Option(
    "--ffn-api-key", envvar="MODELQL_FFN_API_KEY", help="bearer key the --ffn shards require")]
