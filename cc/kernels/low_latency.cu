// Low-latency dispatch and combine over peer pointers or NVSHMEM (protocol in
// low_latency.h).
#include "kernels/low_latency.h"
#include "kernels/rows.cuh"

#ifdef JAX_EP_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace jax_ep {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kHeader = 16;  // {token, i, 0, 0}
constexpr int kU = 4;        // 16-byte units a lane loads before it stores any
constexpr int kChunk = 32 * kU;  // units a warp moves per step of the send loop
// One rank writes every row straight into the output: half the piece per warp,
// so twice the warps share a token (each warp's work is a chain of dependent
// steps: routing, quantizing, eight stores per unit).
constexpr int kLocalU = 2;
constexpr int kMaxParts = 16;    // most warps sharing one token's row (combine recv) or one expert's rows (dispatch recv)

// Few tokens (or experts) leave most warps idle, and one warp walking a whole row is a chain
// of dependent memory round trips: a token's row is split into `parts` pieces,
// one warp each, when there are warps to spare. Warp gw takes piece gw % parts of
// tokens gw / parts, gw / parts + slots, ...; warps past slots * parts take none.
struct RowSplit {
  int parts, slots, part, first;
  __device__ RowSplit(int T, int most) {
    const int G = gridDim.x * kWarps, gw = blockIdx.x * kWarps + warp_id();
    parts = max(1, min(most, G / max(T, 1)));
    slots = G / parts;
    part = gw % parts;
    first = gw < slots * parts ? gw / parts : T;
  }
};

__host__ __device__ inline size_t msg_stride(int H) { return (kHeader + 2 * static_cast<size_t>(H) + 15) / 16 * 16; }

// A count word's low half: the count (kCountBits bits) under 12 bits of the signature.
constexpr int kCountBits = 20;
constexpr uint32_t kCountSigMask = (1u << (32 - kCountBits)) - 1;
__device__ __forceinline__ uint32_t count_low(int count, uint32_t sig) {
  return ((sig & kCountSigMask) << kCountBits) | static_cast<uint32_t>(count);
}

// Slot (local expert el, source src, j) of rank `owner`'s receive half.
__device__ __forceinline__ char* ll_slot(const CallCtx& c, const LowLatencyShape& s, int owner,
                                         int el, int src, int j, uint32_t epoch) {
  return half_base(c, owner, epoch) + c.off.ll_recv +
         ((static_cast<size_t>(el) * c.nranks + src) * s.M + j) * msg_stride(s.H);
}

// Count word (local expert el, source src) of rank `owner` for a call of `epoch`:
// two sets, by the epoch's parity, so a source that finished call N and went on
// to send N+1 never overwrites a word of call N that `owner` has yet to read
// (a source gets at most one call ahead: its receive of N+1 waits for owner's
// send of N+1, which follows owner's receive of N).
__device__ __forceinline__ uint64_t* ll_count_word(const CallCtx& c, const LowLatencyShape& s, int owner,
                                                   int el, int src, uint32_t epoch) {
  return reinterpret_cast<uint64_t*>(c.peers.base[owner] + c.off.ll_count) +
         ((static_cast<size_t>(epoch & 1u) * s.El + el) * c.nranks + src);
}

// Over peer pointers a message is pulled: the sender writes its row once into
// its own staging (token t's at ll_stage + t * 2H: FP8 data then scales, or BF16
// data) and only the 16-byte header {t, i} into slot (el, src, j) of the owner,
// whose receive reads the row from the sender's staging.
__device__ __forceinline__ char* ll_head(const CallCtx& c, const LowLatencyShape& s, int owner, int el,
                                         int src, int j, uint32_t epoch) {
  return half_base(c, owner, epoch) + c.off.ll_recv +
         ((static_cast<size_t>(el) * c.nranks + src) * s.M + j) * kHeader;
}
__device__ __forceinline__ char* ll_stage_row(const CallCtx& c, const LowLatencyShape& s, int owner, int t,
                                              uint32_t epoch) {
  return half_base(c, owner, epoch) + c.off.ll_stage + static_cast<size_t>(t) * 2 * s.H;
}

// Slot (expert rank r, token t, i) of rank `owner`'s combine half: one BF16 row.
__device__ __forceinline__ __nv_bfloat16* ll_comb_slot(const CallCtx& c, const LowLatencyShape& s,
                                                       int owner, int r, int t, int i,
                                                       uint32_t epoch) {
  char* h = half_base(c, owner, epoch) + c.off.ll_comb;
  return reinterpret_cast<__nv_bfloat16*>(h) + ((static_cast<size_t>(r) * s.M + t) * s.Kl + i) * s.H;
}

// The NVSHMEM transport (kShmem): messages are built in this rank's own staging
// (symmetric memory, which every transport may read from) and put to the owner
// PE; addresses are this rank's symmetric addresses (the same offsets on every
// PE), so `owner` in the slot helpers is replaced by this rank.
//   dispatch staging, per token: kMaxTopK headers of 16 bytes, then the payload.
__host__ __device__ inline size_t ll_stage_stride(int H) { return msg_stride(H) + kMaxTopK * kHeader; }

#ifdef JAX_EP_WITH_NVSHMEM
// Every put this block issued is complete (delivered at the target) before the
// block counts itself done.
__device__ __forceinline__ void quiet_block() {
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();
}
#endif

