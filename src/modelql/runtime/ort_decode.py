"""The quantized fast path: a whole forward pass as one onnxruntime graph over low-bit weights.

Why one graph: a SmolLM2 decode step is ~120 matmuls plus ~30 small ops per layer; through torch
each op pays Python and dispatch overhead that alone exceeds llama.cpp's whole ~10 ms step. Here
one `session.run` executes every layer with onnxruntime's contrib kernels — `MatMulNBits` on the
weights as loaded (`modelql.models.quant`), `GroupQueryAttention` (RoPE, causal mask and KV cache in
one op), `SkipSimplifiedLayerNormalization` — built with the `onnx` helper API from the `ModelSpec`.

The KV cache is the model's own (`KVCache` / `KVBlock` tensors, float32 [kv_heads, capacity,
head_dim] per layer): bound zero-copy as GQA's shared past/present buffers, so the fast path, the
torch path (hooks, TRACE, patched FFNs) and the server's packed decode batches all read and extend
the same cache. Keys are stored after RoPE in HF's rotate-half layout, as the torch path stores them.

`supports(spec)` lists what the graph covers (Llama-style blocks: RMSNorm, gated SiLU FFN, full
causal attention with optional q/k/v bias, RoPE without partial rotation); other families use the
torch path on dequantized weights.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..models.quant import Packed, split_nibbles
from ..models.spec import ModelSpec
from .rope import inverse_frequencies

MAX_ROPE_CACHE = 32768  # positions the graph's cos/sin tables cover (longer contexts use the torch path)


def supports(spec: ModelSpec) -> str | None:
    """None when the graph can run this model, else why not (one phrase)."""
    rope = spec.rope
    checks = [
        (spec.norm == "rms" and not spec.norm_weight_offset, "a non-RMS or offset norm"),
        (not (spec.qk_norm or spec.post_attn_norm or spec.post_ffn_norm), "extra norms"),
        (spec.activation == "silu" and spec.gated_ffn and not spec.mlp_bias, "a non-SiLU-gated FFN"),
        (not spec.out_bias, "an output-projection bias"),
        (spec.attn_softcap is None, "attention soft-capping"),
        (spec.sliding_window is None and spec.rope_local is None, "sliding-window attention"),
        (not spec.learned_positions, "learned positions"),
        (spec.moe is None, "mixture-of-experts layers"),
        (spec.uniform_attention and not spec.per_layer_input, "per-layer attention shapes"),
        (spec.head_dim % 16 == 0, "a head size that is not a multiple of 16"),  # GroupQueryAttention's rule
        (rope is not None and rope.kind in ("default", "linear", "llama3", "yarn")
         and rope.partial_rotary_factor == 1.0, "its RoPE variant"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    return None


@dataclass
class WeightInfo:
    """What `modelql info` reports per matmul weight: storage in the kernel and in the source."""

    name: str
    source_type: str
    bits: int
    nbytes: int
    params: int
    error_max: float
    error_rms: float


class _Builder:
    def __init__(self, accuracy: int = 4, passes: int = 1):
        from onnx import helper, numpy_helper

        self.accuracy, self.passes = accuracy, passes
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits = [], []
        self.external: dict[str, np.ndarray] = {}  # large initializers, handed to onnxruntime without a copy
        self.count = 0
        self._shared: dict[str, str] = {}
        self.fed: dict[str, np.ndarray] = {}
        self.fed_inputs: list = []

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def init(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if array.nbytes < 1 << 16:
            self.inits.append(self.numpy_helper.from_array(array, name))
            return name
        from onnx import TensorProto, helper

        t = TensorProto()
        t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", "modelql-external"
        self.inits.append(t)
        self.external[name] = array
        return name

    def feed(self, name: str, array: np.ndarray) -> str:
        """A constant bound as a graph input rather than an initializer: onnxruntime prepacks a constant
        Gemm / MatMul operand and keeps the original too, two copies where the offsets of Q4_K need one
        (1 bit per weight each); as an input it is read in place, one copy, this process's."""
        from onnx import TensorProto

        self.fed[name] = np.ascontiguousarray(array)
        self.fed_inputs.append(self.helper.make_tensor_value_info(name, TensorProto.FLOAT, list(array.shape)))
        return name

    def node(self, op: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        outs = [self.name(op) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(self.helper.make_node(op, inputs, outs, domain=domain, name=self.name(op + "_n"), **attrs))
        return outs

    def _nbits(self, x: str, packed: Packed, stem: str) -> str:
        w = self.init(stem + ".q", packed.data)
        s = self.init(stem + ".s", packed.scales)
        z = self.init(stem + ".z", packed.zeros)
        return self.node("MatMulNBits", [x, w, s, z], domain="com.microsoft", K=packed.k, N=packed.n,
                         bits=packed.bits, block_size=packed.block, accuracy_level=self.accuracy)[0]

    def _two_pass(self, blocks: str, packed: Packed, stem: str) -> str:
        """The int8 kernel run on x's rounding to its own grid and on the rest, in one call (`passes` 2).

        The kernel rounds each block of 32 activations to 8 bits (scale = max |x| / 127). x_q, that rounding
        computed here, is on the kernel's grid, so the kernel takes it exactly; the rest x − x_q is at most
        half a step, and the kernel's rounding of it is ~127× finer than that of x. Summed, the two products
        are x·W to ~16-bit activations (SmolLM2 Q4_1: logits within ~3e-4 of the float product, vs ~5e-2
        with one pass). The two run as two rows of one call: a decode step reads the weights once."""
        amax = self.node("ReduceMax", [self.node("Abs", [blocks])[0]], axes=[-1], keepdims=1)[0]
        step = self.node("Max", [self.node("Mul", [amax, self.shared("inv127", np.array(1 / 127, np.float32))])[0],
                                 self.shared("tiny", np.array(np.finfo(np.float32).tiny, np.float32))])[0]
        xq = self.node("Mul", [self.node("Round", [self.node("Div", [blocks, step])[0]])[0], step])[0]
        rest = self.node("Sub", [blocks, xq])[0]
        both = self.node("Reshape", [self.node("Concat", [xq, rest], axis=0)[0],
                                     self.shared(f"two_rows_{packed.k}", np.array([2, -1, packed.k], np.int64))])[0]
        first = self.shared("first_axis", np.array([0], np.int64))
        return self.node("ReduceSum", [self._nbits(both, packed, stem), first], keepdims=0)[0]

    def shared(self, name: str, array: np.ndarray) -> str:
        """A small constant used by many nodes: one initializer per name."""
        if name not in self._shared:
            self._shared[name] = self.init(name, array)
        return self._shared[name]

    def fused(self, x: str, parts: list[Packed], stem: str) -> str:
        """x times row-wise fused matrices held in one or more layouts (`quant.fuse`): one kernel call per
        part, their outputs side by side."""
        if len(parts) == 1:
            return self.matmul(x, parts[0], stem)
        return self.node("Concat", [self.matmul(x, q, f"{stem}.{i}") for i, q in enumerate(parts)], axis=-1)[0]

    def matmul(self, x: str, packed: Packed, stem: str) -> str:
        """x [M, K] (two-dimensional, for Gemm) times the packed weight's transpose → [M, N]."""
        nb, block = packed.k // packed.block, packed.block
        blocks = None
        if self.passes == 2 or packed.offsets is not None:
            shape = self.shared(f"blocks_{nb}x{block}", np.array([-1, nb, block], np.int64))
            blocks = self.node("Reshape", [x, shape])[0]
        if packed.bits == 8 and self.accuracy != 4:
            # with float activations the 8-bit kernel has no fast path (it dequantizes the whole matrix per
            # call, ~30× slower): run it as two exact 4-bit halves instead
            hi, lo = split_nibbles(packed)
            y = self.node("Add", [self._nbits(x, hi, stem + ".hi"), self._nbits(x, lo, stem + ".lo")])[0]
        elif self.passes == 2:
            y = self._two_pass(blocks, packed, stem)
        else:
            y = self._nbits(x, packed, stem)
        if packed.offsets is not None:
            # W = (q − z)·s + offset per block: add (x summed per block) · offsets, the product and the add in
            # one Gemm (each small op costs ~5 µs of dispatch; on SmolLM2 Q4_1 the offsets are 15–20 % of a
            # decode step). Summing with a MatMul by a 0/1 matrix would save an op, but with int8 activations
            # its logits were ~5 % further from the float model's (20 prompts), so the sums stay a ReduceSum.
            sums = self.node("ReduceSum", [blocks, self.shared("last_axis", np.array([-1], np.int64))], keepdims=0)[0]
            off = self.feed(stem + ".off", packed.offsets.T.astype(np.float32))
            y = self.node("Gemm", [sums, off, y])[0]
        return y


def _parts(packed: Packed | list[Packed]) -> list[Packed]:
    return packed if isinstance(packed, list) else [packed]


#: how long onnxruntime's workers spin for the next op before sleeping (µs)
SPIN_US = 100

#: packed bytes per onnxruntime session: the decoder is built in stages of whole layers so that only one
#: stage's packed copy exists beside the kernels' own (prepacked) weights while loading
STAGE_BYTES = 64 << 20


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps large freed blocks otherwise, so the packed copies
    dropped after each stage would still count in RSS); a no-op where there is no `malloc_trim`."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _session(b: _Builder, inputs, outputs, threads: int):
    """An onnxruntime session over the builder's nodes; large initializers are handed over without a copy.
    Returns (session, what must stay alive): `MatMulNBits` repacks its weight, scales and zero points into
    the kernel's own layout at session creation (at accuracy levels 1 and 4) and reads only that copy
    afterwards (tests/runtime/test_quantized.py scribbles over ours to check)."""
    import onnxruntime as ort

    h = b.helper
    graph = h.make_graph(b.nodes, "modelql", inputs + b.fed_inputs, outputs, b.inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    blob = model.SerializeToString()
    del model, graph
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # spin-wait between ops only briefly: a decode step's ops follow each other within microseconds, so a
    # short spin saves the worker's wake-up per op, while an unbounded spin stalls the step on a 2-core
    # machine with anything else running. SmolLM2 Q4_1 :int8, ms per token: quiet, no spin 15.4, 100 µs
    # 14.3; beside one busy process 20.8 vs 22.3, where an unbounded spin took twice as long
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    names = list(b.external)
    values = [ort.OrtValue.ortvalue_from_numpy(b.external[n]) for n in names]
    opts.add_external_initializers(names, values)
    session = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    prepacked = {i for node in b.nodes if node.op_type == "MatMulNBits" for i in node.input[1:4]}
    return session, [v for n, v in zip(names, values) if n not in prepacked]


@dataclass
class _Stage:
    session: object
    keep: list
    fed: dict[str, np.ndarray]
    layers: range
    last: bool


class OrtDecoder:
    """onnxruntime sessions running embeddings-in → logits-out over the model's KV cache: consecutive
    stages of whole layers, then one for the final norm and lm_head, each built as soon as its weights are
    packed (`STAGE_BYTES`), so a load never holds two full copies of the weights."""

    def __init__(self, spec: ModelSpec, layer_weights, head_weight, small: dict[str, torch.Tensor], threads: int,
                 accuracy: int = 4, after_stage=None, stage_bytes: int | None = None, passes: int = 1):
        """`layer_weights(i)` → {"qkv", "o", "gate_up", "down"} packed matrices of layer i (the fused qkv and
        gate_up as lists of parts, `quant.fuse`), `head_weight()` → the packed lm_head; each called once.
        `after_stage()` runs after each session is built."""
        self.spec, self.accuracy, self.passes, self.threads = spec, accuracy, passes, max(1, threads)
        stage_bytes = stage_bytes or STAGE_BYTES
        self.positions = min(spec.max_position, MAX_ROPE_CACHE)
        self.info: list[WeightInfo] = []
        self.stages: list[_Stage] = []
        self._bound: _Bound | None = None
        self._lock = threading.Lock()
        inv, scale = inverse_frequencies(spec.rope, spec.head_dim, spec.max_position, self.positions)
        freqs = torch.arange(self.positions, dtype=torch.float32)[:, None] * inv[None, :]
        self._cos = (freqs.cos() * scale).numpy().astype(np.float32)
        self._sin = (freqs.sin() * scale).numpy().astype(np.float32)
        # the head first, while nothing else is resident (its packed copy is the largest single transient)
        self._build({}, head_weight(), small, after_stage)
        pending: dict[int, dict[str, Packed]] = {}
        size = last = 0
        for i in range(spec.num_layers):
            if pending and size + last > stage_bytes:  # layers are alike: flush before packing the next one
                self._build(pending, None, small, after_stage)
                pending, size = {}, 0
            pending[i] = layer_weights(i)
            last = sum(q.nbytes for p in pending[i].values() for q in _parts(p))
            size += last
        if pending:
            self._build(pending, None, small, after_stage)
        self.stages.append(self.stages.pop(0))  # ... and run last

    def _record(self, name: str, p: Packed) -> None:
        self.info.append(WeightInfo(name, p.source_type, p.bits, p.nbytes, p.n * p.k, p.error[0], p.error[1]))

    def _build(self, layers: dict[int, dict[str, Packed]], head: Packed | None, small, after_stage) -> None:
        from onnx import TensorProto

        spec = self.spec
        b = _Builder(self.accuracy, self.passes)
        h = b.helper
        H, kvh, hd, nh = spec.hidden_size, spec.num_kv_heads, spec.head_dim, spec.num_heads
        inputs = [h.make_tensor_value_info("h_in", TensorProto.FLOAT, ["B", "T", H])]
        outputs = []
        if layers:
            inputs += [h.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
                       h.make_tensor_value_info("total_len", TensorProto.INT32, [])]
        if head is not None:
            inputs.append(h.make_tensor_value_info("logit_start", TensorProto.INT64, [1]))
            outputs += [h.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "L", spec.vocab_size]),
                        h.make_tensor_value_info("hidden", TensorProto.FLOAT, ["B", "T", H])]
        else:
            outputs.append(h.make_tensor_value_info("h_out", TensorProto.FLOAT, ["B", "T", H]))
        eps = float(spec.norm_eps)
        cos = sin = None

        def vec(name: str) -> str:
            return b.init(name, small[name].float().numpy())

        resid, delta = "h_in", None
        if layers:  # the layers run on [B·T, H] rows (Gemm is two-dimensional); attention sees [B, T, ·]
            resid = b.node("Reshape", ["h_in", b.init("rows", np.array([-1, H], np.int64))])[0]
            batch_time = b.node("Concat", [b.node("Shape", ["h_in"], end=2)[0], b.init("minus1", np.array([-1], np.int64))],
                                axis=0)[0]
            attn_rows = b.init("attn_rows", np.array([-1, nh * hd], np.int64))
        for i, w in layers.items():
            if cos is None:
                cos, sin = b.init("cos_cache", self._cos), b.init("sin_cache", self._sin)
            p = f"layers.{i}."
            for key, packed in w.items():
                for part in _parts(packed):
                    self._record(p + key + ".weight", part)
            if delta is None:
                x = b.node("SimplifiedLayerNormalization", [resid, vec(p + "attn_norm.weight")],
                           axis=-1, epsilon=eps, stash_type=1)[0]
            else:
                x, _, _, resid = b.node("SkipSimplifiedLayerNormalization", [resid, delta, vec(p + "attn_norm.weight")],
                                        4, domain="com.microsoft", epsilon=eps)
            qkv = b.fused(x, w["qkv"], p + "qkv")
            if spec.attn_bias:
                qkv = b.node("Add", [qkv, vec(p + "qkv.bias")])[0]
            pk, pv = f"past_key_{i}", f"past_value_{i}"
            for nm in (pk, pv):
                inputs.append(h.make_tensor_value_info(nm, TensorProto.FLOAT, ["B", kvh, "S", hd]))
                outputs.append(h.make_tensor_value_info(nm.replace("past", "present"), TensorProto.FLOAT,
                                                        ["B", kvh, "S", hd]))
            qkv = b.node("Reshape", [qkv, batch_time])[0]
            attn = b.node("GroupQueryAttention", [qkv, "", "", pk, pv, "seqlens_k", "total_len", cos, sin],
                          ["attn_" + str(i), f"present_key_{i}", f"present_value_{i}"], domain="com.microsoft",
                          num_heads=nh, kv_num_heads=kvh, scale=float(spec.query_scale), do_rotary=1,
                          rotary_interleaved=0)[0]
            o = b.matmul(b.node("Reshape", [attn, attn_rows])[0], w["o"], p + "o")
            x, _, _, resid = b.node("SkipSimplifiedLayerNormalization", [resid, o, vec(p + "ffn_norm.weight")],
                                    4, domain="com.microsoft", epsilon=eps)
            gu = b.fused(x, w["gate_up"], p + "gate_up")
            gate, up = b.node("Split", [gu, b.init(p + "split", np.array([spec.intermediate_size] * 2, np.int64))],
                              2, axis=-1)
            act = b.node("Mul", [b.node("Mul", [gate, b.node("Sigmoid", [gate])[0]])[0], up])[0]
            delta = b.matmul(act, w["down"], p + "down")
        if head is None:
            b.node("Reshape", [b.node("Add", [resid, delta])[0], b.node("Shape", ["h_in"])[0]], ["h_out"])
        else:
            self._record("lm_head.weight", head)
            if delta is None:
                x = b.node("SimplifiedLayerNormalization", [resid, vec("final_norm.weight")],
                           axis=-1, epsilon=eps, stash_type=1)[0]
                b.node("Identity", [resid], ["hidden"])
            else:
                x, _, _, _ = b.node("SkipSimplifiedLayerNormalization", [resid, delta, vec("final_norm.weight")],
                                    [b.name("final"), b.name("mean"), b.name("inv"), "hidden"],
                                    domain="com.microsoft", epsilon=eps)
            big = b.init("slice_end", np.array([np.iinfo(np.int64).max], np.int64))
            axis = b.init("slice_axis", np.array([1], np.int64))
            last = b.node("Slice", [x, "logit_start", big, axis])[0]
            rows = b.node("Reshape", [last, b.init("rows", np.array([-1, H], np.int64))])[0]
            shape = b.node("Concat", [b.node("Shape", [last], end=2)[0],
                                      b.init("vocab", np.array([spec.vocab_size], np.int64))], axis=0)[0]
            b.node("Reshape", [b.matmul(rows, head, "lm_head"), shape], ["logits"])
        session, keep = _session(b, inputs, outputs, self.threads)
        fed = b.fed
        del b
        self.stages.append(_Stage(session, keep, fed, range(min(layers, default=0), max(layers, default=-1) + 1),
                                  head is not None))
        layers.clear()
        del head
        return_freed_memory()
        if after_stage is not None:
            after_stage()

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.info)

    def forward(self, embeds: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], starts: list[int],
                logit_start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds [B, T, H] float32 after `starts` cached positions per row; k / v per layer are the
        cache buffers [B, kv, capacity, hd] (capacity ≥ start + T, written in place).
        Returns (logits [B, T − logit_start, V], final residual [B, T, H])."""
        bsz, t, width = embeds.shape
        if not self._lock.acquire(blocking=False):  # another thread is in a forward: bind afresh for this call
            return self._run(self._bind(bsz, t, k, v), embeds, starts, logit_start)
        try:
            key = (bsz, t, k[0].shape[-2], tuple(x.data_ptr() for x in k), tuple(x.data_ptr() for x in v))
            if self._bound is None or self._bound.key != key:
                self._bound = None
                self._bound = self._bind(bsz, t, k, v, key)
            return self._run(self._bound, embeds, starts, logit_start)
        finally:
            self._lock.release()

    def _bind(self, bsz: int, t: int, k: list[torch.Tensor], v: list[torch.Tensor], key=None) -> _Bound:
        """IO bindings of every stage for one batch shape and one set of cache buffers: a decode step then
        costs one `run` per stage and no per-step binding of the 2·layers cache tensors (at SmolLM2's
        size that binding, and reading the bound outputs back, cost as much as several layers)."""
        width = self.spec.hidden_size
        bound = _Bound(key, [], [np.empty((bsz, t, width), np.float32) for _ in range(2)],
                       np.empty(bsz, np.int32), np.empty((), np.int32), np.zeros(1, np.int64))
        for n, stage in enumerate(self.stages):
            io = stage.session.io_binding()
            io.bind_cpu_input("h_in", bound.buffers[n % 2])
            for name, array in stage.fed.items():
                io.bind_cpu_input(name, array)
            if len(stage.layers):
                io.bind_cpu_input("seqlens_k", bound.seqlens)
                io.bind_cpu_input("total_len", bound.total)
            if stage.last:
                io.bind_cpu_input("logit_start", bound.logit_start)
            else:
                out = bound.buffers[(n + 1) % 2]
                io.bind_output("h_out", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            for i in stage.layers:
                for kind, buf in (("key", k[i]), ("value", v[i])):
                    shape, ptr = list(buf.shape), buf.data_ptr()
                    io.bind_input(f"past_{kind}_{i}", "cpu", 0, np.float32, shape, ptr)
                    io.bind_output(f"present_{kind}_{i}", "cpu", 0, np.float32, shape, ptr)
            bound.bindings.append(io)
        return bound

    def _run(self, bound: _Bound, embeds: torch.Tensor, starts: list[int], logit_start: int):
        bsz, t, width = embeds.shape
        np.copyto(bound.buffers[0], embeds.numpy())
        bound.seqlens[:] = [s + t - 1 for s in starts]
        bound.total[...] = max(starts) + t
        bound.logit_start[0] = logit_start
        logits = np.empty((bsz, t - logit_start, self.spec.vocab_size), np.float32)
        hidden = np.empty((bsz, t, width), np.float32)
        for stage, io in zip(self.stages, bound.bindings):
            if stage.last:
                io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
                io.bind_output("hidden", "cpu", 0, np.float32, list(hidden.shape), hidden.ctypes.data)
            stage.session.run_with_iobinding(io)
        return torch.from_numpy(logits), torch.from_numpy(hidden)


@dataclass
class _Bound:
    """`OrtDecoder`'s bindings for one (batch, length, cache buffers) key, with the host buffers they read:
    the stages pass the residual through two alternating buffers."""

    key: tuple | None
    bindings: list
    buffers: list[np.ndarray]
    seqlens: np.ndarray
    total: np.ndarray
    logit_start: np.ndarray


class OrtUnembed:
    """Final norm → lm_head on given residuals (`Model.unembed` of a quantized model: batched prefill,
    logit lens); a second small session, built on first use."""

    def __init__(self, spec: ModelSpec, head: Packed, norm: torch.Tensor, threads: int, accuracy: int = 4,
                 passes: int = 1):
        from onnx import TensorProto

        b = _Builder(accuracy, passes)
        h = b.helper
        x = b.node("SimplifiedLayerNormalization", ["h", b.init("final_norm", norm.float().numpy())],
                   axis=-1, epsilon=float(spec.norm_eps), stash_type=1)[0]
        b.node("Identity", [b.matmul(x, head, "lm_head")], ["logits"])
        self._fed = b.fed
        self.session, self._keep = _session(
            b, [h.make_tensor_value_info("h", TensorProto.FLOAT, ["N", spec.hidden_size])],
            [h.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", spec.vocab_size])], threads)
        return_freed_memory()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        x = h.reshape(-1, h.shape[-1]).float().contiguous().numpy()
        out = self.session.run(["logits"], {"h": x, **self._fed})[0]
        return torch.from_numpy(out).reshape(*lead, -1)
