"""Greedy decoding of a small MoE language model with the low-latency calls.

    python examples/decode.py --train-steps 150 --new 24
    python -m jax_ep.launch --nproc 8 examples/decode.py --backend cuda   # GPUs

Trains the model of `train_moe.py` briefly on its generated corpus, then
decodes a batch of prompts greedily with a KV cache:

- prefill (dropless): the prompts go through the model in normal mode (`dispatch` /
  `combine`, as in training);
- every new token: each MoE layer runs `moe_decode` below, written out with
  the low-latency API. `jax_ep.overlap` issues the dispatch
  (`low_latency_dispatch_send`), computes the shared expert while the tokens
  are in flight, then waits (`low_latency_dispatch_recv`); the local experts
  run as one batched matmul over the [E_local, R*M, H] slots, masked by
  `count`, and `low_latency_combine` sums the weighted rows per token.

The first decoded step is checked against the normal-mode forward pass of the
same tokens; the script exits non-zero if they disagree beyond BF16/FP8
rounding.
"""

from __future__ import annotations

import os
import sys

_CPU_DEVICES = "--xla_force_host_platform_device_count"
if _CPU_DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_DEVICES}=8".strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep.flax import MoE, ll_experts, swiglu  # noqa: E402
from train_moe import (  # noqa: E402
    MoELM, add_model_args, build, fit, init_distributed, make_batch, make_buffer, make_config,
    make_mesh, successor_tables,
)

TOLERANCE = 5e-2  # relative to max |logit|: BF16 (or FP8) wire and BF16 combine
TRAIN_BATCH, TRAIN_SEQ = 32, 64


def moe_decode(moe: MoE, x: jax.Array) -> jax.Array:
    """One MoE layer for decode tokens x [B, 1, H], with the low-latency calls."""
    b, s, h = x.shape
    tok = P(("data", "ep"), None)
    rep, ep = P(), P("ep", None, None)

    def per_rank(x, router, bias, w_gate_up, w_down, s_gate_up, s_down):
        r = moe.route(x, router, bias)

        def send():
            return jax_ep.low_latency_dispatch_send(
                x, r.topk_idx, num_experts=moe.num_experts, axis_name="ep",
                max_tokens_per_rank=x.shape[0], fp8=moe.fp8, backend=moe.backend,
                zero_padding=False,  # ll_experts masks the rows past count[e]
            )

        def shared_expert(t):
            return swiglu(t @ s_gate_up) @ s_down

        got, shared = jax_ep.overlap(send, shared_expert, jax_ep.low_latency_dispatch_recv, x)
        rows = ll_experts(got, w_gate_up, w_down)  # bf16 [E_local, R*M, H]
        y = jax_ep.low_latency_combine(rows, r.topk_idx, r.topk_weights, got.handle)
        return y.astype(x.dtype) + shared

    fn = jax.shard_map(per_rank, mesh=moe.mesh, in_specs=(tok, rep, rep, ep, ep, rep, rep), out_specs=tok)
    params = (moe.router, moe.bias, moe.w_gate_up, moe.w_down, moe.shared_gate_up, moe.shared_down)
    return fn(x.reshape(b * s, h), *(p[...] for p in params)).reshape(b, s, h)


def decode_step(model: MoELM, tokens, caches, pos):
    """tokens int32 [B, 1] at position `pos` -> (logits [B, V], caches)."""
    x = model.embed(tokens) + jax.lax.dynamic_slice_in_dim(model.pos[...], pos, 1)[None]
    new_caches = []
    for block, cache in zip(model.blocks, caches):
        a, cache = block.attn(block.norm1(x), cache, pos)
        x = x + a
        x = x + moe_decode(block.moe, block.norm2(x))
        new_caches.append(cache)
    return model.embed.attend(model.norm(x))[:, 0], new_caches


