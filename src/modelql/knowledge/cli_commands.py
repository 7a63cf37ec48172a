"""`modelql label`: probe-label a vindex (body registered by `modelql.cli`; imports stay light)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def label_command(
    vindex: Path = typer.Argument(..., help="vindex directory with model weights (extract --level inference)"),
    triples: Optional[Path] = typer.Option(
        None, "--triples", help="facts: TSV (entity, relation, target) or JSON {relation: {\"pairs\": [[s, o]]}}; "
                                "default: the embedded model's facts"),
    templates: Optional[Path] = typer.Option(
        None, "--templates", help="JSON {relation: template | [templates]} with {X} for the subject"),
    min_z: float = typer.Option(None, "--min-z", help="activation z-score a probed feature must reach"),
    replace: bool = typer.Option(False, "--replace", help="drop existing probe labels instead of merging"),
    no_clusters: bool = typer.Option(False, "--no-clusters", help="do not relabel relation clusters"),
) -> None:
    """Label a vindex's features with relations by probing it with known facts.

    Writes feature_labels.json and probe_meta.json (atomically) and relabels the relation
    clusters from the triples.
    """
    from .labels import DEFAULT_MIN_Z, label_vindex

    rep = label_vindex(vindex, triples, templates, min_z=DEFAULT_MIN_Z if min_z is None else min_z,
                       replace=replace, clusters=not no_clusters)
    rels = ", ".join(f"{r} {n}" for r, n in sorted(rep.per_relation.items())) or "none"
    print(f"labelled {rep.new_labels} features from {rep.probes} probes in {rep.seconds:.1f}s ({rels}); "
          f"{rep.total_labels} labels in {rep.path}"
          + (f"; {rep.clusters_relabelled} clusters relabelled" if rep.clusters_relabelled else ""))
