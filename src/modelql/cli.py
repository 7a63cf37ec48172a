"""The `modelql` command.

Adding a command: write a small function decorated with `@command()` (it registers the typer
command and maps errors), import heavy modules *inside* it so `modelql --help` stays fast, and
reuse the shared option types below (`ModelArg`, `DtypeOpt`, the sampling options). Every
`ModelqlError` (and `OSError` on paths) becomes `error: <one line>` on stderr with exit code 1;
anything else is a bug and is reported as `error: internal error: ...` (exit 2), with the
traceback only when `MODELQL_DEBUG=1`.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Any, Callable, Optional

import typer

from .cli_options import FfnApiKeyOpt, FfnOpt, WireOpt

app = typer.Typer(
    name="modelql",
    help="A local transformer model, served and queried like a database.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"modelql {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """A local transformer model, served and queried like a database."""


# -- error mapping -----------------------------------------------------------------------------


def error(message: str, code: int = 1) -> typer.Exit:
    """Print `error: <message>` (first line only) on stderr; returns the Exit to raise."""
    line = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    print(f"error: {line}", file=sys.stderr, flush=True)
    return typer.Exit(code)


def _os_message(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def run_guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a command body, mapping user-facing failures to one line and an exit code."""
    from .errors import ModelqlError

    try:
        return fn(*args, **kwargs)
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except ModelqlError as exc:
        raise error(str(exc)) from None
    except BrokenPipeError:  # output piped into e.g. `head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None
    except OSError as exc:
        raise error(_os_message(exc)) from None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug: still no traceback unless asked
        if os.environ.get("MODELQL_DEBUG"):
            raise
        raise error(f"internal error: {type(exc).__name__}: {exc}", code=2) from None


