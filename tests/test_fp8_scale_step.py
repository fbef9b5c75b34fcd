"""The block scale of the FP8 kernels (rows.cuh, fp8_scale): for a finite amax of at
least kAmaxMin, one Markstein step from the rounded reciprocal of 448,

    q0 = RN(amax * r),  e = RN(amax - 448 * q0),  scale = RN(q0 + e * r),  r = RN(1 / 448),

equals RN(amax / 448), the division of the xla backend. Checked here for every such
float32, on the host: the products and the residual are exact in float64, and where a
float64 result could sit on a float32 rounding midpoint (double rounding) the value
is recomputed exactly with fractions. tests/gpu/test_fp8_gpu.py checks the kernel's
own arithmetic the same way on the GPU."""

from fractions import Fraction

import numpy as np

F32, F64 = np.float32, np.float64
R32 = F32(1.0) / F32(448.0)
LO, HI = int(F32(1e-4).view(np.uint32)), 0x7F7FFFFF
MID, MASK = np.uint64(0x10000000), np.uint64(0x1FFFFFFF)  # a float32 midpoint in a float64


def _rn32(fr: Fraction) -> np.float32:
    """A positive fraction rounded to the nearest float32, ties to even."""
    c = F32(float(fr))
    cands = (np.nextafter(c, F32(0)), c, np.nextafter(c, F32(np.inf)))
    return min(cands, key=lambda v: (abs(Fraction(float(v)) - fr), int(v.view(np.uint32)) & 1))


def _step_exact(a: float) -> np.float32:
    r = Fraction(float(R32))
    q0 = _rn32(Fraction(a) * r)
    e = Fraction(a) - 448 * Fraction(float(q0))
    e32 = F32(0.0) if e == 0 else (_rn32(e) if e > 0 else -_rn32(-e))
    return _rn32(Fraction(float(e32)) * r + Fraction(float(q0)))


def test_scale_step_is_the_division_for_every_finite_amax():
    r = F64(R32)
    checked = rechecked = 0
    for start in range(LO, HI + 1, 1 << 23):
        bits = np.arange(start, min(start + (1 << 23), HI + 1), dtype=np.uint32)
        a32 = bits.view(F32)
        a = a32.astype(F64)
        q0 = (a * r).astype(F32)  # a * r is exact in float64
        e32 = (a - 448.0 * q0.astype(F64)).astype(F32)  # the residual is exact in float64
        s = e32.astype(F64) * r + q0.astype(F64)
        d = a / 448.0
        suspect = ((s.view(np.uint64) & MASK) == MID) | ((d.view(np.uint64) & MASK) == MID)
        differ = s.astype(F32).view(np.uint32) != d.astype(F32).view(np.uint32)
        for i in np.nonzero(suspect | differ)[0]:
            rechecked += 1
            v = float(a32[i])
            assert _step_exact(v).view(np.uint32) == _rn32(Fraction(v) / 448).view(np.uint32), v
        checked += len(bits)
    assert checked == HI - LO + 1
    assert rechecked == 0  # no value needed the exact path, and none differs


def test_the_exact_path_agrees_on_samples():
    rng = np.random.default_rng(0)
    for b in rng.integers(LO, HI, 200, dtype=np.uint32):
        v = float(np.uint32(b).view(F32))
        assert _step_exact(v).view(np.uint32) == _rn32(Fraction(v) / 448).view(np.uint32), v
