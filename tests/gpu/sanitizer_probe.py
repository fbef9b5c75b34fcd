"""A few jax_ep calls for compute-sanitizer without a kernel filter (every kernel
instrumented, XLA's too, so memory that XLA wrote counts as written): normal dispatch
and combine (experts BF16, tokens BF16, experts FP8) and a low-latency round trip,
twice each, at small shapes, over every GPU of this one process (one process driving
several GPUs: the tool sees every rank's writes, which it cannot across processes).

    JAX_PLATFORMS=cuda,cpu compute-sanitizer --tool initcheck python tests/gpu/sanitizer_probe.py
    python tests/gpu/sanitizer_probe.py --backend xla    # the same calls on CPU devices
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import jax_ep

T, H, E, K = 64, 256, 32, 4


def normal(layout: str, fp8: bool, backend: str):
    def f(x, idx, w):
        out = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", layout=layout, fp8=fp8,
                              out_dtype=jnp.bfloat16 if fp8 else None, backend=backend)
        return jax_ep.combine(out.x, out.handle, out.weights if layout == "experts" else None)
    return f


def low_latency(buf, backend: str):
    def f(x, idx, w):
        r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep", max_tokens_per_rank=T,
                                        fp8=True, buffer=buf, backend=backend)
        return jax_ep.low_latency_combine(r.x.dequantize(jnp.bfloat16), idx, w, r.handle)
    return f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("cuda", "xla"), default="cuda")
    p.add_argument("--devices", type=int, default=None, help="ranks (default: every local device)")
    args = p.parse_args()
    devices = jax.local_devices()[:args.devices]
    n = len(devices)
    mesh = Mesh(np.array(devices), ("ep",))
    buf = jax_ep.Buffer(mesh, "ep", hidden=H, max_tokens_per_rank=T, num_experts=E, top_k=K,
                        dtype=jnp.bfloat16, low_latency=True) if args.backend == "cuda" else None
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n * T, H)), jnp.bfloat16)
    idx = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(n * T)]), jnp.int32)
    w = jnp.asarray(rng.random((n * T, K)), jnp.float32)
    b = args.backend
    calls = [("experts bf16", normal("experts", False, b)), ("tokens bf16", normal("tokens", False, b)),
             ("experts fp8", normal("experts", True, b)), ("low latency", low_latency(buf, b))]
    print(f"{n} rank(s) on {devices[0].platform}, backend {b}", flush=True)
    for name, f in calls:
        g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
        for _ in range(2):
            y = np.asarray(g(x, idx, w))
        print(name, "ok", float(np.abs(y.astype(np.float32)).sum()), flush=True)
    if buf is not None:
        buf.close()


if __name__ == "__main__":
    main()
