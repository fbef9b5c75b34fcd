"""Meshes, shard_map runners and oracle comparisons shared by the CPU tests.

Global test arrays have a leading axis of ``G * R`` shards (``G`` independent EP
groups of ``R`` ranks, in mesh order); each rank sees its shard without that axis.
Jitted runners are cached by their static configuration so hypothesis examples
with the same shapes reuse one compilation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import oracle

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": oracle.BF16,
          "float16": np.dtype(np.float16)}


@dataclasses.dataclass(frozen=True)
class Setup:
    """One way to lay EP groups over the 8 devices."""

    name: str
    mesh_shape: Tuple[int, ...]
    mesh_axes: Tuple[str, ...]
    axis_name: Any  # what the library gets as axis_name
    G: int  # independent EP groups
    R: int  # ranks per group

    @functools.cached_property
    def mesh(self) -> Mesh:
        n = int(np.prod(self.mesh_shape))
        devs = jax.devices()
        assert len(devs) >= n, f"need {n} devices, have {len(devs)} (XLA_FLAGS device count?)"
        return Mesh(np.array(devs[:n]).reshape(self.mesh_shape), self.mesh_axes)

    @property
    def spec(self) -> P:
        axes = self.mesh_axes
        return P(axes[0] if len(axes) == 1 else axes)


SETUPS = {
    "1d": Setup("1d", (8,), ("ep",), "ep", 1, 8),
    "2d": Setup("2d", (2, 4), ("data", "ep"), "ep", 2, 4),
    "tuple": Setup("tuple", (2, 4), ("data", "ep"), ("data", "ep"), 1, 8),
}

_RUNNERS: Dict[Any, Callable] = {}


def ep_call(setup: Setup, key, body: Callable, *args):
    """Run ``body`` once per rank under jit(shard_map) on global ``args``.

    ``body`` takes per-rank arrays and returns a pytree; every output leaf gets a
    leading shard axis, so results come back as global numpy arrays ``[G*R, ...]``.
    ``key`` names the static configuration of ``body`` for the runner cache.
    """
    k = (setup.name, key, len(args))
    fn = _RUNNERS.get(k)
    if fn is None:
        def per_rank(*a):
            out = body(*[v[0] for v in a])
            return jax.tree.map(lambda v: v[None], out)

        spec = setup.spec
        fn = jax.jit(jax.shard_map(per_rank, mesh=setup.mesh, in_specs=(spec,) * len(args),
                                   out_specs=spec))
        _RUNNERS[k] = fn
    return jax.tree.map(np.asarray, fn(*args))


def groups(setup: Setup, a: Optional[np.ndarray]):
    """Split a global array into the per-group ``[R, ...]`` arrays the oracle takes."""
    if a is None:
        return [None] * setup.G
    return [a[g * setup.R:(g + 1) * setup.R] for g in range(setup.G)]


def assert_bits_equal(actual, expected, what=""):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.dtype == np.bool_ or np.issubdtype(actual.dtype, np.integer):
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:
        np.testing.assert_array_equal(oracle.bits(actual), oracle.bits(expected), err_msg=what)


# ----------------------------------------------------------------- normal mode runners


@dataclasses.dataclass(frozen=True)
class NormalCfg:
    num_experts: int
    layout: str = "experts"
    capacity_factor: Optional[float] = None
    max_rows: Optional[int] = None
    fp8: bool = False
    out_dtype: Optional[str] = None
    has_weights: bool = True
    combine: str = "none"  # "none": no weights, "out": out.weights, "given": an input

    def dispatch_kwargs(self, setup: Setup):
        return dict(num_experts=self.num_experts, axis_name=setup.axis_name,
                    capacity_factor=self.capacity_factor, max_rows=self.max_rows,
                    layout=self.layout, fp8=self.fp8,
                    out_dtype=None if self.out_dtype is None else jnp.dtype(self.out_dtype))


def run_normal(setup: Setup, cfg: NormalCfg, x, idx, w=None, eo=None, cw=None):
    """dispatch (and combine when ``eo`` is given) of global inputs; a dict of arrays."""
    import jax_ep

    with_combine = eo is not None

    def body(*a):
        a = list(a)
        xx, ii = a.pop(0), a.pop(0)
        ww = a.pop(0) if cfg.has_weights else None
        out = jax_ep.dispatch(xx, ii, ww, **cfg.dispatch_kwargs(setup))
        h = out.handle
        res = dict(x=out.x, weights=out.weights, group_sizes=out.group_sizes,
                   num_overflow=h.num_overflow, dropped=h.dropped,
                   num_dropped=h.num_dropped, num_invalid=h.num_invalid)
        if cfg.layout == "tokens":
            res["topk_idx"] = out.topk_idx
        if with_combine:
            e = a.pop(0)
            if cfg.combine == "none":
                res["y"] = jax_ep.combine(e, h)
            elif cfg.combine == "out":
                res["y"] = jax_ep.combine(e, h, weights=out.weights)
            else:
                res["y"] = jax_ep.combine(e, h, weights=a.pop(0))
        return res

    args = [x, idx] + ([w] if cfg.has_weights else [])
    if with_combine:
        args.append(eo)
        if cfg.combine == "given":
            args.append(cw)
    return ep_call(setup, ("normal", cfg, with_combine), body, *args)


def oracle_normal(setup: Setup, cfg: NormalCfg, x, idx, w=None):
    """Per-group oracle dispatch results."""
    return [oracle.dispatch(xg, ig, wg if cfg.has_weights else None,
                            num_experts=cfg.num_experts, capacity_factor=cfg.capacity_factor,
                            max_rows=cfg.max_rows, layout=cfg.layout, fp8=cfg.fp8,
                            out_dtype=cfg.out_dtype and DTYPES[cfg.out_dtype])
            for xg, ig, wg in zip(groups(setup, x), groups(setup, idx), groups(setup, w))]


def cat(parts):
    return np.concatenate(parts, axis=0)


def check_dispatch(lib: dict, orc: list, cfg: NormalCfg):
    """Compare every dispatch output against the oracle, bit for bit."""
    assert_bits_equal(lib["group_sizes"], cat([o.group_sizes for o in orc]), "group_sizes")
    lib_w, orc_w = np.array(lib["weights"]), cat([o.weights for o in orc])
    if not cfg.has_weights and cfg.layout == "experts":
        # Repeated ids without topk_weights: docs/semantics.md says both "1.0 on real
        # rows" and "the sum of the slots' weights"; test_dispatch checks that case alone.
        amb = cat([repeated_rows(o.routing) for o in orc])
        lib_w[amb] = orc_w[amb]
    assert_bits_equal(lib_w, orc_w, "out.weights")
    if cfg.layout == "tokens":
        assert_bits_equal(lib["topk_idx"], cat([o.topk_idx for o in orc]), "out.topk_idx")
    rts = [o.routing for o in orc]
    assert_bits_equal(lib["num_overflow"].reshape(-1), cat([r.num_overflow for r in rts]),
                      "num_overflow")
    assert_bits_equal(lib["dropped"], cat([r.dropped for r in rts]), "dropped")
    assert_bits_equal(lib["num_dropped"].reshape(-1), cat([r.num_dropped for r in rts]),
                      "num_dropped")
    assert_bits_equal(lib["num_invalid"].reshape(-1), cat([r.num_invalid for r in rts]),
                      "num_invalid")
    # rows last: an FP8 scale that is off by one ulp should not hide routing errors
    if cfg.fp8 and cfg.out_dtype is None:
        assert_bits_equal(lib["x"].scales != 0, cat([o.fp8_scales for o in orc]) != 0,
                          "out.x.scales nonzero pattern")
        assert_bits_equal(lib["x"].scales, cat([o.fp8_scales for o in orc]), "out.x.scales")
        assert_bits_equal(lib["x"].data, cat([o.fp8_data for o in orc]), "out.x.data")
    else:
        assert_bits_equal(lib["x"], cat([o.x for o in orc]), "out.x")


def repeated_rows(rt) -> np.ndarray:
    """[R, C] bool: experts-layout rows made from several slots of one token."""
    out = np.zeros((rt.R, rt.C), bool)
    for (s, t, k), (r, p) in rt.slot_row.items():
        el = rt.rows[r][p][2]
        n = sum(1 for kk in range(rt.K)
                if rt.kept[s, t, kk] and rt.clean_idx[s, t, kk] == r * rt.El + el)
        out[r, p] |= n > 1
    return out


def make_expert_out(rng, setup: Setup, orc: list, H: int, dtype, poison=True):
    """Random expert outputs [G*R, C, H]; padding rows hold NaN, which must never leak."""
    C = orc[0].routing.C
    eo = oracle.make_x(rng, (setup.G * setup.R, C, H), dtype)
    if poison:
        for g, o in enumerate(orc):
            for r in range(setup.R):
                eo[g * setup.R + r, len(o.routing.rows[r]):] = np.nan
    return eo


def oracle_combine(setup: Setup, orc: list, eo, cfg: NormalCfg, cw=None):
    out = []
    for g, o in enumerate(orc):
        sl = slice(g * setup.R, (g + 1) * setup.R)
        if cfg.combine == "none":
            wts = None
        elif cfg.combine == "out":
            wts = o.weights
        else:
            wts = cw[sl]
        out.append(oracle.combine(eo[sl], o.routing, wts))
    return cat(out)


# ----------------------------------------------------------------- inputs


def global_inputs(rng, setup: Setup, T, K, E, H, dtype, kind, weights=True):
    """x [G*R, T, H], topk_idx [G*R, T, K] of routing ``kind`` and weights [G*R, T, K]."""
    n = setup.G * setup.R
    x = oracle.make_x(rng, (n, T, H), dtype)
    idx = cat([oracle.make_routing(kind, rng, setup.R, T, K, E) for _ in range(setup.G)])
    w = rng.uniform(-1, 2, size=(n, T, K)).astype(np.float32) if weights else None
    return x, idx, w
