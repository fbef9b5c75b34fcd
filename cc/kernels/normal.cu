// Normal-mode dispatch, combine and redispatch (the protocol is in normal.h).
#include "kernels/normal.h"
#include "kernels/rows.cuh"

#ifdef JAX_EP_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace jax_ep {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // units each lane loads before it stores any
constexpr int kWideBlock = 1024;  // the stage kernel's block where it quantizes across ranks

__host__ __device__ inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }
__host__ __device__ inline int elem_bytes(DType d) { return d == DType::kF32 ? 4 : 2; }

// ------------------------------------------------------------ staging views

struct Stage {
  char* x;       // rows: [Tmax, H] in the wire dtype, or FP8 data [Tmax, H]
  float* scales; // FP8 scales [Tmax, H/128]
  int32_t* idx;  // [Tmax, K]
  float* w;      // [Tmax, K]
};

// ------------------------------------------------------------------ row copies

// Copy a row of `units` raw units from src to the rows dst[i] >= 0 (i < kDst) of
// `out` (kCoherent: src was released by a peer during this kernel).
template <int UB, bool kCoherent = false, int kDst = kMaxTopK>
__device__ __forceinline__ void copy_raw_to_rows(const char* src, char* out,
                                                 const int (&dst)[kMaxTopK], int units) {
  const int lane = lane_id();
  for (int u0 = lane; u0 < units; u0 += 32 * kUnroll) {
    RawUnit<UB, kCoherent> r[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j)
      if (u0 + 32 * j < units) r[j].load(src + static_cast<size_t>(u0 + 32 * j) * UB);
#pragma unroll
    for (int i = 0; i < kDst; ++i) {
      if (dst[i] < 0) continue;
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const int u = u0 + 32 * j;
        if (u < units) r[j].store(out + (static_cast<size_t>(dst[i]) * units + u) * UB);
      }
    }
  }
}

// Copy a row of `units` raw units from src to one row.
template <int UB, bool kCoherent = false>
__device__ __forceinline__ void copy_raw_row(const char* src, char* one, int units) {
  int dst[kMaxTopK];
#pragma unroll
  for (int i = 0; i < kMaxTopK; ++i) dst[i] = i == 0 ? 0 : -1;
  copy_raw_to_rows<UB, kCoherent>(src, one, dst, units);
}

// ------------------------------------------------------------------ nodes
//
// Over several nodes (c.nodes > 1; one node is the intranode protocol unchanged)
// a rank loads and stores only within its own node. Rank (m, l) (node m, local
// index l) puts its staged rows, once per target node n, into the `rdma_recv`
// slot for m of rank (n, l), its forwarder on node n, and signals that rank's
// `rdma_flag[m]`. Once the forwarder has seen the flag (through NVSHMEM, so the
// rows the network wrote are visible on its GPU) it stores `rdma_ready[m]`, and
// node n's ranks read (m, l)'s rows from there by loads, exactly as they read a
// rank of their own node: the same routing, order and drops. Combine goes back
// the same way: a partial for a source on another node is stored into the
// forwarder's `comb_fwd` slot, tagged with the epoch, and the forwarder puts every
// tagged row into the source's `comb_recv` slot of the rank that made it, then
// signals the source on that rank's behalf (in `fwd_inbox`); the source sums in
// rank order as on one node. (Rows cross the network unreduced, so the sum's
// order, and each bit of the result, is the one-node order.)

__device__ __forceinline__ int node_of(const CallCtx& c, int r) { return r / c.local_size; }
__device__ __forceinline__ bool on_my_node(const CallCtx& c, int r) {
  return c.nodes == 1 || node_of(c, r) == node_of(c, c.rank);
}
// The rank of node n with r's local index.
__device__ __forceinline__ int peer_on_node(const CallCtx& c, int r, int n) {
  return n * c.local_size + r % c.local_size;
}

// Bytes of a staging (x, idx, w regions in order): also one rdma_recv slot.
__device__ __forceinline__ size_t stage_bytes(const CallCtx& c) { return c.off.comb_recv - c.off.x_stage; }

__device__ __forceinline__ Stage stage_at(const CallCtx& c, const NormalShape& s, char* h) {
  Stage st;
  st.x = h;
  st.scales = reinterpret_cast<float*>(st.x + align256(static_cast<size_t>(s.Tmax) * s.H));
  st.idx = reinterpret_cast<int32_t*>(h + (c.off.idx_stage - c.off.x_stage));
  st.w = reinterpret_cast<float*>(h + (c.off.w_stage - c.off.x_stage));
  return st;
}

// `rank`'s staging as this rank reads it: in its own buffer (this node), or the
// copy it put into this node's forwarder for it (another node).
__device__ __forceinline__ Stage stage_of(const CallCtx& c, const NormalShape& s, int rank,
                                          uint32_t epoch) {
  if (on_my_node(c, rank)) return stage_at(c, s, half_base(c, rank, epoch) + c.off.x_stage);
  const int f = peer_on_node(c, rank, node_of(c, c.rank));
  return stage_at(c, s, half_base(c, f, epoch) + c.off.rdma_recv + node_of(c, rank) * stage_bytes(c));
}

// Where this rank's own rows land on each forwarder (a symmetric address: the
// same offset on every PE).
__device__ __forceinline__ Stage my_rdma_slot(const CallCtx& c, const NormalShape& s, uint32_t epoch) {
  return stage_at(c, s, half_base(c, c.rank, epoch) + c.off.rdma_recv + node_of(c, c.rank) * stage_bytes(c));
}

// A word set by an NVSHMEM signal has been seen: make the data the network
// delivered before it visible to this GPU's later loads. (Over a proxy transport
// NVSHMEM does that in its wait and test calls; the deadline-bounded spin has
// already seen the word, so the test returns at once.) Peer stores need nothing.
__device__ __forceinline__ void after_remote_signal(const CallCtx& c, uint64_t* p) {
#ifdef JAX_EP_WITH_NVSHMEM
  if (c.transport == kTransportNvshmem) (void)nvshmem_uint64_test(p, NVSHMEM_CMP_NE, 0);
#endif
}

// Wait until `src`'s staging of this call may be read: its own signal (this
// node), or its forwarder's `rdma_ready` for it (another node).
__device__ __forceinline__ void wait_source(const CallCtx& c, uint32_t phase, int src, uint32_t want) {
  if (on_my_node(c, src)) {
    wait_signal(c, phase, src, want);
    return;
  }
  const int f = peer_on_node(c, src, node_of(c, c.rank));
  wait_word(c, phase, src, want,
            reinterpret_cast<const uint64_t*>(c.peers.base[f] + c.off.rdma_ready) + node_of(c, src));
}

// The forwarder's part of a receive over several nodes (block 0, before it waits
// for anything else): for each other node m, wait for the source of m with this
// rank's local index to signal `rdma_flag[m]`, make its rows visible here and
// store `rdma_ready[m]` for this node's ranks. It waits only on other ranks' send
// kernels, which wait on nothing.
__device__ __forceinline__ void relay_rdma_flags(const CallCtx& c, uint32_t phase, uint32_t want) {
  if (c.nodes == 1 || blockIdx.x != 0) return;
  const int me = node_of(c, c.rank);
  for (int m = threadIdx.x; m < c.nodes; m += blockDim.x) {
    if (m == me) continue;
    uint64_t* flag = reinterpret_cast<uint64_t*>(c.peers.base[c.rank] + c.off.rdma_flag) + m;
    const uint64_t word = wait_word(c, phase, peer_on_node(c, c.rank, m), want, flag);
    after_remote_signal(c, flag);
    __threadfence_system();
    st_release_sys64(reinterpret_cast<uint64_t*>(c.peers.base[c.rank] + c.off.rdma_ready) + m, word);
  }
}

// wait_all over the sources: thread r of the block waits for rank r's staging.
__device__ __forceinline__ void wait_sources(const CallCtx& c, uint32_t phase, uint32_t want) {
  wait_each(c, [&](int r) { wait_source(c, phase, r, want); });
}

// signal_all over the ranks of this node (every rank on one node).
__device__ __forceinline__ void signal_node(const CallCtx& c, uint32_t epoch) {
  signal_range(c, epoch, c.nodes == 1 ? 0 : node_of(c, c.rank) * c.local_size, c.local_size);
}

// Where source `src`'s rows, FP8 scales, ids and weights of this dispatch are
// read: its XLA operands in place, when it published them (windows), else its
// staging. Read after src's signal was acquired.
__device__ __forceinline__ Stage source_view(const CallCtx& c, const NormalShape& s, int src, uint32_t epoch) {
  char* p[4];
  if (c.window && published_operands(c, src, epoch, kPhaseDispatchWait, p))
    return {p[0], reinterpret_cast<float*>(p[1]), reinterpret_cast<int32_t*>(p[2]), reinterpret_cast<float*>(p[3])};
  return stage_of(c, s, src, epoch);
}

