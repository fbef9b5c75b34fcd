"""The cuda backend: FFI custom calls into the kernels of `jax_ep._ext`.

Every call carries the buffer id as an attribute; the handler finds the
per-device state by (id, device). Calls have side effects (they touch the
buffer) and need no host synchronization, so XLA may capture them into
command buffers.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import config as config_lib
from .. import fp8 as fp8_lib
from ..routing import SenderRouting
from ..vma import like_inputs
from ..types import (DispatchHandle, LowLatencyHandle, LowLatencyOutput, LowLatencyPending,
                     RoutingMeta, Stage)

try:
    from .. import _ext
except ImportError:  # not built: the package runs on the xla backend
    _ext = None

_OUT_SAME, _OUT_FP8, _OUT_DEQUANT = 0, 1, 2
MAX_TOP_K = 16


@functools.lru_cache(maxsize=None)
def _registered() -> bool:
    if _ext is None:
        return False
    try:
        for name, capsule in _ext.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    except Exception:  # a jaxlib without the CUDA platform
        return False
    return True


def available() -> bool:
    return _registered()


def timeout_s() -> float:
    return float(os.environ.get("JAX_EP_TIMEOUT_S", "100"))


# ------------------------------------------------------------------ buffers


class NativeBuffer:
    """The device memory of one `Buffer` on the devices this process drives."""

    def __init__(self, buffer_id: int, devices, barrier=None):
        self.buffer_id = buffer_id
        self.devices = list(devices)  # CUDA ordinals
        self._barrier = barrier  # a callable when peers live in other processes

    def close(self) -> None:
        """Free this process's memory once every rank of the group is done with it:
        peers may still be reading our staging when our own last call has finished."""
        from .. import _ext as ext

        for d in self.devices:
            ext.synchronize(d)
        if self._barrier is not None:
            self._barrier()
        for d in self.devices:
            ext.close(self.buffer_id, d)
        self.devices = []


_instances = {}


def _groups(mesh, axes):
    """{group key: [device per rank]} with ranks in lax.axis_index order of `axes`."""
    names = list(mesh.axis_names)
    ep = [names.index(a) for a in axes]
    rest = [i for i in range(len(names)) if i not in ep]
    devs = np.asarray(mesh.devices).transpose(rest + ep)
    ep_size = int(np.prod([mesh.shape[a] for a in axes]))
    flat = devs.reshape(-1, ep_size)
    return {g: list(flat[g]) for g in range(flat.shape[0])}


_TRANSPORTS = {"peer": 0, "nvshmem": 1}


def _config_mismatch(buf, rank: int, theirs: bytes, ours: bytes) -> ValueError:
    return ValueError(
        f"jax_ep.Buffer {buf.name!r}: rank {rank} was created with {theirs.decode()} but this rank "
        f"with {ours.decode()}; every rank of an EP group must create the same Buffer")


def _check_nvshmem_group(buf, groups) -> None:
    """The NVSHMEM transport: one GPU per process, EP rank r = process r = PE r."""
    from .. import nvshmem

    if not nvshmem.available():
        raise RuntimeError("Buffer(transport='nvshmem') needs jax_ep built with NVSHMEM "
                           "(-Ccmake.define.JAX_EP_NVSHMEM=ON, BUILD.md)")
    if not nvshmem.running():
        raise RuntimeError("Buffer(transport='nvshmem') needs jax_ep.nvshmem.initialize() first")
    if len(groups) != 1:
        raise ValueError("Buffer(transport='nvshmem') needs the EP axis to span the whole mesh "
                         "(NVSHMEM's symmetric memory is allocated by every PE together)")
    ranks = next(iter(groups.values()))
    if [d.process_index for d in ranks] != list(range(jax.process_count())):
        raise ValueError("Buffer(transport='nvshmem') needs one device per process, EP rank r on "
                         f"process r; the EP axis has devices of processes "
                         f"{[d.process_index for d in ranks]}")


def create_buffer(buf) -> Optional[NativeBuffer]:
    """Allocate, exchange and map the memory of `buf` for this process's devices."""
    from ..buffer import ROUTE_CHUNK

    chunk = getattr(_ext, "route_chunk", None)
    if chunk != ROUTE_CHUNK:  # a stale build: the route tables could overrun
        found = "predates this jax_ep" if chunk is None else f"numbers {chunk} tokens per route chunk"
        raise RuntimeError(f"jax_ep: the CUDA extension {found}, and jax_ep.buffer sizes the route "
                           f"tables for {ROUTE_CHUNK}; rebuild it (pip install --no-build-isolation -e .)")
    pid = jax.process_index()
    groups = _groups(buf.mesh, buf.axes)
    offsets = buf.layout.offsets()
    mine = []
    barriers = []
    n = _instances.get(buf.buffer_id, 0)
    _instances[buf.buffer_id] = n + 1
    config = repr((buf.num_ranks, buf.hidden, buf.max_tokens_per_rank, buf.num_experts,
                   buf.top_k, buf.dtype.name, buf.low_latency, buf.transport, buf.num_nodes)).encode()
    if buf.transport == "nvshmem":
        return _create_nvshmem(buf, groups, offsets, config, n)
    try:
        _create_groups(buf, groups, pid, offsets, config, n, mine, barriers)
    except BaseException:
        for dev in mine:  # nothing half-made stays registered
            _ext.close(buf.buffer_id, dev)
        raise
    return NativeBuffer(buf.buffer_id, mine, (lambda: [b() for b in barriers]) if barriers else None)


