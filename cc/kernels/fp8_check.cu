// fp8_quotient_check (fp8_check.h): Fp8Divisor::quotient against __fdiv_rn.
#include <cuda_fp16.h>

#include "kernels/fp8_check.h"
#include "kernels/rows.cuh"

namespace jax_ep {
namespace {

constexpr int kCheckThreads = 256;

struct Tally {
  unsigned long long pairs = 0, fp8 = 0, quotient = 0;

  __device__ void add(float x, const Fp8Divisor& d) {
    const float q = d.quotient(x), want = __fdiv_rn(x, d.scale);
    ++pairs;
    fp8 += to_e4m3(q) != to_e4m3(want);
    quotient += __float_as_uint(q) != __float_as_uint(want) && fabsf(want) >= 0x1p-11f;
  }
  __device__ void flush(unsigned long long* out) const {
    atomicAdd(out + 0, pairs);
    atomicAdd(out + 1, fp8);
    atomicAdd(out + 2, quotient);
  }
};

template <bool kBf16>
__device__ __forceinline__ float decode16(uint32_t bits) {
  if constexpr (kBf16) return __uint_as_float(bits << 16);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

// Block b: the block maximum with bits b (every finite non-negative value);
// the threads walk every 16-bit x with |x| <= amax.
template <bool kBf16>
__global__ void __launch_bounds__(kCheckThreads) pairs16_kernel(bool round_scale, unsigned long long* out) {
  const float amax = decode16<kBf16>(blockIdx.x);
  const Fp8Divisor d(fp8_scale(amax, round_scale));
  Tally tally;
  for (uint32_t b = threadIdx.x; b < 65536u; b += blockDim.x) {
    const float x = decode16<kBf16>(b);
    if (fabsf(x) <= amax) tally.add(x, d);  // NaN and inf never
  }
  tally.flush(out);
}

__device__ __forceinline__ uint64_t mix(uint64_t z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// float32 samples: each thread draws block maxima over 2^-40 .. 2^40 and, per
// maximum, dividends whose quotient lies within a few ulps of a midpoint
// between two e4m3 values (where a wrong last bit would change the byte), and
// uniform ones.
constexpr int kPerThread = 1024;
__global__ void __launch_bounds__(kCheckThreads) pairs32_kernel(bool round_scale, unsigned long long* out) {
  const uint64_t tid = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  Tally tally;
  for (int i = 0; i < kPerThread; ++i) {
    const uint64_t h = mix(tid * kPerThread + i + 0x9e3779b97f4a7c15ull), g = mix(h);
    const uint32_t exp = 87u + static_cast<uint32_t>(h % 81u);  // 2^-40 .. 2^40
    const float amax = __uint_as_float((exp << 23) | static_cast<uint32_t>((h >> 8) & 0x7FFFFFu));
    const Fp8Divisor d(fp8_scale(amax, round_scale));
    const float sign = (g & 1) ? -1.0f : 1.0f;
    float x;
    if ((h >> 40) & 1) {
      const uint8_t m = static_cast<uint8_t>((g >> 8) % 0x7Eu);  // 0 .. 447 and its successor
      const float mid = 0.5f * (from_e4m3(m) + from_e4m3(static_cast<uint8_t>(m + 1)));
      const int dq = static_cast<int>((g >> 16) % 7u) - 3, dx = static_cast<int>((g >> 24) % 5u) - 2;
      const float qt = __uint_as_float(__float_as_uint(mid) + dq);
      x = __uint_as_float(__float_as_uint(__fmul_rn(qt, d.scale)) + dx);
    } else {
      x = __fmul_rn(amax, static_cast<float>((g >> 40) & 0xFFFFFF) * 0x1p-24f);
    }
    x *= sign;
    if (fabsf(x) <= amax) tally.add(x, d);
  }
  tally.flush(out);
}

// Every float32 amax from kAmaxMin to the largest finite: fp8_scale against the
// division (pairs: values; quotient: scales whose bits differ).
__global__ void __launch_bounds__(kCheckThreads) scale_kernel(bool round_scale, unsigned long long* out) {
  const uint32_t lo = __float_as_uint(kAmaxMin), hi = 0x7F7FFFFFu;
  unsigned long long n = 0, bad = 0;
  for (uint64_t b = lo + static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b <= hi;
       b += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const float amax = __uint_as_float(static_cast<uint32_t>(b));
    const float want = __fdiv_rn(amax, kFp8Max);
    const float got = fp8_scale(amax, round_scale);
    ++n;
    bad += __float_as_uint(got) != __float_as_uint(round_scale ? round_pow2(want) : want);
  }
  atomicAdd(out + 0, n);
  atomicAdd(out + 2, bad);
}

}  // namespace

cudaError_t fp8_quotient_check(int kind, bool round_scale, Fp8QuotientCheck* out) {
  unsigned long long* dev = nullptr;
  cudaError_t e = cudaMalloc(&dev, 3 * sizeof(unsigned long long));
  if (e != cudaSuccess) return e;
  e = cudaMemset(dev, 0, 3 * sizeof(unsigned long long));
  if (e == cudaSuccess) {
    if (kind == 0)
      pairs16_kernel<true><<<0x7F80, kCheckThreads>>>(round_scale, dev);  // up to +inf
    else if (kind == 1)
      pairs16_kernel<false><<<0x7C00, kCheckThreads>>>(round_scale, dev);
    else if (kind == 2)
      pairs32_kernel<<<4096, kCheckThreads>>>(round_scale, dev);
    else
      scale_kernel<<<4096, kCheckThreads>>>(round_scale, dev);
    e = cudaGetLastError();
  }
  unsigned long long host[3] = {0, 0, 0};
  if (e == cudaSuccess) e = cudaMemcpy(host, dev, sizeof host, cudaMemcpyDeviceToHost);
  cudaFree(dev);
  *out = {host[0], host[1], host[2]};
  return e;
}

}  // namespace jax_ep