// Copy `n16` 16-byte units from src to dst by one warp, kCopyU per lane in flight
// (kCoherent: src was released by a peer during this kernel): a 7168-wide FP8 row
// in two steps, a BF16 row in four.
constexpr int kCopyU = 8;
template <bool kCoherent, int kN = kCopyU>
__device__ __forceinline__ void copy_units(char* dst, const char* src, int n16) {
  for (int u0 = lane_id(); u0 < n16; u0 += 32 * kN) {
    RawUnit<16, kCoherent> v[kN];
#pragma unroll
    for (int q = 0; q < kN; ++q)
      if (u0 + 32 * q < n16) v[q].load(src + static_cast<size_t>(u0 + 32 * q) * 16);
#pragma unroll
    for (int q = 0; q < kN; ++q)
      if (u0 + 32 * q < n16) v[q].store(dst + static_cast<size_t>(u0 + 32 * q) * 16);
  }
}

// A token's routing, lane k holding top-k slot k (lanes k >= K: nothing): the
// rule of the dispatch's sender routing (jax_ep.routing.sender_routing) with
// no capacity. Ids outside [0, E) are no slot; the first slot holding an id
// makes the row (row = the id, else -1); sp = dest * Kl + i, i = the number of
// the token's distinct valid experts on rank dest with a lower id (repeats of
// an id share its slot), -1 for no slot.
struct TokenRoute {
  int row, sp;
};
__device__ __forceinline__ TokenRoute route_token(const int32_t* ids, int K, int E, int El, int Kl) {
  const int lane = lane_id();
  int e = lane < K ? ids[lane] : -1;
  if (e < 0 || e >= E) e = -1;
  bool first = e >= 0;
  for (int j = 0; j < K; ++j) {
    const int ej = __shfl_sync(0xffffffffu, e, j);
    if (j < lane && ej == e) first = false;
  }
  const int dest = e >= 0 ? e / El : -1;
  int i = 0;
  for (int j = 0; j < K; ++j) {
    const int ej = __shfl_sync(0xffffffffu, e, j);
    const bool fj = __shfl_sync(0xffffffffu, first, j);
    if (fj && ej / El == dest && ej < e) ++i;
  }
  return {first ? e : -1, e >= 0 ? dest * Kl + i : -1};
}

// topk_idx ([n] ints) copied into this block's dynamic shared memory when the
// launch gave it room (kIdsSmem bytes at most), else read where it is.
constexpr size_t kIdsSmem = 32 * 1024;  // well inside the 48 KB a block has without opting in
constexpr size_t kRankSmem = 48 * 1024;  // ids and the ranks' chunk table (stage_rank_prefix)
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
  unsigned room;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(room));
  return room;
}
__device__ __forceinline__ const int32_t* stage_ids(const int32_t* g, int n) {
  extern __shared__ int4 ids_smem[];
  if (static_cast<size_t>(n) * sizeof(int32_t) > dynamic_smem_bytes()) return g;
  int32_t* sm = reinterpret_cast<int32_t*>(ids_smem);
  for (int i = threadIdx.x; i < n; i += blockDim.x) sm[i] = g[i];
  __syncthreads();
  return sm;
}

// Whether token `ids` (K ids) holds expert e (e valid).
__device__ __forceinline__ bool token_has(const int32_t* ids, int K, int e) {
  bool hit = false;
  for (int k = 0; k < K; ++k) hit |= ids[k] == e;
  return hit;
}

// Tokens per expert before each chunk of 32 tokens, in shared memory after the
// staged topk_idx when the launch gave room (ids_smem_bytes): pre[c * E + e] =
// the tokens before token 32 c that hold expert e (a token once, however often
// it repeats e), so a token's rank scans its own chunk only. Every block builds
// the whole table (a few thousand shared-memory adds); null without room or
// without ids in shared memory.
constexpr int kRankChunk = 32;
__host__ __device__ inline int rank_chunks(int T) { return (T + kRankChunk - 1) / kRankChunk; }
__device__ __forceinline__ const int* stage_rank_prefix(const int32_t* ids, const int32_t* g, int T, int K,
                                                        int E) {
  extern __shared__ int4 ids_smem[];
  const int n = T * K, nch = rank_chunks(T);
  if (ids == g || (static_cast<size_t>(n) + static_cast<size_t>(nch) * E) * sizeof(int) > dynamic_smem_bytes())
    return nullptr;
  int* pre = reinterpret_cast<int*>(ids_smem) + n;
  for (int i = threadIdx.x; i < nch * E; i += blockDim.x) pre[i] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {  // chunk c's tokens count in row c + 1
    const int t = i / K, k = i - t * K, e = ids[i], c = t / kRankChunk + 1;
    if (c >= nch || e < 0 || e >= E) continue;
    bool first = true;
    for (int k2 = 0; k2 < k; ++k2) first &= ids[t * K + k2] != e;
    if (first) atomicAdd(pre + c * E + e, 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = 0;
    for (int c = 1; c < nch; ++c) pre[c * E + e] = run += pre[c * E + e];
  }
  __syncthreads();
  return pre;
}

// Lane k's rank of token t among the tokens before it that hold expert `row`
// (lane k's row, -1: none): from the chunk table `pre` (stage_rank_prefix; or
// null) and a scan of the earlier tokens not in it, 32 at a time.
template <int kMaxK>
__device__ __forceinline__ int rank_before(const int32_t* topk_idx, int t, int K, int row, const int* pre, int E) {
  const int lane = lane_id();
  int rank = 0, from = 0;
  if (pre != nullptr) {
    from = t / kRankChunk * kRankChunk;
    if (row >= 0) rank = pre[t / kRankChunk * E + row];
  }
  for (int t0 = from; t0 < t; t0 += 32) {
    const int tt = t0 + lane;
    int ids[kMaxK];
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) ids[k] = tt < t && k < K ? topk_idx[tt * K + k] : -1;
    for (int k = 0; k < K; ++k) {
      const int ek = __shfl_sync(0xffffffffu, row, k);
      bool hit = false;
#pragma unroll
      for (int k2 = 0; k2 < kMaxK; ++k2) hit |= ek >= 0 && ids[k2] == ek;
      const int n = __popc(__ballot_sync(0xffffffffu, hit));
      if (lane == k) rank += n;
    }
  }
  return rank;
}

