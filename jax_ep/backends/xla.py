"""The xla backend: pure JAX, any platform, the oracle of every kernel.

Normal mode moves a padded `[R, T, ...]` block per destination with
`lax.all_to_all` (row t of block r is token t, zero unless it has a row on r),
so the receiver knows each row's source token without any extra metadata.
Receivers expand tokens into expert rows with one gather; combine reduces in
the exact order of DESIGN 3.1 with unrolled float32 adds into accumulators
that start at -0.0 (the additive identity) and skip absent terms.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import fp8 as fp8_lib
from ..routing import SenderRouting, sender_routing
from ..types import (DispatchHandle, LowLatencyHandle, LowLatencyOutput, LowLatencyPending,
                     RoutingMeta, Stage)
from ..vma import like_inputs


def _a2a(x: jax.Array, axis_name) -> jax.Array:
    """[R, ...] block r to rank r; returns [R, ...] block s from rank s."""
    return lax.all_to_all(x, axis_name, 0, 0)


def _per_dest(values: jax.Array, dest_ids: jax.Array, num_ranks: int, fill) -> jax.Array:
    """[T, K] slot values -> [R, T, K], keeping the slots bound for each rank."""
    r = jnp.arange(num_ranks, dtype=jnp.int32)[:, None, None]
    return jnp.where(dest_ids[None] == r, values[None], fill)


def _sorted_rows(row_lid: jax.Array, row_w: jax.Array, width: int) -> Tuple[jax.Array, jax.Array]:
    """Sort each token's row slots by local expert, -1 last; keep `width` columns."""
    key = jnp.where(row_lid >= 0, row_lid, jnp.iinfo(jnp.int32).max)
    order = jnp.argsort(key, axis=-1, stable=True)
    lid = jnp.take_along_axis(row_lid, order, axis=-1)[..., :width]
    w = jnp.take_along_axis(row_w, order, axis=-1)[..., :width]
    return lid, w


def _gather_rows(src: jax.Array, flat_src: jax.Array) -> jax.Array:
    """rows[p] = src[flat_src[p]], zero where flat_src is out of range."""
    return jnp.take(src, flat_src, axis=0, mode="fill", fill_value=0)


def _rounded(product: jax.Array, opaque_zero: jax.Array) -> jax.Array:
    """The float32 product, rounded on its own before the add that follows.

    XLA's CPU backend always lets LLVM fuse a multiply and an add into an FMA
    (one rounding, where the kernels round twice). XOR-ing the product's bits
    with a zero the compiler cannot prove is zero leaves the value unchanged
    and hides the multiply from that fusion.
    """
    bits = lax.bitcast_convert_type(product, jnp.uint32) ^ opaque_zero
    return lax.bitcast_convert_type(bits, jnp.float32)


def _opaque_zero(index: jax.Array) -> jax.Array:
    """uint32 0, computed from data (row indices are never below -2)."""
    return (jnp.min(index) < -2).astype(jnp.uint32)


def _row_sources(src_rows: jax.Array, rows: int) -> jax.Array:
    """int32 [C]: flat (s * T + t) source of each output row, R*T for padding."""
    r, t, kr = src_rows.shape
    src = jnp.broadcast_to(
        (jnp.arange(r * t, dtype=jnp.int32).reshape(r, t))[..., None], (r, t, kr)
    )
    dst = jnp.where(src_rows >= 0, src_rows, rows)
    out = jnp.full((rows,), r * t, jnp.int32)
    return out.at[dst.reshape(-1)].set(src.reshape(-1), mode="drop")


