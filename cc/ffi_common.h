// Helpers shared by the FFI handler files: buffer lookup, errors, counters.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/normal.h"
#include "runtime.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ep {

// Count a handler invocation, and whether XLA was recording a CUDA graph
// (command buffers replay the recording without calling the handler again).
void count_call(cudaStream_t stream);

// The state of a connected Buffer, or an error that says how to make one.
xla::ffi::Error state_for(int64_t buffer_id, int32_t device, BufferState** out);

bool to_dtype(xla::ffi::DataType t, DType* out);

inline xla::ffi::Error from_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return xla::ffi::Error::Success();
  return xla::ffi::Error::Internal(std::string("jax_ep: ") + what + ": " + cudaGetErrorString(e));
}

template <typename B>
int64_t dim(const B& b, int i) {
  return b.dimensions()[i];
}

inline int clamp_sms(int64_t n) { return static_cast<int>(std::max<int64_t>(1, n)); }

}  // namespace jax_ep