// ------------------------------------------------------------ dispatch send

// Units base + 32 j + lane (j < N) of a row, those below `units`.
template <int N>
__device__ __forceinline__ void load_piece(RawUnit<16> (&raw)[N], const char* row, int base, int units) {
  const int lane = lane_id();
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (base + 32 * j + lane < units) raw[j].load(row + static_cast<size_t>(base + 32 * j + lane) * 16);
}

// kMaxK: the largest K the instance serves (8 or kMaxTopK; fewer row pointers to
// hold for the common top-8).
// kLocal (one rank, launch_ll_dispatch_local): no messages; each row is written
// straight into its packed place in the output (the rank of the token among
// those of its expert), with its scales and src_rows entry, and the call closes.
template <bool kShmem, bool kLocal, int kMaxK>
__global__ void __launch_bounds__(kThreads) ll_dispatch_send_kernel(LLDispatchSendArgs a) {
  static_assert(!(kShmem && kLocal), "the one-rank path moves no message");
  constexpr int kData = kLocal ? 0 : kHeader;  // where a row's data starts at dst[k]
  // kPull (peer pointers, several ranks): the row goes once into this rank's
  // staging, dst[k] is the owner's header slot (ll_head).
  constexpr bool kPull = !kShmem && !kLocal;
  constexpr bool kOnce = kShmem || kPull;  // one copy of the payload (`payload`), not one per dst[k]
  const CallCtx& c = a.c;
  const LowLatencyShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  if constexpr (!kLocal) check_send_order(c, kPhaseLowLatencyDispatchSend, epoch);
  const int lane = lane_id(), units = s.H / kUnit;
  const size_t row_bytes = s.fp8 ? static_cast<size_t>(s.H) : 2 * static_cast<size_t>(s.H);
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(a.x);
  constexpr int kPU = kLocal ? kLocalU : kU, kPiece = 32 * kPU;  // a warp's units per step
  const int chunks = (units + kPiece - 1) / kPiece;
  const RowSplit split(s.T, chunks);
  const int32_t* ids = stage_ids(a.topk_idx, s.T * s.K);
  const int* pre = stage_rank_prefix(ids, a.topk_idx, s.T, s.K, s.E);
  for (int t = split.first; t < s.T; t += split.slots) {
    // The first piece of the row is in flight while the token is routed.
    const char* row = reinterpret_cast<const char*>(x + static_cast<size_t>(t) * s.H);
    RawUnit<16> raw[kPU];
    load_piece(raw, row, split.part * kPiece, units);
    // Lane k finds slot k's row (its expert, -1: none), slot_pos and rank among
    // this rank's tokens of the expert from topk_idx; piece 0 writes the
    // handle's slot_pos (and with kLocal the token's src_rows, -1 where unused).
    const TokenRoute r = route_token(ids + static_cast<size_t>(t) * s.K, s.K, s.E, s.El, s.Kl);
    const int rank_l = rank_before<kMaxK>(ids, t, s.K, r.row, pre, s.E);
    if (split.part == 0) {
      if (lane < s.K) a.slot_pos_out[t * s.K + lane] = r.sp;
      if constexpr (kLocal) {
        const int nrows = __popc(__ballot_sync(0xffffffffu, r.row >= 0));
        if (r.row >= 0) a.src_rows[t * s.Kl + r.sp] = r.row * s.M + rank_l;  // one rank: sp = i
        if (lane >= nrows && lane < s.Kl) a.src_rows[t * s.Kl + lane] = -1;
      }
    }
    // Where each row goes: kLocal its packed place in the output, else a message
    // slot on its expert's rank (piece 0 writes the headers; with NVSHMEM the
    // header waits in staging and every payload is written once).
    char* stage = kShmem ? c.peers.base[c.rank] + c.off.ll_send + t * ll_stage_stride(s.H) : nullptr;
    char* dst[kMaxK];
    int out_row[kMaxK];  // kLocal: dst's row of the output (its scales' row)
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      char* d = nullptr;
      const int e = __shfl_sync(0xffffffffu, r.row, k), rank = __shfl_sync(0xffffffffu, rank_l, k);
      out_row[k] = e * s.M + rank;
      if (e >= 0) {
        if constexpr (kLocal) {
          d = static_cast<char*>(a.out_x) + static_cast<size_t>(out_row[k]) * row_bytes;
        } else if constexpr (kPull) {
          d = ll_head(c, s, e / s.El, e % s.El, c.rank, rank, epoch);
          const int i = __shfl_sync(0xffffffffu, r.sp, k) % s.Kl;
          if (lane == 0 && split.part == 0) *reinterpret_cast<int4*>(d) = make_int4(t, i, 0, 0);
        } else {
          d = ll_slot(c, s, kShmem ? c.rank : e / s.El, e % s.El, c.rank, rank, epoch);
          const int i = __shfl_sync(0xffffffffu, r.sp, k) % s.Kl;
          if (lane == 0 && split.part == 0)
            *reinterpret_cast<int4*>(kShmem ? stage + k * kHeader : d) = make_int4(t, i, 0, 0);
        }
      }
      dst[k] = d;
    }
    char* payload = kShmem ? stage + kMaxTopK * kHeader : kPull ? ll_stage_row(c, s, c.rank, t, epoch) : nullptr;
    // kPU units per lane are loaded before any is sent; the loop is warp-uniform
    // (the FP8 scale is shared by the 16 lanes of a block through shuffles).
    for (int base = split.part * kPiece; base < units; base += split.parts * kPiece) {
      // The warp's next piece of the row is in flight while this one is sent.
      const int next = base + split.parts * kPiece;
      RawUnit<16> ahead[kPU];
      if (next < units) load_piece(ahead, row, next, units);
#pragma unroll
      for (int j = 0; j < kPU; ++j) {
        const int u = base + 32 * j + lane;
        const bool active = u < units;
        if (s.fp8) {
          float v[kUnit];
          Vec<__nv_bfloat16>::load(raw[j].v[0], v);
          float scale;
          const uint2 q = quantize_unit<__nv_bfloat16>(v, active, s.round_scale, &scale);
          if (!active) continue;
          if constexpr (kOnce) {
            reinterpret_cast<uint2*>(payload)[u] = q;
            if (u % kUnitsPerBlock == 0) reinterpret_cast<float*>(payload + s.H)[u / kUnitsPerBlock] = scale;
          } else {
#pragma unroll
            for (int k = 0; k < kMaxK; ++k) {
              if (dst[k] == nullptr) continue;
              reinterpret_cast<uint2*>(dst[k] + kData)[u] = q;
              if (u % kUnitsPerBlock == 0) {
                float* sc = kLocal ? a.out_scales + static_cast<size_t>(out_row[k]) * (s.H / 128)
                                   : reinterpret_cast<float*>(dst[k] + kHeader + s.H);
                sc[u / kUnitsPerBlock] = scale;
              }
            }
          }
        } else if (active) {
          if constexpr (kOnce) {
            raw[j].store(payload + static_cast<size_t>(u) * 16);
          } else {
#pragma unroll
            for (int k = 0; k < kMaxK; ++k)
              if (dst[k] != nullptr) raw[j].store(dst[k] + kData + static_cast<size_t>(u) * 16);
          }
        }
      }
      if (next < units) {
#pragma unroll
        for (int j = 0; j < kPU; ++j) raw[j] = ahead[j];
      }
    }
#ifdef JAX_EP_WITH_NVSHMEM
    if constexpr (kShmem) {  // the warp puts its pieces of the payload (and piece 0 the header)
      __syncwarp();
      const size_t unit_bytes = s.fp8 ? 8 : 16;
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) {
        const int pe = __shfl_sync(0xffffffffu, r.row, k) / s.El;
        if (dst[k] == nullptr) continue;
        if (split.parts == 1) {  // the whole payload (data, then the FP8 scales) in one put
          const size_t bytes = units * unit_bytes + (s.fp8 ? (s.H / 128) * sizeof(float) : 0);
          nvshmemx_putmem_nbi_warp(dst[k] + kHeader, payload, bytes, pe);
        } else {
          for (int ch = split.part; ch < chunks; ch += split.parts) {
            const int u0 = ch * kChunk, n = min(kChunk, units - u0);
            nvshmemx_putmem_nbi_warp(dst[k] + kHeader + u0 * unit_bytes, payload + u0 * unit_bytes,
                                     n * unit_bytes, pe);
            if (s.fp8) {  // this piece's scales (kChunk is a whole number of 128-channel blocks)
              const size_t off = s.H + (u0 / kUnitsPerBlock) * sizeof(float);
              nvshmemx_putmem_nbi_warp(dst[k] + kHeader + off, payload + off,
                                       ((n + kUnitsPerBlock - 1) / kUnitsPerBlock) * sizeof(float), pe);
            }
          }
        }
        if (split.part == 0) nvshmemx_putmem_nbi_warp(dst[k], stage + k * kHeader, kHeader, pe);
      }
    }
