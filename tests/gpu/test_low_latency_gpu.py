"""Low-latency CUDA kernels (peer pointers) against the xla backend, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from harness import assert_same, buffer, copying_buffer, num_ranks, routing, run_gpu, run_oracle

H, E, K, M = 256, 32, 6, 64


def _body(backend, fp8, round_scale, overlap, buffer=None, m=M, zero_padding=True, e=E):
    def body(x, idx, w):
        kw = dict(num_experts=e, axis_name="ep", max_tokens_per_rank=m, fp8=fp8,
                  round_scale=round_scale, backend=backend, buffer=buffer, zero_padding=zero_padding)
        if overlap:  # the split calls with work pinned between them
            r, _ = jax_ep.overlap(lambda: jax_ep.low_latency_dispatch_send(x, idx, **kw),
                                  lambda v: v * 2, jax_ep.low_latency_dispatch_recv, x)
        else:
            r = jax_ep.low_latency_dispatch(x, idx, **kw)
        rows = (r.x.data, r.x.scales) if fp8 else r.x
        if not zero_padding:  # only the first count[e] rows are specified
            valid = jnp.arange(rows[0].shape[1] if fp8 else rows.shape[1]) < r.count[:, None]
            rows = jax.tree.map(lambda a: jnp.where(valid[:, :, None], a, jnp.zeros((), a.dtype)), rows)
        expert_out = (r.x.dequantize(jnp.bfloat16) if fp8 else r.x) * jnp.asarray(1.5, jnp.bfloat16)
        y = jax_ep.low_latency_combine(expert_out, idx, w, r.handle)
        return dict(rows=rows, count=r.count, y=y)

    return body


CASES = [
    # fp8, round_scale, routing, tokens per rank, overlap
    (True, False, "random", M, False),
    (True, True, "zipf", 17, False),
    (False, False, "messy", 33, False),
    (True, False, "one_rank", 1, False),
    (False, False, "empty_rank", M, True),
    (True, False, "messy", M, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_low_latency_matches_xla(case):
    fp8, round_scale, kind, t, overlap = case
    n = num_ranks()
    buffer()
    rng = np.random.default_rng(100 + CASES.index(case))
    x = rng.standard_normal((n * t, H)).astype(jnp.bfloat16)
    idx = routing(kind, n, t, K, E, seed=CASES.index(case))
    w = rng.random((n * t, K)).astype(np.float32)
    key = ("ll",) + tuple(map(str, case))
    got = run_gpu(key + ("cuda",), _body("cuda", fp8, round_scale, overlap), x, idx, w)
    want = run_oracle(key + ("xla",), _body("xla", fp8, round_scale, overlap), x, idx, w)
    assert_same(got, want, str(case))


def test_low_latency_windows_and_copies_agree():
    """The combine with windows (each source reads the expert rows where the
    experts' ranks hold them) and on a Buffer without (the rows are pushed into
    the sources' combine slots): both bit for bit the xla backend's."""
    n = num_ranks()
    buffer()
    copying = copying_buffer("ll-copying", hidden=H, max_tokens_per_rank=M, num_experts=E, top_k=K,
                             dtype=jnp.bfloat16, low_latency=True)
    try:
        for i, (fp8, kind, t, overlap) in enumerate([(True, "random", M, False), (False, "messy", 33, True),
                                                     (True, "one_rank", 5, False)]):
            rng = np.random.default_rng(600 + i)
            x = rng.standard_normal((n * t, H)).astype(jnp.bfloat16)
            idx = routing(kind, n, t, K, E, seed=90 + i)
            w = rng.random((n * t, K)).astype(np.float32)
            key = ("llwin", i)
            want = run_oracle(key + ("xla",), _body("xla", fp8, False, overlap), x, idx, w)
            for step in range(3):  # later calls on the same memory
                fast = run_gpu(key + ("default",), _body("cuda", fp8, False, overlap), x, idx, w)
                slow = run_gpu(key + ("copying",), _body("cuda", fp8, False, overlap, buffer=copying), x, idx, w)
                assert_same(fast, want, f"windows {kind} fp8={fp8}")
                assert_same(slow, want, f"copies {kind} fp8={fp8}")
    finally:
        copying.close()


_NVSHMEM = []


def _nvshmem_buffer() -> jax_ep.Buffer:
    """A second Buffer, on NVSHMEM symmetric memory: the kernels put and signal
    through NVSHMEM (over P2P on one GPU) instead of storing through peer pointers."""
    from harness import AXIS, gpu_mesh, my_rank

    from jax_ep import nvshmem

    if not nvshmem.available():
        pytest.skip("jax_ep built without NVSHMEM")
    my_rank()  # one GPU per process, as the NVSHMEM transport needs (skips otherwise)
    if not _NVSHMEM:
        nvshmem.initialize()
        _NVSHMEM.append(jax_ep.Buffer(gpu_mesh(), AXIS, hidden=H, max_tokens_per_rank=M, num_experts=E,
                                      top_k=K, dtype=jnp.bfloat16, low_latency=True, name="nvshmem",
                                      transport="nvshmem"))
    return _NVSHMEM[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_low_latency_nvshmem_matches_xla(case):
    fp8, round_scale, kind, t, overlap = case
    n = num_ranks()
    nv = _nvshmem_buffer()
    rng = np.random.default_rng(200 + CASES.index(case))
    x = rng.standard_normal((n * t, H)).astype(jnp.bfloat16)
    idx = routing(kind, n, t, K, E, seed=50 + CASES.index(case))
    w = rng.random((n * t, K)).astype(np.float32)
    key = ("llnv",) + tuple(map(str, case))
    got = run_gpu(key + ("cuda",), _body("cuda", fp8, round_scale, overlap, buffer=nv), x, idx, w)
    want = run_oracle(key + ("xla",), _body("xla", fp8, round_scale, overlap), x, idx, w)
    assert_same(got, want, "nvshmem " + str(case))


# Rows wide enough that the kernels split one token's row over several warps (the
# dispatch send in pieces of 128 16-byte units, the last one partial here; the
# combine receive in up to 16 pieces), with few tokens so warps are to spare.
WIDE_H, WIDE_M = 2304, 8
_WIDE = {}


def _wide_buffer(transport: str) -> jax_ep.Buffer:
    from harness import AXIS, gpu_mesh

    if transport == "nvshmem":
        _nvshmem_buffer()  # skips without NVSHMEM; starts it otherwise
    if transport not in _WIDE:
        _WIDE[transport] = jax_ep.Buffer(gpu_mesh(), AXIS, hidden=WIDE_H, max_tokens_per_rank=WIDE_M,
                                         num_experts=E, top_k=K, dtype=jnp.bfloat16, low_latency=True,
                                         name=f"wide-{transport}", transport=transport)
    return _WIDE[transport]


@pytest.mark.parametrize("transport", ["peer", "nvshmem"])
@pytest.mark.parametrize("fp8,t", [(True, 1), (True, 5), (False, 3)])
def test_low_latency_wide_rows_match_xla(transport, fp8, t):
    n = num_ranks()
    buf = _wide_buffer(transport)
    rng = np.random.default_rng(300 + t)
    x = rng.standard_normal((n * t, WIDE_H)).astype(jnp.bfloat16)
    idx = routing("random", n, t, K, E, seed=60 + t)
    w = rng.random((n * t, K)).astype(np.float32)
    key = ("llwide", transport, fp8, t)
    got = run_gpu(key + ("cuda",), _body("cuda", fp8, False, False, buffer=buf, m=WIDE_M), x, idx, w)
    want = run_oracle(key + ("xla",), _body("xla", fp8, False, False, m=WIDE_M), x, idx, w)
    assert_same(got, want, f"wide rows {transport} fp8={fp8} t={t}")


# Many tokens per rank: a token's place among its expert's tokens comes from a
# table per 32 tokens (built in shared memory) plus its own 32, or, where the
# table does not fit (1,024 tokens of 256 experts), from all earlier tokens.
_MANY = {}


@pytest.mark.parametrize("t,e,kind", [(256, 64, "random"), (256, 64, "messy"), (1024, 256, "random")])
def test_low_latency_many_tokens_match_xla(t, e, kind):
    from harness import AXIS, gpu_mesh

    n, h, k = num_ranks(), 128, 8
    if (t, e) not in _MANY:
        _MANY[(t, e)] = jax_ep.Buffer(gpu_mesh(), AXIS, hidden=h, max_tokens_per_rank=t, num_experts=e,
                                      top_k=k, dtype=jnp.bfloat16, low_latency=True, name=f"many-{t}-{e}")
    rng = np.random.default_rng(500 + t)
    x = rng.standard_normal((n * t, h)).astype(jnp.bfloat16)
    idx = routing(kind, n, t, k, e, seed=80 + t)
    w = rng.random((n * t, k)).astype(np.float32)
    key = ("llmany", t, e, kind)
    got = run_gpu(key + ("cuda",), _body("cuda", True, False, False, buffer=_MANY[(t, e)], m=t, e=e), x, idx, w)
    want = run_oracle(key + ("xla",), _body("xla", True, False, False, m=t, e=e), x, idx, w)
    assert_same(got, want, f"many tokens t={t} e={e} {kind}")


@pytest.mark.parametrize("transport", ["peer", "nvshmem"])
@pytest.mark.parametrize("fp8,kind,t", [(True, "random", M), (False, "zipf", 9), (True, "one_rank", 3)])
def test_low_latency_padding_unset_matches_xla(transport, fp8, kind, t):
    """zero_padding=False: the rows up to count[e], the counts and the combine
    (whose expert rows past count[e] hold whatever the output memory held,
    NaN bytes included) are those of the xla backend, bit for bit."""
    n = num_ranks()
    buf = _nvshmem_buffer() if transport == "nvshmem" else buffer()
    rng = np.random.default_rng(400 + t)
    x = rng.standard_normal((n * t, H)).astype(jnp.bfloat16)
    idx = routing(kind, n, t, K, E, seed=70 + t)
    w = rng.random((n * t, K)).astype(np.float32)
    key = ("llpad", transport, fp8, kind, t)
    for step in range(3):  # later calls land on memory earlier calls wrote
        got = run_gpu(key + ("cuda",), _body("cuda", fp8, False, False, buffer=buf, zero_padding=False),
                      x, idx, w)
    want = run_oracle(key + ("xla",), _body("xla", fp8, False, False, zero_padding=False), x, idx, w)
    assert_same(got, want, f"padding unset {transport} fp8={fp8} {kind}")


@pytest.mark.parametrize("transport", ["peer", "nvshmem"])
def test_back_to_back_dispatches_match_xla(transport):
    """Two dispatches with different routings and no combine between them: a rank
    that finished the first goes on to send the second while others still read
    the first (the count words of the two calls must not collide). The second
    call's input depends on the first call's output: XLA may run independent
    calls on one Buffer in either order (docs/semantics.md, "Call order")."""
    n = num_ranks()
    buf = _nvshmem_buffer() if transport == "nvshmem" else buffer()
    rng = np.random.default_rng(500)
    x = rng.standard_normal((n * M, H)).astype(jnp.bfloat16)
    idx1 = routing("zipf", n, M, K, E, seed=81)
    idx2 = routing("messy", n, M, K, E, seed=82)

    def body(backend, b):
        def f(x, i1, i2):
            kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, backend=backend, buffer=b)
            r1 = jax_ep.low_latency_dispatch(x, i1, **kw)
            r1, x2 = jax.lax.optimization_barrier((r1, x * 2))  # the second call after the first
            r2 = jax_ep.low_latency_dispatch(x2, i2, **kw)
            return dict(x1=(r1.x.data, r1.x.scales), c1=r1.count, x2=(r2.x.data, r2.x.scales), c2=r2.count)
        return f

    key = ("llb2b", transport)
    want = run_oracle(key + ("xla",), body("xla", None), x, idx1, idx2)
    for _ in range(20):
        got = run_gpu(key + ("cuda",), body("cuda", buf), x, idx1, idx2)
        assert_same(got, want, f"back-to-back {transport}")


def test_low_latency_nvshmem_replays():
    """200 executions of one compiled step on the NVSHMEM Buffer, all exact."""
    n = num_ranks()
    nv = _nvshmem_buffer()
    rng = np.random.default_rng(8)
    x = rng.standard_normal((n * M, H)).astype(jnp.bfloat16)
    idx = routing("zipf", n, M, K, E, seed=9)
    w = rng.random((n * M, K)).astype(np.float32)
    want = run_oracle(("llnvr", "xla"), _body("xla", True, False, False), x, idx, w)
    for _ in range(200):
        got = run_gpu(("llnvr", "cuda"), _body("cuda", True, False, False, buffer=nv), x, idx, w)
    assert_same(got, want, "nvshmem replay")


def test_low_latency_replays():
    """1,000 executions of one compiled decode step (CUDA-graph replays), all exact."""
    from jax_ep import _ext

    n = num_ranks()
    buffer()
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n * M, H)).astype(jnp.bfloat16)
    idx = routing("random", n, M, K, E, seed=3)
    w = rng.random((n * M, K)).astype(np.float32)
    want = run_oracle(("llr", "xla"), _body("xla", True, False, False), x, idx, w)
    before = _ext.capture_stats()
    # XLA records a command buffer only for a run of several kernels; at one rank
    # the step has few (one per call), so the threshold is lowered to one
    graph = {"xla_gpu_graph_min_graph_size": 1}
    for _ in range(1000):
        got = run_gpu(("llr", "cuda"), _body("cuda", True, False, False), x, idx, w, compiler_options=graph)
    assert_same(got, want, "replay")
    calls, captured = (a - b for a, b in zip(_ext.capture_stats(), before))
    assert captured >= 1 and calls < 1000, (calls, captured)


def test_overlap_hides_a_late_peer():
    """The split calls let a rank compute while a late peer's messages are still
    to come. Rank 1 launches its step D late (a host-side sleep, so the delay takes
    no GPU time from the other ranks sharing the GPU); rank 0 runs compute C. With
    send -> recv -> compute rank 0 takes about D + C, with send -> compute -> recv
    about max(D, C). Needs two or more ranks (one rank has nobody to wait for)."""
    import time

    from harness import my_rank

    n = num_ranks()
    if n < 2:
        pytest.skip("needs two or more ranks")
    my_rank()  # one GPU per process (skips otherwise): the late peer is a process
    buffer()
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n * M, H)).astype(jnp.bfloat16)
    idx = routing("random", n, M, K, E, seed=5)
    w = rng.random((n * M, K)).astype(np.float32)
    a = jnp.asarray(rng.standard_normal((1024, 1024)).astype(np.float32) / 32)

    def busy(v, iters):  # matmuls whose count is data, so the program is the same on every rank
        return jax.lax.fori_loop(0, iters, lambda i, m: jnp.tanh(m @ a), v)

    def step(mode, work):
        def body(x, idx, w):
            mine = jnp.where(jax.lax.axis_index("ep") == 0, work, 0)  # rank 0 computes
            kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, fp8=False, backend="cuda")
            ones = jnp.ones((1024, 1024), jnp.float32)
            if mode == "overlap":
                r, c = jax_ep.overlap(lambda: jax_ep.low_latency_dispatch_send(x, idx, **kw),
                                      lambda v: busy(v, mine), jax_ep.low_latency_dispatch_recv, ones)
            else:  # the barrier keeps XLA from running the compute before the recv
                r = jax_ep.low_latency_dispatch(x, idx, **kw)
                r, ones = jax.lax.optimization_barrier((r, ones))
                c = busy(ones, mine)
            return dict(count=r.count, c=c[:1, :1])
        return body

    from jax_ep import distributed

    kv = distributed.kv_store("tests/overlap")

    def timed(mode, work, delay, reps=7):
        # Every run starts together (a barrier); rank 1 then sleeps `delay` seconds.
        run_gpu(("ovl", mode, work), step(mode, work), x, idx, w)  # compile, warm
        times = []
        for i in range(reps):
            kv.barrier(f"{mode}/{work}/{delay}/{i}")
            if my_rank() == 1:
                time.sleep(delay)
            t0 = time.perf_counter()
            run_gpu(("ovl", mode, work), step(mode, work), x, idx, w)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    base = timed("fused", 0, 0.0)
    # matmuls of 1024 x 1024, enough for a few times the call's own time: some ms on
    # a share of a GPU, more on a GPU of its own (rank 0 decides for every rank)
    for work in (64, 256, 1024, 4096):
        alone = timed("fused", work, 0.0)  # rank 0's compute C, nobody late
        if my_rank() == 0:
            kv.set(f"enough/{work}", "1" if alone > 3 * base or work == 4096 else "0")
        if kv.get(f"enough/{work}") == b"1":
            break
    if my_rank() == 0:  # one delay for every rank (the barriers are named by it)
        kv.set("delay", str(round(max(alone - base, 0.005), 4)))
    delay = float(kv.get("delay"))
    fused, over = timed("fused", work, delay), timed("overlap", work, delay)
    print(f"rank {my_rank()}: no work {base * 1e3:.1f} ms; {work} matmuls {alone * 1e3:.1f} ms; "
          f"peer {delay * 1e3:.1f} ms late: fused {fused * 1e3:.1f} ms, overlapped {over * 1e3:.1f} ms")
    if my_rank() == 0:
        assert alone > 3 * base, "the busy work is too small to tell anything"
        assert fused > base + 1.5 * delay, "the late peer did not delay the fused call"
        assert over < 0.8 * fused, (over, fused)
