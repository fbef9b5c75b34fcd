"""jax_ep.all_reduce on the kernels against the xla backend, bit for bit, on every rank."""

import jax.numpy as jnp
import numpy as np

import jax_ep
from harness import AXIS, assert_same, buffer, dispatch_combine_body, num_ranks, routing, run_gpu, run_oracle

# The test Buffer stages 128 x 256 float32 values (32,768) per piece: 100,003 values
# take four pieces, the last one padded.
N_BIG = 100_003


def _tree_body(backend):
    def body(a, b, c):
        return jax_ep.all_reduce(dict(a=a, b=b, c=c), axis_name=AXIS, backend=backend)

    return body


def test_all_reduce_matches_xla():
    n = num_ranks()
    buffer()
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((n, N_BIG)) * 100).astype(np.float32)
    b = rng.standard_normal((n * 4, 9)).astype(jnp.bfloat16)
    c = rng.integers(-5000, 5000, (n * 2, 3)).astype(np.int32)
    got = run_gpu(("ar", "cuda"), _tree_body("cuda"), a, b, c)
    want = run_oracle(("ar", "xla"), _tree_body("xla"), a, b, c)
    assert_same(got, want, "all_reduce")
    # and the sum is the rank-order sum of the inputs
    acc = a[0].astype(np.float32)
    for r in range(1, n):
        acc = acc + a[r]
    np.testing.assert_array_equal(got["a"].reshape(-1, N_BIG)[0], acc)


def test_all_reduce_between_dispatch_and_combine_calls():
    """The same Buffer serves dispatch, combine and all_reduce in one step."""
    n, T, H, E, K = num_ranks(), 64, 256, 32, 4
    buffer()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n * T, H)).astype(np.float32)
    idx = routing("random", n, T, K, E, seed=9)
    w = rng.random((n * T, K)).astype(np.float32)

    def make(backend):
        inner = dispatch_combine_body(backend, "experts", False, None, None, None, True, jnp.bfloat16, E)

        def body(x, idx, w):
            first = inner(x, idx, w)
            s = jax_ep.all_reduce(first["y"].astype(jnp.float32), axis_name=AXIS, backend=backend)
            again = inner(x + s.astype(x.dtype) * 1e-3, idx, w)
            return dict(y=again["y"], s=s, sizes=jax_ep.all_reduce(again["sizes"], axis_name=AXIS,
                                                                   backend=backend))

        return body

    got = run_gpu(("ar-dc", "cuda"), make("cuda"), x, idx, w)
    want = run_oracle(("ar-dc", "xla"), make("xla"), x, idx, w)
    assert_same(got, want, "dispatch/all_reduce/dispatch")
