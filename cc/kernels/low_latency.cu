// Low-latency dispatch and combine over peer pointers (protocol in low_latency.h).
#include "kernels/low_latency.h"
#include "kernels/rows.cuh"

namespace jax_ep {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kHeader = 16;  // {token, i, 0, 0}

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

__device__ __forceinline__ uint64_t* ll_count_word(const CallCtx& c, int owner, int el, int src) {
  return reinterpret_cast<uint64_t*>(c.peers.base[owner] + c.off.ll_count) + el * c.nranks + src;
}

// Slot (expert rank r, token t, i) of rank `owner`'s combine half: one BF16 row.
__device__ __forceinline__ __nv_bfloat16* ll_comb_slot(const CallCtx& c, const LowLatencyShape& s,
                                                       int owner, int r, int t, int i,
                                                       uint32_t epoch) {
  char* h = half_base(c, owner, epoch) + c.off.ll_comb;
  return reinterpret_cast<__nv_bfloat16*>(h) + ((static_cast<size_t>(r) * s.M + t) * s.Kl + i) * s.H;
}

// ------------------------------------------------------------ dispatch send

__global__ void __launch_bounds__(kThreads) ll_dispatch_send_kernel(LLDispatchSendArgs a) {
  const CallCtx& c = a.c;
  const LowLatencyShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  const int lane = lane_id(), units = s.H / kUnit;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(a.x);
  for (int t = blockIdx.x * kWarps + warp_id(); t < s.T; t += gridDim.x * kWarps) {
    // Where each row of this token goes: a message slot on its expert's rank.
    char* dst[kMaxTopK];
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) {
      char* d = nullptr;
      const int e = k < s.K ? a.row_idx[t * s.K + k] : -1;
      if (e >= 0) {
        d = ll_slot(c, s, e / s.El, e % s.El, c.rank, a.slot_rank[t * s.K + k], epoch);
        if (lane == 0) {
          const int sp = a.slot_pos[t * s.K + k];
          *reinterpret_cast<int4*>(d) = make_int4(t, sp % s.Kl, 0, 0);
        }
      }
      dst[k] = d;
    }
    const __nv_bfloat16* row = x + static_cast<size_t>(t) * s.H;
    for (int base = 0; base < units; base += 32) {
      const int u = base + lane;
      const bool active = u < units;
      float v[kUnit];
      if (active) load_unit(row + u * kUnit, v);
      if (s.fp8) {  // all lanes: the 16 lanes of a 128-channel block share its scale
        float scale;
        const uint2 q = quantize_unit<__nv_bfloat16>(v, active, s.round_scale, &scale);
        if (!active) continue;
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k) {
          if (dst[k] == nullptr) continue;
          reinterpret_cast<uint2*>(dst[k] + kHeader)[u] = q;
          if (u % kUnitsPerBlock == 0)
            reinterpret_cast<float*>(dst[k] + kHeader + s.H)[u / kUnitsPerBlock] = scale;
        }
      } else if (active) {
        const int4 raw = *reinterpret_cast<const int4*>(row + u * kUnit);
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k)
          if (dst[k] != nullptr) reinterpret_cast<int4*>(dst[k] + kHeader)[u] = raw;
      }
    }
  }
  // Publish the per-expert counts once every block's messages are visible.
  if (last_block_done(c.control + kCtlDoneSend)) {
    for (int e = threadIdx.x; e < s.E; e += blockDim.x) {
      const uint64_t word = (static_cast<uint64_t>(epoch) << 32) | count_low(a.counts[e], c.sig);
      st_release_sys64(ll_count_word(c, e / s.El, e % s.El, c.rank), word);
    }
    if (threadIdx.x == 0) *a.epoch_out = static_cast<int32_t>(epoch);
  }
}

// ------------------------------------------------------------ dispatch recv

