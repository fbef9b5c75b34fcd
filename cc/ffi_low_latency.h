// FFI handler symbols of the low-latency mode (registered by module.cc).
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jax_ep {

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLDispatchSend);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLDispatchRecv);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLCombineSend);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLCombineRecv);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLDispatchLocal);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLLCombineLocal);

}  // namespace jax_ep