#endif
  }
#ifdef JAX_EP_WITH_NVSHMEM
  if constexpr (kShmem) quiet_block();
#endif
  // count[e], the tokens holding expert e: one warp per expert, lanes over the
  // tokens (kLocal: the output's count; else what the last block publishes)
  // (the last warps of the grid first: those the tokens left idle)
  const int G = gridDim.x * kWarps, gw = G - 1 - (blockIdx.x * kWarps + warp_id());
  for (int e = gw; e < s.E; e += G) {
    int n = 0;
    for (int tt = lane; tt < s.T; tt += 32) n += token_has(ids + static_cast<size_t>(tt) * s.K, s.K, e);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) n += __shfl_xor_sync(0xffffffffu, n, off);
    if (lane == 0) a.count_out[e] = n;
  }
  if constexpr (kLocal) {  // src_rows of the slots past T
    for (int j = s.T * s.Kl + blockIdx.x * blockDim.x + threadIdx.x; j < s.M * s.Kl; j += gridDim.x * blockDim.x)
      a.src_rows[j] = -1;
    close_call(c, c.control + kCtlDoneRecv, epoch, a.epoch_out);
    return;
  }
  // Publish the per-expert counts once every block's messages are visible.
  if (last_block_done(c.control + kCtlDoneSend)) {
    // A signal put to a P2P peer is a plain store: release every block's messages
    // at system scope first (the peer path's stores release by themselves).
    if constexpr (kShmem) __threadfence_system();
    for (int e = threadIdx.x; e < s.E; e += blockDim.x) {
      const uint64_t word = (static_cast<uint64_t>(epoch) << 32) | count_low(__ldcg(a.count_out + e), c.sig);
#ifdef JAX_EP_WITH_NVSHMEM
      if constexpr (kShmem) {
        nvshmemx_signal_op(ll_count_word(c, s, c.rank, e % s.El, c.rank, epoch), word, NVSHMEM_SIGNAL_SET, e / s.El);
        continue;
      }
#endif
      st_release_sys64(ll_count_word(c, s, e / s.El, e % s.El, c.rank, epoch), word);
    }
    if (threadIdx.x == 0) {
      mark_send_open(c, epoch);
      *a.epoch_out = static_cast<int32_t>(epoch);
    }
  }
}