// The count src published for expert el in epoch `want` (tag in the high
// half; the low half holds the count and 12 bits of the call's signature).
__device__ __forceinline__ uint32_t wait_count(const CallCtx& c, int el, int src, uint32_t want) {
  const uint64_t* p = ll_count_word(c, c.rank, el, src);
  const uint64_t word = wait_until<uint64_t>(
      c, kPhaseLowLatencyDispatchWait, src, want, [=] { return ld_acquire_sys64(p); },
      [](uint64_t w) { return static_cast<uint32_t>(w >> 32); });
  const uint32_t low = static_cast<uint32_t>(word);
  check_signature(c, kPhaseLowLatencyDispatchWait, src, static_cast<uint32_t>(word >> 32), want,
                  low >> kCountBits, c.sig & kCountSigMask);
  return low & ((1u << kCountBits) - 1);
}

__global__ void __launch_bounds__(kThreads) ll_dispatch_recv_kernel(LLDispatchRecvArgs a) {
  const CallCtx& c = a.c;
  const LowLatencyShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  const int R = c.nranks, lane = lane_id(), rows = R * s.M;
  const size_t row_bytes = s.fp8 ? static_cast<size_t>(s.H) : 2 * static_cast<size_t>(s.H);
  __shared__ int first[kMaxRanks + 1];  // first packed row of each source
  for (int el = blockIdx.x; el < s.El; el += gridDim.x) {
    if (threadIdx.x < R) first[threadIdx.x + 1] = static_cast<int>(wait_count(c, el, threadIdx.x, epoch));
    __syncthreads();
    if (threadIdx.x == 0) {
      first[0] = 0;
      for (int r = 0; r < R; ++r) first[r + 1] += first[r];
      a.count[el] = first[R];
    }
    __syncthreads();
    const int total = first[R];
    char* out = static_cast<char*>(a.out_x) + static_cast<size_t>(el) * rows * row_bytes;
    float* scales = s.fp8 ? a.out_scales + static_cast<size_t>(el) * rows * (s.H / 128) : nullptr;
    for (int p = warp_id(); p < rows; p += kWarps) {
      int4* dst = reinterpret_cast<int4*>(out + p * row_bytes);
      if (p >= total) {  // the rest of the expert is zero
        for (int j = lane; j < static_cast<int>(row_bytes / 16); j += 32) dst[j] = make_int4(0, 0, 0, 0);
        if (scales != nullptr)
          for (int j = lane; j < s.H / 128; j += 32) scales[static_cast<size_t>(p) * (s.H / 128) + j] = 0.f;
        continue;
      }
      int src = 0;
      while (first[src + 1] <= p) ++src;
      const char* msg = ll_slot(c, s, c.rank, el, src, p - first[src], epoch);
      const int4 head = __ldcg(reinterpret_cast<const int4*>(msg));
      const int4* body = reinterpret_cast<const int4*>(msg + kHeader);
      for (int j = lane; j < static_cast<int>(row_bytes / 16); j += 32) dst[j] = __ldcg(body + j);
      if (scales != nullptr) {
        const float* sc = reinterpret_cast<const float*>(msg + kHeader + s.H);
        for (int j = lane; j < s.H / 128; j += 32) scales[static_cast<size_t>(p) * (s.H / 128) + j] = __ldcg(sc + j);
      }
      if (lane == 0) a.src_rows[(static_cast<size_t>(src) * s.M + head.x) * s.Kl + head.y] = el * rows + p;
    }
    __syncthreads();
  }
  close_call(c, c.control + kCtlDoneRecv, epoch, a.epoch_out);
}

// ------------------------------------------------------------ combine send

