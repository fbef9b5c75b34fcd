// Plain structs shared by host and device code: where things live in a
// Buffer, and what every kernel launch carries.
#pragma once

#include <cstddef>
#include <cstdint>

namespace jax_ep {

constexpr int kMaxRanks = 64;

// Words of the per-rank control region (local memory, never read by peers).
enum ControlWord : int {
  kCtlEpoch = 0,       // last completed call on this buffer
  kCtlDoneStage = 1,   // last-block counters, one per kernel role
  kCtlDoneSend = 2,
  kCtlDoneRecv = 3,
  kCtlDoneExpand = 4,
  kCtlSendOpen = 5,    // epoch of the last low-latency send, until its receive closes the call
  kCtlDoneForward = 6, // last-block counter of the internode combine's forwarding kernel
  kCtlStageNext = 7,   // the normal dispatch's stage kernel: the next token to hand out
  kCtlExpandNext = 8,  // its expand kernel: the next (source, token) item to hand out
  kCtlRecvNext = 9,    // the normal combine's token side: the next token to hand out
  kCtlWords = 64,
};

// Phases named in a timeout record.
enum Phase : uint32_t {
  kPhaseDispatchWait = 1,
  kPhaseCombineWait = 2,
  kPhaseRedispatchWait = 3,
  kPhaseLowLatencyDispatchWait = 4,
  kPhaseLowLatencyCombineWait = 5,
  kPhaseLowLatencyDispatchSend = 6,
  kPhaseLowLatencyCombineSend = 7,
  kPhaseCombineForward = 8,
  kPhaseAllReduceWait = 9,
  kPhaseOperandsRelease = 10,
};

// What a fault record reports.
enum FaultKind : uint32_t {
  kFaultTimeout = 1,   // a peer's signal never came: seen/want are epochs
  kFaultMismatch = 2,  // a peer made a different call: seen/want are call signatures
  kFaultOrder = 3,     // a send began before the previous send's receive: seen/want = that epoch
};

// Written by a kernel that hit its deadline or saw a peer make a different
// call, read by the host watchdog.
struct FaultRecord {
  uint32_t flag;  // 0 clear, 1 being written, 2 complete
  uint32_t kind, rank, phase, peer, seen, want;
};

// Byte offsets inside one rank's buffer (computed by jax_ep/buffer.py:Layout).
// Regions named *0 are the first half; the second half is half_bytes later.
struct Offsets {
  size_t x_stage, idx_stage, w_stage, comb_recv, vals_recv;  // half 0
  size_t half_bytes;
  size_t inbox, control, route_rank, route_cnt;  // local
  size_t ll_recv, ll_comb, ll_count;
  size_t ll_stage;  // half 0: rows that receivers pull (peer pointers; 0 with NVSHMEM)
  size_t ll_send, ll_comb_send;  // local staging of the NVSHMEM transport (0 otherwise)
  // Internode normal mode (0 on one node). Half 0, like the staging:
  //   rdma_recv  per source node m, the rows, ids and weights that the source with this
  //              rank's local index on node m put here (the staging's sub-layout)
  //   comb_fwd   per (source node m, local rank j, token) the partial sum that rank j of
  //              this node made for the source with this rank's local index on node m
  //   vals_fwd   the same for the per-slot values; fwd_tag: the epoch of each present row
  // Local, each (signature << 32) | epoch:
  //   rdma_flag[m]   signalled by that source of node m (an NVSHMEM signal)
  //   rdma_ready[m]  the same word, stored by this rank once its rows are visible here
  //                  (the word its node's ranks wait for)
  //   fwd_inbox[r]   rank r's partials forwarded to this rank (set by r's forwarder,
  //                  apart from `inbox`, which r itself sets in the low-latency calls)
  size_t rdma_recv, comb_fwd, vals_fwd, fwd_tag;
  size_t rdma_flag, rdma_ready, fwd_inbox;
  // Windows (see CallCtx::window), local, read or written by peers:
  //   call_rec[2]   per epoch parity, what this rank's call publishes (CallRecord)
  //   done_inbox[r] (signature << 32) | epoch: rank r has finished reading this
  //                 rank's XLA buffers of that call
  size_t call_rec, done_inbox;
};

// What a normal-mode call publishes for its receivers in `call_rec` (one per
// epoch parity), written before the call's signal. Pointers are in the
// publishing rank's address space (0: none); `pull` 1: the receivers read the
// rows in place through their window, 0: they were pushed into the receivers'
// buffers.
struct CallRecord {
  uint64_t word;  // (signature << 32) | epoch
  uint64_t pull;
  uint64_t ptr[6];
};

// How the low-latency kernels reach other ranks.
enum Transport : int {
  kTransportPeer = 0,     // stores through peer pointers (CUDA IPC, peer access, one GPU)
  kTransportNvshmem = 1,  // NVSHMEM puts and signals on symmetric memory
};

struct PeerTable {
  char* base[kMaxRanks];
};

// Everything a kernel needs to find its buffer, its peers and its deadline.
struct CallCtx {
  PeerTable peers;
  Offsets off;
  int rank;
  int nranks;
  uint32_t* control;  // this rank's control words
  uint64_t* inbox;    // this rank's inbox: inbox[s] = (signature << 32) | epoch last signalled by s
  FaultRecord* fault; // host-mapped
  uint64_t timeout_ns;
  uint32_t sig;       // the call's signature (op and shapes), the same on every rank
  int transport;      // Transport
  int nodes;          // nodes of the EP group: ranks [n*local_size, (n+1)*local_size) are node n
  int local_size;     // ranks per node (nranks when nodes == 1)
  int spread;         // ranks on other GPUs: walks over every rank interleave them (rank_token)
  // Windows: every rank of the group has mapped every other rank's XLA device
  // memory (another process's, by its VMM export), so a call may let receivers
  // read its XLA operands in place. Rank r's address p is p + win_delta[r] here.
  int window;
  int64_t win_delta[kMaxRanks];
};

}  // namespace jax_ep
