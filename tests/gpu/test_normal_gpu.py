"""Normal-mode CUDA kernels against the xla backend, bit for bit, on every rank."""

import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from harness import (AXIS, assert_same, buffer, buffer_with_env, copying_buffer, dispatch_combine_body, gpu_mesh,
                     grad_body, local_ranks, num_ranks, routing, run_gpu, run_oracle, soak_body)

T, H, E, K = 96, 256, 32, 6


def _body(backend, layout, fp8, out_dtype, cap, max_rows, weighted, dtype):
    return dispatch_combine_body(backend, layout, fp8, out_dtype, cap, max_rows, weighted, dtype, E)


CASES = [
    # layout, fp8, out_dtype, capacity, max_rows, weighted, dtype, routing
    ("experts", False, None, None, None, True, jnp.bfloat16, "random"),
    ("experts", False, None, None, None, False, jnp.float32, "messy"),
    ("experts", False, None, None, None, True, jnp.float16, "zipf"),
    ("experts", False, None, 0.7, None, True, jnp.bfloat16, "zipf"),
    ("experts", False, None, None, 100, True, jnp.bfloat16, "one_rank"),
    ("experts", False, None, None, None, True, jnp.bfloat16, "empty_rank"),
    ("experts", True, None, None, None, True, jnp.bfloat16, "random"),
    ("experts", True, jnp.bfloat16, None, None, True, jnp.bfloat16, "messy"),
    ("experts", True, jnp.float32, 1.0, None, False, jnp.float32, "zipf"),
    ("tokens", False, None, None, None, False, jnp.bfloat16, "random"),
    ("tokens", False, None, 0.5, None, False, jnp.bfloat16, "messy"),
    ("tokens", False, None, None, 40, False, jnp.float32, "one_rank"),
    ("tokens", True, None, None, None, False, jnp.bfloat16, "zipf"),
    ("tokens", True, jnp.bfloat16, None, None, False, jnp.bfloat16, "empty_rank"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_dispatch_combine_matches_xla(case):
    layout, fp8, out_dtype, cap, max_rows, weighted, dtype, kind = case
    n = num_ranks()
    buffer()
    rng = np.random.default_rng(CASES.index(case))
    x = rng.standard_normal((n * T, H)).astype(np.float32)
    idx = routing(kind, n, T, K, E, seed=len(kind) * 7 + n)
    w = rng.random((n * T, K)).astype(np.float32)
    key = ("dc",) + tuple(str(v) for v in case)
    got = run_gpu(key + ("cuda",), _body("cuda", *case[:7]), x, idx, w)
    want = run_oracle(key + ("xla",), _body("xla", *case[:7]), x, idx, w)
    assert_same(got, want, f"{case}")


@pytest.mark.parametrize("hidden", [640, 7168])
def test_fp8_long_rows_match_xla(hidden):
    """An FP8 dispatch quantized in the call, at hidden sizes where a row takes the
    quantizer several steps per lane (640: the last step partly filled; 7168:
    DeepSeek-V3's), from BF16, FP16 and float32 rows, in both layouts: bit for bit
    the xla backend's. (Ranks sharing a GPU quantize with the 1,024-thread stage
    kernel, whose lanes load 2 units a step, not 4.)"""
    n = num_ranks()
    buffer()
    buf = jax_ep.Buffer(gpu_mesh(), AXIS, hidden=hidden, max_tokens_per_rank=T, num_experts=E, top_k=K,
                        dtype=jnp.float32, low_latency=False, name=f"long_rows{hidden}")
    try:
        for i, (layout, dtype) in enumerate([("experts", jnp.bfloat16), ("tokens", jnp.float16),
                                             ("experts", jnp.float32), ("tokens", jnp.bfloat16)]):
            case = (layout, True, None, None, None, layout == "experts", dtype)
            rng = np.random.default_rng(500 + i)
            x = rng.standard_normal((n * T, hidden)).astype(np.float32) * np.exp(rng.normal(0, 1.5, (n * T, 1)))
            idx = routing("zipf" if i % 2 else "random", n, T, K, E, seed=600 + i + n)
            w = rng.random((n * T, K)).astype(np.float32)
            key = ("long_rows", hidden) + tuple(str(v) for v in case)
            got = run_gpu(key + ("cuda",), dispatch_combine_body("cuda", *case, E, buf=buf), x, idx, w)
            want = run_oracle(key + ("xla",), dispatch_combine_body("xla", *case, E), x, idx, w)
            assert_same(got, want, f"hidden {hidden}: {case}")
    finally:
        buf.close()


def test_windows_and_copies_agree():
    """Combine with windows (every rank reads the others' expert rows in place) and
    without (each rank pushes its partial sums into the others' Buffers): the same
    bits. Between processes on one node the windows must be open by default."""
    n = num_ranks()
    buffer()
    copying = copying_buffer("copying", hidden=256, max_tokens_per_rank=128, num_experts=32, top_k=8,
                             dtype=jnp.float32)
    try:
        for i in (0, 3, 9, 11):  # weighted experts, capacity drops, tokens, one hot rank
            case = CASES[i]
            layout, fp8, out_dtype, cap, max_rows, weighted, dtype, kind = case
            rng = np.random.default_rng(100 + i)
            x = rng.standard_normal((n * T, H)).astype(np.float32)
            idx = routing(kind, n, T, K, E, seed=i + n)
            w = rng.random((n * T, K)).astype(np.float32)
            key = ("win",) + tuple(str(v) for v in case)
            fast = run_gpu(key + ("default",), _body("cuda", *case[:7]), x, idx, w)
            slow = run_gpu(key + ("copying",),
                           dispatch_combine_body("cuda", *case[:7], E, buf=copying), x, idx, w)
            assert_same(fast, slow, f"{case}")
    finally:
        copying.close()


def test_buffer_memory_kinds_agree():
    """The Buffer as one VMM allocation (the default between processes) and as
    cudaMalloc memory shared by CUDA IPC handles (JAX_EP_BUFFER_VMM=0): the same
    bits, both copying through the Buffers (the FP8 dispatch reads its peers'
    staging, the combine pushes partial sums)."""
    from jax_ep import _ext
    from jax_ep.backends import cuda as cuda_backend

    n = num_ranks()
    kw = dict(hidden=256, max_tokens_per_rank=128, num_experts=32, top_k=8, dtype=jnp.float32)
    vmm = buffer_with_env("vmm_copying", {"JAX_EP_WINDOWS": "0"}, **kw)
    ipc = buffer_with_env("ipc_copying", {"JAX_EP_WINDOWS": "0", "JAX_EP_BUFFER_VMM": "0"}, **kw)
    try:
        assert not any(_ext.describe(ipc.buffer_id, d)["vmm"] for d in ipc._native.devices)
        if n > 1 and len(local_ranks()) == 1 and cuda_backend._buffer_vmm_wanted():
            assert all(_ext.describe(vmm.buffer_id, d)["vmm"] for d in vmm._native.devices)
        for i in (0, 6, 7, 12, 13):  # BF16; FP8 as FP8 and dequantized, both layouts
            case = CASES[i]
            layout, fp8, out_dtype, cap, max_rows, weighted, dtype, kind = case
            rng = np.random.default_rng(200 + i)
            x = rng.standard_normal((n * T, H)).astype(np.float32)
            idx = routing(kind, n, T, K, E, seed=2 * i + n)
            w = rng.random((n * T, K)).astype(np.float32)
            key = ("memkind",) + tuple(str(v) for v in case)
            a = run_gpu(key + ("vmm",), dispatch_combine_body("cuda", *case[:7], E, buf=vmm), x, idx, w)
            b = run_gpu(key + ("ipc",), dispatch_combine_body("cuda", *case[:7], E, buf=ipc), x, idx, w)
            assert_same(a, b, f"{case}")
    finally:
        vmm.close()
        ipc.close()


@pytest.mark.parametrize("kind", ["random", "messy"])
def test_one_expert_per_rank(kind):
    """The experts layout with one expert per rank (Kr == 1), weighted: each rank's
    row of a token is its partial by itself, as in the tokens layout."""
    n = num_ranks()
    buffer()
    e, k = n, min(K, n)
    rng = np.random.default_rng(21 + len(kind))
    x = rng.standard_normal((n * T, H)).astype(np.float32)
    idx = routing(kind, n, T, k, e, seed=31 + n)
    w = rng.random((n * T, k)).astype(np.float32)
    case = ("experts", False, None, None, None, True, jnp.bfloat16)
    got = run_gpu(("one", kind, "cuda"), dispatch_combine_body("cuda", *case, e), x, idx, w)
    want = run_oracle(("one", kind, "xla"), dispatch_combine_body("xla", *case, e), x, idx, w)
    assert_same(got, want, f"one expert per rank, {kind}")


def test_rank_layout():
    mine = local_ranks()
    assert mine == list(range(mine[0], mine[0] + len(mine))) and 0 <= mine[0] and mine[-1] < num_ranks()


def _grad_fn(backend, layout):
    return grad_body(backend, layout, E)


@pytest.mark.parametrize("layout", ["experts", "tokens"])
def test_grad_matches_xla(layout):
    n = num_ranks()
    buffer()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n * T, H)).astype(np.float32)
    idx = routing("messy", n, T, K, E, seed=11)
    w = rng.random((n * T, K)).astype(np.float32)
    got = run_gpu(("grad", layout, "cuda"), _grad_fn("cuda", layout), x, idx, w)
    want = run_oracle(("grad", layout, "xla"), _grad_fn("xla", layout), x, idx, w)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-5, err_msg=k)
    assert np.any(got["gw"] != 0)


