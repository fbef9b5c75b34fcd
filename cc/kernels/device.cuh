// Device-side building blocks shared by every jax_ep kernel: memory ordering
// across GPUs/processes, deadline-bounded waits, wide copies, number formats.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>

#include "runtime_types.h"

namespace jax_ep {

// ------------------------------------------------------------------ ordering

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint64_t ld_acquire_sys64(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys64(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Epochs are 32-bit and wrap: `a` has reached `b` when a - b, read signed, is >= 0.
__device__ __forceinline__ bool epoch_reached(uint32_t a, uint32_t b) {
  return static_cast<int32_t>(a - b) >= 0;
}

// Record why this rank gave up and stop the kernel. The watchdog of the
// Buffer reads the record from host-mapped memory and names rank and phase.
// One thread writes the record; any other that fails at the same time waits
// until it is complete, since a trap ends the whole grid, the writer included.
__device__ __forceinline__ void fail(const CallCtx& c, uint32_t kind, uint32_t phase, uint32_t peer,
                                     uint32_t seen, uint32_t want) {
  FaultRecord* f = c.fault;
  if (f != nullptr) {
    if (atomicCAS(&f->flag, 0u, 1u) == 0u) {
      f->kind = kind;
      f->rank = c.rank;
      f->phase = phase;
      f->peer = peer;
      f->seen = seen;
      f->want = want;
      __threadfence_system();
      st_release_sys(&f->flag, 2u);
    } else {
      while (ld_acquire_sys(&f->flag) != 2u) __nanosleep(256);
    }
  }
  __trap();
}

// Spin until the epoch tag of `read()` reaches `want`, or fail at the deadline
// naming the peer and the tag last seen; returns the word that satisfied it.
template <typename T, typename Read, typename Tag>
__device__ __forceinline__ T wait_until(const CallCtx& c, uint32_t phase, int peer, uint32_t want,
                                        Read read, Tag tag) {
  T seen = read();
  if (epoch_reached(tag(seen), want)) return seen;
  const uint64_t start = globaltimer_ns();
  while (!epoch_reached(tag(seen = read()), want)) {
    if (globaltimer_ns() - start > c.timeout_ns) fail(c, kFaultTimeout, phase, peer, tag(seen), want);
    __nanosleep(64);
  }
  return seen;
}

// A peer's word for exactly the epoch we waited for carries its call's
// signature: a different one means the ranks made different calls (another
// op, other shapes), and the data must not be used. A word of a later epoch
// (the peer already went on to its next call) carries that call's signature,
// so only exact epochs are compared.
__device__ __forceinline__ void check_signature(const CallCtx& c, uint32_t phase, int peer,
                                                uint32_t epoch, uint32_t want, uint32_t theirs,
                                                uint32_t mine) {
  if (epoch == want && theirs != mine) fail(c, kFaultMismatch, phase, peer, theirs, mine);
}

// Spin until the signal word at `p` ((signature << 32) | epoch, set for peer's part
// of this call) reaches `want` (fail at the deadline), then check that the peer
// made the same call; returns the word.
__device__ __forceinline__ uint64_t wait_word(const CallCtx& c, uint32_t phase, int peer, uint32_t want,
                                              const uint64_t* p) {
  const uint64_t word = wait_until<uint64_t>(c, phase, peer, want, [=] { return ld_acquire_sys64(p); },
                                             [](uint64_t v) { return static_cast<uint32_t>(v); });
  check_signature(c, phase, peer, static_cast<uint32_t>(word), want, static_cast<uint32_t>(word >> 32),
                  c.sig);
  return word;
}

// Spin until peer's signal in our inbox reaches `want`, as wait_word.
__device__ __forceinline__ void wait_signal(const CallCtx& c, uint32_t phase, int peer,
                                            uint32_t want) {
  wait_word(c, phase, peer, want, c.inbox + peer);
}

// Every thread r < nranks of the block runs wait_one(r) for rank r (itself
// excepted); then the block continues together.
template <typename WaitOne>
__device__ __forceinline__ void wait_each(const CallCtx& c, WaitOne wait_one) {
  for (int r = threadIdx.x; r < c.nranks; r += blockDim.x)
    if (r != c.rank) wait_one(r);
  __syncthreads();
}

// Every thread r < nranks of the block waits for rank r's signal.
__device__ __forceinline__ void wait_all(const CallCtx& c, uint32_t phase, uint32_t want) {
  wait_each(c, [&](int r) { wait_signal(c, phase, r, want); });
}

// Tell ranks [first, first + n) (ourselves included) that this rank finished
// phase `epoch` of the call `c.sig`: all writes before this point, by every
// block, are visible first.
__device__ __forceinline__ void signal_range(const CallCtx& c, uint32_t epoch, int first, int n) {
  __threadfence_system();
  const uint64_t word = (static_cast<uint64_t>(c.sig) << 32) | epoch;
  for (int r = first; r < first + n; ++r) {
    uint64_t* inbox = reinterpret_cast<uint64_t*>(c.peers.base[r] + c.off.inbox);
    st_release_sys64(inbox + c.rank, word);
  }
}

// signal_range over every rank of the group.
__device__ __forceinline__ void signal_all(const CallCtx& c, uint32_t epoch) {
  signal_range(c, epoch, 0, c.nranks);
}

// The last block of a grid to reach this point returns true (and resets the
// counter, so the same counter serves the next launch without a memset).
// kSystem: a system-scope fence makes each block's writes, peers' memory
// included, visible before its arrival is counted, so the last block may signal
// peers. Without it (a kernel that only closes the call on its own GPU, where the
// next kernel in stream order sees everything anyway) a GPU-scope fence is enough
// and much cheaper with many blocks.
template <bool kSystem = true>
__device__ __forceinline__ bool last_block_done(uint32_t* counter) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    if constexpr (kSystem) {
      __threadfence_system();
    } else {
      __threadfence();
    }
    const uint32_t n = gridDim.x * gridDim.y * gridDim.z;
    last = atomicAdd(counter, 1u) == n - 1;
    if (last) {
      __threadfence();
      *counter = 0;
    }
  }
  __syncthreads();
  return last;
}

// The last block of the call's last kernel records the call as complete.
__device__ __forceinline__ void close_call(const CallCtx& c, uint32_t* counter, uint32_t epoch,
                                           int32_t* epoch_out) {
  if (last_block_done<false>(counter) && threadIdx.x == 0) {
    c.control[kCtlEpoch] = epoch;
    *epoch_out = static_cast<int32_t>(epoch);
  }
}

// What this rank's call publishes for its receivers (CallRecord), before its signal.
__device__ __forceinline__ void publish_record(const CallCtx& c, uint32_t epoch, bool pull, const void* p0 = nullptr,
                                               const void* p1 = nullptr, const void* p2 = nullptr,
                                               const void* p3 = nullptr) {
  CallRecord* r = reinterpret_cast<CallRecord*>(c.peers.base[c.rank] + c.off.call_rec) + (epoch & 1u);
  r->word = (static_cast<uint64_t>(c.sig) << 32) | epoch;
  r->pull = pull;
  r->ptr[0] = reinterpret_cast<uint64_t>(p0);
  r->ptr[1] = reinterpret_cast<uint64_t>(p1);
  r->ptr[2] = reinterpret_cast<uint64_t>(p2);
  r->ptr[3] = reinterpret_cast<uint64_t>(p3);
}

// Rank `r`'s record of this call, read after its signal was acquired: true when
// r published its operands in place, with their addresses here (through the
// window) in p; a record of another call is a MISMATCH naming `phase`.
__device__ __forceinline__ bool published_operands(const CallCtx& c, int r, uint32_t epoch, uint32_t phase,
                                                   char* (&p)[4]) {
  const auto* rec = reinterpret_cast<const unsigned long long*>(
      reinterpret_cast<const CallRecord*>(c.peers.base[r] + c.off.call_rec) + (epoch & 1u));
  const uint64_t word = __ldcg(rec);
  if (word != ((static_cast<uint64_t>(c.sig) << 32) | epoch))
    fail(c, kFaultMismatch, phase, r, static_cast<uint32_t>(word >> 32), c.sig);
  if (__ldcg(rec + 1) == 0) return false;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint64_t a = __ldcg(rec + 2 + i);
    p[i] = a == 0 ? nullptr : reinterpret_cast<char*>(static_cast<int64_t>(a) + c.win_delta[r]);
  }
  return true;
}

