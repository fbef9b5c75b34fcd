// Moving rows 8 elements (one "unit") per lane: raw copies, FP8 quantize and
// dequantize, float32 accumulation. A warp handles one row at a time.
#pragma once

#include "kernels/device.cuh"
#include "kernels/normal.h"

namespace jax_ep {

constexpr int kUnit = 8;             // elements per lane step
constexpr int kUnitsPerBlock = 16;   // 128-channel FP8 block = 16 units
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxMin = 1e-4f;

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }
// A grid's warps take items 0..n-1, `grab` (>= 1) at a time: kGrab where it is
// known when compiled, else the `grab` argument. Grab numbers come from
// `counter` (0 when the kernel starts; its last block sets it back), so a block
// that gets its SM late (other ranks' kernels sharing this GPU) leaves its share
// to the others; a fixed grid stride would hold that share back, and every
// rank's receive would wait for the last rank's signal. With `static_first`
// each warp's first grab is its own (its index in the grid) and only later ones
// are counted: no warp waits for an atomic before its first item, as it would
// behind a burst of them on one word in a large grid. (The caller chooses: the
// expand kernel sets it where the rank has its GPU alone.) Lane 0 asks for the
// next grab as the current one starts, so the answer is there when it ends.
template <int kGrab = 0, typename F>
__device__ __forceinline__ void for_each_handed_out(uint32_t* counter, int n, bool static_first, F&& item,
                                                    int grab = kGrab) {
  const int lane = lane_id(), warps = static_cast<int>(blockDim.x >> 5);
  const int grabs = (n + grab - 1) / grab;
  const int counted = static_first ? static_cast<int>(gridDim.x) * warps : 0;
  int next = lane == 0 ? counted + static_cast<int>(atomicAdd(counter, 1u)) : 0;
  int g = static_first ? static_cast<int>(blockIdx.x) * warps + warp_id() : __shfl_sync(0xffffffffu, next, 0);
  bool asked = static_first;  // the grab in `next` is not g
  while (g < grabs) {
    if (!asked && lane == 0) next = counted + static_cast<int>(atomicAdd(counter, 1u));
    asked = false;
    if constexpr (kGrab == 1) {
      item(g);
    } else {
      const int hi = min(g * grab + grab, n);
      for (int i = g * grab; i < hi; ++i) item(i);
    }
    g = __shfl_sync(0xffffffffu, next, 0);
  }
}