// ------------------------------------------------------------ dispatch recv

// The count src published for expert el in epoch `want` (tag in the high
// half; the low half holds the count and 12 bits of the call's signature).
__device__ __forceinline__ uint32_t wait_count(const CallCtx& c, const LowLatencyShape& s, int el, int src,
                                               uint32_t want) {
  const uint64_t* p = ll_count_word(c, s, c.rank, el, src, want);
  const uint64_t word = wait_until<uint64_t>(
      c, kPhaseLowLatencyDispatchWait, src, want, [=] { return ld_acquire_sys64(p); },
      [](uint64_t w) { return static_cast<uint32_t>(w >> 32); });
  const uint32_t low = static_cast<uint32_t>(word);
  check_signature(c, kPhaseLowLatencyDispatchWait, src, static_cast<uint32_t>(word >> 32), want,
                  low >> kCountBits, c.sig & kCountSigMask);
  return low & ((1u << kCountBits) - 1);
}

// One warp per piece of an expert's rows (RowSplit over the local experts): no
// block-wide barrier, so a few rows per expert still keep every warp busy. Each
// warp reads the expert's R count words itself (lane l: sources l and l + 32) and
// finds a row's source by a ballot over the inclusive prefix sums.
// kPull (peer pointers): the slot holds the header only and the row is read from
// the source's staging; the warp's next header is loaded while a row is copied,
// and a whole FP8 row (kPullU units per lane) is in flight at once.
constexpr int kPullU = 14;
template <bool kPull>
__global__ void __launch_bounds__(kThreads) ll_dispatch_recv_kernel(LLDispatchRecvArgs a) {
  static_assert(kMaxRanks <= 64, "two sources per lane");
  const CallCtx& c = a.c;
  const LowLatencyShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  const int R = c.nranks, lane = lane_id(), rows = R * s.M;
  const size_t row_bytes = s.fp8 ? static_cast<size_t>(s.H) : 2 * static_cast<size_t>(s.H);
  const RowSplit split(s.El, kMaxParts);
  for (int el = split.first; el < s.El; el += split.slots) {
    // A corrupt count never reaches past its source's M slots.
    const int n0 = lane < R ? min(static_cast<int>(wait_count(c, s, el, lane, epoch)), s.M) : 0;
    const int n1 = lane + 32 < R ? min(static_cast<int>(wait_count(c, s, el, lane + 32, epoch)), s.M) : 0;
    __syncwarp();  // every lane's acquire orders the messages before any lane reads them
    int end0 = n0, end1 = n1;  // inclusive prefix sums over sources
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int u0 = __shfl_up_sync(0xffffffffu, end0, off), u1 = __shfl_up_sync(0xffffffffu, end1, off);
      if (lane >= off) end0 += u0, end1 += u1;
    }
    end1 += __shfl_sync(0xffffffffu, end0, 31);
    const int total = __shfl_sync(0xffffffffu, end1, 31);
    if (split.part == 0 && lane == 0) a.count[el] = total;
    char* out = static_cast<char*>(a.out_x) + static_cast<size_t>(el) * rows * row_bytes;
    float* scales = s.fp8 ? a.out_scales + static_cast<size_t>(el) * rows * (s.H / 128) : nullptr;
    // The source holding packed row p (the number of sources that end at or
    // before p) and the row's slot j among that source's rows: warp-uniform p.
    auto locate = [&](int p, int* j) {
      const int src = __popc(__ballot_sync(0xffffffffu, lane < R && end0 <= p)) +
                      __popc(__ballot_sync(0xffffffffu, lane + 32 < R && end1 <= p));
      const int s0 = __shfl_sync(0xffffffffu, end0 - n0, src & 31);
      const int s1 = __shfl_sync(0xffffffffu, end1 - n1, src & 31);
      *j = p - (src < 32 ? s0 : s1);
      return src;
    };
    if constexpr (kPull) {
      const int nsc = s.fp8 ? s.H / 128 : 0;
      auto head_of = [&](int p, int* src) {
        int j;
        *src = locate(p, &j);
        return __ldcg(reinterpret_cast<const int4*>(ll_head(c, s, c.rank, el, *src, j, epoch)));
      };
      int src = 0;
      int4 head = split.part < total ? head_of(split.part, &src) : make_int4(-1, -1, 0, 0);
      for (int p = split.part; p < total; p += split.parts) {  // the rest: zeroed before the launch, or left
        int src_n = 0;
        const int4 head_n = p + split.parts < total ? head_of(p + split.parts, &src_n) : make_int4(-1, -1, 0, 0);
        if (head.x >= 0 && head.x < s.M) {  // never past the source's staging
          const char* row = ll_stage_row(c, s, src, head.x, epoch);
          const float* sc = reinterpret_cast<const float*>(row + s.H);
          const float sc0 = lane < nsc ? __ldcg(sc + lane) : 0.f, sc1 = lane + 32 < nsc ? __ldcg(sc + lane + 32) : 0.f;
          copy_units<true, kPullU>(out + p * row_bytes, row, static_cast<int>(row_bytes / 16));
          if (nsc > 0) {
            float* o = scales + static_cast<size_t>(p) * nsc;
            if (lane < nsc) o[lane] = sc0;
            if (lane + 32 < nsc) o[lane + 32] = sc1;
            for (int j = lane + 64; j < nsc; j += 32) o[j] = __ldcg(sc + j);
          }
          if (lane == 0 && head.y >= 0 && head.y < s.Kl)  // never past src_rows
            a.src_rows[(static_cast<size_t>(src) * s.M + head.x) * s.Kl + head.y] = el * rows + p;
        }
        src = src_n;
        head = head_n;
      }
      continue;
    }
    for (int p = split.part; p < total; p += split.parts) {  // the rest: zeroed before the launch, or left
      int j;
      const int src = locate(p, &j);
      const char* msg = ll_slot(c, s, c.rank, el, src, j, epoch);
      const int4 head = __ldcg(reinterpret_cast<const int4*>(msg));
      copy_units<true>(out + p * row_bytes, msg + kHeader, static_cast<int>(row_bytes / 16));
      if (scales != nullptr) {
        const float* sc = reinterpret_cast<const float*>(msg + kHeader + s.H);
        for (int j = lane; j < s.H / 128; j += 32) scales[static_cast<size_t>(p) * (s.H / 128) + j] = __ldcg(sc + j);
      }
      if (lane == 0 && head.x >= 0 && head.x < s.M && head.y >= 0 && head.y < s.Kl)  // never past src_rows
        a.src_rows[(static_cast<size_t>(src) * s.M + head.x) * s.Kl + head.y] = el * rows + p;
    }
  }
  close_call(c, c.control + kCtlDoneRecv, epoch, a.epoch_out);
}

