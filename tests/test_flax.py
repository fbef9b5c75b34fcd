"""jax_ep.flax.MoE against its dense reference, training, and bias balancing (8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx", reason="jax_ep.flax needs flax (pip install jax-ep[flax])")
optax = pytest.importorskip("optax", reason="the training test needs optax")

from jax_ep.flax import MoE, dense_reference, deepseek_gating, update_bias  # noqa: E402

AUTO = jax.sharding.AxisType.Auto


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "ep"), axis_types=(AUTO, AUTO))


def make_moe(mesh, **kw):
    opts = dict(n_group=4, topk_group=2, num_shared_experts=1, routed_scaling_factor=2.5)
    opts.update(kw)
    hidden = opts.pop("hidden", 64)
    return MoE(hidden, 32, 16, 4, mesh=mesh, rngs=nnx.Rngs(0), **opts)


def tokens(shape, seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@nnx.jit
def ep_and_dense(moe, x, ct):
    """Forward outputs and gradients (params and x) of the EP layer and the reference."""

    def loss(m, x, fn):
        y, aux = fn(m, x)
        return jnp.sum(y * ct), (y, aux)

    ep = lambda m, x: m(x)  # noqa: E731
    g_ep, (y_ep, stats) = nnx.grad(loss, argnums=(0, 1), has_aux=True)(moe, x, ep)
    g_ref, (y_ref, load) = nnx.grad(loss, argnums=(0, 1), has_aux=True)(moe, x, dense_reference)
    return y_ep, stats, g_ep, y_ref, load, g_ref


def test_ep_equals_dense_forward_and_gradients(mesh):
    moe = make_moe(mesh)
    x = tokens((8, 32, 64))
    ct = tokens((8, 32, 64), seed=2)
    y, stats, g, y_ref, load, g_ref = ep_and_dense(moe, x, ct)

    assert y.shape == x.shape and y.dtype == x.dtype
    assert rel_err(y, y_ref) < 1e-5
    np.testing.assert_array_equal(stats.tokens_per_expert, load)
    assert int(np.sum(stats.tokens_per_expert)) == 8 * 32 * 4
    assert int(stats.num_dropped) == 0 and int(stats.num_overflow) == 0

    (g_moe, g_x), (r_moe, r_x) = g, g_ref
    assert rel_err(g_x, r_x) < 1e-4
    for name in ("router", "w_gate_up", "w_down", "shared_gate_up", "shared_down"):
        a, b = getattr(g_moe, name)[...], getattr(r_moe, name)[...]
        assert rel_err(a, b) < 1e-4, name
    # The balancing bias is not a parameter: no gradient reaches it.
    assert "bias" not in nnx.state(g_moe, nnx.Param)


def test_expert_weights_are_sharded_over_ep(mesh):
    moe = make_moe(mesh)
    assert moe.w_gate_up[...].sharding.spec == jax.sharding.PartitionSpec("ep", None, None)
    assert moe.router[...].sharding.is_fully_replicated
    specs = nnx.get_partition_spec(nnx.state(moe, nnx.Param))
    assert tuple(specs["w_down"].get_value()) == ("ep", None, None)


def test_ep_over_both_axes_and_options(mesh):
    """EP group over the whole mesh (tuple axis), no shared expert, FP8 dispatch."""
    x = tokens((128, 128))
    moe = make_moe(mesh, hidden=128, ep_axis=("data", "ep"), num_shared_experts=0)
    y_ref, _ = nnx.jit(dense_reference)(moe, x)

    y, _ = nnx.jit(lambda m, x: m(x))(moe, x)
    assert rel_err(y, y_ref) < 1e-5

    moe.fp8 = True
    y8, _ = nnx.jit(lambda m, x: m(x))(moe, x)
    assert rel_err(y8, y_ref) < 0.1


def test_explicit_mesh():
    """A mesh with Explicit axes (jax.make_mesh's default) works without manual resharding."""
    explicit = jax.make_mesh((2, 4), ("data", "ep"))
    moe = make_moe(explicit)
    x = jax.device_put(tokens((8, 8, 64)), jax.sharding.NamedSharding(explicit, jax.P("data")))
    y, _ = nnx.jit(lambda m, x: m(x))(moe, x)
    y_ref, _ = nnx.jit(dense_reference)(moe, x)
    assert rel_err(y, y_ref) < 1e-5


def test_decode_path_matches_reference(mesh):
    moe = make_moe(mesh, hidden=128)
    x = tokens((16, 128), seed=3)
    y_ll, stats = nnx.jit(lambda m, x: m(x, decode=True))(moe, x)
    y_ref, load = nnx.jit(dense_reference)(moe, x)
    assert rel_err(y_ll, y_ref) < 2e-2  # BF16 on the wire and in the combine
    np.testing.assert_array_equal(stats.tokens_per_expert, load)


def test_gating_groups_and_weights():
    e, n_group = 16, 4
    logits = tokens((64, e), seed=4)
    bias = jnp.linspace(-0.1, 0.1, e)
    r = deepseek_gating(logits, bias, top_k=4, n_group=n_group, topk_group=2,
                        routed_scaling_factor=2.5)
    groups = np.asarray(r.topk_idx) // (e // n_group)
    assert all(len(set(row)) <= 2 for row in groups)
    np.testing.assert_allclose(np.sum(r.topk_weights, axis=1), 2.5, rtol=1e-5)
    assert np.all(np.asarray(r.topk_weights) > 0)
    chosen = np.take_along_axis(np.asarray(r.scores), np.asarray(r.topk_idx), axis=1)
    np.testing.assert_allclose(chosen / chosen.sum(1, keepdims=True) * 2.5, r.topk_weights, rtol=1e-5)


def test_loss_falls_over_50_steps(mesh):
    """A small MoE layer (with a tight capacity and balancing on) fits a fixed nonlinear map."""
    student = MoE(32, 32, 16, 4, mesh=mesh, n_group=4, topk_group=2, num_shared_experts=1,
                  capacity_factor=1.0, rngs=nnx.Rngs(7))
    a = jax.random.normal(jax.random.key(99), (32, 32)) / np.sqrt(32)
    opt = optax.adam(1e-2)
    opt_state = opt.init(nnx.state(student, nnx.Param))

    @nnx.jit
    def step(student, opt_state, key):
        x = jax.random.normal(key, (256, 32))
        target = jnp.sin(x @ a)

        def loss_fn(m):
            y, stats = m(x)
            return jnp.mean((y - target) ** 2), stats

        (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(student)
        params = nnx.state(student, nnx.Param)
        updates, opt_state = opt.update(grads, opt_state, params)
        nnx.update(student, optax.apply_updates(params, updates))
        update_bias(student, stats.tokens_per_expert, 1e-3)
        return loss, stats.num_dropped, opt_state

    losses, dropped = [], 0
    for i in range(50):
        loss, drops, opt_state = step(student, opt_state, jax.random.key(i))
        losses.append(float(loss))
        dropped += int(drops)
    assert dropped > 0  # the capacity factor was exercised
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_bias_balancing_moves_load_toward_uniform(mesh):
    moe = make_moe(mesh, hidden=32, n_group=1, topk_group=1)
    # Skew the router: a shared offset in every token pushes experts 0..3 up.
    router = np.asarray(moe.router[...]).copy()
    router[:, :4] += 0.05
    moe.router[...] = jax.device_put(jnp.asarray(router), moe.router[...].sharding)
    x = tokens((256, 32), seed=5) + 1.0

    @nnx.jit
    def balance_step(moe, x):
        _, stats = moe(x)
        update_bias(moe, stats.tokens_per_expert, 0.02)
        return stats

    first = balance_step(moe, x)
    for _ in range(40):
        last = balance_step(moe, x)
    skew0, skew1 = float(first.max_violation), float(last.max_violation)
    assert skew0 > 1.0, skew0
    assert skew1 < 0.5 * skew0, (skew0, skew1)
    bias = np.asarray(moe.bias[...])
    assert np.all(bias[:4] < 0) and np.mean(bias[4:]) > 0


def test_create_buffer_passes_transport_and_nodes(mesh):
    moe = make_moe(mesh)
    buf = moe.create_buffer(32, transport="nvshmem", num_nodes=2, name="moe_nodes")
    try:
        assert buf.num_nodes == 2 and buf.transport == "nvshmem" and buf.num_experts == 16
        assert buf.num_ranks == 4  # the layer's EP axis
    finally:
        buf.close()


def test_collectives_jax_ep_equals_xla(mesh):
    """collectives="jax_ep" (statistics summed by jax_ep.all_reduce) gives the layer's
    outputs, statistics and gradients of collectives="xla", on a 1 x 8 mesh, in both
    modes; and the layer can be built under tracing (nnx.eval_shape)."""
    mesh1 = jax.make_mesh((1, 8), ("data", "ep"), axis_types=(AUTO, AUTO))
    x = tokens((8, 16, 128), seed=4)
    ct = tokens((8, 16, 128), seed=5)
    got = {}
    for coll in ("xla", "jax_ep"):
        moe = make_moe(mesh1, hidden=128, collectives=coll)
        y, stats, g, *_ = ep_and_dense(moe, x, ct)
        y_ll, stats_ll = nnx.jit(lambda m, x: m(x, decode=True))(moe, x[:2])
        got[coll] = (y, stats, nnx.state(g[0], nnx.Param), g[1], y_ll, stats_ll)
    for a, b in zip(jax.tree.leaves(got["jax_ep"]), jax.tree.leaves(got["xla"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    shape = nnx.eval_shape(lambda: make_moe(mesh1, hidden=128, collectives="jax_ep"))
    assert shape.router.shape == (128, 16)
    with pytest.raises(ValueError, match="size 1"):
        make_moe(mesh, collectives="jax_ep")
