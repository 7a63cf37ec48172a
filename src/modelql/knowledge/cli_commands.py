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

    import sys
    import time

    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    rep = label_vindex(vindex, triples, templates, min_z=DEFAULT_MIN_Z if min_z is None else min_z,
                       replace=replace, clusters=not no_clusters, progress=progress)
    rels = ", ".join(f"{r} {n}" for r, n in sorted(rep.per_relation.items())) or "none"
    print(f"labelled {rep.new_labels} features from {rep.probes} probes in {rep.seconds:.1f}s ({rels}); "
          f"{rep.total_labels} labels in {rep.path}"
          + (f"; {rep.clusters_relabelled} clusters relabelled" if rep.clusters_relabelled else ""))


def extract_labeller(triples=None, max_subjects: int | None = None):
    """`modelql extract --label`: the probe step run on the staging vindex (no calibration or causal
    check: `modelql label` adds those) — `feature_labels.json` + `probe_meta.json` written there."""
    def run(directory: Path) -> None:
        from ..vindex import Vindex
        from .labels import (MAX_PROBE_SUBJECTS, default_templates, default_triples, load_triples,
                             normalise_triples, probe_features, write_probe_labels)

        vx = Vindex.load(directory)
        if triples is None:
            tri = default_triples()
        elif isinstance(triples, dict):
            tri = normalise_triples(triples)
        else:
            tri = load_triples(triples)
        tmpl = default_templates(tri.keys())
        result = probe_features(vx, tri, tmpl, max_subjects=max_subjects or MAX_PROBE_SUBJECTS)
        write_probe_labels(directory, result, tmpl, vx.model, replace=True)

    return run


def explain_command(
    args: list[str] = typer.Argument(..., metavar="[MODEL] PROMPT", show_default=False),
    max_tokens: int = typer.Option(16, "--max-tokens", "-n", min=1, help="maximum tokens to generate (greedy)"),
    top: int = typer.Option(5, "--top", "-k", min=1, max=100, help="features shown per generated token"),
    as_json: bool = typer.Option(False, "--json", help="print the explanation as JSON"),
    html_out: Optional[str] = typer.Option(None, "--html", metavar="FILE",
                                           help="also write the explanation as a standalone HTML page"),
    knowledge_url: Optional[str] = typer.Option(
        None, "--knowledge-url", envvar="MODELQL_KNOWLEDGE_URL",
        help="look features up on this knowledge server (modelql or LARQL) instead of a local vindex"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MODELQL_KNOWLEDGE_API_KEY",
                                          help="bearer key of the knowledge server"),
) -> None:
    """Generate a completion of PROMPT and show, for each generated token, the FFN features that
    wrote it (largest direct contribution to its logit; layer, feature, gate score, what the
    feature promotes, its relation label) and attention's share."""
    import json
    import sys

    from ..errors import ModelqlError
    from .explain import RemoteFeatures, VindexFeatures, explain

    if len(args) > 2:
        raise ModelqlError("expected [MODEL] PROMPT (quote a prompt with spaces)")
    model_ref, prompt = (None, args[0]) if len(args) == 1 else (args[0], args[1])
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise ModelqlError("empty prompt")
    if knowledge_url:
        from ..cli import load
        from ..client import KnowledgeClient

        model = load(model_ref)
        client = KnowledgeClient(knowledge_url, api_key=api_key)
        client.stats()  # fail early, with the connection error, before generating
        source = RemoteFeatures(client, model)
    else:
        vx = local_vindex(model_ref)
        from .queries import model_for

        model = model_for(vx)
        source = VindexFeatures(vx)
    ex = explain(model, prompt, source, max_tokens=max_tokens, top=top)
    if html_out:
        from ..viz import explanation_html, write_html

        write_html(html_out, explanation_html(ex))
    if as_json:
        print(json.dumps(ex.to_json(), ensure_ascii=False, indent=2))
    else:
        print("\n".join(explanation_lines(ex)))


def local_vindex(model_ref: str | None):
    """The vindex `modelql explain` reads: a vindex as given, a model directory's cached vindex
    (extracted on first use), or the embedded model's labelled default vindex."""
    from ..errors import ModelNotFoundError
    from ..lql import default_vindex as dv
    from ..vindex import Vindex

    if model_ref is None:
        if not dv.default_model_installed():
            raise ModelNotFoundError("no MODEL given and the embedded default model is not installed")
        return Vindex.load(dv.default_vindex_path())
    p = Path(model_ref).expanduser()
    if (p / "index.json").is_file():
        return Vindex.load(p)
    if (p / "config.json").is_file():
        return Vindex.load(dv.ensure_vindex(p))
    raise ModelNotFoundError(f"{model_ref} is neither a vindex nor an HF model directory (GGUF files have no "
                             f"vindex: extract one, or use --knowledge-url)")


def explanation_lines(ex) -> list[str]:
    """The people's view of an `Explanation`: a header and one aligned table."""
    from ..lql.render import Table, _table_lines

    out = [f"Prompt:     {ex.prompt}",
           f"Completion: {ex.completion!r} ({len(ex.tokens)} token{'s' if len(ex.tokens) != 1 else ''}, greedy"
           f"{', ' + ex.finish_reason if ex.finish_reason else ''}; features from {ex.features_from})", ""]
    if not ex.tokens:
        return out + ["  (no tokens generated)"]
    t = Table(["#", "Token", "Attn", "Layer", "Feature", "Logit+", "Gate", "Promotes", "Relation"],
              align="rlrllrrll", indent=0)
    for tok in ex.tokens:
        first = True
        share = tok.attention_share
        for f in tok.features or [None]:
            head = ([str(tok.index), repr(tok.token), "—" if share is None else f"{100 * share:.0f}%"] if first
                    else ["", "", ""])
            first = False
            if f is None:
                t.rows.append(head + ["", "", "", "", "(no feature with metadata writes it)", ""])
                continue
            contrib = "" if f.contribution is None else f"{f.contribution:+.2f}"
            t.rows.append(head + [f"L{f.layer}", f"F{f.feature}", contrib, f"{f.gate:+.2f}",
                                  ", ".join(x for x in f.top_tokens[:4] if x) or f.top_token, f.relation or "—"])
    return out + _table_lines(t) + ["", "Logit+: the feature's direct contribution to the token's logit; "
                                    "Attn: attention's share of the direct contributions",
                                    f"({ex.latency_ms / 1000:.2f} s)"]
