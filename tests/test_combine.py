"""combine against the oracle: the one summation order, rounded to the dtype, bit for bit."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ep_helpers as H
import oracle
from ep_helpers import NormalCfg, SETUPS
from test_dispatch import CAPACITIES, SHAPES

S1 = SETUPS["1d"]


@st.composite
def combine_cases(draw):
    T, K, E, Hd = draw(st.sampled_from(SHAPES))
    layout = draw(st.sampled_from(["experts", "tokens"]))
    cf = draw(st.sampled_from(CAPACITIES))
    full = oracle.num_rows(T, K, E, S1.R, layout=layout, capacity_factor=cf)
    max_rows = draw(st.sampled_from([None, None, max(1, full // 3)]))
    modes = ["none", "given"] + (["out"] if layout == "experts" else [])
    cfg = NormalCfg(num_experts=E, layout=layout, capacity_factor=cf, max_rows=max_rows,
                    has_weights=draw(st.booleans()), combine=draw(st.sampled_from(modes)))
    return (cfg, (T, K, E, Hd), draw(st.sampled_from(oracle.ROUTINGS)),
            draw(st.sampled_from(["float32", "bfloat16", "float16"])),
            draw(st.integers(0, 2**31 - 1)))


def run_combine(setup, cfg, shape, kind, dtype, seed, eo_dtype=None):
    T, K, E, Hd = shape
    rng = np.random.default_rng(seed)
    x, idx, w = H.global_inputs(rng, setup, T, K, E, Hd, H.DTYPES[dtype], kind)
    orc = H.oracle_normal(setup, cfg, x, idx, w)
    eo = H.make_expert_out(rng, setup, orc, Hd, H.DTYPES[eo_dtype or dtype])
    C = orc[0].routing.C
    cw = rng.uniform(-2, 2, size=(setup.G * setup.R, C)).astype(np.float32)
    lib = H.run_normal(setup, cfg, x, idx, w, eo, cw)
    expect = H.oracle_combine(setup, orc, eo, cfg, cw)
    H.assert_bits_equal(lib["y"], expect, "combine")
    return lib, expect


@settings(max_examples=12)
@given(combine_cases())
def test_combine_matches_oracle(case):
    run_combine(S1, *case)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("mode", ["none", "out"])
def test_combine_wire_rounding(dtype, mode):
    # Many experts per rank and K = E_local make long expert-side partial sums, so
    # rounding the partial to the dtype before the rank-order sum is visible.
    cfg = NormalCfg(num_experts=32, combine=mode)
    run_combine(S1, cfg, (6, 4, 32, 16), "distinct", dtype, 5)


def test_combine_order_is_visible():
    """Inputs built so that any other summation order gives different bits."""
    T, K, E, Hd = 1, 8, 8, 1
    x = np.ones((8, T, Hd), np.float32)
    idx = np.full((8, T, K), -1, np.int32)
    idx[0, 0] = np.arange(8)  # token 0 of rank 0 goes to all 8 ranks (1 expert each)
    cfg = NormalCfg(num_experts=E, has_weights=False)
    orc = H.oracle_normal(S1, cfg, x, idx)
    C = orc[0].routing.C
    eo = np.full((8, C, Hd), np.nan, np.float32)
    eo[:, 0, 0] = [1e8, 1.0, -1e8, 3.0, 1.0, 1.0, 1.0, 1.0]
    lib = H.run_normal(S1, cfg, x, idx, None, eo)
    # rank order: ((((1e8 + 1) - 1e8) + 3) + 1 + 1 + 1 + 1) = 7
    assert lib["y"][0, 0, 0] == np.float32(7.0)
    H.assert_bits_equal(lib["y"], H.oracle_combine(S1, orc, eo, cfg), "combine")


def test_expert_side_partial_rounds_before_rank_sum():
    # One token, 2 local experts on rank 0 and one on rank 1, bf16:
    # rank 0 partial 1 + 2**-8 ties to 1.0 in bf16; rank 1 adds 2**-8: 1 + 2**-8 -> 1.0.
    # Summing all three in float32 first would give 1 + 2**-7.
    E, Hd = 16, 1
    x = np.ones((8, 1, Hd), oracle.BF16)
    idx = np.full((8, 1, 3), -1, np.int32)
    idx[3, 0] = [0, 1, 2]
    cfg = NormalCfg(num_experts=E, has_weights=False)
    orc = H.oracle_normal(S1, cfg, x, idx)
    C = orc[0].routing.C
    eo = np.zeros((8, C, Hd), oracle.BF16)
    eo[0, 0], eo[0, 1], eo[1, 0] = 1.0, 2.0 ** -8, 2.0 ** -8
    lib = H.run_normal(S1, cfg, x, idx, None, eo)
    assert float(lib["y"][3, 0, 0]) == 1.0
    H.assert_bits_equal(lib["y"], H.oracle_combine(S1, orc, eo, cfg), "combine")


def test_overflowed_rows_add_nothing():
    cfg = NormalCfg(num_experts=16, max_rows=3, combine="out")
    run_combine(S1, cfg, (4, 2, 16, 8), "one_expert", "float32", 2)
    run_combine(S1, cfg, (4, 2, 16, 8), "zipf", "bfloat16", 3)


def test_combine_dtype_follows_expert_out():
    cfg = NormalCfg(num_experts=16)
    lib, _ = run_combine(S1, cfg, (4, 2, 16, 8), "distinct", "float32", 1, eo_dtype="bfloat16")
    assert lib["y"].dtype == oracle.BF16


def test_roundtrip_identity_experts():
    """combine(out.x, weights=out.weights) with identity experts is sum_k w_k * x."""
    T, K, E, Hd = 4, 2, 16, 8
    rng = np.random.default_rng(4)
    x, idx, w = H.global_inputs(rng, S1, T, K, E, Hd, np.float32, "distinct")
    cfg = NormalCfg(num_experts=E, combine="out")
    orc = H.oracle_normal(S1, cfg, x, idx, w)
    lib = H.run_normal(S1, cfg, x, idx, w, orc[0].x)
    np.testing.assert_allclose(lib["y"], (w.sum(-1, keepdims=True) * x), rtol=1e-5, atol=1e-5)
