"""Result and handle types shared by every backend.

All of them are pytrees whose leaves are arrays, so they pass through `jit`,
`shard_map`, `scan` and `custom_vjp` unchanged. Static routing facts (axis
names, expert counts, layout, the backend that made them) ride along as a
leafless pytree node, `RoutingMeta`, so `combine` needs nothing but the handle.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp

AxisName = Union[str, Tuple[str, ...]]

LAYOUTS = ("experts", "tokens")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RoutingMeta:
    """Static facts of one dispatch, carried inside its handle (no leaves)."""

    axis_name: AxisName
    num_experts: int
    num_ranks: int
    layout: str
    rows: int  # C, the static row count of the output
    hidden: int
    top_k: int
    backend: str  # "xla" or "cuda"; combine uses the same one
    buffer_id: int = 0  # the registered Buffer for the cuda backend
    capacity: int = 0  # per-sender, per-expert capacity c (0: dropless)

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def local_slots(self) -> int:
        """Kr: rows one source token can produce on one rank."""
        if self.layout == "tokens":
            return 1
        return min(self.top_k, self.local_experts)

    @property
    def slot_width(self) -> int:
        """Per-(token, rank) values sent back for the topk-weight cotangent."""
        return self.top_k if self.layout == "tokens" else self.local_slots


class DispatchHandle(NamedTuple):
    """Routing state of one `dispatch`, consumed by `combine` and the VJPs.

    Public fields (DESIGN 3.1):
      num_overflow: int32 []      rows that arrived here past `max_rows` (receiver).
      dropped:      bool  [T, K]  slots dropped by the sender's capacity.
      num_dropped:  int32 []      number of this rank's dropped slots.
      num_invalid:  int32 []      ids outside [-1, E) sent by this rank.
    Internal fields (same shapes on every backend):
      src_rows: int32 [R, T, Kr]  receiver: output row of the i-th local expert
                                  (ascending) of source token t of rank s;
                                  -1 no such row, -2 the row overflowed.
      dst_mask: int32 [T, R]      sender: 1 where token t has a row on rank r.
      slot_pos: int32 [T, K]      sender: dest * Ks + i for slot k, where i is
                                  the slot's local expert among the token's
                                  local experts on dest (k itself for the
                                  tokens layout); -1 if empty, invalid or dropped.
      num_rows: int32 []          receiver: rows written (sum(group_sizes) for
                                  the experts layout).
      epoch:    int32 [1]         the buffer epoch that orders calls (cuda).
      meta:     RoutingMeta       static, no leaves.
    """

    num_overflow: jax.Array
    dropped: jax.Array
    num_dropped: jax.Array
    num_invalid: jax.Array
    src_rows: jax.Array
    dst_mask: jax.Array
    slot_pos: jax.Array
    num_rows: jax.Array
    epoch: jax.Array
    meta: RoutingMeta


class DispatchOutput(NamedTuple):
    """What `dispatch` returns (DESIGN 3.1).

    x:           [C, H] received rows (`Fp8Array` for fp8 without out_dtype).
    weights:     float32 [C] (experts layout) or [C, K] (tokens layout).
    group_sizes: int32 [E_local] rows per local expert (tokens layout:
                 (token, expert) pairs per expert).
    handle:      `DispatchHandle`.
    topk_idx:    int32 [C, K] local expert ids for the tokens layout, else None.
    """

    x: Any
    weights: jax.Array
    group_sizes: jax.Array
    handle: DispatchHandle
    topk_idx: Optional[jax.Array] = None


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LowLatencyMeta:
    axis_name: AxisName
    num_experts: int
    num_ranks: int
    max_tokens_per_rank: int
    hidden: int
    top_k: int
    fp8: bool
    round_scale: bool
    backend: str
    buffer_id: int = 0
    zero_padding: bool = True

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def local_slots(self) -> int:
        return min(self.top_k, self.local_experts)


class LowLatencyHandle(NamedTuple):
    """Routing state of one low-latency dispatch.

    src_rows: int32 [R, M, Kl]  receiver: flat row (e * R*M + p) in `x` of the
                                i-th local expert of token t of rank s, -1 none.
    slot_pos: int32 [T, K]      sender: i of slot k on its destination, -1 none.
    epoch:    int32 [1]
    """

    src_rows: jax.Array
    slot_pos: jax.Array
    epoch: jax.Array
    meta: LowLatencyMeta


class LowLatencyOutput(NamedTuple):
    """x: [E_local, R*M, H] (Fp8Array or bf16); count: int32 [E_local]."""

    x: Any
    count: jax.Array
    handle: LowLatencyHandle


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # "dispatch" or "combine"


class LowLatencyPending(NamedTuple):
    """In-flight state between a `*_send` and its `*_recv` (opaque).

    arrays: what the send produced; aux: what the recv needs besides (a
    pytree of arrays); meta/stage: static.
    """

    arrays: Tuple[jax.Array, ...]
    aux: Any
    meta: LowLatencyMeta
    stage: Stage
