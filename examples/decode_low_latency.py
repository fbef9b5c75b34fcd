"""Decode steps of one MoE layer with the split low-latency calls, overlapped.

    python examples/decode_low_latency.py --steps 10                       # 8 CPU devices
    python -m jax_ep.launch --nproc 8 --share-gpu --mps --sms-per-rank 16 -- \\
        python examples/decode_low_latency.py --backend cuda                 # GPU ranks

Every device of the job is one rank of a 1-D "ep" mesh, with `--tokens` decode
tokens and `E / R` routed experts. A step of the layer, on each rank:

1. route (DeepSeek-V3 gating: sigmoid affinities, top-k, normalized weights);
2. `jax_ep.overlap(dispatch_send, shared expert up-projection, dispatch_recv)`:
   the tokens are in flight while the shared expert's gate/up matmul runs;
3. the local experts: SwiGLU as batched matmuls over the [E_local, R*M, H]
   slots of the dispatch, rows past `count[e]` masked to zero;
4. `jax_ep.overlap(combine_send, shared expert down-projection, combine_recv)`;
5. y = routed + shared; the next step's input is rmsnorm(x + y).

`--steps` steps run as one `lax.scan` inside one `jax.jit`. The same loop
with the fused calls (`low_latency_dispatch`, experts, shared expert,
`low_latency_combine`) is the baseline; both are timed by wall clock after a
warm-up call. The first step is checked against a plain-jnp float32
evaluation of the layer on the same tokens (the wire's FP8 rounding
included, with the library's quantizer), and the overlapped step against the
fused one; the script exits non-zero if either differs by more than BF16
rounding allows.

On GPUs the CUDA kernels need a `jax_ep.Buffer` (made below for any backend
but "xla"); with it, backend "auto" runs them. Routed expert FFNs are kept narrow by
default (`--intermediate`), so that a step's time is mostly communication.
"""

from __future__ import annotations

import os
import sys

_CPU_DEVICES = "--xla_force_host_platform_device_count"
# Only the CPU client reads this flag; it must be set before the first backend starts.
if _CPU_DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_DEVICES}=8".strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402
from typing import NamedTuple, Optional, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep import distributed  # noqa: E402
from jax_ep.flax.gating import deepseek_gating  # noqa: E402

AXIS = "ep"
BF16 = jnp.bfloat16
# Relative Frobenius error allowed against the float32 layer: the BF16 rounding of
# the experts, the shared expert and the combine comes to about 3e-3, while an
# FP8 wire left out of the reference would already cost about 1e-2.
TOLERANCE = 1e-2


class Params(NamedTuple):
    """Layer weights (bfloat16 except the float32 router).

    router [H, E]; w_gate_up [E, H, 2F] and w_down [E, F, H] split over the EP
    axis; s_gate_up [H, 2F] and s_down [F, H] (the shared expert) replicated.
    """

    router: jax.Array
    w_gate_up: jax.Array
    w_down: jax.Array
    s_gate_up: jax.Array
    s_down: jax.Array


SPECS = Params(P(), P(AXIS), P(AXIS), P(), P())


def swiglu(h: jax.Array) -> jax.Array:
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate) * up


