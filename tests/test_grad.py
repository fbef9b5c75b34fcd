"""Gradients (DESIGN 3.1): custom_vjp rules, checked numerically and against the oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import ep_helpers as H
import oracle
from ep_helpers import NormalCfg, SETUPS

S1 = SETUPS["1d"]
T, K, E, HD = 3, 2, 16, 4


def _shard(setup, f, n_in):
    spec = setup.spec
    return jax.jit(jax.shard_map(f, mesh=setup.mesh, in_specs=(spec,) * n_in, out_specs=spec))


@functools.lru_cache(maxsize=None)
def grad_fns(layout, cf, max_rows):
    """Global functions of float32 inputs (flattened over ranks) for check_grads."""
    import jax_ep

    kw = dict(num_experts=E, axis_name="ep", layout=layout, capacity_factor=cf,
              max_rows=max_rows)

    def disp(x, idx, w):
        out = jax_ep.dispatch(x, idx, w, **kw)
        return out.x, out.weights

    def roundtrip(x, idx, w, scale):
        out = jax_ep.dispatch(x, idx, w, **kw)
        h = out.x * scale  # a stand-in expert that depends on the row
        cw = out.weights if layout == "experts" else jnp.sum(out.weights, axis=-1)
        return jax_ep.combine(h, out.handle, weights=cw)

    def comb(eo, cw, x, idx, w):
        out = jax_ep.dispatch(x, idx, w, **kw)
        return jax_ep.combine(eo, out.handle, weights=cw)

    return (_shard(S1, disp, 3), _shard(S1, roundtrip, 4), _shard(S1, comb, 5))


def inputs(seed, kind="distinct", layout="experts", cf=None, max_rows=None):
    rng = np.random.default_rng(seed)
    x, idx, w = H.global_inputs(rng, S1, T, K, E, HD, np.float32, kind)
    C = oracle.num_rows(T, K, E, 8, layout=layout, capacity_factor=cf, max_rows=max_rows)
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    return rng, flat(x), flat(idx), flat(w), C


CASES = [("experts", None, None), ("tokens", None, None), ("experts", 0.5, None),
         ("experts", None, 5), ("tokens", 0.5, None)]


@pytest.mark.parametrize("layout,cf,max_rows", [CASES[0], CASES[3], CASES[4]])
def test_check_grads(layout, cf, max_rows):
    disp, roundtrip, comb = grad_fns(layout, cf, max_rows)
    rng, x, idx, w, C = inputs(1, "repeated", layout, cf, max_rows)
    scale = rng.uniform(0.5, 1.5, size=(8 * C, HD)).astype(np.float32)
    eo = rng.standard_normal((8 * C, HD)).astype(np.float32)
    cw = rng.uniform(-1, 1, size=(8 * C,)).astype(np.float32)
    tol = dict(order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
    check_grads(lambda x, w: disp(x, idx, w), (x, w), **tol)
    check_grads(lambda x, w, s: roundtrip(x, idx, w, s), (x, w, scale), **tol)
    check_grads(lambda e, c, x, w: comb(e, c, x, idx, w), (eo, cw, x, w), **tol)


@pytest.mark.parametrize("layout,cf,max_rows", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dispatch_vjp_is_combine(layout, cf, max_rows, dtype):
    """d x = combine(d out.x) (plain sum, same order); d topk_weights routes back."""
    import jax_ep
    rng = np.random.default_rng(2)
    kind = "one_expert" if cf is not None else "mixed"
    x, idx, w = H.global_inputs(rng, S1, T, K, E, HD, H.DTYPES[dtype], kind)
    cfg = NormalCfg(num_experts=E, layout=layout, capacity_factor=cf, max_rows=max_rows)
    orc = H.oracle_normal(S1, cfg, x, idx, w)[0]
    rt = orc.routing
    gx = oracle.make_x(rng, (8, rt.C, HD), H.DTYPES[dtype])  # padding cotangent must not leak
    gw = rng.standard_normal(orc.weights.shape).astype(np.float32)

    def body(xx, ii, ww, gxx, gww):
        f = lambda a, b: tuple(jax_ep.dispatch(a, ii, b, num_experts=E, axis_name="ep",  # noqa
                                               layout=layout, capacity_factor=cf,
                                               max_rows=max_rows)[:2])
        _, vjp = jax.vjp(f, xx, ww)
        dx, dw = vjp((gxx, gww))
        return dict(dx=dx, dw=dw)

    lib = H.ep_call(S1, ("dvjp", layout, cf, max_rows), body, x, idx, w, gx, gw)
    H.assert_bits_equal(lib["dx"], oracle.combine(gx, rt), "d x")
    H.assert_bits_equal(lib["dw"], oracle.weight_grad(rt, gw), "d topk_weights")
    # dropped, invalid and overflowed slots get exactly zero
    unrouted = np.ones(idx.shape, bool)
    for key in rt.slot_row:
        unrouted[key] = False
    assert not lib["dw"][unrouted].any()
    if cf is not None:
        assert rt.dropped.any(), "the case should drop something"
        assert not lib["dw"][rt.dropped].any()


@pytest.mark.parametrize("layout", ["experts", "tokens"])
@pytest.mark.parametrize("with_weights", [False, True])
def test_combine_vjp_is_dispatch(layout, with_weights):
    """d expert_out = dispatch(d y) (times the row weight); d weights = <d y, row>."""
    import jax_ep
    rng = np.random.default_rng(3)
    x, idx, w = H.global_inputs(rng, S1, T, K, E, HD, np.float32, "repeated")
    cfg = NormalCfg(num_experts=E, layout=layout, max_rows=20)
    orc = H.oracle_normal(S1, cfg, x, idx, w)[0]
    rt = orc.routing
    eo = oracle.make_x(rng, (8, rt.C, HD), np.float32)
    cw = rng.uniform(-1, 1, (8, rt.C)).astype(np.float32)
    dy = oracle.make_x(rng, (8, T, HD), np.float32)

    def body(xx, ii, ww, ee, cc, dd):
        out = jax_ep.dispatch(xx, ii, ww, num_experts=E, axis_name="ep", layout=layout,
                              max_rows=20)
        if with_weights:
            _, vjp = jax.vjp(lambda e, c: jax_ep.combine(e, out.handle, weights=c), ee, cc)
            de, dc = vjp(dd)
            return dict(de=de, dc=dc)
        _, vjp = jax.vjp(lambda e: jax_ep.combine(e, out.handle), ee)
        return dict(de=vjp(dd)[0])

    lib = H.ep_call(S1, ("cvjp", layout, with_weights), body, x, idx, w, eo, cw, dy)
    H.assert_bits_equal(lib["de"], oracle.combine_grad_expert_out(
        rt, dy, cw if with_weights else None, np.float32), "d expert_out")
    if with_weights:
        np.testing.assert_allclose(lib["dc"], oracle.combine_grad_weights(rt, dy, eo),
                                   rtol=1e-5, atol=1e-5)


def test_fp8_without_out_dtype_is_not_differentiable():
    import jax_ep
    x = np.ones((8 * 2, 128), np.float32)
    idx = np.zeros((8 * 2, 1), np.int32)

    def loss(xx, ii):
        out = jax_ep.dispatch(xx, ii, num_experts=8, axis_name="ep", fp8=True)
        return jnp.sum(out.x.dequantize())[None]

    f = jax.shard_map(loss, mesh=S1.mesh, in_specs=(S1.spec,) * 2, out_specs=S1.spec)
    with pytest.raises(Exception, match="out_dtype"):
        jax.grad(lambda a: jnp.sum(f(a, idx)))(x)


def test_fp8_out_dtype_is_straight_through():
    """With out_dtype=bf16 the backward pass is the plain bf16 combine of the cotangent."""
    import jax_ep
    rng = np.random.default_rng(4)
    Hd = 128
    x, idx, w = H.global_inputs(rng, S1, T, K, E, Hd, oracle.BF16, "mixed")
    rt = oracle.route(idx, w, num_experts=E)
    g = oracle.make_x(rng, (8, rt.C, Hd), oracle.BF16)

    def body(xx, ii, ww, gg):
        f = lambda a: jax_ep.dispatch(a, ii, ww, num_experts=E, axis_name="ep",  # noqa
                                      fp8=True, out_dtype=jnp.bfloat16).x
        y, vjp = jax.vjp(f, xx)
        return dict(y=y, dx=vjp(gg)[0])

    lib = H.ep_call(S1, "fp8st", body, x, idx, w, g)
    H.assert_bits_equal(lib["dx"], oracle.combine(g, rt), "d x")
    assert lib["y"].dtype == oracle.BF16


def test_grad_through_whole_layer_matches_dense():
    """jax.grad of a dispatch -> expert -> combine loss equals the dense layer's gradient."""
    import jax_ep
    rng = np.random.default_rng(5)
    x, idx, w = H.global_inputs(rng, S1, T, K, E, HD, np.float32, "distinct")
    W = rng.standard_normal((E, HD, HD)).astype(np.float32)

    def layer(xx, ii, ww, we):
        out = jax_ep.dispatch(xx, ii, ww, num_experts=E, axis_name="ep")
        h = jax.lax.ragged_dot(out.x, we, out.group_sizes)
        return jax_ep.combine(h, out.handle, weights=out.weights)

    f = _shard(S1, layer, 4)
    Wl = W.reshape(8, E // 8, HD, HD).reshape(8 * (E // 8), HD, HD)
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    loss = lambda xx, ww, we: jnp.sum(jnp.sin(f(xx, flat(idx), ww, we)))  # noqa: E731
    gx, gw, gW = jax.grad(loss, argnums=(0, 1, 2))(flat(x), flat(w), Wl)

    def dense(xx, ww, WW):
        xx = xx.reshape(8, T, HD)
        ww = ww.reshape(8, T, K)
        y = jnp.einsum("stk,stkh->sth", ww, jnp.einsum("sth,stkhf->stkf", xx, WW[idx]))
        return jnp.sum(jnp.sin(y))

    ex, ew, eW = jax.grad(dense, argnums=(0, 1, 2))(flat(x), flat(w), W)
    np.testing.assert_allclose(gx, ex, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, ew, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gW, eW, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fp8", [False, True])
def test_grad_without_topk_weights(fp8):
    """topk_weights=None is the default; jax.grad must work through it (check_vma=True)."""
    import jax_ep
    Hd = 128 if fp8 else HD
    rng = np.random.default_rng(6)
    x, idx, _ = H.global_inputs(rng, S1, T, K, E, Hd, np.float32, "mixed")
    rt = oracle.route(idx, None, num_experts=E)
    g = oracle.make_x(rng, (8, rt.C, Hd), np.float32)
    kw = dict(fp8=True, out_dtype=jnp.float32) if fp8 else {}

    def body(xx, ii, gg):
        f = lambda a: jax_ep.dispatch(a, ii, num_experts=E, axis_name="ep", **kw).x  # noqa
        return dict(dx=jax.vjp(f, xx)[1](gg)[0])

    lib = H.ep_call(S1, ("noweights", fp8), body, x, idx, g)
    H.assert_bits_equal(lib["dx"], oracle.combine(g, rt), "d x")
