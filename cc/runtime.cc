#include "runtime.h"

#include <cuda.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cerrno>
#include <cstring>
#include <type_traits>
#include <mutex>

#include "nvshmem_runtime.h"

namespace jax_ep {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw CudaError(std::string("jax_ep: ") + what + " failed: " + cudaGetErrorString(err));
}

std::atomic<int64_t> g_open_mappings{0};

namespace {

const char* phase_name(uint32_t p) {
  switch (p) {
    case kPhaseDispatchWait: return "dispatch (waiting for a sender's rows)";
    case kPhaseCombineWait: return "combine (waiting for an expert rank's partial sums)";
    case kPhaseRedispatchWait: return "combine backward (waiting for a sender's rows)";
    case kPhaseLowLatencyDispatchWait: return "low_latency_dispatch_recv";
    case kPhaseLowLatencyCombineWait: return "low_latency_combine_recv";
    case kPhaseLowLatencyDispatchSend: return "low_latency_dispatch_send";
    case kPhaseLowLatencyCombineSend: return "low_latency_combine_send";
    case kPhaseCombineForward: return "combine (forwarding a node's partial sums)";
    case kPhaseAllReduceWait: return "all_reduce (waiting for a peer's values)";
    case kPhaseOperandsRelease: return "dispatch or combine (waiting for a rank to finish reading this rank's operands in place)";
    default: return "unknown";
  }
}

struct DeviceGuard {
  int prev = 0;
  explicit DeviceGuard(int dev) {
    cudaGetDevice(&prev);
    check_cuda(cudaSetDevice(dev), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(prev); }
};

// The driver calls of the windows, found at run time (no link to libcuda).
struct Driver {
  CUresult (*get_range)(CUdeviceptr*, size_t*, CUdeviceptr) = nullptr;
  CUresult (*retain)(CUmemGenericAllocationHandle*, void*) = nullptr;
  CUresult (*props)(CUmemAllocationProp*, CUmemGenericAllocationHandle) = nullptr;
  CUresult (*export_fd)(void*, CUmemGenericAllocationHandle, CUmemAllocationHandleType, unsigned long long) = nullptr;
  CUresult (*import_fd)(CUmemGenericAllocationHandle*, void*, CUmemAllocationHandleType) = nullptr;
  CUresult (*release)(CUmemGenericAllocationHandle) = nullptr;
  CUresult (*reserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long) = nullptr;
  CUresult (*free_va)(CUdeviceptr, size_t) = nullptr;
  CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long) = nullptr;
  CUresult (*unmap)(CUdeviceptr, size_t) = nullptr;
  CUresult (*set_access)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t) = nullptr;
  CUresult (*create)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*, unsigned long long) = nullptr;
  CUresult (*granularity)(size_t*, const CUmemAllocationProp*, CUmemAllocationGranularity_flags) = nullptr;
  bool ok = false;
};

const Driver& driver() {
  static const Driver d = [] {
    Driver d;
    bool ok = true;
    auto get = [&ok](const char* name, auto** fn) {
      void* p = nullptr;
      cudaDriverEntryPointQueryResult q;
      if (cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
          q != cudaDriverEntryPointSuccess || p == nullptr) {
        (void)cudaGetLastError();
        ok = false;
      }
      *fn = reinterpret_cast<std::remove_pointer_t<decltype(fn)>>(p);
    };
    get("cuMemGetAddressRange", &d.get_range);
    get("cuMemRetainAllocationHandle", &d.retain);
    get("cuMemGetAllocationPropertiesFromHandle", &d.props);
    get("cuMemExportToShareableHandle", &d.export_fd);
    get("cuMemImportFromShareableHandle", &d.import_fd);
    get("cuMemRelease", &d.release);
    get("cuMemAddressReserve", &d.reserve);
    get("cuMemAddressFree", &d.free_va);
    get("cuMemMap", &d.map);
    get("cuMemUnmap", &d.unmap);
    get("cuMemSetAccess", &d.set_access);
    get("cuMemCreate", &d.create);
    get("cuMemGetAllocationGranularity", &d.granularity);
    d.ok = ok;
    return d;
  }();
  return d;
}

// A record of export_window: pid, fd, base, size.
struct WindowRecord {
  int64_t pid, fd;
  uint64_t base, size;
};

