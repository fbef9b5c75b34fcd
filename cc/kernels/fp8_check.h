// A check, on the GPU, that the FP8 quantizer's quotient (Fp8Divisor in
// rows.cuh) is the IEEE quotient that the xla backend computes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace jax_ep {

struct Fp8QuotientCheck {
  uint64_t pairs;     // (element, block scale) pairs compared
  uint64_t fp8;       // pairs whose e4m3 byte differs from that of the division
  uint64_t quotient;  // pairs whose float32 quotient differs where the division's is at least 2^-11
                      // (below, e4m3 flushes to zero, and the residual may leave the normal range)
};

// kind 0: every pair of BF16 values (x, amax) with |x| <= amax; 1: the same for
// FP16; 2: float32 samples, half near e4m3's rounding midpoints, half uniform
// in [-amax, amax]; 3: every float32 amax from kAmaxMin to the largest finite, the
// block scale against the division (pairs: values, quotient: scales that differ).
// Runs on the current device and waits for it.
cudaError_t fp8_quotient_check(int kind, bool round_scale, Fp8QuotientCheck* out);

}  // namespace jax_ep