// The address of this rank's `p` in rank `pe`'s buffer (the same offset).
template <typename P>
__device__ __forceinline__ P* at_rank(const CallCtx& c, P* p, int pe) {
  return reinterpret_cast<P*>(c.peers.base[pe] + (reinterpret_cast<const char*>(p) - c.peers.base[c.rank]));
}

// One warp puts `bytes` (a multiple of 4) from this rank's `src` to the same
// offset `dst` on rank `pe`: an NVSHMEM put (non-blocking: quiet_block completes
// it), or on a peer-transport Buffer the warp's own stores through the peer pointer.
__device__ __forceinline__ void put_warp(const CallCtx& c, void* dst, const void* src, size_t bytes, int pe) {
#ifdef JAX_EP_WITH_NVSHMEM
  if (c.transport == kTransportNvshmem) {
    nvshmemx_putmem_nbi_warp(dst, src, bytes, pe);
    return;
  }
#endif
  char* to = at_rank(c, static_cast<char*>(dst), pe);
  const char* from = static_cast<const char*>(src);
  // src may have been written during this kernel (by this warp, or released by a peer)
  if (((reinterpret_cast<uintptr_t>(to) | reinterpret_cast<uintptr_t>(from) | bytes) & 15) == 0) {
    copy_raw_row<16, true>(from, to, static_cast<int>(bytes / 16));
  } else {
    for (size_t i = lane_id(); i < bytes / 4; i += 32)
      reinterpret_cast<int*>(to)[i] = __ldcg(reinterpret_cast<const int*>(from) + i);
  }
}

// Every put of this block is delivered before the block counts itself done.
__device__ __forceinline__ void quiet_block(const CallCtx& c) {
  __syncthreads();
#ifdef JAX_EP_WITH_NVSHMEM
  if (c.transport == kTransportNvshmem) {
    if (threadIdx.x == 0) nvshmem_quiet();
    return;
  }
#endif
  if (threadIdx.x == 0) __threadfence_system();
}

// Set `word` at `dst` (a uint64 of this rank's buffer) on rank `pe`, after every
// put before it.
__device__ __forceinline__ void signal_pe(const CallCtx& c, uint64_t* dst, uint64_t word, int pe) {
#ifdef JAX_EP_WITH_NVSHMEM
  if (c.transport == kTransportNvshmem) {
    nvshmem_fence();
    nvshmemx_signal_op(dst, word, NVSHMEM_SIGNAL_SET, pe);
    return;
  }
#endif
  __threadfence_system();
  st_release_sys64(at_rank(c, dst, pe), word);
}

// Bit n set: the token has a row (an id of a local expert, or a rank in its
// destination mask) on node n. One warp, lanes < width read.
__device__ __forceinline__ uint32_t node_mask_of_ids(const CallCtx& c, const NormalShape& s, const int32_t* ids) {
  const int lane = lane_id(), per_node = c.local_size * s.El;
  const int id = lane < s.K ? ids[lane] : -1;
  return __reduce_or_sync(0xffffffffu, (id >= 0 && id < s.E) ? 1u << (id / per_node) : 0u);
}
__device__ __forceinline__ uint32_t node_mask_of_ranks(const CallCtx& c, const int32_t* mask_row) {
  uint32_t m = 0;
  for (int r0 = 0; r0 < c.nranks; r0 += 32) {
    const int r = r0 + lane_id();
    m |= __reduce_or_sync(0xffffffffu, (r < c.nranks && mask_row[r] != 0) ? 1u << node_of(c, r) : 0u);
  }
  return m;
}

// The puts that close a staging over several nodes: every block's rows first
// (quiet_block), then the last block puts ids and weights (dispatch) and the
// flags, and signals its own node. kOneNode: the caller runs on one node only,
// and the puts are not compiled in (they take registers where nothing spares them).
template <bool kOneNode = false>
__device__ __forceinline__ void finish_stage(const CallCtx& c, const NormalShape& s, uint32_t epoch,
                                             bool with_ids) {
  if (!kOneNode && c.nodes > 1) quiet_block(c);
  if (!last_block_done(c.control + kCtlDoneStage)) return;
  // every block has taken its last token: the next call's hand-out starts at 0
  if (threadIdx.x == 0) c.control[kCtlStageNext] = 0;
  if (!kOneNode && c.nodes > 1) {
    const int me = node_of(c, c.rank);
    if (with_ids) {
      const Stage from = stage_at(c, s, half_base(c, c.rank, epoch) + c.off.x_stage);
      const Stage to = my_rdma_slot(c, s, epoch);
      const size_t bytes = static_cast<size_t>(s.T) * s.K * 4;
      for (int n = warp_id(); n < c.nodes; n += blockDim.x / 32) {
        if (n == me) continue;
        const int f = peer_on_node(c, c.rank, n);
        put_warp(c, to.idx, from.idx, bytes, f);
        put_warp(c, to.w, from.w, bytes, f);
      }
    }
    quiet_block(c);
    if (threadIdx.x == 0) {
      const uint64_t word = (static_cast<uint64_t>(c.sig) << 32) | epoch;
      uint64_t* flag = reinterpret_cast<uint64_t*>(c.peers.base[c.rank] + c.off.rdma_flag) + me;
      for (int n = 0; n < c.nodes; ++n)
        if (n != me) signal_pe(c, flag, word, peer_on_node(c, c.rank, n));
    }
  }
  if (threadIdx.x == 0) {
    if (c.window) publish_record(c, epoch, false);
    signal_node(c, epoch);
  }
}

// ------------------------------------------------------------------ stage

// Copy (or quantize) this rank's rows, ids and weights into its staging half,
// then signal every rank. Warp per token; no waits. Every token is handed out
// by the counter (for_each_handed_out), also where the rank is alone on its GPU:
// there the first tokens by warp index saved 1.5 of 45 µs (one rank, 132 SMs,
// FP8), but choosing at run time spilled 32 bytes in the FP8 quantizer.
// kBlock = kWideBlock (FP8 quantized in the call by several ranks sharing one
// GPU): twice the warps per SM, each with half the units in flight, in <= 64
// registers. It only quantizes (x_scales == nullptr: no FP8 input to copy), on
// one node, and never publishes operands in place (a.pull is false).
template <typename T, bool kFp8, int kBlock = kThreads>
__global__ void __launch_bounds__(kBlock) stage_kernel(DispatchArgs a, bool copy_ids) {
  static_assert(kBlock == kThreads || (kFp8 && kBlock == kWideBlock), "a 512-thread kernel, or the wide quantizer");
  constexpr bool kWide = kBlock == kWideBlock;
  constexpr int kU = kWide ? kUnroll / 2 : kUnroll;
  const CallCtx& c = a.c;
  const NormalShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  if (a.pull) {  // the receivers read the operands where they are (one block)
    if (threadIdx.x == 0) {
      publish_record(c, epoch, true, a.x, a.x_scales, a.idx, a.w);
      signal_node(c, epoch);
    }
    return;
  }
  const Stage st = stage_of(c, s, c.rank, epoch);
  const int units = s.H / kUnit;
  const int lane = lane_id();
  const T* x = static_cast<const T*>(a.x);
  for_each_handed_out<1>(c.control + kCtlStageNext, s.T, false, [&](int t) {
    const T* row = x + static_cast<size_t>(t) * s.H;
    if (kFp8 && !kWide && a.x_scales != nullptr) {  // already FP8: the data and scales as they are
      const int nb = s.H / 128;
      copy_raw_row<16>(static_cast<const char*>(a.x) + static_cast<size_t>(t) * s.H,
                       st.x + static_cast<size_t>(t) * s.H, s.H / 16);
      for (int b = lane; b < nb; b += 32) st.scales[static_cast<size_t>(t) * nb + b] = a.x_scales[t * nb + b];
    } else if constexpr (kFp8) {
      uint8_t* q_row = reinterpret_cast<uint8_t*>(st.x) + static_cast<size_t>(t) * s.H;
      // Whole 16-lane blocks are active or not (H % 128 == 0), as the shuffles need.
      // The warp's next kU units per lane are in flight while these are
      // quantized and stored (raw 16-byte words: few registers for 2-byte T; a
      // float row loads each step's units after the last is stored, as registers
      // would run out).
      constexpr int kR = kUnit * sizeof(T) / 16;  // 16-byte words of a unit
      constexpr bool kAhead = sizeof(T) <= 2;
      int4 raw[kU][kR];
      auto fetch = [&](int4 (&r)[kU][kR], int base) {
#pragma unroll
        for (int j = 0; j < kU; ++j)
          if (base + 32 * j + lane < units)
#pragma unroll
            for (int w = 0; w < kR; ++w)
              r[j][w] = __ldg(reinterpret_cast<const int4*>(row + (base + 32 * j + lane) * kUnit) + w);
      };
      fetch(raw, 0);
      for (int base = 0; base < units; base += 32 * kU) {
        const int next = base + 32 * kU;
        int4 ahead[kU][kR];
        if (kAhead && next < units) fetch(ahead, next);
#pragma unroll
        for (int j = 0; j < kU; ++j) {
          const int u = base + 32 * j + lane;
          float v[kUnit];
#pragma unroll
          for (int w = 0; w < kR; ++w) Vec<T>::load(raw[j][w], v + w * (16 / static_cast<int>(sizeof(T))));
          float scale;
          const uint2 q = quantize_unit<T>(v, u < units, /*round_scale=*/false, &scale);
          if (u < units) {
            *reinterpret_cast<uint2*>(q_row + u * kUnit) = q;
            if (u % kUnitsPerBlock == 0)
              st.scales[static_cast<size_t>(t) * (s.H / 128) + u / kUnitsPerBlock] = scale;
          }
        }
        if (next < units) {
          if constexpr (kAhead) {
#pragma unroll
            for (int j = 0; j < kU; ++j)
#pragma unroll
              for (int w = 0; w < kR; ++w) raw[j][w] = ahead[j][w];
          } else {
            fetch(raw, next);
          }
        }
      }
    } else {
      copy_raw_row<kUnit * sizeof(T)>(reinterpret_cast<const char*>(row),
                                       st.x + static_cast<size_t>(t) * s.H * sizeof(T), units);
    }
    if (copy_ids && lane < s.K) {
      st.idx[t * s.K + lane] = a.idx[t * s.K + lane];
      st.w[t * s.K + lane] = a.w[t * s.K + lane];
    }
    if (!kWide && c.nodes > 1) {  // the row, once to each other node that has one of its experts
      const uint32_t nodes = node_mask_of_ids(c, s, a.idx + t * s.K) & ~(1u << node_of(c, c.rank));
      if (nodes == 0) return;
      __syncwarp();
      const Stage to = my_rdma_slot(c, s, epoch);
      const size_t bytes = static_cast<size_t>(s.H) * (kFp8 ? 1 : sizeof(T));
      const size_t off = static_cast<size_t>(t) * bytes;
      for (uint32_t m = nodes; m != 0; m &= m - 1) {
        const int f = peer_on_node(c, c.rank, __ffs(m) - 1);
        put_warp(c, to.x + off, st.x + off, bytes, f);
        if (kFp8) put_warp(c, to.scales + static_cast<size_t>(t) * (s.H / 128),
                           st.scales + static_cast<size_t>(t) * (s.H / 128), (s.H / 128) * 4, f);
      }
    }
  });
  finish_stage<kWide>(c, s, epoch, /*with_ids=*/true);
}

