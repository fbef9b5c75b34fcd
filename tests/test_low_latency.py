"""Low-latency dispatch/combine (DESIGN 3.2) against the oracle, bit for bit."""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ep_helpers as H
import oracle
from ep_helpers import SETUPS

S1 = SETUPS["1d"]
# (T, M, K, E, H) with T <= M
LL_SHAPES = [(1, 1, 1, 8, 128), (3, 4, 2, 16, 128), (4, 4, 4, 16, 128), (2, 3, 3, 32, 256)]


@dataclasses.dataclass(frozen=True)
class LLCfg:
    num_experts: int
    max_tokens_per_rank: int
    fp8: bool = True
    round_scale: bool = False
    split: bool = False  # use the _send/_recv halves
    zero_padding: bool = True


def run_ll(setup, cfg: LLCfg, x, idx, w, eo):
    import jax_ep

    def body(xx, ii, ww, ee):
        kw = dict(num_experts=cfg.num_experts, axis_name=setup.axis_name,
                  max_tokens_per_rank=cfg.max_tokens_per_rank, fp8=cfg.fp8,
                  round_scale=cfg.round_scale, zero_padding=cfg.zero_padding)
        if cfg.split:
            r = jax_ep.low_latency_dispatch_recv(jax_ep.low_latency_dispatch_send(xx, ii, **kw))
            y = jax_ep.low_latency_combine_recv(
                jax_ep.low_latency_combine_send(ee, ii, ww, r.handle))
        else:
            r = jax_ep.low_latency_dispatch(xx, ii, **kw)
            y = jax_ep.low_latency_combine(ee, ii, ww, r.handle)
        assert r.handle.meta.zero_padding is cfg.zero_padding  # reaches the backend
        return dict(x=r.x, count=r.count, y=y)

    return H.ep_call(setup, ("ll", cfg), body, x, idx, w, eo)


def ll_expert_out(rng, setup, orcs, El, M, Hd):
    n = setup.G * setup.R
    eo = oracle.make_x(rng, (n, El, setup.R * M, Hd), oracle.BF16)
    for g, o in enumerate(orcs):
        for r in range(setup.R):
            for el in range(El):
                eo[g * setup.R + r, el, o.count[r, el]:] = np.nan  # never read
    return eo


def check_ll(setup, cfg, T, K, Hd, kind, seed, x_dtype=oracle.BF16):
    E, M = cfg.num_experts, cfg.max_tokens_per_rank
    El = E // setup.R
    rng = np.random.default_rng(seed)
    x, idx, w = H.global_inputs(rng, setup, T, K, E, Hd, x_dtype, kind)
    orcs = [oracle.low_latency_dispatch(xg, ig, num_experts=E, max_tokens_per_rank=M,
                                        fp8=cfg.fp8, round_scale=cfg.round_scale)
            for xg, ig in zip(H.groups(setup, x), H.groups(setup, idx))]
    eo = ll_expert_out(rng, setup, orcs, El, M, Hd)
    lib = run_ll(setup, cfg, x, idx, w, eo)
    H.assert_bits_equal(lib["count"], H.cat([o.count for o in orcs]), "count")
    expect = H.cat([oracle.low_latency_combine(eg, ig, wg, o) for eg, ig, wg, o in
                    zip(H.groups(setup, eo), H.groups(setup, idx), H.groups(setup, w), orcs)])
    H.assert_bits_equal(lib["y"], expect, "low_latency_combine")
    if cfg.fp8:
        H.assert_bits_equal(lib["x"].data.astype(np.float32) != 0,
                            H.cat([o.fp8_data for o in orcs]).astype(np.float32) != 0,
                            "x.data nonzero pattern")
        H.assert_bits_equal(lib["x"].scales, H.cat([o.fp8_scales for o in orcs]), "x.scales")
        H.assert_bits_equal(lib["x"].data, H.cat([o.fp8_data for o in orcs]), "x.data")
    else:
        H.assert_bits_equal(lib["x"], H.cat([o.x for o in orcs]), "x")
    return lib


