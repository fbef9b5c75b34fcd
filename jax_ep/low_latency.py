"""Low-latency mode (decode): fixed shapes, split send/recv, `overlap`."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from . import backends, debug
from . import fp8 as fp8_lib
from .checks import axis_size, check_dtype, check_num_experts, check_shape, check_tokens
from .routing import sender_routing
from .types import LowLatencyHandle, LowLatencyMeta, LowLatencyOutput, LowLatencyPending

_IN_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def low_latency_dispatch_send(
    x: jax.Array,
    topk_idx: jax.Array,
    *,
    num_experts: int,
    axis_name,
    max_tokens_per_rank: int,
    fp8: bool = True,
    round_scale: bool = False,
    buffer=None,
    backend: str = "auto",
    zero_padding: bool = True,
) -> LowLatencyPending:
    """Issue the writes of a low-latency dispatch and return at once.

    x: [T, H] (T <= max_tokens_per_rank; cast to bfloat16 on the wire unless
    fp8), topk_idx: int32 [T, K]. Pass the result to
    `low_latency_dispatch_recv`; work placed between the two overlaps the
    transfer (see `overlap`).

    zero_padding: the rows of each expert past `count[e]` (and their FP8
    scales) are zero, as DESIGN 3.2 specifies. False leaves them unspecified:
    the kernels then skip writing the whole `[E_local, R*M, H]` output each
    call (235 MB at the DeepSeek-V3 decode shape), for consumers that read only
    the first `count[e]` rows, as `low_latency_combine` does. The xla backend
    zeroes them either way.
    """
    T, H, K = check_tokens(x, topk_idx, None, _IN_DTYPES)
    if not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1:
        raise ValueError(f"max_tokens_per_rank must be a positive int, got {max_tokens_per_rank!r}")
    if T > max_tokens_per_rank:
        raise ValueError(f"x has {T} tokens, more than max_tokens_per_rank={max_tokens_per_rank}")
    if fp8 and H % fp8_lib.BLOCK:
        raise ValueError(f"x: fp8 needs H to be a multiple of {fp8_lib.BLOCK}, got H={H}")
    R = axis_size(axis_name)
    check_num_experts(num_experts, R)
    kind, buffer_id = backends.select(
        backend, axis_name, buffer, mode="low_latency", num_experts=num_experts, hidden=H,
        tokens=max_tokens_per_rank, top_k=K, dtype=jnp.bfloat16,
    )
    meta = LowLatencyMeta(
        axis_name=axis_name, num_experts=num_experts, num_ranks=R,
        max_tokens_per_rank=max_tokens_per_rank, hidden=H, top_k=K, fp8=bool(fp8),
        round_scale=bool(round_scale), backend=kind, buffer_id=buffer_id,
        zero_padding=bool(zero_padding),
    )
    idx = topk_idx.astype(jnp.int32)
    routing = sender_routing(idx, jnp.ones((T, K), jnp.float32), num_experts=num_experts,
                             num_ranks=R, capacity=0, layout="experts")
    debug.check_counts("low_latency_dispatch_send", routing.num_invalid, axis_name=axis_name,
                       backend=kind)
    # (a backend that routes in its kernels leaves `routing` unused, and XLA drops it)
    return backends.low_latency_impl(meta).ll_dispatch_send(x, idx, routing, meta)


def low_latency_dispatch_recv(pending: LowLatencyPending) -> LowLatencyOutput:
    """Wait for a `low_latency_dispatch_send` and unpack its rows.

    Returns x [E_local, R*M, H] (Fp8Array with fp8, else bfloat16), count int32
    [E_local], and the handle for `low_latency_combine`.
    """
    meta = _pending_meta(pending, "dispatch", "low_latency_dispatch_recv")
    return backends.low_latency_impl(meta).ll_dispatch_recv(pending)


def low_latency_dispatch(x, topk_idx, **kwargs) -> LowLatencyOutput:
    """`low_latency_dispatch_recv(low_latency_dispatch_send(...))` (DESIGN 3.2)."""
    return low_latency_dispatch_recv(low_latency_dispatch_send(x, topk_idx, **kwargs))


def low_latency_combine_send(
    expert_out: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array, handle: LowLatencyHandle
) -> LowLatencyPending:
    """Send each expert row back to its token; returns at once.

    expert_out: bfloat16 [E_local, R*M, H] (the shape of the dispatch's x; only
    the first count[e] rows of each expert are read). topk_idx / topk_weights:
    the [T, K] routing of this rank's tokens, as given to the dispatch.
    """
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"handle must be a LowLatencyHandle, got {type(handle).__name__}")
    meta = handle.meta
    El, R, M = meta.local_experts, meta.num_ranks, meta.max_tokens_per_rank
    check_shape("expert_out", expert_out, (El, R * M, None), f"[{El}, {R * M}, H]")
    check_dtype("expert_out", expert_out, (jnp.bfloat16,))
    T = handle.slot_pos.shape[0]
    check_shape("topk_idx", topk_idx, (T, meta.top_k), f"[{T}, {meta.top_k}]")
    check_shape("topk_weights", topk_weights, (T, meta.top_k), f"[{T}, {meta.top_k}]")
    # Each backend finds a slot's place from topk_idx itself (the kernels do it per
    # token in the receive, with no extra XLA pass).
    return backends.low_latency_impl(meta).ll_combine_send(
        expert_out, topk_idx.astype(jnp.int32), topk_weights.astype(jnp.float32), handle)


def low_latency_combine_recv(pending: LowLatencyPending) -> jax.Array:
    """Wait for a `low_latency_combine_send`; returns bfloat16 [T, H]."""
    meta = _pending_meta(pending, "combine", "low_latency_combine_recv")
    return backends.low_latency_impl(meta).ll_combine_recv(pending)


def low_latency_combine(expert_out, topk_idx, topk_weights, handle) -> jax.Array:
    """Weighted sum of each token's expert rows in top-k order, in float32,
    rounded once to bfloat16: [T, H]."""
    return low_latency_combine_recv(low_latency_combine_send(expert_out, topk_idx, topk_weights, handle))


def overlap(send: Callable[[], Any], compute: Callable[..., Any], recv: Callable[[Any], Any], *args):
    """Run `send()`, then `compute(*args)`, then `recv(pending)`, in that order.

    XLA may move independent work across a send/recv pair; the two
    `lax.optimization_barrier`s pin the computation between them: its inputs
    are released only with the pending value, and the pending value only with
    its outputs. Returns `(recv(pending), compute(*args))`.
    """
    pending = send()
    pending, args = lax.optimization_barrier((pending, args))
    out = compute(*args)
    pending, out = lax.optimization_barrier((pending, out))
    return recv(pending), out


def _pending_meta(pending, stage: str, fn):
    if not isinstance(pending, LowLatencyPending) or pending.stage.name != stage:
        raise TypeError(f"{fn} takes the pending value of the matching *_send call, got {type(pending).__name__}")
    return pending.meta