// ------------------------------------------------------------ combine send

// signal_all of the transport: with NVSHMEM, signal puts (to a P2P peer a plain
// store, so every block's rows are released at system scope first).
template <bool kShmem>
__device__ __forceinline__ void signal_ranks(const CallCtx& c, uint32_t epoch) {
#ifdef JAX_EP_WITH_NVSHMEM
  if constexpr (kShmem) {
    __threadfence_system();
    const uint64_t word = (static_cast<uint64_t>(c.sig) << 32) | epoch;
    for (int r = 0; r < c.nranks; ++r) nvshmemx_signal_op(c.inbox + c.rank, word, NVSHMEM_SIGNAL_SET, r);
    return;
  }
#endif
  signal_all(c, epoch);
}

// Slots (source rank, token, local slot) spread over the warps, one warp per used
// slot's row when there are few (so a few tokens' rows still spread over every
// warp); 2 * kCopyU loads per lane in flight. With NVSHMEM the row is copied to
// this rank's staging and put from there.
template <bool kShmem>
__global__ void __launch_bounds__(kThreads) ll_combine_send_kernel(LLCombineSendArgs a) {
  const CallCtx& c = a.c;
  const LowLatencyShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  check_send_order(c, kPhaseLowLatencyCombineSend, epoch);
  if constexpr (!kShmem) {
    if (a.pull) {  // one block (the launch's grid): the sources read the rows where they are
      if (blockIdx.x == 0 && threadIdx.x == 0) {
        publish_record(c, epoch, true, a.expert_out, a.src_rows);
        signal_all(c, epoch);
        mark_send_open(c, epoch);
        *a.epoch_out = static_cast<int32_t>(epoch);
      }
      return;
    }
  }
  const int units = s.H / kUnit;
  const __nv_bfloat16* eo = static_cast<const __nv_bfloat16*>(a.expert_out);
  // A warp takes q slots of the walk at a time (as many as leave every warp
  // some, up to 32), one src_rows entry per lane in a single load (most slots
  // are empty), then copies the rows of the used ones, a 14 KB BF16 row in two steps.
  const int n = c.nranks * s.M * s.Kl, G = gridDim.x * kWarps, lane = lane_id();
  const int q = max(1, min(32, n / G));
  // The walk's h-th slot (rank_token: source ranks interleaved across GPUs).
  auto slot = [&](int h) {
    const RankToken rt = rank_token(c, h, s.M * s.Kl);
    return rt.rank * (s.M * s.Kl) + rt.t;
  };
  for (int g0 = (blockIdx.x * kWarps + warp_id()) * q; g0 < n; g0 += G * q) {
    const int mine = lane < q && g0 + lane < n ? a.src_rows[slot(g0 + lane)] : -1;  // [R, M, Kl]
    for (uint32_t used = __ballot_sync(0xffffffffu, mine >= 0); used != 0; used &= used - 1) {
      const int l = __ffs(used) - 1, g = slot(g0 + l);
      const int row = __shfl_sync(0xffffffffu, mine, l);
      const int src = g / (s.M * s.Kl), t = (g / s.Kl) % s.M, i = g % s.Kl;
      const char* from = reinterpret_cast<const char*>(eo + static_cast<size_t>(row) * s.H);
      char* slot = reinterpret_cast<char*>(ll_comb_slot(c, s, kShmem ? c.rank : src, c.rank, t, i, epoch));
      char* to = kShmem ? c.peers.base[c.rank] + c.off.ll_comb_send + static_cast<size_t>(g) * s.H * 2 : slot;
      copy_units<false, 2 * kCopyU>(to, from, units);
#ifdef JAX_EP_WITH_NVSHMEM
      if constexpr (kShmem) {
        __syncwarp();
        nvshmemx_putmem_nbi_warp(slot, to, static_cast<size_t>(s.H) * 2, src);
      }
#endif
    }
  }
#ifdef JAX_EP_WITH_NVSHMEM
  if constexpr (kShmem) quiet_block();
#endif
  if (last_block_done(c.control + kCtlDoneSend) && threadIdx.x == 0) {
    if (!kShmem && c.window) publish_record(c, epoch, false);  // pushed: read the slots
    signal_ranks<kShmem>(c, epoch);
    mark_send_open(c, epoch);
    *a.epoch_out = static_cast<int32_t>(epoch);
  }
}

