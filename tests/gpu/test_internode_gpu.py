"""Internode normal mode against the xla backend, bit for bit, on every rank.

The ranks are grouped into simulated nodes by the launcher's `--nodes`; an NVSHMEM
Buffer over them moves rows between nodes by puts only (each token once per target
node, to the forwarder with the sender's local index) and inside a node by loads:

    python -m jax_ep.launch --nproc 8 --nodes 2 --share-gpu --mps --sms-per-rank 16 -- \\
        env JAX_PLATFORMS=cuda,cpu python -m pytest -q tests/gpu/test_internode_gpu.py

Without simulated nodes, NVSHMEM or one GPU per process, the NVSHMEM cases skip. The
peer-transport cases run the same protocol with the puts as stores through peer
pointers (the ranks split into groups of one host), in any multi-rank run.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from jax_ep import distributed
from harness import (AXIS, assert_same, dispatch_combine_body, gpu_mesh, grad_body, my_rank, num_ranks,
                     routing, run_gpu, run_oracle, soak_body)

T, H, E, K = 96, 256, 32, 6
TRANSPORTS = ["nvshmem", "peer"]
_BUF = {}


def _buffer(transport: str = "nvshmem") -> jax_ep.Buffer:
    """NVSHMEM: the launcher's nodes (puts between them). Peer: the same protocol with
    the puts as stores through peer pointers, the ranks in the launcher's nodes or,
    without `--nodes`, in two groups."""
    if transport not in _BUF:
        if transport == "nvshmem":
            from jax_ep import nvshmem

            if distributed.num_nodes() < 2:
                pytest.skip("needs several (simulated) nodes: python -m jax_ep.launch --nodes N")
            if not nvshmem.available():
                pytest.skip("jax_ep built without NVSHMEM")
            my_rank()  # NVSHMEM: one GPU per process (skips otherwise)
            nvshmem.initialize()
            nodes = None
        else:
            nodes = distributed.num_nodes() if distributed.num_nodes() > 1 else 2
            if num_ranks() % nodes or num_ranks() < 2:
                pytest.skip(f"{num_ranks()} ranks do not split into {nodes} groups")
        _BUF[transport] = jax_ep.Buffer(gpu_mesh(), AXIS, hidden=H, max_tokens_per_rank=128,
                                        num_experts=E, top_k=8, dtype=jnp.float32,
                                        name=f"internode_{transport}", transport=transport,
                                        num_nodes=nodes)
    buf = _BUF[transport]
    assert buf.num_nodes > 1 and buf.num_ranks == num_ranks()
    return buf


def group_limited(n: int, t: int, k: int, e: int, nodes: int, max_nodes: int, seed: int) -> np.ndarray:
    """DeepSeek-V3-style group-limited routing: each token's k experts come from at
    most `max_nodes` nodes (a node is a contiguous group of e // nodes experts)."""
    rng = np.random.default_rng(seed)
    per = e // nodes
    out = np.empty((n * t, k), np.int32)
    for i in range(n * t):
        groups = rng.choice(nodes, min(max_nodes, nodes), replace=False)
        pool = (groups[:, None] * per + np.arange(per)[None, :]).ravel()
        out[i] = rng.choice(pool, k, replace=False)
    return out


def _routing(kind: str, n: int, seed: int) -> np.ndarray:
    if kind == "group":
        return group_limited(n, T, K, E, distributed.num_nodes(), 1 if seed % 2 else 2, seed)
    return routing(kind, n, T, K, E, seed=seed)


def _body(buf, backend, layout, fp8, out_dtype, cap, weighted, dtype):
    return dispatch_combine_body(backend, layout, fp8, out_dtype, cap, None, weighted, dtype, E, buf)


CASES = [
    # layout, fp8, out_dtype, capacity, weighted, dtype, routing
    ("experts", False, None, None, True, jnp.bfloat16, "random"),
    ("experts", False, None, None, True, jnp.bfloat16, "group"),
    ("experts", False, None, None, False, jnp.float32, "messy"),
    ("experts", False, None, 0.7, True, jnp.bfloat16, "zipf"),
    ("experts", False, None, None, True, jnp.bfloat16, "one_rank"),
    ("experts", False, None, None, True, jnp.float16, "empty_rank"),
    ("experts", True, None, None, True, jnp.bfloat16, "group"),
    ("experts", True, jnp.bfloat16, None, True, jnp.bfloat16, "messy"),
    ("tokens", False, None, None, False, jnp.bfloat16, "group"),
    ("tokens", False, None, 0.5, False, jnp.bfloat16, "messy"),
    ("tokens", True, None, None, False, jnp.bfloat16, "random"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_internode_matches_xla(case, transport):
    buf = _buffer(transport)
    layout, fp8, out_dtype, cap, weighted, dtype, kind = case
    n = num_ranks()
    rng = np.random.default_rng(CASES.index(case))
    x = rng.standard_normal((n * T, H)).astype(np.float32)
    idx = _routing(kind, n, seed=len(kind) * 7 + n + CASES.index(case))
    w = rng.random((n * T, K)).astype(np.float32)
    key = ("internode", transport) + tuple(str(v) for v in case)
    got = run_gpu(key + ("cuda",), _body(buf, "cuda", *case[:6]), x, idx, w)
    want = run_oracle(key + ("xla",), _body(None, "xla", *case[:6]), x, idx, w)
    assert_same(got, want, f"internode {case}")


def _grad_fn(buf, backend, layout):
    return grad_body(backend, layout, E, buf)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("layout", ["experts", "tokens"])
def test_internode_grad_matches_xla(layout, transport):
    """Gradients through shard_map: the backward of combine is the internode
    redispatch (y rows put once per node that holds a row of the token)."""
    buf = _buffer(transport)
    n = num_ranks()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n * T, H)).astype(np.float32)
    idx = _routing("group", n, seed=12)
    w = rng.random((n * T, K)).astype(np.float32)
    got = run_gpu(("internode-grad", layout, transport), _grad_fn(buf, "cuda", layout), x, idx, w)
    want = run_oracle(("internode-grad", layout, "xla"), _grad_fn(None, "xla", layout), x, idx, w)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-5, err_msg=k)
    assert np.any(got["gw"] != 0)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_internode_soak(transport):
    """5,000 dispatch+combine calls with a new routing each time, checked in the graph."""
    buf = _buffer(transport)
    n = num_ranks()
    t, h, e, k = 64, 128, 16, 4
    steps, calls = 25, 200

    body = soak_body(n, e, steps, buf)

    rng = np.random.default_rng(3)
    x = rng.standard_normal((n * t, h)).astype(jnp.bfloat16)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(n * t)]).astype(np.int32)
    bad = 0
    for c in range(calls):
        bad += int(np.sum(run_gpu(("internode-soak", transport), body, x, np.roll(idx, c, axis=0))))
    assert bad == 0, f"{bad} mismatching elements over {steps * calls} calls"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_internode_buffer_has_its_regions(transport):
    buf = _buffer(transport)
    off = buf.layout.offsets()
    assert all(f"{r}0" in off for r in ("rdma_recv", "comb_fwd", "vals_fwd", "fwd_tag"))
    assert all(k in off for k in ("rdma_flag", "rdma_ready", "fwd_inbox")) and "nodes=" in repr(buf)
    # The native state runs the internode protocol with the Buffer's node count.
    from jax_ep import _ext

    for d in buf._native.devices:
        assert _ext.describe(buf.buffer_id, d)["num_nodes"] == buf.num_nodes
