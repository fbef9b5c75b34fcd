"""The jax_ep benchmark (BENCHMARKS.md is the method; this module implements it).

    python -m jax_ep.bench normal      [options]   # dispatch / combine, training & prefill
    python -m jax_ep.bench low-latency [options]   # decode: µs per call over a token sweep

One run times every backend side by side on the same inputs and prints, from that
run: µs per call, the logical bandwidth, the ratios to the HBM roofline and to the
staging ceiling (both from a copy bandwidth measured in the same run), to the xla
backend where it runs, to the sort-based local permutation (EP1), and DeepEP's
figures for the same setting. `--json` writes the rows, `--plot` draws them.

Processes and ranks
-------------------
The EP group is every JAX device of the job, in `jax.devices()` order, on a 1-D
mesh with axis "ep" (`--devices N` keeps the first N, single-process only). One
process with one device is EP1. Under `python -m jax_ep.launch --nproc N
[--share-gpu]` the bench calls `jax_ep.distributed.initialize()` and each process
drives its own device(s); only process 0 prints (the others print only errors).
Processes meet at barriers of the `jax.distributed` key-value store (XLA's own
collectives cannot run when several processes share one GPU), and exchange their
timings through it. On that harness the xla backend cannot run at all: its rows say
n/a, and the cuda backend's outputs are not compared here (tests/gpu does that
against the xla backend on CPU devices).

Workload
--------
Every process builds the same *global* routing `[R*T, K]` on the host from the seed
(`jax_ep.routing_gen`), so every row count is known exactly everywhere; rank s
sends rows `[s*T, (s+1)*T)`. Activations are random BF16, drawn on each device.
`max_rows` for the normal kernels is the largest number of rows any rank really
receives for that routing, rounded up to a multiple of 128 (the dropless worst case
would be mostly padding: 3.8 GB per rank at the DeepSeek-V3 shape).

Timing
------
Two timers run on every measurement: wall, and the one `--timer` picks (loop by
default, or trace) for the table's µs column (`--timer wall`: wall alone):

- loop (device side): one jitted program runs the call `--reps` times in a
  `lax.fori_loop`. Each iteration's result is carried by the loop (and returned, its
  buffers donated back on the next run), and its inputs pass through
  `lax.optimization_barrier` with the previous result, so no call is hoisted, merged
  or removed and the calls run strictly one after another. For the normal kernels
  each iteration first rewrites a scratch buffer of `--flush-mb` (2x the L2 by
  default), which evicts the L2. The same program without the call (scratch
  rewrite, carry and barriers only) is timed in alternation with it, and per-call
  time = (loop - median empty loop) / reps. Launch and host overheads are so
  amortized over the reps, but not removed: XLA's GPU while loop syncs on its
  predicate every iteration and the FFI handlers do host work per call, so for
  calls of tens of µs the GPU idles part of the time. CUDA events would have to be
  recorded on XLA's stream, which JAX does not expose; a profiler trace is the
  other device-side measure.
- trace (device side, `--timer trace`; DeepEP times its kernels in a profiler
  trace too): `--iters` single calls inside one `jax.profiler.trace`, each after
  the L2 flush (normal mode) and a barrier across processes, followed by
  `jax.block_until_ready` and a 2 ms host sleep (the flush sleeps too). The GPU
  events of the trace (those of every GPU this process drives) split into clusters
  at idle gaps over 500 µs: one per call, or flush and call in turn, the flushes
  dropped. A call's time is its cluster's span, from the first kernel's start to
  the last kernel's end on any of the process's GPUs, so GPU idle time between its
  kernels counts but none before or after. Another number of clusters than calls
  is an error, and so is a trace without GPU events: the profiler must see the GPU
  (CUPTI), which it may not with several processes on one GPU (MPS); on CPU the
  bench stops at once. With several processes and `--align none` a span also holds
  the time a receive waits for a peer that launched later (the host barrier does not
  line up the GPUs), and the spread grows with the launch skew; the device barrier of
  `--align` (below) removes that.
- wall: one call per sample, wall clock around the dispatch and
  `jax.block_until_ready`, after the L2 flush (normal mode) and a barrier across
  processes; it includes the host launch overhead (tens of µs). `--timer wall`
  uses it alone (nothing extra to compile).

Alignment (`--align`, on by default wherever several ranks run the cuda kernels):
each timed call follows a device barrier across the ranks, `jax_ep.all_reduce` of 4
floats on a Buffer of its own, so that no rank's call starts before every rank has
reached it. The host barrier lines up the hosts, not the GPUs: each GPU starts the
timed work when its own process has launched it, and a receive cannot end before the
last sender has sent, so without the device barrier a call also measures how much
later the slowest process launched (DeepEP's test launches its calls back to back and
never sees that skew). The loop timer runs the barrier in the empty loop too; the
trace timer's span starts where the barrier's last kernel (`all_reduce_sum`) ends on
the first of the process's GPUs; the wall timer times the call alone. Rows say
`aligned`.

`--warmup` calls (>= 20) precede all, then `--iters` (>= 50) samples are taken; each
loop sample is the mean of `--reps` calls. With several processes the time of an
iteration is the slowest process's. The table gives the median and [p10-p90].

Limits (BENCHMARKS.md "Limits on one GPU")
-------------------------------------------
- B: the copy bandwidth, read+write bytes per second, of a `--copy-mb` (512 MB)
  BF16 array on one device while the others wait: the larger of a plain `jnp.copy`
  (an XLA device-to-device copy, wall timer) and an elementwise copy kernel in the
  loop or trace timer (the one `--timer` picks; none under wall); where several
  ranks share a GPU, also all of them copying at once (under MPS one process may be
  held to a share of the SMs). All are printed; `--copy-gbps` replaces B by a given
  value (an EP1 run's, say).
- HBM roofline: dispatch moves `sum_r (T*H*b_in + rows_out(r)*H*b)`, combine the
  reverse, with `b_in` = 2 (BF16 input; FP8's bytes for `fp8in`, an `Fp8Array`
  quantized before the timing, as DeepEP's FP8 test passes), `b` = 2 for BF16 and
  1 + 4/128 for FP8;
  `rows_out` = rows_exp (experts layout) or rows_tok (tokens layout). The sum runs
  over the ranks that share a GPU (all of them on the one-GPU harness; one rank per
  GPU otherwise, where the slowest GPU counts, and the NVLink line rate
  `--link-gbps` bounds the remote rows too). Time limit = bytes / B.
- Staging ceiling: adds `sum_r 2*rows_tok(r)*H*b` (each transferred row written to
  and read from a communication buffer).
- Logical bandwidth per rank (DeepEP's): `rows_tok * H * 2 / 1e9 / s` for BF16,
  times (1 + 4/128) / 2 for FP8 (`fp8` and `fp8in`); the mean over ranks.
- Low latency: message bytes fp8 = H + H/128*4 + 16, bf16 = 2*H; bytes per rank =
  count(topk_idx != -1) x message; GB/s = bytes / s; "copy" = the ratio to a copy
  of the same bytes per rank, timed the same way on every rank at once. Rows:
  dispatch, combine (repeated on one dispatch's handle; `--no-combine-alone` skips
  it) and the round trip (the dispatch, then the combine on its handle), whose
  bytes and limits are the sums of the two. The round trip's check runs the whole
  step (dispatch, FP8 -> BF16 of the received rows, combine); its timing gives
  the combine expert rows converted beforehand, since that conversion of the whole
  padded output ([E/R, R*T, H]) is XLA's work and took milliseconds at 16 SMs.

Ratios are "x of the limit" (limit time / measured time, <= 1) for roofline and
staging, and speed-ups (other time / this time, > 1 is faster) for xla and sort.
DeepEP's figures (BENCHMARKS.md, one H100 under MPS, keyed by processes and SMs
per rank) are shown for the cuda rows of the same setting; the ratio to them is
GB/s over DeepEP's GB/s, since DeepEP's own test routes uniformly at random
(`--routing uniform` reproduces its row counts, so µs compare directly too).
Low-latency rows use the same roofline and staging formulas with rows_out =
rows_exp (the output is grouped by expert), HBM only (no link term).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform as _platform
import socket
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import routing_gen

EP = "ep"
FP8_BLOCK = 128
WIRE_BYTES = {"bf16": 2.0, "fp8": 1.0 + 4.0 / FP8_BLOCK, "fp8in": 1.0 + 4.0 / FP8_BLOCK}
# Dispatch dtypes of the normal mode: "fp8" quantizes BF16 input inside the call;
# "fp8in" passes an Fp8Array quantized before the timing (what DeepEP's test times:
# its FP8 dispatch takes pre-quantized rows).
FP8_DTYPES = ("fp8", "fp8in")
DEFAULT_SMS_PER_GPU = 132
LL_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KV_TIMEOUT_S = 900.0  # ranks wait for each other at most this long (compiles included)
TIMERS = ("loop", "trace", "wall")
ALIGN_KERNEL = "all_reduce_sum"  # the kernel that ends the device barrier of --align device
TRACE_IDLE_S = 0.002  # trace timer: host sleep after each call (and flush), an idle gap on the GPU
TRACE_GAP_US = 500.0  # trace timer: a longer idle gap between GPU events separates two calls

# DeepEP V1 intranode on one H100, N processes under MPS, same workload
# (4096 tokens/rank, hidden 7168, top-8 of 256 experts): (µs, GB/s per rank).
DEEPEP = {
    (8, 16): {("dispatch", "bf16"): (3268, 95), ("dispatch", "fp8"): (1712, 94), ("combine", "bf16"): (3033, 102)},
    (8, 8): {("dispatch", "bf16"): (3401, 91), ("dispatch", "fp8"): (1794, 89), ("combine", "bf16"): (3195, 97)},
    (4, 32): {("dispatch", "bf16"): (1150, 184), ("dispatch", "fp8"): (624, 175), ("combine", "bf16"): (1086, 195)},
    (2, 64): {("dispatch", "bf16"): (342, 342), ("dispatch", "fp8"): (202, 299), ("combine", "bf16"): (356, 329)},
}
DEEPEP_SHAPE = dict(tokens=4096, hidden=7168, top_k=8, experts=256)


# ------------------------------------------------------------------- formulas


def wire_bytes(dtype: str) -> float:
    """Bytes per element on the wire: BF16 2, FP8 1 + 4/128 (its scales)."""
    return WIRE_BYTES[dtype]


def input_bytes(dtype: str) -> float:
    """Bytes per element a dispatch reads from its input: FP8's for an `Fp8Array`
    ("fp8in"), else BF16's (FP8 is quantized inside the call)."""
    return wire_bytes(dtype) if dtype == "fp8in" else 2.0


def logical_gbps(rows_tok: float, hidden: int, seconds: float, dtype: str = "bf16") -> float:
    """DeepEP's per-rank bandwidth: rows_tok * H * 2 / 1e9 / s, FP8 x (1 + 4/128) / 2."""
    gb = rows_tok * hidden * 2 / 1e9
    if dtype in FP8_DTYPES:
        gb *= (1 + 4 / FP8_BLOCK) / 2
    return gb / seconds


def normal_bytes(direction: str, tokens: int, hidden: int, rows_out, rows_tok, dtype: str = "bf16"):
    """(roofline bytes, staging-ceiling bytes) per rank, float64 arrays [R].

    dispatch: T*H*b_in + rows_out*H*b (b_in = 2, BF16 input; FP8 for "fp8in");
    combine: rows_out*H*2 + T*H*2. Staging adds 2*rows_tok*H*b.
    """
    rows_out = np.asarray(rows_out, np.float64)
    rows_tok = np.asarray(rows_tok, np.float64)
    if direction == "dispatch":
        b, b_in = wire_bytes(dtype), input_bytes(dtype)
        roof = tokens * hidden * b_in + rows_out * hidden * b
    elif direction == "combine":
        b = 2.0
        roof = rows_out * hidden * b + tokens * hidden * 2.0
    else:
        raise ValueError(direction)
    return roof, roof + 2.0 * rows_tok * hidden * b


def design_bytes(direction: str, tokens: int, hidden: int, rows_out, rows_tok, dtype: str = "bf16", *,
                 ranks: int, windows: bool):
    """Bytes per rank that the cuda kernels themselves move through HBM, float64 [R].

    With windows (receivers read the senders' XLA buffers in place) a dispatch
    without quantization reads every transferred row where it is and writes its
    output rows: rows_tok*H*b + rows_out*H*b; the combine reads the expert rows and
    writes y (the roofline). Otherwise each side copies through the Buffer: the
    dispatch stages its input (read T*H*b_in, write T*H*b; FP8 quantized here), the
    combine pushes one partial per (token, rank) that the source reads back
    (2*rows_tok*H*2 more). One rank reads its input in place (FP8 quantization
    still stages).
    """
    rows_out = np.asarray(rows_out, np.float64)
    rows_tok = np.asarray(rows_tok, np.float64)
    if direction == "combine":
        roof = rows_out * hidden * 2.0 + tokens * hidden * 2.0
        return roof if windows or ranks == 1 else roof + 2.0 * rows_tok * hidden * 2.0
    b, b_in = wire_bytes(dtype), input_bytes(dtype)
    quantizes = dtype == "fp8"
    if ranks == 1:
        stage = tokens * hidden * (b_in + b) + tokens * hidden * b if quantizes else tokens * hidden * b_in
        return stage + rows_out * hidden * b
    if windows and not quantizes:
        return rows_tok * hidden * b + rows_out * hidden * b
    return tokens * hidden * (b_in + b) + rows_tok * hidden * b + rows_out * hidden * b