// ------------------------------------------------------------------ route

// Number the rows of each (source rank, block of 512 tokens): for every local
// expert, the rank of each token among the block's tokens that picked it.
// route_rank[(s*T + t)*Kr + i] = (e << 16) | rank for the i-th local expert
// (ascending) of token t of source s; route_cnt holds each block's counts in
// (expert, source, block) order (tokens layout: (source, block)).
template <bool kTokens>
__global__ void __launch_bounds__(kThreads) route_kernel(DispatchArgs a) {
  extern __shared__ uint32_t smem[];
  const CallCtx& c = a.c;
  const NormalShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  const int nch = (s.T + kRouteChunk - 1) / kRouteChunk;
  const int lane = lane_id(), warp = warp_id();
  int32_t* route_rank = reinterpret_cast<int32_t*>(c.peers.base[c.rank] + c.off.route_rank);
  int32_t* route_cnt = reinterpret_cast<int32_t*>(c.peers.base[c.rank] + c.off.route_cnt);
  uint32_t* mask = smem;                  // [kWarps][El]
  uint32_t* pre = smem + kWarps * s.El;   // [kWarps][El]
  __shared__ int warp_cnt[kWarps];
  const int lo = c.rank * s.El;
  relay_rdma_flags(c, kPhaseDispatchWait, epoch);
  // Every call waits for every rank (what lets the next-but-one call reuse this
  // half): with no tokens there is no work item below to do it.
  if (nch == 0 && blockIdx.x == 0) wait_sources(c, kPhaseDispatchWait, epoch);

  for (int work = blockIdx.x; work < c.nranks * nch; work += gridDim.x) {
    const int src = work / nch, ch = work % nch;
    if (src != c.rank && threadIdx.x == 0) wait_source(c, kPhaseDispatchWait, src, epoch);
    __syncthreads();
    const int32_t* idx = src == c.rank ? a.idx : source_view(c, s, src, epoch).idx;
    const int t = ch * kRouteChunk + threadIdx.x;
    const bool valid = t < s.T;
    int ids[kMaxTopK];
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) {
      const int id = (valid && k < s.K) ? idx[t * s.K + k] : -1;
      ids[k] = (id >= lo && id < lo + s.El) ? id - lo : -1;  // local expert or -1
    }
    if constexpr (kTokens) {
      bool has = false;
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k) has |= ids[k] >= 0;
      const uint32_t b = __ballot_sync(0xffffffffu, has);
      if (lane == 0) warp_cnt[warp] = __popc(b);
      __syncthreads();
      int before = 0, total = 0;
      for (int w = 0; w < kWarps; ++w) {
        before += w < warp ? warp_cnt[w] : 0;
        total += warp_cnt[w];
      }
      if (valid) route_rank[src * s.T + t] = has ? before + __popc(b & lanemask_lt()) : -1;
      if (threadIdx.x == 0) route_cnt[src * nch + ch] = total;
      __syncthreads();
    } else {
      for (int i = threadIdx.x; i < kWarps * s.El; i += blockDim.x) mask[i] = 0;
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k)
        if (ids[k] >= 0) atomicOr(&mask[warp * s.El + ids[k]], 1u << lane);
      __syncthreads();
      for (int e = threadIdx.x; e < s.El; e += blockDim.x) {
        int run = 0;
        for (int w = 0; w < kWarps; ++w) {
          pre[w * s.El + e] = run;
          run += __popc(mask[w * s.El + e]);
        }
        route_cnt[(e * c.nranks + src) * nch + ch] = run;
      }
      __syncthreads();
      if (valid) {
        int32_t* out = route_rank + static_cast<size_t>(src * s.T + t) * s.Kr;
        int n = 0;
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k) {
          if (ids[k] < 0) continue;
          const int e = ids[k];
          int i = 0;  // position among this token's local experts, ascending
#pragma unroll
          for (int j = 0; j < kMaxTopK; ++j) i += (ids[j] >= 0 && ids[j] < e);
          const int r = pre[warp * s.El + e] + __popc(mask[warp * s.El + e] & lanemask_lt());
          out[i] = (e << 16) | r;
          ++n;
        }
        for (int i = n; i < s.Kr; ++i) out[i] = -1;
      }
      __syncthreads();
    }
  }
}

// ------------------------------------------------------------------ expand

// Copy one source row to its destination rows: the rows `pos` of the lanes in
// `valid` (lane i holds the row of the token's i-th local expert; in the tokens
// layout only lane 0), converting FP8 on the way when asked.
template <int kOut, typename TOut, int UB, int kDst, int kU8>
__device__ __forceinline__ void copy_row(const char* src, const float* src_scales, int pos, uint32_t valid,
                                         const DispatchArgs& a) {
  const int H = a.s.H, units = H / kUnit, lane = lane_id();
  char* out = static_cast<char*>(a.out_x);
  if constexpr (kOut == kOutSame) {
    int dst[kMaxTopK];
#pragma unroll
    for (int i = 0; i < kMaxTopK; ++i) dst[i] = __shfl_sync(0xffffffffu, pos, i);
    copy_raw_to_rows<UB, false, kDst>(src, out, dst, units);
  } else {
    // FP8 rows move 16 bytes (two units) per lane step. The row's H/128 scales are
    // read once per warp (lane l holds blocks l and l + 32; wider rows read the rest
    // directly) and handed to the lanes by shuffles, so the loop is warp-uniform.
    // Each step's loads are written to one destination row after another (a
    // destination row from its lane by a shuffle): no register per destination.
    const int n16 = H / 16, nb = H / 128;
    const float sc_lo = lane < nb ? __ldcg(src_scales + lane) : 0.f;
    const float sc_hi = lane + 32 < nb ? __ldcg(src_scales + lane + 32) : 0.f;
    for (int q0 = 0; q0 < n16; q0 += 32 * kU8) {
      int4 v[kU8];
      float scale[kU8];
#pragma unroll
      for (int j = 0; j < kU8; ++j) {
        const int q = q0 + 32 * j + lane;
        if (q < n16) v[j] = __ldcg(reinterpret_cast<const int4*>(src) + q);
        const int b = min(q, n16 - 1) / 8;  // the 128-channel block of piece q
        const float lo = __shfl_sync(0xffffffffu, sc_lo, b & 31);
        const float hi = __shfl_sync(0xffffffffu, sc_hi, b & 31);
        scale[j] = b < 32 ? lo : b < 64 ? hi : __ldcg(src_scales + b);
      }
      for (uint32_t m = valid; m != 0; m &= m - 1) {
        const int d = __shfl_sync(0xffffffffu, pos, __ffs(m) - 1);
        if constexpr (kOut == kOutFp8) {
          int4* row = reinterpret_cast<int4*>(out + static_cast<size_t>(d) * H);
#pragma unroll
          for (int j = 0; j < kU8; ++j) {
            const int q = q0 + 32 * j + lane;
            if (q >= n16) continue;
            row[q] = v[j];
            if (q % 8 == 0) a.out_scales[static_cast<size_t>(d) * nb + q / 8] = scale[j];
          }
        } else {
          TOut* row = reinterpret_cast<TOut*>(out) + static_cast<size_t>(d) * H;
#pragma unroll
          for (int j = 0; j < kU8; ++j) {
            const int q = q0 + 32 * j + lane;
            if (q >= n16) continue;
            const uint2* halves = reinterpret_cast<const uint2*>(&v[j]);
            float f[kUnit];
            dequantize_unit(halves[0], scale[j], f);
            store_unit(row + (2 * q) * kUnit, f);
            dequantize_unit(halves[1], scale[j], f);
            store_unit(row + (2 * q + 1) * kUnit, f);
          }
        }
      }
    }
  }
}

