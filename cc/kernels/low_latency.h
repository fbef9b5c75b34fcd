// Low-latency (decode) kernels over peer pointers: launch arguments.
//
// Protocol of one call pair on rank s (epoch N = the send's call):
//   dispatch_send   every token's row (FP8 data and scales, or BF16) is written
//                   once into s's own staging of half N&1, and every kept
//                   (token, expert) pair becomes a 16-byte header {token, i} in
//                   slot (local expert, s, j) of the owner's half N&1, where j
//                   is the token's rank among s's tokens of that expert. The
//                   last block then publishes, per expert, the 64-bit word
//                   (N << 32 | count) with a release store, into the owner's
//                   count words of parity N&1 (so back-to-back dispatches
//                   never overwrite a word not yet read). No SM waits.
//   dispatch_recv   per local expert: wait for the R count words of epoch N,
//                   read each slot's header and pull its row from the source's
//                   staging, packed in (source rank, token) order into the XLA
//                   output, record each row in src_rows, close the call. The
//                   staging of N&1 is written again at call N+2 at the earliest,
//                   after every rank's receive of N+1, so after every rank has
//                   closed N.
//   combine_send    each packed row goes back unreduced to slot (rank, t, i)
//                   of its source's half (N+1)&1; then every rank is signalled.
//                   With windows (every rank maps every other's XLA memory) the
//                   send publishes where expert_out and src_rows are instead
//                   (CallRecord) and moves nothing: the sources read the rows.
//   combine_recv    wait for every rank, sum each token's slots in top-k
//                   order with its weights in float32, round once to BF16
//                   (a token's slots come from its topk_idx, found by one
//                   warp with shuffles: the sender routing of the dispatch);
//                   a slot of a rank that published is its row of that rank's
//                   expert_out, found through that rank's src_rows. The receive
//                   takes expert_out and src_rows as operands, so XLA keeps them
//                   until it ends, and it ends only when every rank has said it
//                   is done reading them (done_inbox).
// With one rank nothing moves between ranks: dispatch runs as one kernel
// (dispatch_local) that writes each row straight into its packed place in the
// output, and combine as one (combine_local) that sums the expert rows where
// they are, found through src_rows.
// Fixed worst-case slots make every message's place known to the sender, so
// no slot is ever cleaned: epochs tell fresh words from stale ones.
//
// Transports (CallCtx::transport): peer pointers, where the send kernels store
// into the owner's memory; or NVSHMEM, where they build each message once in
// this rank's symmetric staging, put the whole message (header, data, scales)
// into the owner's slot on every owner PE, wait for their puts (nvshmem_quiet)
// and publish counts / signals with nvshmemx_signal_op; the receive kernels
// read their own memory.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "runtime_types.h"

namespace jax_ep {

struct LowLatencyShape {
  int T, H, K, E, El, Kl, M;
  int fp8;
  int round_scale;
};

struct LLDispatchSendArgs {
  CallCtx c;
  LowLatencyShape s;
  int num_sms;
  const void* x;            // bf16 [T, H]
  const int32_t* topk_idx;  // [T, K]: the kernel routes each token (sender_routing's rule)
  int32_t* slot_pos_out;    // [T, K] dest * Kl + i, -1 none (the handle's)
  int32_t* count_out;       // [E] tokens this rank sends to each expert (one rank: [El], an output)
  int32_t* epoch_out;
  // One rank (launch_ll_dispatch_local): the kernel writes the outputs of the
  // receive, and no receive runs.
  void* out_x;        // [El, M, H] fp8 or bf16
  float* out_scales;  // [El, M, H/128] or null
  int32_t* src_rows;  // [1, M, Kl]
  bool zero_padding;
};

struct LLDispatchRecvArgs {
  CallCtx c;
  LowLatencyShape s;
  int num_sms;
  void* out_x;        // [El, R*M, H] fp8 or bf16
  float* out_scales;  // [El, R*M, H/128] or null
  int32_t* count;     // [El]
  int32_t* src_rows;  // [R, M, Kl]
  int32_t* epoch_out;
  bool zero_padding;  // rows past each expert's count (and their scales) are zeroed
};

struct LLCombineSendArgs {
  CallCtx c;
  LowLatencyShape s;
  int num_sms;
  const void* expert_out;   // bf16 [El, R*M, H]
  const int32_t* src_rows;  // [R, M, Kl]
  int32_t* epoch_out;
  // Windows (peer pointers): publish expert_out and src_rows for the sources to
  // read in place instead of pushing the rows (one block, nothing copied).
  bool pull;
};

struct LLCombineRecvArgs {
  CallCtx c;
  LowLatencyShape s;
  int num_sms;
  const int32_t* topk_idx;  // [T, K] as given to combine (the slots are found per token)
  const float* weights;     // [T, K] as given (read only where the id is valid)
  void* y;                  // bf16 [T, H]
  int32_t* epoch_out;
  // One rank (launch_ll_combine_local): the rows are read where the experts
  // wrote them, through the dispatch's src_rows, and no combine send runs.
  // Several ranks: this rank's operands of the send (kept alive until the
  // receive ends; rows are found through each rank's published record).
  const void* expert_out;   // bf16 [El, R*M, H]
  const int32_t* src_rows;  // [R, M, Kl]
};

cudaError_t launch_ll_dispatch_send(const LLDispatchSendArgs& a, cudaStream_t stream);
cudaError_t launch_ll_dispatch_recv(const LLDispatchRecvArgs& a, cudaStream_t stream);
cudaError_t launch_ll_dispatch_local(const LLDispatchSendArgs& a, cudaStream_t stream);
cudaError_t launch_ll_combine_send(const LLCombineSendArgs& a, cudaStream_t stream);
cudaError_t launch_ll_combine_recv(const LLCombineRecvArgs& a, cudaStream_t stream);
cudaError_t launch_ll_combine_local(const LLCombineRecvArgs& a, cudaStream_t stream);

}  // namespace jax_ep
