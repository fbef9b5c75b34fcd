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


def _split(bits):
    """(normalized 24-bit significand, unbiased exponent) of finite nonzero float32 bits."""
    e = ((bits >> 23) & 0xFF).astype(jnp.int32)
    m = bits & jnp.uint32(0x7FFFFF)
    m = jnp.where(e > 0, m | jnp.uint32(0x800000), m)
    shift = jnp.maximum(jax.lax.clz(m).astype(jnp.int32) - 8, 0)  # subnormals: normalize
    return m << shift.astype(jnp.uint32), jnp.where(e > 0, e, 1) - shift - 127


def exact_div(x: jax.Array, y: jax.Array) -> jax.Array:
    """IEEE float32 x / y, rounded to nearest even, for any XLA backend.

    XLA rewrites a division by a constant or a broadcast into a multiplication by
    the reciprocal, which is not the correctly rounded quotient. The kernels
    divide exactly, so the reference does too: a long division of the
    significands in uint32 arithmetic. Quotients below the float32 normal range,
    zeros, infinities and NaNs (where the rewrite cannot differ in a way that
    survives FP8 rounding, or is exact) take the plain division.
    """
    x, y = jnp.broadcast_arrays(x.astype(jnp.float32), y.astype(jnp.float32))
    bx = jax.lax.bitcast_convert_type(x, jnp.uint32)
    by = jax.lax.bitcast_convert_type(y, jnp.uint32)
    sign = (bx ^ by) & jnp.uint32(0x80000000)
    mx, ex = _split(bx)
    my, ey = _split(by)

    def step(_, rq):  # one quotient bit; a loop keeps each step a small kernel
        r, q = rq
        bit = r >= my
        return jnp.where(bit, r - my, r) << 1, (q << 1) | bit.astype(jnp.uint32)

    # q = floor(mx * 2**25 / my), in [2**24, 2**26)
    r, q = jax.lax.fori_loop(0, 26, step, (mx, jnp.zeros_like(mx)))
    sticky = r != 0
    top = q >= (1 << 25)
    mant = jnp.where(top, q >> 2, q >> 1)
    guard = jnp.where(top, (q >> 1) & 1, q & 1) != 0
    rest = jnp.where(top, (q & 1) != 0, False) | sticky
    mant = mant + (guard & (rest | ((mant & 1) != 0))).astype(jnp.uint32)
    exp = ex - ey + 127 - jnp.where(top, 0, 1)
    carry = mant >= (1 << 24)
    mant = jnp.where(carry, mant >> 1, mant)
    exp = exp + carry.astype(jnp.int32)
    bits = sign | (exp.astype(jnp.uint32) << 23) | (mant & jnp.uint32(0x7FFFFF))
    exact = jax.lax.bitcast_convert_type(bits, jnp.float32)
    ok = jnp.isfinite(x) & jnp.isfinite(y) & (x != 0) & (y != 0) & (exp >= 1) & (exp <= 254)
    return jnp.where(ok, exact, x / y)


def block_scales(x: jax.Array, round_scale: bool = False) -> jax.Array:
    """float32 [..., H // 128] scales of x [..., H]."""
    h = x.shape[-1]
    _check_hidden(h)
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], h // BLOCK, BLOCK)
    # A NaN anywhere makes the block's amax NaN. XLA's max reduction does not
    # promise that (its CPU backend drops a NaN met in some lane orders), so it
    # is said explicitly, as the kernels do.
    amax = jnp.max(jnp.abs(xb), axis=-1)
    amax = jnp.where(jnp.any(jnp.isnan(xb), axis=-1), jnp.float32(jnp.nan), amax)
    amax = jnp.where(amax < AMAX_MIN, jnp.float32(AMAX_MIN), amax)  # NaN stays NaN
    scale = exact_div(amax, jnp.float32(FP8_MAX))
    if round_scale:
        scale = round_to_pow2(scale)
    return scale


def round_to_e4m3(v: jax.Array) -> jax.Array:
    """float32 -> the nearest e4m3fn value (ties to even, saturating), still float32.

    Done on the float32 bits, so it rounds once: a compiler's float32 -> float8
    conversion may go through float16 and round twice.
    """
    v = jnp.clip(v, -FP8_MAX, FP8_MAX)  # saturate; NaN stays NaN
    exp = ((jax.lax.bitcast_convert_type(v, jnp.uint32) >> 23) & 0xFF).astype(jnp.int32) - 127
    q_exp = jnp.maximum(exp, -6) - 3  # 3 mantissa bits; subnormal step 2**-9
    quantum = jax.lax.bitcast_convert_type(((q_exp + 127) << 23).astype(jnp.uint32), jnp.float32)
    # v / quantum as v * (1 / quantum): both exact, quantum being a power of two
    inv = jax.lax.bitcast_convert_type(((127 - q_exp) << 23).astype(jnp.uint32), jnp.float32)
    return jnp.round(v * inv) * quantum


def quantize(x: jax.Array, round_scale: bool = False) -> Fp8Array:
    """Quantize x [..., H] (H a multiple of 128) to an `Fp8Array`."""
    scales = block_scales(x, round_scale)
    h = x.shape[-1]
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], h // BLOCK, BLOCK)
    q = round_to_e4m3(exact_div(xb, scales[..., None]))
    data = q.astype(DTYPE).reshape(x.shape)  # exact: q is an e4m3 value
    return Fp8Array(data, scales)


def dequantize(a: Fp8Array, dtype=jnp.float32) -> jax.Array:
    """float32(data) * scale, cast to `dtype` (float32 by default)."""
    h = a.data.shape[-1]
    d = a.data.astype(jnp.float32).reshape(*a.data.shape[:-1], h // BLOCK, BLOCK)
    out = (d * a.scales[..., None]).reshape(a.data.shape)
    return out.astype(dtype)