// Zero rows [from, C) of every output.
template <int kOut, typename TOut, int UB>
__device__ void zero_tail(const DispatchArgs& a, int from, bool tokens) {
  const int H = a.s.H, K = a.s.K, lane = lane_id();
  const size_t row_bytes = kOut == kOutSame ? static_cast<size_t>(H / kUnit) * UB
                           : kOut == kOutFp8 ? static_cast<size_t>(H)
                                             : static_cast<size_t>(H) * sizeof(TOut);
  char* out = static_cast<char*>(a.out_x);
  for (int p = from + blockIdx.x * kWarps + warp_id(); p < a.s.C; p += gridDim.x * kWarps) {
    int4* row = reinterpret_cast<int4*>(out + p * row_bytes);
    for (int j = lane; j < static_cast<int>(row_bytes / 16); j += 32) row[j] = make_int4(0, 0, 0, 0);
    if (kOut == kOutFp8)
      for (int j = lane; j < H / 128; j += 32) a.out_scales[static_cast<size_t>(p) * (H / 128) + j] = 0.f;
    if (tokens) {
      for (int k = lane; k < K; k += 32) {
        a.out_w[static_cast<size_t>(p) * K + k] = 0.f;
        a.out_topk[static_cast<size_t>(p) * K + k] = -1;
      }
    } else if (lane == 0) {
      a.out_w[p] = 0.f;
    }
  }
}

// Turn route numbers into final rows, pull each source row once and write it
// to all its local expert rows; then zero the padding and close the call.
// The FP8 kernels (a row in flight per warp, 126-128 registers) say that one
// block per SM is enough: without that, ptxas' choice moved with small changes
// (a 4-piece variant was held to 64 registers and spilled 36 bytes). The copy
// and dequantizing kernels keep ptxas' own choice, which is 62-64 registers for
// most of them (so two blocks fit per SM where one rank has the GPU, copy_grid).
template <bool kTokens, int kOut, typename TOut, int UB, int kU8 = kUnroll>
__global__ void __launch_bounds__(kThreads, kOut == kOutFp8 ? 1 : 0) expand_kernel(DispatchArgs a) {
  extern __shared__ int base[];
  __shared__ int warp_sums[kWarps];
  __shared__ Stage views[kMaxRanks];  // each source's rows (source_view)
  const CallCtx& c = a.c;
  const NormalShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  const int R = c.nranks, nch = (s.T + kRouteChunk - 1) / kRouteChunk;
  // (the route kernel before this one has waited for every source)
  for (int r = threadIdx.x; r < R; r += blockDim.x) views[r] = source_view(c, s, r, epoch);
  const int n = kTokens ? R * nch : s.El * R * nch;
  const int32_t* route_cnt = reinterpret_cast<const int32_t*>(c.peers.base[c.rank] + c.off.route_cnt);
  const int32_t* route_rank = reinterpret_cast<const int32_t*>(c.peers.base[c.rank] + c.off.route_rank);
  for (int i = threadIdx.x; i < n; i += blockDim.x) base[i] = route_cnt[i];
  __syncthreads();
  const int total = block_exclusive_scan(base, n, warp_sums);
  const int used = min(total, s.C);
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) {
      *a.num_overflow = max(total - s.C, 0);
      *a.num_rows = used;
    }
    if (!kTokens) {
      for (int e = threadIdx.x; e < s.El; e += blockDim.x) {
        const int start = base[e * R * nch];
        const int end = e + 1 < s.El ? base[(e + 1) * R * nch] : total;
        a.group_sizes[e] = max(0, min(s.C - start, end - start));
      }
    }
  }
  const int lane = lane_id();
  const int lo = c.rank * s.El;
  const int in_es = elem_bytes(a.in_dtype);
  // One (source, token) item: its rows' places, its ids and weights, its row.
  auto expand_item = [&](int item) {
    const RankToken rt = rank_token(c, item, s.T);
    const int src = rt.rank, t = rt.t, g = src * s.T + t;
    int pos = -1, e = -1;
    if (lane < s.Kr) {
      const int v = route_rank[static_cast<size_t>(g) * s.Kr + lane];
      if (v >= 0) {
        e = kTokens ? 0 : (v >> 16);
        const int r = v & 0xffff;
        const int p = base[(kTokens ? src : e * R + src) * nch + t / kRouteChunk] + r;
        pos = p < s.C ? p : -2;
      }
      a.src_rows[static_cast<size_t>(g) * s.Kr + lane] = pos;
    }
    const uint32_t valid = __ballot_sync(0xffffffffu, pos >= 0);
    if (!valid) return;
    const bool local_src = src == c.rank;
    const Stage& st = views[src];
    const char* row;
    const float* scales = nullptr;
    if (kOut == kOutSame && local_src) {
      row = static_cast<const char*>(a.x) + static_cast<size_t>(t) * s.H * in_es;
    } else if (kOut == kOutSame) {
      row = st.x + static_cast<size_t>(t) * s.H * in_es;
    } else if (local_src && a.x_scales != nullptr) {  // this rank's FP8 input, read in place
      row = static_cast<const char*>(a.x) + static_cast<size_t>(t) * s.H;
      scales = a.x_scales + static_cast<size_t>(t) * (s.H / 128);
    } else {
      row = st.x + static_cast<size_t>(t) * s.H;
      scales = st.scales + static_cast<size_t>(t) * (s.H / 128);
    }
    const int32_t* idx = local_src ? a.idx : st.idx;
    const float* w = local_src ? a.w : st.w;
    if constexpr (kTokens) {
      const int p0 = __shfl_sync(0xffffffffu, pos, 0);
      for (int k = lane; k < s.K; k += 32) {
        const int id = idx[t * s.K + k];
        const bool mine = id >= lo && id < lo + s.El;
        a.out_topk[static_cast<size_t>(p0) * s.K + k] = mine ? id - lo : -1;
        a.out_w[static_cast<size_t>(p0) * s.K + k] = mine ? w[t * s.K + k] : 0.f;
        bool first = mine;
        for (int j = 0; j < k; ++j) first &= idx[t * s.K + j] != id;
        if (first) atomicAdd(&a.group_sizes[id - lo], 1);
      }
    } else if (pos >= 0) {
      float wv = 0.f;
      for (int k = 0; k < s.K; ++k)
        if (idx[t * s.K + k] == lo + e) wv = w[t * s.K + k];
      a.out_w[pos] = wv;
    }
    copy_row<kOut, TOut, UB, kTokens ? 1 : kMaxTopK, kU8>(row, scales, pos, valid, a);
  };
  // Items in the order of rank_token, to whichever warp is free. An item with no
  // row here is quick, so where every warp has many items they go 4 at a time
  // (one atomic each); where a warp has few (one rank, many SMs), one at a time,
  // or the last grabs would leave warps idle. Alone on the GPU, each warp's first
  // grab is its own: one rank, 132 SMs, BF16, experts layout, this kernel took
  // 227 µs with every grab counted, 203 with the first by warp index.
  const int items = R * s.T;
  const int warps = static_cast<int>(gridDim.x) * kWarps;
  for_each_handed_out(c.control + kCtlExpandNext, items, alone_on_gpu(c), expand_item,
                      max(1, min(4, items / (8 * warps))));
  zero_tail<kOut, TOut, UB>(a, used, kTokens);
  close_call_released(c, c.control + kCtlDoneExpand, epoch, a.epoch_out, a.pull, c.control + kCtlExpandNext);
}

// ------------------------------------------------------------------ combine