def rms_norm(x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


def route(x: jax.Array, router: jax.Array, top_k: int):
    r = deepseek_gating(x.astype(jnp.float32) @ router, jnp.zeros((router.shape[1],)), top_k=top_k)
    return r.topk_idx, r.topk_weights


def local_experts(got: jax_ep.LowLatencyOutput, w_gate_up, w_down) -> jax.Array:
    """SwiGLU experts on bfloat16 [E_local, R*M, H] slots; rows past count[e] are zero."""
    x = got.x.dequantize(BF16) if isinstance(got.x, jax_ep.Fp8Array) else got.x
    h = jnp.einsum("erh,ehf->erf", x, w_gate_up, preferred_element_type=jnp.float32)
    y = jnp.einsum("erf,efh->erh", swiglu(h).astype(BF16), w_down, preferred_element_type=jnp.float32)
    valid = jnp.arange(x.shape[1])[None, :] < got.count[:, None]
    return jnp.where(valid[..., None], y, 0.0).astype(BF16)


def shared_up(x: jax.Array, s_gate_up: jax.Array) -> jax.Array:
    return swiglu(jnp.dot(x, s_gate_up, preferred_element_type=jnp.float32)).astype(BF16)


def shared_down(h: jax.Array, s_down: jax.Array) -> jax.Array:
    return jnp.dot(h, s_down, preferred_element_type=jnp.float32)


def moe_layer(x, p: Params, *, split: bool, num_experts: int, top_k: int, fp8: bool, backend: str):
    """One rank's MoE layer: x bfloat16 [T, H] -> (y [T, H], topk_idx, topk_weights).

    split=True: the send/recv halves, each pair around half of the shared
    expert (`jax_ep.overlap`); split=False: the fused calls.
    """
    idx, w = route(x, p.router, top_k)
    # local_experts masks the rows past count[e], so the dispatch need not zero them
    kw = dict(num_experts=num_experts, axis_name=AXIS, max_tokens_per_rank=x.shape[0], fp8=fp8,
              backend=backend, zero_padding=False)
    if split:
        def dispatch_send():
            return jax_ep.low_latency_dispatch_send(x, idx, **kw)

        got, h = jax_ep.overlap(dispatch_send, shared_up, jax_ep.low_latency_dispatch_recv,
                                x, p.s_gate_up)
        rows = local_experts(got, p.w_gate_up, p.w_down)

        def combine_send():
            return jax_ep.low_latency_combine_send(rows, idx, w, got.handle)

        y, shared = jax_ep.overlap(combine_send, shared_down, jax_ep.low_latency_combine_recv,
                                   h, p.s_down)
    else:
        got = jax_ep.low_latency_dispatch(x, idx, **kw)
        rows = local_experts(got, p.w_gate_up, p.w_down)
        y = jax_ep.low_latency_combine(rows, idx, w, got.handle)
        shared = shared_down(shared_up(x, p.s_gate_up), p.s_down)
    return (y.astype(jnp.float32) + shared).astype(BF16), idx, w


def make_fns(mesh: Mesh, *, steps: int, **kw):
    """(first_step, decode): jitted shard_maps of one step and of `steps` steps."""
    tok = P(AXIS)

    def one(x, p):
        return moe_layer(x, p, **kw)

    def loop(x, p):
        def step(x, _):
            y, _, _ = moe_layer(x, p, **kw)
            return rms_norm((x.astype(jnp.float32) + y).astype(BF16)), None

        return jax.lax.scan(step, x, None, length=steps)[0]

    first = jax.jit(jax.shard_map(one, mesh=mesh, in_specs=(tok, SPECS), out_specs=(tok, tok, tok)))
    decode = jax.jit(jax.shard_map(loop, mesh=mesh, in_specs=(tok, SPECS), out_specs=tok))
    return first, decode


# ---------------------------------------------------------------- inputs and reference


def bf16_normal(rng, shape, std) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(ml_dtypes.bfloat16)


def make_inputs(args, n_ranks: int):
    """Global numpy inputs, identical in every process: x [R*T, H] and the weights."""
    H, F, E = args.hidden, args.intermediate, args.experts
    rng = np.random.default_rng(args.seed)
    x = bf16_normal(rng, (n_ranks * args.tokens, H), 1.0)
    router = (rng.standard_normal((H, E), dtype=np.float32) / np.sqrt(H)).astype(np.float32)
    s_gate_up, s_down = bf16_normal(rng, (H, 2 * F), H ** -0.5), bf16_normal(rng, (F, H), F ** -0.5)
    w_gate_up = np.empty((E, H, 2 * F), ml_dtypes.bfloat16)
    w_down = np.empty((E, F, H), ml_dtypes.bfloat16)
    for e in range(E):  # one expert at a time keeps the float32 temporaries small
        er = np.random.default_rng([args.seed, e])
        w_gate_up[e], w_down[e] = bf16_normal(er, (H, 2 * F), H ** -0.5), bf16_normal(er, (F, H), F ** -0.5)
    return x, Params(router, w_gate_up, w_down, s_gate_up, s_down)


def to_global(mesh: Mesh, a: np.ndarray, spec: P) -> jax.Array:
    """A global array from the numpy array every process holds in full."""
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda i: a[i])


def local_rows(arr: jax.Array):
    """(rows of the global dimension 0 held by this process, their values), in order."""
    shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows = np.concatenate([np.arange(arr.shape[0])[s.index[0]] for s in shards])
    return rows, np.concatenate([np.asarray(s.data) for s in shards])


@functools.partial(jax.jit, static_argnames="fp8")
def reference(x, idx, w, p: Params, fp8: bool):
    """The layer in float32, densely (every token through every expert), on given routing.

    x bfloat16 [N, H]; the wire's rounding is the only quantization: with FP8
    the tokens the experts see are `jax_ep.fp8.quantize(x).dequantize()`.
    """
    hi = jax.lax.Precision.HIGHEST
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    xw = jax_ep.fp8.quantize(x).dequantize() if fp8 else f32(x)
    h = jnp.einsum("nh,ehf->enf", xw, f32(p.w_gate_up), precision=hi)
    out = jnp.einsum("enf,efh->enh", swiglu(h), f32(p.w_down), precision=hi)
    n, e = x.shape[0], p.w_gate_up.shape[0]
    dense_w = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], idx].add(w)
    routed = jnp.einsum("ne,enh->nh", dense_w, out, precision=hi)
    shared = jnp.dot(swiglu(jnp.dot(f32(x), f32(p.s_gate_up), precision=hi)), f32(p.s_down), precision=hi)
    return routed + shared


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------- main


