"""Reliability on the GPU: bad data, undersized buffers, leaks, a long soak.

Run at every rank count like the other GPU tests. The fault scenarios (a rank
that never calls, dies, or makes a different call) are in test_faults_gpu.py.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from harness import AXIS, assert_same, buffer, gpu_mesh, local_ranks, num_ranks, routing, run_gpu, run_oracle

E, K = 32, 6


def _special_values(rng, shape, dtype):
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    pick = rng.choice(flat.size, 40, replace=False)
    flat[pick[:10]] = np.nan
    flat[pick[10:20]] = np.inf
    flat[pick[20:30]] = -np.inf
    flat[pick[30:]] = -0.0
    return x.astype(dtype)


def _same_with_nans(got, want, what):
    nan = np.isnan(np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.isnan(np.asarray(got, np.float32)), nan, f"NaN positions of {what}")
    assert_same(np.where(nan, 0, got), np.where(nan, 0, want), what)


@pytest.mark.parametrize("layout,fp8,dtype", [("experts", False, jnp.bfloat16), ("tokens", False, jnp.float32),
                                              ("experts", True, jnp.bfloat16), ("tokens", True, jnp.bfloat16)])
def test_nan_inf_pass_through_like_xla(layout, fp8, dtype):
    """NaN and +-Inf go through dispatch unchanged and through combine as on the xla backend."""
    n, t, h = num_ranks(), 64, 256
    buffer()
    rng = np.random.default_rng(21)
    x = _special_values(rng, (n * t, h), dtype)
    idx = routing("random", n, t, K, E, seed=4)
    w = rng.random((n * t, K)).astype(np.float32)

    def body_for(backend):
        def body(x, idx, w):
            out = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=AXIS, layout=layout, fp8=fp8,
                                  out_dtype=jnp.bfloat16 if fp8 else None, backend=backend)
            y = jax_ep.combine(out.x, out.handle, out.weights if layout == "experts" else None)
            return dict(rows=out.x, y=y)
        return body

    key = ("nan", layout, fp8, str(dtype))
    got = run_gpu(key + ("cuda",), body_for("cuda"), x, idx, w)
    want = run_oracle(key + ("xla",), body_for("xla"), x, idx, w)
    # A NaN that arithmetic makes (a sum with a NaN term; with FP8, every value
    # of a 128-channel block whose amax, so whose scale, is NaN) is NaN on both,
    # but which NaN (sign, payload) IEEE leaves to the hardware, and the CPU and
    # the GPU differ there. So: the same NaN positions, every other bit equal.
    # BF16 and FP32 rows are copies and match bit for bit, NaN payloads included.
    if fp8:
        _same_with_nans(got["rows"], want["rows"], "dispatch rows")
    else:
        assert_same(got["rows"], want["rows"], "dispatch rows")
    _same_with_nans(got["y"], want["y"], "combine")
    gy = got["y"].astype(np.float32).reshape(-1, h)
    mine = np.asarray(x).reshape(n, t, h)[local_ranks()].reshape(-1, h).astype(np.float32)
    routed = (idx.reshape(n, t, K)[local_ranks()] >= 0).any(axis=2).reshape(-1)
    assert (np.isnan(gy).any(axis=1) >= (np.isnan(mine).any(axis=1) & routed)).all()


def test_buffer_too_small_names_the_size():
    n = num_ranks()
    buf = buffer()
    t = buf.max_tokens_per_rank * 2
    x = np.zeros((n * t, buf.hidden), np.float32)
    idx = routing("random", n, t, K, E, seed=1)

    def body(x, idx):
        return jax_ep.dispatch(x, idx, num_experts=E, axis_name=AXIS, backend="cuda").x

    with pytest.raises(ValueError, match=r"it needs a buffer of \d+ bytes per rank"):
        run_gpu(("small",), body, x, idx)


def test_create_close_leaks_nothing():
    """100 Buffers created and closed: device memory, IPC mappings and states all return."""
    from jax_ep import _ext
    from jax_ep import distributed

    dev = [d for d in gpu_mesh().devices.flat if d.process_index == jax.process_index()][0]
    hw = dev.local_hardware_id
    kv = distributed.kv_store("tests/leak") if jax.process_count() > 1 else None

    def barrier(name):
        if kv is not None:
            kv.barrier(name)

    buffer()  # the shared default buffer exists before and after
    barrier("before")
    before = _ext.resources(hw)
    size = 0
    for i in range(100):
        b = jax_ep.Buffer(gpu_mesh(), AXIS, hidden=1024, max_tokens_per_rank=256, num_experts=E,
                          top_k=8, dtype=jnp.bfloat16, low_latency=(i % 2 == 0), name=f"leak{i}")
        size = max(size, b.nbytes)
        if i == 0:
            during = _ext.resources(hw)
            assert during["buffers"] == before["buffers"] + len(local_ranks())  # a state per GPU
            # CUDA IPC maps the ranks of other processes (this process's own GPUs: peer access)
            assert during["ipc_mappings"] == before["ipc_mappings"] + num_ranks() - len(local_ranks())
        b.close()
    barrier("after")
    after = _ext.resources(hw)
    assert after["buffers"] == before["buffers"], (before, after)
    assert after["ipc_mappings"] == before["ipc_mappings"], (before, after)
    # Device memory is shared by every process on this GPU; each made and freed
    # 100 buffers of `size` bytes, so a leak of even one per process shows.
    lost = before["free_bytes"] - after["free_bytes"]
    print(f"ranks {local_ranks()}: buffer {size / 2**20:.1f} MiB x 100, free before {before['free_bytes']}, "
          f"after {after['free_bytes']} (lost {lost} bytes)")
    assert lost < size, f"{lost} bytes of device memory lost over 100 buffers of {size} bytes"


SOAK_CALLS = int(os.environ.get("JAX_EP_SOAK_CALLS", "100000"))


def test_soak_alternating_modes():
    """SOAK_CALLS calls (default 100,000) alternating normal and low-latency mode,
    with a new routing every step and three token counts; every call is checked in
    the graph against a closed form, and each 1,000-call chunk ends with one step
    compared bit for bit with the xla backend on CPU devices."""
    n = num_ranks()
    h, e, k, m = 128, 16, 4, 64
    buffer()
    steps = 250  # 4 calls each: 1,000 calls per chunk
    chunks = max(1, SOAK_CALLS // (4 * steps))

    def step_outputs(x, ids, backend):
        out = jax_ep.dispatch(x, ids, num_experts=e, axis_name=AXIS, backend=backend)
        y = jax_ep.combine(out.x, out.handle)
        r = jax_ep.low_latency_dispatch(x, ids, num_experts=e, axis_name=AXIS, max_tokens_per_rank=m,
                                        fp8=False, backend=backend)
        z = jax_ep.low_latency_combine(r.x, ids, jnp.ones(ids.shape, jnp.float32), r.handle)
        return y, z

    def shifted(idx, i):
        return jnp.where(idx >= 0, (idx + i) % e, idx)

    def soak_body(x, idx):
        cnt = jnp.sum(idx >= 0, axis=1, dtype=jnp.int32)  # shifting keeps ids distinct and -1 slots
        el = e // n

        def step(i, bad):
            ids = shifted(idx, i)
            y, z = step_outputs(x, ids, "cuda")
            # normal: per rank round(n_r * x), then the sum over ranks in rank order, rounded
            ref_y = jnp.zeros(x.shape, jnp.float32)
            for r in range(n):
                c = jnp.sum((ids >= r * el) & (ids < (r + 1) * el), axis=1, dtype=jnp.int32)
                ref_y = ref_y + (x.astype(jnp.float32) * c[:, None].astype(jnp.float32)).astype(x.dtype).astype(jnp.float32)
            # low latency: weights 1, the sum of cnt exact copies, rounded once
            ref_z = (x.astype(jnp.float32) * cnt[:, None].astype(jnp.float32)).astype(jnp.bfloat16)
            return (bad + jnp.sum(y != ref_y.astype(x.dtype), dtype=jnp.int32)
                    + jnp.sum(z != ref_z, dtype=jnp.int32))

        zero = jax.lax.pcast(jnp.int32(0), (AXIS,), to="varying")
        return jax.lax.fori_loop(0, steps, step, zero)

    def last_step(backend):
        def body(x, idx):
            y, z = step_outputs(x, shifted(idx, steps - 1), backend)
            return dict(y=y, z=z)
        return body

    rng = np.random.default_rng(17)
    bad = checked = 0
    for c in range(chunks):
        t = (16, 37, m)[c % 3]
        x = rng.standard_normal((n * t, h)).astype(jnp.bfloat16)
        idx = np.stack([rng.choice(e, k, replace=False) for _ in range(n * t)]).astype(np.int32)
        idx[rng.random((n * t, k)) < 0.1] = -1
        bad += int(np.sum(run_gpu(("soak2", t), soak_body, x, idx)))
        got = run_gpu(("soak2-last", t), last_step("cuda"), x, idx)
        want = run_oracle(("soak2-last", t, "xla"), last_step("xla"), x, idx)
        assert_same(got, want, f"chunk {c}")
        checked += 1
    calls = chunks * 4 * steps
    print(f"ranks {local_ranks()}: soak {calls} calls in {chunks} chunks, {checked} xla comparisons, {bad} bad elements")
    assert bad == 0, f"{bad} mismatching elements over {calls} calls"