template <typename T>
__device__ __forceinline__ T* comb_slot(const CallCtx& c, const NormalShape& s, int owner, int from,
                                        int t, uint32_t epoch) {
  char* h = half_base(c, owner, epoch) + c.off.comb_recv;
  return reinterpret_cast<T*>(h) + (static_cast<size_t>(from) * s.T + t) * s.H;
}

__device__ __forceinline__ float* vals_slot(const CallCtx& c, const NormalShape& s, int owner,
                                            int from, int t, int ks, uint32_t epoch) {
  char* h = half_base(c, owner, epoch) + c.off.vals_recv;
  return reinterpret_cast<float*>(h) + (static_cast<size_t>(from) * s.T + t) * ks;
}

// Where this rank's partial for token t of `src` goes: src's receive slot (this
// node), or the forwarder's slot for it (another node), with the tag to set
// there; q is the slot's index in comb_fwd ((source node, local rank, token)).
template <typename T>
struct PartialDst {
  T* row;
  float* vals;
  uint32_t* tag;  // null on this node
};

template <typename T>
__device__ __forceinline__ PartialDst<T> partial_dst(const CallCtx& c, const NormalShape& s, int src, int t,
                                                     int ks, uint32_t epoch) {
  if (on_my_node(c, src))
    return {comb_slot<T>(c, s, src, c.rank, t, epoch), vals_slot(c, s, src, c.rank, t, ks, epoch), nullptr};
  const int f = peer_on_node(c, src, node_of(c, c.rank));
  const size_t q = (static_cast<size_t>(node_of(c, src)) * c.local_size + c.rank % c.local_size) * s.T + t;
  char* h = half_base(c, f, epoch);
  return {reinterpret_cast<T*>(h + c.off.comb_fwd) + q * s.H,
          reinterpret_cast<float*>(h + c.off.vals_fwd) + q * ks,
          reinterpret_cast<uint32_t*>(h + c.off.fwd_tag) + q};
}

// Units a lane carries at once in combine: enough loads in flight to cover
// the latency when a token has only one or two rows here.
template <typename T>
constexpr int combine_units() { return sizeof(T) == 4 ? 2 : 4; }

// Add raw units of T to float accumulators: acc += v (times w when weighted),
// the product rounded first.
template <typename T, int UB, bool kCoherent, int N>
__device__ __forceinline__ void add_units(float (&acc)[N][kUnit], const RawUnit<UB, kCoherent> (&r)[N],
                                          int u0, int units, bool weighted, float w) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (u0 + 32 * j >= units) continue;
    float v[kUnit];
#pragma unroll
    for (int q = 0; q < UB / 16; ++q) Vec<T>::load(r[j].v[q], v + q * (16 / sizeof(T)));
#pragma unroll
    for (int e = 0; e < kUnit; ++e) acc[j][e] = __fadd_rn(acc[j][e], weighted ? __fmul_rn(v[e], w) : v[e]);
  }
}

// Expert side: for each (source rank, token), add its rows here in ascending
// local-expert order in float32 and round to T. kLocal (one rank) finishes
// the token side too, writing y directly; otherwise the partial is pushed to
// the source's buffer and every rank is signalled at the end. Rows are taken
// two at a time, each lane loading kU units of both before adding any.
template <typename T, bool kLocal>
__global__ void __launch_bounds__(kThreads) combine_send_kernel(CombineArgs a) {
  constexpr int UB = kUnit * sizeof(T), kU = combine_units<T>();
  const CallCtx& c = a.c;
  const NormalShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  const int lane = lane_id(), units = s.H / kUnit, R = c.nranks;
  const int ks = s.tokens_layout ? s.K : s.Kr;
  const bool weighted = a.weights != nullptr;
  const char* eo = static_cast<const char*>(a.expert_out);
  if (!kLocal && a.pull) {  // the receivers read the rows where they are (one block)
    if (threadIdx.x == 0) {
      publish_record(c, epoch, true, a.expert_out, a.weights, a.row_vals, a.src_rows);
      signal_node(c, epoch);
    }
    return;
  }
  for (int item = blockIdx.x * kWarps + warp_id(); item < R * s.T; item += gridDim.x * kWarps) {
    const RankToken rt = rank_token(c, item, s.T);
    const int src = rt.rank, t = rt.t, g = src * s.T + t;
    const int pos = lane < s.Kr ? a.src_rows[static_cast<size_t>(g) * s.Kr + lane] : -1;
    // No row of this token here: nothing to send (one rank: y is still written, as 0).
    if (!kLocal && !__any_sync(0xffffffffu, pos != -1)) continue;
    const float wl = (weighted && pos >= 0) ? a.weights[pos] : 1.f;
    const uint32_t present = __ballot_sync(0xffffffffu, pos >= 0);  // lanes = local-expert order
    PartialDst<T> dst{nullptr, nullptr, nullptr};
    if (!kLocal) dst = partial_dst<T>(c, s, src, t, ks, epoch);
    T* out = kLocal ? static_cast<T*>(a.y) + static_cast<size_t>(t) * s.H : dst.row;
    // The loop is warp-uniform (the shuffles below need every lane); lanes
    // past the row's end load and store nothing.
    for (int base = 0; base < units; base += 32 * kU) {
      const int u0 = base + lane;
      float acc[kU][kUnit];  // from -0.0, the additive identity
#pragma unroll
      for (int j = 0; j < kU; ++j)
#pragma unroll
        for (int e = 0; e < kUnit; ++e) acc[j][e] = -0.f;
      for (uint32_t m = present; m != 0;) {
        const int l0 = __ffs(m) - 1;
        m &= m - 1;
        const int l1 = m != 0 ? __ffs(m) - 1 : -1;
        if (m != 0) m &= m - 1;
        const int r0 = __shfl_sync(0xffffffffu, pos, l0);
        const int r1 = __shfl_sync(0xffffffffu, pos, l1 < 0 ? l0 : l1);
        const float w0 = __shfl_sync(0xffffffffu, wl, l0);
        const float w1 = __shfl_sync(0xffffffffu, wl, l1 < 0 ? l0 : l1);
        RawUnit<UB> v0[kU], v1[kU];
#pragma unroll
        for (int j = 0; j < kU; ++j) {
          const int u = u0 + 32 * j;
          if (u >= units) continue;
          v0[j].load(eo + (static_cast<size_t>(r0) * units + u) * UB);
          if (l1 >= 0) v1[j].load(eo + (static_cast<size_t>(r1) * units + u) * UB);
        }
        add_units<T>(acc, v0, u0, units, weighted, w0);
        if (l1 >= 0) add_units<T>(acc, v1, u0, units, weighted, w1);
      }
      // One rank: the token side adds the rounded partial to -0.0 and rounds
      // again, which leaves it unchanged, so the partial is the result.
#pragma unroll
      for (int j = 0; j < kU; ++j)
        if (u0 + 32 * j < units) store_unit(out + (u0 + 32 * j) * kUnit, acc[j]);
    }
    if (a.row_vals != nullptr) {
      if (kLocal) {  // one rank: the slot's value straight from its row
        const int sp = lane < s.K ? a.slot_pos[t * s.K + lane] : -1;
        const int p = __shfl_sync(0xffffffffu, pos, s.tokens_layout ? 0 : (sp >= 0 ? sp % ks : 0));
        if (lane < s.K) {
          float v = 0.f;
          if (sp >= 0 && p >= 0)
            v = s.tokens_layout ? a.row_vals[static_cast<size_t>(p) * s.K + sp % ks] : a.row_vals[p];
          a.slot_vals[t * s.K + lane] = v;
        }
      } else if (s.tokens_layout) {
        const int p0 = __shfl_sync(0xffffffffu, pos, 0);
        for (int k = lane; k < s.K; k += 32)
          dst.vals[k] = p0 >= 0 ? a.row_vals[static_cast<size_t>(p0) * s.K + k] : 0.f;
      } else if (lane < s.Kr) {
        dst.vals[lane] = pos >= 0 ? a.row_vals[pos] : 0.f;
      }
    }
    if (!kLocal && dst.tag != nullptr && lane == 0) *dst.tag = epoch;  // the forwarder sends it on
  }
  if (kLocal) {
    close_call(c, c.control + kCtlDoneSend, epoch, a.epoch_out);
  } else if (last_block_done(c.control + kCtlDoneSend) && threadIdx.x == 0) {
    if (c.window) publish_record(c, epoch, false);
    signal_node(c, epoch);
  }
}