def ep_mesh() -> Mesh:
    """A 1-D mesh of every device of the job, in process order."""
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs), (AXIS,))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="decode steps per timed call")
    p.add_argument("--backend", choices=("auto", "xla", "cuda"), default="auto")
    p.add_argument("--tokens", type=int, default=128, help="decode tokens per rank")
    p.add_argument("--hidden", type=int, default=None, help="H (default 7168 on GPUs, 1024 elsewhere)")
    p.add_argument("--intermediate", type=int, default=256, help="FFN width of each expert")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True,
                   help="FP8 dispatch (per 128-channel block scales)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transport", choices=("peer", "nvshmem"), default="peer",
                   help="how the kernels reach other ranks (nvshmem: a build with NVSHMEM, one GPU "
                        "per process)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    distributed.initialize()
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    mesh = ep_mesh()
    R, platform = mesh.size, mesh.devices.flat[0].platform
    if args.hidden is None:
        args.hidden = 7168 if platform == "gpu" else 1024
    if args.experts % R:
        raise SystemExit(f"--experts {args.experts} must be a multiple of the {R} ranks")
    if args.fp8 and args.hidden % jax_ep.fp8.BLOCK:
        raise SystemExit(f"--fp8 needs --hidden to be a multiple of {jax_ep.fp8.BLOCK}")
    if platform == "gpu" and args.backend != "xla":
        if args.transport == "nvshmem":
            from jax_ep import nvshmem

            nvshmem.initialize(symmetric_size=nvshmem.heap_bytes(
                num_ranks=R, hidden=args.hidden, max_tokens_per_rank=args.tokens,
                num_experts=args.experts, top_k=args.top_k, low_latency=True))
        jax_ep.Buffer(mesh, AXIS, hidden=args.hidden, max_tokens_per_rank=args.tokens,
                      num_experts=args.experts, top_k=args.top_k, dtype=BF16, low_latency=True,
                      transport=args.transport)

    x_np, p_np = make_inputs(args, R)
    x = to_global(mesh, x_np, P(AXIS))
    params = Params(*(to_global(mesh, a, s) for a, s in zip(p_np, SPECS)))
    kw = dict(num_experts=args.experts, top_k=args.top_k, fp8=args.fp8, backend=args.backend)
    split_first, split_decode = make_fns(mesh, steps=args.steps, split=True, **kw)
    fused_first, fused_decode = make_fns(mesh, steps=args.steps, split=False, **kw)

    # The first step: overlapped vs fused, and vs the float32 layer on this process's tokens.
    y, idx, w = split_first(x, params)
    rows, y_loc = local_rows(y)
    y_fused = local_rows(fused_first(x, params)[0])[1]
    ref = reference(x_np[rows], local_rows(idx)[1], local_rows(w)[1],
                    Params(*(jnp.asarray(a) for a in p_np)), args.fp8)
    err_ref, err_fused = rel_err(y_loc, ref), rel_err(y_loc, y_fused)

    times = {}
    for name, fn in (("split + overlap", split_decode), ("fused", fused_decode)):
        jax.block_until_ready(fn(x, params))  # compile and warm up
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, params))
        times[name] = (time.perf_counter() - t0) / args.steps * 1e6

    say(f"one MoE layer, {R} ranks ({platform}), backend {args.backend}"
        f"{' over NVSHMEM' if args.transport == 'nvshmem' and platform == 'gpu' else ''}, "
        f"{'fp8' if args.fp8 else 'bf16'} dispatch: {args.tokens} tokens/rank, H={args.hidden}, "
        f"{args.experts} experts top-{args.top_k}, FFN {args.intermediate}")
    for name, us in times.items():
        say(f"  {name:16s} {us:10.1f} us per step ({args.steps} steps)")
    say(f"  fused / split: {times['fused'] / times['split + overlap']:.2f}")
    say(f"  first step vs float32 reference: rel err {err_ref:.2e}; overlapped vs fused: "
        f"{err_fused:.2e} (tolerance {TOLERANCE:g})")
    if not (err_ref <= TOLERANCE and err_fused <= TOLERANCE):
        print(f"FAILED (process {jax.process_index()}): the first step differs from its reference "
              f"(rel err {err_ref:.2e}, vs fused {err_fused:.2e})", file=sys.stderr)
        return 1
    say("check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
