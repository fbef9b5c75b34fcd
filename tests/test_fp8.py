"""The FP8 quantizer (DESIGN 3.3) bit for bit, and FP8 dispatch (DESIGN 3.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ep_helpers as H
import oracle
from ep_helpers import NormalCfg, SETUPS

S1 = SETUPS["1d"]

_quantize = jax.jit(lambda x, rs: __import__("jax_ep").fp8.quantize(x, round_scale=rs),
                    static_argnums=1)


def lib_quantize(x, round_scale):
    q = _quantize(x, round_scale)
    return np.asarray(q.data), np.asarray(q.scales)


def special_rows(dtype):
    """Rows that catch double rounding, ties, subnormals, saturation and tiny blocks."""
    rows = np.zeros((6, 256), np.float32)
    rows[0, 0] = 448.0  # scale exactly 1 for the first block
    rows[0, 1] = 1.0625 + 2.0 ** -23  # float32 -> float16 -> e4m3 would round to 1.0
    rows[0, 2] = 1.0625  # tie: to even (1.0)
    rows[0, 3] = 1.5 * 2.0 ** -9  # subnormal tie
    rows[0, 4] = 2.0 ** -10  # half the smallest subnormal
    rows[0, 5] = -(2.0 ** -9)
    rows[0, 128:] = 1e-6  # a block under the 1e-4 clamp
    rows[1, :128] = np.linspace(-3.0, 3.0, 128)  # scale 3/448
    rows[1, 128:] = np.float32(1e30) * np.linspace(-1, 1, 128)
    rows[2] = np.float32(2.0 ** -20) * np.arange(256)
    rows[3, 7] = -1e-4  # amax exactly at the clamp
    rows[4] = np.float32(448.0 * 3) * np.sin(np.arange(256))  # scale 3 -> 4 with round_scale
    rows[5] = -0.0
    return rows.astype(dtype)


@pytest.mark.parametrize("round_scale", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_quantize_special_values(dtype, round_scale):
    x = special_rows(H.DTYPES[dtype])
    if dtype == "float16":
        x = np.nan_to_num(x, posinf=60000.0, neginf=-60000.0)
    d, s = lib_quantize(x, round_scale)
    ed, es = oracle.quantize(x, round_scale)
    H.assert_bits_equal(s, es, "scales")
    H.assert_bits_equal(d, ed, "data")


@given(st.integers(0, 2**31 - 1), st.sampled_from([(1, 128), (7, 256), (3, 2, 384)]),
       st.booleans(), st.sampled_from(["float32", "bfloat16"]))
def test_quantize_random(seed, shape, round_scale, dtype):
    rng = np.random.default_rng(seed)
    x = oracle.make_x(rng, shape, H.DTYPES[dtype])
    # and values in the e4m3 subnormal range after scaling
    x.reshape(-1)[:: 7] = (rng.standard_normal(x.size)[:: 7] * 1e-3).astype(x.dtype)
    d, s = lib_quantize(x, round_scale)
    ed, es = oracle.quantize(x, round_scale)
    H.assert_bits_equal(s, es, "scales")
    H.assert_bits_equal(d, ed, "data")
    assert not np.isnan(d.astype(np.float32)).any()


def test_round_scale_is_power_of_two():
    x = special_rows(np.float32)
    _, s = lib_quantize(x, True)
    m, _ = np.frexp(s)
    assert (m == 0.5).all()
    _, s0 = lib_quantize(x, False)
    assert (s >= s0).all() and (s < 2 * s0).all()


def test_dequantize_bits():
    import jax_ep
    rng = np.random.default_rng(1)
    x = oracle.make_x(rng, (5, 256), np.float32)
    q = jax_ep.fp8.quantize(jnp.asarray(x))
    expect = oracle.dequantize(np.asarray(q.data), np.asarray(q.scales))
    H.assert_bits_equal(np.asarray(jax.jit(jax_ep.fp8.dequantize)(q)), expect, "dequantize")
    H.assert_bits_equal(np.asarray(q.dequantize()), expect, "method")


def test_fp8array_is_a_pytree():
    import jax_ep
    a = jax_ep.Fp8Array(jnp.zeros((2, 128), jnp.float8_e4m3fn), jnp.ones((2, 1), jnp.float32))
    leaves, tree = jax.tree.flatten(a)
    assert len(leaves) == 2
    b = jax.jit(lambda v: v)(a)
    assert isinstance(b, jax_ep.Fp8Array) and b.data.dtype == jnp.float8_e4m3fn
    assert b.scales.shape == (2, 1)


# ----------------------------------------------------------------- FP8 dispatch

FP8_SHAPES = [(3, 2, 16, 128), (1, 1, 8, 256), (4, 4, 16, 128)]


@settings(max_examples=8)
@given(st.sampled_from(FP8_SHAPES), st.sampled_from(oracle.ROUTINGS),
       st.sampled_from(["experts", "tokens"]), st.sampled_from([None, "bfloat16"]),
       st.sampled_from([None, 0.5]), st.sampled_from(["bfloat16", "float32"]),
       st.integers(0, 2**31 - 1))
def test_fp8_dispatch_matches_oracle(shape, kind, layout, out_dtype, cf, dtype, seed):
    T, K, E, Hd = shape
    rng = np.random.default_rng(seed)
    cfg = NormalCfg(num_experts=E, layout=layout, capacity_factor=cf, fp8=True,
                    out_dtype=out_dtype)
    x, idx, w = H.global_inputs(rng, S1, T, K, E, Hd, H.DTYPES[dtype], kind)
    lib = H.run_normal(S1, cfg, x, idx, w)
    orc = H.oracle_normal(S1, cfg, x, idx, w)
    H.check_dispatch(lib, orc, cfg)
    if out_dtype is None:
        import jax_ep
        assert isinstance(lib["x"], jax_ep.Fp8Array)


def test_fp8_padding_rows_are_zero():
    T, K, E, Hd = 2, 1, 8, 128
    x = np.full((8, T, Hd), 3.0, oracle.BF16)
    idx = np.zeros((8, T, K), np.int32)  # everything to rank 0
    cfg = NormalCfg(num_experts=E, fp8=True, has_weights=False)
    lib = H.run_normal(S1, cfg, x, idx)
    H.check_dispatch(lib, H.oracle_normal(S1, cfg, x, idx), cfg)
    assert not lib["x"].data[1:].astype(np.float32).any()
    assert not lib["x"].scales[1:].any()
    assert not lib["x"].scales[0, 16:].any()


def test_nan_anywhere_in_a_block_makes_its_scale_nan():
    """The amax of a block with a NaN is NaN wherever the NaN sits (as in the kernels)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((128, 256)).astype(np.float32)
    x[np.arange(128), np.arange(128)] = np.nan          # block 0: a NaN at every position
    x[np.arange(128), 128 + (np.arange(128) * 7) % 128] = np.inf  # block 1: an Inf
    q = _quantize(jnp.asarray(x).astype(jnp.bfloat16), False)
    scales = np.asarray(q.scales)
    assert np.isnan(scales[:, 0]).all(), np.flatnonzero(~np.isnan(scales[:, 0]))
    assert np.isinf(scales[:, 1]).all()
    back = np.asarray(q.dequantize(jnp.float32))
    assert np.isnan(back).all()  # NaN data or 0 * inf: the whole block is NaN