@settings(max_examples=12)
@given(st.sampled_from(LL_SHAPES), st.sampled_from(oracle.ROUTINGS), st.booleans(),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_low_latency_matches_oracle(shape, kind, fp8, round_scale, seed):
    T, M, K, E, Hd = shape
    cfg = LLCfg(num_experts=E, max_tokens_per_rank=M, fp8=fp8, round_scale=round_scale and fp8)
    check_ll(S1, cfg, T, K, Hd, kind, seed)


@pytest.mark.parametrize("kind", ["one_expert", "all_minus1", "skip_ranks", "repeated"])
def test_low_latency_routings(kind):
    check_ll(S1, LLCfg(num_experts=16, max_tokens_per_rank=4), 3, 2, 128, kind, 3)


@pytest.mark.parametrize("fp8", [True, False])
def test_send_recv_halves_match(fp8):
    cfg = LLCfg(num_experts=16, max_tokens_per_rank=4, fp8=fp8)
    a = check_ll(S1, cfg, 3, 2, 128, "distinct", 8)
    b = check_ll(S1, dataclasses.replace(cfg, split=True), 3, 2, 128, "distinct", 8)
    for k in ("count", "y"):
        H.assert_bits_equal(a[k], b[k], k)


@pytest.mark.parametrize("fp8", [True, False])
def test_padding_unset_keeps_the_rows_that_count(fp8):
    """zero_padding=False reaches the backend (it decides what the padding holds);
    the xla backend zeroes it anyway, so everything matches the oracle."""
    cfg = LLCfg(num_experts=16, max_tokens_per_rank=4, fp8=fp8, zero_padding=False)
    check_ll(S1, cfg, 3, 2, 128, "mixed", 5)
    check_ll(S1, dataclasses.replace(cfg, split=True), 3, 2, 128, "mixed", 5)


def test_overlap_runs_compute_between_halves():
    import jax_ep

    E, M, T, K, Hd = 16, 4, 4, 2, 128
    rng = np.random.default_rng(2)
    x, idx, w = H.global_inputs(rng, S1, T, K, E, Hd, oracle.BF16, "distinct")
    z = rng.standard_normal((8, 16, 16)).astype(np.float32)
    kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, fp8=False)

    def body(xx, ii, zz):
        send = lambda: jax_ep.low_latency_dispatch_send(xx, ii, **kw)  # noqa: E731
        r, c = jax_ep.overlap(send, lambda a: a @ a, jax_ep.low_latency_dispatch_recv, zz)
        return dict(x=r.x, count=r.count, c=c)

    lib = H.ep_call(S1, "overlap", body, x, idx, z)
    orc = oracle.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M, fp8=False)
    H.assert_bits_equal(lib["x"], orc.x, "x")
    H.assert_bits_equal(lib["count"], orc.count, "count")
    np.testing.assert_allclose(lib["c"], z @ z, rtol=1e-5, atol=1e-5)


def test_low_latency_2d_and_tuple_axes():
    for name in ("2d", "tuple"):
        st_ = SETUPS[name]
        cfg = LLCfg(num_experts=16, max_tokens_per_rank=3)
        check_ll(st_, cfg, 3, 2, 128, "mixed", 4)


def test_low_latency_under_jit_scan():
    """Decode-style loop: the same LL call in lax.scan equals the oracle each step."""
    import jax_ep
    E, M, T, K, Hd, steps = 16, 2, 2, 2, 128, 3
    rng = np.random.default_rng(6)
    xs = oracle.make_x(rng, (8, steps, T, Hd), oracle.BF16)
    idxs = np.stack([oracle.make_routing("distinct", rng, 8, T, K, E) for _ in range(steps)], 1)
    ws = rng.uniform(0, 1, (8, steps, T, K)).astype(np.float32)

    def body(xs_, is_, ws_):
        def step(carry, inp):
            xx, ii, ww = inp
            r = jax_ep.low_latency_dispatch(xx, ii, num_experts=E, axis_name="ep",
                                            max_tokens_per_rank=M, fp8=False)
            ex = (r.x.astype(jnp.float32) * 2).astype(jnp.bfloat16)
            y = jax_ep.low_latency_combine(ex, ii, ww, r.handle)
            return carry, y
        return jax.lax.scan(step, 0, (xs_, is_, ws_))[1]

    y = H.ep_call(S1, "ll_scan", body, xs, idxs, ws)
    for i in range(steps):
        o = oracle.low_latency_dispatch(xs[:, i], idxs[:, i], num_experts=E,
                                        max_tokens_per_rank=M, fp8=False)
        ex = (o.x.astype(np.float32) * 2).astype(oracle.BF16)
        H.assert_bits_equal(y[:, i], oracle.low_latency_combine(ex, idxs[:, i], ws[:, i], o),
                            f"step {i}")
