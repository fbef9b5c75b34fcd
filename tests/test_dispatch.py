"""dispatch against the NumPy oracle, row for row and bit for bit (DESIGN 3.1)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ep_helpers as H
import oracle
from ep_helpers import NormalCfg, SETUPS

S1 = SETUPS["1d"]
# (T, K, E, H) with R = 8: T=1/K=1, K = E_local, K > E_local, a wider one.
SHAPES = [(1, 1, 8, 4), (4, 2, 16, 8), (5, 4, 16, 8), (8, 3, 32, 8), (3, 2, 8, 4)]
CAPACITIES = [None, None, 0.01, 0.5, 1.0, 2.0]


@st.composite
def normal_cases(draw):
    T, K, E, Hd = draw(st.sampled_from(SHAPES))
    kind = draw(st.sampled_from(oracle.ROUTINGS))
    layout = draw(st.sampled_from(["experts", "tokens"]))
    cf = draw(st.sampled_from(CAPACITIES))
    full = oracle.num_rows(T, K, E, S1.R, layout=layout, capacity_factor=cf)
    max_rows = draw(st.sampled_from([None, None, max(1, full // 4), max(1, full // 2)]))
    cfg = NormalCfg(num_experts=E, layout=layout, capacity_factor=cf, max_rows=max_rows,
                    has_weights=draw(st.booleans()))
    dtype = draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return cfg, (T, K, E, Hd), kind, dtype, seed


def run_and_check(setup, cfg, shape, kind, dtype, seed):
    T, K, E, Hd = shape
    rng = np.random.default_rng(seed)
    x, idx, w = H.global_inputs(rng, setup, T, K, E, Hd, H.DTYPES[dtype], kind)
    lib = H.run_normal(setup, cfg, x, idx, w)
    orc = H.oracle_normal(setup, cfg, x, idx, w)
    H.check_dispatch(lib, orc, cfg)
    return lib, orc


@settings(max_examples=12)
@given(normal_cases())
def test_dispatch_matches_oracle(case):
    cfg, shape, kind, dtype, seed = case
    lib, orc = run_and_check(S1, cfg, shape, kind, dtype, seed)
    C = orc[0].routing.C
    gs = lib["group_sizes"]
    if cfg.layout == "experts":
        assert (gs.sum(axis=1) <= C).all()
        # rows past sum(group_sizes) are zero
        for r in range(S1.R):
            assert not np.asarray(lib["x"][r, gs[r].sum():], np.float32).any()


@pytest.mark.parametrize("layout", ["experts", "tokens"])
@pytest.mark.parametrize("kind", ["one_expert", "all_minus1", "skip_ranks", "repeated",
                                  "invalid", "zipf"])
def test_dispatch_routings(layout, kind):
    cfg = NormalCfg(num_experts=16, layout=layout)
    run_and_check(S1, cfg, (4, 2, 16, 8), kind, "bfloat16", 7)


def test_every_token_to_one_expert_overflows_in_order():
    # 8 ranks x 4 tokens all to expert 5 (rank 2); max_rows 10 keeps ranks 0, 1, 2's
    # first two tokens (source rank, then token order) and counts 22 overflowed rows.
    T, K, E = 4, 2, 16
    x = np.arange(8 * T * 8, dtype=np.float32).reshape(8, T, 8)
    idx = np.full((8, T, K), -1, np.int32)
    idx[:, :, 1] = 5
    cfg = NormalCfg(num_experts=E, max_rows=10, has_weights=False)
    lib = H.run_normal(S1, cfg, x, idx)
    H.check_dispatch(lib, H.oracle_normal(S1, cfg, x, idx), cfg)
    np.testing.assert_array_equal(lib["num_overflow"].reshape(-1), [0, 0, 22, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(lib["group_sizes"][2], [0, 10])
    np.testing.assert_array_equal(lib["x"][2], x[:, :, :].reshape(-1, 8)[:10])
    np.testing.assert_array_equal(lib["weights"][2], np.ones(10, np.float32))
    assert not lib["dropped"].any()


def test_invalid_ids_counted_on_sender():
    T, K, E = 2, 2, 8
    x = np.ones((8, T, 4), np.float32)
    idx = np.full((8, T, K), -1, np.int32)
    idx[0] = [[8, -2], [3, 100]]  # three invalid, -1 is never counted
    idx[3] = [[-1, -1], [-(2**31), 0]]
    cfg = NormalCfg(num_experts=E)
    lib = H.run_normal(S1, cfg, x, idx, np.ones((8, T, K), np.float32))
    np.testing.assert_array_equal(lib["num_invalid"].reshape(-1), [3, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(lib["group_sizes"].reshape(-1),
                                  [1, 0, 0, 1, 0, 0, 0, 0])


def test_repeated_ids_make_one_row_with_summed_weight():
    T, K, E = 1, 3, 8
    x = np.ones((8, T, 4), np.float32)
    idx = np.full((8, T, K), -1, np.int32)
    idx[1, 0] = [6, 6, 6]
    w = np.zeros((8, T, K), np.float32)
    w[1, 0] = [0.1, 0.2, 0.3]
    for layout in ("experts", "tokens"):
        cfg = NormalCfg(num_experts=E, layout=layout)
        lib = H.run_normal(S1, cfg, x, idx, w)
        H.check_dispatch(lib, H.oracle_normal(S1, cfg, x, idx, w), cfg)
        assert lib["group_sizes"][6].tolist() == [1]
    lib = H.run_normal(S1, NormalCfg(num_experts=E), x, idx, w)
    expect = np.float32(np.float32(np.float32(-0.0 + np.float32(0.1)) + np.float32(0.2))
                        + np.float32(0.3))
    assert lib["weights"][6, 0] == expect


def test_repeated_ids_without_weights_count_their_slots():
    """docs/semantics.md: without topk_weights every slot weighs 1.0, so the row of an
    expert listed twice weighs 2.0 (y = sum_k w_k * f_k(x))."""
    T, K, E = 1, 2, 8
    x = np.ones((8, T, 4), np.float32)
    idx = np.full((8, T, K), -1, np.int32)
    idx[0, 0] = [3, 3]
    cfg = NormalCfg(num_experts=E, has_weights=False)
    lib = H.run_normal(S1, cfg, x, idx)
    assert lib["weights"][3, 0] == 2.0


def test_no_weights_gives_unit_weights():
    rng = np.random.default_rng(3)
    x, idx, _ = H.global_inputs(rng, S1, 4, 2, 16, 8, np.float32, "distinct")
    lib = H.run_normal(S1, NormalCfg(num_experts=16, has_weights=False), x, idx)
    for r in range(8):
        n = lib["group_sizes"][r].sum()
        np.testing.assert_array_equal(lib["weights"][r, :n], 1.0)
        np.testing.assert_array_equal(lib["weights"][r, n:], 0.0)


@pytest.mark.parametrize("layout", ["experts", "tokens"])
def test_capacity_is_per_sender_and_fair(layout):
    # Every rank sends all 8 tokens to expert 0; c = ceil(0.5 * 8 * 1 / 8) = 1.
    T, K, E = 8, 1, 8
    x = oracle.make_x(np.random.default_rng(0), (8, T, 4), np.float32)
    idx = np.zeros((8, T, K), np.int32)
    cfg = NormalCfg(num_experts=E, layout=layout, capacity_factor=0.5, has_weights=False)
    lib = H.run_normal(S1, cfg, x, idx)
    H.check_dispatch(lib, H.oracle_normal(S1, cfg, x, idx), cfg)
    assert lib["x"].shape[1] == (8 if layout == "experts" else 8)
    np.testing.assert_array_equal(lib["num_dropped"].reshape(-1), np.full(8, 7))
    np.testing.assert_array_equal(lib["dropped"][:, :, 0], np.tile([False] + [True] * 7, (8, 1)))
    np.testing.assert_array_equal(lib["x"][0], x[:, 0])


def test_capacity_factor_zero_means_one_token_per_expert():
    """c = max(1, ceil(f*T*K/E)) is defined for f = 0 (c = 1); only f < 0 is bad input."""
    cfg = NormalCfg(num_experts=16, capacity_factor=0.0)
    run_and_check(S1, cfg, (4, 2, 16, 8), "zipf", "float32", 9)


@pytest.mark.parametrize("T,K,E,R", [(4, 2, 16, 8), (5, 4, 16, 8), (1, 1, 8, 8),
                                     (7, 6, 64, 4), (128, 8, 256, 8)])
@pytest.mark.parametrize("layout", ["experts", "tokens"])
@pytest.mark.parametrize("cf", [None, 0.0, 1.0, 1.25])
def test_rows_needed(T, K, E, R, layout, cf):
    import jax_ep
    assert jax_ep.rows_needed(T, K, E, R, layout=layout, capacity_factor=cf) == \
        oracle.num_rows(T, K, E, R, layout=layout, capacity_factor=cf)
    assert jax_ep.rows_needed(T, K, E, R, layout=layout, capacity_factor=cf, max_rows=17) == 17


def test_group_sizes_feed_ragged_dot():
    """dispatch -> jax.lax.ragged_dot -> combine equals a dense MoE layer."""
    import jax
    import jax.numpy as jnp
    import jax_ep

    T, K, E, Hd, F = 6, 2, 16, 8, 8
    rng = np.random.default_rng(11)
    x, idx, w = H.global_inputs(rng, S1, T, K, E, Hd, np.float32, "distinct")
    Wexp = rng.standard_normal((E, Hd, F)).astype(np.float32) / 4

    def body(xx, ii, ww, we):
        out = jax_ep.dispatch(xx, ii, ww, num_experts=E, axis_name="ep")
        h = jax.lax.ragged_dot(out.x, we, out.group_sizes)
        return jax_ep.combine(h, out.handle, weights=out.weights)

    Wl = Wexp.reshape(8, E // 8, Hd, F)
    y = H.ep_call(S1, "ragged", body, x, idx, w, Wl)
    ref = np.zeros((8, T, F), np.float64)
    for s in range(8):
        for t in range(T):
            for k in range(K):
                ref[s, t] += w[s, t, k] * (x[s, t].astype(np.float64) @ Wexp[idx[s, t, k]])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