def test_soak_changing_routings():
    """10,000 dispatch+combine calls with a new routing each time, checked in the graph."""
    n = num_ranks()
    t, h, e, k = 64, 128, 16, 4
    buffer()
    steps, calls = 50, 200

    body = soak_body(n, e, steps)

    rng = np.random.default_rng(3)
    x = rng.standard_normal((n * t, h)).astype(jnp.bfloat16)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(n * t)]).astype(np.int32)
    bad = 0
    for c in range(calls):
        bad += int(np.sum(run_gpu(("soak",), body, x, np.roll(idx, c, axis=0))))
    assert bad == 0, f"{bad} mismatching elements over {steps * calls} calls"


def test_command_buffer_replays():
    """The handlers are captured into CUDA graphs and replayed without being called."""
    from jax_ep import _ext

    n = num_ranks()
    buffer()
    rng = np.random.default_rng(9)
    x = rng.standard_normal((n * T, H)).astype(np.float32)
    idx = routing("random", n, T, K, E, seed=2)
    w = rng.random((n * T, K)).astype(np.float32)
    case = ("experts", False, None, None, None, True, jnp.bfloat16)
    want = run_oracle(("cb", "xla"), _body("xla", *case), x, idx, w)
    before = _ext.capture_stats()
    for _ in range(30):
        got = run_gpu(("cb", "cuda"), _body("cuda", *case), x, idx, w)
        assert_same(got, want, "replay")
    calls, captured = (a - b for a, b in zip(_ext.capture_stats(), before))
    print(f"handler calls {calls}, under capture {captured}, executions 30")
    assert captured >= 1, "never captured into a command buffer"
    assert calls < 30 * 2, "handlers ran on every execution: no graph replay"