// Over several nodes, on every rank (n, l): wait until each rank of node n has
// stored its partials, then put each tagged row for source (m, l) of another
// node into that source's receive slot of the rank that made it, and signal the
// source on that rank's behalf. One warp per (source node, local rank, token).
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_forward_kernel(CombineArgs a) {
  const CallCtx& c = a.c;
  const NormalShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  const int G = c.local_size, me = node_of(c, c.rank);
  const int ks = s.tokens_layout ? s.K : s.Kr;
  for (int j = threadIdx.x; j < G; j += blockDim.x)
    if (me * G + j != c.rank) wait_signal(c, kPhaseCombineForward, me * G + j, epoch);
  __syncthreads();
  char* h = half_base(c, c.rank, epoch);
  const uint32_t* tags = reinterpret_cast<const uint32_t*>(h + c.off.fwd_tag);
  const size_t row_bytes = static_cast<size_t>(s.H) * sizeof(T);
  const int n = c.nodes * G * s.T;
  for (int g = blockIdx.x * kWarps + warp_id(); g < n; g += gridDim.x * kWarps) {
    const int m = g / (G * s.T), j = (g / s.T) % G, t = g % s.T;
    if (m == me || __ldcg(tags + g) != epoch) continue;
    const int src = m * G + c.rank % G, from = me * G + j;
    put_warp(c, h + c.off.comb_recv + (static_cast<size_t>(from) * s.T + t) * row_bytes,
             h + c.off.comb_fwd + static_cast<size_t>(g) * row_bytes, row_bytes, src);
    if (a.row_vals != nullptr)
      put_warp(c, h + c.off.vals_recv + (static_cast<size_t>(from) * s.T + t) * ks * 4,
               h + c.off.vals_fwd + static_cast<size_t>(g) * ks * 4, ks * 4, src);
  }
  quiet_block(c);
  if (last_block_done(c.control + kCtlDoneForward) && threadIdx.x == 0) {
    // each j's signal, which this rank checked (the same call signature as its own)
    const uint64_t word = (static_cast<uint64_t>(c.sig) << 32) | epoch;
    uint64_t* fwd = reinterpret_cast<uint64_t*>(c.peers.base[c.rank] + c.off.fwd_inbox) + me * G;
    for (int m = 0; m < c.nodes; ++m)
      if (m != me)
        for (int j = 0; j < G; ++j) signal_pe(c, fwd + j, word, m * G + c.rank % G);
  }
}

// T's rounding of a float32 sum (a partial as the pushing rank would store it).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return Num<T>::to_f32(Num<T>::from_f32(v));
}

// The token side's sum for token t read from the ranks' rows: the n entries
// (rank, row there or -1 for a pushed partial, weight), lane j holding the j-th
// in (rank, local-expert) order. Each rank's rows are added in float32 and
// rounded to T (its partial), and the partials added in rank order, kBatch rows
// of kU units per lane loaded before any is added. kOne: every rank holds at
// most one row of the token (Kr == 1), so a row is its rank's partial by itself
// and needs no second accumulator; the registers that frees carry more rows at
// once.
template <typename T, bool kOne, int kU, int kBatch>
__device__ __forceinline__ void pull_rows(const CallCtx& c, const NormalShape& s, int t, uint32_t epoch,
                                          int n, int e_rank, int e_pos, float e_w,
                                          const char* const* src_eo, const float* const* src_w, T* y) {
  constexpr int UB = kUnit * sizeof(T);
  const int lane = lane_id(), units = s.H / kUnit;
  // Once per token: lane j's row address, and bit j of the warp-wide masks.
  const char* e_row = nullptr;
  bool weighted = false;
  if (lane < n) {
    if (e_pos < 0) {
      e_row = reinterpret_cast<const char*>(comb_slot<T>(c, s, c.rank, e_rank, t, epoch));
    } else {
      e_row = src_eo[e_rank] + static_cast<size_t>(e_pos) * units * UB;
      weighted = src_w[e_rank] != nullptr;
    }
  }
  const uint32_t wmask = __ballot_sync(0xffffffffu, weighted);
  const int next_rank = __shfl_down_sync(0xffffffffu, e_rank, 1);
  const uint32_t closes = __ballot_sync(0xffffffffu, lane < n && (lane + 1 == n || next_rank != e_rank));
  for (int base = 0; base < units; base += 32 * kU) {
    const int u0 = base + lane;
    float acc[kU][kUnit], part[kOne ? 1 : kU][kUnit];
#pragma unroll
    for (int j = 0; j < kU; ++j)
#pragma unroll
      for (int e = 0; e < kUnit; ++e) acc[j][e] = part[kOne ? 0 : j][e] = -0.f;
    for (int e0 = 0; e0 < n; e0 += kBatch) {
      float ew[kBatch];
      RawUnit<UB, true> v[kBatch][kU];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int e = e0 + b;
        const char* p = reinterpret_cast<const char*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(e_row), e & 31));
        ew[b] = __shfl_sync(0xffffffffu, e_w, e & 31);
        if (e >= n) continue;
#pragma unroll
        for (int j = 0; j < kU; ++j)
          if (u0 + 32 * j < units) v[b][j].load(p + static_cast<size_t>(u0 + 32 * j) * UB);
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int e = e0 + b;
        if (e >= n) continue;
        const bool wt = (wmask >> e) & 1u;
        if constexpr (kOne) {
          // -0 + x is x, so the partial of one row is its (weighted) value rounded to T
#pragma unroll
          for (int j = 0; j < kU; ++j) {
            if (u0 + 32 * j >= units) continue;
            float x[kUnit];
#pragma unroll
            for (int q = 0; q < UB / 16; ++q) Vec<T>::load(v[b][j].v[q], x + q * (16 / sizeof(T)));
#pragma unroll
            for (int i = 0; i < kUnit; ++i)
              acc[j][i] = __fadd_rn(acc[j][i], round_to<T>(wt ? __fmul_rn(x[i], ew[b]) : x[i]));
          }
        } else {
          add_units<T>(part, v[b], u0, units, wt, ew[b]);
          if (!((closes >> e) & 1u)) continue;  // the rank has more rows of the token
#pragma unroll
          for (int j = 0; j < kU; ++j)
#pragma unroll
            for (int x = 0; x < kUnit; ++x) {
              acc[j][x] = __fadd_rn(acc[j][x], round_to<T>(part[j][x]));
              part[j][x] = -0.f;
            }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kU; ++j)
      if (u0 + 32 * j < units) store_unit(y + (u0 + 32 * j) * kUnit, acc[j]);
  }
}

