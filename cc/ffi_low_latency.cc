// XLA FFI handlers of the low-latency mode: the send and recv halves of
// dispatch and combine. Like the normal mode, no per-call host state.
#include "ffi_low_latency.h"

#include "ffi_common.h"
#include "kernels/low_latency.h"

namespace jax_ep {
namespace {

namespace ffi = xla::ffi;

ffi::Error setup(Op op, cudaStream_t stream, int32_t device, int64_t buffer_id, int64_t num_experts,
                 int64_t max_tokens, int64_t fp8, int64_t round_scale, int T, int H, int K,
                 BufferState** st, CallCtx* c, LowLatencyShape* s) {
  count_call(stream);
  if (auto err = state_for(buffer_id, device, st, false); err.failure()) return err;
  if (max_tokens > (*st)->max_tokens())
    return ffi::Error::InvalidArgument("jax_ep: max_tokens_per_rank exceeds the Buffer's");
  if (max_tokens >= (1 << 20))
    return ffi::Error::InvalidArgument("jax_ep: max_tokens_per_rank must be below 2**20");
  *c = (*st)->ctx();
  // Both halves of a call compute the same signature from what they both know.
  c->sig = call_signature(op, {max_tokens, H, num_experts, fp8, round_scale});
  s->T = T;
  s->H = H;
  s->K = K;
  s->E = static_cast<int>(num_experts);
  s->El = s->E / c->nranks;
  s->Kl = std::min(K, s->El);
  s->M = static_cast<int>(max_tokens);
  s->fp8 = static_cast<int>(fp8);
  s->round_scale = static_cast<int>(round_scale);
  return ffi::Error::Success();
}

ffi::Error DispatchSendImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::BF16> x,
                            ffi::Buffer<ffi::S32> topk_idx, ffi::Result<ffi::Buffer<ffi::S32>> slot_pos,
                            ffi::Result<ffi::Buffer<ffi::S32>> counts,
                            ffi::Result<ffi::Buffer<ffi::S32>> epoch, int64_t buffer_id,
                            int64_t num_experts, int64_t max_tokens, int64_t fp8,
                            int64_t round_scale, int64_t num_sms) {
  LLDispatchSendArgs a{};
  BufferState* st;
  if (auto err = setup(Op::kLLDispatch, stream, device, buffer_id, num_experts, max_tokens, fp8,
                       round_scale, static_cast<int>(dim(x, 0)), static_cast<int>(dim(x, 1)),
                       static_cast<int>(dim(topk_idx, 1)), &st, &a.c, &a.s);
      err.failure())
    return err;
  a.num_sms = ll_grid(num_sms, device);
  a.x = x.typed_data();
  a.topk_idx = topk_idx.typed_data();
  a.slot_pos_out = slot_pos->typed_data();
  a.count_out = counts->typed_data();
  a.epoch_out = epoch->typed_data();
  return from_cuda(launch_ll_dispatch_send(a, stream), "low-latency dispatch send");
}

ffi::Error DispatchRecvImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::S32> epoch_in,
                            ffi::Result<ffi::AnyBuffer> out_x,
                            ffi::Result<ffi::Buffer<ffi::F32>> out_scales,
                            ffi::Result<ffi::Buffer<ffi::S32>> count,
                            ffi::Result<ffi::Buffer<ffi::S32>> src_rows,
                            ffi::Result<ffi::Buffer<ffi::S32>> epoch, int64_t buffer_id,
                            int64_t num_experts, int64_t max_tokens, int64_t fp8,
                            int64_t round_scale, int64_t num_sms, int64_t zero_padding) {
  LLDispatchRecvArgs a{};
  BufferState* st;
  const int H = static_cast<int>(dim(*out_x, 2));
  const int K = static_cast<int>(dim(*src_rows, 2));  // Kl; K itself is not needed here
  if (auto err = setup(Op::kLLDispatch, stream, device, buffer_id, num_experts, max_tokens, fp8,
                       round_scale, static_cast<int>(max_tokens), H, K, &st, &a.c, &a.s);
      err.failure())
    return err;
  a.s.Kl = K;
  a.num_sms = ll_grid(num_sms, device);
  a.out_x = out_x->untyped_data();
  a.out_scales = fp8 ? out_scales->typed_data() : nullptr;
  a.count = count->typed_data();
  a.src_rows = src_rows->typed_data();
  a.epoch_out = epoch->typed_data();
  a.zero_padding = zero_padding != 0;
  return from_cuda(launch_ll_dispatch_recv(a, stream), "low-latency dispatch recv");
}