def ll_message_bytes(hidden: int, fp8: bool) -> int:
    """One low-latency message: FP8 data + scales + 16 bytes, or BF16 data."""
    return hidden + hidden // FP8_BLOCK * 4 + 16 if fp8 else 2 * hidden


def ll_bytes(num_valid, hidden: int, fp8: bool):
    """count(topk_idx != -1) x message bytes (per source rank)."""
    return np.asarray(num_valid, np.float64) * ll_message_bytes(hidden, fp8)


def busiest_gpu_bytes(bytes_per_rank, gpu_of_rank: Sequence) -> float:
    """The bytes of the busiest GPU, each GPU's summed over the ranks it hosts."""
    per_gpu: Dict[Any, float] = {}
    for b, g in zip(np.asarray(bytes_per_rank, np.float64), gpu_of_rank):
        per_gpu[g] = per_gpu.get(g, 0.0) + float(b)
    return max(per_gpu.values())


def limit_seconds(bytes_per_rank, gpu_of_rank: Sequence, bandwidth: float) -> float:
    """Time to move each GPU's bytes (summed over the ranks on it) at `bandwidth`; the slowest GPU."""
    return busiest_gpu_bytes(bytes_per_rank, gpu_of_rank) / bandwidth


def internode_rows(idx: np.ndarray, R: int, E: int, nodes: int) -> dict:
    """Rows each domain carries per rank under the internode protocol (docs/internode.md),
    from a global routing [R*T, K]:

    - dispatch RDMA: each token once per other node holding one of its experts (sent by
      its source); that is also the least any design moves;
    - dispatch NVLink: each (token, receiving rank) pair whose source is on another node,
      read from the forwarder (received by the reader; rows of the own node are counted
      by the intranode ratios);
    - combine RDMA: one partial per (token, rank of another node that holds a row),
      unreduced (received by the source); the least is one per (token, other node).
    """
    counts = routing_gen.token_rank_counts(idx, R, E)  # [R*T, R] rows of each token per rank
    T = idx.shape[0] // R
    G = R // nodes
    has = (counts > 0).reshape(R, T, R)  # [src, t, dst]
    node_has = has.reshape(R, T, nodes, G).any(axis=3)  # [src, t, node]
    src_node = np.arange(R) // G
    other = np.arange(nodes)[None, :] != src_node[:, None]  # [src, node]
    rdma_send = (node_has & other[:, None, :]).sum(axis=(1, 2))
    remote = (np.arange(R)[None, :] // G) != src_node[:, None]  # [src, dst]
    nvlink_recv = (has & remote[:, None, :]).sum(axis=(0, 1))
    comb_rdma = (has & remote[:, None, :]).sum(axis=(1, 2))
    return dict(dispatch_rdma=rdma_send, dispatch_rdma_min=rdma_send, dispatch_nvlink=nvlink_recv,
                combine_rdma=comb_rdma, combine_rdma_min=rdma_send, combine_nvlink=comb_rdma)


def link_seconds(pair_tok: np.ndarray, hidden: int, b: float, link_bw: float) -> float:
    """Remote rows over a link of `link_bw` bytes/s per direction, the busiest rank."""
    pt = np.asarray(pair_tok, np.float64)
    local = np.diag(pt)
    remote_in = pt.sum(axis=0) - local
    remote_out = pt.sum(axis=1) - local
    return float(np.max(np.maximum(remote_in, remote_out))) * hidden * b / link_bw


def round_up(n: int, m: int) -> int:
    return max(m, -(-int(n) // m) * m)


def stats_us(samples_s: Sequence[float]) -> Dict[str, float]:
    a = np.asarray(samples_s, np.float64) * 1e6
    if a.size == 0:
        return {"median": math.nan, "p10": math.nan, "p90": math.nan, "n": 0}
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "n": int(a.size)}


def sm_values(requested: Optional[str], cap: int) -> Tuple[List[int], List[str]]:
    """SM counts to sweep, each at most `cap`; returns (values, notes)."""
    notes = []
    if requested in (None, "", "auto"):
        vals = [s for s in (4, 8, 16, 32, 64, 128) if s < cap] + [cap]
    else:
        vals = []
        for s in _ints(requested):
            if s > cap:
                notes.append(f"--sms {s} is more than the {cap} SMs a rank may take here; using {cap}")
                s = cap
            vals.append(s)
    out = []
    for s in vals:
        if s >= 1 and s not in out:
            out.append(s)
    return out, notes


def _ints(text) -> List[int]:
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    return [int(v) for v in str(text).replace(" ", "").split(",") if v]


def _names(text) -> List[str]:
    return [v for v in str(text).replace(" ", "").split(",") if v]


# ------------------------------------------------------------------- the job


class _KV:
    """Barriers and small all-gathers between the job's processes."""

    def __init__(self, nproc: int, pid: int):
        self.nproc, self.pid = nproc, pid
        self.n = 0
        self.store = None
        if nproc > 1:
            try:
                from . import distributed

                self.store = distributed.kv_store("jax_ep_bench")
            except ImportError:
                from jax._src import distributed as jd

                self.store = _RawStore(jd.global_state.client)

    def barrier(self, name: str = "b") -> None:
        if self.store is None:
            return
        self.n += 1
        self.store.barrier(f"{self.n}/{name}", timeout_s=KV_TIMEOUT_S)

    def gather(self, name: str, obj) -> list:
        if self.store is None:
            return [obj]
        self.n += 1
        got = self.store.all_gather(f"{self.n}/{name}", json.dumps(obj), timeout_s=KV_TIMEOUT_S)
        return [json.loads(g) for g in got]


class _RawStore:
    """`jax.distributed`'s client when jax_ep.distributed is not available."""

    def __init__(self, client):
        import jax

        self.c = client
        self.pid, self.n = jax.process_index(), jax.process_count()

    def barrier(self, name, timeout_s):
        self.c.wait_at_barrier(f"jax_ep_bench/{name}", int(timeout_s * 1000))

    def all_gather(self, key, value, timeout_s):
        self.c.key_value_set(f"jax_ep_bench/{key}/{self.pid}", value)
        return [self.c.blocking_key_value_get(f"jax_ep_bench/{key}/{p}", int(timeout_s * 1000))
                for p in range(self.n)]


@dataclasses.dataclass
class Job:
    mesh: Any
    devices: list
    R: int
    nproc: int
    pid: int
    platform: str
    device_kind: str
    local_ranks: List[int]  # mesh indices of this process's devices
    gpu_of_rank: List[str]  # physical device of each rank
    procs_per_gpu: int
    sm_cap: int
    kv: _KV
    notes: List[str]
    compiled: Dict[Any, Callable] = dataclasses.field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.pid == 0

    @property
    def shared_gpu(self) -> bool:
        return len(set(self.gpu_of_rank)) == 1 and self.R > 1

    @property
    def xla_runs(self) -> Tuple[bool, str]:
        if self.procs_per_gpu > 1 and self.platform == "gpu":
            return False, "n/a: XLA collectives cannot run with several processes on one GPU"
        return True, ""

    def cuda_runs(self) -> Tuple[bool, str]:
        if self.platform != "gpu":
            return False, f"n/a: no GPU ({self.platform})"
        try:
            from .backends import cuda_module

            if cuda_module() is None:
                return False, "n/a: the CUDA extension (jax_ep._ext) is not built"
        except Exception as e:  # noqa: BLE001
            return False, f"n/a: {type(e).__name__}: {e}"
        return True, ""


def _initialize_distributed() -> None:
    try:
        from . import distributed
    except ImportError:
        return
    distributed.initialize()


def make_job(devices_arg: Optional[int] = None) -> Job:
    _initialize_distributed()
    import jax
    from jax.sharding import AxisType, Mesh

    nproc, pid = jax.process_count(), jax.process_index()
    devices = list(jax.devices())
    notes = []
    if devices_arg:
        if nproc > 1:
            raise SystemExit("--devices is for single-process runs; the launcher sets the process count")
        if devices_arg > len(devices):
            raise SystemExit(f"--devices {devices_arg}: only {len(devices)} devices")
        devices = devices[:devices_arg]
    mesh = Mesh(np.array(devices), (EP,), axis_types=(AxisType.Explicit,))
    platform = devices[0].platform
    local = [i for i, d in enumerate(devices) if d.process_index == pid]
    host = socket.gethostname()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    mine = {}
    for i in local:
        d = devices[i]
        if platform == "gpu":
            mine[str(i)] = f"{host}|{visible}|{getattr(d, 'local_hardware_id', d.id)}"
        else:
            mine[str(i)] = f"{host}|{os.getpid()}|{d.id}"
    kv = _KV(nproc, pid)
    keys: Dict[str, str] = {}
    for part in kv.gather("devices", mine):
        keys.update(part)
    gpu_of_rank = [keys[str(i)] for i in range(len(devices))]
    per_gpu = max(gpu_of_rank.count(g) for g in set(gpu_of_rank))
    sms = getattr(devices[0], "core_count", None) if platform == "gpu" else None
    sms = int(sms) if sms else DEFAULT_SMS_PER_GPU
    mps = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    # Under an MPS share the device already reports this process's SMs only.
    cap = max(1, sms if (mps and platform == "gpu") else sms // per_gpu)
    if mps and platform == "gpu":
        notes.append(f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={mps}: each process may use {mps}% of the SMs; "
                     "B also counts every rank copying at once")
    env_sms = os.environ.get("JAX_EP_NUM_SMS")
    if env_sms:
        if int(env_sms) < cap:
            notes.append(f"JAX_EP_NUM_SMS={env_sms} (launcher --sms-per-rank) caps the SM sweep")
        cap = min(cap, int(env_sms))
    return Job(mesh=mesh, devices=devices, R=len(devices), nproc=nproc, pid=pid,
               platform=platform, device_kind=devices[0].device_kind, local_ranks=local,
               gpu_of_rank=gpu_of_rank, procs_per_gpu=per_gpu, sm_cap=cap, kv=kv, notes=notes)


# ---------------------------------------------------------------- placement


def _lift(tree):
    import jax

    return jax.tree.map(lambda v: v[None], tree)


def _drop(tree):
    import jax

    return jax.tree.map(lambda v: v[0], tree)


def sharded(job: Job, per_rank: Callable, donate: Tuple[int, ...] = ()):
    """jit(shard_map) of a per-rank function; every argument and result carries a
    leading rank axis ([R, ...] globally, [1, ...] per rank, dropped inside).
    Memoized per function object, so a check and its timing share one compilation."""
    import jax
    from jax.sharding import PartitionSpec as P

    fn = job.compiled.get((per_rank, donate))
    if fn is None:
        def body(*lifted):
            return _lift(per_rank(*_drop(lifted)))

        fn = jax.jit(jax.shard_map(body, mesh=job.mesh, in_specs=P(EP), out_specs=P(EP)),
                     donate_argnums=donate)
        job.compiled[(per_rank, donate)] = fn
    return fn


def put_ranks(job: Job, per_rank: Callable[[int], np.ndarray]):
    """A global [R, ...] array sharded over "ep" from a host function of the rank."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    shards = []
    shape = None
    for r in job.local_ranks:
        a = np.asarray(per_rank(r))
        shape = a.shape
        shards.append(jax.device_put(a[None], job.devices[r]))
    if shape is None:
        raise RuntimeError("this process holds no device of the mesh")
    return jax.make_array_from_single_device_arrays(
        (job.R, *shape), NamedSharding(job.mesh, P(EP)), shards)


def local_shards(arr) -> Dict[int, np.ndarray]:
    """{rank: this process's shard without the rank axis} of a global [R, ...] array."""
    out = {}
    for s in arr.addressable_shards:
        r = s.index[0].start or 0
        out[r] = np.asarray(s.data)[0]
    return out


# -------------------------------------------------------------------- timing


def load_trace_events(logdir: str) -> List[dict]:
    """The events of the perfetto trace that `jax.profiler.trace(logdir,
    create_perfetto_trace=True)` wrote (gzip JSON: `traceEvents`, or a bare list)."""
    import glob
    import gzip

    paths = sorted(glob.glob(f"{logdir}/**/perfetto_trace.json.gz", recursive=True))
    if not paths:
        raise RuntimeError(f"the profiler wrote no perfetto_trace.json.gz under {logdir}")
    with gzip.open(paths[-1], "rt") as fh:
        data = json.load(fh)
    return data["traceEvents"] if isinstance(data, dict) else data


def _gpu_events(events: Sequence[dict]) -> List[Tuple[float, float, str]]:
    """(start, end, name) of the complete ("X") events of every process whose name
    has "GPU" in it (one per device), sorted by start."""
    names = {e.get("pid"): str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), str(e.get("name", "")))
                 for e in events if e.get("ph") == "X" and "GPU" in names.get(e.get("pid"), ""))
    if not gpu:
        raise RuntimeError("the profiler trace has no GPU events (the profiler may not see the GPU, "
                           "e.g. with several processes on one GPU); use --timer loop or wall")
    return gpu


def trace_clusters(events: Sequence[dict], calls: Optional[int] = None, *, gap_us: float = TRACE_GAP_US,
                   every: int = 1) -> List[Tuple[float, float]]:
    """(start, end) in µs of the calls' clusters of GPU work in a profiler trace.

    GPU events are the complete ("X") events of every process whose name has "GPU"
    in it (one per device: all the devices of the traced process count). Sorted by
    start, they split into clusters wherever the next event starts more than
    `gap_us` after the latest end so far. `every` = 2 keeps every second cluster
    (flush and call in turn: the calls). With `calls` given, there must be
    `calls * every` clusters: where a call idles longer than `gap_us` inside (a
    host-bound call), the clusters are joined at the shortest gaps until that many
    remain (the host waits for each call to finish before it starts the next, so
    the longest gaps fall between calls).
    """
    gpu = _gpu_events(events)
    clusters = [[gpu[0][0], gpu[0][1]]]
    for start, end, _ in gpu[1:]:
        if start - clusters[-1][1] > gap_us:
            clusters.append([start, end])
        else:
            clusters[-1][1] = max(clusters[-1][1], end)
    if calls is not None and len(clusters) > calls * every:
        gaps = sorted(range(1, len(clusters)), key=lambda i: clusters[i][0] - clusters[i - 1][1])
        joined = set(gaps[:len(clusters) - calls * every])
        kept = []
        for i, c in enumerate(clusters):
            if i in joined:
                kept[-1][1] = max(kept[-1][1], c[1])
            else:
                kept.append(list(c))
        clusters = kept
    if calls is not None and len(clusters) != calls * every:
        what = "a flush and a call" if every == 2 else "a call"
        raise RuntimeError(f"the profiler trace has {len(clusters)} clusters of GPU work (idle gaps over "
                           f"{gap_us:g} µs between them), expected {calls * every}: {calls} x {what}")
    return [(start, end) for start, end in clusters[every - 1::every]]


def trace_spans(events: Sequence[dict], calls: Optional[int] = None, *, gap_us: float = TRACE_GAP_US,
                every: int = 1, after: Optional[str] = None) -> List[float]:
    """Spans in µs (last end minus first start) of the calls' clusters of GPU work
    (`trace_clusters`); with `after`, from the end of the marker kernels instead
    (`after_marker`)."""
    clusters = trace_clusters(events, calls, gap_us=gap_us, every=every)
    if after is not None:
        clusters = after_marker(events, clusters, after)
    return [end - start for start, end in clusters]


def after_marker(events: Sequence[dict], clusters: Sequence[Tuple[float, float]],
                 marker: str) -> List[Tuple[float, float]]:
    """Each cluster from the earliest end of its GPU events whose name holds `marker`
    (the device barrier that precedes an aligned call: with several GPUs in the
    process, the first moment one of them may start the call) to its end. A cluster
    without such an event is an error: the barrier did not run."""
    gpu = _gpu_events(events)
    out = []
    for start, end in clusters:
        ends = [e for s, e, n in gpu if s >= start and e <= end and marker in n]
        if not ends:
            raise RuntimeError(f"a call's GPU work in the profiler trace has no kernel named like "
                               f"{marker!r} (the device barrier before each aligned call)")
        out.append((min(ends), end))
    return out


def call_kernels(events: Sequence[dict], clusters: Sequence[Tuple[float, float]]) -> List[Dict[str, Any]]:
    """What a call's span is made of (`--kernels`): for the GPU events inside each
    cluster, in order, the median over the calls of each one's start (from the
    call's start) and duration in µs (`us_max`: the longest), and the idle time,
    the span less the union of the events. Calls whose event names differ from
    the first call's are left out (`calls` says how many agree)."""
    gpu = _gpu_events(events)
    per_call = []
    for start, end in clusters:
        inside = [(s, e, n) for s, e, n in gpu if s >= start and e <= end]
        busy, last = 0.0, start
        for s, e, _ in inside:
            busy += max(0.0, e - max(s, last))
            last = max(last, e)
        per_call.append((inside, end - start - busy, start))
    if not per_call:
        return []
    names = [n for _, _, n in per_call[0][0]]
    agree = [c for c in per_call if [n for _, _, n in c[0]] == names]
    rows = []
    for i, n in enumerate(names):
        us = [c[0][i][1] - c[0][i][0] for c in agree]
        rows.append(dict(name=n, start_us=float(np.median([c[0][i][0] - c[2] for c in agree])),
                         us=float(np.median(us)), us_max=float(np.max(us)), calls=len(agree)))
    idle = [c[1] for c in agree]
    rows.append(dict(name="(idle inside the call)", start_us=None, us=float(np.median(idle)),
                     us_max=float(np.max(idle)), calls=len(agree)))
    return rows


class Timer:
    """The loop, trace and wall timers of the module docstring (`kind` picks the
    table's: loop, trace or wall)."""

    def __init__(self, job: Job, *, iters: int, warmup: int, reps: int, flush_bytes: int,
                 progress: Callable[[str], None], kind: str = "loop", kernels: Optional[str] = None):
        import jax.numpy as jnp

        if kind not in TIMERS:
            raise ValueError(f"timer {kind!r}: choose from {', '.join(TIMERS)}")
        self.job = job
        self.kind = kind
        self.kernels = kernels  # trace timer: print what each call's span is made of ("main", "all")
        self.iters, self.warmup, self.reps = iters, warmup, reps
        self.progress = progress
        n = max(128, flush_bytes // 2)
        self.scratch = put_ranks(job, lambda r: np.zeros((n,), jnp.bfloat16))
        self.tiny = put_ranks(job, lambda r: np.zeros((128,), jnp.bfloat16))
        self.one = put_ranks(job, lambda r: np.ones((), jnp.bfloat16))
        self._flush = sharded(job, lambda sc, one: sc * one)
        self._empty: Dict[Any, Callable] = {}
        self._aligned: Dict[Any, Callable] = {}
        # A device barrier before each timed call (`set_align`): per-rank args -> args.
        self.align: Optional[Callable] = None

    def set_align(self, pre: Optional[Callable]) -> None:
        """Time every later call right after `pre` (a barrier across the ranks run on
        the GPUs, which passes its arguments through), so that no rank's call starts
        before every rank has reached it: the loop timer's programs run it before the
        call (the empty program too), and the trace timer's span starts where its
        kernels (named like ALIGN_KERNEL) end. The wall timer times the call alone."""
        self.align = pre
        self._aligned.clear()

    def _with_align(self, op: Callable) -> Callable:
        if self.align is None:
            return op
        fn = self._aligned.get(op)
        if fn is None:
            pre = self.align
            fn = self._aligned[op] = lambda *args: op(*pre(args))
        return fn

    # -- programs

    @staticmethod
    def loop_body(op: Optional[Callable], reps: int, flush: bool, pre: Optional[Callable] = None):
        """Per-rank program: `reps` calls of `op`, one after another.

        Arguments: (ins, scratch, one, acc). The loop carries the inputs, the flush
        scratch and the last call's outputs (`acc`, same structure as `op`'s result);
        scratch and acc are donated by the caller and returned, so no copy is made of
        them. Every call's result feeds the carry, so
        none can be removed, and `lax.optimization_barrier` keeps each call's inputs
        from being hoisted out of the loop or merged with another call's. `op=None`
        is the same loop without the call (the baseline subtracted). `pre` (args ->
        args, the device barrier of `Timer.set_align`) runs before each call, and in
        the loop without the call too.
        """
        from jax import lax

        from .vma import like_inputs

        def program(ins, scratch, one, acc):
            def step(i, carry):
                args, sc, last = carry
                if flush:
                    sc = sc * one
                args, sc = lax.optimization_barrier((args, sc))
                if pre is not None:
                    args = tuple(pre(args))
                if op is not None:
                    last = like_inputs(op(*args), args)
                    args, sc, last = lax.optimization_barrier((args, sc, last))
                return args, sc, last

            acc = like_inputs(acc, ins)  # the op's results vary over the EP axis
            _, sc, last = lax.fori_loop(0, reps, step, (tuple(ins), scratch, acc))
            return sc, last

        return program

    def _programs(self, op, ins, flush):
        import jax

        loop = sharded(self.job, self.loop_body(op, self.reps, flush, self.align), donate=(1, 3))
        key = (jax.tree.structure(ins),
               tuple((tuple(v.shape), str(v.dtype)) for v in jax.tree.leaves(ins)), flush,
               jax.tree.structure(self._acc_shape(op, ins)), id(self.align))
        empty = self._empty.get(key)
        if empty is None:
            empty = self._empty[key] = sharded(self.job, self.loop_body(None, self.reps, flush, self.align),
                                               donate=(1, 3))
        return loop, empty

    def _acc_shape(self, op, ins):
        """Lifted global shapes of `op`'s results ([R, ...] per leaf)."""
        import jax

        return jax.eval_shape(sharded(self.job, op), *ins)

    def zeros_like_out(self, op, ins):
        """Lifted global zeros shaped like `op`'s results (the loop's first `acc`)."""
        import jax

        shapes = self._acc_shape(op, ins)
        return jax.tree.map(lambda s: put_ranks(self.job, lambda r: np.zeros(s.shape[1:], s.dtype)), shapes)

    # -- sampling

    def _samples(self, call: Callable, n: int, name: str, flush: Optional[Callable] = None,
                 sync: bool = True) -> List[float]:
        import jax

        out = []
        for i in range(n):
            if flush is not None:
                jax.block_until_ready(flush())
            if sync:
                self.job.kv.barrier(name)
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            out.append(time.perf_counter() - t0)
        return out

    def traced(self, call: Callable, n: int, name: str, flush: Optional[Callable] = None,
               sync: bool = True, after: Optional[str] = None) -> List[float]:
        """Seconds of GPU work of each of `n` calls, from one profiler trace (the
        trace timer); the flushes and calls are parted by host sleeps. A process
        whose trace or call fails still takes part in every barrier (it skips the
        work, not the meeting) and raises at the end, so the processes stay in step."""
        import tempfile

        import jax

        err: Optional[BaseException] = None
        with tempfile.TemporaryDirectory(prefix="jax_ep_trace_") as d:
            trace = jax.profiler.trace(d, create_perfetto_trace=True)
            try:
                trace.__enter__()
            except Exception as e:  # noqa: BLE001
                trace, err = None, e
            for _ in range(n):
                if err is None and flush is not None:
                    try:
                        jax.block_until_ready(flush())
                        time.sleep(TRACE_IDLE_S)
                    except Exception as e:  # noqa: BLE001
                        err = e
                if sync:
                    self.job.kv.barrier(name)
                if err is None:
                    try:
                        jax.block_until_ready(call())
                        time.sleep(TRACE_IDLE_S)
                    except Exception as e:  # noqa: BLE001
                        err = e
            if trace is not None:
                try:
                    trace.__exit__(None, None, None)
                except Exception as e:  # noqa: BLE001
                    err = err or e
            if err is not None:
                raise err
            events = load_trace_events(d)
        every = 2 if flush is not None else 1
        if self.kernels == "all" or (self.kernels and self.job.main):
            clusters = trace_clusters(events, n, every=every)
            if after is not None:
                clusters = after_marker(events, clusters, after)
            rows = call_kernels(events, clusters)
            lines = [f"  {'+' + format(r['start_us'], '.1f') if r['start_us'] is not None else '':>9} "
                     f"{r['us']:9.1f} µs {r['us_max']:9.1f} µs  {r['name'][:100]}" for r in rows]
            print(f"kernels of {name} (process {self.job.pid}, {rows[-1]['calls'] if rows else 0} calls; "
                  "median start, median time, longest time):\n" + "\n".join(lines), file=sys.stderr, flush=True)
        return [us * 1e-6 for us in trace_spans(events, n, every=every, after=after)]

    def _slowest(self, name: str, samples: List[float]) -> List[float]:
        parts = self.job.kv.gather(name, samples)
        return [float(v) for v in np.max(np.asarray(parts, np.float64), axis=0)]

    def measure(self, name: str, op: Callable, ins: tuple, *, flush: bool) -> Dict[str, Any]:
        """The wall timer and `kind`'s for the per-rank `op(*ins)`; `ins` are lifted
        global arrays. Returns {"primary": kind, "us": the table's stats, "wall": the
        wall stats, "empty_loop_us": the loop timer's baseline per call or None, "aligned":
        whether the device barrier of `set_align` preceded each timed call}."""
        import jax

        ins = tuple(ins)
        scratch = self.scratch if flush else self.tiny
        single = sharded(self.job, op)
        flush_call = (lambda: self._flush(self.scratch, self.one)) if flush else None
        call = lambda: single(*ins)  # noqa: E731
        # wall: warm up (compiles), then one call per sample.
        self._samples(call, self.warmup, name + "/warm", flush_call)
        wall = self._samples(call, self.iters, name + "/wall", flush_call)
        wall_stats = stats_us(self._slowest(name + "/gw", wall))
        if self.kind == "wall":
            return {"primary": "wall", "us": wall_stats, "wall": wall_stats, "empty_loop_us": None,
                    "aligned": False}
        if self.kind == "trace":
            # Every process learns of a failed trace, so none waits for the others' spans.
            err: Optional[BaseException] = None
            traced_call, after = call, None
            if self.align is not None:
                aligned = sharded(self.job, self._with_align(op))
                traced_call, after = (lambda: aligned(*ins)), ALIGN_KERNEL
                self._samples(traced_call, self.warmup, name + "/awarm", flush_call)
            try:
                spans = self.traced(traced_call, self.iters, name + "/trace", flush_call, after=after)
            except Exception as e:  # noqa: BLE001
                spans, err = [], e
            why = "" if err is None else f"process {self.job.pid}: {type(err).__name__}: {err}"
            errs = [w for w in self.job.kv.gather(name + "/te", why) if w]
            if err is not None:
                raise err
            if errs:
                raise RuntimeError(errs[0])
            return {"primary": "trace", "us": stats_us(self._slowest(name + "/gt", spans)),
                    "wall": wall_stats, "empty_loop_us": None, "aligned": self.align is not None}
        # loop: the call `reps` times in one program, minus the same program without it.
        loop, empty = self._programs(op, ins, flush)
        state = {"acc": self.zeros_like_out(op, ins), "sc": jax.numpy.copy(scratch)}

        def run(program):
            def call():
                state["sc"], state["acc"] = program(ins, state["sc"], self.one, state["acc"])
                return state["sc"]
            return call

        run_loop, run_empty = run(loop), run(empty)
        self._samples(run_loop, max(1, -(-self.warmup // self.reps)), name + "/lwarm")
        self._samples(run_empty, 1, name + "/ewarm")
        empties, loops = [], []
        for i in range(self.iters):  # interleaved, so drift affects both alike
            if i % 2 == 0:
                empties += self._samples(run_empty, 1, name + "/empty")
            loops += self._samples(run_loop, 1, name + "/loop")
        base = float(np.median(empties))
        del state
        per_call = [max(t - base, 0.0) / self.reps for t in loops]
        return {"primary": "loop", "us": stats_us(self._slowest(name + "/gl", per_call)),
                "wall": wall_stats, "empty_loop_us": base * 1e6 / self.reps, "aligned": self.align is not None}

    def local(self, call: Callable, n_warm: int, n: int) -> List[float]:
        """Wall samples of a call on this process only (no barriers)."""
        self._samples(call, n_warm, "local", sync=False)
        return self._samples(call, n, "local", sync=False)


def measure_copy(job: Job, timer: Timer, nbytes: int, override_gbps: Optional[float] = None) -> Dict[str, Any]:
    """Copy bandwidth B (read+write bytes/s).

    On the first device alone, the others waiting: a plain `jnp.copy` (an XLA
    device-to-device copy; wall timer) and an elementwise copy kernel (the loop or
    trace timer, whichever `timer` uses; none under wall).
    When several ranks share a GPU, also every rank copying its share at once (an
    MPS SM cap keeps one process from reaching the whole GPU's bandwidth). B is the
    largest of these, or `override_gbps`.
    """
    import jax
    import jax.numpy as jnp

    res: Dict[str, Any] = {}
    if job.main:
        dev = job.devices[0]
        n = max(1024, nbytes // 2)
        a = jax.device_put(jnp.zeros((n,), jnp.bfloat16), dev)
        one = jax.device_put(jnp.ones((), jnp.bfloat16), dev)
        copy = jax.jit(jnp.copy)
        t = stats_us(timer.local(lambda: copy(a), timer.warmup, timer.iters))
        res["bytes"] = float(n * 2)
        res["memcpy_us"] = t["median"]
        res["memcpy_Bps"] = 2 * n * 2 / (t["median"] * 1e-6)
        res["kernel_us"] = res["kernel_Bps"] = None
    if job.main and timer.kind == "loop":
        op = lambda x, o: x * o  # noqa: E731
        loop = jax.jit(Timer.loop_body(op, timer.reps, False), donate_argnums=(1, 3))
        empty = jax.jit(Timer.loop_body(None, timer.reps, False), donate_argnums=(1, 3))
        state = {"acc": jax.device_put(jnp.zeros((n,), jnp.bfloat16), dev),
                 "sc": jax.device_put(jnp.zeros((128,), jnp.bfloat16), dev)}

        def run(program):
            def call():
                state["sc"], state["acc"] = program((a, one), state["sc"], one, state["acc"])
                return state["sc"]
            return call

        base = float(np.median(timer.local(run(empty), 1, 5)))
        loops = timer.local(run(loop), 1, max(5, timer.iters // 5))
        kernel_s = max(float(np.median(loops)) - base, 1e-9) / timer.reps
        del state
    err = ""
    if job.main and timer.kind == "trace":
        kernel = jax.jit(lambda x, o: x * o)
        call = lambda: kernel(a, one)  # noqa: E731
        timer.local(call, 1, 1)
        try:
            kernel_s = max(float(np.median(timer.traced(call, max(5, timer.iters // 5), "copy",
                                                        sync=False))), 1e-9)
        except Exception as e:  # noqa: BLE001  (every process raises it, below)
            err = f"the copy kernel's trace on process {job.pid}: {type(e).__name__}: {e}"
            kernel_s = None
    if job.main and timer.kind != "wall" and kernel_s is not None:
        res["kernel_timer"] = timer.kind
        res["kernel_us"] = kernel_s * 1e6
        res["kernel_Bps"] = 2 * n * 2 / kernel_s
    if job.main:
        del a
    res["error"] = err
    res = job.kv.gather("copy", res)[0]
    if res.pop("error"):
        raise RuntimeError(err or "the copy kernel's trace failed on process 0 (see its output)")
    candidates = [v for v in (res["memcpy_Bps"], res["kernel_Bps"]) if v]
    if job.procs_per_gpu > 1:
        share = max(1024, nbytes // 2 // job.procs_per_gpu)
        src = put_ranks(job, lambda r: np.zeros((share,), jnp.bfloat16))
        m = timer.measure("copy/all", lambda x, o: x * o, (src, timer.one), flush=False)
        del src
        t = m["us"]["median"] * 1e-6
        if t > 0:
            res["all_ranks_bytes_per_gpu"] = float(share * 2 * job.procs_per_gpu)
            res["all_ranks_us"] = m["us"]["median"]
            res["all_ranks_Bps"] = 2 * share * 2 * job.procs_per_gpu / t
            candidates.append(res["all_ranks_Bps"])
    res["B_measured"] = max(candidates)
    res["B"] = override_gbps * 1e9 if override_gbps else res["B_measured"]
    return res


# ----------------------------------------------------------------- workloads


@dataclasses.dataclass
class Routing:
    idx: np.ndarray  # int32 [R*T, K] global
    w: np.ndarray  # float32 [R*T, K]
    pair_tok: np.ndarray  # [R, R]
    rows_tok: np.ndarray  # [R]
    rows_exp: np.ndarray  # [R]
    num_valid: np.ndarray  # [R] source ranks


def routing_from(idx: np.ndarray, w: np.ndarray, R: int, E: int) -> Routing:
    """Every row count of a global routing [R*T, K]."""
    counts = routing_gen.token_rank_counts(idx, R, E)
    pair = (counts > 0).reshape(R, -1, R).sum(axis=1, dtype=np.int64)
    return Routing(idx=idx, w=w, pair_tok=pair, rows_tok=pair.sum(axis=0),
                   rows_exp=counts.sum(axis=0, dtype=np.int64),
                   num_valid=routing_gen.num_valid(idx, R, E))


def make_routing(kind: str, seed: int, R: int, T: int, E: int, K: int, zipf_s: float) -> Routing:
    idx, w = routing_gen.generate(kind, seed, R * T, E, K, zipf_s=zipf_s)
    return routing_from(idx, w, R, E)


def random_tokens(job: Job, T: int, H: int, seed: int):
    """Global [R, T, H] BF16 activations, drawn on each device from (seed, rank)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def gen(s):
        key = jax.random.fold_in(jax.random.key(s), lax.axis_index(EP))
        return jax.random.normal(key, (T, H), jnp.float32).astype(jnp.bfloat16)

    seeds = put_ranks(job, lambda r: np.asarray(seed, np.uint32))
    return sharded(job, gen)(seeds)


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(f"u{a.dtype.itemsize}")


def compare(job: Job, got, want, *, exact: bool = True, rtol: float = 2 ** -6) -> str:
    """'ok' when every local shard of every leaf matches (bit for bit, or within rtol)."""
    import jax

    bad, total, worst = 0, 0, 0.0
    gl, wl = jax.tree.leaves(got), jax.tree.leaves(want)
    if len(gl) != len(wl):
        msg = f"MISMATCH: {len(gl)} leaves vs {len(wl)}"
        return job.kv.gather("cmp", msg)[0]
    for g, w in zip(gl, wl):
        gs, ws = local_shards(g), local_shards(w)
        for r in gs:
            a, b = gs[r], ws[r]
            if a.shape != b.shape:
                n = min(a.shape[0], b.shape[0]) if a.ndim and b.ndim else 0
                if a.shape[1:] != b.shape[1:] or n == 0:
                    bad += 1
                    total += 1
                    continue
                a, b = a[:n], b[:n]
            total += a.size
            if exact:
                bad += int(np.sum(_bits(a) != _bits(b)))
            else:
                af, bf = a.astype(np.float64), b.astype(np.float64)
                err = np.abs(af - bf)
                worst = max(worst, float(err.max(initial=0.0)))
                bad += int(np.sum(err > rtol * np.maximum(np.abs(af), np.abs(bf)) + 1e-6))
    parts = job.kv.gather("cmp", [bad, total, worst])
    bad = sum(p[0] for p in parts)
    total = sum(p[1] for p in parts)
    worst = max(p[2] for p in parts)
    if bad:
        return f"MISMATCH {bad}/{total}" + ("" if exact else f" max|d|={worst:.3g}")
    return "ok" if exact else "ok (~)"


# -------------------------------------------------------------------- output


ROW_FIELDS = (
    "mode", "workload", "direction", "dtype", "layout", "tokens", "hidden", "top_k", "experts",
    "routing", "backend", "ranks", "procs", "sms", "us", "us_p10", "us_p90", "us_wall", "us_wall_p10",
    "us_wall_p90", "timer", "samples", "gbps", "roofline_us", "staging_us", "x_roofline", "x_staging",
    "vs_xla", "vs_sort", "deepep_us", "deepep_gbps", "vs_deepep", "check", "note",
    "x_copy", "copy_us", "bytes_per_rank", "link_us", "x_link", "zero_padding",
    "nodes", "rdma_bytes", "rdma_min_bytes", "nvlink_bytes", "rdma_gbps", "nvlink_gbps",
    "windows", "design_bytes", "design_us", "x_design", "aligned",
)

COLUMNS = [
    ("workload", "workload"), ("backend", "backend"), ("EP", "ranks"), ("procs", "procs"),
    ("SMs", "sms"), ("µs med [p10-p90]", "_us"), ("µs wall", "_wall"), ("GB/s", "_gbps"),
    ("x roof", "_roof"), ("x stage", "_stage"), ("x design", "_design"), ("x link", "_link"),
    ("vs xla", "_xla"), ("vs sort", "_sort"), ("DeepEP µs / GB/s", "_deepep"), ("RDMA / NVLink GB/s", "_domains"),
    ("x copy", "_copy"), ("check", "check"),
]
LL_COLUMNS = [
    ("workload", "workload"), ("backend", "backend"), ("EP", "ranks"), ("procs", "procs"),
    ("µs med [p10-p90]", "_us"), ("µs wall", "_wall"), ("GB/s", "_gbps"), ("x copy", "_copy"),
    ("x roof", "_roof"), ("x stage", "_stage"), ("vs xla", "_xla"), ("check", "check"),
]


def _f(v, fmt="{:.0f}"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return fmt.format(v)


def _ratio(v):
    return _f(v, "{:.2f}")


def _cells(row: dict) -> dict:
    c = dict(row)
    if row.get("us") is None:
        note = row.get("note") or "n/a"
        c["_us"] = note if len(note) <= 60 else note[:57] + "..."
        for k in ("_wall", "_gbps", "_roof", "_stage", "_link", "_xla", "_sort", "_copy", "_domains"):
            c[k] = ""
    else:
        c["_us"] = f"{_f(row['us'])} [{_f(row['us_p10'])}-{_f(row['us_p90'])}]"
        c["_wall"] = _f(row.get("us_wall"))
        c["_gbps"] = _f(row.get("gbps"), "{:.1f}")
        c["_roof"] = _ratio(row.get("x_roofline"))
        c["_stage"] = _ratio(row.get("x_staging"))
        c["_design"] = _ratio(row.get("x_design"))
        c["_link"] = _ratio(row.get("x_link"))
        c["_xla"] = _ratio(row.get("vs_xla"))
        c["_sort"] = _ratio(row.get("vs_sort"))
        c["_copy"] = _ratio(row.get("x_copy"))
        c["_domains"] = (f"{_f(row.get('rdma_gbps'), '{:.1f}')} / {_f(row.get('nvlink_gbps'), '{:.1f}')}"
                         if row.get("rdma_gbps") is not None else "")
    d = row.get("deepep_us")
    c["_deepep"] = f"{d:,} / {row['deepep_gbps']}" if d else ""
    if d and row.get("vs_deepep"):
        c["_deepep"] += f" ({row['vs_deepep']:.2f}x)"
    c["sms"] = "" if row.get("sms") is None else str(row["sms"])
    c["check"] = row.get("check") or ""
    return {k: str(v) for k, v in c.items()}


def render_table(rows: List[dict], columns, title: str) -> str:
    cells = [_cells(r) for r in rows]
    # a ratio no row has (the link on one GPU) takes no column
    columns = [(h, k) for h, k in columns
               if not k.startswith("_") or any(c.get(k, "") not in ("", "—") for c in cells)]
    try:
        import io

        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, show_lines=False)
        for head, key in columns:
            t.add_column(head, overflow="fold")
        for c in cells:
            t.add_row(*[c.get(k, "") for _, k in columns])
        buf = io.StringIO()
        Console(file=buf, width=max(200, sum(len(h) for h, _ in columns) * 2), force_terminal=False,
                color_system=None).print(t)
        return buf.getvalue()
    except ImportError:
        widths = [max([len(h)] + [len(c.get(k, "")) for c in cells]) for h, k in columns]
        line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
        out = [title, line([h for h, _ in columns]), line(["-" * w for w in widths])]
        out += [line([c.get(k, "") for _, k in columns]) for c in cells]
        return "\n".join(out) + "\n"


def machine_info(job: Job) -> dict:
    import jax

    return {
        "device_kind": job.device_kind, "platform": job.platform, "devices": job.R,
        "processes": job.nproc, "ranks_per_gpu": job.procs_per_gpu, "sm_cap_per_rank": job.sm_cap,
        "jax": jax.__version__, "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
        "python": _platform.python_version(), "host": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str, payload: dict) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(clean(payload), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def plot_normal(path: str, rows: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series: Dict[str, List[Tuple[int, float]]] = {}
    flat: Dict[str, float] = {}
    for r in rows:
        if r.get("gbps") is None:
            continue
        label = f"{r['workload']}"
        if r.get("sms") is not None:
            series.setdefault(f"{label} ({r['backend']})", []).append((r["sms"], r["gbps"]))
        else:
            flat[f"{label} ({r['backend']})"] = r["gbps"]
    ticks = set()
    for label, pts in sorted(series.items()):
        pts.sort()
        ticks.update(p[0] for p in pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for i, (label, v) in enumerate(sorted(flat.items())):
        ax.axhline(v, linestyle="--", linewidth=1, color=f"C{(i + len(series)) % 10}", label=label)
    ax.set_xlabel("SMs per rank")
    ax.set_ylabel("GB/s per rank (logical)")
    if series:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    if series or flat:
        ax.legend(fontsize=7)
    ax.set_title("jax_ep normal mode")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_low_latency(path: str, rows: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series: Dict[str, List[Tuple[int, float]]] = {}
    for r in rows:
        if r.get("us") is None:
            continue
        series.setdefault(f"{r['direction']} {r['dtype']} ({r['backend']})", []).append((r["tokens"], r["us"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    toks = sorted({p[0] for pts in series.values() for p in pts})
    if toks:
        ax.set_xticks(toks, [str(t) for t in toks])
        ax.minorticks_off()
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("µs per call (median)")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    ax.set_title("jax_ep low-latency mode")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------- the runs


class Run:
    """State shared by the normal and low-latency benchmarks."""

    def __init__(self, args, job: Job):
        self.args, self.job = args, job
        self.rows: List[dict] = []
        self.limits: List[dict] = []
        self.notes: List[str] = list(job.notes)
        self.quiet = args.quiet or not job.main
        self.t0 = time.monotonic()
        if args.timer == "trace" and job.platform != "gpu":
            raise SystemExit(f"--timer trace needs GPU events in the profiler trace; on "
                             f"{job.platform.upper()} use --timer loop or wall")
        flush_mb = args.flush_mb if args.flush_mb is not None else (100 if job.platform == "gpu" else 8)
        self.timer = Timer(job, iters=args.iters, warmup=args.warmup, reps=args.reps,
                           flush_bytes=int(flush_mb * 2 ** 20), progress=self.say,
                           kind=args.timer, kernels=args.kernels)
        copy_mb = args.copy_mb if args.copy_mb is not None else (512 if job.platform == "gpu" else 32)
        self.say(f"copy bandwidth: {copy_mb} MB copy on {job.devices[0]}")
        self.copy = measure_copy(job, self.timer, int(copy_mb * 2 ** 20), args.copy_gbps)
        self.B = self.copy["B"]
        self.backends = _names(args.backends)
        for b in self.backends:
            if b not in ("cuda", "xla", "sort"):
                raise SystemExit(f"unknown backend {b!r}: choose from cuda, xla, sort")

    def say(self, msg: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"[bench {time.monotonic() - self.t0:7.1f}s] {msg}\n")
            sys.stderr.flush()

    def error(self, what: str, e: BaseException) -> str:
        sys.stderr.write(f"[bench rank {self.job.pid}] {what} failed:\n{traceback.format_exc()}\n")
        sys.stderr.flush()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"error: {type(e).__name__}: {msg}"

    def timed_row(self, base: dict, name: str, op, ins, *, flush: bool) -> dict:
        row = dict(base)
        m = self.timer.measure(name, op, ins, flush=flush)
        row.update(us=m["us"]["median"], us_p10=m["us"]["p10"], us_p90=m["us"]["p90"],
                   us_wall=m["wall"]["median"], us_wall_p10=m["wall"]["p10"],
                   us_wall_p90=m["wall"]["p90"], empty_loop_us=m["empty_loop_us"],
                   samples=m["us"]["n"], timer=m["primary"], aligned=m["aligned"])
        return row

    def machine(self) -> dict:
        return machine_info(self.job)

    def add(self, row: dict) -> None:
        """Record a row; show it at once and keep the JSON file current, so a run that
        dies part-way (a kernel deadline, say) still leaves what it measured."""
        self.rows.append(row)
        if not self.job.main:
            return
        if row.get("us") is not None:
            sms = f" sms={row['sms']}" if row.get("sms") else ""
            gbps = f" {row['gbps']:.1f} GB/s" if row.get("gbps") else ""
            own = (f" design {row['design_bytes'] / 1e6:,.0f} MB x{row['x_design']:.2f}"
                   f"{' (windows)' if row.get('windows') else ''}") if row.get("x_design") else ""
            self.say(f"  {row['workload']} {row['backend']}{sms}: {row['us']:.1f} µs "
                     f"[{row['us_p10']:.1f}-{row['us_p90']:.1f}]{gbps}{own} check={row.get('check')}")
        else:
            self.say(f"  {row['workload']} {row['backend']}: {row.get('note')} {row.get('check') or ''}")
        if self.args.json:
            try:
                write_json(self.args.json, self.payload(partial=True))
            except OSError as e:
                self.say(f"cannot write {self.args.json}: {e}")

    def payload(self, partial: bool = False) -> dict:
        return {"mode": self.args.mode, "partial": partial, "machine": self.machine(),
                "config": _config(self.args), "copy": self.copy, "limits": self.limits,
                "notes": self.notes, "rows": self.rows}

    def finish(self, title: str, columns, header_lines: List[str], plot) -> int:
        job = self.job
        for r in self.rows:  # every row has every field (None where it does not apply)
            for k in ROW_FIELDS:
                r.setdefault(k, None)
        self.rows.sort(key=_row_order)
        if job.main:
            print("\n".join(header_lines))
            for lim in self.limits:
                print(_limit_line(lim))
            print(render_table(self.rows, columns, title))
            for n in self.notes:
                print(f"note: {n}")
            if self.args.json:
                write_json(self.args.json, self.payload())
                print(f"wrote {self.args.json}")
            if self.args.plot:
                try:
                    plot(self.args.plot, self.rows)
                    print(f"wrote {self.args.plot}")
                except Exception as e:  # noqa: BLE001
                    print(f"plot failed: {type(e).__name__}: {e}")
        job.kv.barrier("end")
        bad = [r for r in self.rows if str(r.get("check") or "").startswith("MISMATCH")
               or str(r.get("note") or "").startswith("error")]
        if bad and job.main:
            print(f"{len(bad)} row(s) failed (MISMATCH or error; tracebacks on stderr): exit code 1")
        return 1 if bad else 0

    def header(self) -> List[str]:
        j, c = self.job, self.copy
        a = self.args
        copies = (f"jnp.copy of {c['bytes'] / 2 ** 20:.0f} MB on rank 0: {c['memcpy_us']:.0f} µs = "
                  f"{c['memcpy_Bps'] / 1e9:.1f} GB/s")
        if c.get("kernel_Bps"):
            copies += (f"; copy kernel, {c.get('kernel_timer', 'loop')} timer: {c['kernel_us']:.0f} µs = "
                       f"{c['kernel_Bps'] / 1e9:.1f} GB/s")
        if "all_ranks_Bps" in c:
            copies += (f"; all {j.procs_per_gpu} ranks of a GPU at once: {c['all_ranks_us']:.0f} µs = "
                       f"{c['all_ranks_Bps'] / 1e9:.1f} GB/s")
        source = (f"given by --copy-gbps (measured here: {c['B_measured'] / 1e9:.1f} GB/s)"
                  if a.copy_gbps else "the largest of")
        lines = [
            f"machine: {j.device_kind} ({j.platform}), {j.R} ranks in {j.nproc} process(es), "
            f"{j.procs_per_gpu} rank(s) per device, up to {j.sm_cap} SMs per rank",
            f"copy bandwidth B = {c['B'] / 1e9:.1f} GB/s of read+write traffic, {source}: {copies}",
            f"timing: median of {a.iters} samples after {a.warmup} warmup calls; " + {
                "loop": f"µs = loop timer (device side, {a.reps} calls per program), µs wall = one call "
                        "per sample",
                "trace": "µs = span of the call's GPU work in a profiler trace (first kernel start to "
                         "last kernel end), µs wall = one call per sample",
                "wall": "µs = wall clock of one call per sample (--timer wall)"}[a.timer],
        ]
        return lines


def _mb(b: float) -> str:
    return f"{b / 1e6:,.1f} MB"


def _limit_line(lim: dict) -> str:
    what = " ".join(str(lim[k]) for k in ("layout", "direction", "dtype") if lim.get(k))
    line = (f"limits T={lim['tokens']} {what}: roofline {_mb(lim['roofline_bytes'])} -> "
            f"{lim['roofline_us']:,.1f} µs, staging ceiling {_mb(lim['staging_bytes'])} -> "
            f"{lim['staging_us']:,.1f} µs (bytes of the busiest GPU, all its ranks)")
    if lim.get("link_us") is not None:
        line += f"; remote rows at the link rate: {lim['link_us']:,.1f} µs (limits include it)"
    if "roofline_bytes_rank0" in lim:
        line += (f"; per rank: rank 0 {_mb(lim['roofline_bytes_rank0'])}, "
                 f"max {_mb(lim['roofline_bytes_max'])}")
    if "message_bytes_per_rank_mean" in lim:
        copy = lim.get("copy_same_bytes_us")
        line += (f"; messages {lim['message_bytes_per_rank_mean'] / 1e3:,.1f} kB per rank, copy of "
                 f"the same bytes {'—' if copy is None else f'{copy:,.1f} µs'}")
    return line


def _row_order(r: dict):
    backends = {"cuda": 0, "xla": 1, "sort": 2}
    layouts = {"experts": 0, "tokens": 1, None: 2}
    work = ({"dispatch": 0, "combine": 1, "round trip": 2}.get(r["direction"], 3), r["dtype"] != "bf16")
    return (r["tokens"], layouts.get(r.get("layout"), 3), work, backends.get(r["backend"], 3),
            r.get("sms") or 0)


def _config(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func",)}


def _rank_inputs(job: Job, routing: Routing, T: int, H: int, seed: int):
    """This run's activations and each rank's slice of the global routing."""
    x = random_tokens(job, T, H, seed)
    idx = put_ranks(job, lambda r: routing.idx[r * T:(r + 1) * T])
    w = put_ranks(job, lambda r: routing.w[r * T:(r + 1) * T])
    return x, idx, w


def _bench_buffer(run: "Run", job: Job, *, T: int, H: int, E: int, K: int, low_latency: bool,
                  transport: str = "peer", num_nodes: int = 1):
    """(Buffer, None), or (None, why) when it cannot be made."""
    import jax.numpy as jnp

    import jax_ep

    what = "jax_ep.Buffer(low_latency=True)" if low_latency else "jax_ep.Buffer"
    try:
        buf = jax_ep.Buffer(job.mesh, EP, hidden=H, max_tokens_per_rank=T, num_experts=E, top_k=K,
                            dtype=jnp.bfloat16, low_latency=low_latency, transport=transport,
                            num_nodes=num_nodes, name=f"jax_ep_bench_{'ll_' if low_latency else ''}{T}")
    except Exception as e:  # noqa: BLE001
        return None, run.error(what, e)
    if getattr(buf, "allocated", False) and buf.num_ranks > 1:
        run.say(f"{buf.name}: windows {'on' if buf.windows else 'off'} "
                "(receivers read peers' XLA buffers in place)")
    return buf, None


def _start_align(run: "Run", job: Job, cuda_ok: bool):
    """`--align`: a device barrier before each timed call (`Timer.set_align`), made of
    `jax_ep.all_reduce` of 4 floats on a small Buffer of its own (one SM), wherever
    several ranks run and the cuda kernels can (auto, device); none: never. Returns
    that Buffer (closed at the end) or None."""
    import jax.numpy as jnp
    from jax import lax

    import jax_ep

    from .vma import like_inputs

    if run.args.align == "none" or job.R == 1:
        return None
    if not cuda_ok:  # (Job.cuda_runs: the kernels on GPUs)
        if run.args.align == "device":  # asked for; auto passes quietly
            run.notes.append("--align device needs the cuda kernels on GPUs; calls are not aligned")
        return None
    # The barrier's Buffer reaches its peers by pointers: one host only (every process
    # learns the same, so all skip it together).
    if len(set(job.kv.gather("align/host", socket.gethostname()))) > 1:
        run.notes.append("--align: the processes span several hosts, where the barrier's Buffer cannot "
                         "reach its peers; calls are not aligned")
        return None
    try:
        buf = jax_ep.Buffer(job.mesh, EP, hidden=128, max_tokens_per_rank=128, num_experts=job.R, top_k=1,
                            dtype=jnp.bfloat16, name="jax_ep_bench_align")
    except Exception as e:  # noqa: BLE001
        run.notes.append(f"--align: no barrier Buffer ({run.error('jax_ep.Buffer (align)', e)}); "
                         "calls are not aligned")
        return None
    cfg = jax_ep.Config(num_sms=1)

    def pre(args):
        s = jax_ep.all_reduce(like_inputs(jnp.zeros((4,), jnp.float32), *args), axis_name=EP, buffer=buf,
                              config=cfg, backend="cuda")
        args, _ = lax.optimization_barrier((tuple(args), s))
        return args

    run.timer.set_align(pre)
    run.notes.append("each timed call follows a device barrier across the ranks (jax_ep.all_reduce of 4 "
                     "floats, --align device): the loop timer runs it in the empty loop too, the trace "
                     "timer's span starts where it ends; µs wall times the call alone")
    return buf


def _start_nvshmem(run: "Run", R: int, H: int, E: int, K: int, T: int, *, low_latency: bool = True,
                   num_nodes: int = 1):
    """NVSHMEM with a heap that holds the largest Buffer: (True, None) or (False, why)."""
    from jax_ep import nvshmem

    try:
        nvshmem.initialize(symmetric_size=nvshmem.heap_bytes(
            num_ranks=R, hidden=H, max_tokens_per_rank=T, num_experts=E, top_k=K, low_latency=low_latency,
            num_nodes=num_nodes))
    except Exception as e:  # noqa: BLE001
        return False, run.error("jax_ep.nvshmem.initialize", e)
    return True, None


def _token_order(tokens: str, nvshmem: bool) -> List[int]:
    """The token counts in the order their Buffers are made: the largest first over
    NVSHMEM, whose heap keeps the memory of freed Buffers, so that each later Buffer
    fits where the first one was (the rows are sorted for the table either way)."""
    ts = _ints(tokens)
    return sorted(ts, reverse=True) if nvshmem else ts


def _close(buf) -> None:
    if buf is not None:
        try:
            buf.close()
        except Exception:  # noqa: BLE001
            pass


def _deepep(job: Job, direction: str, dtype: str, sms, shape: dict):
    if sms is None or not job.shared_gpu or job.nproc != job.R:
        return None
    if any(shape[k] != v for k, v in DEEPEP_SHAPE.items()):
        return None
    # DeepEP's FP8 figure is of pre-quantized rows: "fp8in" is the like-for-like row
    return DEEPEP.get((job.R, sms), {}).get((direction, "fp8" if dtype == "fp8in" else dtype))


def _start(args):
    """The job, its Run and the checked dtypes, for either mode."""
    job = make_job(args.devices)
    if args.experts % job.R:
        raise SystemExit(f"--experts {args.experts} must be divisible by the {job.R} ranks")
    dtypes = _names(args.dtype)
    for d in dtypes:
        if d not in WIRE_BYTES:
            raise SystemExit(f"--dtype: {d!r} is not bf16, fp8 or fp8in")
    return job, Run(args, job), dtypes


def run_normal(args) -> int:
    import jax.numpy as jnp

    import jax_ep

    job, run, dtypes = _start(args)
    R, H, E, K = job.R, args.hidden, args.experts, args.top_k
    if any(d in FP8_DTYPES for d in dtypes) and H % FP8_BLOCK:
        run.notes.append(f"fp8 skipped: hidden {H} is not a multiple of {FP8_BLOCK}")
        dtypes = [d for d in dtypes if d not in FP8_DTYPES]
    layouts = _names(args.layout)
    xla_ok, xla_why = job.xla_runs
    cuda_ok, cuda_why = job.cuda_runs()
    sms_list, sm_notes = sm_values(args.sms, job.sm_cap)
    sms_list = sorted(sms_list, reverse=True)  # the full share first: the likeliest to run
    run.notes += sm_notes
    multi_gpu = not job.shared_gpu and R > 1
    header = run.header()
    if "cuda" in run.backends and cuda_ok:
        header.append(f"cuda SM sweep per rank: {', '.join(map(str, sorted(sms_list)))} (cap {job.sm_cap})")
    if "xla" in run.backends and not xla_ok:
        run.notes.append(f"xla backend {xla_why[5:]}; cuda outputs are not compared here (tests/gpu do it)")
    if args.nodes is None:
        from . import distributed

        args.nodes = distributed.num_nodes() if job.nproc == R else 1
    transport = args.transport if args.transport != "auto" else ("nvshmem" if args.nodes > 1 else "peer")
    if args.nodes > 1:
        if R % args.nodes or (transport == "nvshmem" and job.nproc != R):
            raise SystemExit(f"--nodes {args.nodes}: needs nodes dividing the {R} ranks and, with NVSHMEM, "
                             f"one rank per process (python -m jax_ep.launch --nproc {R} --nodes {args.nodes})")
        how = "NVSHMEM puts" if transport == "nvshmem" else "stores through peer pointers"
        header.append(f"internode: {args.nodes} nodes x {R // args.nodes} ranks; rows between nodes by "
                      f"{how} (once per target node), inside a node by loads")
    if transport == "nvshmem" and "cuda" in run.backends and cuda_ok:
        cuda_ok, cuda_why = _start_nvshmem(run, R, H, E, K, max(_ints(args.tokens)), low_latency=False,
                                           num_nodes=args.nodes)
    align_buf = _start_align(run, job, cuda_ok)

    for T in _token_order(args.tokens, transport == "nvshmem"):
        routing = make_routing(args.routing, args.seed, R, T, E, K, args.zipf_s)
        shape = dict(tokens=T, hidden=H, top_k=K, experts=E)
        header.append(
            f"T={T}: routing {args.routing} (seed {args.seed}); rows_tok rank0 {routing.rows_tok[0]} "
            f"max {routing.rows_tok.max()}; rows_exp rank0 {routing.rows_exp[0]} max {routing.rows_exp.max()}")
        x, idx, w = _rank_inputs(job, routing, T, H, args.seed)
        buf = None
        inter = internode_rows(routing.idx, R, E, args.nodes) if args.nodes > 1 else None
        if inter is not None:
            header.append(
                f"T={T} internode rows per rank (max): dispatch RDMA {int(inter['dispatch_rdma'].max())} "
                f"(least possible {int(inter['dispatch_rdma_min'].max())}), NVLink from forwarders "
                f"{int(inter['dispatch_nvlink'].max())}; combine RDMA {int(inter['combine_rdma'].max())} "
                f"unreduced partials (least possible {int(inter['combine_rdma_min'].max())})")
        if "cuda" in run.backends and cuda_ok:
            buf, why = _bench_buffer(run, job, T=T, H=H, E=E, K=K, low_latency=False,
                                     transport=transport, num_nodes=args.nodes)
            if buf is None:
                cuda_ok, cuda_why = False, why
        for layout in layouts:
            rows_out = routing.rows_exp if layout == "experts" else routing.rows_tok
            C = round_up(int(rows_out.max()), 128)
            header.append(f"T={T} {layout}: max_rows = {C} (most rows any rank receives, "
                          f"{int(rows_out.max())}, rounded up to 128)")
            _normal_layout(run, job, args, T, layout, C, dtypes, routing, inter, shape, x, idx, w, buf,
                           xla_ok, xla_why, cuda_ok, cuda_why, sms_list, multi_gpu)
        job.kv.barrier("close")
        _close(buf)
        del x, idx, w
    _close(align_buf)
    _fill_ratios(run.rows)
    if args.routing != "uniform" and any(r.get("deepep_us") for r in run.rows):
        run.notes.append("DeepEP's figures come from its test's uniform random routing; its ratio here is "
                         "by GB/s. Run with --routing uniform to compare µs with the same row counts.")
    title = f"jax_ep normal: hidden {H}, top-{K} of {E} experts, {R} ranks"
    return run.finish(title, COLUMNS, header, plot_normal)


def _normal_layout(run: Run, job: Job, args, T, layout, C, dtypes, routing: Routing, inter, shape,
                   x, idx, w, buf, xla_ok, xla_why, cuda_ok, cuda_why, sms_list, multi_gpu):
    import jax_ep

    R, H, E, K = job.R, args.hidden, args.experts, args.top_k
    rows_out = routing.rows_exp if layout == "experts" else routing.rows_tok
    windows = bool(getattr(buf, "windows", False))

    # limits of every (direction, dtype)
    lim = {}
    for direction, dtype in [("dispatch", d) for d in dtypes] + [("combine", "bf16")]:
        roof_b, stage_b = normal_bytes(direction, T, H, rows_out, routing.rows_tok, dtype)
        t_roof = limit_seconds(roof_b, job.gpu_of_rank, run.B)
        t_stage = limit_seconds(stage_b, job.gpu_of_rank, run.B)
        t_link = None
        if multi_gpu:
            t_link = link_seconds(routing.pair_tok, H, wire_bytes(dtype), args.link_gbps * 1e9)
            t_roof, t_stage = max(t_roof, t_link), max(t_stage, t_link)
        lim[(direction, dtype)] = (t_roof, t_stage, t_link)
        run.limits.append(dict(tokens=T, layout=layout, direction=direction, dtype=dtype,
                               link_us=None if t_link is None else t_link * 1e6,
                               roofline_bytes=busiest_gpu_bytes(roof_b, job.gpu_of_rank),
                               staging_bytes=busiest_gpu_bytes(stage_b, job.gpu_of_rank),
                               roofline_bytes_rank0=float(roof_b[0]), roofline_bytes_max=float(roof_b.max()),
                               roofline_us=t_roof * 1e6, staging_us=t_stage * 1e6,
                               rows_out_rank0=int(rows_out[0]), rows_out_max=int(rows_out.max()),
                               rows_tok_rank0=int(routing.rows_tok[0]), rows_tok_max=int(routing.rows_tok.max()),
                               max_rows=C))

    def base_row(direction, dtype, backend, sms=None):
        t_roof, t_stage, t_link = lim[(direction, dtype)]
        d = _deepep(job, direction, dtype, sms, shape) if backend == "cuda" else None
        return dict(mode="normal", workload=f"{direction} {dtype} {layout} T={T}", direction=direction,
                    dtype=dtype, layout=layout, routing=args.routing, backend=backend, ranks=R,
                    procs=job.nproc, sms=sms, max_rows=C, roofline_us=t_roof * 1e6,
                    staging_us=t_stage * 1e6, link_us=None if t_link is None else t_link * 1e6,
                    rows_tok_mean=float(routing.rows_tok.mean()),
                    deepep_us=d[0] if d else None, deepep_gbps=d[1] if d else None, **shape)

    def finish_row(row):
        if row.get("us") is not None and row["us"] > 0:
            s = row["us"] * 1e-6
            row["gbps"] = logical_gbps(routing.rows_tok.mean(), H, s, row["dtype"])
            if inter is not None and row["backend"] == "cuda":
                b = H * wire_bytes(row["dtype"])
                d = row["direction"]
                rdma, nvl = inter[f"{d}_rdma"] * b, inter[f"{d}_nvlink"] * b
                row.update(nodes=args.nodes, rdma_bytes=float(rdma.max()),
                           rdma_min_bytes=float(inter[f"{d}_rdma_min"].max() * b),
                           nvlink_bytes=float(nvl.max()), rdma_gbps=float(rdma.max()) / s / 1e9,
                           nvlink_gbps=float(nvl.max()) / s / 1e9)
                # the same cross-domain bytes as one plain copy (read + write) in this run
                row["copy_us"] = limit_seconds(2 * (rdma + nvl), job.gpu_of_rank, run.B) * 1e6
                row["x_copy"] = row["copy_us"] / row["us"]
            row["x_roofline"] = row["roofline_us"] / row["us"]
            row["x_staging"] = row["staging_us"] / row["us"]
            if row["backend"] == "cuda" and inter is None and not multi_gpu:
                # the bytes of this design (design_bytes) over the same copy bandwidth
                own = design_bytes(row["direction"], T, H, rows_out, routing.rows_tok, row["dtype"],
                                   ranks=R, windows=windows)
                row.update(windows=windows, design_bytes=busiest_gpu_bytes(own, job.gpu_of_rank),
                           design_us=limit_seconds(own, job.gpu_of_rank, run.B) * 1e6)
                row["x_design"] = row["design_us"] / row["us"]
            if row.get("link_us"):
                row["x_link"] = row["link_us"] / row["us"]
            if row.get("deepep_gbps"):
                # GB/s normalizes for the routing (DeepEP's test routes uniformly at random).
                row["vs_deepep"] = row["gbps"] / row["deepep_gbps"]
        run.add(row)

    ops: Dict[Any, Callable] = {}  # one function object per op, so its compilation is reused

    def dispatch_op(backend, dtype, sms):
        key = ("dispatch", backend, dtype, sms)
        if key not in ops:
            cfg = jax_ep.Config(num_sms=sms) if sms else None

            def op(xv, iv, wv):
                return jax_ep.dispatch(xv, iv, wv, num_experts=E, axis_name=EP, max_rows=C,
                                       layout=layout, fp8=(dtype in FP8_DTYPES),
                                       buffer=buf if backend == "cuda" else None, config=cfg,
                                       backend=backend)
            ops[key] = op
        return ops[key]

    def combine_op(sms, weighted):
        key = ("combine", sms, weighted)
        if key not in ops:
            cfg = jax_ep.Config(num_sms=sms) if sms else None
            if weighted:
                ops[key] = lambda ex, wts, h: jax_ep.combine(ex, h, wts, config=cfg)
            else:
                ops[key] = lambda ex, h: jax_ep.combine(ex, h, config=cfg)
        return ops[key]

    weighted = layout == "experts"  # the tokens layout applies its weights in the experts
    xq = sharded(job, ops.setdefault("quantize", jax_ep.fp8.quantize))(x) if "fp8in" in dtypes else None

    def x_of(dtype):
        """The timed call's input: FP8 rows quantized beforehand for "fp8in"."""
        return xq if dtype == "fp8in" else x

    # ---- xla: the reference and a baseline
    ref = {}
    want = [b for b in ("xla", "cuda") if b in run.backends]
    if "xla" in want or ("cuda" in want and cuda_ok and not args.no_check):
        if xla_ok:
            # combine always moves BF16: its inputs come from a BF16 dispatch
            for dtype in dtypes + ([] if "bf16" in dtypes else ["bf16"]):
                try:
                    out = sharded(job, dispatch_op("xla", dtype, None))(x_of(dtype), idx, w)
                    if dtype in dtypes:
                        ref[("dispatch", dtype)] = _dispatch_view(out)
                    if dtype == "bf16":
                        ins = (out.x, out.weights, out.handle) if weighted else (out.x, out.handle)
                        ref["combine_ins"] = ins
                        ref[("combine", "bf16")] = sharded(job, combine_op(None, weighted))(*ins)
                except Exception as e:  # noqa: BLE001
                    ref[("error", dtype)] = run.error(f"xla dispatch {dtype} {layout}", e)
    if "xla" in run.backends:
        for direction, dtype in [("dispatch", d) for d in dtypes] + [("combine", "bf16")]:
            row = base_row(direction, dtype, "xla")
            if not xla_ok:
                row["note"] = "n/a"
                row["check"] = xla_why[5:]
                run.add(row)
                continue
            name = f"xla/{layout}/{direction}/{dtype}/{T}"
            run.say(f"timing {name}")
            try:
                if direction == "dispatch":
                    if ("error", dtype) in ref:
                        raise RuntimeError(ref[("error", dtype)])
                    row = run.timed_row(row, name, dispatch_op("xla", dtype, None), (x_of(dtype), idx, w),
                                        flush=True)
                else:
                    if "combine_ins" not in ref:
                        raise RuntimeError(ref.get(("error", "bf16"), "no BF16 dispatch to combine"))
                    row = run.timed_row(row, name, combine_op(None, weighted), ref["combine_ins"], flush=True)
                row["check"] = "ref"
            except Exception as e:  # noqa: BLE001
                row["note"] = run.error(name, e)
            finish_row(row)

    # ---- sort: EP1 local permutation baseline (experts layout, BF16)
    if "sort" in run.backends and layout == "experts" and "bf16" in dtypes:
        for direction in ("dispatch", "combine"):
            row = base_row(direction, "bf16", "sort")
            if R != 1:
                row["note"] = "n/a: EP1 only"
                run.add(row)
                continue
            name = f"sort/{direction}/{T}"
            run.say(f"timing {name}")
            try:
                permute = ops.setdefault("sort_permute", _sort_permute(E))
                unpermute = ops.setdefault("sort_unpermute", _sort_unpermute(T))
                rows_s, tok, ws, sizes = sharded(job, permute)(x, idx, w)
                if direction == "dispatch":
                    if ("dispatch", "bf16") in ref and not args.no_check:
                        row["check"] = compare(job, rows_s, ref[("dispatch", "bf16")]["x"])
                    row = run.timed_row(row, name, permute, (x, idx, w), flush=True)
                else:
                    if ("combine", "bf16") in ref and not args.no_check:
                        y = sharded(job, unpermute)(rows_s, tok, ws)
                        row["check"] = compare(job, y, ref[("combine", "bf16")], exact=False)
                        del y
                    row = run.timed_row(row, name, unpermute, (rows_s, tok, ws), flush=True)
            except Exception as e:  # noqa: BLE001
                row["note"] = run.error(name, e)
            finish_row(row)

    # ---- cuda: the kernels, per SM count
    if "cuda" in run.backends:
        if not cuda_ok:
            for direction, dtype in [("dispatch", d) for d in dtypes] + [("combine", "bf16")]:
                row = base_row(direction, dtype, "cuda")
                row["note"] = "n/a"
                row["check"] = cuda_why[5:] if cuda_why.startswith("n/a: ") else cuda_why
                run.add(row)
            return
        for sms in sms_list:
            combine_ins = None
            for direction, dtype in [("dispatch", d) for d in dtypes] + [("combine", "bf16")]:
                row = base_row(direction, dtype, "cuda", sms)
                name = f"cuda/{layout}/{direction}/{dtype}/{T}/sms{sms}"
                run.say(f"timing {name}")
                try:
                    if direction == "dispatch":
                        op = dispatch_op("cuda", dtype, sms)
                        out = sharded(job, op)(x_of(dtype), idx, w)
                        row["check"] = _check_against(run, job, args, ref, ("dispatch", dtype),
                                                      _dispatch_view(out), xla_ok)
                        row["overflow"] = _overflow(out)
                        if dtype == "bf16":
                            combine_ins = (out.x, out.weights, out.handle) if weighted else (out.x, out.handle)
                        del out
                        row = run.timed_row(row, name, op, (x_of(dtype), idx, w), flush=True)
                    else:
                        if combine_ins is None:
                            out = sharded(job, dispatch_op("cuda", "bf16", sms))(x, idx, w)
                            combine_ins = (out.x, out.weights, out.handle) if weighted else (out.x, out.handle)
                        op = combine_op(sms, weighted)
                        y = sharded(job, op)(*combine_ins)
                        row["check"] = _check_against(run, job, args, ref, ("combine", "bf16"), y, xla_ok)
                        del y
                        row = run.timed_row(row, name, op, combine_ins, flush=True)
                except Exception as e:  # noqa: BLE001
                    row["note"] = run.error(name, e)
                finish_row(row)
            del combine_ins


def _dispatch_view(out) -> dict:
    v = {"x": out.x, "weights": out.weights, "group_sizes": out.group_sizes}
    if out.topk_idx is not None:
        v["topk_idx"] = out.topk_idx
    return v


def _overflow(out) -> int:
    return int(sum(int(np.sum(a)) for a in local_shards(out.handle.num_overflow).values()))


def _check_against(run: Run, job: Job, args, ref: dict, key, got, xla_ok: bool) -> str:
    if args.no_check:
        return "not checked (--no-check)"
    if not xla_ok:
        return "not checked here (no xla on this harness)"
    if key not in ref:
        return "not checked (no xla reference)"
    return compare(job, got, ref[key])


def _sort_permute(E: int):
    import jax.numpy as jnp

    def permute(x, idx, w):
        T, K = idx.shape
        flat = idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        tok = (order // K).astype(jnp.int32)
        rows = jnp.take(x, tok, axis=0)
        w_sorted = jnp.take(w.reshape(-1), order)
        sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
        return rows, tok, w_sorted, sizes

    return permute


def _sort_unpermute(T: int):
    import jax
    import jax.numpy as jnp

    def unpermute(rows, tok, w_sorted):
        y = jax.ops.segment_sum(rows.astype(jnp.float32) * w_sorted[:, None], tok, num_segments=T)
        return y.astype(rows.dtype)

    return unpermute


def _fill_ratios(rows: List[dict]) -> None:
    def key(r):
        return (r["mode"], r["direction"], r["dtype"], r.get("layout"), r["tokens"])

    xla = {key(r): r["us"] for r in rows if r["backend"] == "xla" and r.get("us")}
    srt = {(r["direction"], r["tokens"]): r["us"] for r in rows if r["backend"] == "sort" and r.get("us")}
    for r in rows:
        if not r.get("us"):
            continue
        if r["backend"] != "xla" and key(r) in xla:
            r["vs_xla"] = xla[key(r)] / r["us"]
        if (r["backend"] != "sort" and r.get("layout") == "experts" and r["dtype"] == "bf16"
                and (r["direction"], r["tokens"]) in srt):
            r["vs_sort"] = srt[(r["direction"], r["tokens"])] / r["us"]


# --------------------------------------------------------------- low latency


def run_low_latency(args) -> int:
    import jax
    import jax.numpy as jnp

    import jax_ep

    job, run, dtypes = _start(args)
    R, H, E, K = job.R, args.hidden, args.experts, args.top_k
    if "fp8in" in dtypes:
        raise SystemExit("--dtype fp8in is a normal-mode dtype; low latency takes bf16 or fp8")
    if "fp8" in dtypes and H % FP8_BLOCK:
        raise SystemExit(f"fp8 needs --hidden to be a multiple of {FP8_BLOCK}")
    xla_ok, xla_why = job.xla_runs
    cuda_ok, cuda_why = job.cuda_runs()
    header = run.header()
    if "xla" in run.backends and not xla_ok:
        run.notes.append(f"xla backend {xla_why[5:]}; cuda outputs are not compared here (tests/gpu do it)")

    if args.transport == "nvshmem" and "cuda" in run.backends and cuda_ok:
        cuda_ok, cuda_why = _start_nvshmem(run, R, H, E, K, max(_ints(args.tokens)))
        run.notes.append("low-latency kernels over NVSHMEM (puts and signals on symmetric memory)")
    align_buf = _start_align(run, job, cuda_ok)
    for T in _token_order(args.tokens, args.transport == "nvshmem"):
        routing = make_routing(args.routing, args.seed, R, T, E, K, args.zipf_s)
        shape = dict(tokens=T, hidden=H, top_k=K, experts=E)
        x, idx, w = _rank_inputs(job, routing, T, H, args.seed)
        buf = None
        if "cuda" in run.backends and cuda_ok:
            buf, why = _bench_buffer(run, job, T=T, H=H, E=E, K=K, low_latency=True,
                                     transport=args.transport)
            if buf is None:
                cuda_ok, cuda_why = False, why

        # limits and the copy of the same bytes
        lim = {}
        for direction, dtype in [("dispatch", d) for d in dtypes] + [("combine", "bf16")]:
            fp8 = dtype == "fp8"
            msg_bytes = ll_bytes(routing.num_valid, H, fp8 if direction == "dispatch" else False)
            roof_b, stage_b = normal_bytes(direction, T, H, routing.rows_exp, routing.rows_tok, dtype)
            t_roof = limit_seconds(roof_b, job.gpu_of_rank, run.B)
            t_stage = limit_seconds(stage_b, job.gpu_of_rank, run.B)
            name = f"copy/{direction}/{dtype}/{T}"
            n_el = max(64, int(round(msg_bytes.mean() / 2)))
            try:
                src = put_ranks(job, lambda r: np.zeros((n_el,), jnp.bfloat16))
                m = run.timer.measure(name, lambda a, o: a * o, (src, run.timer.one), flush=False)
                t_copy = m["us"]["median"]
                del src
            except Exception as e:  # noqa: BLE001
                run.error(name, e)
                t_copy = None
            lim[(direction, dtype)] = (t_roof, t_stage, t_copy, msg_bytes)
            run.limits.append(dict(tokens=T, direction=direction, dtype=dtype,
                                   message_bytes_per_rank_mean=float(msg_bytes.mean()),
                                   copy_same_bytes_us=t_copy, roofline_us=t_roof * 1e6,
                                   staging_us=t_stage * 1e6,
                                   roofline_bytes=busiest_gpu_bytes(roof_b, job.gpu_of_rank),
                                   staging_bytes=busiest_gpu_bytes(stage_b, job.gpu_of_rank)))

        # dispatch then combine, as one decode step moves them (with the FP8 -> BF16
        # conversion of the received rows between the two)
        d0 = dtypes[0]
        parts = [lim[("dispatch", d0)], lim[("combine", "bf16")]]
        lim[("round trip", d0)] = (
            sum(p[0] for p in parts), sum(p[1] for p in parts),
            None if any(p[2] is None for p in parts) else sum(p[2] for p in parts),
            sum(p[3] for p in parts))
        directions = [("dispatch", d) for d in dtypes] + [("round trip", d0)]
        if not args.no_combine_alone:
            directions.append(("combine", "bf16"))

        unset = args.padding == "unset"

        def base_row(direction, dtype, backend):
            t_roof, t_stage, t_copy, msg_bytes = lim[(direction, dtype)]
            label = f"{direction} {dtype} T={T}" + (", padding unset" if unset and direction != "combine" else "")
            return dict(mode="low_latency", workload=label, direction=direction, zero_padding=not unset,
                        dtype=dtype, layout=None, routing=args.routing, backend=backend,
                        transport=args.transport if backend == "cuda" else None, ranks=R,
                        procs=job.nproc, sms=None, roofline_us=t_roof * 1e6, staging_us=t_stage * 1e6,
                        copy_us=t_copy, bytes_per_rank=float(msg_bytes.mean()), **shape)

        def finish_row(row):
            if row.get("us") is not None and row["us"] > 0:
                row["gbps"] = row["bytes_per_rank"] / 1e9 / (row["us"] * 1e-6)
                row["x_roofline"] = row["roofline_us"] / row["us"]
                row["x_staging"] = row["staging_us"] / row["us"]
                if row.get("copy_us"):
                    row["x_copy"] = row["copy_us"] / row["us"]
            run.add(row)

        def disp_op(backend, dtype):
            def op(xv, iv):
                return jax_ep.low_latency_dispatch(
                    xv, iv, num_experts=E, axis_name=EP, max_tokens_per_rank=T, fp8=(dtype == "fp8"),
                    round_scale=args.round_scale, buffer=buf if backend == "cuda" else None,
                    backend=backend, zero_padding=not unset)
            return op

        def checked_disp_op(backend, dtype):
            # what the check compares: with the padding unset, only the rows up to count[e]
            op = disp_op(backend, dtype)

            def view(xv, iv):
                r = op(xv, iv)
                if not unset:
                    return {"x": r.x, "count": r.count}
                rows = r.x.data if dtype == "fp8" else r.x
                valid = (jnp.arange(rows.shape[1]) < r.count[:, None])[:, :, None]
                keep = lambda a: jnp.where(valid, a, jnp.zeros((), a.dtype))  # noqa: E731
                return {"x": jax.tree.map(keep, r.x), "count": r.count}
            return view

        def producer(backend, dtype):
            op = disp_op(backend, dtype)

            def make(xv, iv):
                r = op(xv, iv)
                ex = r.x.dequantize(jnp.bfloat16) if dtype == "fp8" else r.x
                return ex.astype(jnp.bfloat16), r.handle
            return make

        def round_trip_op(backend, dtype):
            make = producer(backend, dtype)

            def op(xv, iv, wv):
                ex, h = make(xv, iv)
                return jax_ep.low_latency_combine(ex, iv, wv, h)
            return op

        def timed_round_trip_op(backend, dtype):
            # What is timed: the dispatch, then the combine on its handle, of expert rows
            # converted to BF16 beforehand (the conversion of the whole padded output,
            # [E/R, R*T, H], is XLA's work, milliseconds on a share of the SMs).
            op = disp_op(backend, dtype)

            def timed(xv, iv, wv, ev):
                return jax_ep.low_latency_combine(ev, iv, wv, op(xv, iv).handle)
            return timed

        comb_op = lambda ex, iv, wv, h: jax_ep.low_latency_combine(ex, iv, wv, h)  # noqa: E731
        ll_ref: Dict[Any, Any] = {}

        for backend in [b for b in ("xla", "cuda") if b in run.backends]:
            ok, why = (xla_ok, xla_why) if backend == "xla" else (cuda_ok, cuda_why)
            for direction, dtype in directions:
                row = base_row(direction, dtype, backend)
                if not ok:
                    row["note"] = "n/a"
                    row["check"] = why[5:] if why.startswith("n/a: ") else why
                    run.add(row)
                    continue
                name = f"{backend}/ll/{direction}/{dtype}/{T}"
                run.say(f"timing {name}")
                try:
                    if direction == "dispatch":
                        op = disp_op(backend, dtype)
                        view = sharded(job, checked_disp_op(backend, dtype))(x, idx)
                        if backend == "xla":
                            row["check"] = "ref"
                            ll_ref[("dispatch", dtype)] = view
                        else:
                            row["check"] = _check_against(run, job, args, ll_ref, ("dispatch", dtype), view, xla_ok)
                        del view
                        row = run.timed_row(row, name, op, (x, idx), flush=False)
                    elif direction == "round trip":
                        op = round_trip_op(backend, dtype)
                        y = sharded(job, op)(x, idx, w)
                        if backend == "xla":
                            ll_ref[("round trip", dtype)] = y
                            row["check"] = "ref"
                        else:
                            row["check"] = _check_against(run, job, args, ll_ref, ("round trip", dtype), y, xla_ok)
                        del y
                        ev, _ = sharded(job, producer(backend, dtype))(x, idx)
                        row = run.timed_row(row, name, timed_round_trip_op(backend, dtype), (x, idx, w, ev),
                                            flush=False)
                        del ev
                    else:
                        src_dtype = dtypes[0]
                        ex, h = sharded(job, producer(backend, src_dtype))(x, idx)
                        ins = (ex, idx, w, h)
                        y = sharded(job, comb_op)(*ins)
                        if backend == "xla":
                            ll_ref[("combine", "bf16")] = y
                            row["check"] = "ref"
                        else:
                            row["check"] = _check_against(run, job, args, ll_ref, ("combine", "bf16"), y, xla_ok)
                        row = run.timed_row(row, name, comb_op, ins, flush=False)
                except Exception as e:  # noqa: BLE001
                    row["note"] = run.error(name, e)
                finish_row(row)
        ll_ref.clear()
        job.kv.barrier("close")
        _close(buf)
        del x, idx, w

    _close(align_buf)
    _fill_ratios(run.rows)
    header.append(f"routing {args.routing} (seed {args.seed}); message bytes: fp8 {ll_message_bytes(H, True)}, "
                  f"bf16 {ll_message_bytes(H, False)}; x copy = a copy of the same bytes per rank, timed alike")
    title = f"jax_ep low-latency: hidden {H}, top-{K} of {E} experts, {R} ranks"
    return run.finish(title, LL_COLUMNS, header, plot_low_latency)


# ------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jax_ep.bench",
                                description="jax_ep benchmarks, as BENCHMARKS.md prescribes.")
    sub = p.add_subparsers(dest="mode", required=True)

    def common(s, tokens, dtype, routing, backends):
        s.add_argument("--tokens", default=tokens, help=f"tokens per rank, comma list (default {tokens})")
        s.add_argument("--hidden", type=int, default=7168)
        s.add_argument("--experts", type=int, default=256)
        s.add_argument("--top-k", dest="top_k", type=int, default=8)
        s.add_argument("--dtype", default=dtype, help=f"dispatch dtypes, comma list of bf16,fp8 (default {dtype}); "
                       "normal mode also fp8in (an Fp8Array quantized before the timing)")
        s.add_argument("--routing", default=routing, choices=routing_gen.ROUTINGS)
        s.add_argument("--zipf-s", dest="zipf_s", type=float, default=1.2)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--backends", default=backends, help=f"comma list (default {backends}); "
                       "each is skipped, with the reason, where it cannot run")
        s.add_argument("--iters", type=int, default=50, help="timed samples (default 50)")
        s.add_argument("--warmup", type=int, default=20, help="warmup calls (default 20)")
        s.add_argument("--reps", type=int, default=10, help="calls per program of the loop timer")
        s.add_argument("--timer", choices=TIMERS, default="loop",
                       help="loop: device-side loop timer (µs) and wall clock (µs wall); trace: the "
                            "span of each call's GPU work in a profiler trace (µs) and wall clock; "
                            "wall: the wall clock only (no loop programs to compile)")
        s.add_argument("--align", choices=("auto", "device", "none"), default="auto",
                       help="a device barrier across the ranks before each timed call, so that no "
                            "rank's call starts before every rank reached it (auto, device: with "
                            "several ranks, where the cuda kernels run; the host barrier alone does "
                            "not line up the GPUs)")
        s.add_argument("--kernels", nargs="?", const="main", default=None, choices=("main", "all"),
                       help="with --timer trace: print each measurement's GPU kernels (median start in "
                            "the call, median and longest time) and the idle time inside the call, of the "
                            "main process (--kernels) or of every process (--kernels all)")
        s.add_argument("--copy-mb", dest="copy_mb", type=float, default=None,
                       help="size of the copy that measures B (default 512 on GPU, 32 elsewhere)")
        s.add_argument("--flush-mb", dest="flush_mb", type=float, default=None,
                       help="L2 flush buffer (default 100 on GPU = 2x an H100's L2, 8 elsewhere)")
        s.add_argument("--copy-gbps", dest="copy_gbps", type=float, default=None,
                       help="use this copy bandwidth (GB/s of read+write traffic) as B instead of the "
                            "one measured in this run (both are printed)")
        s.add_argument("--link-gbps", dest="link_gbps", type=float, default=450.0,
                       help="per-direction link rate bounding remote rows when every rank has its own GPU")
        s.add_argument("--devices", type=int, default=None, help="use the first N devices (one process)")
        s.add_argument("--no-check", dest="no_check", action="store_true",
                       help="skip comparing outputs with the xla backend")
        s.add_argument("--json", default=None, help="write the rows and the machine to this file")
        s.add_argument("--plot", default=None, help="write a PNG plot to this file")
        s.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    n = sub.add_parser("normal", help="dispatch / combine (training, prefill)")
    common(n, "4096", "bf16,fp8", "group", "cuda,xla,sort")
    n.add_argument("--layout", default="experts,tokens", help="comma list of experts,tokens")
    n.add_argument("--nodes", type=int, default=None,
                   help="nodes the EP group spans (the internode protocol); default: the launcher's --nodes")
    n.add_argument("--transport", choices=("auto", "peer", "nvshmem"), default="auto",
                   help="the Buffer's transport; auto: nvshmem over several nodes, else peer (peer with "
                        "--nodes K splits one host's GPUs into K groups)")
    n.add_argument("--sms", default="auto",
                   help="SMs per rank for the cuda kernels, comma list (default: 4, 8, 16, ... up to "
                        "132 / ranks per GPU); larger values are clamped")
    ll = sub.add_parser("low-latency", help="low-latency dispatch / combine (decode)")
    common(ll, ",".join(map(str, LL_TOKENS)), "fp8", "uniform", "cuda,xla")
    ll.add_argument("--round-scale", dest="round_scale", action="store_true")
    ll.add_argument("--padding", choices=("zero", "unset"), default="zero",
                    help="rows of the dispatch output past each expert's count: zero (DESIGN 3.2) or "
                         "unset (zero_padding=False; only the first count[e] rows are written)")
    ll.add_argument("--transport", choices=("peer", "nvshmem"), default="peer",
                    help="how the cuda kernels reach other ranks (nvshmem: a build with NVSHMEM)")
    ll.add_argument("--no-combine-alone", dest="no_combine_alone", action="store_true",
                    help="skip timing combine by itself (repeated on one dispatch's handle); the round "
                         "trip (dispatch then combine) is always timed")
    t = sub.add_parser("table", help="markdown table of the rows in --json files (for the docs)")
    t.add_argument("files", nargs="+")
    t.add_argument("--sms", default=None, help="keep only these SM counts of the cuda rows")
    return p


_MD_NORMAL = ("| workload | backend | EP | procs | SMs | µs median [p10-p90] | GB/s per rank | x roofline | "
              "x staging | x design | x link | vs xla | vs sort | DeepEP µs / GB/s (ratio) | check |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
_MD_INTERNODE = ("| workload | backend | EP | nodes | procs | SMs | µs median [p10-p90] | GB/s per rank | "
                 "x staging | RDMA / NVLink GB/s | RDMA bytes / least | x copy | vs xla | check |\n"
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
_MD_LOW_LATENCY = ("| workload | backend | EP | procs | µs median [p10-p90] | GB/s per rank | x copy | "
                   "x roofline | x staging | vs xla | check |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _md_row(r: dict) -> str:
    fmt = lambda v, f: "—" if v is None else f.format(v)  # noqa: E731
    us = f'{r["us"]:,.0f} [{r["us_p10"]:,.0f}-{r["us_p90"]:,.0f}]'
    if r.get("mode") == "low_latency":
        backend = r["backend"] + (f' ({r["transport"]})' if r.get("transport") not in (None, "peer") else "")
        return (f'| {r["workload"]} | {backend} | {r["ranks"]} | {r.get("procs", "")} | {us} | '
                f'{r["gbps"]:.1f} | {fmt(r.get("x_copy"), "{:.2f}")} | {fmt(r.get("x_roofline"), "{:.2f}")} | '
                f'{fmt(r.get("x_staging"), "{:.2f}")} | {fmt(r.get("vs_xla"), "{:.2f}")} | {r.get("check", "")} |')
    if r.get("nodes"):
        least = r["rdma_bytes"] / r["rdma_min_bytes"] if r.get("rdma_min_bytes") else None
        return (f'| {r["direction"]} {r["dtype"]} {r["layout"]} T={r["tokens"]} | {r["backend"]} | '
                f'{r["ranks"]} | {r["nodes"]} | {r.get("procs", "")} | {r.get("sms") or ""} | {us} | '
                f'{r["gbps"]:.1f} | {fmt(r.get("x_staging"), "{:.2f}")} | '
                f'{r["rdma_gbps"]:.1f} / {r["nvlink_gbps"]:.1f} | {fmt(least, "{:.2f}x")} | '
                f'{fmt(r.get("x_copy"), "{:.2f}")} | {fmt(r.get("vs_xla"), "{:.2f}")} | {r.get("check", "")} |')
    dee = ("" if r.get("deepep_us") is None else
           f'{r["deepep_us"]:,.0f} / {r["deepep_gbps"]:.0f} ({r["vs_deepep"]:.2f}x)')
    return (f'| {r["direction"]} {r["dtype"]} {r["layout"]} T={r["tokens"]} | {r["backend"]} | '
            f'{r["ranks"]} | {r.get("procs", "")} | {r.get("sms") or ""} | {us} | {r["gbps"]:.1f} | '
            f'{fmt(r.get("x_roofline"), "{:.2f}")} | {fmt(r.get("x_staging"), "{:.2f}")} | '
            f'{fmt(r.get("x_design"), "{:.2f}")}{" (w)" if r.get("windows") else ""} | '
            f'{fmt(r.get("x_link"), "{:.2f}")} | {fmt(r.get("vs_xla"), "{:.2f}")} | '
            f'{fmt(r.get("vs_sort"), "{:.2f}")} | {dee} | '
            f'{r.get("check", "")} |')


def markdown_table(files: Sequence[str], sms: Optional[str] = None) -> str:
    """The rows of bench JSON files as markdown tables (normal and low-latency rows
    apart, each with its columns), with each file's machine."""
    keep = None if sms is None else {int(v) for v in _names(sms)}
    tables: Dict[str, List[str]] = {"normal": [], "internode": [], "low_latency": []}
    machines = []
    for path in files:
        with open(path) as fh:
            d = json.load(fh)
        m = d.get("machine", {})
        machines.append(f"- `{os.path.basename(path)}`: {m.get('device_kind')}, {m.get('processes')} "
                        f"process(es) on {m.get('devices')} device(s), jax {m.get('jax')}, {m.get('date')}")
        for r in d["rows"]:
            if r.get("us") is None or (keep and r["backend"] == "cuda" and r.get("sms") not in keep):
                continue
            kind = "low_latency" if r.get("mode") == "low_latency" else "internode" if r.get("nodes") else "normal"
            tables[kind].append(_md_row(r))
    out = []
    for kind, head in (("normal", _MD_NORMAL), ("internode", _MD_INTERNODE), ("low_latency", _MD_LOW_LATENCY)):
        if tables[kind]:
            out += [head] + tables[kind] + [""]
    return "\n".join(out + machines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.mode == "table":
        print(markdown_table(args.files, args.sms))
        return 0
    if args.iters < 1 or args.warmup < 0 or args.reps < 1:
        raise SystemExit("--iters and --reps must be >= 1, --warmup >= 0")
    if args.mode == "normal":
        for l in _names(args.layout):
            if l not in ("experts", "tokens"):
                raise SystemExit(f"--layout: {l!r} is not experts or tokens")
        return run_normal(args)
    return run_low_latency(args)


if __name__ == "__main__":
    sys.exit(main())