// The record that lets another process map this process's allocation [base, base + size)
// exported as descriptor `fd`.
std::string record_bytes(int fd, uint64_t base, uint64_t size) {
  const WindowRecord rec{static_cast<int64_t>(getpid()), fd, base, size};
  return std::string(reinterpret_cast<const char*>(&rec), sizeof(rec));
}

// Map `size` bytes of an allocation handle at a new address, readable and
// writable by `device`; 0 on failure (nothing left mapped).
CUdeviceptr map_handle(const Driver& d, CUmemGenericAllocationHandle h, size_t size, int device) {
  CUdeviceptr va = 0;
  if (d.reserve(&va, size, 0, 0, 0) != CUDA_SUCCESS) return 0;
  if (d.map(va, size, 0, h, 0) != CUDA_SUCCESS) {
    d.free_va(va, size);
    return 0;
  }
  CUmemAccessDesc acc{};
  acc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  acc.location.id = device;
  acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  if (d.set_access(va, size, &acc, 1) != CUDA_SUCCESS) {
    d.unmap(va, size);
    d.free_va(va, size);
    return 0;
  }
  return va;
}

// A copy, in this process, of descriptor `fd` of process `pid`; -1 and errno set on failure.
int copy_fd(int64_t pid, int64_t fd, const char** step) {
  const int pidfd = static_cast<int>(syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0));
  const int out = pidfd < 0 ? -1 : static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, static_cast<int>(fd), 0));
  const int err = errno;
  if (pidfd >= 0) close(pidfd);
  *step = pidfd < 0 ? "pidfd_open" : "pidfd_getfd";
  errno = err;
  return out;
}

// Map, readable and writable by `device`, the allocation that rank `r`'s process
// exported as `rec` (its descriptor copied with pidfd_getfd): the address here and
// `*handle`, or 0 with `*why` set and nothing left open.
CUdeviceptr import_record(const Driver& d, const WindowRecord& rec, int device, int r, const char* what,
                          CUmemGenericAllocationHandle* handle, std::string* why) {
  const char* step = "";
  const int fd = copy_fd(rec.pid, rec.fd, &step);
  if (fd < 0) {
    // EPERM: ptrace rights over that process are missing (Yama's ptrace_scope,
    // a container's seccomp profile).
    *why = std::string(step) + " of rank " + std::to_string(r) + "'s process failed: " + std::strerror(errno);
    return 0;
  }
  CUmemGenericAllocationHandle h = 0;
  const CUresult ri = d.import_fd(&h, reinterpret_cast<void*>(static_cast<uintptr_t>(fd)),
                                  CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
  close(fd);
  const CUdeviceptr va = ri == CUDA_SUCCESS ? map_handle(d, h, rec.size, device) : 0;
  if (va == 0) {
    if (ri == CUDA_SUCCESS) d.release(h);
    *why = "mapping rank " + std::to_string(r) + "'s " + what + " failed";
    return 0;
  }
  *handle = h;
  return va;
}

void gpu_uuid(int device, char (&out)[16]) {
  cudaDeviceProp p{};
  std::memset(out, 0, sizeof(out));
  if (cudaGetDeviceProperties(&p, device) == cudaSuccess) std::memcpy(out, p.uuid.bytes, sizeof(out));
  else (void)cudaGetLastError();
}

}  // namespace

