// FFI handler symbols of the normal mode (registered by module.cc).
#pragma once

#include <cstdint>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jax_ep {

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpCombine);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpRedispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpAllReduce);

// (handler calls, calls made while a CUDA graph was being recorded)
std::pair<uint64_t, uint64_t> capture_stats();

}  // namespace jax_ep
