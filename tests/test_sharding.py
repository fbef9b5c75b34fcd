"""Meshes and transformations: 1-D, 2-D (independent groups), tuple axes, jit, scan,
checkpoint, and shard_map with its default check_vma=True (DESIGN 2 and 3.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ep_helpers as H
import oracle
from ep_helpers import NormalCfg, SETUPS

T, K, E, HD = 4, 2, 16, 8


def roundtrip_check(setup, cfg, kind, dtype, seed, Tn=T, Kn=K):
    rng = np.random.default_rng(seed)
    x, idx, w = H.global_inputs(rng, setup, Tn, Kn, cfg.num_experts, HD, H.DTYPES[dtype], kind)
    orc = H.oracle_normal(setup, cfg, x, idx, w)
    eo = H.make_expert_out(rng, setup, orc, HD, H.DTYPES[dtype])
    cw = rng.uniform(-1, 1, (setup.G * setup.R, orc[0].routing.C)).astype(np.float32)
    lib = H.run_normal(setup, cfg, x, idx, w, eo, cw)
    H.check_dispatch(lib, orc, cfg)
    H.assert_bits_equal(lib["y"], H.oracle_combine(setup, orc, eo, cfg, cw), "combine")


@pytest.mark.parametrize("setup", ["2d", "tuple"])
@pytest.mark.parametrize("layout", ["experts", "tokens"])
@pytest.mark.parametrize("cf,max_rows", [(None, None), (0.5, None), (None, 7)])
def test_meshes(setup, layout, cf, max_rows):
    cfg = NormalCfg(num_experts=E, layout=layout, capacity_factor=cf, max_rows=max_rows,
                    combine="none")
    roundtrip_check(SETUPS[setup], cfg, "mixed", "bfloat16", 1)


@settings(max_examples=8)
@given(st.sampled_from(["2d", "tuple"]), st.sampled_from(oracle.ROUTINGS),
       st.sampled_from([(1, 1, 8), (4, 2, 16), (3, 4, 32)]), st.integers(0, 2**31 - 1))
def test_meshes_property(setup, kind, shape, seed):
    Tn, Kn, En = shape
    cfg = NormalCfg(num_experts=En, combine="none")
    roundtrip_check(SETUPS[setup], cfg, kind, "float32", seed, Tn, Kn)


def test_2d_groups_are_independent():
    """In the 2x4 mesh, data row 1 sends nothing: row 0 must be unaffected, row 1 empty."""
    setup = SETUPS["2d"]
    rng = np.random.default_rng(0)
    x, idx, w = H.global_inputs(rng, setup, T, K, E, HD, np.float32, "distinct")
    idx[4:] = -1
    cfg = NormalCfg(num_experts=E)
    lib = H.run_normal(setup, cfg, x, idx, w)
    H.check_dispatch(lib, H.oracle_normal(setup, cfg, x, idx, w), cfg)
    assert not lib["group_sizes"][4:].any()
    assert lib["group_sizes"][:4].sum() == 4 * T * K


def test_tuple_axis_rank_order():
    """axis_name=("data", "ep"): rank = data * 4 + ep, as lax.axis_index gives it."""
    import jax_ep
    setup = SETUPS["tuple"]
    x = np.arange(8, dtype=np.float32).reshape(8, 1, 1) * np.ones((8, 1, HD), np.float32)
    idx = np.zeros((8, 1, 1), np.int32)
    idx[:, 0, 0] = np.arange(8)[::-1] * 2  # rank s sends to global expert 2*(7-s)

    def body(xx, ii):
        out = jax_ep.dispatch(xx, ii, num_experts=E, axis_name=("data", "ep"))
        return dict(x=out.x, me=jax.lax.axis_index(("data", "ep")), gs=out.group_sizes)

    lib = H.ep_call(setup, "tuple_order", body, x, idx)
    np.testing.assert_array_equal(lib["me"], np.arange(8))
    for r in range(8):
        assert lib["x"][r, 0, 0] == 7 - r  # expert 2r lives on rank r, sent by 7 - r
        np.testing.assert_array_equal(lib["gs"][r], [1, 0])


def test_scan_and_checkpoint_with_grad():
    """A 3-layer MoE stack under lax.scan and jax.checkpoint equals the oracle, and its
    gradient equals the same stack without scan/checkpoint."""
    import jax_ep
    setup = SETUPS["1d"]
    L = 3
    rng = np.random.default_rng(1)
    x = oracle.make_x(rng, (8, T, HD), np.float32)
    idx = np.stack([oracle.make_routing("mixed", rng, 8, T, K, E) for _ in range(L)], 1)
    w = rng.uniform(0, 1, (8, L, T, K)).astype(np.float32)
    scales = rng.uniform(0.5, 1.5, (8, L, HD)).astype(np.float32)

    def layer(h, ii, ww, sc):
        out = jax_ep.dispatch(h, ii, ww, num_experts=E, axis_name="ep", max_rows=40)
        return jax_ep.combine(out.x * sc, out.handle, weights=out.weights)

    def stack_scan(xx, is_, ws, scs):
        body = jax.checkpoint(lambda h, inp: (layer(h, *inp), None))
        return jax.lax.scan(body, xx, (is_, ws, scs))[0]

    def stack_plain(xx, is_, ws, scs):
        for i in range(L):
            xx = layer(xx, is_[i], ws[i], scs[i])
        return xx

    def with_grad(stack):
        def f(xx, is_, ws, scs):
            y, vjp = jax.vjp(lambda a, b: stack(a, is_, b, scs), xx, ws)
            gx, gw = vjp(jnp.ones_like(y))
            return dict(y=y, gx=gx, gw=gw)
        return f

    a = H.ep_call(setup, "stack_scan", with_grad(stack_scan), x, idx, w, scales)
    b = H.ep_call(setup, "stack_plain", with_grad(stack_plain), x, idx, w, scales)
    for k in ("gx", "gw"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # forward of both against the oracle, layer by layer
    h = x
    for i in range(L):
        o = oracle.dispatch(h, idx[:, i], w[:, i], num_experts=E, max_rows=40)
        ex = (o.x * scales[:, i][:, None, :]).astype(np.float32)
        h = oracle.combine(ex, o.routing, o.weights)
    H.assert_bits_equal(a["y"], h, "scan + checkpoint forward")
    H.assert_bits_equal(b["y"], h, "unrolled forward")


def test_jit_of_jit_and_static_shapes():
    """Output shapes are static and the same traced twice; nothing depends on values."""
    import jax_ep
    setup = SETUPS["1d"]

    def f(xx, ii):
        out = jax_ep.dispatch(xx, ii, num_experts=E, axis_name="ep", capacity_factor=1.0)
        return jax.tree.map(lambda v: v[None], (out.x, out.weights, out.group_sizes))

    sm = jax.shard_map(f, mesh=setup.mesh, in_specs=(setup.spec,) * 2, out_specs=setup.spec)
    a = jax.eval_shape(sm, jax.ShapeDtypeStruct((8 * T, HD), jnp.bfloat16),
                       jax.ShapeDtypeStruct((8 * T, K), jnp.int32))
    c = oracle.num_rows(T, K, E, 8, capacity_factor=1.0)
    assert a[0].shape == (8, c, HD) and a[0].dtype == jnp.bfloat16
    assert a[1].shape == (8, c) and a[1].dtype == jnp.float32
    assert a[2].shape == (8, E // 8) and a[2].dtype == jnp.int32
    x = np.ones((8 * T, HD), oracle.BF16)
    i = np.zeros((8 * T, K), np.int32)
    r1 = jax.jit(jax.jit(sm))(x, i)
    assert r1[0].shape == (8, c, HD)


def test_check_vma_default_is_on():
    """The helpers run shard_map with its default check_vma (True); make that explicit."""
    import inspect
    assert inspect.signature(jax.shard_map).parameters["check_vma"].default is True
    import jax_ep
    setup = SETUPS["1d"]

    def f(xx, ii):
        out = jax_ep.dispatch(xx, ii, num_experts=E, axis_name="ep")
        y = jax_ep.combine(out.x, out.handle, weights=out.weights)
        return y, out.handle.num_dropped[None]

    sm = jax.jit(jax.shard_map(f, mesh=setup.mesh, in_specs=(setup.spec,) * 2,
                               out_specs=setup.spec, check_vma=True))
    rng = np.random.default_rng(0)
    x, idx, _ = H.global_inputs(rng, setup, T, K, E, HD, np.float32, "distinct")
    y, nd = sm(x.reshape(-1, HD), idx.reshape(-1, K))
    assert y.shape == (8 * T, HD) and nd.shape == (8,)
