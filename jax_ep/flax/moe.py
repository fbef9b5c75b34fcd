"""`MoE`: a DeepSeek-V3 style Mixture-of-Experts layer for Flax NNX on jax_ep.

The layer runs as one `jax.shard_map` over the whole mesh: every device
routes its own tokens, `jax_ep.dispatch` moves them to the ranks of the EP
axis that own their experts, the local experts run as one grouped GEMM
(`jax.lax.ragged_dot` on the `experts` layout) and `jax_ep.combine` brings
the weighted rows back. Mesh axes other than the EP axis carry independent
EP groups (data parallelism); expert weights are sharded over the EP axis and
replicated over the others, the router and the shared experts everywhere.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep

from .gating import bias_step, check_gating, deepseek_gating, expert_load, max_violation

AxisNames = Union[str, Tuple[str, ...]]


class BalanceBias(nnx.Variable):
    """Per-expert routing bias of auxiliary-loss-free balancing.

    It is a separate variable type so that gradient transforms and optimizers
    that select `nnx.Param` leave it alone: it moves only through `update_bias`.
    """


class MoEStats(NamedTuple):
    """Load statistics of one call, summed over the devices of `token_axes`.

    tokens_per_expert: int32 [E]  (token, slot) pairs routed to each expert.
    max_violation:     float32 [] max / mean load - 1 (0 = perfectly balanced).
    num_dropped:       int32 []   slots dropped by `capacity_factor` (senders).
    num_overflow:      int32 []   rows that did not fit `max_rows` (receivers).
    """

    tokens_per_expert: jax.Array
    max_violation: jax.Array
    num_dropped: jax.Array
    num_overflow: jax.Array


def _as_tuple(axes: AxisNames) -> Tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _spec_entry(axes: Tuple[str, ...]):
    return axes[0] if len(axes) == 1 else axes


def _sharded_init(init, mesh: Mesh, spec: tuple):
    """An initializer that places its value with NamedSharding(mesh, P(*spec))
    and records the spec as partitioning metadata (`nnx.get_partition_spec`)."""
    sharding = NamedSharding(mesh, P(*spec))

    def place(key, shape, dtype):
        return place_from_host(init(key, shape, dtype), sharding)

    return nnx.with_partitioning(place, spec, mesh=mesh)


def place_from_host(value, sharding: NamedSharding) -> jax.Array:
    """`value` (the same on every process) on `sharding`, each process writing its
    own devices' parts from host memory. Unlike `jax.device_put` across processes
    this needs no XLA collective, so it works where those cannot run (processes
    that share one GPU)."""
    if isinstance(value, jax.core.Tracer):  # traced (nnx.eval_shape, nnx.jit): no host value
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _explicit(mesh: Mesh) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def swiglu(h: jax.Array) -> jax.Array:
    """[..., 2F] fused gate/up projections -> silu(gate) * up [..., F]."""
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate) * up


class MoE(nnx.Module):
    """DeepSeek-V3 style MoE layer with expert parallelism over `ep_axis`.

    Args:
      hidden:        model width H.
      intermediate:  width F of each routed expert's SwiGLU FFN.
      num_experts:   E routed experts, divisible by the EP group size.
      top_k:         K experts per token.
      mesh:          the device mesh (Auto or Explicit axis types); tokens are
                     split over `token_axes`, expert weights over `ep_axis`.
      ep_axis:       the EP mesh axis, or a tuple of axes.
      token_axes:    mesh axes the flattened tokens are split over (default:
                     every mesh axis, in mesh order; must include `ep_axis`).
      n_group, topk_group: group-limited routing (DeepSeek-V3: 8 and 4).
      norm_topk_prob: normalize the K weights of a token to sum to one.
      routed_scaling_factor: multiplies the routed weights (DeepSeek-V3: 2.5).
      num_shared_experts: shared experts, run on every token as one SwiGLU
                     FFN of width `num_shared_experts * intermediate`.
      capacity_factor, max_rows: bound the static row count of `dispatch`
                     (default: dropless worst case; see `jax_ep.rows_needed`).
      fp8:           move tokens in FP8 (H % 128 == 0); the receiver
                     dequantizes to `fp8_out_dtype`, so the layer stays
                     differentiable (straight-through, BF16 backward).
      ll_max_tokens: tokens per rank the low-latency (decode) path is sized
                     for (default: the tokens of the call).
      backend:       jax_ep backend ("auto", "xla", "cuda").
      buffer:        a `jax_ep.Buffer` for the CUDA kernels (None: the
                     "default" one of the axis, see `create_buffer`).
      collectives:   how the load statistics are summed over `token_axes`:
                     "xla" (`lax.psum`) or "jax_ep" (`jax_ep.all_reduce` on
                     the Buffer; for processes that share one GPU, where XLA's
                     collectives cannot run; the other token axes must have size 1).
      dtype:         compute dtype (default: the input's); params are kept in
                     `param_dtype`.
      rngs:          `nnx.Rngs` for the initializers.

    Calling the layer returns `(y, stats)`: y has x's shape and dtype, stats
    is a `MoEStats` for logging and for `update_bias`. Called inside a
    `shard_map` whose manual axes include `token_axes` (a training step written
    per device), the layer takes that device's tokens and parameter shards as
    they are and runs no shard_map of its own.
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        *,
        mesh: Mesh,
        ep_axis: AxisNames = "ep",
        token_axes: Optional[Sequence[str]] = None,
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        num_shared_experts: int = 0,
        capacity_factor: Optional[float] = None,
        max_rows: Optional[int] = None,
        fp8: bool = False,
        fp8_out_dtype=jnp.bfloat16,
        ll_max_tokens: Optional[int] = None,
        backend: str = "auto",
        buffer: Optional[jax_ep.Buffer] = None,
        collectives: str = "xla",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        ep = _as_tuple(ep_axis)
        tokens = tuple(mesh.axis_names) if token_axes is None else tuple(token_axes)
        for a in ep + tokens:
            if a not in mesh.shape:
                raise ValueError(f"axis {a!r} is not an axis of the mesh {dict(mesh.shape)}")
        if not set(ep) <= set(tokens):
            raise ValueError(f"token_axes {tokens} must include the EP axis {ep}")
        ep_size = 1
        for a in ep:
            ep_size *= mesh.shape[a]
        if num_experts % ep_size:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the EP group size ({ep_size})"
            )
        if fp8 and hidden % jax_ep.fp8.BLOCK:
            raise ValueError(f"fp8=True needs hidden to be a multiple of {jax_ep.fp8.BLOCK}, got {hidden}")
        check_gating(num_experts, top_k, n_group, topk_group)
        if collectives not in ("xla", "jax_ep"):
            raise ValueError(f"collectives must be 'xla' or 'jax_ep', got {collectives!r}")
        if collectives == "jax_ep" and any(mesh.shape[a] != 1 for a in tokens if a not in ep):
            raise ValueError(
                "collectives='jax_ep' sums over the EP group only: the other token_axes "
                f"{[a for a in tokens if a not in ep]} must have size 1"
            )
        self.collectives = collectives
        self.mesh = mesh
        self.ep_axis = ep if len(ep) > 1 else ep[0]
        self.token_axes = tokens
        self.hidden, self.intermediate = hidden, intermediate
        self.num_experts, self.top_k = num_experts, top_k
        self.ep_size = ep_size
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.num_shared_experts = num_shared_experts
        self.capacity_factor, self.max_rows = capacity_factor, max_rows
        self.fp8, self.fp8_out_dtype = bool(fp8), fp8_out_dtype
        self.ll_max_tokens = ll_max_tokens
        self.backend, self.buffer = backend, buffer
        self.dtype, self.param_dtype = dtype, param_dtype

        ep_spec = _spec_entry(ep)
        normal = lambda fan_in: nnx.initializers.normal(stddev=fan_in ** -0.5)  # noqa: E731
        replicated = lambda init: _sharded_init(init, mesh, (None,) * 2)  # noqa: E731
        self.router = nnx.Param(
            replicated(normal(hidden))(rngs.params(), (hidden, num_experts), param_dtype)
        )
        self.bias = BalanceBias(place_from_host(np.zeros((num_experts,), np.float32), NamedSharding(mesh, P())))
        by_expert = lambda init: _sharded_init(init, mesh, (ep_spec, None, None))  # noqa: E731
        self.w_gate_up = nnx.Param(
            by_expert(normal(hidden))(rngs.params(), (num_experts, hidden, 2 * intermediate), param_dtype)
        )
        self.w_down = nnx.Param(
            by_expert(normal(intermediate))(rngs.params(), (num_experts, intermediate, hidden), param_dtype)
        )
        if num_shared_experts:
            fs = num_shared_experts * intermediate
            self.shared_gate_up = nnx.Param(
                replicated(normal(hidden))(rngs.params(), (hidden, 2 * fs), param_dtype)
            )
            self.shared_down = nnx.Param(replicated(normal(fs))(rngs.params(), (fs, hidden), param_dtype))
        else:
            self.shared_gate_up = self.shared_down = None

    # ------------------------------------------------------------------ pieces

    def route(self, x: jax.Array, router: jax.Array, bias: jax.Array):
        """Routing of tokens x [T, H]: float32 logits, DeepSeek-V3 gating."""
        logits = x.astype(jnp.float32) @ router.astype(jnp.float32)
        return deepseek_gating(
            logits, bias, top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor,
        )

    def _shared(self, x, gate_up, down):
        if gate_up is None:
            return jnp.zeros_like(x)
        return swiglu(x @ gate_up.astype(x.dtype)) @ down.astype(x.dtype)

    def _params(self):
        shared = (self.shared_gate_up, self.shared_down)
        shared = tuple(None if p is None else p[...] for p in shared)
        return (self.router[...], self.bias[...], self.w_gate_up[...], self.w_down[...]) + shared

    # ------------------------------------------------------------------ calls

    def __call__(self, x: jax.Array, *, decode: bool = False) -> Tuple[jax.Array, MoEStats]:
        """x [..., H] -> (y [..., H], MoEStats).

        The flattened token count must divide evenly over `token_axes`.
        `decode=True` takes the low-latency path (`jax_ep.low_latency_dispatch`
        and `low_latency_combine`, BF16 or FP8 on the wire, BF16 combine),
        with the shared experts computed while the dispatch is in flight. It
        is meant for inference: it has no gradient rules.
        """
        if x.shape[-1] != self.hidden:
            raise ValueError(f"x must have shape [..., {self.hidden}], got {list(x.shape)}")
        shape = x.shape
        flat = x.reshape(-1, self.hidden)
        # Inside a shard_map over the token axes already (a step written per device):
        # x and the parameters are this device's, and the layer runs as they are.
        inside = set(self.token_axes) <= set(jax.sharding.get_abstract_mesh().manual_axes)
        n_dev = 1
        for a in self.token_axes:
            n_dev *= self.mesh.shape[a]
        if not inside and flat.shape[0] % n_dev:
            raise ValueError(
                f"x has {flat.shape[0]} tokens, not divisible by the {n_dev} devices of "
                f"token_axes {self.token_axes}"
            )
        dtype = jnp.dtype(self.dtype or x.dtype)
        tok = P(_spec_entry(self.token_axes), None)
        rep, ep = P(), P(_spec_entry(_as_tuple(self.ep_axis)), None, None)
        has_shared = self.shared_gate_up is not None
        in_specs = (tok, rep, rep, ep, ep) + ((rep, rep) if has_shared else ())
        body = self._decode_body if decode else self._train_body

        def per_rank(x_loc, *params):
            if not has_shared:
                params = params + (None, None)
            y, idx, dropped, overflow = body(x_loc.astype(dtype), *params)
            load = expert_load(idx, self.num_experts)
            # After y: a reduction on the Buffer must not fall between the layer's
            # send and receive calls, which XLA could do with an independent one.
            (load, dropped, overflow), y = jax.lax.optimization_barrier(((load, dropped, overflow), y))
            load, dropped, overflow = self._sum_stats((load, dropped, overflow))
            return y.astype(x.dtype), MoEStats(load, max_violation(load), dropped, overflow)

        params = self._params() if has_shared else self._params()[:4]
        if inside:
            y, stats = per_rank(flat, *params)
            return y.reshape(shape), stats
        fn = jax.shard_map(
            per_rank, mesh=self.mesh, in_specs=in_specs,
            out_specs=(tok, MoEStats(rep, rep, rep, rep)),
            # jax_ep.all_reduce gives the same bits on every rank, but its outputs
            # are not typed as replicated; lax.psum's are
            check_vma=self.collectives == "xla",
        )
        if _explicit(self.mesh):
            # Explicit meshes type-check shardings: hand shard_map the split it expects.
            flat = jax.sharding.reshard(flat, NamedSharding(self.mesh, tok))
        y, stats = fn(flat, *params)
        return y.reshape(shape), stats

    def _sum_stats(self, stats):
        """Sum per-device statistics over token_axes: XLA's psum, or jax_ep.all_reduce
        on the layer's Buffer (processes sharing one GPU, where XLA's collectives
        cannot run)."""
        if self.collectives == "xla":
            return jax.lax.psum(stats, self.token_axes)
        return jax_ep.all_reduce(stats, axis_name=self.ep_axis, buffer=self.buffer, backend=self.backend)

    def _train_body(self, x, router, bias, w_gate_up, w_down, s_gate_up, s_down):
        """Normal mode on one rank: x [T, H] -> y [T, H]."""
        r = self.route(x, router, bias)
        out = jax_ep.dispatch(
            x, r.topk_idx, r.topk_weights, num_experts=self.num_experts, axis_name=self.ep_axis,
            capacity_factor=self.capacity_factor, max_rows=self.max_rows, layout="experts",
            fp8=self.fp8, out_dtype=self.fp8_out_dtype if self.fp8 else None,
            buffer=self.buffer, backend=self.backend,
        )
        rows = out.x.astype(x.dtype)
        h = jax.lax.ragged_dot(rows, w_gate_up.astype(x.dtype), out.group_sizes)
        rows = jax.lax.ragged_dot(swiglu(h), w_down.astype(x.dtype), out.group_sizes)
        y = jax_ep.combine(rows, out.handle, weights=out.weights)
        y = y + self._shared(x, s_gate_up, s_down)
        h = out.handle
        return y, r.topk_idx, h.num_dropped, h.num_overflow

    def _decode_body(self, x, router, bias, w_gate_up, w_down, s_gate_up, s_down):
        """Low-latency mode on one rank: x [T, H] -> y [T, H]."""
        r = self.route(x, router, bias)

        def send():
            return jax_ep.low_latency_dispatch_send(
                x, r.topk_idx, num_experts=self.num_experts, axis_name=self.ep_axis,
                max_tokens_per_rank=self.ll_max_tokens or x.shape[0], fp8=self.fp8,
                buffer=self.buffer, backend=self.backend,
                zero_padding=False,  # ll_experts masks the rows past count[e]
            )

        def shared_experts(t):
            return self._shared(t, s_gate_up, s_down)

        got, shared = jax_ep.overlap(send, shared_experts, jax_ep.low_latency_dispatch_recv, x)
        y = ll_experts(got, w_gate_up, w_down)
        y = jax_ep.low_latency_combine(y, r.topk_idx, r.topk_weights, got.handle)
        zero = jnp.zeros((), jnp.int32)
        return y.astype(x.dtype) + shared, r.topk_idx, zero, zero

    # ------------------------------------------------------------------ helpers

    def create_buffer(self, max_tokens_per_rank: int, *, low_latency: bool = False,
                      dtype=None, name: str = "default", transport: str = "peer",
                      num_nodes: Optional[int] = None) -> jax_ep.Buffer:
        """A `jax_ep.Buffer` sized for this layer (create it outside `jit`).

        `dtype` defaults to the layer's compute dtype, else bfloat16. With
        `name="default"` every call on this EP axis finds it; otherwise pass it
        to the layer as `buffer`. `transport` and `num_nodes` are the Buffer's: an
        EP axis over several hosts takes `transport="nvshmem"` (and the nodes from
        the launcher), which pairs with the group-limited gating (`n_group`,
        `topk_group`) that keeps each token on few nodes.
        """
        return jax_ep.Buffer(
            self.mesh, self.ep_axis, hidden=self.hidden, max_tokens_per_rank=max_tokens_per_rank,
            num_experts=self.num_experts, top_k=self.top_k, dtype=dtype or self.dtype or jnp.bfloat16,
            low_latency=low_latency, name=name, transport=transport, num_nodes=num_nodes,
        )