def command(*args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@app.command(...)` with the error mapping applied."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            return run_guarded(fn, *a, **k)

        app.command(*args, **kwargs)(wrapper)
        return fn

    return register


# -- shared options ------------------------------------------------------------------------------

ModelArg = Annotated[
    Optional[str],
    typer.Argument(help="HF model directory, vindex with weights, or GGUF file (default: the embedded model)",
                   show_default=False),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="compute dtype: float32 or bfloat16")]
QuantizeOpt = Annotated[Optional[str], typer.Option(
    "--quantize", help="weights: auto (a quantized GGUF stays low-bit), none (dequantize), int8 or int4; "
    "append :int8 for int8 activations in the low-bit kernels (fastest, least exact) or :int16 (two int8 "
    "passes: float32's tokens, faster decoding, slower prefill)")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="maximum tokens to generate")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="keep the k most likely tokens (0 = off)")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="nucleus sampling mass")]
MinPOpt = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="drop tokens below min_p × top prob")]
RepetitionOpt = Annotated[float, typer.Option("--repetition-penalty", help="HF repetition penalty (1 = off)")]
FrequencyOpt = Annotated[float, typer.Option("--frequency-penalty", help="OpenAI frequency penalty")]
PresenceOpt = Annotated[float, typer.Option("--presence-penalty", help="OpenAI presence penalty")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="RNG seed: same seed, same text")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="stop string (repeatable), never printed")]
IgnoreEosOpt = Annotated[bool, typer.Option("--ignore-eos", help="keep generating past end-of-sequence tokens "
                                                               "(until --max-tokens or a stop string)")]
PatchOpt = Annotated[Optional[list[str]], typer.Option("--patch", help="apply a .vlp patch to the model's FFN "
                                                                       "(repeatable, stacked in order)")]


def with_patches(model, patches: list[str] | None):
    """`model` with the .vlp patches applied (the model directory's vindex is extracted on first use)."""
    from .chat_repl import apply_patch

    for path in patches or []:
        model = apply_patch(model, path)
    return model


def load(model: str | None, dtype: str = "float32", quantize: str | None = None):
    """Load a model reference (None: the embedded default model)."""
    from .errors import ModelNotFoundError
    from .runtime.loading import load_model

    if model is None:
        try:
            from .runtime.loading import default_model_dir

            default_model_dir()
        except ImportError:
            raise ModelNotFoundError("no MODEL given and the embedded default model is not installed") from None
    return load_model(model, dtype, quantize)


def sampling_params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                    presence_penalty, seed, stop, ignore_eos: bool = False):
    from .runtime.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                          presence_penalty=presence_penalty, seed=seed, stop=list(stop or []), ignore_eos=ignore_eos)


def stream_out(deltas) -> tuple[str, str | None, int]:
    """Write text deltas to stdout as they come; returns (text, finish_reason, tokens)."""
    text, reason, n = "", None, 0
    for d in deltas:
        if d.text:
            sys.stdout.write(d.text)
            sys.stdout.flush()
            text += d.text
        n += 1
        reason = d.finish_reason or reason
    return text, reason, n


# -- commands --------------------------------------------------------------------------------------


@command("generate", help="Stream a completion of PROMPT (greedy unless --temperature > 0). "
                          "Usage: modelql generate [MODEL] PROMPT; PROMPT '-' reads stdin.")
def generate_cmd(
    args: Annotated[list[str], typer.Argument(metavar="[MODEL] PROMPT", show_default=False)],
    max_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    min_p: MinPOpt = 0.0,
    repetition_penalty: RepetitionOpt = 1.0,
    frequency_penalty: FrequencyOpt = 0.0,
    presence_penalty: PresenceOpt = 0.0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    chat: Annotated[bool, typer.Option("--chat", help="wrap PROMPT as a user message in the chat template")] = False,
    dtype: DtypeOpt = "float32",
    quantize: QuantizeOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="finish reason and speed on stderr")] = False,
    ffn: FfnOpt = None,
    wire: WireOpt = "f32",
    ffn_api_key: FfnApiKeyOpt = None,
    patch: PatchOpt = None,
) -> None:
    import time

    from .runtime.generate import stream

    if len(args) > 2:
        raise error("expected [MODEL] PROMPT (quote a prompt with spaces)")
    model_ref, prompt = (None, args[0]) if len(args) == 1 else (args[0], args[1])
    if prompt == "-":  # `echo "prompt" | modelql generate -`: the newline echo adds is not part of the prompt
        prompt = sys.stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
        prompt = prompt[:-1] if prompt.endswith("\r") else prompt
    params = sampling_params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                             presence_penalty, seed, stop, ignore_eos)
    if ffn:
        from .remote.client import load_remote_model

        model = load_remote_model(model_ref, ffn, wire, dtype, api_key=ffn_api_key)
    else:
        model = load(model_ref, dtype, quantize)
    model = with_patches(model, patch)
    start = time.perf_counter()
    text, reason, n = stream_out(stream(model, [{"role": "user", "content": prompt}] if chat else prompt, params))
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if not text.strip():
        print(f"[the model generated no visible text: finish {reason}, {n} tokens]", file=sys.stderr)
    if verbose:
        secs = time.perf_counter() - start
        print(f"[finish: {reason}, {n} tokens in {secs:.2f}s, {n / secs if secs else 0:.1f} tok/s]", file=sys.stderr)
        st = getattr(model.ffn, "stats", None)
        if ffn and st is not None and n:
            print(f"[remote FFN: {st.requests} requests, {(st.bytes_sent + st.bytes_received) / n / 1024:.1f} KiB "
                  f"on the wire per token, {st.failovers} failovers]", file=sys.stderr)


@command("chat", help="Chat interactively with the model's chat template: history, multi-line input, "
                      "Ctrl-C stops an answer; /help lists the commands (/reset, /save, /patch, /explain).")
def chat_cmd(
    model: ModelArg = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="system prompt")] = None,
    max_tokens: MaxTokensOpt = 512,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    min_p: MinPOpt = 0.0,
    repetition_penalty: RepetitionOpt = 1.0,
    frequency_penalty: FrequencyOpt = 0.0,
    presence_penalty: PresenceOpt = 0.0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    dtype: DtypeOpt = "float32",
    patch: PatchOpt = None,
    quantize: QuantizeOpt = None,
) -> None:
    from . import chat_repl
    from .errors import ModelFormatError

    params = sampling_params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                             presence_penalty, seed, stop, ignore_eos)
    m = load(model, dtype, quantize)
    if m.tokenizer is None:
        raise ModelFormatError("chat needs a tokenizer (tokenizer.json)")
    m = with_patches(m, patch)
    session = chat_repl.ChatSession(m, params, system=system, patcher=chat_repl.apply_patch)
    chat_repl.run(session, interactive=sys.stdin.isatty() and sys.stdout.isatty())


def model_memory_bytes(model) -> int:
    """Bytes of weight storage the model holds (fused tensors and their views counted once; a
    quantized model: its packed matrices, without reading float weights)."""
    if model.quantized:
        return model.quant.decoder.nbytes
    seen: dict[int, int] = {}
    tensors = list(model.weights.values()) + list(getattr(model, "qkv_w", []))
    ffn = getattr(model, "dense_ffn", None)
    if ffn is not None:
        tensors += list(getattr(ffn, "w_in", []))
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n}{unit}"


def quant_storage(model) -> dict[str, Any]:
    """A quantized model's matmul storage: source type → kernel layout, parameters, bytes, error."""
    groups: dict[tuple[str, int], list] = {}
    for w in model.quant.info:
        groups.setdefault((w.source_type, w.bits), []).append(w)
    rows = [{"source": src, "bits": bits, "matrices": len(ws), "parameters": sum(w.params for w in ws),
             "bytes": sum(w.nbytes for w in ws), "error_max": max(w.error_max for w in ws),
             "error_rms": max(w.error_rms for w in ws)} for (src, bits), ws in sorted(groups.items())]
    parts = [f"{r['source']} → {r['bits']}-bit ({r['matrices']} matrices, {r['bytes'] / 2**20:.1f} MiB"
             + (f", requantized: rms error {r['error_rms']:.2%}" if r["error_rms"] else ", exact") + ")"
             for r in rows]
    return {"mode": model.quant.mode, "kernel": "onnxruntime MatMulNBits", "types": rows,
            "summary": f"{model.quant.mode}: " + "; ".join(parts)}


def _buffer_elements(model) -> int:
    """Elements of the tensors transformers keeps as buffers, not parameters (`TensorMap.buffer`)."""
    buffers = {name for name, tm in model.spec.global_map.items() if tm.buffer}
    buffers |= {f"layers.{i}.{name}" for name, tm in model.spec.layer_map.items() if tm.buffer
                for i in range(model.spec.num_layers)}
    return sum(model.weights[n].numel() for n in buffers if n in model.weights)


def model_info(model) -> dict[str, Any]:
    import torch

    spec = model.spec
    memory = model_memory_bytes(model)
    element = torch.tensor([], dtype=model.dtype).element_size()
    tok = model.tokenizer
    storage = None
    if model.quantized:
        storage = quant_storage(model)
        params = spec.num_parameters()
    else:
        params = memory // element - _buffer_elements(model)
    return {
        "path": str(model.path) if model.path else None,
        "family": spec.family,
        "model_type": spec.model_type,
        "layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "heads": spec.num_heads,
        "kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "activation": spec.activation,
        "experts": spec.moe.num_experts if spec.moe else None,
        "experts_per_token": spec.moe.top_k if spec.moe else None,
        "vocab_size": spec.vocab_size,
        "context": spec.max_position,
        "parameters": params,
        "dtype": str(model.dtype).removeprefix("torch.") if storage is None else f"{model.quant.activations} activations",
        "checkpoint_dtype": spec.torch_dtype if storage is None else "+".join(r["source"] for r in storage["types"]),
        "storage": storage,
        "vindex_storage": _vindex_storage(model.path),
        "memory_bytes": memory,
        "tokenizer": tok is not None,
        "chat_template": bool(tok is not None and tok.has_chat_template),
        "bos_token": tok.bos_token if tok is not None else None,
        "eos_token": tok.eos_token if tok is not None else None,
    }


def _vindex_storage(path) -> str | None:
    """How a block vindex stores its weights (index.json `quant`, types, bytes on disk), else None."""
    from pathlib import Path

    from .vindex.blocks import BlockStore, is_block_vindex

    if path is None or not is_block_vindex(Path(path)):
        return None
    import json

    quant = json.loads((Path(path) / "index.json").read_text(encoding="utf-8")).get("quant")
    store = BlockStore(path)
    types = store.storage_types(matrices=True)
    total = sum(types.values()) or 1
    parts = ", ".join(f"{t} {n / total:.0%}" for t, n in sorted(types.items(), key=lambda x: -x[1]))
    return f"vindex quant {quant}: the source's blocks ({parts}), {store.nbytes / 2**20:.1f} MiB"


@command("info", help="Show a model's family, layers, parameters, dtype and memory.")
def info_cmd(
    model: ModelArg = None,
    dtype: DtypeOpt = "float32",
    quantize: QuantizeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    import json

    info = model_info(load(model, dtype, quantize))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    tok = "none"
    if info["tokenizer"]:
        tok = f"bos {info['bos_token']!r}, eos {info['eos_token']!r}, chat template {'yes' if info['chat_template'] else 'fallback'}"
    rows = [
        ("model", info["path"] or "-"),
        ("family", f"{info['family']} (model_type {info['model_type']})"),
        ("layers", str(info["layers"])),
        ("hidden", f"{info['hidden_size']} ({info['heads']} heads × {info['head_dim']}, {info['kv_heads']} kv heads)"),
        ("ffn", (f"{info['experts']} experts × {info['intermediate_size']}, top-{info['experts_per_token']} "
                 if info["experts"] else f"{info['intermediate_size']} ") + f"({info['activation']})"),
        ("vocab", str(info["vocab_size"])),
        ("context", f"{info['context']} tokens"),
        ("parameters", f"{_human(info['parameters'])} ({info['parameters']:,})"),
        ("dtype", info["dtype"] + (f" (checkpoint {info['checkpoint_dtype']})" if info["checkpoint_dtype"] else "")),
        *([("weights", info["storage"]["summary"])] if info["storage"] else []),
        *([("storage", info["vindex_storage"])] if info["vindex_storage"] else []),
        ("memory", f"{info['memory_bytes'] / 2**20:.1f} MiB of weights"),
        ("tokenizer", tok),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


# -- vindex: extract, verify (bodies in modelql.vindex.cli_commands) ------------------------------

from .vindex.cli_commands import extract_command, verify_command  # noqa: E402

command("extract", help="Decompile a model's FFN into a vindex directory (streaming, one layer at a time).")(
    extract_command)
command("verify", help="Check a vindex's structure and re-hash every file listed in its checksums.")(verify_command)


@command("slice", help="Carve a deployment piece out of a vindex: --preset client (attention, no FFN), "
                       "server (FFN shard), browse (DESCRIBE/WALK only), attn, embed or all.")
def slice_cmd(
    vindex: Annotated[str, typer.Argument(help="source vindex directory", show_default=False)],
    preset: Annotated[str, typer.Option("--preset", help="client | server | browse | attn | embed | all")],
    output: Annotated[str, typer.Option("-o", "--output", help="new vindex directory", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="replace OUTPUT if it exists")] = False,
) -> None:
    from pathlib import Path

    from .vindex.slice import slice_command

    slice_command(Path(vindex), Path(output), preset, force=force)


# -- knowledge: label (body in modelql.knowledge.cli_commands) -----------------------------------

from .knowledge.cli_commands import explain_command, label_command  # noqa: E402

command("label", help="Label a vindex's features with relations by probing it with known facts "
                      "(writes feature_labels.json).")(label_command)
command("explain", help="Generate a completion and show, per generated token, the FFN features that fired "
                        "most strongly: modelql explain [MODEL] PROMPT [--top K] [--json] [--knowledge-url URL].")(
    explain_command)


# -- server: serve (body in modelql.server.cli_command) ------------------------------------------

from .server.cli_command import serve_command  # noqa: E402

command("serve", help="Serve the OpenAI-compatible API and the knowledge API over HTTP "
                      "(prints the URL and a first request to try).")(serve_command)


# -- LQL: lql, repl (bodies in modelql.lql.cli_commands) ------------------------------------------

from .lql.cli_commands import lql_command, repl_command  # noqa: E402

command("lql", help="Run LQL statements: modelql lql 'STMT; STMT' or -f FILE (continues after an error; "
                    "exits 1 if any failed).")(lql_command)
command("repl", help="Query the model interactively in LQL (history, multi-line, Tab completion).")(repl_command)

# -- GGUF: convert (body in modelql.models.gguf_convert) -------------------------------------------

from .models.gguf_convert import convert_command  # noqa: E402

command("convert", help="Write a HF model directory as a GGUF file llama.cpp can load: "
                        "modelql convert MODEL_DIR -o model.gguf [--type f32|f16|q8_0].")(convert_command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv, prog_name="modelql")


if __name__ == "__main__":
    main()
