#include "ffi_common.h"

#include <atomic>

#include "ffi_normal.h"

namespace jax_ep {

namespace ffi = xla::ffi;

namespace {
std::atomic<uint64_t> g_calls{0}, g_captured{0};
}  // namespace

void count_call(cudaStream_t stream) {
  g_calls.fetch_add(1, std::memory_order_relaxed);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) == cudaSuccess && status == cudaStreamCaptureStatusActive)
    g_captured.fetch_add(1, std::memory_order_relaxed);
}

std::pair<uint64_t, uint64_t> capture_stats() { return {g_calls.load(), g_captured.load()}; }

ffi::Error state_for(int64_t buffer_id, int32_t device, BufferState** out, bool needs_pointers) {
  *out = find_state(static_cast<uint64_t>(buffer_id), device);
  if (*out == nullptr)
    return ffi::Error::InvalidArgument(
        "jax_ep: no Buffer with id " + std::to_string(buffer_id) + " on CUDA device " +
        std::to_string(device) + " in this process; create jax_ep.Buffer before running");
  if (!(*out)->connected())
    return ffi::Error::InvalidArgument("jax_ep: the Buffer is not connected to its peers");
  int missing = -1;
  if (needs_pointers && !(*out)->maps_every_rank(&missing))
    return ffi::Error::InvalidArgument(
        "jax_ep: normal mode stores to every rank's memory, and rank " + std::to_string(missing) +
        " of this NVSHMEM Buffer is reachable by puts only (another node); give the Buffer "
        "num_nodes (or run under the launcher's --nodes) so normal mode runs the internode "
        "protocol, or use the low-latency calls");
  return ffi::Error::Success();
}

bool to_dtype(ffi::DataType t, DType* out) {
  switch (t) {
    case ffi::DataType::F32: *out = DType::kF32; return true;
    case ffi::DataType::BF16: *out = DType::kBF16; return true;
    case ffi::DataType::F16: *out = DType::kF16; return true;
    default: return false;
  }
}

}  // namespace jax_ep
