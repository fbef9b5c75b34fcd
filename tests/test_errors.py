"""Bad input raises at trace time, naming the argument (DESIGN 3.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ep_helpers import SETUPS

S1 = SETUPS["1d"]
BAD = (ValueError, TypeError)
T, K, E, HD = 4, 2, 16, 8


def trace(fn, *shapes_dtypes, setup=S1):
    """Trace fn per rank under shard_map (no compilation, no execution)."""
    args = [jax.ShapeDtypeStruct((setup.G * setup.R * s[0], *s[1:]), d)
            for s, d in shapes_dtypes]

    def per_rank(*a):
        out = fn(*a)
        return jax.tree.map(lambda v: v[None], out)

    f = jax.shard_map(per_rank, mesh=setup.mesh, in_specs=(setup.spec,) * len(args),
                      out_specs=setup.spec)
    return jax.eval_shape(f, *args)


def dispatch_with(x_shape=(T, HD), x_dtype=jnp.float32, idx_shape=(T, K), idx_dtype=jnp.int32,
                  w_shape=None, w_dtype=jnp.float32, **kw):
    import jax_ep
    kw = {"num_experts": E, "axis_name": "ep", **kw}
    specs = [(x_shape, x_dtype), (idx_shape, idx_dtype)]
    if w_shape is not None:
        specs.append((w_shape, w_dtype))
    return trace(lambda *a: jax_ep.dispatch(*a, **kw).x, *specs)


def test_valid_call_traces():
    dispatch_with()
    dispatch_with(w_shape=(T, K))


@pytest.mark.parametrize("case,name", [
    (dict(x_shape=(T, HD, 1)), "x"),
    (dict(x_shape=(T,), idx_shape=(T, K)), "x"),
    (dict(x_dtype=jnp.int32), "x"),
    (dict(idx_shape=(T,)), "topk_idx"),
    (dict(idx_shape=(T, K, 1)), "topk_idx"),
    (dict(idx_shape=(T + 1, K)), "topk_idx"),
    (dict(idx_dtype=jnp.float32), "topk_idx"),
    (dict(w_shape=(T, K + 1)), "topk_weights"),
    (dict(w_shape=(T,)), "topk_weights"),
    (dict(w_shape=(T, K), w_dtype=jnp.int32), "topk_weights"),
    (dict(num_experts=12), "num_experts"),
    (dict(num_experts=4), "num_experts"),
    (dict(capacity_factor=-0.5), "capacity_factor"),
    (dict(axis_name="nope"), "axis_name"),
    (dict(axis_name=("ep", "nope")), "axis_name"),
    (dict(layout="rows"), "layout"),
    (dict(max_rows=-1), "max_rows"),
    (dict(fp8=True), "128"),
])
def test_dispatch_bad_input(case, name):
    with pytest.raises(BAD, match=name):
        dispatch_with(**case)


def test_num_experts_message_gives_the_axis_size():
    with pytest.raises(BAD, match="num_experts") as e:
        dispatch_with(num_experts=20)
    assert "8" in str(e.value)


@pytest.mark.parametrize("what", ["expert_out_shape", "expert_out_rank", "weights_shape",
                                  "weights_dtype"])
def test_combine_bad_input(what):
    import jax_ep
    C = T * 8 * 2

    def fn(x, idx, eo, cw):
        out = jax_ep.dispatch(x, idx, num_experts=E, axis_name="ep")
        return jax_ep.combine(eo, out.handle, weights=cw)

    eo, cw = ((C, HD), jnp.float32), ((C,), jnp.float32)
    name = "expert_out"
    if what == "expert_out_shape":
        eo = ((C + 1, HD), jnp.float32)
    elif what == "expert_out_rank":
        eo = ((C, HD, 2), jnp.float32)
    elif what == "weights_shape":
        cw, name = ((C, 2), jnp.float32), "weights"
    else:
        cw, name = ((C,), jnp.int32), "weights"
    trace(fn, ((T, HD), jnp.float32), ((T, K), jnp.int32), ((C, HD), jnp.float32),
          ((C,), jnp.float32))
    with pytest.raises(BAD, match=name):
        trace(fn, ((T, HD), jnp.float32), ((T, K), jnp.int32), eo, cw)


@pytest.mark.parametrize("case,name", [
    (dict(T=5), "max_tokens_per_rank"),
    (dict(num_experts=12), "num_experts"),
    (dict(axis_name="nope"), "axis_name"),
    (dict(H=100), "128"),
    (dict(idx_dtype=jnp.float32), "topk_idx"),
])
def test_low_latency_bad_input(case, name):
    import jax_ep
    Tn, Hn = case.pop("T", 4), case.pop("H", 128)
    idx_dtype = case.pop("idx_dtype", jnp.int32)
    kw = {"num_experts": E, "axis_name": "ep", "max_tokens_per_rank": 4, **case}
    with pytest.raises(BAD, match=name):
        trace(lambda x, i: jax_ep.low_latency_dispatch(x, i, **kw).count,
              ((Tn, Hn), jnp.bfloat16), ((Tn, K), idx_dtype))


def test_low_latency_combine_bad_expert_out():
    import jax_ep

    def fn(x, i, w, eo):
        r = jax_ep.low_latency_dispatch(x, i, num_experts=E, axis_name="ep",
                                        max_tokens_per_rank=4, fp8=False)
        return jax_ep.low_latency_combine(eo, i, w, r.handle)

    ok = ((E // 8, 8 * 4, 128), jnp.bfloat16)
    base = [((4, 128), jnp.bfloat16), ((4, K), jnp.int32), ((4, K), jnp.float32)]
    trace(fn, *base, ok)
    with pytest.raises(BAD, match="expert_out"):
        trace(fn, *base, ((E // 8, 8 * 4 + 1, 128), jnp.bfloat16))


def test_errors_happen_at_trace_time_not_run_time():
    """The error comes from tracing alone (eval_shape), before any compilation."""
    with pytest.raises(BAD, match="num_experts"):
        dispatch_with(num_experts=12)


def test_rows_needed_bad_input():
    import jax_ep
    with pytest.raises(BAD, match="num_experts"):
        jax_ep.rows_needed(4, 2, 12, 8)
    with pytest.raises(BAD, match="capacity_factor"):
        jax_ep.rows_needed(4, 2, 16, 8, capacity_factor=-1.0)
    with pytest.raises(BAD, match="layout"):
        jax_ep.rows_needed(4, 2, 16, 8, layout="rows")


def test_config_and_set_num_sms():
    import jax_ep
    assert jax_ep.Config(num_sms=20).num_sms == 20
    with pytest.raises(BAD):
        jax_ep.Config(num_sms=0)
    with pytest.raises(BAD):
        jax_ep.set_num_sms(-3)
    jax_ep.set_num_sms(24)
