"""Low-bit weight layouts: GGUF blocks (or float matrices) → onnxruntime `MatMulNBits` blocks.

Why this layout: on the project's CPUs torch's own int4/int8 weight-only kernels are slower than
float32 for one token, while onnxruntime's contrib op `MatMulNBits` (4- or 8-bit, block 32, uint8
zero points, int8 activations at accuracy level 4) is several times faster than float32 (measured
in bench/decode.py). Its blocks are not GGUF's, so weights are converted at load:

* Q4_0 → 4-bit, scale d, zero point 8, the same codes: exact.
* Q8_0 → 8-bit, scale d, zero point 128, the same codes: exact.
* Q4_1, Q4_K → 4-bit, scale d (Q4_K: d·sc), the same codes, the integer zero point z nearest −m/d
  and the rest of the block's minimum, m + d·z, kept as a float `offsets` entry: W·x = kernel(codes,
  scales, z)·x + offsets·(x summed per block), a small float matmul the graph adds. Exact (the
  kernel's own float zero points would be too, but they run ~50× slower on CPU; the integer zero
  point alone would add a second rounding as large as the 4-bit step itself: 8.8% RMS on SmolLM2's
  Q4_1). Why z and not 0: with int8 activations the kernel's rounding error scales with the codes'
  distance from z, and the float offsets cannot cancel it; centred codes halve it (`_centre`).
* Q5_K → 8-bit codes 0..31 with scale d·sc and offsets, likewise exact; Q5_0 → 8-bit, zero point 16;
  Q5_1 → 8-bit with Q4_1's offsets: exact (llama.cpp's fallback types for rows not a multiple of 256).
* Q6_K → 8-bit codes 0..63, zero point 32, scale d·sc in blocks of 16 (its scale changes every 16
  values): exact. A matrix fused with it (Q4_K_M's q/k/v) is split into blocks of 16 too
  (`reblock`: exact). With Q6_K, Q5_0 and Q5_1 requantised to 8 bits, SmolLM2's Q4_K_M (made by
  llama.cpp's quantizer, which falls back to Q5_0/Q5_1 for its 576-wide rows) agreed with
  transformers on 78.9% of greedy tokens; exact Q6_K made it 87.2%, exact Q5_0/Q5_1 95.6%
  (bench/decode.py --agreement).
* Q2_K, Q3_K, F16, BF16, F32 → 8-bit symmetric requantisation of the dequantised values (at most
  half an 8-bit step; a 4-bit requantisation of a Q5_0 matrix measured 6.8% RMS, so it is not used). `Packed.error` holds the measured error.

A `Packed` matrix is [N out, K in] in the kernel's order: `data` [N, K/block, block·bits/8], `scales`
[N·K/block], `zeros` (packed like the codes); `block` is 32 but for Q6_K.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32


@dataclass
class Packed:
    """One weight matrix in `MatMulNBits` layout, with where it came from and the conversion error."""

    bits: int
    n: int
    k: int
    data: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    source_type: str
    #: [N, K/block] float32 added per block (W = (q − zero)·scale + offset), or None
    offsets: np.ndarray | None = None
    #: max |packed − source| / max |source| over the matrix, and the RMS ratio ‖Δ‖/‖W‖
    error: tuple[float, float] = (0.0, 0.0)
    #: values per scale (32; 16 for Q6_K, whose scales change every 16 values: exact only so)
    block: int = BLOCK

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + self.zeros.nbytes + (
            0 if self.offsets is None else self.offsets.nbytes)

    def codes(self) -> np.ndarray:
        """The unpacked codes, [N, K/block, block] uint8."""
        if self.bits == 8:
            return self.data
        lo, hi = self.data & 0xF, self.data >> 4
        return np.stack([lo, hi], axis=-1).reshape(self.n, -1, self.block)

    def zero_points(self) -> np.ndarray:
        nb = self.k // self.block
        if self.bits == 8:
            return self.zeros.reshape(self.n, nb)
        z = self.zeros.reshape(self.n, -1)
        return np.stack([z & 0xF, z >> 4], axis=-1).reshape(self.n, -1)[:, :nb]

    def dequantize(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """float32 [N, K] (or the given rows) as the kernel sees the weights."""
        sel = slice(None) if rows is None else rows
        q = self.codes()[sel].astype(np.float32)
        z = self.zero_points()[sel].astype(np.float32)[..., None]
        s = self.scales.reshape(self.n, -1)[sel][..., None]
        out = (q - z) * s
        if self.offsets is not None:
            out += self.offsets[sel][..., None]
        return out.reshape(q.shape[0], self.k)

    def take_rows(self, order: np.ndarray) -> Packed:
        """The same matrix with its rows reordered (a row permutation is exact in any block layout)."""
        nz = self.zeros.reshape(self.n, -1)
        return Packed(self.bits, self.n, self.k, np.ascontiguousarray(self.data[order]),
                      np.ascontiguousarray(self.scales.reshape(self.n, -1)[order]).reshape(-1),
                      np.ascontiguousarray(nz[order]).reshape(-1), self.source_type,
                      None if self.offsets is None else np.ascontiguousarray(self.offsets[order]), self.error,
                      self.block)


def widen(p: Packed) -> Packed:
    """A 4-bit matrix as 8-bit codes (the same values: exact), to fuse it with 8-bit ones."""
    if p.bits == 8:
        return p
    return Packed(8, p.n, p.k, np.ascontiguousarray(p.codes()), p.scales,
                  np.ascontiguousarray(p.zero_points()).reshape(-1), p.source_type, p.offsets, p.error, p.block)


def reblock(p: Packed, block: int) -> Packed:
    """The same values in blocks of `block` (a divisor of p.block): each block's scale, zero point and
    offset repeated over its parts (exact), to fuse it with a matrix of smaller blocks."""
    if block == p.block:
        return p
    r = p.block // block
    out = _pack(p.codes().reshape(p.n, -1, block), np.repeat(p.scales.reshape(p.n, -1), r, axis=1),
                np.repeat(p.zero_points(), r, axis=1), p.bits, p.source_type,
                None if p.offsets is None else np.repeat(p.offsets, r, axis=1))
    out.error = p.error
    return out


def split_nibbles(p: Packed) -> tuple[Packed, Packed]:
    """An 8-bit matrix as two 4-bit ones whose sum it is, exactly: codes c = 16·hi + lo and zero points
    z = 16·z_hi + z_lo, so s·(c − z) = 16s·(hi − z_hi) + s·(lo − z_lo) (offsets are left to the caller)."""
    from_codes = lambda q, z, scales: _pack(q, scales.reshape(p.n, -1), z, 4, p.source_type)  # noqa: E731
    c, z = p.codes(), p.zero_points()
    scales = p.scales.reshape(p.n, -1)
    return (from_codes(c >> 4, z >> 4, scales * np.float32(16)), from_codes(c & 0xF, z & 0xF, scales))


def concat(parts: list[Packed]) -> Packed:
    """Row-wise concatenation (fused q/k/v or gate/up); mixed widths (Q4_K_M's Q6_K v next to Q4_K q, k)
    are fused as 8-bit."""
    if len({p.k for p in parts}) != 1:
        raise ValueError("cannot fuse matrices of different widths")
    if len({p.bits for p in parts}) != 1:
        parts = [widen(p) for p in parts]
    if len({p.block for p in parts}) != 1:
        parts = [reblock(p, min(q.block for q in parts)) for p in parts]
    p0 = parts[0]
    offsets = None
    if any(p.offsets is not None for p in parts):
        offsets = np.concatenate([p.offsets if p.offsets is not None else np.zeros((p.n, p.k // p.block), np.float32)
                                  for p in parts])
    return Packed(p0.bits, sum(p.n for p in parts), p0.k, np.concatenate([p.data for p in parts]),
                  np.concatenate([p.scales for p in parts]),
                  np.concatenate([p.zeros.reshape(p.n, -1) for p in parts]).reshape(-1),
                  "+".join(dict.fromkeys(p.source_type for p in parts)), offsets,
                  (max(p.error[0] for p in parts), max(p.error[1] for p in parts)), p0.block)


def fuse(parts: list[Packed]) -> list[Packed]:
    """Row-wise fusion (q/k/v, gate/up) where it costs no memory: consecutive parts of one layout (bits and
    block) are concatenated, a part of another layout starts a new group. Why not always one matrix: fused
    with Q4_K_M's Q6_K v, its Q4_K q and k would be held as 8-bit blocks of 16 (12.5 bits per weight instead
    of 6.1); the extra kernel call per layer costs less than that memory."""
    groups: list[list[Packed]] = []
    for p in parts:
        if groups and (groups[-1][0].bits, groups[-1][0].block) == (p.bits, p.block):
            groups[-1].append(p)
        else:
            groups.append([p])
    return [concat(g) if len(g) > 1 else g[0] for g in groups]


def _centre(scales: np.ndarray, minimums: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks valued s·q + m (q in 0..levels−1) as s·(q − z) + (m + s·z): the zero point z ∈ [0, levels)
    nearest −m/s, and what is left of m (at most s/2 when the block spans zero). The same values."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(scales != 0, np.rint(-minimums / scales), 0.0)
    z = np.clip(np.nan_to_num(z), 0, levels - 1).astype(np.float32)
    return z, (minimums + scales * z).astype(np.float32)


def _pack(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, source_type: str,
          offsets: np.ndarray | None = None) -> Packed:
    """q [N, nb, block] codes, scales / zeros [N, nb] → `Packed`."""
    n, nb, block = q.shape
    q = q.astype(np.uint8)
    zeros = zeros.astype(np.uint8)
    if bits == 4:
        data = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        if nb % 2:
            zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
        zp = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)
    else:
        data, zp = q, zeros
    return Packed(bits, n, nb * block, np.ascontiguousarray(data), np.ascontiguousarray(scales, np.float32).reshape(-1),
                  np.ascontiguousarray(zp).reshape(-1), source_type,
                  None if offsets is None else np.ascontiguousarray(offsets, np.float32).reshape(n, nb), block=block)


#: values converted at a time: bounds the float temporaries (gguf's dequantisation makes several arrays
#: of the chunk's size), so packing adds little to the resident set whatever the matrix
CHUNK_VALUES = 1 << 20


def _chunk_rows(k: int) -> int:
    return max(1, CHUNK_VALUES // k)


class _Error:
    """Running conversion error over row chunks: max |Δ| / max |W| and ‖Δ‖ / ‖W‖."""

    def __init__(self):
        self.peak = self.top = self.sq_err = self.sq_ref = 0.0

    def add(self, got: np.ndarray, ref: np.ndarray) -> None:
        diff = (got - ref).ravel()
        ref = ref.ravel()
        self.peak = max(self.peak, float(np.abs(diff).max(initial=0.0)))
        self.top = max(self.top, float(np.abs(ref).max(initial=0.0)))
        self.sq_err += float(np.dot(diff.astype(np.float64), diff))
        self.sq_ref += float(np.dot(ref.astype(np.float64), ref))

    @property
    def value(self) -> tuple[float, float]:
        return (self.peak / self.top if self.top else 0.0, (self.sq_err / self.sq_ref) ** 0.5 if self.sq_ref else 0.0)


def _measure(packed: Packed, reference: np.ndarray) -> Packed:
    """Record the conversion error against the source's dequantised values (row chunks: bounded memory)."""
    err = _Error()
    step = _chunk_rows(packed.k)
    for start in range(0, packed.n, step):
        rows = slice(start, min(packed.n, start + step))
        err.add(packed.dequantize(rows), np.asarray(reference[rows], np.float32))
    packed.error = err.value
    return packed