// ------------------------------------------------------------ combine recv

// kLocal (one rank): slot k of token t is expert_out's row src_rows[t, i].
// Several ranks: slot (r, i) of token t is rank r's row of expert_out, found
// through its src_rows, where r published them (windows, peer pointers), else
// the row r pushed into this rank's combine slots.
// kMaxK: the largest K the instance serves; at 8 (the common top-8) a lane
// adds two units per step, the loads of both in flight before any is added.
template <bool kLocal, int kMaxK>
__global__ void __launch_bounds__(kThreads) ll_combine_recv_kernel(LLCombineRecvArgs a) {
  const CallCtx& c = a.c;
  const LowLatencyShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  const int lane = lane_id(), units = s.H / kUnit;
  // Per rank: its expert_out and src_rows here, where it published them.
  __shared__ const __nv_bfloat16* eo_of[kLocal ? 1 : kMaxRanks];
  __shared__ const int32_t* sr_of[kLocal ? 1 : kMaxRanks];
  const bool windows = !kLocal && c.window && c.transport == kTransportPeer;
  if constexpr (!kLocal) {
    wait_all(c, kPhaseLowLatencyCombineWait, epoch);
    for (int r = threadIdx.x; r < c.nranks; r += blockDim.x) {
      char* p[4] = {nullptr, nullptr, nullptr, nullptr};
      const bool pulled = windows && published_operands(c, r, epoch, kPhaseLowLatencyCombineWait, p);
      eo_of[r] = pulled ? reinterpret_cast<const __nv_bfloat16*>(p[0]) : nullptr;
      sr_of[r] = pulled ? reinterpret_cast<const int32_t*>(p[1]) : nullptr;
    }
    __syncthreads();
  }
  const RowSplit split(s.T, kMaxParts);
  const int per = ((units + split.parts - 1) / split.parts + 31) / 32 * 32;  // units of a piece
  const int u_lo = split.part * per, u_hi = min(units, u_lo + per);
  const size_t rows = static_cast<size_t>(s.El) * c.nranks * s.M;  // of a rank's expert_out
  for (int t = split.first; t < s.T; t += split.slots) {
    // Lane k finds slot k's row once (one or two dependent loads); every lane
    // gets all K by shuffles.
    const int sp = route_token(a.topk_idx + static_cast<size_t>(t) * s.K, s.K, s.E, s.El, s.Kl).sp;
    const float w_l = lane < s.K ? a.weights[t * s.K + lane] : 0.f;
    const int4* row_l = nullptr;  // null: no slot
    if (sp >= 0) {
      const int r = sp / s.Kl, i = sp % s.Kl;
      if constexpr (kLocal) {
        const int ref = a.src_rows[t * s.Kl + i];
        if (ref >= 0)
          row_l = reinterpret_cast<const int4*>(static_cast<const __nv_bfloat16*>(a.expert_out) +
                                                static_cast<size_t>(ref) * s.H);
      } else if (sr_of[r] != nullptr) {
        const int ref = __ldcg(sr_of[r] + (static_cast<size_t>(c.rank) * s.M + t) * s.Kl + i);
        if (ref >= 0 && static_cast<size_t>(ref) < rows)  // never past r's expert_out
          row_l = reinterpret_cast<const int4*>(eo_of[r] + static_cast<size_t>(ref) * s.H);
      } else {
        row_l = reinterpret_cast<const int4*>(ll_comb_slot(c, s, c.rank, r, t, i, epoch));
      }
    }
    const int4* row[kMaxK];
    float w[kMaxK];
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      row[k] = reinterpret_cast<const int4*>(
          __shfl_sync(0xffffffffu, static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(row_l)), k));
      w[k] = __shfl_sync(0xffffffffu, w_l, k);
    }
    __nv_bfloat16* y = static_cast<__nv_bfloat16*>(a.y) + static_cast<size_t>(t) * s.H;
    if constexpr (kMaxK <= 8) {
      for (int u = u_lo + lane; u < u_hi; u += 64) {
        const bool two = u + 32 < u_hi;
        int4 r0[kMaxK], r1[kMaxK];
#pragma unroll
        for (int k = 0; k < kMaxK; ++k) {
          if (row[k] == nullptr) continue;
          r0[k] = __ldcg(row[k] + u);
          if (two) r1[k] = __ldcg(row[k] + u + 32);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (h == 1 && !two) break;
          float acc[kUnit];
#pragma unroll
          for (int j = 0; j < kUnit; ++j) acc[j] = -0.f;  // the additive identity
#pragma unroll
          for (int k = 0; k < kMaxK; ++k) {  // top-k order
            if (row[k] == nullptr) continue;
            float v[kUnit];
            Vec<__nv_bfloat16>::load(h == 0 ? r0[k] : r1[k], v);
#pragma unroll
            for (int j = 0; j < kUnit; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(w[k], v[j]));
          }
          store_unit(y + (u + 32 * h) * kUnit, acc);
        }
      }
    } else
    for (int u = u_lo + lane; u < u_hi; u += 32) {
      float acc[kUnit];
#pragma unroll
      for (int j = 0; j < kUnit; ++j) acc[j] = -0.f;  // the additive identity
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) {  // top-k order
        if (row[k] == nullptr) continue;
        float v[kUnit];
        Vec<__nv_bfloat16>::load(__ldcg(row[k] + u), v);
#pragma unroll
        for (int j = 0; j < kUnit; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(w[k], v[j]));
      }
      store_unit(y + u * kUnit, acc);
    }
  }
  if constexpr (kLocal) {
    close_call(c, c.control + kCtlDoneRecv, epoch, a.epoch_out);
  } else if (windows) {  // every rank is told this one is done reading; a rank that published waits for all
    close_call_released(c, c.control + kCtlDoneRecv, epoch, a.epoch_out, sr_of[c.rank] != nullptr);
  } else {
    close_call(c, c.control + kCtlDoneRecv, epoch, a.epoch_out);
  }
}

