"""A few jax_ep calls on one GPU for compute-sanitizer without a kernel filter (every
kernel instrumented, XLA's too, so memory that XLA wrote counts as written): normal
dispatch and combine (experts BF16, tokens BF16, experts FP8) and a low-latency round
trip, twice each, at small shapes.

    JAX_PLATFORMS=cuda,cpu compute-sanitizer --tool initcheck python tests/gpu/sanitizer_probe.py
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import jax_ep

T, H, E, K = 64, 256, 32, 4


def normal(layout: str, fp8: bool):
    def f(x, idx, w):
        out = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", layout=layout, fp8=fp8,
                              out_dtype=jnp.bfloat16 if fp8 else None, backend="cuda")
        return jax_ep.combine(out.x, out.handle, out.weights if layout == "experts" else None)
    return f


def low_latency(buf):
    def f(x, idx, w):
        r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep", max_tokens_per_rank=T,
                                        fp8=True, buffer=buf, backend="cuda")
        return jax_ep.low_latency_combine(r.x.dequantize(jnp.bfloat16), idx, w, r.handle)
    return f


def main() -> None:
    mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
    buf = jax_ep.Buffer(mesh, "ep", hidden=H, max_tokens_per_rank=T, num_experts=E, top_k=K,
                        dtype=jnp.bfloat16, low_latency=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((T, H)), jnp.bfloat16)
    idx = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]), jnp.int32)
    w = jnp.asarray(rng.random((T, K)), jnp.float32)
    calls = [("experts bf16", normal("experts", False)), ("tokens bf16", normal("tokens", False)),
             ("experts fp8", normal("experts", True)), ("low latency", low_latency(buf))]
    for name, f in calls:
        g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
        for _ in range(2):
            y = np.asarray(g(x, idx, w))
        print(name, "ok", float(np.abs(y.astype(np.float32)).sum()), flush=True)
    buf.close()


if __name__ == "__main__":
    main()
