"""A NumPy oracle of jax_ep's semantics, written from DESIGN.md section 3 and
docs/semantics.md (not from the library), so the tests compare two readings.

Everything here works on *global* inputs: arrays with a leading rank axis
``[R, ...]``, where ``R`` is the size of one EP group. Loops are plain Python on
purpose: the order of every addition is the order the contract names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_BLOCK = 128
FP8_MAX = np.float32(448.0)
AMAX_MIN = np.float32(1e-4)


# --------------------------------------------------------------------------- sizes


def capacity(capacity_factor: float, T: int, K: int, E: int) -> int:
    """c = max(1, ceil(f * T * K / E)) with the per-rank T and K."""
    return max(1, math.ceil(capacity_factor * T * K / E))


def num_rows(T: int, K: int, E: int, R: int, *, layout: str = "experts",
             capacity_factor: Optional[float] = None,
             max_rows: Optional[int] = None) -> int:
    """The static row count C of one rank's output."""
    if max_rows is not None:
        return int(max_rows)
    El = E // R
    if capacity_factor is not None:
        c = capacity(capacity_factor, T, K, E)
        return El * R * c if layout == "experts" else R * min(T, El * c)
    return T * R * min(K, El) if layout == "experts" else T * R


# --------------------------------------------------------------------------- FP8


def round_pow2(scale: np.ndarray) -> np.ndarray:
    """2**ceil(log2(s)) for positive finite float32, exactly (via frexp)."""
    scale = np.asarray(scale, np.float32)
    m, e = np.frexp(scale)  # scale = m * 2**e, m in [0.5, 1)
    up = np.ldexp(np.float32(1.0), e).astype(np.float32)  # 2**e
    return np.where(m == 0.5, scale, up).astype(np.float32)


