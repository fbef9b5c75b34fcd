"""Trace-time argument checks with messages that name the argument."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax


def axis_size(axis_name) -> int:
    """Size of the EP group along `axis_name` (a name or a tuple of names)."""
    if not isinstance(axis_name, (str, tuple)) or (
        isinstance(axis_name, tuple) and not all(isinstance(a, str) for a in axis_name)
    ):
        raise TypeError(f"axis_name must be a mesh axis name or a tuple of names, got {axis_name!r}")
    try:
        return int(lax.axis_size(axis_name))
    except NameError as e:
        raise ValueError(
            f"axis_name {axis_name!r} is not a bound mesh axis here: call jax_ep inside "
            f"jax.shard_map over a mesh that has that axis ({e})"
        ) from None


def check_num_experts(num_experts, num_ranks: int) -> None:
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if num_experts % num_ranks:
        raise ValueError(
            f"num_experts ({num_experts}) must be divisible by the size of the EP axis "
            f"({num_ranks})"
        )


def check_shape(name: str, a, expected: Sequence[Optional[int]], text: Optional[str] = None) -> None:
    """`expected` holds ints or None (any size); `text` describes the shape."""
    shape = tuple(getattr(a, "shape", ()))
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = text or "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(shape)}")


def check_dtype(name: str, a, allowed) -> None:
    dt = jnp.dtype(a.dtype)
    if dt not in [jnp.dtype(d) for d in allowed]:
        names = ", ".join(jnp.dtype(d).name for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {dt.name}")


def check_tokens(x, topk_idx, topk_weights, dtypes, name: str = "x") -> tuple:
    """Check x [T, H], topk_idx int [T, K] and optional topk_weights [T, K]; (T, H, K)."""
    check_shape(name, x, (None, None), "[T, H]")
    check_dtype(name, x, dtypes)
    T, H = x.shape
    check_shape("topk_idx", topk_idx, (T, None), "[T, K] with T = x.shape[0]")
    if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise TypeError(f"topk_idx must hold int32 expert ids, got dtype {topk_idx.dtype}")
    K = topk_idx.shape[1]
    if topk_weights is not None:
        check_shape("topk_weights", topk_weights, (T, K), "[T, K] like topk_idx")
        if not jnp.issubdtype(topk_weights.dtype, jnp.floating):
            raise TypeError(f"topk_weights must be float32, got dtype {topk_weights.dtype}")
    return T, H, K


def check_group_limits(num_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    """Group-limited gating (DeepSeek-V3): `n_group` groups of consecutive
    experts, top-k drawn from at most `topk_group` of them. Raises a ValueError
    naming the option that does not fit."""
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by n_group ({n_group})")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    per_group = num_experts // n_group
    if top_k > topk_group * per_group:
        raise ValueError(
            f"top_k={top_k} is more than the {topk_group * per_group} experts of "
            f"topk_group={topk_group} groups of {per_group}"
        )
