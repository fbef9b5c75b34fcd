"""`all_reduce`: a sum over the EP group that runs on jax_ep's own Buffer.

Training beside dispatch and combine needs a few reductions over the same group:
the data-parallel gradients of the replicated parameters, the loss, the experts'
load statistics. XLA's collectives do all of that on GPUs, except where they
cannot run: several processes sharing one GPU (layout 3 of DESIGN section 2),
where NCCL refuses duplicate devices. `all_reduce` runs there too.

    y = jax_ep.all_reduce(tree, axis_name="ep", buffer=buf)   # inside shard_map

Every leaf (any float or int dtype) is summed over the ranks of `axis_name` in
rank order (rank 0 + rank 1 + ...) in float32, and comes back in its own dtype,
the same bits on every rank. Integers are summed exactly up to 2**24 per element.

On the cuda backend the leaves travel as one float32 vector, cut into pieces
that fit the Buffer's staging region: per piece, each rank copies its values
into its buffer, signals every rank, waits for every rank's signal and reads all
stagings. The pieces are chained through their epochs, so they run in order.
It is meant for kilobytes to a few megabytes per step, not for a model's full
data-parallel traffic on real multi-GPU machines (XLA's collectives are better
there). The xla backend computes the same sum with `all_gather`.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import backends
from .checks import axis_size
from .config import Config
from .vma import like_inputs

_UNIT = 4  # values per 16-byte vector: pieces are padded to a multiple


def all_reduce(tree, *, axis_name, buffer=None, config: Optional[Config] = None,
               backend: str = "auto"):
    """Sum every leaf of `tree` over the ranks of `axis_name`. Call inside `shard_map`.

    Args:
      tree:      an array or pytree of arrays (float or int), this rank's values.
      axis_name: the EP mesh axis (or tuple of axes); the Buffer's group.
      buffer:    a `jax_ep.Buffer` (cuda backend); None: the "default" one of the axis.
      config:    a `jax_ep.Config` bounding the SMs of the kernels.
      backend:   "auto", "xla" or "cuda", as for `dispatch`.

    Returns the tree of sums, each leaf in its dtype, identical on every rank.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    for x in leaves:
        if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
            raise TypeError(f"all_reduce: leaves must be float or int arrays, got dtype {x.dtype}")
    R = axis_size(axis_name)
    flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
    kind, buffer_id = backends.select(backend, axis_name, buffer, mode="all_reduce")
    if kind == "xla" or (R == 1 and kind != "cuda"):
        total = _sum_fn(None, 0, 0, 0, axis_name, R)(flat)
    else:
        from .buffer import by_id

        offs = by_id(buffer_id).layout.offsets()
        piece = (offs["idx_stage0"] - offs["x_stage0"]) // 4 // _UNIT * _UNIT
        total = _sum_fn(kind, piece, buffer_id, backends.num_sms(config), axis_name, R)(flat)
    out, start = [], 0
    for x in leaves:
        size = math.prod(x.shape)
        v = total[start:start + size].reshape(x.shape)
        out.append(jnp.round(v).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.integer) else v.astype(x.dtype))
        start += size
    return jax.tree.unflatten(treedef, out)


def _sum_xla(flat, axis_name, R: int):
    """The reference sum: gather every rank's values, add them in rank order."""
    if R == 1:
        return flat
    got = lax.all_gather(flat, axis_name, axis=0, tiled=False)
    total = got[0]
    for r in range(1, R):
        total = total + got[r]
    return total


def _impl(kind: str):
    if kind == "cuda":
        return all_reduce_cuda

    def auto(x, epoch, **kw):
        return lax.platform_dependent(
            x, epoch,
            cuda=lambda a, b: all_reduce_cuda(a, b, **kw),
            default=lambda a, b: all_reduce_xla(a, b, **kw),
        )

    return auto


@functools.lru_cache(maxsize=None)
def _sum_fn(kind, piece: int, buffer_id: int, num_sms: int, axis_name, R: int):
    """flat float32 [n] -> its sum over the ranks; the gradient is the same sum of
    the cotangent (every rank's output depends on every rank's input)."""

    def total(flat):
        if kind is None:
            return _sum_xla(flat, axis_name, R)
        return _sum_pieces(flat, piece, _impl(kind), buffer_id, num_sms, axis_name, R)

    f = jax.custom_vjp(total)
    f.defvjp(lambda flat: (total(flat), None), lambda _, ct: (total(ct),))
    return f


def _sum_pieces(flat, piece: int, impl, buffer_id: int, num_sms: int, axis_name, R: int):
    n = flat.shape[0]
    if n == 0:
        return flat
    padded = -(-n // _UNIT) * _UNIT
    if padded != n:
        flat = jnp.concatenate([flat, jnp.zeros((padded - n,), jnp.float32)])
    epoch = like_inputs(jnp.zeros((1,), jnp.int32), flat)
    parts = []
    for start in range(0, padded, piece):
        part, epoch = impl(flat[start:start + piece], epoch, buffer_id=buffer_id, num_sms=num_sms,
                           axis_name=axis_name, num_ranks=R)
        parts.append(part)
    total = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    return total[:n]


def all_reduce_cuda(x, epoch, *, buffer_id: int, num_sms: int, axis_name=None, num_ranks=None):
    """One piece on the kernels: (sum, epoch)."""
    call = jax.ffi.ffi_call(
        "jax_ep_all_reduce",
        (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)),
        has_side_effect=True,
    )
    y, e = call(x, epoch, buffer_id=np.int64(buffer_id), num_sms=np.int64(num_sms))
    return like_inputs((y, e), x, epoch)


def all_reduce_xla(x, epoch, *, buffer_id: int = 0, num_sms: int = 0, axis_name=None, num_ranks=None):
    """One piece on the xla backend (the lowering of "auto" off CUDA)."""
    return _sum_xla(x, axis_name, num_ranks), epoch
