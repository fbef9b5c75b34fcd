// Helpers shared by the FFI handler files: buffer lookup, errors, counters.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "kernels/normal.h"
#include "runtime.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ep {

// Count a handler invocation, and whether XLA was recording a CUDA graph
// (command buffers replay the recording without calling the handler again).
void count_call(cudaStream_t stream);

// The state of a connected Buffer, or an error that says how to make one.
// The Buffer of a call; `needs_pointers`: the kernels store through a pointer to
// every rank's memory (normal mode), which NVSHMEM Buffers across nodes lack.
xla::ffi::Error state_for(int64_t buffer_id, int32_t device, BufferState** out,
                          bool needs_pointers = true);

bool to_dtype(xla::ffi::DataType t, DType* out);

inline xla::ffi::Error from_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return xla::ffi::Error::Success();
  return xla::ffi::Error::Internal(std::string("jax_ep: ") + what + ": " + cudaGetErrorString(e));
}

template <typename B>
int64_t dim(const B& b, int i) {
  return b.dimensions()[i];
}

// The operations a call signature names.
enum class Op : uint32_t { kDispatch = 1, kCombine = 2, kRedispatch = 3, kLLDispatch = 4, kLLCombine = 5,
                          kAllReduce = 6 };

// A digest (FNV-1a) of what a call is: the operation and every size that must
// agree across ranks. It travels with the call's signals, so a peer that
// made a different call is caught before its data is used.
inline uint32_t call_signature(Op op, std::initializer_list<int64_t> fields) {
  uint32_t h = 2166136261u;
  auto mix = [&h](uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= static_cast<uint32_t>((v >> (8 * i)) & 0xffu);
      h *= 16777619u;
    }
  };
  mix(static_cast<uint64_t>(op));
  for (int64_t f : fields) mix(static_cast<uint64_t>(f));
  return h;
}

// Every handler starts from the CUDA stream XLA gives it and its device.
inline auto bind_on_stream() {
  return xla::ffi::Ffi::Bind()
      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
      .Ctx<xla::ffi::DeviceOrdinal>();
}

inline int clamp_sms(int64_t n) { return static_cast<int>(std::max<int64_t>(1, n)); }

// The grid of a low-latency kernel: n blocks, or one per SM of `device` when n <= 0
// (no SM budget set: the process has the GPU to itself).
inline int ll_grid(int64_t n, int device) {
  if (n > 0) return static_cast<int>(n);
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  return std::max(1, sms);
}

}  // namespace jax_ep