def chain_agreement(tables, tokens) -> float:
    """Fraction of steps that follow the most likely successor, for each
    sequence's best-matching topic."""
    prev, nxt = tokens[:, :-1], tokens[:, 1:]
    hits = jnp.mean(tables[:, prev] == nxt[None], axis=2)  # [topics, B]
    return float(jnp.mean(jnp.max(hits, axis=0)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-steps", type=int, default=150, help="training steps before decoding")
    p.add_argument("--batch", type=int, default=16, help="sequences decoded at once (global)")
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens")
    p.add_argument("--new", type=int, default=24, help="tokens to generate")
    add_model_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    init_distributed()
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    mesh = make_mesh(args.ep)
    n = mesh.size
    if args.batch % n:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {n} devices")
    length = args.prompt + args.new
    cfg = make_config(args, max(length, TRAIN_SEQ))
    model = build(cfg, mesh, args.seed)
    tables = successor_tables(cfg.vocab, args.topics)
    # One buffer serves training, prefill and (low_latency=True) decode: size it for the largest.
    tokens_per_rank = max(TRAIN_BATCH * (TRAIN_SEQ - 1), args.batch * args.prompt) // n
    make_buffer(model, mesh, tokens_per_rank, args.backend, low_latency=True)

    if args.train_steps:
        t0 = time.perf_counter()
        hist = fit(model, mesh, tables, steps=args.train_steps, batch=TRAIN_BATCH, seq=TRAIN_SEQ,
                   seed=args.seed)
        say(f"trained {args.train_steps} steps in {time.perf_counter() - t0:.1f} s: "
            f"loss {hist['loss'][0]:.3f} -> {hist['loss'][-1]:.3f}")

    # Training used a capacity factor; inference is dropless, so every token
    # reaches all of its experts (an attribute of the layer, no new parameters).
    for moe in model.moe_layers:
        moe.capacity_factor = None
    prompts = make_batch(jax.random.key(args.seed + 7), tables, args.batch, args.prompt)

    @nnx.jit
    def prefill(model, prompts):
        logits, _, caches = model(prompts, model.empty_cache(prompts.shape[0], length), 0)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), caches

    @nnx.jit
    def step(model, tok, caches, pos):
        logits, caches = decode_step(model, tok[:, None], caches, pos)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, caches

    @nnx.jit
    def full_logits(model, tokens):
        return model(tokens)[0][:, -1]

    tok, caches = prefill(model, prompts)
    out = [tok]
    # Check the low-latency path against the normal-mode forward of the same tokens.
    nxt, logits, caches = step(model, tok, caches, args.prompt)
    ref = full_logits(model, jnp.concatenate([prompts, tok[:, None]], axis=1))
    err = float(jnp.max(jnp.abs(logits - ref)) / jnp.max(jnp.abs(ref)))
    out.append(nxt)
    t0 = time.perf_counter()
    for pos in range(args.prompt + 1, length - 1):
        nxt, _, caches = step(model, nxt, caches, pos)
        out.append(nxt)
    generated = jnp.stack(jax.block_until_ready(out), axis=1)
    per_token = (time.perf_counter() - t0) / max(1, args.new - 2)

    say(f"decoded {args.new} tokens for {args.batch} sequences on {n} {mesh.devices.flat[0].platform} "
        f"device(s), mesh {dict(mesh.shape)}, backend {args.backend}"
        f"{', fp8 dispatch' if args.fp8 else ', bf16 dispatch'}")
    say(f"  {per_token * 1e3:.2f} ms per decode step (all layers, after compilation)")
    seqs = jnp.concatenate([prompts, generated], axis=1)
    for i in range(min(3, args.batch)):
        say(f"  prompt {list(map(int, prompts[i]))} -> {list(map(int, generated[i]))}")
    say(f"  generated tokens that follow their chain's most likely successor: "
        f"{chain_agreement(tables, seqs[:, args.prompt - 1:]):.0%}")
    say(f"  low-latency step vs normal-mode forward: max |diff| / max |logit| = {err:.2e} "
        f"(tolerance {TOLERANCE:g})")
    if not err <= TOLERANCE:
        say("FAILED: the low-latency decode path disagrees with the normal-mode forward")
        return 1
    say("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
