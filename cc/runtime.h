// The per-device state behind a jax_ep.Buffer: communication memory, the
// peers' mappings of it, the fault record and the watchdog that reports it.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "runtime_types.h"

namespace jax_ep {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Throw with the call and CUDA's message on failure.
void check_cuda(cudaError_t err, const char* what);

class BufferState {
 public:
  BufferState(uint64_t id, int device, int rank, int nranks, int max_tokens, size_t bytes,
              const Offsets& off, double timeout_s, int transport = kTransportPeer,
              int num_nodes = 1, bool vmm = false);
  ~BufferState();
  BufferState(const BufferState&) = delete;
  BufferState& operator=(const BufferState&) = delete;

  // What to hand to the other processes of the group: the 64-byte CUDA IPC handle
  // (cudaMalloc) or the 32-byte record of the VMM allocation (pid, descriptor,
  // base, size; the descriptor stays open until close_export()), then the
  // GPU's 16-byte UUID.
  std::string ipc_handle();
  // Close the descriptor ipc_handle() exported, once every peer has mapped the
  // memory (each holds its own copy).
  void close_export();
  // Map the other ranks' memory: their handles (other processes; a VMM record's
  // descriptor is copied with pidfd_getfd) or, for ranks driven by this process,
  // their state's pointer directly (peer access). Throws when any cannot be mapped;
  // what was mapped is released with the state.
  void connect(const std::vector<std::string>& handles, const std::vector<BufferState*>& local);

  // Windows (CallCtx::window). export_window: a record (pid, file descriptor,
  // base, size) of the VMM allocation that holds `ptr` (an XLA buffer of this
  // device), or "" when it cannot be shared (not VMM, no POSIX fd export).
  // import_windows: map every other rank's record (a descriptor of another
  // process taken with pidfd_getfd); false, with nothing kept, when any fails.
  // enable_window: switch them on once every rank has imported every record.
  std::string export_window(uint64_t ptr);
  bool import_windows(const std::vector<std::string>& records, std::string* why);
  void enable_window(bool on);
  bool window_on() const { return window_; }
  // Windows are on and every rank of the group runs on this rank's GPU
  // (processes sharing one GPU, as connect() found).
  bool one_gpu() const { return window_ && shares_gpu_; }
  // [p, p + bytes) lies in this rank's exported allocation (null with 0 bytes does).
  bool in_window(const void* p, size_t bytes) const;

  CallCtx ctx() const;
  const FaultRecord& fault() const { return *fault_host_; }

  uint64_t id() const { return id_; }
  int device() const { return device_; }
  int rank() const { return rank_; }
  int nranks() const { return nranks_; }
  int max_tokens() const { return max_tokens_; }
  char* base() const { return base_; }
  bool vmm() const { return vmm_; }
  bool connected() const { return connected_; }
  int num_nodes() const { return num_nodes_; }
  bool on_my_node(int r) const { return r / (nranks_ / num_nodes_) == rank_ / (nranks_ / num_nodes_); }
  // Every rank the normal-mode kernels store into is reachable by loads and stores:
  // every rank of the group, or on a Buffer of several nodes every rank of this
  // one (false for an NVSHMEM Buffer whose ranks only puts reach); the first rank
  // that is not in `*missing`.
  bool maps_every_rank(int* missing) const;

 private:
  void watch();
  // Free this rank's memory (not NVSHMEM's) and fault record; idempotent.
  void free_memory();

  uint64_t id_;
  int device_, rank_, nranks_, max_tokens_, num_nodes_;
  size_t bytes_;
  Offsets off_;
  uint64_t timeout_ns_;
  int transport_;
  char* base_ = nullptr;
  std::vector<char*> peers_;
  std::vector<char*> opened_;  // IPC mappings to close
  struct Mapping {  // a VMM allocation mapped at va
    uint64_t va, size, handle;
  };
  // Unmap, free the address range and drop the handle's reference.
  static void release(const Mapping& m);
  // A VMM allocation shared by a POSIX descriptor (create(vmm=True)), else
  // cudaMalloc shared by a CUDA IPC handle.
  bool vmm_ = false;
  Mapping own_{};    // with vmm_: this rank's allocation (va == base_)
  int vmm_fd_ = -1;  // this rank's exported descriptor, until close_export()
  bool connected_ = false;
  bool shares_gpu_ = false;  // every rank connect() mapped is on this rank's GPU
  void drop_windows();
  uint64_t win_base_ = 0, win_size_ = 0;
  int win_fd_ = -1;                // this rank's exported descriptor, closed on enable
  std::vector<Mapping> win_maps_;  // the peers' allocations mapped here
  std::vector<Mapping> vmm_maps_;  // the peers' VMM Buffers mapped here
  std::vector<int64_t> win_delta_;
  bool window_ = false;
  FaultRecord* fault_host_ = nullptr;
  FaultRecord* fault_dev_ = nullptr;
  std::atomic<bool> stop_{false};
  std::thread watchdog_;
};

// Registry keyed by (buffer id, CUDA device ordinal); FFI handlers look up here.
BufferState* find_state(uint64_t id, int device);
BufferState* add_state(std::unique_ptr<BufferState> s);
void remove_state(uint64_t id, int device);

// Leak accounting: peer mappings opened through CUDA IPC and not yet closed,
// and buffer states alive in this process.
extern std::atomic<int64_t> g_open_mappings;
size_t live_states();

}  // namespace jax_ep
