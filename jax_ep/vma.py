"""Varying-manual-axes bookkeeping for `shard_map(check_vma=True)`."""

from __future__ import annotations

import jax


def vma(x) -> set:
    """The manual mesh axes x varies over (the attribute moved across JAX versions)."""
    t = jax.typeof(x)
    m = getattr(t, "manual_axis_type", None)
    if m is not None:
        return set(m.varying)
    return set(getattr(t, "vma", ()) or ())


def like_inputs(outs, *inputs):
    """Mark every leaf of `outs` as varying over all manual axes the `inputs` vary
    over (a custom call or a fresh constant carries no such annotation)."""
    axes = set()
    for x in jax.tree.leaves(inputs):
        axes |= vma(x)
    if not axes:
        return outs

    def fix(o):
        missing = tuple(sorted(axes - vma(o)))
        return jax.lax.pcast(o, missing, to="varying") if missing else o

    return jax.tree.map(fix, outs)
