"""Run one per-rank function on the GPU ranks and on the CPU oracle, side by side.

Every process builds the same global inputs from a seed. The GPU side runs
`jit(shard_map(body))` over all GPU devices of the job with `backend="cuda"`; the
oracle runs the same body with `backend="xla"` on the process's first R CPU
devices and keeps this process's slices. Both process layouts run: one GPU per
process (the results are that rank's), or one process driving several GPUs (the
results carry a leading axis over its ranks, and tests that need one GPU per
process skip).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep

AXIS = "ep"


@functools.lru_cache(maxsize=None)
def gpu_mesh() -> Mesh:
    devs = sorted((d for d in jax.devices() if d.platform == "gpu"), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs), (AXIS,))


@functools.lru_cache(maxsize=None)
def cpu_mesh(r: int) -> Mesh:
    devs = jax.local_devices(backend="cpu")[:r]
    assert len(devs) == r, f"need {r} CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)"
    return Mesh(np.array(devs), (AXIS,))


def num_ranks() -> int:
    return gpu_mesh().size


def local_ranks() -> list:
    """The mesh indices of this process's GPUs (contiguous: the mesh is in process order)."""
    return [i for i, d in enumerate(gpu_mesh().devices.flat) if d.process_index == jax.process_index()]


def my_rank() -> int:
    """This process's rank; a test asking for it skips where a process drives several GPUs."""
    mine = local_ranks()
    if len(mine) != 1:
        pytest.skip(f"needs one GPU per process (this one drives {len(mine)})")
    return mine[0]


def _mine(stacked: np.ndarray) -> np.ndarray:
    """This process's ranks of a [R or L, ...] array: one rank unstacked, several stacked."""
    return stacked[0] if stacked.shape[0] == 1 else stacked


_BUFFER = []


def buffer(hidden: int = 256, tokens: int = 128, experts: int = 32, top_k: int = 8,
           dtype=jnp.float32, low_latency: bool = True) -> jax_ep.Buffer:
    """The "default" buffer of the tests, made once, large enough for every test."""
    if not _BUFFER:
        _BUFFER.append(jax_ep.Buffer(gpu_mesh(), AXIS, hidden=hidden, max_tokens_per_rank=tokens,
                                     num_experts=experts, top_k=top_k, dtype=dtype,
                                     low_latency=low_latency))
    return _BUFFER[0]


def buffer_with_env(name: str, env: Dict[str, str], **kw) -> jax_ep.Buffer:
    """A Buffer made while the environment variables `env` are set (restored after)."""
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, env):
        return jax_ep.Buffer(gpu_mesh(), AXIS, name=name, **kw)


def copying_buffer(name: str, **kw) -> jax_ep.Buffer:
    """A Buffer made with `JAX_EP_WINDOWS=0`: no rank reads another's XLA memory in
    place, every row is copied through the Buffers. Also checks that the default
    buffer has its windows open, where they are wanted (one process per rank)."""
    from jax_ep.backends import cuda as cuda_backend

    if num_ranks() > 1 and len(local_ranks()) == 1 and cuda_backend._windows_wanted():
        assert buffer().windows, "a process did not map its peers' XLA memory"
    buf = buffer_with_env(name, {"JAX_EP_WINDOWS": "0"}, **kw)
    assert not buf.windows
    return buf


_FNS: Dict[Tuple, Callable] = {}


def _runner(mesh: Mesh, key, body: Callable, nargs: int, compiler_options=None):
    k = (id(mesh), key)
    if k not in _FNS:
        def per_rank(*a):
            return jax.tree.map(lambda v: jnp.reshape(v, (1, *jnp.shape(v))), body(*a))

        _FNS[k] = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=(P(AXIS),) * nargs,
                                        out_specs=P(AXIS)), compiler_options=compiler_options)
    return _FNS[k]


def run_gpu(key, body: Callable, *global_args, compiler_options=None):
    """This process's outputs of body(*per-rank args) on the GPU ranks: one rank's with the
    leading axis dropped, or several ranks' stacked. compiler_options: XLA options of the
    compilation (e.g. {"xla_gpu_graph_min_graph_size": 1}: a command buffer however few
    kernels the step has)."""
    mesh = gpu_mesh()
    mine, n = local_ranks(), mesh.size
    args = []
    for g in global_args:
        g = np.asarray(g)
        local = g.reshape(n, -1, *g.shape[1:])[mine].reshape(-1, *g.shape[1:])
        args.append(jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), local,
                                                           g.shape))
    out = _runner(mesh, key, body, len(args), compiler_options)(*args)

    def local_rows(a):
        shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
        return _mine(np.concatenate([np.asarray(s.data) for s in shards]))

    return jax.tree.map(local_rows, out)


def run_oracle(key, body: Callable, *global_args):
    """This process's outputs of the same body on the xla backend over CPU devices."""
    n = num_ranks()
    mesh = cpu_mesh(n)
    args = [jax.device_put(np.asarray(g), NamedSharding(mesh, P(AXIS))) for g in global_args]
    out = _runner(mesh, key, body, len(args))(*args)
    mine = local_ranks()
    return jax.tree.map(lambda a: _mine(np.asarray(a)[mine[0]:mine[-1] + 1]), out)