ffi::Error CombineSendImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::BF16> expert_out,
                           ffi::Buffer<ffi::S32> src_rows, ffi::Buffer<ffi::S32> epoch_in,
                           ffi::Result<ffi::Buffer<ffi::S32>> epoch, int64_t buffer_id,
                           int64_t num_experts, int64_t max_tokens, int64_t num_sms) {
  LLCombineSendArgs a{};
  BufferState* st;
  const int K = static_cast<int>(dim(src_rows, 2));
  if (auto err = setup(Op::kLLCombine, stream, device, buffer_id, num_experts, max_tokens, 0, 0,
                       static_cast<int>(max_tokens), static_cast<int>(dim(expert_out, 2)), K, &st,
                       &a.c, &a.s);
      err.failure())
    return err;
  a.s.Kl = K;
  a.num_sms = ll_grid(num_sms, device);
  a.expert_out = expert_out.typed_data();
  a.src_rows = src_rows.typed_data();
  a.epoch_out = epoch->typed_data();
  // The sources read the rows in place where every rank maps every other's XLA
  // memory (the receive keeps both operands alive until all have read them).
  a.pull = a.c.transport == kTransportPeer && st->window_on() &&
           st->in_window(a.expert_out, expert_out.size_bytes()) && st->in_window(a.src_rows, src_rows.size_bytes());
  return from_cuda(launch_ll_combine_send(a, stream), "low-latency combine send");
}

ffi::Error CombineRecvImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::S32> epoch_in,
                           ffi::Buffer<ffi::BF16> expert_out, ffi::Buffer<ffi::S32> src_rows,
                           ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> weights,
                           ffi::Result<ffi::Buffer<ffi::BF16>> y,
                           ffi::Result<ffi::Buffer<ffi::S32>> epoch, int64_t buffer_id,
                           int64_t num_experts, int64_t max_tokens, int64_t num_sms) {
  LLCombineRecvArgs a{};
  BufferState* st;
  if (auto err = setup(Op::kLLCombine, stream, device, buffer_id, num_experts, max_tokens, 0, 0,
                       static_cast<int>(dim(topk_idx, 0)), static_cast<int>(dim(*y, 1)),
                       static_cast<int>(dim(topk_idx, 1)), &st, &a.c, &a.s);
      err.failure())
    return err;
  a.num_sms = ll_grid(num_sms, device);
  a.topk_idx = topk_idx.typed_data();
  a.weights = weights.typed_data();
  a.y = y->typed_data();
  a.epoch_out = epoch->typed_data();
  a.expert_out = expert_out.typed_data();
  a.src_rows = src_rows.typed_data();
  return from_cuda(launch_ll_combine_recv(a, stream), "low-latency combine recv");
}

