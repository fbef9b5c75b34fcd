// The nanobind module jax_ep._ext: FFI registrations and Buffer management.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>

#include "ffi_low_latency.h"
#include "ffi_normal.h"
#include "kernels/fp8_check.h"
#include "kernels/normal.h"
#include "nvshmem_runtime.h"
#include "runtime.h"

namespace nb = nanobind;
using jax_ep::BufferState;

namespace {

template <typename T>
nb::capsule capsule(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "an FFI handler has the XLA_FFI_Handler signature");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

jax_ep::Offsets offsets_from(const nb::dict& d) {
  auto get = [&](const char* k) -> size_t {
    return d.contains(k) ? nb::cast<size_t>(d[k]) : 0;
  };
  jax_ep::Offsets o{};
  o.x_stage = get("x_stage0");
  o.idx_stage = get("idx_stage0");
  o.w_stage = get("w_stage0");
  o.comb_recv = get("comb_recv0");
  o.vals_recv = get("vals_recv0");
  o.half_bytes = get("half_bytes");
  o.inbox = get("inbox");
  o.control = get("control");
  o.route_rank = get("route_rank");
  o.route_cnt = get("route_cnt");
  o.ll_recv = get("ll_recv0");
  o.ll_comb = get("ll_comb0");
  o.ll_count = get("ll_count");
  o.ll_stage = get("ll_stage0");
  o.ll_send = get("ll_send");
  o.ll_comb_send = get("ll_comb_send");
  o.rdma_recv = get("rdma_recv0");
  o.comb_fwd = get("comb_fwd0");
  o.vals_fwd = get("vals_fwd0");
  o.fwd_tag = get("fwd_tag0");
  o.rdma_flag = get("rdma_flag");
  o.rdma_ready = get("rdma_ready");
  o.fwd_inbox = get("fwd_inbox");
  o.call_rec = get("call_rec");
  o.done_inbox = get("done_inbox");
  return o;
}

BufferState* state(uint64_t id, int device) {
  BufferState* s = jax_ep::find_state(id, device);
  if (s == nullptr) throw std::invalid_argument("jax_ep: no such buffer on this device");
  return s;
}

// Run one CUDA runtime call with `device` current, then restore the caller's device.
template <typename F>
void on_device(int device, F call, const char* what) {
  int prev = 0;
  cudaGetDevice(&prev);
  jax_ep::check_cuda(cudaSetDevice(device), "cudaSetDevice");
  const cudaError_t e = call();
  cudaSetDevice(prev);
  jax_ep::check_cuda(e, what);
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "jax_ep CUDA extension: FFI handlers, communication buffers";
  m.attr("route_chunk") = jax_ep::kRouteChunk;  // jax_ep.buffer.ROUTE_CHUNK sizes the route tables by it

  m.def("registrations", []() {
    nb::dict d;
    d["jax_ep_dispatch"] = capsule(jax_ep::JaxEpDispatch);
    d["jax_ep_combine"] = capsule(jax_ep::JaxEpCombine);
    d["jax_ep_redispatch"] = capsule(jax_ep::JaxEpRedispatch);
    d["jax_ep_all_reduce"] = capsule(jax_ep::JaxEpAllReduce);
    d["jax_ep_ll_dispatch_send"] = capsule(jax_ep::JaxEpLLDispatchSend);
    d["jax_ep_ll_dispatch_recv"] = capsule(jax_ep::JaxEpLLDispatchRecv);
    d["jax_ep_ll_combine_send"] = capsule(jax_ep::JaxEpLLCombineSend);
    d["jax_ep_ll_combine_recv"] = capsule(jax_ep::JaxEpLLCombineRecv);
    d["jax_ep_ll_dispatch_local"] = capsule(jax_ep::JaxEpLLDispatchLocal);
    d["jax_ep_ll_combine_local"] = capsule(jax_ep::JaxEpLLCombineLocal);
    return d;
  });

  m.def(
      "create",
      [](uint64_t id, int device, int rank, int nranks, int max_tokens, nb::dict offsets,
         double timeout_s, int transport, int num_nodes, bool vmm) {
        const size_t total = nb::cast<size_t>(offsets["total"]);
        jax_ep::add_state(std::make_unique<BufferState>(id, device, rank, nranks, max_tokens, total,
                                                        offsets_from(offsets), timeout_s, transport,
                                                        num_nodes, vmm));
      },
      nb::arg("buffer_id"), nb::arg("device"), nb::arg("rank"), nb::arg("nranks"),
      nb::arg("max_tokens"), nb::arg("offsets"), nb::arg("timeout_s"), nb::arg("transport") = 0,
      nb::arg("num_nodes") = 1, nb::arg("vmm") = false,
      "Allocate this device's communication memory of a buffer: device memory mapped by "
      "its peers (transport 0), or NVSHMEM symmetric memory (transport 1, collective: every "
      "PE calls it, in the same order, and the group is already connected). num_nodes > 1: "
      "ranks are grouped into that many nodes, and the normal-mode kernels reach the other "
      "nodes by puts only (NVSHMEM puts, or on the peer transport stores through peer "
      "pointers). vmm (peer transport): a VMM allocation that the peers map through a "
      "copy of its file descriptor, where the driver allows (else cudaMalloc and a CUDA IPC "
      "handle; describe() says which).");

  m.def(
      "ipc_handle",
      [](uint64_t id, int device) {
        const std::string h = state(id, device)->ipc_handle();
        return nb::bytes(h.data(), h.size());
      },
      "What the peers need to map the buffer's memory on this device (a CUDA IPC handle, or "
      "the VMM allocation's record), then the GPU's UUID.");

  m.def(
      "close_export", [](uint64_t id, int device) { state(id, device)->close_export(); },
      nb::arg("buffer_id"), nb::arg("device"),
      "Close the descriptor ipc_handle() exported (every peer has mapped the memory).");

  m.def(
      "connect",
      [](uint64_t id, int device, std::vector<nb::bytes> handles, std::vector<int> local_devices) {
        BufferState* s = state(id, device);
        std::vector<std::string> hs;
        for (auto& h : handles) hs.emplace_back(h.c_str(), h.size());
        std::vector<BufferState*> local(s->nranks(), nullptr);
        for (int r = 0; r < static_cast<int>(local_devices.size()) && r < s->nranks(); ++r)
          if (local_devices[r] >= 0) local[r] = state(id, local_devices[r]);
        s->connect(hs, local);
      },
      nb::arg("buffer_id"), nb::arg("device"), nb::arg("handles"), nb::arg("local_devices"),
      "Map the peers: IPC handles per rank (other processes), or the device of each rank "
      "driven by this process (-1 elsewhere).");

  m.def(
      "export_window",
      [](uint64_t id, int device, uint64_t ptr) {
        const std::string rec = state(id, device)->export_window(ptr);
        return nb::bytes(rec.data(), rec.size());
      },
      nb::arg("buffer_id"), nb::arg("device"), nb::arg("ptr"),
      "A record that lets the peers map the device allocation holding `ptr` (empty: it "
      "cannot be shared).");

  m.def(
      "import_windows",
      [](uint64_t id, int device, std::vector<nb::bytes> records) {
        std::vector<std::string> rs;
        for (auto& r : records) rs.emplace_back(r.c_str(), r.size());
        std::string why;
        const bool ok = state(id, device)->import_windows(rs, &why);
        return nb::make_tuple(ok, why);
      },
      nb::arg("buffer_id"), nb::arg("device"), nb::arg("records"),
      "Map every other rank's window record; (ok, why not).");

  m.def(
      "enable_window", [](uint64_t id, int device, bool on) { state(id, device)->enable_window(on); },
      nb::arg("buffer_id"), nb::arg("device"), nb::arg("on"),
      "Switch the windows on (every rank mapped every other) or drop them.");

  m.def(
      "window_on", [](uint64_t id, int device) { return state(id, device)->window_on(); },
      nb::arg("buffer_id"), nb::arg("device"));

  m.def(
      "describe",
      [](uint64_t id, int device) {
        const BufferState* s = state(id, device);
        nb::dict d;
        d["rank"] = s->rank();
        d["nranks"] = s->nranks();
        d["num_nodes"] = s->num_nodes();
        d["vmm"] = s->vmm();
        d["windows"] = s->window_on();
        return d;
      },
      nb::arg("buffer_id"), nb::arg("device"),
      "What this device's state of a buffer is: rank, nranks, num_nodes, vmm (a VMM "
      "allocation), windows.");

  m.def("close", [](uint64_t id, int device) { jax_ep::remove_state(id, device); },
        "Free a buffer's memory on one device.");

  m.def(
      "synchronize",
      [](int device) {
        on_device(device, [] { return cudaDeviceSynchronize(); }, "cudaDeviceSynchronize");
      },
      "Wait for all work on a CUDA device.");

  m.def(
      "fault",
      [](uint64_t id, int device) -> nb::object {
        const jax_ep::FaultRecord& f = state(id, device)->fault();
        if (f.flag != 2) return nb::none();
        nb::dict d;
        d["kind"] = f.kind == jax_ep::kFaultMismatch ? "mismatch" : f.kind == jax_ep::kFaultOrder ? "order" : "timeout";
        d["rank"] = f.rank;
        d["phase"] = f.phase;
        d["peer"] = f.peer;
        d["seen"] = f.seen;
        d["want"] = f.want;
        return d;
      },
      "The fault record of a buffer (timeout, mismatch or order), or None.");

  m.def(
      "resources",
      [](int device) {
        size_t free_b = 0, total_b = 0;
        on_device(device, [&] { return cudaMemGetInfo(&free_b, &total_b); }, "cudaMemGetInfo");
        nb::dict d;
        d["free_bytes"] = free_b;
        d["total_bytes"] = total_b;
        d["ipc_mappings"] = jax_ep::g_open_mappings.load();
        d["buffers"] = jax_ep::live_states();
        return d;
      },
      "Device memory (cudaMemGetInfo), the other processes' Buffers this process maps (by CUDA "
      "IPC handle or VMM descriptor: ipc_mappings) and its buffers.");

  m.def("capture_stats", []() {
    auto [calls, captured] = jax_ep::capture_stats();
    return nb::make_tuple(calls, captured);
  }, "(FFI handler calls, of which made while recording a CUDA graph)");

  m.def("nvshmem_built", &jax_ep::nvshmem_built, "Whether this build links NVSHMEM.");
  m.def(
      "nvshmem_unique_id",
      []() {
        const std::string id = jax_ep::nvshmem_unique_id();
        return nb::bytes(id.data(), id.size());
      },
      "A fresh NVSHMEM unique id (made by rank 0, shared with every rank).");
  m.def(
      "nvshmem_start",
      [](nb::bytes unique_id, int rank, int nranks, int device) {
        jax_ep::nvshmem_start(std::string(unique_id.c_str(), unique_id.size()), rank, nranks, device);
      },
      "Initialize NVSHMEM as PE `rank` of `nranks` on a CUDA device.");
  m.def("nvshmem_running", &jax_ep::nvshmem_running);
  m.def("nvshmem_pe", &jax_ep::nvshmem_pe);
  m.def("nvshmem_npes", &jax_ep::nvshmem_npes);
  m.def("nvshmem_ring_check", &jax_ep::nvshmem_ring_check,
        "Each PE puts its number into the next PE's symmetric word; returns the word received.");
  m.def("nvshmem_stop", &jax_ep::nvshmem_stop, "Finalize NVSHMEM in this process.");

  m.def(
      "fp8_quotient_check",
      [](const std::string& kind, bool round_scale, int device) {
        const int k = kind == "bf16" ? 0 : kind == "fp16" ? 1 : kind == "fp32" ? 2 : kind == "scale" ? 3 : -1;
        if (k < 0) throw std::invalid_argument("jax_ep: fp8_quotient_check kind: bf16, fp16, fp32 or scale");
        jax_ep::Fp8QuotientCheck r{};
        on_device(device, [&] { return jax_ep::fp8_quotient_check(k, round_scale, &r); }, "fp8_quotient_check");
        return nb::make_tuple(r.pairs, r.fp8, r.quotient);
      },
      nb::arg("kind"), nb::arg("round_scale"), nb::arg("device"),
      "(pairs, e4m3 mismatches, float32 quotient mismatches) of the FP8 quantizer's "
      "quotient against IEEE division on a CUDA device: every BF16 or FP16 pair, "
      "or float32 samples; kind \"scale\": every block scale from a finite amax.");

  m.def("version", []() { return "0.1.0"; });
}