def _create_groups(buf, groups, pid, offsets, config: bytes, n: int, mine: list, barriers: list) -> None:
    """create_buffer's body for the peer transport: fills `mine` (the CUDA ordinals
    of this process's states, before they are made) and `barriers`."""
    from .. import distributed

    for g, ranks in groups.items():
        local = [d for d in ranks if d.process_index == pid]
        if not local:
            continue

        def create(d, vmm, ranks=ranks):
            _ext.create(buf.buffer_id, d.local_hardware_id, ranks.index(d), len(ranks),
                        buf.max_tokens_per_rank, offsets, timeout_s(), _TRANSPORTS["peer"],
                        buf.num_nodes, vmm=vmm)

        mine += [d.local_hardware_id for d in local]
        local_devs = [d.local_hardware_id if d.process_index == pid else -1 for d in ranks]
        if len(local) == len(ranks):  # the whole group in this process: peer access
            for d in local:
                create(d, False)
            for d in local:
                _ext.connect(buf.buffer_id, d.local_hardware_id, [b""] * len(ranks), local_devs)
            continue
        kv = distributed.kv_store(f"jax_ep/buffer/{buf.buffer_id:x}/{n}/{g}")
        local_ranks = [ranks.index(d) for d in local]

        def group_barrier(kv=kv, mine=local_ranks, size=len(ranks)):
            # Only this group's processes: a job-wide barrier would wait for other groups.
            for r in mine:
                kv.set(f"closed/{r}", b"1")
            for r in range(size):
                kv.get(f"closed/{r}")

        barriers.append(group_barrier)
        # One device of the group here: a VMM allocation (mapped by the devices of
        # the other processes only, so not with several devices here).
        _connect_processes(buf, kv, ranks, local, local_devs, config, create,
                           vmm=len(local) == 1 and _buffer_vmm_wanted())
        if len(local) == 1 and len(ranks) > 1 and buf.num_nodes == 1:
            _open_windows(buf, kv, local[0], ranks.index(local[0]), len(ranks))


def _buffer_vmm_wanted() -> bool:
    """JAX_EP_BUFFER_VMM unset or not 0: the peer transport's memory is a VMM allocation."""
    return os.environ.get("JAX_EP_BUFFER_VMM", "1") != "0"


