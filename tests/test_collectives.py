"""jax_ep.all_reduce on the xla backend: the rank-order float32 sum, every dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep


def _mesh(n):
    return Mesh(np.array(jax.devices()[:n]), ("ep",))


def _run(n, tree, **kw):
    mesh = _mesh(n)
    spec = jax.tree.map(lambda _: P("ep"), tree)

    def body(t):
        t = jax.tree.map(lambda a: a[0], t)
        out = jax_ep.all_reduce(t, axis_name="ep", **kw)
        return jax.tree.map(lambda a: a[None], out)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,), out_specs=spec))
    return f(jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("ep"))), tree))


def _rank_order_sum(a):
    acc = a[0].astype(np.float32)
    for r in range(1, a.shape[0]):
        acc = acc + a[r].astype(np.float32)
    return acc


@pytest.mark.parametrize("n", [1, 2, 8])
def test_sum_in_rank_order_every_dtype(n):
    rng = np.random.default_rng(n)
    tree = dict(
        f32=rng.standard_normal((n, 7, 5)).astype(np.float32) * 1e3,
        bf16=rng.standard_normal((n, 33)).astype(jnp.bfloat16),
        i32=rng.integers(-1000, 1000, (n, 3)).astype(np.int32),
        scalar=rng.standard_normal((n,)).astype(np.float32),
    )
    got = _run(n, tree, backend="xla")
    for k, a in tree.items():
        want = _rank_order_sum(np.asarray(a)).astype(a.dtype)
        g = np.asarray(got[k])
        assert g.dtype == a.dtype
        for r in range(n):  # the same bits on every rank
            np.testing.assert_array_equal(g[r], want, err_msg=f"{k} rank {r}")


def test_auto_on_cpu_is_the_xla_sum():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 100)).astype(np.float32)
    got = _run(8, x, backend="auto")
    np.testing.assert_array_equal(np.asarray(got)[3], _rank_order_sum(x))


def test_gradient_is_the_sum_of_cotangents():
    n = 4
    mesh = _mesh(n)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    c = rng.standard_normal((n, 6)).astype(np.float32)

    def loss(x, c):
        def body(x, c):
            return jnp.sum(jax_ep.all_reduce(x[0], axis_name="ep", backend="xla") * c[0])[None]

        per = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep"))(x, c)
        return jnp.sum(per)

    g = jax.jit(jax.grad(loss))(x, c)
    # d/dx_s sum_r <sum_q x_q, c_r> = sum_r c_r, on every rank
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(c.sum(0), (n, 6)), rtol=1e-6)


def test_rejects_bool_leaves_and_bad_backend():
    with pytest.raises(TypeError, match="float or int"):
        _run(2, np.zeros((2, 3), bool), backend="xla")
    with pytest.raises(ValueError, match="backend"):
        _run(2, np.zeros((2, 3), np.float32), backend="nccl")


def test_empty_leaves():
    got = _run(2, dict(a=np.zeros((2, 0), np.float32), b=np.ones((2, 3), np.int32)), backend="xla")
    assert np.asarray(got["a"]).shape == (2, 0)
    np.testing.assert_array_equal(np.asarray(got["b"]), np.full((2, 3), 2, np.int32))