template <typename F, typename A>
cudaError_t launch(F kernel, int grid, cudaStream_t stream, const A& args, size_t smem = 0) {
  kernel<<<grid, kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

// Every block keeps its own copy of topk_idx in shared memory when it fits
// kIdsSmem (T * K ints), for the routing's many reads, and after it the ranks'
// chunk table (stage_rank_prefix) when both fit the 48 KB a block has without
// opting in.
size_t ids_smem_bytes(const LowLatencyShape& s) {
  const size_t ids = static_cast<size_t>(s.T) * s.K * sizeof(int32_t);
  if (ids > kIdsSmem) return 0;
  const size_t both = ids + static_cast<size_t>(rank_chunks(s.T)) * s.E * sizeof(int);
  return both <= kRankSmem ? both : ids;
}

// Zero `rows` rows of a dispatch output (FP8 or BF16 data, and the FP8 scales).
cudaError_t zero_rows(void* x, float* scales, size_t rows, const LowLatencyShape& s, cudaStream_t stream) {
  cudaError_t e = cudaMemsetAsync(x, 0, rows * (s.fp8 ? 1 : 2) * s.H, stream);
  if (e == cudaSuccess && scales != nullptr) e = cudaMemsetAsync(scales, 0, rows * (s.H / 128) * sizeof(float), stream);
  return e;
}

#ifdef JAX_EP_WITH_NVSHMEM
constexpr bool kNvshmemBuilt = true;
#else
constexpr bool kNvshmemBuilt = false;
#endif

// A send kernel in the build of the Buffer's transport (NVSHMEM Buffers cannot be
// made without NVSHMEM in the build; the check only keeps a stray call safe).
template <typename A>
cudaError_t launch_send(void (*peer)(A), void (*shmem)(A), const A& a, cudaStream_t stream, size_t smem = 0,
                        int peer_grid = 0) {
  if (a.c.transport != kTransportNvshmem) return launch(peer, peer_grid > 0 ? peer_grid : a.num_sms, stream, a, smem);
  if (!kNvshmemBuilt) return cudaErrorNotSupported;
  return launch(shmem, a.num_sms, stream, a, smem);
}

}  // namespace

cudaError_t launch_ll_dispatch_send(const LLDispatchSendArgs& a, cudaStream_t stream) {
  if (a.s.K <= 8)
    return launch_send(ll_dispatch_send_kernel<false, false, 8>, ll_dispatch_send_kernel<true, false, 8>, a,
                       stream, ids_smem_bytes(a.s));
  return launch_send(ll_dispatch_send_kernel<false, false, kMaxTopK>, ll_dispatch_send_kernel<true, false, kMaxTopK>,
                     a, stream, ids_smem_bytes(a.s));
}

cudaError_t launch_ll_dispatch_local(const LLDispatchSendArgs& a, cudaStream_t stream) {
  // the kernel writes every src_rows entry
  if (a.zero_padding) {
    if (const cudaError_t e = zero_rows(a.out_x, a.out_scales, static_cast<size_t>(a.s.El) * a.s.M, a.s, stream);
        e != cudaSuccess)
      return e;
  }
  return launch(a.s.K <= 8 ? ll_dispatch_send_kernel<false, true, 8> : ll_dispatch_send_kernel<false, true, kMaxTopK>,
                a.num_sms, stream, a, ids_smem_bytes(a.s));
}

cudaError_t launch_ll_dispatch_recv(const LLDispatchRecvArgs& a, cudaStream_t stream) {
  const size_t n = static_cast<size_t>(a.c.nranks) * a.s.M * a.s.Kl * sizeof(int32_t);
  cudaError_t e = cudaMemsetAsync(a.src_rows, 0xff, n, stream);  // -1: no row
  // Rows past each expert's count are zero (DESIGN 3.2) unless the caller let
  // them be anything; the kernel fills the rest.
  if (e == cudaSuccess && a.zero_padding)
    e = zero_rows(a.out_x, a.out_scales, static_cast<size_t>(a.s.El) * a.c.nranks * a.s.M, a.s, stream);
  if (e != cudaSuccess) return e;
  return launch(a.c.transport == kTransportNvshmem ? ll_dispatch_recv_kernel<false> : ll_dispatch_recv_kernel<true>,
                a.num_sms, stream, a);
}

cudaError_t launch_ll_combine_send(const LLCombineSendArgs& a, cudaStream_t stream) {
  return launch_send(ll_combine_send_kernel<false>, ll_combine_send_kernel<true>, a, stream, 0, a.pull ? 1 : 0);
}

cudaError_t launch_ll_combine_recv(const LLCombineRecvArgs& a, cudaStream_t stream) {
  return launch(a.s.K > 8 ? ll_combine_recv_kernel<false, kMaxTopK> : ll_combine_recv_kernel<false, 8>,
                a.num_sms, stream, a);
}

cudaError_t launch_ll_combine_local(const LLCombineRecvArgs& a, cudaStream_t stream) {
  return launch(a.s.K > 8 ? ll_combine_recv_kernel<true, kMaxTopK> : ll_combine_recv_kernel<true, 8>,
                a.num_sms, stream, a);
}

}  // namespace jax_ep
