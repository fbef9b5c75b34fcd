"""Low-latency CUDA kernels (peer pointers) against the xla backend, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from harness import assert_same, buffer, num_ranks, routing, run_gpu, run_oracle

H, E, K, M = 256, 32, 6, 64


def _body(backend, fp8, round_scale, overlap):
    def body(x, idx, w):
        kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, fp8=fp8,
                  round_scale=round_scale, backend=backend)
        if overlap:  # the split calls with work pinned between them
            r, _ = jax_ep.overlap(lambda: jax_ep.low_latency_dispatch_send(x, idx, **kw),
                                  lambda v: v * 2, jax_ep.low_latency_dispatch_recv, x)
        else:
            r = jax_ep.low_latency_dispatch(x, idx, **kw)
        rows = (r.x.data, r.x.scales) if fp8 else r.x
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
    for _ in range(1000):
        got = run_gpu(("llr", "cuda"), _body("cuda", True, False, False), x, idx, w)
    assert_same(got, want, "replay")
    calls, captured = (a - b for a, b in zip(_ext.capture_stats(), before))
    assert captured >= 1 and calls < 1000, (calls, captured)
