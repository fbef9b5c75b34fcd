// Normal-mode (training, prefill) kernels: launch arguments and launchers.
//
// Protocol of one dispatch on rank r (every rank makes the same calls):
//   stage   r copies its rows (quantized for FP8), ids and weights into the
//           half of its buffer picked by the call's epoch, then signals every
//           rank's inbox. Nothing waits here.
//   route   for each source s: wait for s's signal, read s's ids, and number
//           every (token, local expert) row within blocks of 512 tokens.
//   expand  prefix-sum the block counts into final row offsets, pull every
//           row once from s's staging and write it to each of its local
//           expert rows (the XLA output), zero the padding, close the call.
// With windows (DispatchArgs::pull) `stage` copies nothing: it publishes where
// x, its scales, ids and weights are, the receivers read them in place, and s
// holds its call open until every rank has read them (the same for combine).
// Combine mirrors it: `send` reduces each (token, source) over local experts
// and pushes the partial into the source's buffer, then signals; `recv`
// waits for every rank and sums the partials in rank order. With windows
// (CombineArgs::pull) `send` only publishes where its expert rows are, and
// `recv` reads them in place, making each rank's partial itself in the same
// order; a rank then holds its call open until every rank has read its rows. With one rank
// both directions run in one pass over the XLA buffers, with no staging.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "runtime_types.h"

namespace jax_ep {

enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

enum OutKind : int {
  kOutSame = 0,     // rows in the input dtype
  kOutFp8 = 1,      // e4m3 data + float32 scales
  kOutDequant = 2,  // FP8 on the wire, dequantized to out_dtype on arrival
};

constexpr int kMaxTopK = 16;
constexpr int kRouteChunk = 512;  // tokens numbered per route block

struct NormalShape {
  int T, H, K, E, El, Kr, C, Tmax;
  int tokens_layout;  // 0: experts layout, 1: tokens layout
};

struct DispatchArgs {
  CallCtx c;
  NormalShape s;
  DType in_dtype;
  DType out_dtype;  // for kOutDequant
  int out_kind;
  int num_sms;
  const void* x;          // [T, H] in in_dtype, or FP8 e4m3 data when x_scales is set
  const float* x_scales;  // [T, H/128]: x is already quantized (an Fp8Array), else null
  const int32_t* idx;  // row ids (experts layout) or kept ids (tokens layout)
  const float* w;
  void* out_x;
  float* out_scales;
  float* out_w;
  int32_t* out_topk;
  int32_t* group_sizes;
  int32_t* num_overflow;
  int32_t* src_rows;
  int32_t* num_rows;
  int32_t* epoch_out;
  // The receivers read x (and x_scales), idx and w here, through their windows,
  // instead of this rank staging copies (CallCtx::window, every one of them in
  // this rank's window, and no quantization in the call).
  bool pull;
};

struct CombineArgs {
  CallCtx c;
  NormalShape s;
  DType dtype;
  int num_sms;
  const void* expert_out;
  const float* weights;   // [C] or null
  const float* row_vals;  // [C] / [C, K] or null
  const int32_t* src_rows;
  const int32_t* dst_mask;
  const int32_t* slot_pos;
  void* y;
  float* slot_vals;  // [T, K] or null
  int32_t* epoch_out;
  // The receivers read expert_out (with weights, row_vals and src_rows) here,
  // through their windows, instead of this rank pushing partial sums to them
  // (CallCtx::window, and every one of those buffers lies in this rank's window).
  bool pull;
};

struct RedispatchArgs {
  CallCtx c;
  NormalShape s;
  DType dtype;
  int num_sms;
  const void* y;
  const int32_t* src_rows;
  const int32_t* dst_mask;
  const int32_t* num_rows;
  void* rows;
  int32_t* epoch_out;
};

// y = the sum over the group's ranks of x (float32, n a multiple of 4), added in
// rank order: each rank stages x in its buffer and signals; every rank then reads
// all stagings. Every rank waits for every other, so the epoch halves keep
// consecutive calls apart as in dispatch.
struct AllReduceArgs {
  CallCtx c;
  int num_sms;
  int64_t n;
  const float* x;
  float* y;
  int32_t* epoch_out;
};

// Each returns the first CUDA error of its launches.
cudaError_t launch_dispatch(const DispatchArgs& a, cudaStream_t stream);
cudaError_t launch_combine(const CombineArgs& a, cudaStream_t stream);
cudaError_t launch_redispatch(const RedispatchArgs& a, cudaStream_t stream);
cudaError_t launch_all_reduce(const AllReduceArgs& a, cudaStream_t stream);

}  // namespace jax_ep
