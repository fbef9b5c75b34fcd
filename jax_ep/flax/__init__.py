"""Flax NNX layers on jax_ep: `MoE`, its dense reference and bias balancing.

The layer needs `flax` (`pip install jax-ep[flax]`); the gating functions in
`jax_ep.flax.gating` are plain JAX and import without it.
"""

from .gating import Routing, bias_step, check_gating, deepseek_gating, expert_load, max_violation

_LAYER = ("BalanceBias", "MoE", "MoEStats", "dense_reference", "ll_experts", "swiglu", "update_bias")

__all__ = [
    "Routing", "bias_step", "check_gating", "deepseek_gating", "expert_load", "max_violation",
    *_LAYER,
]


def __getattr__(name):
    # The layer imports flax; load it on first use so the gating works without it.
    if name in _LAYER:
        from . import moe

        return getattr(moe, name)
    raise AttributeError(f"module 'jax_ep.flax' has no attribute {name!r}")