// Token side: wait for every rank, then add the partials in rank order,
// loading up to kBatch ranks' partials (kU units each) before adding any.
// A rank that published its rows in place (windows) has no partial here: its
// rows of the token are read from its expert_out and summed in its local-expert
// order first, rounded to T as its pushed partial would be (kOne: at most one
// row per rank, see pull_rows). A rank that let others read its rows keeps the
// call open until all of them are done.
template <typename T, bool kOne>
__global__ void __launch_bounds__(kThreads) combine_recv_kernel(CombineArgs a) {
  constexpr int UB = kUnit * sizeof(T), kU = combine_units<T>() / 2, kBatch = 4;
  const CallCtx& c = a.c;
  const NormalShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  const int R = c.nranks, lane = lane_id(), units = s.H / kUnit;
  const int ks = s.tokens_layout ? s.K : s.Kr;
  // Each rank's rows in place (null: it pushed its partials here).
  __shared__ const char* src_eo[kMaxRanks];
  __shared__ const float* src_w[kMaxRanks];
  __shared__ const float* src_vals[kMaxRanks];
  __shared__ const int32_t* src_map[kMaxRanks];
  __shared__ int any_pull;
  if (threadIdx.x == 0) any_pull = 0;
  __syncthreads();
  // every rank's partials: this node's ranks signal themselves, the others'
  // forwarders signal for them (fwd_inbox), after the rows the network delivered
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    if (r != c.rank) {
      if (on_my_node(c, r)) {
        wait_signal(c, kPhaseCombineWait, r, epoch);
      } else {
        uint64_t* w = reinterpret_cast<uint64_t*>(c.peers.base[c.rank] + c.off.fwd_inbox) + r;
        wait_word(c, kPhaseCombineWait, r, epoch, w);
        after_remote_signal(c, w);
      }
    }
    char* p[4];  // as combine_send_kernel publishes them
    if (c.window && published_operands(c, r, epoch, kPhaseCombineWait, p)) {
      src_eo[r] = p[0];
      src_w[r] = reinterpret_cast<const float*>(p[1]);
      src_vals[r] = reinterpret_cast<const float*>(p[2]);
      src_map[r] = reinterpret_cast<const int32_t*>(p[3]);
      any_pull = 1;
    } else {
      src_eo[r] = nullptr;
    }
  }
  __syncthreads();
  const bool pull = any_pull != 0;
  // Tokens to whichever warp is free, every one counted, as in the dispatch's
  // stage kernel (this kernel does not run with one rank).
  for_each_handed_out<1>(c.control + kCtlRecvNext, s.T, false, [&](int t) {
    uint64_t mask = 0;
    for (int r0 = 0; r0 < R; r0 += 32) {
      const bool m = r0 + lane < R && a.dst_mask[t * R + r0 + lane] != 0;
      mask |= static_cast<uint64_t>(__ballot_sync(0xffffffffu, m)) << r0;
    }
    T* y = static_cast<T*>(a.y) + static_cast<size_t>(t) * s.H;
    if (!pull) {
      for (int base = 0; base < units; base += 32 * kU) {
        const int u0 = base + lane;
        float acc[kU][kUnit];
#pragma unroll
        for (int j = 0; j < kU; ++j)
#pragma unroll
          for (int e = 0; e < kUnit; ++e) acc[j][e] = -0.f;
        for (uint64_t m = mask; m != 0;) {
          int rk[kBatch];  // the next ranks in order, -1 past the last
#pragma unroll
          for (int b = 0; b < kBatch; ++b) {
            rk[b] = m != 0 ? __ffsll(static_cast<long long>(m)) - 1 : -1;
            if (m != 0) m &= m - 1;
          }
          RawUnit<UB, true> v[kBatch][kU];
#pragma unroll
          for (int b = 0; b < kBatch; ++b) {
            if (rk[b] < 0) continue;
            const char* p = reinterpret_cast<const char*>(comb_slot<T>(c, s, c.rank, rk[b], t, epoch));
#pragma unroll
            for (int j = 0; j < kU; ++j)
              if (u0 + 32 * j < units) v[b][j].load(p + static_cast<size_t>(u0 + 32 * j) * UB);
          }
#pragma unroll
          for (int b = 0; b < kBatch; ++b)
            if (rk[b] >= 0) add_units<T>(acc, v[b], u0, units, false, 1.f);
        }
#pragma unroll
        for (int j = 0; j < kU; ++j)
          if (u0 + 32 * j < units) store_unit(y + (u0 + 32 * j) * kUnit, acc[j]);
      }
    } else {
      // The token's rows in (rank, local-expert) order, lane j holding the j-th:
      // its rank, its row there (-1: the rank's partial, pushed here) and weight.
      // At most K rows (and a pushed partial stands for at least one), so <= 16.
      int n = 0, e_rank = -1, e_pos = -1;
      float e_w = 1.f;
      const int per = 32 / s.Kr;  // ranks looked up per round, Kr lanes each
      for (uint64_t m = mask; m != 0;) {
        const int q = lane / s.Kr, i = lane % s.Kr;
        int r = -1;
        for (int b = 0; b < per && m != 0; ++b) {
          const int rb = __ffsll(static_cast<long long>(m)) - 1;
          m &= m - 1;
          if (b == q) r = rb;
        }
        int pos = -1;
        float w = 1.f;
        bool have = false;
        if (r >= 0) {
          if (src_eo[r] == nullptr) {
            have = i == 0;
          } else {
            pos = __ldcg(src_map[r] + (static_cast<size_t>(c.rank) * s.T + t) * s.Kr + i);
            have = pos >= 0;
            if (have && src_w[r] != nullptr) w = __ldcg(src_w[r] + pos);
          }
        }
        const uint32_t got = __ballot_sync(0xffffffffu, have);
        const int j = lane - n, cnt = __popc(got);
        int from = lane;
        if (j >= 0 && j < cnt) {
          uint32_t g = got;
          for (int k = 0; k < j; ++k) g &= g - 1;
          from = __ffs(g) - 1;
        }
        const int r_f = __shfl_sync(0xffffffffu, r, from), p_f = __shfl_sync(0xffffffffu, pos, from);
        const float w_f = __shfl_sync(0xffffffffu, w, from);
        if (j >= 0 && j < cnt) e_rank = r_f, e_pos = p_f, e_w = w_f;
        n += cnt;
      }
      // BF16 combine, tokens layout, 8 processes on one H100 with 16 SMs each (loop
      // timer, the mean of two runs' medians): 1,670 µs with the partials' loop (4
      // rows of 2 units); kOne with 2 rows of 4 units 1,544; with 6 rows of 2 units 1,527.
      if constexpr (kOne)
        pull_rows<T, true, combine_units<T>() / 2, 6>(c, s, t, epoch, n, e_rank, e_pos, e_w, src_eo, src_w, y);
      else
        pull_rows<T, false, combine_units<T>() / 2, 4>(c, s, t, epoch, n, e_rank, e_pos, e_w, src_eo, src_w, y);
    }
    if (a.slot_vals != nullptr && lane < s.K) {
      const int sp = a.slot_pos[t * s.K + lane];
      float v = 0.f;
      if (sp >= 0) {
        const int q = sp / ks, j = sp % ks;
        if (src_eo[q] == nullptr) {
          v = __ldcg(vals_slot(c, s, c.rank, q, t, ks, epoch) + j);
        } else if (src_vals[q] != nullptr) {
          const int32_t* map = src_map[q] + (static_cast<size_t>(c.rank) * s.T + t) * s.Kr;
          const int p = __ldcg(map + (s.tokens_layout ? 0 : j));
          if (p >= 0) v = __ldcg(src_vals[q] + (s.tokens_layout ? static_cast<size_t>(p) * s.K + j : p));
        }
      }
      a.slot_vals[t * s.K + lane] = v;
    }
  });
  close_call_released(c, c.control + kCtlDoneRecv, epoch, a.epoch_out, a.pull, c.control + kCtlRecvNext);
}

// ------------------------------------------------------------------ redispatch

// Stage y rows (raw) for the peers, then signal.
template <int UB>
__global__ void __launch_bounds__(kThreads) stage_rows_kernel(RedispatchArgs a) {
  const CallCtx& c = a.c;
  const uint32_t epoch = current_epoch(c);
  const Stage st = stage_of(c, a.s, c.rank, epoch);
  const int units = a.s.H / kUnit, lane = lane_id();
  for (int t = blockIdx.x * kWarps + warp_id(); t < a.s.T; t += gridDim.x * kWarps) {
    const size_t off = static_cast<size_t>(t) * units * UB;
    copy_raw_row<UB>(static_cast<const char*>(a.y) + off, st.x + off, units);
    if (c.nodes > 1) {  // once to each other node that holds a row of the token
      const uint32_t nodes = node_mask_of_ranks(c, a.dst_mask + static_cast<size_t>(t) * c.nranks) &
                             ~(1u << node_of(c, c.rank));
      if (nodes == 0) continue;
      __syncwarp();
      const Stage to = my_rdma_slot(c, a.s, epoch);
      for (uint32_t m = nodes; m != 0; m &= m - 1)
        put_warp(c, to.x + off, st.x + off, static_cast<size_t>(units) * UB, peer_on_node(c, c.rank, __ffs(m) - 1));
    }
  }
  finish_stage(c, a.s, epoch, /*with_ids=*/false);
}

// rows[p] = y[token of row p] through the handle: pull each source row once.
template <int UB>
__global__ void __launch_bounds__(kThreads) redispatch_kernel(RedispatchArgs a) {
  const CallCtx& c = a.c;
  const NormalShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  const int R = c.nranks, lane = lane_id(), units = s.H / kUnit;
  relay_rdma_flags(c, kPhaseRedispatchWait, epoch);
  wait_sources(c, kPhaseRedispatchWait, epoch);
  char* out = static_cast<char*>(a.rows);
  for (int item = blockIdx.x * kWarps + warp_id(); item < R * s.T; item += gridDim.x * kWarps) {
    const RankToken rt = rank_token(c, item, s.T);
    const int src = rt.rank, t = rt.t, g = src * s.T + t;
    const int pos = lane < s.Kr ? a.src_rows[static_cast<size_t>(g) * s.Kr + lane] : -1;
    const uint32_t valid = __ballot_sync(0xffffffffu, pos >= 0);
    if (!valid) continue;
    int dst[kMaxTopK];
#pragma unroll
    for (int i = 0; i < kMaxTopK; ++i) dst[i] = __shfl_sync(0xffffffffu, pos, i);
    const char* row = src == c.rank
                          ? static_cast<const char*>(a.y) + static_cast<size_t>(t) * units * UB
                          : stage_of(c, s, src, epoch).x + static_cast<size_t>(t) * units * UB;
    copy_raw_to_rows<UB, true>(row, out, dst, units);
  }
  const int used = *a.num_rows;
  for (int p = used + blockIdx.x * kWarps + warp_id(); p < s.C; p += gridDim.x * kWarps) {
    int4* row = reinterpret_cast<int4*>(out + static_cast<size_t>(p) * units * UB);
    for (int j = lane; j < units * UB / 16; j += 32) row[j] = make_int4(0, 0, 0, 0);
  }
  close_call(c, c.control + kCtlDoneExpand, epoch, a.epoch_out);
}

// ------------------------------------------------------------------ all_reduce

// Copy x into this rank's staging half, then signal every rank.
__global__ void __launch_bounds__(kThreads) all_reduce_stage_kernel(AllReduceArgs a) {
  const CallCtx& c = a.c;
  const uint32_t epoch = current_epoch(c);
  check_send_order(c, kPhaseAllReduceWait, epoch);  // not between a low-latency send and recv
  float4* to = reinterpret_cast<float4*>(half_base(c, c.rank, epoch) + c.off.x_stage);
  const float4* from = reinterpret_cast<const float4*>(a.x);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < a.n / 4;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    to[i] = from[i];
  if (last_block_done(c.control + kCtlDoneStage) && threadIdx.x == 0) signal_all(c, epoch);
}

