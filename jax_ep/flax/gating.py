"""DeepSeek-V3 gating and the load statistics of auxiliary-loss-free balancing.

Plain functions on per-token arrays, shared by the expert-parallel layer and
the dense reference, so both route every token identically.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..checks import check_group_limits


class Routing(NamedTuple):
    """The routing of a batch of tokens.

    topk_idx:     int32 [T, K] global expert ids.
    topk_weights: float32 [T, K] combine weights (normalized, then scaled).
    scores:       float32 [T, E] sigmoid affinities, without the bias.
    """

    topk_idx: jax.Array
    topk_weights: jax.Array
    scores: jax.Array


def check_gating(num_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    """Raise a ValueError naming the option when the routing options do not fit."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    check_group_limits(num_experts, top_k, n_group, topk_group)


def deepseek_gating(
    logits: jax.Array,
    bias: jax.Array,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> Routing:
    """DeepSeek-V3 routing of `logits` [T, E].

    Affinities are `sigmoid(logits)` in float32. The bias [E] only decides
    which experts are chosen (it is the balancing knob and gets no gradient);
    the weights come from the unbiased affinities. With `n_group > 1` the
    experts form `n_group` contiguous groups, each scored by the sum of its
    two best biased affinities, and a token picks its experts only from its
    `topk_group` best groups. Weights are normalized to sum to one when
    `norm_topk_prob`, then multiplied by `routed_scaling_factor`.
    """
    t, e = logits.shape
    check_gating(e, top_k, n_group, topk_group)
    per_group = e // n_group
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + jax.lax.stop_gradient(bias.astype(jnp.float32))[None, :]
    if n_group > 1:
        grouped = choice.reshape(t, n_group, per_group)
        best = jax.lax.top_k(grouped, min(2, per_group))[0]
        group_scores = jnp.sum(best, axis=-1)  # [T, n_group]
        _, top_groups = jax.lax.top_k(group_scores, topk_group)
        keep = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], top_groups].set(True)
        keep = jnp.repeat(keep, per_group, axis=1)
        choice = jnp.where(keep, choice, -jnp.inf)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(choice), top_k)
    weights = jnp.take_along_axis(scores, idx, axis=1)
    if norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=1, keepdims=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return Routing(idx.astype(jnp.int32), weights, scores)


def expert_load(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """int32 [E]: how many (token, slot) pairs chose each expert (-1 slots ignored)."""
    flat = topk_idx.reshape(-1)
    flat = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    return jnp.zeros((num_experts,), jnp.int32).at[flat].add(1, mode="drop")


def max_violation(load: jax.Array) -> jax.Array:
    """float32 []: max(load) / mean(load) - 1; 0 is perfectly balanced."""
    load = load.astype(jnp.float32)
    mean = jnp.mean(load)
    return jnp.where(mean > 0, jnp.max(load) / jnp.maximum(mean, 1e-20) - 1.0, 0.0)


def bias_step(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """One auxiliary-loss-free balancing step: each expert's bias moves by
    `rate` toward balance, down when its load is above the mean, up when below."""
    load = load.astype(jnp.float32)
    delta = jnp.sign(jnp.mean(load) - load)
    return (bias + rate * delta).astype(bias.dtype)