__device__ __forceinline__ uint32_t lanemask_lt() {
  uint32_t m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// 8 elements of T as floats, loaded/stored with 16-byte accesses.
template <typename T>
__device__ __forceinline__ void load_unit(const T* p, float* v) {
  constexpr int kVec = 16 / sizeof(T);
#pragma unroll
  for (int j = 0; j < kUnit / kVec; ++j)
    Vec<T>::load(__ldg(reinterpret_cast<const int4*>(p) + j), v + j * kVec);
}

template <typename T>
__device__ __forceinline__ void store_unit(T* p, const float* v) {
  constexpr int kVec = 16 / sizeof(T);
#pragma unroll
  for (int j = 0; j < kUnit / kVec; ++j)
    reinterpret_cast<int4*>(p)[j] = Vec<T>::store(v + j * kVec);
}

// Raw bytes of one unit (UB = 8 * element size). kCoherent loads go through
// L2 only; the default read-once loads may take the non-coherent path, which is
// safe for data released before the kernel started.
template <int UB, bool kCoherent = false>
struct RawUnit {
  int4 v[UB / 16];
  __device__ __forceinline__ void load(const char* p) {
#pragma unroll
    for (int j = 0; j < UB / 16; ++j) {
      const int4* q = reinterpret_cast<const int4*>(p) + j;
      v[j] = kCoherent ? __ldcg(q) : ld_stream(q);
    }
  }
  __device__ __forceinline__ void store(char* p) const {
#pragma unroll
    for (int j = 0; j < UB / 16; ++j) reinterpret_cast<int4*>(p)[j] = v[j];
  }
};

// x / scale rounded to nearest even, as an FP8 block's elements are divided by
// its scale, with one reciprocal per block: q0 = x * r (r the correctly rounded
// 1 / scale) is within an ulp of the quotient, and one step with the exact
// residual x - scale * q0 (an FMA) gives the correctly rounded quotient
// (Markstein's theorem) as long as quotient and residual stay in the normal
// range, which every quotient that e4m3 does not flush to zero does (the
// scale is at least kAmaxMin / kFp8Max). The sign is the dividend's also where
// the quotient is zero. A scale that is not finite (a block with an inf or a
// NaN) divides. fp8_quotient_check (fp8_check.cu) compares this with the
// division over every pair of BF16 and of FP16 values: the e4m3 bytes are all
// the same, and the float32 quotients differ only below 2^-11 (BF16 dividends
// near float32's smallest normals, whose residual is subnormal).
struct Fp8Divisor {
  float scale, r;
  bool fast;
  __device__ __forceinline__ explicit Fp8Divisor(float s) {
    scale = s;
    r = __frcp_rn(s);  // the correctly rounded 1 / s, as __fdiv_rn(1, s), in fewer steps
    fast = isfinite(s);
  }
  __device__ __forceinline__ float quotient(float x) const {
    if (!fast) return __fdiv_rn(x, scale);
    const float q0 = __fmul_rn(x, r);
    const float e = __fmaf_rn(-scale, q0, x);
    return copysignf(__fmaf_rn(e, r, q0), x);
  }
};

// The scale of a block whose largest magnitude is amax (NaN stays NaN): amax /
// kFp8Max rounded to nearest even. For a finite amax (at least kAmaxMin) one
// Markstein step from the rounded reciprocal gives that quotient: checked for
// every such float32 on the host (exact arithmetic where double rounding could
// hide a difference) and on the GPU by fp8_quotient_check (kind 3). inf and NaN divide.
constexpr float kRecipFp8Max = 0x1.24924ap-9f;  // 1 / 448 rounded to nearest
__device__ __forceinline__ float fp8_scale(float amax, bool round_scale) {
  if (amax < kAmaxMin) amax = kAmaxMin;  // NaN stays NaN
  float scale;
  if (amax <= 0x1.fffffep127f) {  // finite
    const float q0 = __fmul_rn(amax, kRecipFp8Max);
    scale = __fmaf_rn(__fmaf_rn(-kFp8Max, q0, amax), kRecipFp8Max, q0);
  } else {
    scale = __fdiv_rn(amax, kFp8Max);
  }
  return round_scale ? round_pow2(scale) : scale;
}

// Quantize one unit of a 128-channel block; the 16 lanes of a block share
// its scale through shuffles (all 32 lanes must call this together).
template <typename T>
__device__ __forceinline__ uint2 quantize_unit(const float* v, bool active, bool round_scale,
                                               float* scale_out) {
  float amax = 0.0f;
  if (active) {
#pragma unroll
    for (int i = 0; i < kUnit; ++i) amax = absmax_nan(amax, v[i]);
  }
#pragma unroll
  for (int off = 8; off >= 1; off >>= 1) amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const Fp8Divisor d(fp8_scale(amax, round_scale));
  *scale_out = d.scale;
  static_assert(kUnit == 8, "a unit packs into two 32-bit words");
  // element i in byte i, two conversions to a cvt
  uint32_t w[kUnit / 4];
#pragma unroll
  for (int h = 0; h < kUnit / 4; ++h)
    w[h] = to_e4m3x2(d.quotient(v[4 * h]), d.quotient(v[4 * h + 1])) |
           (to_e4m3x2(d.quotient(v[4 * h + 2]), d.quotient(v[4 * h + 3])) << 16);
  return make_uint2(w[0], w[1]);
}

__device__ __forceinline__ void dequantize_unit(uint2 q, float scale, float* v) {
  const uint8_t* b = reinterpret_cast<const uint8_t*>(&q);
#pragma unroll
  for (int i = 0; i < kUnit; ++i) v[i] = __fmul_rn(from_e4m3(b[i]), scale);
}

// Exclusive scan of n ints in shared memory by the whole block; returns the total.
__device__ inline int block_exclusive_scan(int* data, int n, int* warp_sums) {
  const int per = (n + blockDim.x - 1) / blockDim.x;
  const int lo = min(n, static_cast<int>(threadIdx.x) * per);
  const int hi = min(n, lo + per);
  int sum = 0;
  for (int i = lo; i < hi; ++i) sum += data[i];
  // inclusive scan of the per-thread sums: warps, then warp totals
  int incl = sum;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane_id() >= off) incl += o;
  }
  if (lane_id() == 31) warp_sums[warp_id()] = incl;
  __syncthreads();
  if (threadIdx.x < 32) {
    const int nw = blockDim.x / 32;
    int v = threadIdx.x < nw ? warp_sums[threadIdx.x] : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int o = __shfl_up_sync(0xffffffffu, v, off);
      if (lane_id() >= off) v += o;
    }
    if (threadIdx.x < nw) warp_sums[threadIdx.x] = v;  // inclusive warp totals
  }
  __syncthreads();
  int run = incl - sum + (warp_id() > 0 ? warp_sums[warp_id() - 1] : 0);
  for (int i = lo; i < hi; ++i) {
    const int v = data[i];
    data[i] = run;
    run += v;
  }
  const int total = warp_sums[blockDim.x / 32 - 1];
  __syncthreads();
  return total;
}

}  // namespace jax_ep