BufferState::BufferState(uint64_t id, int device, int rank, int nranks, int max_tokens,
                         size_t bytes, const Offsets& off, double timeout_s, int transport,
                         int num_nodes, bool vmm)
    : id_(id), device_(device), rank_(rank), nranks_(nranks), max_tokens_(max_tokens),
      num_nodes_(num_nodes), bytes_(bytes), off_(off), timeout_ns_(static_cast<uint64_t>(timeout_s * 1e9)),
      transport_(transport) {
  if (nranks < 1 || nranks > kMaxRanks)
    throw std::invalid_argument("jax_ep: an EP group has 1.." + std::to_string(kMaxRanks) + " ranks");
  if (transport != kTransportPeer && transport != kTransportNvshmem)
    throw std::invalid_argument("jax_ep: unknown transport " + std::to_string(transport));
  if (num_nodes < 1 || nranks % num_nodes)
    throw std::invalid_argument("jax_ep: " + std::to_string(num_nodes) + " nodes do not divide " +
                                std::to_string(nranks) + " ranks");
  if (num_nodes > 32)
    throw std::invalid_argument("jax_ep: at most 32 nodes (a token's target nodes are one 32-bit mask)");
  if (num_nodes > 1 && (off.rdma_flag == 0 || off.rdma_ready == 0 || off.fwd_inbox == 0))
    throw std::invalid_argument("jax_ep: a Buffer over several nodes needs its internode regions");
  DeviceGuard guard(device);
  try {
    if (transport == kTransportNvshmem) {
      // Symmetric memory: the same offsets on every PE; PE r is EP rank r.
      if (nvshmem_pe() != rank || nvshmem_npes() != nranks)
        throw std::invalid_argument(
            "jax_ep: the NVSHMEM transport needs EP rank r to be NVSHMEM PE r of an EP group of all "
            "PEs (this rank " + std::to_string(rank) + " of " + std::to_string(nranks) + " is PE " +
            std::to_string(nvshmem_pe()) + " of " + std::to_string(nvshmem_npes()) + ")");
      base_ = static_cast<char*>(nvshmem_alloc_symmetric(bytes_));  // zeroed on every PE
    } else {
      const Driver& d = driver();
      if (vmm && d.ok && d.create != nullptr && d.granularity != nullptr) {
        // One physical allocation with a POSIX descriptor, as XLA's own memory is;
        // the peers map it after taking a copy of the descriptor (connect()).
        CUmemAllocationProp prop{};
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = device;
        prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        size_t g = 0;
        CUmemGenericAllocationHandle h = 0;
        const size_t size = d.granularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED) == CUDA_SUCCESS && g
                                ? (bytes_ + g - 1) / g * g : 0;
        if (size && d.create(&h, size, &prop, 0) == CUDA_SUCCESS) {
          const CUdeviceptr va = map_handle(d, h, size, device);
          if (va != 0) {
            base_ = reinterpret_cast<char*>(va);
            own_ = {va, size, h};
          } else {
            d.release(h);
          }
        }
      }
      vmm_ = base_ != nullptr;
      if (!vmm_)  // not asked for, or the driver cannot: device memory shared by a CUDA IPC handle
        check_cuda(cudaMalloc(&base_, bytes_), "cudaMalloc of the communication buffer");
      check_cuda(cudaMemset(base_, 0, bytes_), "cudaMemset of the communication buffer");
    }
    check_cuda(cudaHostAlloc(&fault_host_, sizeof(FaultRecord), cudaHostAllocMapped),
               "cudaHostAlloc of the fault record");
    std::memset(fault_host_, 0, sizeof(FaultRecord));
    check_cuda(cudaHostGetDevicePointer(&fault_dev_, fault_host_, 0), "cudaHostGetDevicePointer");
    check_cuda(cudaDeviceSynchronize(), "buffer initialisation");
    peers_.assign(nranks_, nullptr);
    peers_[rank_] = base_;
    if (transport == kTransportNvshmem) {
      // Peers a load or store reaches (NVLink, the same GPU) get their pointer, for the
      // normal-mode kernels; the low-latency kernels put through NVSHMEM either way.
      // Over several nodes only this node's ranks do: the kernels reach the others
      // by puts alone, also where (simulated nodes on one GPU) a pointer would exist.
      for (int r = 0; r < nranks_; ++r)
        if (r != rank_ && on_my_node(r))
          peers_[r] = static_cast<char*>(nvshmem_peer_pointer(base_, r));
      connected_ = true;
    }
  } catch (...) {  // nothing of a half-made state stays behind
    free_memory();
    throw;
  }
  watchdog_ = std::thread([this] { watch(); });
}

