"""Fault scenarios, one per launcher run (tests/gpu/test_faults_gpu.py runs them):

    python -m jax_ep.launch --nproc 2 --share-gpu --mps -- \
        env JAX_PLATFORMS=cuda,cpu JAX_EP_TIMEOUT_S=5 python tests/gpu/faults.py SCENARIO

missing   rank 1 never makes the call: rank 0 must stop at its deadline naming rank 1.
killed    rank 1 dies (SIGKILL) after a good call: rank 0's next call stops at its deadline.
hidden    the ranks call dispatch with different hidden sizes: a MISMATCH error.
capacity  the ranks call dispatch with different capacity factors: a MISMATCH error.
layout    rank 0 dispatches in the experts layout, rank 1 in the tokens layout: a MISMATCH.
config    the ranks create their Buffers with different hidden sizes: an error at creation.
order     every rank issues two low-latency dispatch sends before either receive (calls
          XLA may order that way when nothing joins them): an ORDER error, not a hang.
ok        every rank makes the same calls: exits 0 (the control).

Each rank prints `[faults] SCENARIO rank R start T` (wall seconds) before the call
that should fail, so the test measures the time to the error.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jax_ep import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402
from harness import AXIS, gpu_mesh, my_rank, num_ranks, run_gpu  # noqa: E402

H, T, E, K = 256, 64, 16, 4


def start(scenario: str) -> None:
    print(f"[faults] {scenario} rank {my_rank()} start {time.time():.3f}", flush=True)


def inputs(h: int = H):
    rng = np.random.default_rng(0)
    n = num_ranks()
    x = rng.standard_normal((n * T, h)).astype(jnp.bfloat16)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(n * T)]).astype(np.int32)
    return x, idx


def dispatch_combine(tag, h: int = H, **kw):
    def body(x, idx):
        out = jax_ep.dispatch(x, idx, num_experts=E, axis_name=AXIS, backend="cuda", **kw)
        return jax_ep.combine(out.x, out.handle)

    return run_gpu((tag, h, tuple(sorted(kw.items()))), body, *inputs(h))


def main(scenario: str) -> int:
    rank = my_rank()
    hidden = H if scenario != "config" or rank == 0 else H // 2
    jax_ep.Buffer(gpu_mesh(), AXIS, hidden=hidden, max_tokens_per_rank=T, num_experts=E, top_k=K,
                  dtype=jnp.bfloat16, low_latency=True)
    if scenario == "config":
        print("[faults] config: Buffer creation did not fail", flush=True)
        return 3
    dispatch_combine("warm")  # a good call first: every rank connected and compiled
    if scenario == "ok":
        start(scenario)
        dispatch_combine("again")
        print(f"[faults] ok rank {rank} done", flush=True)
        return 0
    if scenario == "missing":
        if rank == 1:
            time.sleep(120)  # never makes the call; the launcher stops it
            return 0
        start(scenario)
        dispatch_combine("again")
    elif scenario == "killed":
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        start(scenario)
        time.sleep(1.0)  # rank 1 is gone before rank 0 calls
        dispatch_combine("again")
    elif scenario == "hidden":
        start(scenario)
        dispatch_combine("h", h=H if rank == 0 else H // 2)
    elif scenario == "capacity":
        start(scenario)
        dispatch_combine("c", capacity_factor=1.0 if rank == 0 else 2.0)
    elif scenario == "layout":
        start(scenario)
        dispatch_combine("l", layout="experts" if rank == 0 else "tokens")
    elif scenario == "order":
        def two_sends(x, idx):
            kw = dict(num_experts=E, axis_name=AXIS, max_tokens_per_rank=T, backend="cuda")
            p1 = jax_ep.low_latency_dispatch_send(x, idx, **kw)
            p1, x2 = jax.lax.optimization_barrier((p1, x * 2))  # the second send before the first recv
            p2 = jax_ep.low_latency_dispatch_send(x2, idx, **kw)
            p1, p2 = jax.lax.optimization_barrier((p1, p2))
            return jax_ep.low_latency_dispatch_recv(p1).count, jax_ep.low_latency_dispatch_recv(p2).count

        start(scenario)
        run_gpu(("order",), two_sends, *inputs())
    else:
        print(f"unknown scenario {scenario}", file=sys.stderr)
        return 2
    print(f"[faults] {scenario} rank {rank}: the call returned", flush=True)
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