// One rank: the whole dispatch in one kernel, routing included, writing the
// receive's outputs and the handle's slot_pos.
ffi::Error DispatchLocalImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::BF16> x,
                             ffi::Buffer<ffi::S32> topk_idx, ffi::Result<ffi::AnyBuffer> out_x,
                             ffi::Result<ffi::Buffer<ffi::F32>> out_scales,
                             ffi::Result<ffi::Buffer<ffi::S32>> count,
                             ffi::Result<ffi::Buffer<ffi::S32>> src_rows,
                             ffi::Result<ffi::Buffer<ffi::S32>> slot_pos,
                             ffi::Result<ffi::Buffer<ffi::S32>> epoch, int64_t buffer_id,
                             int64_t num_experts, int64_t max_tokens, int64_t fp8,
                             int64_t round_scale, int64_t num_sms, int64_t zero_padding) {
  LLDispatchSendArgs a{};
  BufferState* st;
  if (auto err = setup(Op::kLLDispatch, stream, device, buffer_id, num_experts, max_tokens, fp8,
                       round_scale, static_cast<int>(dim(x, 0)), static_cast<int>(dim(x, 1)),
                       static_cast<int>(dim(topk_idx, 1)), &st, &a.c, &a.s);
      err.failure())
    return err;
  if (a.c.nranks != 1)
    return ffi::Error::InvalidArgument("jax_ep: the one-rank dispatch runs on a one-rank Buffer only");
  a.num_sms = ll_grid(num_sms, device);
  a.x = x.typed_data();
  a.topk_idx = topk_idx.typed_data();
  a.out_x = out_x->untyped_data();
  a.out_scales = fp8 ? out_scales->typed_data() : nullptr;
  a.count_out = count->typed_data();
  a.src_rows = src_rows->typed_data();
  a.slot_pos_out = slot_pos->typed_data();
  a.epoch_out = epoch->typed_data();
  a.zero_padding = zero_padding != 0;
  return from_cuda(launch_ll_dispatch_local(a, stream), "low-latency dispatch (one rank)");
}

// One rank: the whole combine in one kernel, reading expert_out in place.
ffi::Error CombineLocalImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::BF16> expert_out,
                            ffi::Buffer<ffi::S32> src_rows, ffi::Buffer<ffi::S32> epoch_in,
                            ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> weights,
                            ffi::Result<ffi::Buffer<ffi::BF16>> y,
                            ffi::Result<ffi::Buffer<ffi::S32>> epoch, int64_t buffer_id,
                            int64_t num_experts, int64_t max_tokens, int64_t num_sms) {
  LLCombineRecvArgs a{};
  BufferState* st;
  if (auto err = setup(Op::kLLCombine, stream, device, buffer_id, num_experts, max_tokens, 0, 0,
                       static_cast<int>(dim(topk_idx, 0)), static_cast<int>(dim(*y, 1)),
                       static_cast<int>(dim(topk_idx, 1)), &st, &a.c, &a.s);
      err.failure())
    return err;
  if (a.c.nranks != 1)
    return ffi::Error::InvalidArgument("jax_ep: the one-rank combine runs on a one-rank Buffer only");
  a.s.Kl = static_cast<int>(dim(src_rows, 2));
  a.num_sms = ll_grid(num_sms, device);
  a.expert_out = expert_out.typed_data();
  a.src_rows = src_rows.typed_data();
  a.topk_idx = topk_idx.typed_data();
  a.weights = weights.typed_data();
  a.y = y->typed_data();
  a.epoch_out = epoch->typed_data();
  return from_cuda(launch_ll_combine_local(a, stream), "low-latency combine (one rank)");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLDispatchSend, DispatchSendImpl,
    bind_on_stream()
        .Arg<ffi::Buffer<ffi::BF16>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("fp8")
        .Attr<int64_t>("round_scale")
        .Attr<int64_t>("num_sms"),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLDispatchRecv, DispatchRecvImpl,
    bind_on_stream()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::AnyBuffer>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("fp8")
        .Attr<int64_t>("round_scale")
        .Attr<int64_t>("num_sms")
        .Attr<int64_t>("zero_padding"),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLCombineSend, CombineSendImpl,
    bind_on_stream()
        .Arg<ffi::Buffer<ffi::BF16>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("num_sms"),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLCombineRecv, CombineRecvImpl,
    bind_on_stream()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::BF16>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::BF16>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("num_sms"),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLCombineLocal, CombineLocalImpl,
    bind_on_stream()
        .Arg<ffi::Buffer<ffi::BF16>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::BF16>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("num_sms"),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLLDispatchLocal, DispatchLocalImpl,
    bind_on_stream()
        .Arg<ffi::Buffer<ffi::BF16>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::AnyBuffer>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("max_tokens")
        .Attr<int64_t>("fp8")
        .Attr<int64_t>("round_scale")
        .Attr<int64_t>("num_sms")
        .Attr<int64_t>("zero_padding"),
    {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_ep