BufferState::~BufferState() {
  // At process exit the CUDA runtime may already be unloading (a buffer never
  // closed, destroyed with the static registry): then only the watchdog is
  // stopped, and the driver reclaims the memory with the process.
  int prev = 0;
  const bool cuda_up = cudaGetDevice(&prev) == cudaSuccess && cudaSetDevice(device_) == cudaSuccess;
  if (cuda_up) cudaDeviceSynchronize();  // a timeout in flight is still reported by the watchdog
  stop_ = true;
  if (watchdog_.joinable()) watchdog_.join();
  if (!cuda_up) return;
  drop_windows();
  for (char* p : opened_)
    if (cudaIpcCloseMemHandle(p) == cudaSuccess) g_open_mappings.fetch_sub(1);
  for (const Mapping& m : vmm_maps_) {
    release(m);
    g_open_mappings.fetch_sub(1);
  }
  if (transport_ == kTransportNvshmem && base_ != nullptr) {
    if (nvshmem_running()) nvshmem_free_symmetric(base_);  // else finalize took the heap
    base_ = nullptr;
  }
  free_memory();
  cudaSetDevice(prev);
}

void BufferState::free_memory() {
  if (base_ != nullptr && transport_ != kTransportNvshmem) {
    if (vmm_) {
      release(own_);
    } else {
      cudaFree(base_);
    }
    base_ = nullptr;
  }
  close_export();
  if (fault_host_ != nullptr) cudaFreeHost(fault_host_);
  fault_host_ = nullptr;
}

void BufferState::release(const Mapping& m) {
  const Driver& d = driver();
  d.unmap(m.va, m.size);
  d.free_va(m.va, m.size);
  d.release(m.handle);
}

void BufferState::close_export() {
  if (vmm_fd_ >= 0) close(vmm_fd_);
  vmm_fd_ = -1;
}

std::string BufferState::ipc_handle() {
  char gpu[16];
  gpu_uuid(device_, gpu);
  if (vmm_) {  // pid, descriptor, base and size; the descriptor stays open until close_export()
    if (vmm_fd_ < 0) {
      int fd = -1;
      if (driver().export_fd(&fd, own_.handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0) != CUDA_SUCCESS)
        throw CudaError("jax_ep: exporting the Buffer's VMM allocation failed");
      vmm_fd_ = fd;
    }
    return record_bytes(vmm_fd_, own_.va, own_.size) + std::string(gpu, sizeof(gpu));
  }
  cudaIpcMemHandle_t h;
  check_cuda(cudaIpcGetMemHandle(&h, base_), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h)) + std::string(gpu, sizeof(gpu));
}

void BufferState::connect(const std::vector<std::string>& handles,
                          const std::vector<BufferState*>& local) {
  if (connected_) throw std::logic_error("jax_ep: the Buffer is already connected to its peers");
  DeviceGuard guard(device_);
  char mine[16];
  gpu_uuid(device_, mine);
  bool shared = true;
  for (int r = 0; r < nranks_; ++r) {
    if (r == rank_) continue;
    if (r < static_cast<int>(local.size()) && local[r] != nullptr) {
      const int peer_dev = local[r]->device();
      shared = shared && peer_dev == device_;
      if (peer_dev != device_) {
        int can = 0;
        check_cuda(cudaDeviceCanAccessPeer(&can, device_, peer_dev), "cudaDeviceCanAccessPeer");
        if (!can)
          throw CudaError("jax_ep: device " + std::to_string(device_) + " cannot access device " +
                          std::to_string(peer_dev) + " (no peer access)");
        cudaError_t e = cudaDeviceEnablePeerAccess(peer_dev, 0);
        if (e == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();
        else check_cuda(e, "cudaDeviceEnablePeerAccess");
      }
      peers_[r] = local[r]->base();
      continue;
    }
    if (r < static_cast<int>(handles.size()) && handles[r].size() == sizeof(WindowRecord) + sizeof(mine)) {
      WindowRecord rec;
      std::memcpy(&rec, handles[r].data(), sizeof(rec));
      shared = shared && std::memcmp(handles[r].data() + sizeof(rec), mine, sizeof(mine)) == 0;
      const Driver& d = driver();
      if (!d.ok) throw CudaError("jax_ep: rank " + std::to_string(r) + "'s Buffer is a VMM allocation, and "
                                 "this process's CUDA driver lacks the VMM calls");
      CUmemGenericAllocationHandle h = 0;
      std::string why;
      const CUdeviceptr va = import_record(d, rec, device_, r, "VMM Buffer", &h, &why);
      if (va == 0) throw CudaError("jax_ep: " + why);
      vmm_maps_.push_back({va, rec.size, h});
      g_open_mappings.fetch_add(1);
      peers_[r] = reinterpret_cast<char*>(va);
      continue;
    }
    if (r >= static_cast<int>(handles.size()) || handles[r].size() != sizeof(cudaIpcMemHandle_t) + sizeof(mine))
      throw std::invalid_argument("jax_ep: missing IPC handle of rank " + std::to_string(r));
    cudaIpcMemHandle_t h;
    std::memcpy(&h, handles[r].data(), sizeof(h));
    shared = shared && std::memcmp(handles[r].data() + sizeof(h), mine, sizeof(mine)) == 0;
    void* p = nullptr;
    check_cuda(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess),
               "cudaIpcOpenMemHandle");
    peers_[r] = static_cast<char*>(p);
    opened_.push_back(static_cast<char*>(p));
    g_open_mappings.fetch_add(1);
  }
  shares_gpu_ = shared;
  connected_ = true;
}