def _connect_processes(buf, kv, ranks, local, local_devs, config: bytes, create, vmm: bool) -> None:
    """Create this process's memory of a group that spans processes, exchange the
    handles through the KV store and map the peers.

    With `vmm` (asked for by every process of the group) the memory is one VMM
    allocation that the peers map after copying its file descriptor
    (pidfd_getfd), as the windows do: the normal-mode FP8 dispatch, which reads
    the peers' staging, reads it faster than cudaMalloc memory shared by a CUDA
    IPC handle (performance.md, "The Buffer as a VMM allocation"). If any rank
    cannot make, export or map it, every rank frees it and makes cudaMalloc
    memory with CUDA IPC handles instead. Every rank takes part in every round
    whatever happens (a failure is published, not swallowed), so none waits for
    one that gave up; a failure of the cudaMalloc round raises on every rank.
    """
    mine = [ranks.index(d) for d in local]
    size = len(ranks)

    def everyone(key: str, value: bytes) -> list:
        return _all_publish(kv, key, mine, size, value)

    def exchange(kind: str):
        """Make this process's memory and swap handles: (handles, why not)."""
        why = ""
        recs = {}
        try:
            for d in local:
                create(d, kind == "vmm")
                recs[ranks.index(d)] = config + b"|" + _ext.ipc_handle(buf.buffer_id, d.local_hardware_id)
        except Exception as e:  # noqa: BLE001 -- published below, so that nobody waits
            why = f"rank {mine[0]}: {e}"
        for r in mine:
            kv.set(f"{kind}/rank{r}", recs.get(r) or b"!" + why.encode())
        handles = [b""] * size
        for r in range(size):
            if r in mine:
                continue
            got = kv.get(f"{kind}/rank{r}")
            if got.startswith(b"!"):
                why = why or got[1:].decode(errors="replace")
                continue
            cfg, _, handle = got.partition(b"|")  # the raw handle may hold "|"
            if cfg != config:
                raise _config_mismatch(buf, r, cfg, config)  # every rank sees a mismatch: all raise
            handles[r] = handle
        return handles, why

    def connect(handles, why: str, kind: str) -> str:
        if not why:
            try:
                for d in local:
                    _ext.connect(buf.buffer_id, d.local_hardware_id, handles, local_devs)
            except Exception as e:  # noqa: BLE001 -- pidfd_getfd not permitted, the driver refused
                why = f"rank {mine[0]}: {e}"
        oks = everyone(f"{kind}_ok", b"1" if not why else b"!" + why.encode())
        bad = [o for o in oks if o != b"1"]
        return why or (bad[0][1:].decode(errors="replace") if bad else "")

    if all(w == b"1" for w in everyone("vmm_wish", b"1" if vmm else b"0")):
        why = connect(*exchange("vmm"), "vmm")
        if not why:
            for d in local:  # every peer holds its own copy of the descriptor now
                _ext.close_export(buf.buffer_id, d.local_hardware_id)
            return
        for d in local:  # this rank's memory and its mappings of the others'
            _ext.close(buf.buffer_id, d.local_hardware_id)
        everyone("vmm_closed", b"1")  # every VMM allocation is freed before the next is made
        if 0 in mine:
            warnings.warn(f"jax_ep: Buffer {buf.name!r} uses cudaMalloc memory and CUDA IPC handles "
                          f"({why}); its FP8 dispatch reads the peers' staging slower (see "
                          "docs/troubleshooting.md)", stacklevel=4)
    why = connect(*exchange("ipc"), "ipc")
    if why:
        raise RuntimeError(f"jax_ep: Buffer {buf.name!r} could not map its peers' memory ({why})")


def _all_publish(kv, key: str, mine, size: int, value: bytes) -> list:
    """One round of an agreement: `value` under `key/r` for each of this process's
    ranks `mine`, then every rank's value, in rank order (waits for all `size`)."""
    for r in mine:
        kv.set(f"{key}/{r}", value)
    return [kv.get(f"{key}/{r}") for r in range(size)]


def _windows_wanted() -> bool:
    """JAX_EP_WINDOWS unset or not 0, and XLA's pool made at start-up: a pool that
    grows (XLA_PYTHON_CLIENT_PREALLOCATE=false, or the "platform" allocator) may give
    memory back and take it again at the same addresses, where a peer's mapping
    would still show the old memory."""
    if os.environ.get("JAX_EP_WINDOWS", "1") == "0":
        return False
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true").lower() in ("false", "0"):
        return False
    return os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default") in ("default", "bfc")


def _open_windows(buf, kv, dev, rank: int, size: int) -> None:
    """Map every peer's XLA device memory (one process per rank, one node).

    XLA keeps a device's buffers in one VMM allocation; each rank exports it as a
    file descriptor, the others take a copy (pidfd_getfd) and map it. Once every
    rank has mapped every other, a normal-mode call may leave its XLA operands
    where they are and let the receivers read them (the combine's expert rows),
    instead of copying them into the receivers' buffers first. Any failure on
    any rank leaves the group on the copying path, which is always correct.
    """
    def export() -> bytes:
        ptr = jax.device_put(np.zeros(16, np.uint8), dev).unsafe_buffer_pointer()
        return _ext.export_window(buf.buffer_id, dev.local_hardware_id, ptr)

    wanted = _windows_wanted()
    on, why = exchange_windows(kv, rank, size, export if wanted else None,
                               lambda recs: _ext.import_windows(buf.buffer_id, dev.local_hardware_id, recs))
    _ext.enable_window(buf.buffer_id, dev.local_hardware_id, on)
    if not on and wanted and rank == 0:
        warnings.warn(f"jax_ep: Buffer {buf.name!r} has no windows ({why}); its normal-mode calls copy "
                      "through the Buffer (slower; see docs/troubleshooting.md)", stacklevel=3)


