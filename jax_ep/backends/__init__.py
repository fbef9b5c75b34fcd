"""Backend selection: "xla" (pure JAX), "cuda" (FFI kernels) or "auto".

"auto" is decided when the computation is lowered, per platform, with
`lax.platform_dependent`: a CUDA lowering uses the kernels, every other
platform the xla backend. It needs the compiled extension and a registered
`Buffer` for the axis; without them "auto" is the xla backend. In low-latency
mode "auto" is decided at trace time instead: the kernels when the axis's Buffer
lives on GPUs, else the xla backend. The choice is logged once per reason.
"""

from __future__ import annotations

import logging
import types
from typing import Optional

from jax import lax

from .. import config as config_lib
from . import xla

log = logging.getLogger("jax_ep")
_said: set = set()

BACKENDS = ("auto", "xla", "cuda")


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        log.info(msg)


def cuda_module():
    """The cuda backend module, or None when the extension is not built."""
    try:
        from . import cuda
    except ImportError:
        return None
    return cuda if cuda.available() else None


def select(backend: str, axis_name, buffer, *, mode: str, **shape) -> tuple:
    """Returns (kind, buffer_id) with kind in {"xla", "cuda", "auto"}. Without `shape`
    (a call whose size the Buffer bounds by itself, as all_reduce cuts its values
    into pieces) the kernels' shape limits and the Buffer's size are not checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "xla":
        return "xla", 0
    from ..buffer import lookup

    cuda = cuda_module()
    if cuda is None:
        if backend == "cuda":
            raise RuntimeError(
                "backend='cuda' needs the compiled jax_ep CUDA extension (jax_ep._ext); "
                "see BUILD.md, or use backend='xla'"
            )
        _say_once("jax_ep: backend 'auto' -> xla (the CUDA extension is not built)")
        return "xla", 0
    buf = lookup(axis_name, buffer, required=(backend == "cuda"))
    if mode == "low_latency" and backend == "auto" and buf is not None:
        # The split calls' pending values differ between the backends, so "auto"
        # cannot defer to lowering here: it follows the Buffer's devices.
        if buf.mesh.devices.flat[0].platform != "gpu":
            _say_once("jax_ep: low-latency mode with backend 'auto' -> xla (the Buffer is not on GPUs)")
            return "xla", 0
        backend = "cuda"
    if buf is None:
        _say_once(
            f"jax_ep: backend 'auto' -> xla for axis {axis_name!r} (no jax_ep.Buffer "
            "registered; create one to use the CUDA kernels)"
        )
        return "xla", 0
    from .cuda import MAX_TOP_K

    if shape and (shape["top_k"] > MAX_TOP_K or shape["hidden"] % 8):
        why = (f"top_k={shape['top_k']} (the kernels take at most {MAX_TOP_K})"
               if shape["top_k"] > MAX_TOP_K else f"hidden={shape['hidden']} (must be a multiple of 8)")
        if backend == "cuda":
            raise ValueError(f"backend='cuda' does not support {why}; use backend='xla'")
        _say_once(f"jax_ep: backend 'auto' -> xla: {why}")
        return "xla", 0
    if shape:
        buf.check_call(mode=mode, **shape)
    _say_once(f"jax_ep: backend {backend!r} -> CUDA kernels on GPUs for axis {axis_name!r}")
    return ("cuda" if backend == "cuda" else "auto"), buf.buffer_id


def num_sms(config, *, num_ranks=None, hidden=None, dtype=None, mode=None, kernel=None) -> int:
    """The SMs of one call (`config.resolve`: explicit Config, set_num_sms, the
    launcher's share, a tuned entry for (num_ranks, hidden, dtype, mode, kernel))."""
    return config_lib.resolve(config, num_ranks=num_ranks, hidden=hidden, dtype=dtype, mode=mode,
                              kernel=kernel).num_sms


def _auto(name: str, cuda):
    """A function that lowers to cuda.<name> on CUDA and xla.<name> elsewhere."""

    def call(*args, **kwargs):
        return lax.platform_dependent(
            *args,
            cuda=lambda *a: getattr(cuda, name)(*a, **kwargs),
            default=lambda *a: getattr(xla, name)(*a, **kwargs),
        )

    return call


def _impl(kind: str, names):
    if kind == "xla":
        return xla
    cuda = cuda_module()
    if cuda is None:
        raise RuntimeError("the jax_ep CUDA extension is not available in this process")
    if kind == "cuda":
        return cuda
    return types.SimpleNamespace(**{n: _auto(n, cuda) for n in names})


def normal_impl(meta):
    return _impl(meta.backend, ("dispatch", "combine", "redispatch"))


def low_latency_impl(meta):
    return _impl(
        meta.backend,
        ("ll_dispatch_send", "ll_dispatch_recv", "ll_combine_send", "ll_combine_recv"),
    )
