"""The one FP8 quantizer of jax_ep (DESIGN 3.3), shared bit for bit with the kernels.

Per token and 128-channel block: ``amax = max(|x|)`` in float32, clamped below at
1e-4; ``scale = amax / 448`` (or the next power of two with ``round_scale``);
``data = float8_e4m3fn(x / scale)`` by IEEE division, round to nearest even,
saturating. Dequantize is ``float32(data) * scale``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

BLOCK = 128
FP8_MAX = 448.0
AMAX_MIN = 1e-4
DTYPE = jnp.float8_e4m3fn


class Fp8Array(NamedTuple):
    """FP8 rows with per-128-channel scales.

    data:   float8_e4m3fn [..., H]
    scales: float32 [..., H // 128]
    """

    data: jax.Array
    scales: jax.Array

    @property
    def shape(self):
        return self.data.shape

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


def _check_hidden(h: int, name: str = "x") -> None:
    if h % BLOCK:
        raise ValueError(
            f"{name}: FP8 needs the hidden size to be a multiple of {BLOCK}, got {h}"
        )


def round_to_pow2(scale: jax.Array) -> jax.Array:
    """2**ceil(log2(scale)) for positive normal float32, computed on the bits.

    A power of two keeps its bits; anything else drops its mantissa and moves
    up one binade. (A log2 in floating point could land on the wrong side.)
    """
    bits = jax.lax.bitcast_convert_type(scale, jnp.uint32)
    exp = bits & jnp.uint32(0x7F800000)
    mant = bits & jnp.uint32(0x007FFFFF)
    up = jnp.where(mant != 0, exp + jnp.uint32(0x00800000), exp)
    out = jax.lax.bitcast_convert_type(up, jnp.float32)
    return jnp.where(jnp.isfinite(scale), out, scale)


def block_scales(x: jax.Array, round_scale: bool = False) -> jax.Array:
    """float32 [..., H // 128] scales of x [..., H]."""
    h = x.shape[-1]
    _check_hidden(h)
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], h // BLOCK, BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    amax = jnp.maximum(amax, jnp.float32(AMAX_MIN))
    scale = amax / jnp.float32(FP8_MAX)
    if round_scale:
        scale = round_to_pow2(scale)
    return scale


def quantize(x: jax.Array, round_scale: bool = False) -> Fp8Array:
    """Quantize x [..., H] (H a multiple of 128) to an `Fp8Array`."""
    scales = block_scales(x, round_scale)
    h = x.shape[-1]
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], h // BLOCK, BLOCK)
    q = xb / scales[..., None]
    q = jnp.clip(q, -FP8_MAX, FP8_MAX)  # saturate; NaN stays NaN
    data = q.astype(DTYPE).reshape(x.shape)
    return Fp8Array(data, scales)


def dequantize(a: Fp8Array, dtype=jnp.float32) -> jax.Array:
    """float32(data) * scale, cast to `dtype` (float32 by default)."""
    h = a.data.shape[-1]
    d = a.data.astype(jnp.float32).reshape(*a.data.shape[:-1], h // BLOCK, BLOCK)
    out = (d * a.scales[..., None]).reshape(a.data.shape)
    return out.astype(dtype)