# ------------------------------------------------- FP8 input (an Fp8Array, passed through)


@pytest.mark.parametrize("layout,out_dtype", [("experts", None), ("tokens", None),
                                              ("experts", jnp.bfloat16), ("tokens", jnp.float32)])
def test_fp8array_input_equals_quantize_in_the_call(layout, out_dtype):
    """dispatch(Fp8Array) moves the rows as they are: the same bits as fp8=True on
    the BF16 rows it came from, with no second quantization."""
    import jax_ep
    from jax.sharding import PartitionSpec as P

    T, K, E, Hd = 8, 2, 16, 256
    rng = np.random.default_rng(7)
    x, idx, w = H.global_inputs(rng, S1, T, K, E, Hd, oracle.BF16, "zipf")
    mesh = S1.mesh

    def run(pre):
        def body(x, idx, w):
            x, idx, w = x[0], idx[0], w[0]
            xin = jax_ep.fp8.quantize(x) if pre else x
            out = jax_ep.dispatch(xin, idx, w, num_experts=E, axis_name="ep", layout=layout,
                                  fp8=True, out_dtype=out_dtype, backend="xla")
            return jax.tree.map(lambda a: a[None], (out.x, out.weights, out.group_sizes,
                                                    out.handle.src_rows))

        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))
        return jax.tree.map(np.asarray, f(x, idx, w))

    got, want = run(True), run(False)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        H.assert_bits_equal(g, e, "Fp8Array input")


def test_fp8array_input_checks_and_has_no_gradient():
    import jax_ep
    from jax.sharding import PartitionSpec as P

    mesh = S1.mesh
    T, K, E, Hd = 4, 2, 16, 128
    x = np.ones((8, T, Hd), np.float32)
    idx = np.zeros((8, T, K), np.int32)

    def body(x, idx, bad_scales=False):
        q = jax_ep.fp8.quantize(x[0])
        if bad_scales:
            q = jax_ep.Fp8Array(q.data, q.scales[:, :0])
        out = jax_ep.dispatch(q, idx[0], num_experts=E, axis_name="ep", out_dtype=jnp.bfloat16,
                              backend="xla")
        return jnp.sum(out.x.astype(jnp.float32))[None]

    sm = lambda f: jax.shard_map(f, mesh=mesh, in_specs=(P("ep"),) * 2, out_specs=P("ep"))  # noqa: E731
    with pytest.raises(ValueError, match="x.scales"):
        jax.jit(sm(lambda a, b: body(a, b, bad_scales=True)))(x, idx)
    sums = np.asarray(jax.jit(sm(body))(x, idx))  # every token to expert 0 (rank 0), once
    np.testing.assert_array_equal(sums, [8 * T * Hd] + [0] * 7)
    with pytest.raises(TypeError, match="Fp8Array is not differentiable"):
        # the input is float32 here, so the gradient flows into quantize, then the call
        jax.jit(jax.grad(lambda a: jnp.sum(sm(body)(a, idx))))(x)
