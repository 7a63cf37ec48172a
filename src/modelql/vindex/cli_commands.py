"""`modelql extract` and `modelql verify`: registered on the typer app by `register(app)`."""

from __future__ import annotations

from pathlib import Path

import typer


def extract_command(
    model: str = typer.Argument(..., help="HF model directory (config.json + *.safetensors + tokenizer.json)"),
    output: Path = typer.Option(..., "-o", "--output", help="vindex directory to create (e.g. model.vindex)"),
    level: str = typer.Option("browse", "--level", help="browse | attention | inference"),
    dtype: str = typer.Option("f16", "--dtype", help="storage dtype of gate_vectors.bin / embeddings.bin: f16 | f32"),
    down_top_k: int = typer.Option(10, "--down-top-k", help="tokens kept per feature in down_meta.bin"),
    quant: str = typer.Option("auto", "--quant", help="auto: a low-bit GGUF's weights keep their blocks (level "
                                                      "inference) | none: float safetensors"),
    force: bool = typer.Option(False, "--force", help="replace OUTPUT if it exists"),
    no_clusters: bool = typer.Option(False, "--no-clusters", help="skip relation clustering"),
    label: bool = typer.Option(False, "--label", help="probe-label the features into feature_labels.json "
                                                      "(needs --level inference; default facts or --triples)"),
    triples: Path = typer.Option(None, "--triples", help="facts for --label: TSV (entity, relation, target) or "
                                                         "JSON {relation: {\"pairs\": [[s, o]]}}"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Decompile a model's FFN into a vindex (streaming, one layer at a time)."""
    from rich.console import Console
    from rich.markup import escape

    from ..errors import ModelqlError
    from .extract import extract

    if triples is not None and not label:
        raise ModelqlError("--triples is for --label")
    labeller = None
    if label:
        from ..knowledge.cli_commands import extract_labeller

        labeller = extract_labeller(triples)
    result = extract(model, output, level=level, dtype=dtype, down_top_k=down_top_k, progress=not quiet,
                     clusters=not no_clusters, force=force, labeller=labeller, quant=quant)
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"wrote {escape(str(result.path))} ({result.level}, {escape(result.storage)}): {result.num_layers} layers, "
        f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f}s "
        f"({result.gb_per_s:.2f} GB/s of weights read)"
    )


def verify_command(
    path: Path = typer.Argument(..., help="vindex directory"),
) -> None:
    """Check a vindex's structure, re-hash every file listed in its checksums and parse its JSON files."""
    from rich.console import Console
    from rich.markup import escape

    from .vindex import verify

    console = Console(soft_wrap=True, highlight=False)
    report = verify(path)
    for name in report.checked:
        if name not in report.failures:
            console.print(f"[green]ok[/green]      {escape(name)}")
    for name, reason in report.failures.items():
        console.print(f"[red]FAILED[/red]  {escape(name)}: {escape(reason)}")
    for name in report.unlisted:
        console.print(f"[yellow]no sum[/yellow]  {escape(name)} (not listed in index.json's checksums: "
                      f"structure checked only)")
    for problem in report.problems:
        console.print(f"[red]problem[/red] {escape(problem)}")
    if report.ok:
        console.print(f"{escape(str(path))}: {len(report.checked)} files verified")
    else:
        console.print(f"{escape(str(path))}: verification failed")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("extract")(extract_command)
    app.command("verify")(verify_command)
