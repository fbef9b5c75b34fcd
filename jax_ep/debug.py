"""The debug switch: turn silent data loss into errors while developing.

By default `dispatch` only counts what it could not deliver (`handle.num_invalid`
for expert ids outside [-1, E), `handle.num_overflow` for rows past `max_rows`),
as DESIGN 3.1 specifies, and never stops a step. With the switch on
(`jax_ep.debug.enable()` or `JAX_EP_DEBUG=1` in the environment, read when a call
is traced) every traced `dispatch` and `low_latency_dispatch_send` also checks
those counts at run time and raises (an XLA runtime error naming the call and
the counts) when any is non-zero. The check is a host callback, so it syncs
with the host once per call: use it for debugging, not in production.
Capacity drops (`capacity_factor`) are intended and never raise.

Every rank must stop together, or the others would wait for it inside the next
exchange: on the xla backend (and with backend="auto") the counts are first
summed over the EP axis (`psum`), so all ranks raise at the same point. The CUDA
kernels (backend="cuda") need no XLA collective (several processes may share one
GPU, where those cannot run): there the rank that lost data raises, and its peers
end at their next wait with the deadline error that names it (DESIGN 3.4).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp

_ENABLED: Optional[bool] = None


def enable(on: Optional[bool] = True) -> None:
    """Turn the debug checks on (or off) for calls traced from now on; None
    hands the choice back to JAX_EP_DEBUG."""
    global _ENABLED
    _ENABLED = None if on is None else bool(on)


def enabled() -> bool:
    """Whether calls traced now get the checks (`enable` wins over JAX_EP_DEBUG)."""
    if _ENABLED is not None:
        return _ENABLED
    return os.environ.get("JAX_EP_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


class DebugCheckError(ValueError):
    """Raised (inside the runtime error) when a checked call lost data."""


def check_counts(where: str, num_invalid: jax.Array, num_overflow: Optional[jax.Array] = None, *,
                 axis_name=None, backend: str = "xla") -> None:
    """Raise at run time when `num_invalid` or `num_overflow` is non-zero (switch on only)."""
    if not enabled():
        return
    ovf = jnp.zeros((), jnp.int32) if num_overflow is None else num_overflow
    if backend != "cuda" and axis_name is not None:
        num_invalid, ovf = jax.lax.psum((num_invalid, ovf), axis_name)
        where = f"{where} (summed over the ranks)"

    def raise_if_lost(inv, over):
        inv, over = int(inv), int(over)
        if inv or over:
            raise DebugCheckError(
                f"jax_ep debug: {where}: {inv} expert id(s) outside [-1, num_experts) and "
                f"{over} row(s) past max_rows were dropped (JAX_EP_DEBUG is on)")

    jax.debug.callback(raise_if_lost, num_invalid, ovf)
