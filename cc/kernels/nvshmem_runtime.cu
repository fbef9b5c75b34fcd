#include "nvshmem_runtime.h"

#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>

#include "runtime.h"

#ifdef JAX_EP_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace jax_ep {

#ifdef JAX_EP_WITH_NVSHMEM

namespace {

bool g_running = false;

__global__ void ring_put_kernel(int* word) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    const int me = nvshmem_my_pe(), n = nvshmem_n_pes();
    nvshmem_int_p(word, me, (me + 1) % n);
    nvshmem_quiet();
  }
}

}  // namespace

bool nvshmem_built() { return true; }

std::string nvshmem_unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (nvshmemx_get_uniqueid(&id) != 0) throw std::runtime_error("jax_ep: nvshmemx_get_uniqueid failed");
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

void nvshmem_start(const std::string& unique_id, int rank, int nranks, int device) {
  if (g_running) throw std::runtime_error("jax_ep: NVSHMEM is already initialized in this process");
  nvshmemx_uniqueid_t id;
  if (unique_id.size() != sizeof(id))
    throw std::invalid_argument("jax_ep: an NVSHMEM unique id has " + std::to_string(sizeof(id)) +
                                " bytes, got " + std::to_string(unique_id.size()));
  std::memcpy(&id, unique_id.data(), sizeof(id));
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(rank, nranks, &id, &attr) != 0)
    throw std::runtime_error("jax_ep: nvshmemx_set_attr_uniqueid_args failed");
  if (nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0)
    throw std::runtime_error("jax_ep: nvshmemx_init_attr failed (NVSHMEM_INFO=1 says why)");
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != nranks)
    throw std::runtime_error("jax_ep: NVSHMEM started as PE " + std::to_string(nvshmem_my_pe()) +
                             " of " + std::to_string(nvshmem_n_pes()) + ", expected " +
                             std::to_string(rank) + " of " + std::to_string(nranks));
  g_running = true;
}

bool nvshmem_running() { return g_running; }
int nvshmem_pe() { return g_running ? nvshmem_my_pe() : -1; }
int nvshmem_npes() { return g_running ? nvshmem_n_pes() : 0; }

int nvshmem_ring_check() {
  if (!g_running) throw std::runtime_error("jax_ep: NVSHMEM is not initialized");
  int* word = static_cast<int*>(nvshmem_malloc(sizeof(int)));
  if (word == nullptr) throw std::runtime_error("jax_ep: nvshmem_malloc failed");
  check_cuda(cudaMemset(word, 0xff, sizeof(int)), "cudaMemset");
  nvshmem_barrier_all();  // every word is reset before any put lands
  ring_put_kernel<<<1, 32>>>(word);
  check_cuda(cudaGetLastError(), "ring kernel launch");
  check_cuda(cudaDeviceSynchronize(), "ring kernel");
  nvshmem_barrier_all();  // every put is complete
  int got = -2;
  check_cuda(cudaMemcpy(&got, word, sizeof(int), cudaMemcpyDeviceToHost), "cudaMemcpy");
  nvshmem_barrier_all();
  nvshmem_free(word);
  return got;
}

void* nvshmem_alloc_symmetric(size_t bytes) {
  if (!g_running)
    throw std::runtime_error("jax_ep: the NVSHMEM transport needs jax_ep.nvshmem.initialize() first");
  void* p = nvshmem_malloc(bytes);
  if (p == nullptr)
    throw std::runtime_error("jax_ep: nvshmem_malloc of " + std::to_string(bytes) +
                             " bytes failed (raise NVSHMEM_SYMMETRIC_SIZE)");
  check_cuda(cudaMemset(p, 0, bytes), "cudaMemset of symmetric memory");
  check_cuda(cudaDeviceSynchronize(), "symmetric memory initialisation");
  nvshmem_barrier_all();  // every PE's copy is zero before any peer writes to it
  return p;
}

void nvshmem_free_symmetric(void* p) {
  if (g_running && p != nullptr) nvshmem_free(p);
}

void* nvshmem_peer_pointer(void* p, int pe) { return g_running ? nvshmem_ptr(p, pe) : nullptr; }

void nvshmem_stop() {
  if (!g_running) return;
  nvshmem_finalize();
  g_running = false;
}

#else  // no NVSHMEM in this build

namespace {
[[noreturn]] void not_built() {
  throw std::runtime_error("jax_ep was built without NVSHMEM (build with -Ccmake.define.JAX_EP_NVSHMEM=ON)");
}
}  // namespace

bool nvshmem_built() { return false; }
std::string nvshmem_unique_id() { not_built(); }
void nvshmem_start(const std::string&, int, int, int) { not_built(); }
bool nvshmem_running() { return false; }
int nvshmem_pe() { return -1; }
int nvshmem_npes() { return 0; }
int nvshmem_ring_check() { not_built(); }
void nvshmem_stop() {}
void* nvshmem_alloc_symmetric(size_t) { not_built(); }
void nvshmem_free_symmetric(void*) {}
void* nvshmem_peer_pointer(void*, int) { return nullptr; }

#endif

}  // namespace jax_ep