def ll_experts(got: jax_ep.LowLatencyOutput, w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Local experts on the low-latency layout: bfloat16 [E_local, R*M, H].

    One batched matmul per projection over the [E_local, R*M, H] slots; rows
    past `count[e]` (zero, or whatever a `zero_padding=False` dispatch left there) are
    set to zero (the combine never reads them).
    """
    x = got.x.dequantize(jnp.bfloat16) if isinstance(got.x, jax_ep.Fp8Array) else got.x
    x = x.astype(jnp.bfloat16)
    h = jnp.einsum("erh,ehf->erf", x, w_gate_up.astype(x.dtype))
    y = jnp.einsum("erf,efh->erh", swiglu(h), w_down.astype(x.dtype))
    valid = jnp.arange(x.shape[1])[None, :] < got.count[:, None]
    return jnp.where(valid[..., None], y, 0).astype(jnp.bfloat16)


def dense_reference(moe: MoE, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """The same layer without expert parallelism: (y [..., H], load int32 [E]).

    Routes every token with the layer's parameters and evaluates all experts
    densely (every token through every expert, then weighted by its routing),
    in x's dtype. Only for tests and small models.
    """
    shape = x.shape
    dtype = jnp.dtype(moe.dtype or x.dtype)
    flat = x.reshape(-1, moe.hidden).astype(dtype)
    params = moe._params()
    if _explicit(moe.mesh):
        # Everything replicated: a dense computation has no sharding to type-check.
        flat, params = jax.sharding.reshard((flat, params), NamedSharding(moe.mesh, P()))
    router, bias, w_gate_up, w_down, s_gate_up, s_down = params
    r = moe.route(flat, router, bias)
    h = jnp.einsum("nh,ehf->nef", flat, w_gate_up.astype(dtype))
    out = jnp.einsum("nef,efh->neh", swiglu(h), w_down.astype(dtype))
    n = flat.shape[0]
    dense_w = jnp.zeros((n, moe.num_experts), jnp.float32)
    dense_w = dense_w.at[jnp.arange(n)[:, None], r.topk_idx].add(r.topk_weights)
    y = jnp.einsum("ne,neh->nh", dense_w, out.astype(jnp.float32)).astype(dtype)
    y = y + moe._shared(flat, s_gate_up, s_down)
    return y.astype(x.dtype).reshape(shape), expert_load(r.topk_idx, moe.num_experts)


def update_bias(moe: MoE, load: jax.Array, rate: float = 1e-3) -> None:
    """Auxiliary-loss-free balancing: move `moe.bias` by `rate` per expert,
    down for experts loaded above the mean and up for those below.

    `load` is int [E] tokens per expert, e.g. `stats.tokens_per_expert` of a
    step (or a sum over steps). Works eagerly and inside `nnx.jit`.
    """
    moe.bias[...] = bias_step(moe.bias[...], load, rate)
