"""`jax_ep.Buffer`: the communication memory of one EP group.

Created once, outside `jit`. On GPUs with the CUDA extension it allocates the
peer-visible memory of every device of the group in this process, maps the
peers (CUDA IPC through the `jax.distributed` key-value store across
processes, peer access inside one process), checks that all ranks agree on
its configuration and registers itself under a deterministic id, so a cached
executable finds it again in a new process. Elsewhere it only validates its
arguments and reports sizes: the xla backend needs no buffer.
"""

from __future__ import annotations

import atexit
import dataclasses
import zlib
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import fp8 as fp8_lib

_REGISTRY: Dict[Tuple[Tuple[str, ...], str], "Buffer"] = {}


@atexit.register
def _close_all() -> None:
    """Buffers still open at exit are closed while the CUDA runtime is still up."""
    for buf in list(_REGISTRY.values()):
        try:
            buf.close()
        except Exception:  # exiting: nothing more to do about it
            pass


def _axes(axis_name) -> Tuple[str, ...]:
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


# Tokens per chunk of the dispatch's route kernel (kRouteChunk of
# cc/kernels/normal.h; the extension's `route_chunk`): route_cnt holds one count
# per (expert, source rank, chunk).
ROUTE_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Layout:
    """Byte offsets of one rank's buffer (mirrored by cc/runtime.h)."""

    num_ranks: int
    hidden: int
    max_tokens: int
    top_k: int
    num_experts: int
    elem_bytes: int
    low_latency: bool
    transport: str = "peer"
    num_nodes: int = 1

    ALIGN = 256

    def _regions(self):
        R, H, T, K = self.num_ranks, self.hidden, self.max_tokens, self.top_k
        el = self.num_experts // R
        es = self.elem_bytes
        kr = min(K, el)
        a = self.ALIGN
        up = lambda n: (n + a - 1) // a * a
        half = [
            ("x_stage", up(max(T * H * es, up(T * H) + T * (H // fp8_lib.BLOCK) * 4))),
            ("idx_stage", up(T * K * 4)),
            ("w_stage", up(T * K * 4)),
            ("comb_recv", up(R * T * H * es)),
            ("vals_recv", up(R * T * K * 4)),
        ]
        local = [
            ("inbox", up(R * 8)),
            ("control", up(64 * 4)),
            ("route_rank", up(R * T * kr * 4)),
            ("route_cnt", up(self.num_experts * -(-T // ROUTE_CHUNK) * 4)),
            ("call_rec", up(2 * 64)),  # CallRecord per epoch parity (cc/runtime_types.h)
            ("done_inbox", up(R * 8)),
        ]
        if self.low_latency:
            m = T
            msg = up(H * 2 + 16)
            # combine slots: one BF16 row per (expert rank, token, local slot < min(K, E/R))
            comb = up(R * m * kr * H * 2)
            if self.transport == "nvshmem":  # whole messages are put into the owner's slots
                half += [("ll_recv", up(el * R * m * msg)), ("ll_comb", comb)]
            else:  # peer pointers: a 16-byte header per slot; each row is pulled from
                # its sender's staging (one row of 2H bytes per token: FP8 data and scales, or BF16)
                half += [("ll_recv", up(el * R * m * 16)), ("ll_comb", comb), ("ll_stage", up(m * H * 2))]
            local += [("ll_count", up(2 * el * R * 8))]  # two sets, by the call's parity
            if self.transport == "nvshmem":  # staging that puts read from
                # per token: 16 headers of 16 bytes (kMaxTopK x kHeader), then the message
                local += [("ll_send", up(m * (msg + 16 * 16))), ("ll_comb_send", comb)]
        if self.num_nodes > 1:
            # x_stage, idx_stage and w_stage are contiguous: one rdma_recv slot per
            # source node is the same sub-layout (cc/kernels/normal.cu)
            stage = sum(n for name, n in half if name in ("x_stage", "idx_stage", "w_stage"))
            comb = dict(half)
            half += [("rdma_recv", self.num_nodes * stage), ("comb_fwd", comb["comb_recv"]),
                     ("vals_fwd", comb["vals_recv"]), ("fwd_tag", up(R * T * 4))]
            local += [("rdma_flag", up(self.num_nodes * 8)), ("rdma_ready", up(self.num_nodes * 8)),
                      ("fwd_inbox", up(R * 8))]
        return half, local

    def offsets(self) -> Dict[str, int]:
        half, local = self._regions()
        out, off = {}, 0
        half_bytes = sum(n for _, n in half)
        for h in range(2):
            for name, n in half:
                out[f"{name}{h}"] = off
                off += n
        for name, n in local:
            out[name] = off
            off += n
        out["half_bytes"] = half_bytes
        out["total"] = off
        return out

    @property
    def total_bytes(self) -> int:
        return self.offsets()["total"]


class Buffer:
    """Communication memory for one EP group (DESIGN 4).

    Args:
      mesh:                the `jax.sharding.Mesh` of the computation.
      axis_name:           the EP axis, or a tuple of axes; the other mesh axes
                           form independent groups, each with its own memory.
      hidden:              largest H a call will move.
      max_tokens_per_rank: largest T a call will send from one rank.
      num_experts:         E.
      top_k:               largest K.
      dtype:               widest activation dtype (bfloat16, float16, float32).
      low_latency:         also reserve the low-latency (decode) regions.
      name:                registry name; `buffer=None` in calls means "default".
      transport:           how the low-latency kernels reach other ranks: "peer"
                           (stores through peer pointers: CUDA IPC, peer access or
                           one GPU) or "nvshmem" (puts and signals on NVSHMEM
                           symmetric memory, the path between nodes; needs
                           `jax_ep.nvshmem.initialize()` first, one GPU per
                           process, and an EP group of all processes with EP rank
                           r = process r).
      num_nodes:           nodes the EP group spans (ranks grouped contiguously,
                           R / num_nodes per node). Above 1 the normal mode runs
                           the internode protocol (docs/internode.md): rows cross
                           between nodes by puts, once per target node, and travel
                           on inside a node by loads. With transport="nvshmem" the
                           puts are NVSHMEM's (the path between hosts); with "peer"
                           they are stores through peer pointers, which splits the
                           GPUs of one host into groups (push between groups, pull
                           inside one). None: the launcher's `--nodes`
                           (JAX_EP_NUM_NODES) for an NVSHMEM Buffer, else 1.
    """

    def __init__(
        self,
        mesh,
        axis_name,
        *,
        hidden: int,
        max_tokens_per_rank: int,
        num_experts: int,
        top_k: int,
        dtype=jnp.bfloat16,
        low_latency: bool = False,
        name: str = "default",
        transport: str = "peer",
        num_nodes: Optional[int] = None,
    ):
        axes = _axes(axis_name)
        for a in axes:
            if a not in mesh.shape:
                raise ValueError(f"axis_name {a!r} is not an axis of the mesh {tuple(mesh.shape)}")
        R = int(np.prod([mesh.shape[a] for a in axes]))
        for arg, v in (("hidden", hidden), ("max_tokens_per_rank", max_tokens_per_rank),
                       ("num_experts", num_experts), ("top_k", top_k)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        if num_experts % R:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the EP group size ({R})")
        if transport not in ("peer", "nvshmem"):
            raise ValueError(f"transport must be 'peer' or 'nvshmem', got {transport!r}")
        num_nodes = _resolve_nodes(num_nodes, transport, R)
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
        self.mesh = mesh
        self.axis_name = axis_name
        self.axes = axes
        self.name = name
        self.num_ranks = R
        self.hidden = int(hidden)
        self.max_tokens_per_rank = int(max_tokens_per_rank)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.dtype = dtype
        self.low_latency = bool(low_latency)
        self.transport = transport
        self.num_nodes = num_nodes
        self.layout = Layout(R, self.hidden, self.max_tokens_per_rank, self.top_k,
                             self.num_experts, dtype.itemsize, self.low_latency, transport, num_nodes)
        group = tuple(sorted(mesh.shape.items()))
        key = repr((axes, group, name)).encode()
        self.buffer_id = zlib.crc32(key) | (1 << 32)
        self._native = None
        if any(d.platform == "gpu" or d.platform == "cuda" for d in mesh.devices.flat):
            from .backends import cuda_module

            cuda = cuda_module()
            if cuda is not None:
                self._native = cuda.create_buffer(self)
        _REGISTRY[(axes, name)] = self

    @staticmethod
    def size_hint(*, num_ranks: int, hidden: int, max_tokens_per_rank: int, num_experts: int,
                  top_k: int, dtype=jnp.bfloat16, low_latency: bool = False,
                  transport: str = "peer", num_nodes: int = 1) -> int:
        """Bytes of communication memory one rank needs for this configuration."""
        return Layout(num_ranks, hidden, max_tokens_per_rank, top_k, num_experts,
                      jnp.dtype(dtype).itemsize, low_latency, transport, num_nodes).total_bytes

    @property
    def nbytes(self) -> int:
        """Bytes allocated per rank (the size hint of this configuration)."""
        return self.layout.total_bytes

    @property
    def allocated(self) -> bool:
        return self._native is not None

    @property
    def windows(self) -> bool:
        """Whether this process's ranks read their peers' XLA buffers in place (the
        normal-mode calls' windows; docs/performance.md), instead of copying through
        the Buffer. False on one rank, without GPU memory, or with JAX_EP_WINDOWS=0."""
        if self._native is None or self.num_ranks == 1:
            return False
        from .backends import cuda as cuda_backend

        return cuda_backend.windows_on(self)

    def check_call(self, *, mode: str, num_experts: int, hidden: int, tokens: int, top_k: int,
                   dtype, fp8: bool = False) -> None:
        """Raise, naming the size needed, when a call does not fit this buffer."""
        if mode == "low_latency" and not self.low_latency:
            raise ValueError(f"Buffer {self.name!r} was created without low_latency=True")
        if num_experts > self.num_experts:
            raise ValueError(f"num_experts={num_experts} but Buffer {self.name!r} was made for at most {self.num_experts}")
        need = {"hidden": hidden, "max_tokens_per_rank": tokens, "top_k": top_k}
        have = {"hidden": self.hidden, "max_tokens_per_rank": self.max_tokens_per_rank, "top_k": self.top_k}
        if jnp.dtype(dtype).itemsize > self.dtype.itemsize:
            need["dtype"] = jnp.dtype(dtype).name
        too_big = [k for k in have if need[k] > have[k]] + (["dtype"] if "dtype" in need else [])
        if too_big:
            size = Buffer.size_hint(
                num_ranks=self.num_ranks, hidden=max(hidden, self.hidden),
                max_tokens_per_rank=max(tokens, self.max_tokens_per_rank), num_experts=num_experts,
                top_k=max(top_k, self.top_k),
                dtype=dtype if "dtype" in need else self.dtype, low_latency=self.low_latency,
                transport=self.transport, num_nodes=self.num_nodes)
            raise ValueError(
                f"the call does not fit Buffer {self.name!r} ({', '.join(too_big)} too large: "
                f"call {need}, buffer {have}); it needs a buffer of {size} bytes per rank"
            )

    def close(self) -> None:
        """Release the memory and unregister; calls using this buffer then fail."""
        if self._native is not None:
            self._native.close()
            self._native = None
        if _REGISTRY.get((self.axes, self.name)) is self:
            del _REGISTRY[(self.axes, self.name)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"Buffer(name={self.name!r}, axis={self.axis_name!r}, ranks={self.num_ranks}, "
                f"hidden={self.hidden}, tokens={self.max_tokens_per_rank}, experts={self.num_experts}, "
                f"top_k={self.top_k}, dtype={self.dtype.name}, transport={self.transport}, "
                f"nodes={self.num_nodes}, bytes/rank={self.nbytes})")


MAX_NODES = 32  # the kernels keep a token's target nodes in one 32-bit mask


def _resolve_nodes(num_nodes, transport: str, num_ranks: int) -> int:
    if num_nodes is None:
        from . import distributed

        num_nodes = distributed.num_nodes() if transport == "nvshmem" else 1
    if not isinstance(num_nodes, (int, np.integer)) or isinstance(num_nodes, bool) or num_nodes < 1:
        raise ValueError(f"num_nodes must be a positive int, got {num_nodes!r}")
    if num_ranks % num_nodes:
        raise ValueError(f"num_nodes ({num_nodes}) must divide the EP group size ({num_ranks})")
    if num_nodes > MAX_NODES:
        raise ValueError(f"num_nodes must be at most {MAX_NODES}, got {num_nodes}")
    return int(num_nodes)


def by_id(buffer_id: int) -> Optional[Buffer]:
    """The registered buffer with this id, if any."""
    for buf in _REGISTRY.values():
        if buf.buffer_id == buffer_id:
            return buf
    return None


def lookup(axis_name, buffer: Optional[Buffer], required: bool) -> Optional[Buffer]:
    """The buffer a call uses: the given one, else the "default" one of the axis."""
    if buffer is not None:
        if not isinstance(buffer, Buffer):
            raise TypeError(f"buffer must be a jax_ep.Buffer, got {type(buffer).__name__}")
        if not buffer.allocated and required:
            raise RuntimeError(f"{buffer!r} holds no GPU memory (closed, or made on a non-GPU mesh)")
        return buffer if buffer.allocated else None
    buf = _REGISTRY.get((_axes(axis_name), "default"))
    if buf is not None and buf.allocated:
        return buf
    if required:
        raise RuntimeError(
            f"no jax_ep.Buffer named 'default' for axis {axis_name!r}: create one outside jit, "
            f"e.g. jax_ep.Buffer(mesh, {axis_name!r}, hidden=H, max_tokens_per_rank=T, "
            "num_experts=E, top_k=K, dtype=jnp.bfloat16)"
        )
    return None