def exchange_windows(kv, rank: int, size: int, export, import_):
    """The windows' agreement between the `size` ranks of a group: (on, why not).

    Each rank publishes its record (`export()`: bytes, empty when its memory cannot
    be shared; `export` None: this rank does not want windows), then maps every
    other rank's (`import_(records)` -> (ok, why)) and publishes whether it could.
    Windows are on only if every rank mapped every other; every rank takes part in
    both rounds whatever happens, so none waits for another that gave up.
    """
    # A rank that fails still takes its part (an empty record, a "no"), so the others
    # never wait for it.
    try:
        rec = export() if export is not None else b""
    except Exception as e:  # noqa: BLE001
        rec, err = b"", e
    else:
        err = None
    recs = _all_publish(kv, "window", [rank], size, rec or b"-")
    if b"-" in recs:
        q = recs.index(b"-")
        ok, why = False, (f"exporting failed: {err}" if q == rank and err is not None else
                          f"rank {q} cannot share its XLA memory (or has windows off)")
    else:
        try:
            ok, why = import_(recs)
        except Exception as e:  # noqa: BLE001
            ok, why = False, f"mapping failed: {e}"
    oks = [o == b"1" for o in _all_publish(kv, "window_ok", [rank], size, b"1" if ok else b"0")]
    if all(oks):
        return True, ""
    return False, why if not ok else f"rank {oks.index(False)} could not map the others' memory"


def windows_on(buf) -> bool:
    """Whether this process's ranks of `buf` read their peers' XLA buffers in place."""
    native = buf._native
    return bool(native and native.devices and all(_ext.window_on(buf.buffer_id, d) for d in native.devices))


def _create_nvshmem(buf, groups, offsets, config: bytes, n: int) -> NativeBuffer:
    """Symmetric memory on every PE: the configurations are compared through the
    key-value store first, so a mismatch raises before the collective allocation."""
    from .. import distributed

    _check_nvshmem_group(buf, groups)
    ranks = next(iter(groups.values()))
    (d,) = [d for d in ranks if d.process_index == jax.process_index()]
    r = ranks.index(d)
    if len(ranks) > 1:
        kv = distributed.kv_store(f"jax_ep/buffer/{buf.buffer_id:x}/{n}/nvshmem")
        for p, cfg in enumerate(kv.all_gather("config", config)):
            if cfg != config:
                raise _config_mismatch(buf, p, cfg, config)
    _ext.create(buf.buffer_id, d.local_hardware_id, r, len(ranks), buf.max_tokens_per_rank, offsets,
                timeout_s(), _TRANSPORTS["nvshmem"], buf.num_nodes)
    return NativeBuffer(buf.buffer_id, [d.local_hardware_id])


# ------------------------------------------------------------------ normal mode


def _i64(v) -> np.int64:
    return np.int64(v)