// y[i] = x_0[i] + x_1[i] + ... in rank order (this rank's own values from x).
__global__ void __launch_bounds__(kThreads) all_reduce_sum_kernel(AllReduceArgs a) {
  const CallCtx& c = a.c;
  const uint32_t epoch = current_epoch(c);
  check_send_order(c, kPhaseAllReduceWait, epoch);
  wait_all(c, kPhaseAllReduceWait, epoch);
  const float4* mine = reinterpret_cast<const float4*>(a.x);
  float4* y = reinterpret_cast<float4*>(a.y);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < a.n / 4;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    float4 acc;
    for (int r = 0; r < c.nranks; ++r) {
      const float4 v = r == c.rank ? mine[i]
                                   : __ldcg(reinterpret_cast<const float4*>(half_base(c, r, epoch) +
                                                                            c.off.x_stage) + i);
      if (r == 0) {
        acc = v;
      } else {
        acc.x += v.x, acc.y += v.y, acc.z += v.z, acc.w += v.w;
      }
    }
    y[i] = acc;
  }
  close_call(c, c.control + kCtlDoneRecv, epoch, a.epoch_out);
}

// ------------------------------------------------------------------ launch

template <typename F, typename... Args>
cudaError_t launch_block(F kernel, int grid, int block, size_t smem, cudaStream_t stream, const Args&... args) {
  // Past 48 KB of shared memory in all (the kernel's static part included) a
  // launch must opt in to the dynamic part.
  size_t static_smem = 0;
  if (smem > 0) {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess) static_smem = attr.sharedSizeBytes;
    else (void)cudaGetLastError();
  }
  if (smem > 0 && smem + static_smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, block, smem, stream>>>(args...);
  return cudaGetLastError();
}

template <typename F, typename... Args>
cudaError_t launch(F kernel, int grid, size_t smem, cudaStream_t stream, const Args&... args) {
  return launch_block(kernel, grid, kThreads, smem, stream, args...);
}

#define JAX_EP_RETURN_IF_ERROR(expr)        \
  do {                                      \
    cudaError_t _e = (expr);                \
    if (_e != cudaSuccess) return _e;       \
  } while (0)

// The grid of a copy kernel of a dispatch. One rank waits on nobody, so when the
// call may take the whole GPU the kernel runs as many blocks per SM as fit, up to
// two: more loads in flight (with one 512-thread block per SM the expand kernel
// reached 73% of the DRAM bandwidth at EP1). Otherwise one block per SM of the budget.
template <typename K>
int copy_grid(K kernel, size_t smem, int nranks, int num_sms) {
  if (nranks != 1) return num_sms;
  int dev = 0, sms = 0, per_sm = 1;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) != cudaSuccess) {
    (void)cudaGetLastError();
    return num_sms;
  }
  return num_sms >= sms ? std::max(1, std::min(per_sm, 2)) * sms : num_sms;
}

template <typename T>
cudaError_t dispatch_typed(const DispatchArgs& a, cudaStream_t stream) {
  const bool fp8 = a.out_kind != kOutSame;
  const int R = a.c.nranks, grid = a.num_sms;
  const bool tokens = a.s.tokens_layout != 0;
  if (R > 1 && a.c.nodes == 1 && !a.c.spread && fp8 && a.x_scales == nullptr && !a.pull) {
    // Quantizing with 32 warps per SM, not 16: the stage kernel's median went
    // from 319 to 277 µs at EP8 on one H100 (8 processes x 16 SMs). Ranks on
    // separate GPUs keep the 512-thread kernel: not measured there yet.
    JAX_EP_RETURN_IF_ERROR(launch_block(stage_kernel<T, true, kWideBlock>, grid, kWideBlock, 0, stream, a, true));
  } else if (R > 1 || (fp8 && a.x_scales == nullptr)) {  // one rank reads FP8 input in place
    auto k = fp8 ? stage_kernel<T, true> : stage_kernel<T, false>;
    JAX_EP_RETURN_IF_ERROR(launch(k, a.pull ? 1 : copy_grid(k, 0, R, grid), 0, stream, a, R > 1));
  }
  if (tokens) JAX_EP_RETURN_IF_ERROR(cudaMemsetAsync(a.group_sizes, 0, a.s.El * sizeof(int32_t), stream));
  const int nch = (a.s.T + kRouteChunk - 1) / kRouteChunk;
  const size_t route_smem = tokens ? 0 : 2 * kWarps * a.s.El * sizeof(uint32_t);
  JAX_EP_RETURN_IF_ERROR(launch(tokens ? route_kernel<true> : route_kernel<false>, grid, route_smem,
                                stream, a));
  const size_t expand_smem = (tokens ? R * nch : a.s.El * R * nch) * sizeof(int);
  constexpr int UB = kUnit * sizeof(T);
  using E = decltype(&expand_kernel<false, kOutSame, T, UB>);
  E k;
  if (a.out_kind == kOutSame) {
    k = tokens ? expand_kernel<true, kOutSame, T, UB> : expand_kernel<false, kOutSame, T, UB>;
  } else if (a.out_kind == kOutFp8) {
    // A whole 7168-byte row in flight per warp (14 loads per lane; copy_row keeps
    // no register per destination row). At EP8 on one H100 (8 processes x 16
    // SMs) against 4 loads per lane: tokens layout 2% faster; experts layout
    // (where copy_row held 16 destination rows in registers, 118 of them in all)
    // 1,738 -> 1,657 µs quantized in the call, 1,373 -> 1,259 µs from an Fp8Array.
    k = tokens ? expand_kernel<true, kOutFp8, T, UB, 16> : expand_kernel<false, kOutFp8, T, UB, 16>;
  } else {
    switch (a.out_dtype) {
      case DType::kBF16:
        k = tokens ? expand_kernel<true, kOutDequant, __nv_bfloat16, UB>
                   : expand_kernel<false, kOutDequant, __nv_bfloat16, UB>;
        break;
      case DType::kF16:
        k = tokens ? expand_kernel<true, kOutDequant, __half, UB>
                   : expand_kernel<false, kOutDequant, __half, UB>;
        break;
      default:
        k = tokens ? expand_kernel<true, kOutDequant, float, UB>
                   : expand_kernel<false, kOutDequant, float, UB>;
    }
  }
  return launch(k, copy_grid(k, expand_smem, R, grid), expand_smem, stream, a);
}

template <typename T>
cudaError_t combine_typed(const CombineArgs& a, cudaStream_t stream) {
  if (a.c.nranks == 1) return launch(combine_send_kernel<T, true>, a.num_sms, 0, stream, a);
  JAX_EP_RETURN_IF_ERROR(launch(combine_send_kernel<T, false>, a.pull ? 1 : a.num_sms, 0, stream, a));
  if (a.c.nodes > 1) JAX_EP_RETURN_IF_ERROR(launch(combine_forward_kernel<T>, a.num_sms, 0, stream, a));
  // One row per (token, rank) (Kr == 1, the tokens layout always): a sum with no partials to round.
  return launch(a.s.Kr == 1 ? combine_recv_kernel<T, true> : combine_recv_kernel<T, false>, a.num_sms, 0,
                stream, a);
}

template <int UB>
cudaError_t redispatch_typed(const RedispatchArgs& a, cudaStream_t stream) {
  if (a.c.nranks > 1) JAX_EP_RETURN_IF_ERROR(launch(stage_rows_kernel<UB>, a.num_sms, 0, stream, a));
  return launch(redispatch_kernel<UB>, a.num_sms, 0, stream, a);
}

}  // namespace

cudaError_t launch_dispatch(const DispatchArgs& a, cudaStream_t stream) {
  switch (a.in_dtype) {
    case DType::kF32: return dispatch_typed<float>(a, stream);
    case DType::kF16: return dispatch_typed<__half>(a, stream);
    default: return dispatch_typed<__nv_bfloat16>(a, stream);
  }
}

cudaError_t launch_combine(const CombineArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kF32: return combine_typed<float>(a, stream);
    case DType::kF16: return combine_typed<__half>(a, stream);
    default: return combine_typed<__nv_bfloat16>(a, stream);
  }
}

cudaError_t launch_redispatch(const RedispatchArgs& a, cudaStream_t stream) {
  return a.dtype == DType::kF32 ? redispatch_typed<32>(a, stream) : redispatch_typed<16>(a, stream);
}

cudaError_t launch_all_reduce(const AllReduceArgs& a, cudaStream_t stream) {
  if (a.c.nranks > 1) JAX_EP_RETURN_IF_ERROR(launch(all_reduce_stage_kernel, a.num_sms, 0, stream, a));
  return launch(all_reduce_sum_kernel, a.num_sms, 0, stream, a);
}

}  // namespace jax_ep
