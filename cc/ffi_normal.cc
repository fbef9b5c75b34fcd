// XLA FFI handlers of the normal mode: dispatch, combine, redispatch.
// They hold no per-call host state (command buffers replay them without
// calling back), find the Buffer by (id, device) and launch kernels.
#include "ffi_normal.h"

#include <algorithm>
#include <string>

#include "ffi_common.h"
#include "kernels/normal.h"

namespace jax_ep {
namespace {

namespace ffi = xla::ffi;

// A block's shared memory (227 KB on Hopper) less the kernels' static tables (4 KB).
constexpr size_t kMaxSmem = 223 * 1024;

// A call that does not fit its buffer would write past a region: refuse it
// before any kernel runs (the Python side checks the same, with sizes).
ffi::Error fits(size_t need, size_t have, const char* what) {
  if (need <= have) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("jax_ep: the call needs ") + std::to_string(need) +
                                     " bytes of " + what + " but the Buffer has " +
                                     std::to_string(have) + "; create a larger jax_ep.Buffer");
}

ffi::Error check_shape(const NormalShape& s, int nranks) {
  if (s.K > kMaxTopK || s.H % 8)
    return ffi::Error::InvalidArgument("jax_ep: the kernels need top_k <= 16 and hidden % 8 == 0");
  const size_t nch = (s.T + kRouteChunk - 1) / kRouteChunk;
  if (static_cast<size_t>(s.E) * nch * 4 > kMaxSmem || 2 * 16 * static_cast<size_t>(s.El) * 4 > kMaxSmem)
    return ffi::Error::InvalidArgument("jax_ep: too many experts x tokens for one call's route tables");
  return ffi::Error::Success();
}

ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                        ffi::Buffer<ffi::F32> x_scales, ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> w,
                        ffi::Result<ffi::AnyBuffer> out_x, ffi::Result<ffi::Buffer<ffi::F32>> out_scales,
                        ffi::Result<ffi::Buffer<ffi::F32>> out_w,
                        ffi::Result<ffi::Buffer<ffi::S32>> out_topk,
                        ffi::Result<ffi::Buffer<ffi::S32>> group_sizes,
                        ffi::Result<ffi::Buffer<ffi::S32>> num_overflow,
                        ffi::Result<ffi::Buffer<ffi::S32>> src_rows,
                        ffi::Result<ffi::Buffer<ffi::S32>> num_rows,
                        ffi::Result<ffi::Buffer<ffi::S32>> epoch, int64_t buffer_id, int64_t layout,
                        int64_t num_experts, int64_t out_kind, int64_t num_sms) {
  count_call(stream);
  BufferState* st;
  if (auto err = state_for(buffer_id, device, &st); err.failure()) return err;
  DispatchArgs a{};
  a.c = st->ctx();
  const int R = st->nranks();
  a.s.T = static_cast<int>(dim(x, 0));
  a.s.H = static_cast<int>(dim(x, 1));
  a.s.K = static_cast<int>(dim(idx, 1));
  a.s.E = static_cast<int>(num_experts);
  a.s.El = a.s.E / R;
  a.s.tokens_layout = layout == 1;
  a.s.Kr = a.s.tokens_layout ? 1 : std::min(a.s.K, a.s.El);
  a.s.C = static_cast<int>(dim(*out_x, 0));
  a.s.Tmax = st->max_tokens();
  a.out_kind = static_cast<int>(out_kind);
  const bool pre = x.element_type() == ffi::DataType::F8E4M3FN;  // an Fp8Array's data
  if (pre) {
    a.in_dtype = DType::kBF16;  // unused: the rows are copied as they are
    if (a.out_kind == kOutSame || static_cast<int64_t>(x_scales.element_count()) != dim(x, 0) * (dim(x, 1) / 128))
      return ffi::Error::InvalidArgument("jax_ep: FP8 x needs its [T, H/128] scales and an FP8 dispatch");
  } else if (!to_dtype(x.element_type(), &a.in_dtype)) {
    return ffi::Error::InvalidArgument("jax_ep: x must be bfloat16, float16, float32 or FP8 e4m3");
  }
  if (a.out_kind == kOutDequant && !to_dtype(out_x->element_type(), &a.out_dtype))
    return ffi::Error::InvalidArgument("jax_ep: out_dtype must be bfloat16, float16 or float32");
  if (a.s.T > a.s.Tmax)
    return ffi::Error::InvalidArgument("jax_ep: more tokens than the Buffer's max_tokens_per_rank");
  const Offsets& o = a.c.off;
  const size_t es = x.element_type() == ffi::DataType::F32 ? 4 : 2;  // (not used by FP8 x)
  const size_t stage = a.out_kind == kOutSame
                           ? static_cast<size_t>(a.s.T) * a.s.H * es
                           : (static_cast<size_t>(a.s.Tmax) * a.s.H + 255) / 256 * 256 +
                                 static_cast<size_t>(a.s.T) * (a.s.H / 128) * 4;
  if (auto err = check_shape(a.s, R); err.failure()) return err;
  if (auto err = fits(stage, o.idx_stage - o.x_stage, "staging"); err.failure()) return err;
  a.c.sig = call_signature(Op::kDispatch, {a.s.T, a.s.H, a.s.K, a.s.E, a.s.tokens_layout, a.s.C,
                                           static_cast<int>(a.in_dtype), a.out_kind, pre});
  a.num_sms = clamp_sms(num_sms);
  a.x = x.untyped_data();
  a.x_scales = pre ? x_scales.typed_data() : nullptr;
  a.idx = idx.typed_data();
  a.w = w.typed_data();
  a.out_x = out_x->untyped_data();
  a.out_scales = out_scales->typed_data();
  a.out_w = out_w->typed_data();
  a.out_topk = out_topk->typed_data();
  a.group_sizes = group_sizes->typed_data();
  a.num_overflow = num_overflow->typed_data();
  a.src_rows = src_rows->typed_data();
  a.num_rows = num_rows->typed_data();
  a.epoch_out = epoch->typed_data();
  a.pull = R > 1 && st->window_on() && (a.out_kind == kOutSame || pre) &&
           st->in_window(a.x, x.size_bytes()) && st->in_window(a.x_scales, pre ? x_scales.size_bytes() : 0) &&
           st->in_window(a.idx, idx.size_bytes()) && st->in_window(a.w, w.size_bytes());
  return from_cuda(launch_dispatch(a, stream), "dispatch launch");
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer expert_out,
                       ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> row_vals,
                       ffi::Buffer<ffi::S32> src_rows, ffi::Buffer<ffi::S32> dst_mask,
                       ffi::Buffer<ffi::S32> slot_pos, ffi::Buffer<ffi::S32> epoch_in,
                       ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::F32>> slot_vals,
                       ffi::Result<ffi::Buffer<ffi::S32>> epoch, int64_t buffer_id, int64_t layout,
                       int64_t num_experts, int64_t num_sms) {
  count_call(stream);
  BufferState* st;
  if (auto err = state_for(buffer_id, device, &st); err.failure()) return err;
  CombineArgs a{};
  a.c = st->ctx();
  const int R = st->nranks();
  a.s.T = static_cast<int>(dim(dst_mask, 0));
  a.s.H = static_cast<int>(dim(expert_out, 1));
  a.s.K = static_cast<int>(dim(slot_pos, 1));
  a.s.E = static_cast<int>(num_experts);
  a.s.El = a.s.E / R;
  a.s.tokens_layout = layout == 1;
  a.s.Kr = static_cast<int>(dim(src_rows, 2));
  a.s.C = static_cast<int>(dim(expert_out, 0));
  a.s.Tmax = st->max_tokens();
  if (!to_dtype(expert_out.element_type(), &a.dtype))
    return ffi::Error::InvalidArgument("jax_ep: expert_out must be bfloat16, float16 or float32");
  const Offsets& o = a.c.off;
  const size_t es = a.dtype == DType::kF32 ? 4 : 2;
  if (auto err = check_shape(a.s, R); err.failure()) return err;
  if (auto err = fits(static_cast<size_t>(R) * a.s.T * a.s.H * es, o.vals_recv - o.comb_recv,
                      "combine receive space");
      err.failure())
    return err;
  a.c.sig = call_signature(Op::kCombine, {a.s.T, a.s.H, a.s.K, a.s.E, a.s.tokens_layout, a.s.C,
                                          a.s.Kr, static_cast<int>(a.dtype)});
  a.num_sms = clamp_sms(num_sms);
  a.expert_out = expert_out.untyped_data();
  a.weights = weights.element_count() ? weights.typed_data() : nullptr;
  a.row_vals = row_vals.element_count() ? row_vals.typed_data() : nullptr;
  a.src_rows = src_rows.typed_data();
  a.dst_mask = dst_mask.typed_data();
  a.slot_pos = slot_pos.typed_data();
  a.y = y->untyped_data();
  a.slot_vals = slot_vals->element_count() ? slot_vals->typed_data() : nullptr;
  a.epoch_out = epoch->typed_data();
  // Read in place, a token's expert rows cross to its rank one by one; pushed, they
  // cross as one partial sum per rank. Between GPUs a call with several rows per
  // token and rank (the experts layout, Kr > 1) pushes; one row (Kr == 1, as the
  // tokens layout always has) and ranks on one GPU read.
  a.pull = R > 1 && st->window_on() && (a.s.Kr == 1 || st->one_gpu()) &&
           st->in_window(a.expert_out, expert_out.size_bytes()) &&
           st->in_window(a.weights, weights.size_bytes()) && st->in_window(a.row_vals, row_vals.size_bytes()) &&
           st->in_window(a.src_rows, src_rows.size_bytes());
  return from_cuda(launch_combine(a, stream), "combine launch");
}