def quantize(x: np.ndarray, round_scale: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Per row and 128-channel block: returns (data float8_e4m3fn, scales float32)."""
    x = np.asarray(x)
    H = x.shape[-1]
    assert H % FP8_BLOCK == 0
    xf = x.astype(np.float32).reshape(*x.shape[:-1], H // FP8_BLOCK, FP8_BLOCK)
    amax = np.max(np.abs(xf), axis=-1).astype(np.float32)
    amax = np.maximum(amax, AMAX_MIN)
    scale = (amax / FP8_MAX).astype(np.float32)
    if round_scale:
        scale = round_pow2(scale)
    q = (xf / scale[..., None]).astype(np.float32)  # IEEE float32 division
    q = np.clip(q, -FP8_MAX, FP8_MAX)  # saturate (ml_dtypes would give NaN)
    data = q.astype(F8).reshape(x.shape)  # one rounding, nearest even, subnormals kept
    return data, scale


def dequantize(data: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32(data) * scale, in float32."""
    H = data.shape[-1]
    d = data.astype(np.float32).reshape(*data.shape[:-1], H // FP8_BLOCK, FP8_BLOCK)
    return (d * scales.astype(np.float32)[..., None]).astype(np.float32).reshape(data.shape)


# --------------------------------------------------------------------------- routing


@dataclasses.dataclass
class Routing:
    """Everything one dispatch decides, for one EP group."""

    R: int
    T: int
    K: int
    E: int
    C: int
    layout: str
    # receiver r -> list over written rows p of (s, t, local expert or -1 for tokens)
    rows: List[List[Tuple[int, int, int]]]
    # (r, s, t) -> written row positions in ascending local-expert order; the key
    # exists whenever token t of rank s keeps a slot for rank r (even if overflowed)
    pair_rows: Dict[Tuple[int, int, int], List[int]]
    # (s, t, k) -> (r, p) for a slot whose row was written
    slot_row: Dict[Tuple[int, int, int], Tuple[int, int]]
    # per-rank outputs
    row_weight: np.ndarray  # [R, C] float32 (experts) or [R, C, K] (tokens)
    out_topk_idx: Optional[np.ndarray]  # [R, C, K] int32 (tokens)
    group_sizes: np.ndarray  # [R, El] int32
    num_overflow: np.ndarray  # [R] int32
    dropped: np.ndarray  # [R, T, K] bool
    num_dropped: np.ndarray  # [R] int32
    num_invalid: np.ndarray  # [R] int32
    kept: np.ndarray  # [R, T, K] bool: slot is valid and not dropped
    clean_idx: np.ndarray  # [R, T, K] int32 with invalid ids -> -1

    @property
    def El(self) -> int:
        return self.E // self.R


def route(topk_idx: np.ndarray, topk_weights: Optional[np.ndarray], *, num_experts: int,
          capacity_factor: Optional[float] = None, max_rows: Optional[int] = None,
          layout: str = "experts") -> Routing:
    """Routing of a global ``topk_idx [R, T, K]`` (and optional weights)."""
    idx = np.asarray(topk_idx).astype(np.int64)
    R, T, K = idx.shape
    E = num_experts
    El = E // R
    assert E % R == 0
    w = None if topk_weights is None else np.asarray(topk_weights, np.float32)
    C = num_rows(T, K, E, R, layout=layout, capacity_factor=capacity_factor,
                 max_rows=max_rows)

    invalid = (idx < -1) | (idx >= E)
    clean = np.where(invalid, -1, idx)
    num_invalid = invalid.reshape(R, -1).sum(axis=1).astype(np.int32)

    # Sender side: capacity, counted once per (token, expert), first tokens first.
    dropped = np.zeros((R, T, K), bool)
    if capacity_factor is not None:
        c = capacity(capacity_factor, T, K, E)
        for s in range(R):
            taken = np.zeros(E, np.int64)
            for t in range(T):
                seen = {}
                for k in range(K):
                    e = int(clean[s, t, k])
                    if e < 0:
                        continue
                    if e not in seen:  # first slot of this expert decides
                        seen[e] = taken[e] < c
                        if seen[e]:
                            taken[e] += 1
                    dropped[s, t, k] = not seen[e]
    num_dropped = dropped.reshape(R, -1).sum(axis=1).astype(np.int32)
    kept = (clean >= 0) & ~dropped

    def weight_of(s, t, k):
        return np.float32(1.0) if w is None else w[s, t, k]

    rows: List[List[Tuple[int, int, int]]] = [[] for _ in range(R)]
    pair_rows: Dict[Tuple[int, int, int], List[int]] = {}
    slot_row: Dict[Tuple[int, int, int], Tuple[int, int]] = {}
    group_sizes = np.zeros((R, El), np.int32)
    num_overflow = np.zeros(R, np.int32)
    out_topk_idx = None

    if layout == "experts":
        row_weight = np.zeros((R, C), np.float32)
        for r in range(R):
            for el in range(El):
                e = r * El + el
                for s in range(R):
                    for t in range(T):
                        ks = [k for k in range(K) if kept[s, t, k] and clean[s, t, k] == e]
                        if not ks:
                            continue
                        pair_rows.setdefault((r, s, t), [])
                        if len(rows[r]) >= C:
                            num_overflow[r] += 1
                            continue
                        p = len(rows[r])
                        rows[r].append((s, t, el))
                        group_sizes[r, el] += 1
                        wt = np.float32(-0.0)  # the slots' weights in slot order, from -0.0
                        for k in ks:  # (every slot weighs 1.0 without topk_weights)
                            wt = np.float32(wt + (np.float32(1.0) if w is None else weight_of(s, t, k)))
                        row_weight[r, p] = wt
                        for k in ks:
                            slot_row[(s, t, k)] = (r, p)
        # pair_rows must list rows in ascending local-expert order
        for key in pair_rows:
            pair_rows[key] = []
        for r in range(R):
            for p, (s, t, el) in enumerate(rows[r]):
                pair_rows[(r, s, t)].append(p)
    elif layout == "tokens":
        row_weight = np.zeros((R, C, K), np.float32)
        out_topk_idx = np.full((R, C, K), -1, np.int32)
        for r in range(R):
            for s in range(R):
                for t in range(T):
                    ks = [k for k in range(K) if kept[s, t, k] and clean[s, t, k] // El == r]
                    if not ks:
                        continue
                    pair_rows[(r, s, t)] = []
                    if len(rows[r]) >= C:
                        num_overflow[r] += 1
                        continue
                    p = len(rows[r])
                    rows[r].append((s, t, -1))
                    pair_rows[(r, s, t)].append(p)
                    for k in ks:
                        out_topk_idx[r, p, k] = clean[s, t, k] - r * El
                        row_weight[r, p, k] = weight_of(s, t, k)
                        slot_row[(s, t, k)] = (r, p)
                    for el in sorted({int(clean[s, t, k]) - r * El for k in ks}):
                        group_sizes[r, el] += 1
    else:
        raise ValueError(layout)

    return Routing(R=R, T=T, K=K, E=E, C=C, layout=layout, rows=rows, pair_rows=pair_rows,
                   slot_row=slot_row, row_weight=row_weight, out_topk_idx=out_topk_idx,
                   group_sizes=group_sizes, num_overflow=num_overflow, dropped=dropped,
                   num_dropped=num_dropped, num_invalid=num_invalid, kept=kept,
                   clean_idx=clean.astype(np.int32))


# --------------------------------------------------------------------------- normal mode


@dataclasses.dataclass
class DispatchResult:
    x: np.ndarray  # [R, C, H] (x's dtype, or out_dtype)
    fp8_data: Optional[np.ndarray]  # [R, C, H] float8 when fp8 and no out_dtype
    fp8_scales: Optional[np.ndarray]  # [R, C, H//128]
    weights: np.ndarray
    group_sizes: np.ndarray
    topk_idx: Optional[np.ndarray]
    routing: Routing


def dispatch(x: np.ndarray, topk_idx: np.ndarray, topk_weights: Optional[np.ndarray] = None,
             *, num_experts: int, capacity_factor: Optional[float] = None,
             max_rows: Optional[int] = None, layout: str = "experts", fp8: bool = False,
             out_dtype=None) -> DispatchResult:
    """Dispatch of global ``x [R, T, H]``; returns per-rank outputs stacked on axis 0."""
    x = np.asarray(x)
    R, T, H = x.shape
    rt = route(topk_idx, topk_weights, num_experts=num_experts,
               capacity_factor=capacity_factor, max_rows=max_rows, layout=layout)
    C = rt.C
    fp8_data = fp8_scales = None
    if fp8:
        qd, qs = quantize(x)  # each token quantized once, on its sender
        if out_dtype is None:
            fp8_data = np.zeros((R, C, H), F8)
            fp8_scales = np.zeros((R, C, H // FP8_BLOCK), np.float32)
            for r in range(R):
                for p, (s, t, _) in enumerate(rt.rows[r]):
                    fp8_data[r, p] = qd[s, t]
                    fp8_scales[r, p] = qs[s, t]
            out_x = None
        else:
            deq = dequantize(qd, qs).astype(np.dtype(out_dtype))
            out_x = np.zeros((R, C, H), np.dtype(out_dtype))
            for r in range(R):
                for p, (s, t, _) in enumerate(rt.rows[r]):
                    out_x[r, p] = deq[s, t]
    else:
        dt = x.dtype if out_dtype is None else np.dtype(out_dtype)
        out_x = np.zeros((R, C, H), dt)
        for r in range(R):
            for p, (s, t, _) in enumerate(rt.rows[r]):
                out_x[r, p] = x[s, t].astype(dt)
    return DispatchResult(x=out_x, fp8_data=fp8_data, fp8_scales=fp8_scales,
                          weights=rt.row_weight, group_sizes=rt.group_sizes,
                          topk_idx=rt.out_topk_idx, routing=rt)


def combine(expert_out: np.ndarray, rt: Routing, weights: Optional[np.ndarray] = None,
            out_dtype=None) -> np.ndarray:
    """Combine ``expert_out [R, C, H]`` back to ``[R, T, H]`` in the contract's order.

    Expert side: per (token, source rank), rows on rank r in ascending local expert
    order, ``float32(row) * w`` added into a float32 ``-0.0``, rounded to the dtype.
    Token side: partials in ascending rank order into a float32 ``-0.0``, rounded.
    ``out_dtype`` (default: expert_out's dtype) is the rounding/wire dtype.
    """
    expert_out = np.asarray(expert_out)
    R, C, H = expert_out.shape
    assert C == rt.C and R == rt.R
    dt = expert_out.dtype if out_dtype is None else np.dtype(out_dtype)
    if weights is not None:
        weights = np.asarray(weights, np.float32)
        assert weights.shape == (R, C)
    y = np.zeros((R, rt.T, H), dt)
    for s in range(R):
        for t in range(rt.T):
            acc = np.full(H, -0.0, np.float32)
            for r in range(R):
                if (r, s, t) not in rt.pair_rows:
                    continue
                part = np.full(H, -0.0, np.float32)
                for p in rt.pair_rows[(r, s, t)]:
                    row = expert_out[r, p].astype(np.float32)
                    if weights is not None:
                        row = (row * weights[r, p]).astype(np.float32)
                    part = (part + row).astype(np.float32)
                part = part.astype(dt)  # the wire format
                acc = (acc + part.astype(np.float32)).astype(np.float32)
            y[s, t] = acc.astype(dt)
    return y


def weight_grad(rt: Routing, d_out_weights: np.ndarray) -> np.ndarray:
    """Cotangent of topk_weights [R, T, K] given the cotangent of out.weights."""
    g = np.zeros((rt.R, rt.T, rt.K), np.float32)
    for (s, t, k), (r, p) in rt.slot_row.items():
        g[s, t, k] = d_out_weights[r, p] if rt.layout == "experts" else d_out_weights[r, p, k]
    return g


def combine_grad_expert_out(rt: Routing, dy: np.ndarray, weights: Optional[np.ndarray],
                            dtype) -> np.ndarray:
    """Cotangent of combine's expert_out [R, C, H]: dispatch of dy, times the row weight."""
    dy = np.asarray(dy)
    H = dy.shape[-1]
    d = np.zeros((rt.R, rt.C, H), np.float32)  # dispatch(dy): padding rows are +0.0
    for r in range(rt.R):
        for p, (s, t, _) in enumerate(rt.rows[r]):
            d[r, p] = dy[s, t].astype(np.float32)
    if weights is not None:  # literally "times the row weight": +0.0 * (w < 0) is -0.0
        d = (d * np.asarray(weights, np.float32)[:, :, None]).astype(np.float32)
    return d.astype(np.dtype(dtype))


def combine_grad_weights(rt: Routing, dy: np.ndarray, expert_out: np.ndarray) -> np.ndarray:
    """Cotangent of combine's weights [R, C]: sum_h dy[t, h] * expert_out[p, h] (float64)."""
    g = np.zeros((rt.R, rt.C), np.float64)
    for r in range(rt.R):
        for p, (s, t, _) in enumerate(rt.rows[r]):
            g[r, p] = np.sum(np.asarray(dy[s, t], np.float64) *
                             np.asarray(expert_out[r, p], np.float64))
    return g


# --------------------------------------------------------------------------- low latency


@dataclasses.dataclass
class LowLatencyResult:
    x: Optional[np.ndarray]  # [R, El, R*M, H] bf16 (fp8=False)
    fp8_data: Optional[np.ndarray]  # [R, El, R*M, H]
    fp8_scales: Optional[np.ndarray]  # [R, El, R*M, H//128]
    count: np.ndarray  # [R, El] int32
    # (s, t, global expert) -> (r, el, position)
    slot: Dict[Tuple[int, int, int], Tuple[int, int, int]]
    R: int
    E: int
    M: int


def low_latency_dispatch(x: np.ndarray, topk_idx: np.ndarray, *, num_experts: int,
                         max_tokens_per_rank: int, fp8: bool = True,
                         round_scale: bool = False) -> LowLatencyResult:
    x = np.asarray(x)
    idx = np.asarray(topk_idx).astype(np.int64)
    R, T, H = x.shape
    K = idx.shape[-1]
    E, M = num_experts, max_tokens_per_rank
    El = E // R
    assert T <= M
    idx = np.where((idx < -1) | (idx >= E), -1, idx)
    count = np.zeros((R, El), np.int32)
    slot = {}
    src_rows = []  # (r, el, pos, s, t)
    for r in range(R):
        for el in range(El):
            e = r * El + el
            for s in range(R):
                for t in range(T):
                    if any(idx[s, t, k] == e for k in range(K)):  # repeated ids: one row
                        pos = int(count[r, el])
                        count[r, el] += 1
                        slot[(s, t, e)] = (r, el, pos)
                        src_rows.append((r, el, pos, s, t))
    out = fd = fs = None
    if fp8:
        qd, qs = quantize(x, round_scale)
        fd = np.zeros((R, El, R * M, H), F8)
        fs = np.zeros((R, El, R * M, H // FP8_BLOCK), np.float32)
        for r, el, pos, s, t in src_rows:
            fd[r, el, pos] = qd[s, t]
            fs[r, el, pos] = qs[s, t]
    else:
        out = np.zeros((R, El, R * M, H), x.dtype)
        for r, el, pos, s, t in src_rows:
            out[r, el, pos] = x[s, t]
    return LowLatencyResult(x=out, fp8_data=fd, fp8_scales=fs, count=count, slot=slot,
                            R=R, E=E, M=M)


def low_latency_combine(expert_out: np.ndarray, topk_idx: np.ndarray,
                        topk_weights: np.ndarray, ll: LowLatencyResult) -> np.ndarray:
    """y[t] = bf16(sum over valid k, in k order, of w[t,k] * float32(row(t,k)))."""
    expert_out = np.asarray(expert_out)
    idx = np.asarray(topk_idx).astype(np.int64)
    w = np.asarray(topk_weights, np.float32)
    R, T, K = idx.shape
    H = expert_out.shape[-1]
    y = np.zeros((R, T, H), BF16)
    for s in range(R):
        for t in range(T):
            acc = np.full(H, -0.0, np.float32)
            for k in range(K):
                e = int(idx[s, t, k])
                if e < 0 or e >= ll.E:
                    continue
                r, el, pos = ll.slot[(s, t, e)]
                term = (w[s, t, k] * expert_out[r, el, pos].astype(np.float32)).astype(np.float32)
                acc = (acc + term).astype(np.float32)
            y[s, t] = acc.astype(BF16)
    return y


# --------------------------------------------------------------------------- inputs


def bits(a: np.ndarray) -> np.ndarray:
    """An unsigned-integer view of an array's bits, for exact comparisons."""
    a = np.ascontiguousarray(np.asarray(a))
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


ROUTINGS = ("uniform", "distinct", "one_expert", "skip_ranks", "all_minus1", "zipf",
            "repeated", "invalid", "mixed")


def make_routing(kind: str, rng: np.random.Generator, R: int, T: int, K: int,
                 E: int) -> np.ndarray:
    """A global ``topk_idx [R, T, K]`` of the named kind."""
    El = E // R
    if kind == "uniform":  # any ids in [-1, E), repeats allowed
        return rng.integers(-1, E, size=(R, T, K)).astype(np.int32)
    if kind == "distinct":  # the usual: distinct experts per token
        out = np.empty((R, T, K), np.int32)
        for s in range(R):
            for t in range(T):
                out[s, t] = rng.choice(E, size=K, replace=K > E)
        return out
    if kind == "one_expert":  # every token to the same expert in slot 0
        e = int(rng.integers(0, E))
        out = np.full((R, T, K), -1, np.int32)
        out[:, :, 0] = e
        return out
    if kind == "skip_ranks":  # some ranks receive nothing
        live = rng.choice(R, size=max(1, R // 3), replace=False)
        experts = np.concatenate([np.arange(r * El, (r + 1) * El) for r in live])
        return rng.choice(np.concatenate([experts, [-1]]), size=(R, T, K)).astype(np.int32)
    if kind == "all_minus1":
        return np.full((R, T, K), -1, np.int32)
    if kind == "zipf":  # skewed popularity, distinct per token when possible
        p = 1.0 / np.arange(1, E + 1) ** 1.2
        perm = rng.permutation(E)
        p = p[np.argsort(perm)]
        p /= p.sum()
        out = np.empty((R, T, K), np.int32)
        for s in range(R):
            for t in range(T):
                out[s, t] = rng.choice(E, size=K, replace=K > E, p=p)
        return out
    if kind == "repeated":  # the same expert in several slots of a token
        base = rng.integers(0, E, size=(R, T, 1))
        other = rng.integers(-1, E, size=(R, T, K))
        pick = rng.random((R, T, K)) < 0.5
        return np.where(pick, base, other).astype(np.int32)
    if kind == "invalid":  # ids outside [-1, E)
        bad = rng.choice(np.array([-7, -2, E, E + 3, 2**30, -(2**31)]), size=(R, T, K))
        good = rng.integers(-1, E, size=(R, T, K))
        return np.where(rng.random((R, T, K)) < 0.4, bad, good).astype(np.int32)
    if kind == "mixed":
        kinds = [k for k in ROUTINGS if k != "mixed"]
        parts = [make_routing(kinds[int(rng.integers(len(kinds)))], rng, R, T, K, E)
                 for _ in range(R)]
        return np.stack([p[i] for i, p in enumerate(parts)])
    raise ValueError(kind)


def make_x(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Random values with a spread of magnitudes, exactly representable in dtype."""
    mag = np.exp2(rng.integers(-6, 6, size=shape)).astype(np.float32)
    v = (rng.standard_normal(shape).astype(np.float32) * mag)
    return v.astype(np.dtype(dtype))