// The last block of a call's last kernel closes the call. With windows it first
// tells every rank that this rank has read all it needed of theirs; a rank whose
// XLA operands were read in place (`published`) then waits until every rank has
// said so, since XLA may reuse that memory once the call is over. `next`: the
// kernel's hand-out counter, back to 0 for the next call (every block has taken
// its last index).
__device__ __forceinline__ void close_call_released(const CallCtx& c, uint32_t* counter, uint32_t epoch,
                                                    int32_t* epoch_out, bool published,
                                                    uint32_t* next = nullptr) {
  const bool last = c.window ? last_block_done<true>(counter) : last_block_done<false>(counter);
  if (!last) return;
  if (next != nullptr && threadIdx.x == 0) *next = 0;
  if (c.window) {
    const uint64_t word = (static_cast<uint64_t>(c.sig) << 32) | epoch;
    for (int r = threadIdx.x; r < c.nranks; r += blockDim.x)
      st_release_sys64(reinterpret_cast<uint64_t*>(c.peers.base[r] + c.off.done_inbox) + c.rank, word);
    if (published) {
      const uint64_t* done = reinterpret_cast<const uint64_t*>(c.peers.base[c.rank] + c.off.done_inbox);
      wait_each(c, [&](int r) { wait_word(c, kPhaseOperandsRelease, r, epoch, done + r); });
    }
  }
  if (threadIdx.x == 0) {
    c.control[kCtlEpoch] = epoch;
    *epoch_out = static_cast<int32_t>(epoch);
  }
}

