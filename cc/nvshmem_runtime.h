// NVSHMEM for the paths that cross nodes (and the low-latency NVSHMEM transport):
// one PE per process, bootstrapped with a unique id that the processes share
// through the jax.distributed key-value store (jax_ep/nvshmem.py). Everything
// here is a stub that reports "not built" when the extension has no NVSHMEM.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace jax_ep {

bool nvshmem_built();
// A fresh unique id (rank 0 makes it, every rank passes it to nvshmem_start).
std::string nvshmem_unique_id();
// Initialize this process as PE `rank` of `nranks` on CUDA device `device`.
void nvshmem_start(const std::string& unique_id, int rank, int nranks, int device);
bool nvshmem_running();
int nvshmem_pe();
int nvshmem_npes();
// Every PE puts its PE number into the next PE's symmetric word; returns what
// this PE received (the previous PE's number when the transport works).
int nvshmem_ring_check();
void nvshmem_stop();

// Symmetric memory (collective: every PE calls these in the same order), and
// the pointer through which this PE reaches `pe`'s copy by loads and stores
// (null when only puts reach it, as across nodes).
void* nvshmem_alloc_symmetric(size_t bytes);
void nvshmem_free_symmetric(void* p);
void* nvshmem_peer_pointer(void* p, int pe);

}  // namespace jax_ep