def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def dispatch(x, routing: SenderRouting, meta: RoutingMeta, *, fp8: bool, out_dtype, num_sms: int):
    R, El, C, K = meta.num_ranks, meta.local_experts, meta.rows, meta.top_k
    T, H = x.shape
    tokens = meta.layout == "tokens"
    idx, w = (routing.kept_idx, routing.kept_w) if tokens else (routing.row_idx, routing.row_w)
    kind = _OUT_SAME if not fp8 else (_OUT_FP8 if out_dtype is None else _OUT_DEQUANT)
    if isinstance(x, fp8_lib.Fp8Array):  # already quantized: data and scales as they are
        data, in_scales = x.data, x.scales
    else:
        data, in_scales = x, jnp.zeros((0,), jnp.float32)
    x_dtype = {_OUT_SAME: data.dtype, _OUT_FP8: fp8_lib.DTYPE, _OUT_DEQUANT: out_dtype}[kind]
    shapes = (
        _sds((C, H), x_dtype),
        _sds((C, H // fp8_lib.BLOCK) if kind == _OUT_FP8 else (0,), jnp.float32),
        _sds((C, K) if tokens else (C,), jnp.float32),
        _sds((C, K) if tokens else (0,), jnp.int32),
        _sds((El,), jnp.int32),
        _sds((), jnp.int32),
        _sds((R, T, meta.local_slots), jnp.int32),
        _sds((), jnp.int32),
        _sds((1,), jnp.int32),
    )
    call = jax.ffi.ffi_call("jax_ep_dispatch", shapes, has_side_effect=True)
    outs = call(
        data, in_scales, idx, w, buffer_id=_i64(meta.buffer_id), layout=_i64(int(tokens)),
        num_experts=_i64(meta.num_experts), out_kind=_i64(kind), num_sms=_i64(num_sms),
    )
    out_x, scales, out_w, topk, sizes, overflow, src_rows, num_rows, epoch = like_inputs(
        outs, data, in_scales, idx, w)
    if kind == _OUT_FP8:
        out_x = fp8_lib.Fp8Array(out_x, scales)
    handle = DispatchHandle(
        num_overflow=overflow, dropped=routing.dropped, num_dropped=routing.num_dropped,
        num_invalid=routing.num_invalid, src_rows=src_rows, dst_mask=routing.dst_mask,
        slot_pos=routing.slot_pos, num_rows=num_rows, epoch=epoch, meta=meta,
    )
    return out_x, out_w, sizes, (topk if tokens else None), handle


def combine(expert_out, weights, handle: DispatchHandle, row_vals=None, num_sms: int = 24):
    meta = handle.meta
    T, K = handle.slot_pos.shape
    empty = jnp.zeros((0,), jnp.float32)
    shapes = (
        _sds((T, expert_out.shape[1]), expert_out.dtype),
        _sds((T, K) if row_vals is not None else (0,), jnp.float32),
        _sds((1,), jnp.int32),
    )
    call = jax.ffi.ffi_call("jax_ep_combine", shapes, has_side_effect=True)
    y, slot_vals, _ = like_inputs(call(
        expert_out, empty if weights is None else weights,
        empty if row_vals is None else row_vals.astype(jnp.float32), handle.src_rows,
        handle.dst_mask, handle.slot_pos, handle.epoch, buffer_id=_i64(meta.buffer_id),
        layout=_i64(int(meta.layout == "tokens")), num_experts=_i64(meta.num_experts),
        num_sms=_i64(num_sms),
    ), expert_out, handle.src_rows, handle.dst_mask)
    return y, (slot_vals if row_vals is not None else None)


def redispatch(y, handle: DispatchHandle, num_sms: int = 24):
    meta = handle.meta
    shapes = (_sds((meta.rows, y.shape[1]), y.dtype), _sds((1,), jnp.int32))
    call = jax.ffi.ffi_call("jax_ep_redispatch", shapes, has_side_effect=True)
    rows, _ = like_inputs(call(
        y, handle.src_rows, handle.dst_mask, handle.num_rows, handle.epoch,
        buffer_id=_i64(meta.buffer_id), num_experts=_i64(meta.num_experts),
        num_sms=_i64(num_sms),
    ), y, handle.src_rows)
    return rows


# ------------------------------------------------------------------ low latency


def _ll_attrs(meta):
    return dict(buffer_id=_i64(meta.buffer_id), num_experts=_i64(meta.num_experts),
                max_tokens=_i64(meta.max_tokens_per_rank), num_sms=_i64(config_lib.low_latency_sms()))


def ll_dispatch_send(x, topk_idx, routing, meta):
    """Issue the messages; the pending value holds the call's epoch. The kernels
    route the tokens themselves (`routing`, the XLA form, is left unused)."""
    attrs = dict(fp8=_i64(meta.fp8), round_scale=_i64(meta.round_scale), **_ll_attrs(meta))
    slot_pos_s = _sds(topk_idx.shape, jnp.int32)
    if meta.num_ranks == 1:
        # One rank: no message moves; one kernel writes what the receive would,
        # and the receive only unpacks it.
        shapes = _ll_recv_shapes(meta)[:4] + (slot_pos_s, _sds((1,), jnp.int32))
        call = jax.ffi.ffi_call("jax_ep_ll_dispatch_local", shapes, has_side_effect=True)
        outs = call(x.astype(jnp.bfloat16), topk_idx, zero_padding=_i64(meta.zero_padding), **attrs)
        xo, scales, count, src_rows, slot_pos, epoch = like_inputs(outs, x, topk_idx)
        return LowLatencyPending((xo, scales, count, src_rows, epoch), slot_pos, meta, Stage("dispatch"))
    shapes = (slot_pos_s, _sds((meta.num_experts,), jnp.int32), _sds((1,), jnp.int32))
    call = jax.ffi.ffi_call("jax_ep_ll_dispatch_send", shapes, has_side_effect=True)
    slot_pos, _, epoch = like_inputs(call(x.astype(jnp.bfloat16), topk_idx, **attrs), x, topk_idx)
    return LowLatencyPending((epoch,), slot_pos, meta, Stage("dispatch"))


def _ll_recv_shapes(meta):
    """x, scales, count, src_rows, epoch of a low-latency dispatch."""
    R, El, M, H = meta.num_ranks, meta.local_experts, meta.max_tokens_per_rank, meta.hidden
    dtype = fp8_lib.DTYPE if meta.fp8 else jnp.bfloat16
    return (
        _sds((El, R * M, H), dtype),
        _sds((El, R * M, H // fp8_lib.BLOCK) if meta.fp8 else (0,), jnp.float32),
        _sds((El,), jnp.int32),
        _sds((R, M, meta.local_slots), jnp.int32),
        _sds((1,), jnp.int32),
    )


def ll_dispatch_recv(pending):
    meta = pending.meta
    if meta.num_ranks == 1:  # ll_dispatch_send wrote it all
        x, scales, count, src_rows, epoch = pending.arrays
    else:
        call = jax.ffi.ffi_call("jax_ep_ll_dispatch_recv", _ll_recv_shapes(meta), has_side_effect=True)
        x, scales, count, src_rows, epoch = like_inputs(
            call(pending.arrays[0], fp8=_i64(meta.fp8), round_scale=_i64(meta.round_scale),
                 zero_padding=_i64(meta.zero_padding), **_ll_attrs(meta)), pending.arrays[0])
    out = fp8_lib.Fp8Array(x, scales) if meta.fp8 else x
    return LowLatencyOutput(out, count, LowLatencyHandle(src_rows, pending.aux, epoch, meta))


def ll_combine_send(expert_out, topk_idx, weights, handle):
    """The receive finds each slot from topk_idx (per token, in the kernel)."""
    meta = handle.meta
    if meta.num_ranks == 1:
        # One rank: no row leaves the GPU, so nothing is sent; the receive sums
        # the expert rows where they are (one kernel, no copy into the slots).
        return LowLatencyPending((expert_out, handle.src_rows, handle.epoch), (topk_idx, weights), meta,
                                 Stage("combine"))
    call = jax.ffi.ffi_call("jax_ep_ll_combine_send", (_sds((1,), jnp.int32),), has_side_effect=True)
    (epoch,) = call(expert_out, handle.src_rows, handle.epoch, **_ll_attrs(meta))
    epoch = like_inputs(epoch, expert_out, handle.src_rows)
    # The receive takes expert_out and src_rows too: where the send let the other
    # ranks read them in place, XLA must keep them until the receive ends.
    return LowLatencyPending((epoch, expert_out, handle.src_rows), (topk_idx, weights), meta, Stage("combine"))


def ll_combine_recv(pending):
    topk_idx, weights = pending.aux
    meta = pending.meta
    shapes = (_sds((topk_idx.shape[0], meta.hidden), jnp.bfloat16), _sds((1,), jnp.int32))
    if meta.num_ranks == 1:  # nothing was sent: sum the expert rows in place
        call = jax.ffi.ffi_call("jax_ep_ll_combine_local", shapes, has_side_effect=True)
        y, _ = like_inputs(call(*pending.arrays, topk_idx, weights, **_ll_attrs(meta)),
                           *pending.arrays, topk_idx, weights)
        return y
    epoch, expert_out, src_rows = pending.arrays
    call = jax.ffi.ffi_call("jax_ep_ll_combine_recv", shapes, has_side_effect=True)
    y, _ = like_inputs(call(epoch, expert_out, src_rows, topk_idx, weights, **_ll_attrs(meta)),
                       epoch, topk_idx, weights)
    return y