// A low-latency send of `epoch`: fail if the previous send on this Buffer had the
// same epoch, i.e. its receive has not closed that call yet (two sends in a row:
// their messages would share slots and count words). Every block checks at its
// start; the last block marks the send open (mark_send_open).
__device__ __forceinline__ void check_send_order(const CallCtx& c, uint32_t phase, uint32_t epoch) {
  if (*reinterpret_cast<volatile uint32_t*>(c.control + kCtlSendOpen) == epoch)
    fail(c, kFaultOrder, phase, c.rank, epoch, epoch);
}
__device__ __forceinline__ void mark_send_open(const CallCtx& c, uint32_t epoch) {
  c.control[kCtlSendOpen] = epoch;
}

// The epoch of the call now running: one past the last completed call.
__device__ __forceinline__ uint32_t current_epoch(const CallCtx& c) {
  return *reinterpret_cast<volatile uint32_t*>(c.control + kCtlEpoch) + 1u;
}

__device__ __forceinline__ char* half_base(const CallCtx& c, int rank, uint32_t epoch) {
  return c.peers.base[rank] + (epoch & 1u) * c.off.half_bytes;
}

// The (rank, token) pair of a kernel's item-th piece of work when it walks the
// T tokens of every rank to read from, or write to, each rank. With the ranks on
// other GPUs (c.spread) the ranks are interleaved item by item, each rank
// starting at its own, so that all ranks load every link at once: in rank-major
// order every rank would read (or write) rank 0 first, and rank 0's links would
// carry it all. Ranks sharing one GPU keep rank-major order (no links to
// balance; each rank's rows are read in one stretch). Which warp does what
// changes no result.
struct RankToken {
  int rank, t;
};
__device__ __forceinline__ RankToken rank_token(const CallCtx& c, int item, int T) {
  if (!c.spread) return {item / T, item % T};
  return {(item + c.rank) % c.nranks, item / c.nranks};
}

// Whether this rank's kernels have the GPU to themselves (one rank, or ranks on
// other GPUs): no other rank's blocks compete with this grid's for SMs, so none
// of its blocks waits long for one (for_each_handed_out).
__device__ __forceinline__ bool alone_on_gpu(const CallCtx& c) { return c.nranks == 1 || c.spread != 0; }

// ------------------------------------------------------------------ copies

// Read-once data from another rank's staging: bypass L1 (and, unless disabled,
// hint the L2 to fetch 256 B). The data was released by a flag we acquired,
// so the non-coherent path is safe here.
__device__ __forceinline__ int4 ld_stream(const int4* p) {
#ifdef JAX_EP_DISABLE_AGGRESSIVE_PTX
  return __ldcg(p);
#else
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
#endif
}

__device__ __forceinline__ void st_stream(int4* p, int4 v) { __stcs(p, v); }

// ------------------------------------------------------------------ formats

template <typename T>
struct Num;

template <>
struct Num<float> {
  __device__ static float to_f32(float v) { return v; }
  __device__ static float from_f32(float v) { return v; }
};
template <>
struct Num<__nv_bfloat16> {
  __device__ static float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Num<__half> {
  __device__ static float to_f32(__half v) { return __half2float(v); }
  __device__ static __half from_f32(float v) { return __float2half_rn(v); }
};

// 16 bytes of T viewed as floats.
template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
  __device__ static void load(const int4& raw, float* out) {
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = Num<T>::to_f32(v[i]);
  }
  __device__ static int4 store(const float* in) {
    int4 raw;
    T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = Num<T>::from_f32(in[i]);
    return raw;
  }
};

// NaN-propagating max of |v| (fmaxf would drop a NaN; the xla quantizer keeps it).
// max(a, b), NaN (the canonical one) if either is NaN: one instruction.
__device__ __forceinline__ float max_nan(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

// max(a, |v|), NaN if either is NaN (the |v| folds into the instruction).
__device__ __forceinline__ float absmax_nan(float a, float v) { return max_nan(a, fabsf(v)); }

// float32 -> e4m3fn, round to nearest even, saturating to +-448 (NaN stays NaN).
__device__ __forceinline__ uint8_t to_e4m3(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// Two values in one conversion (the same rounding as to_e4m3): lo in the low byte.
__device__ __forceinline__ uint32_t to_e4m3x2(float lo, float hi) {
  return static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float from_e4m3(uint8_t v) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(v), __NV_E4M3);
  return __half2float(__half(h));
}

// 2**ceil(log2(s)) on the bits, as jax_ep.fp8.round_to_pow2.
__device__ __forceinline__ float round_pow2(float s) {
  if (!isfinite(s)) return s;
  uint32_t b = __float_as_uint(s);
  uint32_t e = b & 0x7F800000u;
  if (b & 0x007FFFFFu) e += 0x00800000u;
  return __uint_as_float(e);
}

}  // namespace jax_ep
