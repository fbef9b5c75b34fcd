"""The debug switch (jax_ep.debug): lost rows raise at run time only when it is on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
from ep_helpers import SETUPS

S = SETUPS["1d"]
E, K, T, H = 16, 2, 8, 8


@pytest.fixture(autouse=True)
def _switch_off_after():
    yield
    jax_ep.debug.enable(False)


def _run(body, *args):
    f = jax.jit(jax.shard_map(body, mesh=S.mesh, in_specs=(P(S.axis_name),) * len(args),
                              out_specs=P(S.axis_name)))
    return jax.block_until_ready(f(*args))


def _inputs(bad_id=None):
    rng = np.random.default_rng(0)
    n = S.G * S.R * T
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(n)]).astype(np.int32)
    if bad_id is not None:
        idx[5, 1] = bad_id
    return jnp.ones((n, H), jnp.float32), jnp.asarray(idx)


def _dispatch(**kw):
    def body(x, idx):
        return jax_ep.dispatch(x, idx, num_experts=E, axis_name=S.axis_name, backend="xla", **kw).x
    return body


def test_off_by_default_counts_only(monkeypatch):
    monkeypatch.delenv("JAX_EP_DEBUG", raising=False)
    jax_ep.debug.enable(False)
    _run(_dispatch(), *_inputs(bad_id=E + 4))  # counted in num_invalid, no error


@pytest.mark.parametrize("bad", [E, E + 100, -2])
def test_out_of_range_id_raises(bad):
    jax_ep.debug.enable()
    _run(_dispatch(), *_inputs())  # clean routing: no error
    with pytest.raises(Exception, match=r"1 expert id\(s\) outside \[-1, num_experts\)"):
        _run(_dispatch(), *_inputs(bad_id=bad))


def test_env_switch(monkeypatch):
    monkeypatch.setenv("JAX_EP_DEBUG", "1")
    jax_ep.debug.enable(None)  # the environment decides
    with pytest.raises(Exception, match="JAX_EP_DEBUG is on"):
        _run(_dispatch(), *_inputs(bad_id=E))


def test_overflow_raises_but_capacity_drops_do_not():
    jax_ep.debug.enable()
    with pytest.raises(Exception, match=r"row\(s\) past max_rows"):
        _run(_dispatch(max_rows=4), *_inputs())
    _run(_dispatch(capacity_factor=0.5), *_inputs())  # intended drops: no error


def test_low_latency_out_of_range_id_raises():
    jax_ep.debug.enable()

    def body(x, idx):
        r = jax_ep.low_latency_dispatch(x.astype(jnp.bfloat16), idx, num_experts=E,
                                        axis_name=S.axis_name, max_tokens_per_rank=T, fp8=False,
                                        backend="xla")
        return r.count

    x, idx = _inputs()
    _run(body, x, idx)
    with pytest.raises(Exception, match="low_latency_dispatch_send"):
        _run(body, *_inputs(bad_id=E + 1))