ffi::Error RedispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                          ffi::Buffer<ffi::S32> src_rows, ffi::Buffer<ffi::S32> dst_mask,
                          ffi::Buffer<ffi::S32> num_rows, ffi::Buffer<ffi::S32> epoch_in,
                          ffi::Result<ffi::AnyBuffer> rows, ffi::Result<ffi::Buffer<ffi::S32>> epoch,
                          int64_t buffer_id, int64_t num_experts, int64_t num_sms) {
  count_call(stream);
  BufferState* st;
  if (auto err = state_for(buffer_id, device, &st); err.failure()) return err;
  RedispatchArgs a{};
  a.c = st->ctx();
  const int R = st->nranks();
  a.s.T = static_cast<int>(dim(y, 0));
  a.s.H = static_cast<int>(dim(y, 1));
  a.s.E = static_cast<int>(num_experts);
  a.s.El = a.s.E / R;
  a.s.Kr = static_cast<int>(dim(src_rows, 2));
  a.s.K = a.s.Kr;
  a.s.C = static_cast<int>(dim(*rows, 0));
  a.s.Tmax = st->max_tokens();
  if (!to_dtype(y.element_type(), &a.dtype))
    return ffi::Error::InvalidArgument("jax_ep: the cotangent must be bfloat16, float16 or float32");
  const Offsets& o = a.c.off;
  const size_t es = a.dtype == DType::kF32 ? 4 : 2;
  if (a.s.H % 8) return ffi::Error::InvalidArgument("jax_ep: hidden % 8 != 0");
  if (auto err = fits(static_cast<size_t>(a.s.T) * a.s.H * es, o.idx_stage - o.x_stage, "staging");
      err.failure())
    return err;
  a.c.sig = call_signature(Op::kRedispatch, {a.s.T, a.s.H, a.s.E, a.s.C, a.s.Kr,
                                             static_cast<int>(a.dtype)});
  a.num_sms = clamp_sms(num_sms);
  a.y = y.untyped_data();
  a.src_rows = src_rows.typed_data();
  a.dst_mask = dst_mask.typed_data();
  a.num_rows = num_rows.typed_data();
  a.rows = rows->untyped_data();
  a.epoch_out = epoch->typed_data();
  return from_cuda(launch_redispatch(a, stream), "redispatch launch");
}