std::string BufferState::export_window(uint64_t ptr) {
  const Driver& d = driver();
  if (!d.ok || ptr == 0) return "";
  DeviceGuard guard(device_);
  CUdeviceptr base = 0;
  size_t size = 0;
  CUmemGenericAllocationHandle h = 0;
  if (d.get_range(&base, &size, ptr) != CUDA_SUCCESS || d.retain(&h, reinterpret_cast<void*>(base)) != CUDA_SUCCESS)
    return "";  // not a VMM allocation
  CUmemAllocationProp prop{};
  int fd = -1;
  const bool ok = d.props(&prop, h) == CUDA_SUCCESS &&
                  (prop.requestedHandleTypes & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) &&
                  d.export_fd(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0) == CUDA_SUCCESS;
  d.release(h);  // the retain's reference; the allocation stays XLA's
  if (!ok) return "";
  // The whole range must be this one allocation (a mapping of several could not
  // be shared by one descriptor): its last byte's allocation is the same one.
  CUmemGenericAllocationHandle h_last = 0;
  if (d.retain(&h_last, reinterpret_cast<void*>(base + size - 1)) != CUDA_SUCCESS) {
    close(fd);
    return "";
  }
  d.release(h_last);
  if (h_last != h) {
    close(fd);
    return "";
  }
  if (win_fd_ >= 0) close(win_fd_);
  win_fd_ = fd;
  win_base_ = base;
  win_size_ = size;
  return record_bytes(fd, base, size);
}

bool BufferState::import_windows(const std::vector<std::string>& records, std::string* why) {
  const Driver& d = driver();
  drop_windows();
  win_delta_.assign(nranks_, 0);
  if (!d.ok) {
    *why = "the driver lacks the virtual memory calls";
    return false;
  }
  DeviceGuard guard(device_);
  for (int r = 0; r < nranks_; ++r) {
    if (r == rank_) continue;
    if (r >= static_cast<int>(records.size()) || records[r].size() != sizeof(WindowRecord)) {
      *why = "rank " + std::to_string(r) + " has no window";
      drop_windows();
      return false;
    }
    WindowRecord rec;
    std::memcpy(&rec, records[r].data(), sizeof(rec));
    // The descriptor lives in the other process: take a copy of it.
    CUmemGenericAllocationHandle h = 0;
    const CUdeviceptr va = import_record(d, rec, device_, r, "window", &h, why);
    if (va == 0) {
      drop_windows();
      return false;
    }
    win_maps_.push_back({va, rec.size, h});
    win_delta_[r] = static_cast<int64_t>(va) - static_cast<int64_t>(rec.base);
  }
  return true;
}

void BufferState::enable_window(bool on) {
  if (!on) drop_windows();
  window_ = on && win_size_ > 0 && static_cast<int>(win_delta_.size()) == nranks_;
  if (win_fd_ >= 0) {  // every peer holds its own copy by now (or none will)
    close(win_fd_);
    win_fd_ = -1;
  }
}

void BufferState::drop_windows() {
  for (const Mapping& m : win_maps_) release(m);
  win_maps_.clear();
  win_delta_.clear();
  window_ = false;
}

