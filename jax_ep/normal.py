"""Normal mode (training, prefill): `dispatch` and `combine` with their VJPs."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from . import backends, debug
from . import fp8 as fp8_lib
from .checks import axis_size, check_dtype, check_num_experts, check_shape, check_tokens
from .config import Config
from .routing import capacity as _capacity
from .routing import rows_needed, sender_routing
from .types import LAYOUTS, DispatchHandle, DispatchOutput, RoutingMeta

_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def dispatch(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: Optional[jax.Array] = None,
    *,
    num_experts: int,
    axis_name,
    capacity_factor: Optional[float] = None,
    max_rows: Optional[int] = None,
    layout: str = "experts",
    fp8: bool = False,
    out_dtype=None,
    buffer=None,
    config: Optional[Config] = None,
    backend: str = "auto",
) -> DispatchOutput:
    """Send each token to the ranks that own its experts. Call inside `shard_map`.

    Args (per rank):
      x:            [T, H] bfloat16, float16 or float32 tokens, or an
                    `Fp8Array` (data [T, H] float8_e4m3fn, scales [T, H/128])
                    already quantized: its rows move as they are (fp8 implied,
                    no quantization; not differentiable).
      topk_idx:     int32 [T, K] global expert ids; -1 = no expert for the slot;
                    ids outside [-1, E) count as -1 and in `handle.num_invalid`.
      topk_weights: float32 [T, K], optional (every slot weighs 1.0 without it).
      num_experts:  E, divisible by the EP group size R.
      axis_name:    the mesh axis (or tuple of axes) of the EP group.
      capacity_factor: sender-side capacity c = max(1, ceil(f*T*K/E)) tokens
                    per expert and sender; drops go to `handle.dropped`.
      max_rows:     the static row count C (default: `jax_ep.rows_needed`).
      layout:       "experts" (rows grouped by local expert, GEMM-ready) or
                    "tokens" (one row per (token, rank), DeepEP V1 style).
      fp8:          quantize on the sender and move FP8 (H % 128 == 0).
      out_dtype:    with fp8, dequantize on arrival (differentiable).
      buffer:       a `jax_ep.Buffer` (cuda backend); None: the "default" one.
      config:       a `jax_ep.Config` bounding the SMs the kernels take.
      backend:      "auto" (CUDA kernels on GPUs when built, else xla), "xla"
                    or "cuda".

    Returns a `DispatchOutput` (x [C, H], weights, group_sizes [E_local],
    handle, topk_idx for the tokens layout); see DESIGN 3.1.
    """
    pre = isinstance(x, fp8_lib.Fp8Array)  # rows already in FP8: they move as they are
    if pre:
        T, H, K = check_tokens(x.data, topk_idx, topk_weights, (jnp.float8_e4m3fn,), name="x.data")
        check_shape("x.scales", x.scales, (T, H // fp8_lib.BLOCK), f"[T, H/{fp8_lib.BLOCK}]")
        check_dtype("x.scales", x.scales, (jnp.float32,))
        fp8 = True
    else:
        T, H, K = check_tokens(x, topk_idx, topk_weights, _FLOAT_DTYPES)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    R = axis_size(axis_name)
    check_num_experts(num_experts, R)
    if capacity_factor is not None and not (capacity_factor >= 0):
        raise ValueError(f"capacity_factor must be >= 0 (or None for dropless), got {capacity_factor!r}")
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
    if fp8 and H % fp8_lib.BLOCK:
        raise ValueError(f"x: fp8 dispatch needs H to be a multiple of {fp8_lib.BLOCK}, got H={H}")
    if out_dtype is not None:
        out_dtype = jnp.dtype(out_dtype)
        if out_dtype not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
            raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
        if not fp8:
            x = x.astype(out_dtype)
    x_dtype = jnp.dtype(x.data.dtype if pre else x.dtype)

    cap = _capacity(capacity_factor, T, K, num_experts)
    rows = rows_needed(
        T, K, num_experts, R, layout=layout, capacity_factor=capacity_factor, max_rows=max_rows
    )
    # The backward pass combines in out_dtype, so the buffer must hold that too.
    # (An Fp8Array has no backward pass; its combine moves bfloat16.)
    wire = out_dtype if (fp8 and out_dtype is not None) else (jnp.bfloat16 if pre else x.dtype)
    kind, buffer_id = backends.select(
        backend, axis_name, buffer, mode="normal", num_experts=num_experts, hidden=H,
        tokens=T, top_k=K, dtype=wire, fp8=fp8,
    )
    meta = RoutingMeta(
        axis_name=axis_name, num_experts=num_experts, num_ranks=R, layout=layout, rows=rows,
        hidden=H, top_k=K, backend=kind, buffer_id=buffer_id, capacity=cap,
    )
    weighted = topk_weights is not None
    if not weighted:
        topk_weights = jnp.ones((T, K), jnp.float32)
    num_sms = backends.num_sms(config, num_ranks=R, hidden=H, dtype="fp8" if fp8 else x_dtype,
                               mode="normal", kernel="dispatch")
    fn = _dispatch_fn(meta, bool(fp8), out_dtype, x_dtype, num_sms, weighted)
    out = fn(x, topk_idx.astype(jnp.int32), topk_weights.astype(jnp.float32))
    debug.check_counts("dispatch", out.handle.num_invalid, out.handle.num_overflow,
                       axis_name=axis_name, backend=meta.backend)
    return out


def combine(
    expert_out: jax.Array,
    handle: DispatchHandle,
    weights: Optional[jax.Array] = None,
    *,
    config: Optional[Config] = None,
) -> jax.Array:
    """Bring expert rows back to their tokens and sum them: [T, H].

    expert_out: [C, H] rows in the layout of the dispatch that made `handle`.
    weights:    optional float32 [C] (`out.weights` of the experts layout): each
                row is scaled in float32 before the sum, inside the kernel.
    The sum order is fixed (DESIGN 3.1) and the result has expert_out's dtype.
    """
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle must be the DispatchHandle of a dispatch, got {type(handle).__name__}")
    meta = handle.meta
    check_shape("expert_out", expert_out, (meta.rows, None))
    check_dtype("expert_out", expert_out, _FLOAT_DTYPES)
    if weights is not None:
        if meta.layout == "tokens" and weights.ndim == 2:
            raise ValueError(
                "weights: the tokens layout takes row weights of shape [C]; apply the "
                "per-expert weights [C, K] inside the expert computation"
            )
        check_shape("weights", weights, (meta.rows,))
        if not jnp.issubdtype(weights.dtype, jnp.floating):
            raise TypeError(f"weights must be float32 row weights, got dtype {weights.dtype}")
        weights = weights.astype(jnp.float32)
    if meta.backend != "xla":  # the kernels stage rows of this dtype and width
        from .buffer import by_id

        buf = by_id(meta.buffer_id)
        if buf is None or not buf.allocated:
            raise RuntimeError("combine: the Buffer of this dispatch was closed")
        buf.check_call(mode="normal", num_experts=meta.num_experts, hidden=expert_out.shape[1],
                       tokens=handle.dst_mask.shape[0], top_k=meta.top_k, dtype=expert_out.dtype)
    num_sms = backends.num_sms(config, num_ranks=meta.num_ranks, hidden=meta.hidden,
                               dtype=expert_out.dtype, mode="normal", kernel="combine")
    fn = _combine_fn(meta, weights is not None, num_sms)
    return fn(expert_out, weights, handle)


@functools.lru_cache(maxsize=None)
def _dispatch_fn(meta: RoutingMeta, fp8: bool, out_dtype, x_dtype, num_sms: int, weighted: bool):
    impl = backends.normal_impl(meta)

    def forward(x, idx, w):
        routing = sender_routing(
            idx, w, num_experts=meta.num_experts, num_ranks=meta.num_ranks,
            capacity=meta.capacity, layout=meta.layout,
        )
        out_x, out_w, sizes, out_topk, handle = impl.dispatch(
            x, routing, meta, fp8=fp8, out_dtype=out_dtype, num_sms=num_sms
        )
        return DispatchOutput(out_x, out_w, sizes, handle, out_topk)

    @jax.custom_vjp
    def f(x, idx, w):
        return forward(x, idx, w)

    def f_fwd(x, idx, w):
        out = forward(x, idx, w)
        return out, out.handle

    def f_bwd(handle, ct):
        if x_dtype == jnp.float8_e4m3fn:
            raise TypeError(
                "dispatch of an Fp8Array is not differentiable (its rows are FP8 already); "
                "pass BF16 x with fp8=True and out_dtype=jnp.bfloat16 for a differentiable FP8 "
                "dispatch"
            )
        if fp8 and out_dtype is None:
            raise TypeError(
                "dispatch(fp8=True) returns an Fp8Array, which is not differentiable; "
                "pass out_dtype=jnp.bfloat16 to dequantize on arrival and get a BF16 "
                "combine as the backward pass"
            )
        dx, dw = impl.combine(ct.x, None, handle, row_vals=ct.weights if weighted else None,
                              num_sms=num_sms)
        # Without topk_weights the ones made here are no input of the caller's.
        return dx.astype(x_dtype), None, (dw if weighted else None)

    f.defvjp(f_fwd, f_bwd)
    return f


def _written_rows(handle: DispatchHandle) -> jax.Array:
    """bool [C]: rows that hold a token (padding rows may hold anything)."""
    rows = handle.meta.rows
    idx = jnp.where(handle.src_rows >= 0, handle.src_rows, rows).reshape(-1)
    return jnp.zeros((rows,), bool).at[idx].set(True, mode="drop")


@functools.lru_cache(maxsize=None)
def _combine_fn(meta: RoutingMeta, weighted: bool, num_sms: int):
    impl = backends.normal_impl(meta)

    @jax.custom_vjp
    def f(expert_out, weights, handle):
        return impl.combine(expert_out, weights, handle, num_sms=num_sms)[0]

    def f_fwd(expert_out, weights, handle):
        return f(expert_out, weights, handle), (expert_out, weights, handle)

    def f_bwd(res, ct):
        expert_out, weights, handle = res
        g = impl.redispatch(ct.astype(expert_out.dtype), handle, num_sms=num_sms)
        if not weighted:
            return g, None, None
        g32 = g.astype(jnp.float32)
        d_out = (g32 * weights[:, None]).astype(expert_out.dtype)
        d_w = jnp.sum(g32 * expert_out.astype(jnp.float32), axis=1)
        return d_out, jnp.where(_written_rows(handle), d_w, 0.0), None

    f.defvjp(f_fwd, f_bwd)
    return f