ffi::Error AllReduceImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::S32> epoch_in, ffi::Result<ffi::Buffer<ffi::F32>> y,
                         ffi::Result<ffi::Buffer<ffi::S32>> epoch, int64_t buffer_id, int64_t num_sms) {
  count_call(stream);
  BufferState* st;
  if (auto err = state_for(buffer_id, device, &st); err.failure()) return err;
  AllReduceArgs a{};
  a.c = st->ctx();
  if (a.c.nodes > 1)
    return ffi::Error::InvalidArgument(
        "jax_ep: all_reduce reads every rank's memory, so it needs a Buffer of one node (num_nodes=1)");
  a.n = static_cast<int64_t>(x.element_count());
  if (a.n % 4) return ffi::Error::InvalidArgument("jax_ep: all_reduce needs a multiple of 4 values");
  const Offsets& o = a.c.off;
  if (auto err = fits(static_cast<size_t>(a.n) * 4, o.idx_stage - o.x_stage, "staging"); err.failure())
    return err;
  a.c.sig = call_signature(Op::kAllReduce, {a.n});
  a.num_sms = clamp_sms(num_sms);
  a.x = x.typed_data();
  a.y = y->typed_data();
  a.epoch_out = epoch->typed_data();
  return from_cuda(launch_all_reduce(a, stream), "all_reduce launch");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpDispatch, DispatchImpl,
    bind_on_stream()
        .Arg<ffi::AnyBuffer>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::AnyBuffer>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("layout")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("out_kind")
        .Attr<int64_t>("num_sms"),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpCombine, CombineImpl,
    bind_on_stream()
        .Arg<ffi::AnyBuffer>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::AnyBuffer>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("layout")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("num_sms"),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpRedispatch, RedispatchImpl,
    bind_on_stream()
        .Arg<ffi::AnyBuffer>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::AnyBuffer>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("num_sms"),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpAllReduce, AllReduceImpl,
    bind_on_stream()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::S32>>()
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_sms"),
    {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_ep