@pytest.mark.parametrize("layout,out_dtype", [("experts", None), ("tokens", None), ("experts", jnp.bfloat16),
                                              ("tokens", jnp.float32)])
def test_fp8array_input_matches_xla(layout, out_dtype):
    """An Fp8Array input moves as it is (no quantization in the call): bit for bit."""
    import jax_ep
    from harness import AXIS

    def make(backend):
        def body(x, idx, w):
            q = jax_ep.fp8.quantize(x)
            out = jax_ep.dispatch(q, idx, w, num_experts=E, axis_name=AXIS, layout=layout,
                                  out_dtype=out_dtype, backend=backend)
            rows = (out.x.data, out.x.scales) if isinstance(out.x, jax_ep.Fp8Array) else out.x
            h = out.handle
            return dict(rows=rows, w=out.weights, sizes=out.group_sizes, topk=out.topk_idx,
                        nrows=h.num_rows, overflow=h.num_overflow)

        return body

    n = num_ranks()
    buffer()
    rng = np.random.default_rng(21)
    # BF16 on the host: a float32 -> bfloat16 cast inside the jitted body may be
    # skipped on GPUs (XLA's excess precision), which would quantize other values
    x = (rng.standard_normal((n * T, H)) * 3).astype(jnp.bfloat16)
    idx = routing("messy", n, T, K, E, seed=13 + n)
    w = rng.random((n * T, K)).astype(np.float32)
    key = ("fp8in", layout, str(out_dtype))
    got = run_gpu(key + ("cuda",), make("cuda"), x, idx, w)
    want = run_oracle(key + ("xla",), make("xla"), x, idx, w)
    assert_same(got, want, f"Fp8Array input {layout} {out_dtype}")