class _Rows:
    """A `Packed` matrix filled row chunk by row chunk into arrays allocated once (no growing copies)."""

    def __init__(self, n: int):
        self.n, self.out = n, None

    def put(self, start: int, part: Packed) -> None:
        if self.out is None:
            nb = part.k // part.block
            self.out = Packed(part.bits, self.n, part.k, np.empty((self.n, *part.data.shape[1:]), np.uint8),
                              np.empty(self.n * nb, np.float32), np.empty((self.n, part.zeros.size // part.n), np.uint8),
                              part.source_type, None if part.offsets is None else np.empty((self.n, nb), np.float32),
                              block=part.block)
        out, stop, nb = self.out, start + part.n, part.k // part.block
        out.data[start:stop] = part.data
        out.scales[start * nb:stop * nb] = part.scales
        out.zeros[start:stop] = part.zeros.reshape(part.n, -1)
        if part.offsets is not None:
            out.offsets[start:stop] = part.offsets

    def result(self) -> Packed:
        self.out.zeros = self.out.zeros.reshape(-1)
        return self.out


def _requantize(b: np.ndarray, bits: int, source_type: str) -> Packed:
    """Float blocks [N, K/32, 32] → `Packed` (4: asymmetric min/max with an integer zero point chosen so
    the range is covered; 8: symmetric, zero point 128)."""
    if bits == 4:
        mn = np.minimum(b.min(-1), 0.0)
        mx = np.maximum(b.max(-1), 0.0)
        s0 = (mx - mn) / 15.0
        safe = np.where(s0 > 0, s0, 1.0)
        zp = np.clip(np.rint(-mn / safe), 0, 15)
        up = np.where(zp < 15, mx / np.maximum(15.0 - zp, 1.0), 0.0)
        down = np.where(zp > 0, -mn / np.maximum(zp, 1.0), 0.0)
        scale = np.maximum(np.maximum(up, down), s0)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(b / scale[..., None] + zp[..., None]), 0, 15)
    elif bits == 8:
        amax = np.abs(b).max(-1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        zp = np.full(scale.shape, 128.0)
        q = np.clip(np.rint(b / scale[..., None]) + 128, 1, 255)
    else:
        raise ValueError(f"unsupported bit width {bits}")
    return _pack(q, scale, zp, bits, source_type)


def pack_float(w: np.ndarray, bits: int, source_type: str = "F32", measure: bool = True) -> Packed:
    """Requantise a float matrix [N, K] (K a multiple of 32) to `bits` (see `_requantize`), a row chunk
    at a time."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"rows of {k} are not a multiple of {BLOCK}")
    rows, err = _Rows(n), _Error()
    step = _chunk_rows(k)
    for start in range(0, n, step):
        b = np.asarray(w[start:start + step], dtype=np.float32)
        part = _requantize(b.reshape(-1, k // BLOCK, BLOCK), bits, source_type)
        if measure:
            err.add(part.dequantize(), b)
        rows.put(start, part)
    out = rows.result()
    out.error = err.value
    return out


def _gguf_exact(raw: np.ndarray, qtype: str) -> Packed | None:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K rows of blocks [N, bytes] → the same codes and
    scales (no requantisation)."""
    n = raw.shape[0]
    if qtype == "Q6_K":  # 6-bit codes − 32, an int8 scale per 16 values times a per-256 d: 8-bit, blocks of 16
        blocks = raw.reshape(-1, 210)
        nsup = blocks.shape[0]
        ql = blocks[:, :128].reshape(nsup, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        qh = blocks[:, 128:192].reshape(nsup, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        q = ((ql & 0xF).reshape(nsup, 2, 4, 32) | ((qh & 3) << 4).reshape(nsup, 2, 4, 32)).astype(np.uint8)
        sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
        d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
        nb = nsup * 16 // n
        return _pack(q.reshape(n, nb, 16), (d * sc).reshape(n, nb), np.full((n, nb), 32), 8, qtype)
    if qtype == "Q8_0":
        blocks = raw.reshape(n, -1, 34)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = blocks[..., 2:].copy().view(np.int8).astype(np.int16) + 128
        return _pack(q, d, np.full(d.shape, 128), 8, qtype)
    if qtype == "Q4_0":
        blocks = raw.reshape(n, -1, 18)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 2:]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # elements 0..15 low nibbles, 16..31 high
        return _pack(q, d, np.full(d.shape, 8), 4, qtype)
    if qtype in ("Q5_0", "Q5_1"):  # 5-bit codes (a high bit each in qh): 8-bit, zero point 16 / Q4_1's offsets
        head = 2 if qtype == "Q5_0" else 4
        blocks = raw.reshape(n, -1, head + 20)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        qh = blocks[..., head:head + 4].copy().view(np.uint32)
        qh = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        qs = blocks[..., head + 4:]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1) | (qh << 4)
        if qtype == "Q5_0":
            return _pack(q, d, np.full(d.shape, 16), 8, qtype)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        z, rest = _centre(d, m, 32)
        return _pack(q, d, z, 8, qtype, rest)
    if qtype == "Q4_1":
        blocks = raw.reshape(n, -1, 20)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
        z, rest = _centre(d, m, 16)
        return _pack(q, d, z, 4, qtype, rest)
    if qtype in ("Q4_K", "Q5_K"):
        from gguf.quants import Q4_K

        size = 144 if qtype == "Q4_K" else 176
        blocks = raw.reshape(-1, size)
        nsup = blocks.shape[0]
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
        scale = d * sc.astype(np.float32)  # [nsup, 8]
        offset = -(dmin * mn.astype(np.float32))
        if qtype == "Q4_K":
            qs = blocks[:, 16:].reshape(nsup, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
            q = (qs & 0xF).reshape(nsup, 8, 32)
            bits = 4
        else:
            qh = blocks[:, 16:48].reshape(nsup, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            ql = blocks[:, 48:].reshape(nsup, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
            q = ((ql & 0xF).reshape(nsup, 8, 32) | ((qh & 1) << 4)).astype(np.uint8)
            bits = 8
        nb = nsup * 8 // n
        z, rest = _centre(scale.reshape(n, nb), offset.reshape(n, nb), 16 if bits == 4 else 32)
        return _pack(q.reshape(n, nb, 32), scale.reshape(n, nb), z, bits, qtype, rest)
    return None


def pack_gguf(raw: np.ndarray, qtype: str, shape: tuple[int, int], measure: bool = True) -> Packed:
    """A GGUF matrix (its raw bytes, rows [N, bytes per row], of type `qtype`, shape [N, K]) in
    `MatMulNBits` layout; the error is measured against gguf's own dequantisation."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = np.asarray(raw).reshape(shape[0], -1)
    exact = _gguf_exact(raw, qtype)
    if exact is not None:  # the same codes and scales: error 0 by construction (tests/quant checks it)
        return exact
    rows, err = _Rows(shape[0]), _Error()
    step = _chunk_rows(shape[1])
    for start in range(0, shape[0], step):
        chunk = raw[start:start + step]
        if qtype in ("F32", "F16", "BF16"):
            w = _float_rows(chunk, qtype)
        else:
            w = dequantize(chunk, GGMLQuantizationType[qtype]).reshape(chunk.shape[0], shape[1])
        part = _requantize(w.reshape(chunk.shape[0], -1, BLOCK), 8, qtype)
        if measure:
            err.add(part.dequantize(), w)
        rows.put(start, part)
        del w, part
    out = rows.result()
    out.error = err.value
    return out


def pack_blocks(blocks: tuple[np.ndarray, str, tuple[int, int]] | None, what: str) -> Packed | None:
    """`pack_gguf` of a source's `blocks(name)` answer (None stays None, as does a row width the kernel's
    blocks of 32 do not divide); a malformed block is a `ModelFormatError` naming `what`."""
    from ..errors import ModelFormatError

    if blocks is None:
        return None
    raw, qtype, shape = blocks
    if shape[1] % BLOCK:
        return None
    try:
        return pack_gguf(raw, qtype, shape)
    except Exception as exc:  # gguf raises assorted errors on malformed blocks
        raise ModelFormatError(f"{what}: cannot read blocks ({exc})") from None


def dequantize_rows(raw: np.ndarray, qtype: str, width: int) -> np.ndarray:
    """float32 [n, width] from raw rows of blocks [n, bytes per row] of GGML type `qtype` (gguf's own
    dequantisers; F32/F16/BF16 rows are reinterpreted)."""
    raw = np.asarray(raw)
    if qtype in ("F32", "F16", "BF16"):
        out = _float_rows(np.ascontiguousarray(raw), qtype)
    else:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        out = dequantize(raw, GGMLQuantizationType[qtype])
    return np.ascontiguousarray(out, np.float32).reshape(raw.shape[0], width)


def _float_rows(rows: np.ndarray, qtype: str) -> np.ndarray:
    if qtype == "F32":
        return rows.copy().view(np.float32)
    if qtype == "F16":
        return rows.copy().view(np.float16).astype(np.float32)
    return (rows.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