bool BufferState::in_window(const void* p, size_t bytes) const {
  if (p == nullptr) return bytes == 0;
  const uint64_t a = reinterpret_cast<uint64_t>(p);
  return window_ && a >= win_base_ && a - win_base_ <= win_size_ && bytes <= win_size_ - (a - win_base_);
}

bool BufferState::maps_every_rank(int* missing) const {
  for (int r = 0; r < nranks_; ++r)
    if (on_my_node(r) && peers_[r] == nullptr) {
      *missing = r;
      return false;
    }
  return true;
}

CallCtx BufferState::ctx() const {
  CallCtx c{};
  for (int r = 0; r < nranks_; ++r) c.peers.base[r] = peers_[r];
  c.off = off_;
  c.rank = rank_;
  c.nranks = nranks_;
  c.control = reinterpret_cast<uint32_t*>(base_ + off_.control);
  c.inbox = reinterpret_cast<uint64_t*>(base_ + off_.inbox);
  c.fault = fault_dev_;
  c.timeout_ns = timeout_ns_;
  c.transport = transport_;
  c.nodes = num_nodes_;
  c.local_size = nranks_ / num_nodes_;
  c.window = window_ ? 1 : 0;
  c.spread = shares_gpu_ ? 0 : 1;
  if (window_)
    for (int r = 0; r < nranks_; ++r) c.win_delta[r] = win_delta_[r];
  return c;
}

// A kernel that hit its deadline wrote a record and trapped; say who and
// where before the process goes down with the CUDA error.
void BufferState::watch() {
  using namespace std::chrono_literals;
  while (!stop_) {
    std::this_thread::sleep_for(20ms);
    volatile FaultRecord* f = fault_host_;
    if (f->flag != 2) continue;
    if (f->kind == kFaultOrder) {
      std::fprintf(stderr,
                   "jax_ep: ORDER on rank %u: %s began while the previous low-latency send on this "
                   "Buffer (call %u) had not been received. Each *_send must be followed by its "
                   "*_recv before the next send on the Buffer; inside one jitted function XLA orders "
                   "calls only by data, so chain independent calls (lax.optimization_barrier).\n",
                   f->rank, phase_name(f->phase), f->seen);
    } else if (f->kind == kFaultMismatch) {
      std::fprintf(stderr,
                   "jax_ep: MISMATCH on rank %u: %s: rank %u made a different call (call signature "
                   "%08x, this rank's %08x). Every rank of the group must make the same jax_ep calls, "
                   "in the same order, with the same shapes, dtypes, layout and capacity.\n",
                   f->rank, phase_name(f->phase), f->peer, f->seen, f->want);
    } else {
      std::fprintf(stderr,
                   "jax_ep: TIMEOUT on rank %u: %s: rank %u never signalled epoch %u (last seen %u) "
                   "within %.1f s (JAX_EP_TIMEOUT_S). That rank did not make the matching call, "
                   "made a different one, or died.\n",
                   f->rank, phase_name(f->phase), f->peer, f->want, f->seen, timeout_ns_ / 1e9);
    }
    std::fflush(stderr);
    for (int i = 0; i < 500 && !stop_; ++i) std::this_thread::sleep_for(20ms);
    if (!stop_) _exit(70);  // the CUDA context is gone; never hang after a timeout
    return;
  }
}

namespace {
std::mutex g_mu;
std::map<std::pair<uint64_t, int>, std::unique_ptr<BufferState>> g_states;
}  // namespace

BufferState* find_state(uint64_t id, int device) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_states.find({id, device});
  return it == g_states.end() ? nullptr : it->second.get();
}

BufferState* add_state(std::unique_ptr<BufferState> s) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto key = std::make_pair(s->id(), s->device());
  if (g_states.count(key))
    throw std::invalid_argument("jax_ep: a buffer with this id already exists on device " +
                                std::to_string(s->device()) + " (close it first)");
  BufferState* raw = s.get();
  g_states[key] = std::move(s);
  return raw;
}

size_t live_states() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_states.size();
}

void remove_state(uint64_t id, int device) {
  std::unique_ptr<BufferState> victim;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_states.find({id, device});
    if (it == g_states.end()) return;
    victim = std::move(it->second);
    g_states.erase(it);
  }
}

}  // namespace jax_ep
