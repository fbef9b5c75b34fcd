"""Quick start: one expert-parallel MoE step on every local device, checked.

    python -m jax_ep.demo [--tokens 256] [--hidden 256] [--experts 64] [--top-k 8]

Routes a DeepSeek-like batch (sigmoid gating, group-limited top-k) through
`jax_ep.dispatch` -> a SwiGLU expert FFN per local expert (`jax.lax.ragged_dot`
on the `experts` layout) -> `jax_ep.combine`, inside `jax.shard_map` over all
devices, and compares the result with a dense computation of the same experts
on every token. Exits non-zero when the error is above the tolerance.

Without a GPU it runs on 8 simulated CPU devices. On GPUs it creates a
`jax_ep.Buffer`, so `backend="auto"` uses the CUDA kernels when the extension
is built (and the xla backend otherwise). Under `python -m jax_ep.launch` every
process contributes its devices.
"""

from __future__ import annotations

import os

_CPU_DEVICES = "--xla_force_host_platform_device_count"
# Only the CPU client reads this flag, so it is harmless on GPU hosts; it must be
# set before the first backend is created.
if _CPU_DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_DEVICES}=8".strip()

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep.flax.gating import deepseek_gating  # noqa: E402

# Max abs error allowed, relative to the largest reference value.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "fp8": 1e-1}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jax_ep.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256, help="tokens per device (default 256)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size H (default 256)")
    p.add_argument("--ffn", type=int, default=64, help="expert FFN width F (default 64)")
    p.add_argument("--experts", type=int, default=64, help="routed experts E (default 64)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token K (default 8)")
    p.add_argument("--groups", type=int, default=8, help="expert groups n_group (default 8)")
    p.add_argument("--topk-groups", type=int, default=4, help="groups per token (default 4)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--fp8", action="store_true", help="move tokens in FP8 (dequantized to bfloat16)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="sender-side capacity (default: dropless)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="static rows per device (default: 2 x tokens x top-k, twice the "
                        "mean; 0: the dropless worst case, tokens x devices x min(K, E_local))")
    p.add_argument("--backend", choices=("auto", "xla", "cuda"), default="auto")
    p.add_argument("--iters", type=int, default=3, help="timed steps after the first (default 3)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _make_buffer(mesh, args, dtype) -> Optional[jax_ep.Buffer]:
    """A Buffer on GPUs, so "auto" can pick the kernels; None elsewhere."""
    if mesh.devices.flat[0].platform != "gpu" or args.backend == "xla":
        return None
    try:
        return jax_ep.Buffer(mesh, "ep", hidden=args.hidden, max_tokens_per_rank=args.tokens,
                             num_experts=args.experts, top_k=args.top_k, dtype=dtype)
    except (ImportError, RuntimeError) as e:
        print(f"  no jax_ep.Buffer ({e}); continuing on the xla backend")
        return None


def swiglu_ffn(x, w_gate_up, w_down, group_sizes):
    """Each row through its local expert's SwiGLU FFN, one grouped GEMM per projection."""
    h = jax.lax.ragged_dot(x, w_gate_up, group_sizes)
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from jax_ep import distributed
        distributed.initialize()
    except ImportError:
        pass
    devices = jax.devices()
    R = len(devices)
    E, K, H, F, T = args.experts, args.top_k, args.hidden, args.ffn, args.tokens
    if args.max_rows is None and args.capacity_factor is None:
        args.max_rows = 2 * T * K
    max_rows = args.max_rows or None
    dtype = jnp.dtype(jnp.bfloat16 if args.fp8 else args.dtype)
    if E % R:
        print(f"error: --experts {E} must be divisible by the {R} devices", file=sys.stderr)
        return 2
    mesh = jax.make_mesh((R,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    say(f"jax_ep {jax_ep.__version__} quick start on {R} {devices[0].platform} device(s) "
        f"({jax.process_count()} process(es)), jax {jax.__version__}")
    say(f"  batch: {T} tokens/device x {R} = {T * R} tokens, hidden {H}, {E} experts "
        f"({E // R}/device), top-{K} from {args.topk_groups} of {args.groups} groups, "
        f"{args.dtype}{' + fp8 dispatch' if args.fp8 else ''}")
    buffer = _make_buffer(mesh, args, dtype)
    kernels = args.backend == "cuda" or (args.backend == "auto" and buffer is not None and buffer.allocated)
    say(f"  backend: {args.backend} -> {'cuda (kernels)' if kernels else 'xla'}")

    split = NamedSharding(mesh, P("ep"))  # tokens and experts alike

    @jax.jit
    def make_inputs(key):
        kx, kr, kb, k1, k2 = jax.random.split(key, 5)
        x = jax.random.normal(kx, (R * T, H), jnp.float32).astype(dtype)
        router = jax.random.normal(kr, (H, E), jnp.float32) * H ** -0.5
        # A per-expert offset makes the load uneven, as in a real batch.
        bias = 0.5 * jax.random.normal(kb, (E,), jnp.float32)
        w_gate_up = (jax.random.normal(k1, (E, H, 2 * F), jnp.float32) * H ** -0.5).astype(dtype)
        w_down = (jax.random.normal(k2, (E, F, H), jnp.float32) * F ** -0.5).astype(dtype)
        logits = x.astype(jnp.float32) @ router + bias
        r = deepseek_gating(logits, jnp.zeros((E,)), top_k=K, n_group=args.groups,
                            topk_group=args.topk_groups, routed_scaling_factor=2.5)
        out = (x, r.topk_idx, r.topk_weights, w_gate_up, w_down)
        return jax.lax.with_sharding_constraint(out, (split,) * 5)

    def per_device(x, idx, w, w_gate_up, w_down):
        out = jax_ep.dispatch(
            x, idx, w, num_experts=E, axis_name="ep", capacity_factor=args.capacity_factor,
            max_rows=max_rows, fp8=args.fp8, out_dtype=dtype if args.fp8 else None, buffer=buffer,
            backend=args.backend,
        )
        rows = swiglu_ffn(out.x, w_gate_up, w_down, out.group_sizes)
        y = jax_ep.combine(rows, out.handle, weights=out.weights)
        h = out.handle
        stats = (out.group_sizes[None], jnp.sum(out.group_sizes)[None], h.num_overflow[None],
                 h.num_dropped[None])
        return y, stats

    ep_step = jax.jit(jax.shard_map(
        per_device, mesh=mesh, in_specs=(P("ep"),) * 5, out_specs=(P("ep"), (P("ep"),) * 4)))

    @jax.jit
    def dense(x, idx, w, w_gate_up, w_down):
        """Every token through every expert, then its top-k weights: no communication."""
        xf = x.astype(jnp.float32)
        h = jnp.einsum("nh,ehf->nef", xf, w_gate_up.astype(jnp.float32))
        gate, up = jnp.split(h, 2, axis=-1)
        out = jnp.einsum("nef,efh->neh", jax.nn.silu(gate) * up, w_down.astype(jnp.float32))
        tokens = jnp.arange(x.shape[0])[:, None]
        dense_w = jnp.zeros((x.shape[0], E), jnp.float32).at[tokens, idx].add(w)
        return jnp.einsum("ne,neh->nh", dense_w, out)

    @jax.jit
    def summarize(y, ref, stats):
        sizes, used, overflow, dropped = stats
        per_expert = sizes.reshape(-1).astype(jnp.float32)
        err = jnp.max(jnp.abs(y.astype(jnp.float32) - ref))
        return dict(err=err, scale=jnp.max(jnp.abs(ref)), min=per_expert.min(),
                    mean=per_expert.mean(), max=per_expert.max(), used=jnp.max(used),
                    overflow=jnp.sum(overflow), dropped=jnp.sum(dropped))

    inputs = make_inputs(jax.random.key(args.seed))
    t0 = time.perf_counter()
    y, stats = jax.block_until_ready(ep_step(*inputs))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
        y, stats = ep_step(*inputs)
    jax.block_until_ready(y)
    step = (time.perf_counter() - t0) / max(args.iters, 1)
    ref = dense(*inputs)
    s = {k: float(v) for k, v in summarize(y, ref, stats).items()}

    C = jax_ep.rows_needed(T, K, E, R, capacity_factor=args.capacity_factor, max_rows=max_rows)
    tol = TOLERANCE["fp8" if args.fp8 else args.dtype]
    rel = s["err"] / max(s["scale"], 1e-30)
    say("  dispatch -> SwiGLU experts (ragged_dot) -> combine, inside shard_map")
    say(f"  rows per expert: min {s['min']:.0f}, mean {s['mean']:.1f}, max {s['max']:.0f} "
        f"(routed pairs {T * R * K}); busiest device used {s['used']:.0f} of {C} static rows")
    say(f"  dropped slots: {s['dropped']:.0f}, overflowed rows: {s['overflow']:.0f}")
    say(f"  max |EP - dense| = {s['err']:.3g} ({rel:.2e} of max |dense| = {s['scale']:.3g}; "
        f"tolerance {tol:g})")
    say(f"  time: first call {first * 1e3:.0f} ms (compile), then {step * 1e3:.2f} ms/step")
    if s["dropped"] or s["overflow"]:
        say("OK (rows were dropped, so the dense comparison is informative only)")
        return 0
    if rel > tol:
        say("FAILED: expert-parallel result differs from the dense computation")
        return 1
    say("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