__global__ void __launch_bounds__(kThreads) ll_combine_send_kernel(LLCombineSendArgs a) {
  const CallCtx& c = a.c;
  const LowLatencyShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  const int R = c.nranks, lane = lane_id(), units = s.H / kUnit;
  const __nv_bfloat16* eo = static_cast<const __nv_bfloat16*>(a.expert_out);
  for (int g = blockIdx.x * kWarps + warp_id(); g < R * s.M; g += gridDim.x * kWarps) {
    const int src = g / s.M, t = g % s.M;
    for (int i = 0; i < s.Kl; ++i) {
      const int row = a.src_rows[static_cast<size_t>(g) * s.Kl + i];
      if (row < 0) continue;
      const int4* from = reinterpret_cast<const int4*>(eo + static_cast<size_t>(row) * s.H);
      int4* to = reinterpret_cast<int4*>(ll_comb_slot(c, s, src, c.rank, t, i, epoch));
      for (int u = lane; u < units; u += 32) to[u] = __ldg(from + u);
    }
  }
  if (last_block_done(c.control + kCtlDoneSend) && threadIdx.x == 0) {
    signal_all(c, epoch);
    *a.epoch_out = static_cast<int32_t>(epoch);
  }
}

// ------------------------------------------------------------ combine recv

__global__ void __launch_bounds__(kThreads) ll_combine_recv_kernel(LLCombineRecvArgs a) {
  const CallCtx& c = a.c;
  const LowLatencyShape& s = a.s;
  const uint32_t epoch = current_epoch(c);
  const int lane = lane_id(), units = s.H / kUnit;
  wait_all(c, kPhaseLowLatencyCombineWait, epoch);
  for (int t = blockIdx.x * kWarps + warp_id(); t < s.T; t += gridDim.x * kWarps) {
    const int sp_l = lane < s.K ? a.slot_pos[t * s.K + lane] : -1;
    const float w_l = lane < s.K ? a.weights[t * s.K + lane] : 0.f;
    int sp[kMaxTopK];
    float w[kMaxTopK];
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) {
      sp[k] = __shfl_sync(0xffffffffu, sp_l, k);
      w[k] = __shfl_sync(0xffffffffu, w_l, k);
    }
    __nv_bfloat16* y = static_cast<__nv_bfloat16*>(a.y) + static_cast<size_t>(t) * s.H;
    for (int u = lane; u < units; u += 32) {
      float acc[kUnit];
#pragma unroll
      for (int j = 0; j < kUnit; ++j) acc[j] = -0.f;  // the additive identity
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k) {  // top-k order
        if (sp[k] < 0) continue;
        float v[kUnit];
        const __nv_bfloat16* slot = ll_comb_slot(c, s, c.rank, sp[k] / s.Kl, t, sp[k] % s.Kl, epoch);
        Vec<__nv_bfloat16>::load(__ldcg(reinterpret_cast<const int4*>(slot) + u), v);
#pragma unroll
        for (int j = 0; j < kUnit; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(w[k], v[j]));
      }
      store_unit(y + u * kUnit, acc);
    }
  }
  close_call(c, c.control + kCtlDoneRecv, epoch, a.epoch_out);
}

template <typename F, typename A>
cudaError_t launch(F kernel, int grid, cudaStream_t stream, const A& args) {
  kernel<<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_ll_dispatch_send(const LLDispatchSendArgs& a, cudaStream_t stream) {
  return launch(ll_dispatch_send_kernel, a.num_sms, stream, a);
}

cudaError_t launch_ll_dispatch_recv(const LLDispatchRecvArgs& a, cudaStream_t stream) {
  const size_t n = static_cast<size_t>(a.c.nranks) * a.s.M * a.s.Kl * sizeof(int32_t);
  cudaError_t e = cudaMemsetAsync(a.src_rows, 0xff, n, stream);  // -1: no row
  if (e != cudaSuccess) return e;
  return launch(ll_dispatch_recv_kernel, a.num_sms < a.s.El ? a.num_sms : a.s.El, stream, a);
}

cudaError_t launch_ll_combine_send(const LLCombineSendArgs& a, cudaStream_t stream) {
  return launch(ll_combine_send_kernel, a.num_sms, stream, a);
}

cudaError_t launch_ll_combine_recv(const LLCombineRecvArgs& a, cudaStream_t stream) {
  return launch(ll_combine_recv_kernel, a.num_sms, stream, a);
}

}  // namespace jax_ep
