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
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


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


def load(model: str | None, dtype: str = "float32"):
    """Load a model reference (None: the embedded default model)."""
    from .errors import ModelNotFoundError
    from .runtime.loading import load_model

    if model is None:
        try:
            from .runtime.loading import default_model_dir

            default_model_dir()
        except ImportError:
            raise ModelNotFoundError("no MODEL given and the embedded default model is not installed") from None
    return load_model(model, dtype)


def sampling_params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                    presence_penalty, seed, stop):
    from .runtime.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                          presence_penalty=presence_penalty, seed=seed, stop=list(stop or []))


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
    chat: Annotated[bool, typer.Option("--chat", help="wrap PROMPT as a user message in the chat template")] = False,
    dtype: DtypeOpt = "float32",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="finish reason and speed on stderr")] = False,
    ffn: FfnOpt = None,
    wire: WireOpt = "f32",
    ffn_api_key: FfnApiKeyOpt = None,
) -> None:
    import time

    from .runtime.generate import stream

    if len(args) > 2:
        raise error("expected [MODEL] PROMPT (quote a prompt with spaces)")
    model_ref, prompt = (None, args[0]) if len(args) == 1 else (args[0], args[1])
    if prompt == "-":
        prompt = sys.stdin.read()
    params = sampling_params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                             presence_penalty, seed, stop)
    if ffn:
        from .remote.client import load_remote_model

        model = load_remote_model(model_ref, ffn, wire, dtype, api_key=ffn_api_key)
    else:
        model = load(model_ref, dtype)
    start = time.perf_counter()
    text, reason, n = stream_out(stream(model, [{"role": "user", "content": prompt}] if chat else prompt, params))
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose:
        secs = time.perf_counter() - start
        print(f"[finish: {reason}, {n} tokens in {secs:.2f}s, {n / secs if secs else 0:.1f} tok/s]", file=sys.stderr)
        st = getattr(model.ffn, "stats", None)
        if ffn and st is not None and n:
            print(f"[remote FFN: {st.requests} requests, {(st.bytes_sent + st.bytes_received) / n / 1024:.1f} KiB "
                  f"on the wire per token, {st.failovers} failovers]", file=sys.stderr)


@command("chat", help="Chat interactively with the model's chat template (/reset clears, /exit or Ctrl-D quits).")
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
    dtype: DtypeOpt = "float32",
) -> None:
    from .errors import ContextLengthError, ModelFormatError
    from .runtime.generate import stream

    params = sampling_params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                             presence_penalty, seed, stop)
    m = load(model, dtype)
    if m.tokenizer is None:
        raise ModelFormatError("chat needs a tokenizer (tokenizer.json)")
    interactive = sys.stdin.isatty()
    if interactive:
        print("modelql chat — /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply, _, _ = stream_out(stream(m, messages, params))
        except ContextLengthError as exc:
            messages.pop()
            print(f"error: {exc} (use /reset)", file=sys.stderr, flush=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})


def model_memory_bytes(model) -> int:
    """Bytes of weight storage the model holds (fused tensors and their views counted once)."""
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


def model_info(model) -> dict[str, Any]:
    import torch

    spec = model.spec
    memory = model_memory_bytes(model)
    element = torch.tensor([], dtype=model.dtype).element_size()
    tok = model.tokenizer
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
        "parameters": memory // element,
        "dtype": str(model.dtype).removeprefix("torch."),
        "checkpoint_dtype": spec.torch_dtype,
        "memory_bytes": memory,
        "tokenizer": tok is not None,
        "chat_template": bool(tok is not None and tok.has_chat_template),
        "bos_token": tok.bos_token if tok is not None else None,
        "eos_token": tok.eos_token if tok is not None else None,
    }


@command("info", help="Show a model's family, layers, parameters, dtype and memory.")
def info_cmd(
    model: ModelArg = None,
    dtype: DtypeOpt = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    import json

    info = model_info(load(model, dtype))
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