def dispatch(
    x: jax.Array,
    routing: SenderRouting,
    meta: RoutingMeta,
    *,
    fp8: bool,
    out_dtype,
    num_sms: Optional[int] = None,
):
    """Returns (out_x, weights, group_sizes, out_topk_idx or None, handle)."""
    R, El, C = meta.num_ranks, meta.local_experts, meta.rows
    T, H = x.shape
    K = meta.top_k
    axis = meta.axis_name

    if meta.layout == "tokens":
        slot_idx, slot_w = routing.kept_idx, routing.kept_w
    else:
        slot_idx, slot_w = routing.row_idx, routing.row_w
    dest = jnp.where(slot_idx >= 0, slot_idx // El, -1)
    lid = jnp.where(slot_idx >= 0, slot_idx % El, -1)

    mask = routing.dst_mask.T.astype(bool)  # [R, T]
    if fp8:
        q = x if isinstance(x, fp8_lib.Fp8Array) else fp8_lib.quantize(x)
        payload = (q.data, q.scales)
    else:
        payload = (x,)
    sent = tuple(jnp.where(mask[..., None], p[None], jnp.zeros((), p.dtype)) for p in payload)
    recv = tuple(_a2a(p, axis) for p in sent)  # each [R(src), T, ...]
    recv_lid = _a2a(_per_dest(lid, dest, R, -1), axis)  # [R, T, K]
    recv_w = _a2a(_per_dest(slot_w, dest, R, 0.0), axis)  # [R, T, K]

    # Which local experts each received token picked: M[s, t, e].
    experts = jnp.arange(El, dtype=jnp.int32)
    picks = jnp.any(recv_lid[..., None] == experts, axis=2)  # [R, T, El]

    if meta.layout == "tokens":
        has = jnp.any(recv_lid >= 0, axis=2)  # [R, T]
        per_src = jnp.sum(has, axis=1, dtype=jnp.int32)
        base = jnp.cumsum(per_src) - per_src
        pos = base[:, None] + jnp.cumsum(has, axis=1, dtype=jnp.int32) - 1
        ok = has & (pos < C)
        src_rows = jnp.where(has, jnp.where(pos < C, pos, -2), -1)[..., None]
        total = jnp.sum(per_src)
        group_sizes = jnp.sum(picks & ok[..., None], axis=(0, 1), dtype=jnp.int32)
        flat = _row_sources(src_rows, C)
        out_topk = _gather_rows(recv_lid.reshape(R * T, K), flat)
        out_topk = jnp.where((flat < R * T)[:, None], out_topk, -1)
        out_w = _gather_rows(recv_w.reshape(R * T, K), flat)
    else:
        kr = meta.local_slots
        row_lid, row_w = _sorted_rows(recv_lid, recv_w, kr)  # [R, T, Kr]
        cnt = jnp.sum(picks, axis=1, dtype=jnp.int32).T  # [El, R]
        flat_cnt = cnt.reshape(-1)
        base = (jnp.cumsum(flat_cnt) - flat_cnt).reshape(El, R)
        rank = jnp.cumsum(picks, axis=1, dtype=jnp.int32) - 1  # [R, T, El]
        e = jnp.maximum(row_lid, 0)
        s_ids = jnp.arange(R, dtype=jnp.int32)[:, None, None]
        pos = base[e, s_ids] + jnp.take_along_axis(rank, e, axis=2)
        valid = row_lid >= 0
        src_rows = jnp.where(valid, jnp.where(pos < C, pos, -2), -1)
        total = jnp.sum(flat_cnt)
        tot_e = jnp.sum(cnt, axis=1)
        group_sizes = jnp.clip(C - base[:, 0], 0, tot_e).astype(jnp.int32)
        flat = _row_sources(src_rows, C)
        out_topk = None
        out_w = jnp.zeros((C,), jnp.float32).at[jnp.where(src_rows >= 0, src_rows, C)].set(
            row_w, mode="drop"
        )

    rows = tuple(_gather_rows(p.reshape(R * T, *p.shape[2:]), flat) for p in recv)
    if fp8:
        out_x = fp8_lib.Fp8Array(*rows)
        if out_dtype is not None:
            out_x = out_x.dequantize(out_dtype)
    else:
        out_x = rows[0]

    handle = DispatchHandle(
        num_overflow=jnp.maximum(total - C, 0).astype(jnp.int32),
        dropped=routing.dropped,
        num_dropped=routing.num_dropped,
        num_invalid=routing.num_invalid,
        src_rows=src_rows.astype(jnp.int32),
        dst_mask=routing.dst_mask,
        slot_pos=routing.slot_pos,
        num_rows=jnp.minimum(total, C).astype(jnp.int32),
        epoch=like_inputs(jnp.zeros((1,), jnp.int32), x),
        meta=meta,
    )
    return out_x, out_w, group_sizes, out_topk, handle


def combine(
    expert_out: jax.Array,
    weights: Optional[jax.Array],
    handle: DispatchHandle,
    row_vals: Optional[jax.Array] = None,
    num_sms: Optional[int] = None,
):
    """Sum rows back to their tokens in the order of DESIGN 3.1.

    Returns (y [T, H] in expert_out.dtype, slot_vals [T, K] float32 or None):
    `row_vals` ([C] or [C, K]) are carried back per slot, for the topk-weight
    cotangent of dispatch.
    """
    meta = handle.meta
    R, C = meta.num_ranks, meta.rows
    axis = meta.axis_name
    src_rows = handle.src_rows
    _, T, kr = src_rows.shape
    dtype = expert_out.dtype

    acc = jnp.full((R, T, expert_out.shape[1]), -0.0, jnp.float32)
    zero = _opaque_zero(src_rows)
    for i in range(kr):
        p = src_rows[:, :, i]
        ok = p >= 0
        idx = jnp.where(ok, p, C)
        v = _gather_rows(expert_out, idx.reshape(-1)).reshape(R, T, -1).astype(jnp.float32)
        if weights is not None:
            v = _rounded(v * _gather_rows(weights, idx.reshape(-1)).reshape(R, T, 1), zero)
        acc = jnp.where(ok[..., None], acc + v, acc)
    back = _a2a(acc.astype(dtype), axis)  # [R(expert rank), T, H]

    mask = handle.dst_mask.astype(bool)  # [T, R]
    y = jnp.full((T, expert_out.shape[1]), -0.0, jnp.float32)
    for r in range(R):
        y = jnp.where(mask[:, r : r + 1], y + back[r].astype(jnp.float32), y)
    y = y.astype(dtype)

    slot_vals = None
    if row_vals is not None:
        slot_vals = _slot_values(row_vals, handle)
    return y, slot_vals


def _slot_values(row_vals: jax.Array, handle: DispatchHandle) -> jax.Array:
    """Carry one float per (row, slot) back to the slot that made the row."""
    meta = handle.meta
    R, C, K = meta.num_ranks, meta.rows, meta.top_k
    src_rows = handle.src_rows
    _, T, kr = src_rows.shape
    if meta.layout == "tokens":
        p = src_rows[:, :, 0]
        idx = jnp.where(p >= 0, p, C).reshape(-1)
        vals = _gather_rows(row_vals, idx).reshape(R, T, K)
    else:
        idx = jnp.where(src_rows >= 0, src_rows, C).reshape(-1)
        vals = _gather_rows(row_vals, idx).reshape(R, T, kr)
    back = _a2a(vals, meta.axis_name)  # [R(expert rank), T, Ks]
    flat = jnp.transpose(back, (1, 0, 2)).reshape(T, -1)  # [T, R * Ks]
    sp = handle.slot_pos
    got = jnp.take_along_axis(flat, jnp.maximum(sp, 0), axis=1)
    return jnp.where(sp >= 0, got, 0.0).astype(jnp.float32)


def redispatch(y: jax.Array, handle: DispatchHandle, num_sms: Optional[int] = None) -> jax.Array:
    """rows[p] = y[token of row p] through an existing handle (combine's VJP)."""
    meta = handle.meta
    R, C = meta.num_ranks, meta.rows
    T, H = y.shape
    mask = handle.dst_mask.T.astype(bool)
    sent = jnp.where(mask[..., None], y[None], jnp.zeros((), y.dtype))
    recv = _a2a(sent, meta.axis_name)
    flat = _row_sources(handle.src_rows, C)
    return _gather_rows(recv.reshape(R * T, H), flat)


# ---------------------------------------------------------------- low latency


def ll_dispatch_send(x, topk_idx, routing, meta):
    """Pad to M tokens and move each token once to every rank it has rows on."""
    row_idx, slot_pos = routing.row_idx, routing.slot_pos
    R, El, M = meta.num_ranks, meta.local_experts, meta.max_tokens_per_rank
    T = x.shape[0]
    pad = M - T
    dest = jnp.where(row_idx >= 0, row_idx // El, -1)
    lid = jnp.where(row_idx >= 0, row_idx % El, -1)
    lid = jnp.pad(_per_dest(lid, dest, R, -1), ((0, 0), (0, pad), (0, 0)), constant_values=-1)
    if meta.fp8:
        q = fp8_lib.quantize(x, meta.round_scale)
        payload = (q.data, q.scales)
    else:
        payload = (x.astype(jnp.bfloat16),)
    has = jnp.any(lid >= 0, axis=2)  # [R, M]
    sent = tuple(
        jnp.where(has[..., None], jnp.pad(p, ((0, pad), (0, 0)))[None], jnp.zeros((), p.dtype))
        for p in payload
    )
    arrays = tuple(_a2a(p, meta.axis_name) for p in sent) + (_a2a(lid, meta.axis_name),)
    return LowLatencyPending(arrays, slot_pos, meta, Stage("dispatch"))


def ll_dispatch_recv(pending):
    meta = pending.meta
    R, El, M, H = meta.num_ranks, meta.local_experts, meta.max_tokens_per_rank, meta.hidden
    *payload, recv_lid = pending.arrays  # [R, M, ...], [R, M, K]
    picks = jnp.any(recv_lid[..., None] == jnp.arange(El, dtype=jnp.int32), axis=2)  # [R, M, El]
    cnt = jnp.sum(picks, axis=1, dtype=jnp.int32).T  # [El, R]
    base = jnp.cumsum(cnt, axis=1) - cnt  # within an expert, by source rank
    rank = jnp.cumsum(picks, axis=1, dtype=jnp.int32) - 1
    row_lid, _ = _sorted_rows(recv_lid, jnp.zeros(recv_lid.shape, jnp.float32), meta.local_slots)
    e = jnp.maximum(row_lid, 0)
    s_ids = jnp.arange(R, dtype=jnp.int32)[:, None, None]
    p = base[e, s_ids] + jnp.take_along_axis(rank, e, axis=2)
    src_rows = jnp.where(row_lid >= 0, e * (R * M) + p, -1).astype(jnp.int32)
    flat = _row_sources(src_rows, El * R * M)
    rows = tuple(
        _gather_rows(a.reshape(R * M, *a.shape[2:]), flat).reshape(El, R * M, *a.shape[2:])
        for a in payload
    )
    x = fp8_lib.Fp8Array(*rows) if meta.fp8 else rows[0]
    handle = LowLatencyHandle(src_rows, pending.aux, like_inputs(jnp.zeros((1,), jnp.int32), src_rows), meta)
    return LowLatencyOutput(x, jnp.sum(cnt, axis=1), handle)


def ll_combine_send(expert_out, topk_idx, topk_weights, handle):
    """Send every expert row back to its token, unreduced (top-k order is summed there)."""
    meta = handle.meta
    routing = sender_routing(topk_idx, topk_weights, num_experts=meta.num_experts,
                             num_ranks=meta.num_ranks, capacity=0, layout="experts")
    slot_pos = routing.slot_pos
    weights = jnp.where(slot_pos >= 0, topk_weights, 0.0)
    R, El, M, H = meta.num_ranks, meta.local_experts, meta.max_tokens_per_rank, meta.hidden
    src = handle.src_rows  # [R, M, Kl]
    flat_out = expert_out.reshape(El * R * M, -1)
    vals = _gather_rows(flat_out, jnp.where(src >= 0, src, El * R * M).reshape(-1))
    vals = vals.reshape(R, M, src.shape[2], -1)
    back = _a2a(vals, meta.axis_name)  # [R(expert rank), M, Kl, H]
    return LowLatencyPending((back,), (slot_pos, weights), meta, Stage("combine"))


def ll_combine_recv(pending):
    (back,) = pending.arrays
    slot_pos, weights = pending.aux
    T, K = slot_pos.shape
    R, M, kl, H = back.shape
    flat = jnp.transpose(back[:, :T], (1, 0, 2, 3)).reshape(T, R * kl, H)
    acc = jnp.full((T, H), -0.0, jnp.float32)
    zero = _opaque_zero(slot_pos)
    for k in range(K):
        sp = slot_pos[:, k]
        v = jnp.take_along_axis(flat, jnp.maximum(sp, 0)[:, None, None], axis=1)[:, 0]
        term = _rounded(weights[:, k : k + 1] * v.astype(jnp.float32), zero)
        acc = jnp.where((sp >= 0)[:, None], acc + term, acc)
    return acc.astype(jnp.bfloat16)