def bits(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.itemsize == 1:
        return a.view(np.uint8)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same(got, want, what: str = "") -> None:
    """Bit-for-bit equality of two pytrees of arrays."""
    gl, gt = jax.tree.flatten(got)
    wl, wt = jax.tree.flatten(want)
    assert gt == wt, f"{what}: structure {gt} != {wt}"
    for i, (g, w) in enumerate(zip(gl, wl)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what}[{i}]: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        bad = np.nonzero(bits(g).reshape(-1) != bits(w).reshape(-1))[0]
        assert bad.size == 0, (
            f"{what}[{i}] ranks {local_ranks()}: {bad.size} of {g.size} elements differ, first at flat "
            f"{bad[:5]}: got {g.reshape(-1)[bad[:5]]} want {w.reshape(-1)[bad[:5]]}"
        )


# ---------------------------------------------------------------- routings


def routing(kind: str, n: int, t: int, k: int, e: int, seed: int) -> np.ndarray:
    """Global int32 [n*t, k] routings: random, zipf, one_rank, empty_rank, messy."""
    rng = np.random.default_rng(seed)
    total = n * t
    if kind in ("random", "messy"):
        idx = np.stack([rng.choice(e, k, replace=False) for _ in range(total)]).astype(np.int32)
        if kind == "messy":  # -1 slots, invalid ids, repeated ids
            m = rng.random((total, k))
            idx[m < 0.1] = -1
            idx[(m >= 0.1) & (m < 0.15)] = e + 3
            idx[(m >= 0.15) & (m < 0.2)] = -7
            dup = rng.random(total) < 0.2
            idx[dup, -1] = idx[dup, 0]
        return idx
    if kind == "zipf":
        p = 1.0 / np.arange(1, e + 1) ** 1.2
        p /= p.sum()
        return np.stack([rng.choice(e, k, replace=False, p=p) for _ in range(total)]).astype(np.int32)
    el = e // n
    if kind == "one_rank":  # every token to experts of rank n-1
        lo, m = (n - 1) * el, min(k, el)
        return np.stack([np.concatenate([lo + rng.choice(el, m, replace=False), -np.ones(k - m, int)])
                         for _ in range(total)]).astype(np.int32)
    if kind == "empty_rank":  # rank 0 owns no chosen expert
        pool = np.arange(el, e) if n > 1 else np.arange(e)
        return np.stack([rng.choice(pool, k, replace=False) for _ in range(total)]).astype(np.int32)
    raise ValueError(kind)


# ---------------------------------------------------------------- bodies


def dispatch_combine_body(backend, layout, fp8, out_dtype, cap, max_rows, weighted, dtype, E, buf=None):
    """dispatch -> a scaled expert step -> combine, every output and handle count."""

    def body(x, idx, w):
        out = jax_ep.dispatch(x.astype(dtype), idx, w, num_experts=E, axis_name=AXIS, layout=layout,
                              fp8=fp8, out_dtype=out_dtype, capacity_factor=cap, max_rows=max_rows,
                              backend=backend, buffer=buf)
        if isinstance(out.x, jax_ep.Fp8Array):
            rows = (out.x.data, out.x.scales)
            expert_out = out.x.dequantize(jnp.bfloat16)
        else:
            rows = out.x
            expert_out = out.x * jnp.asarray(1.5, out.x.dtype)
        y = jax_ep.combine(expert_out, out.handle,
                           out.weights if weighted and layout == "experts" else None)
        h = out.handle
        return dict(rows=rows, w=out.weights, sizes=out.group_sizes, topk=out.topk_idx, y=y,
                    overflow=h.num_overflow, dropped=h.dropped, ndrop=h.num_dropped,
                    ninv=h.num_invalid, nrows=h.num_rows)

    return body


def grad_body(backend, layout, E, buf=None):
    """Gradients of a dispatch -> tanh -> combine loss in x and the weights."""

    def body(x, idx, w):
        def loss(x, w):
            out = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=AXIS, layout=layout,
                                  backend=backend, buffer=buf)
            h = jnp.tanh(out.x.astype(jnp.float32))
            if layout == "tokens":  # the expert side applies the [C, K] weights itself
                h = h * jnp.sum(out.weights, axis=1, keepdims=True)
            h = h.astype(x.dtype)
            y = jax_ep.combine(h, out.handle, out.weights if layout == "experts" else None)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
        return dict(gx=gx, gw=gw)

    return body


def soak_body(n: int, e: int, steps: int, buf=None):
    """`steps` dispatch+combine calls, expert ids shifted by the step; counts the
    elements that differ from sum over ranks r of round(n_r * x), in rank order."""

    def body(x, idx):
        def step(i, bad):
            ids = jnp.where(idx >= 0, (idx + i) % e, idx)
            out = jax_ep.dispatch(x, ids, num_experts=e, axis_name=AXIS, backend="cuda", buffer=buf)
            y = jax_ep.combine(out.x, out.handle)
            el = e // n
            ref = jnp.zeros(x.shape, jnp.float32)
            for r in range(n):
                cnt = jnp.sum((ids >= r * el) & (ids < (r + 1) * el), axis=1, dtype=jnp.int32)
                part = (x.astype(jnp.float32) * cnt[:, None].astype(jnp.float32)).astype(x.dtype)
                ref = ref + part.astype(jnp.float32)
            return bad + jnp.sum(y != ref.astype(x.dtype), dtype=jnp.int32)

        return jax.lax.fori_loop(0, steps, step, jax.lax.pcast(jnp.int32(0), (AXIS,), to="varying"))

    return body
