"""The kernels' FP8 quotient (one reciprocal per block and a correction step)
against IEEE division on the GPU: every pair of BF16 values and of FP16 values
(element, block maximum), and float32 samples near e4m3's rounding midpoints.
The xla backend divides; a single differing byte would break bit-exactness."""

import jax
import numpy as np
import pytest


def _device() -> int:
    gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
    return gpus[0].local_hardware_id


@pytest.mark.parametrize("round_scale", [False, True])
# (x, amax) pairs with |x| <= amax: every finite BF16 / FP16 pair (counted on the
# host with numpy), or at least this many float32 samples.
@pytest.mark.parametrize("kind,pairs_want", [("bf16", 1065402240), ("fp16", 1007713280), ("fp32", None)])
def test_fp8_quotient_is_the_division(kind, pairs_want, round_scale):
    from jax_ep import _ext

    pairs, fp8, quotient = _ext.fp8_quotient_check(kind, round_scale, _device())
    if pairs_want is None:
        assert pairs >= 2**29, (kind, pairs)
    else:
        assert pairs == pairs_want, (kind, pairs)
    assert (fp8, quotient) == (0, 0), f"{kind} round_scale={round_scale}: {fp8} e4m3 bytes and " \
                                      f"{quotient} quotients of {pairs} differ from the division"


@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_scale_is_the_division(round_scale):
    """Every block scale from a finite amax (kAmaxMin up to float32's largest) is
    amax / 448 rounded to nearest, as the xla backend divides."""
    from jax_ep import _ext

    values, _, bad = _ext.fp8_quotient_check("scale", round_scale, _device())
    lo = int(np.float32(1e-4).view(np.uint32))
    assert values == 0x7F7FFFFF - lo + 1, values
    assert bad == 0, f"round_scale={round_scale}: {bad} of {values} scales differ from the division"
