"""NVSHMEM in a jax_ep job: one PE per process.

    from jax_ep import distributed, nvshmem
    distributed.initialize()
    pe, npes = nvshmem.initialize()

Process 0 makes an NVSHMEM unique id and shares it through the `jax.distributed`
key-value store (keys under `jax_ep/nvshmem/`); every process then starts as PE
`jax.process_index()` of `jax.process_count()` on its first local GPU. NVSHMEM
reads its settings from the environment when it starts (docs/nvshmem.md); on a
job whose processes all run on one host, unset settings get single-host
defaults: no remote transport (`NVSHMEM_REMOTE_TRANSPORT=none`), the bootstrap on
the loopback interface, and no NCCL inside NVSHMEM. The extension must be built
with NVSHMEM (`-Ccmake.define.JAX_EP_NVSHMEM=ON`, BUILD.md).
"""

from __future__ import annotations

import atexit
import os
from typing import Optional, Tuple

import jax

from . import distributed

NAMESPACE = "jax_ep/nvshmem"

_SINGLE_HOST_DEFAULTS = {
    "NVSHMEM_REMOTE_TRANSPORT": "none",
    "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo",
    "NVSHMEM_DISABLE_NCCL": "1",
    # several PEs on one GPU under MPS with a thread-percentage cap each
    "NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "1",
}


def _ext():
    try:
        from . import _ext as ext
    except ImportError:
        return None
    return ext


def available() -> bool:
    """Whether this build of jax_ep links NVSHMEM."""
    ext = _ext()
    return ext is not None and bool(ext.nvshmem_built())


def running() -> bool:
    ext = _ext()
    return ext is not None and bool(ext.nvshmem_running())


def _single_host() -> bool:
    # The launcher's simulated nodes (--nodes) share this host: their puts go over
    # P2P like any other PE's here, so they take the single-host settings too.
    coordinator = os.environ.get(distributed.ENV_COORDINATOR, "127.0.0.1")
    return coordinator.split(":")[0] in ("127.0.0.1", "localhost") or jax.process_count() == 1


def initialize(symmetric_size: Optional[int] = None) -> Tuple[int, int]:
    """Start NVSHMEM in this process (once); returns (this PE, number of PEs).

    `symmetric_size`: bytes of symmetric heap per PE (NVSHMEM_SYMMETRIC_SIZE; the
    NVSHMEM Buffers of the job must fit in it). Unset, NVSHMEM's default or the
    environment's value holds.
    """
    ext = _ext()
    if ext is None or not ext.nvshmem_built():
        raise RuntimeError("jax_ep was built without NVSHMEM; rebuild with "
                           "pip install --no-build-isolation -e . -Ccmake.define.JAX_EP_NVSHMEM=ON")
    if ext.nvshmem_running():
        return int(ext.nvshmem_pe()), int(ext.nvshmem_npes())
    gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
    if not gpus:
        raise RuntimeError("NVSHMEM needs a GPU in this process")
    if _single_host():
        for k, v in _SINGLE_HOST_DEFAULTS.items():
            os.environ.setdefault(k, v)
    if symmetric_size is not None:
        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(int(symmetric_size))
    pid, n = jax.process_index(), jax.process_count()
    if n == 1:
        uid = ext.nvshmem_unique_id()
    else:
        kv = distributed.kv_store(NAMESPACE)
        if pid == 0:
            uid = ext.nvshmem_unique_id()
            kv.set("unique_id", uid)
        else:
            uid = kv.get("unique_id")
    ext.nvshmem_start(uid, pid, n, gpus[0].local_hardware_id)
    atexit.register(_stop)
    return int(ext.nvshmem_pe()), int(ext.nvshmem_npes())


def heap_bytes(**size_hint_kwargs) -> int:
    """A symmetric heap for one NVSHMEM Buffer of this configuration (the keyword
    arguments of `jax_ep.Buffer.size_hint`, without `transport`) and 256 MiB for
    NVSHMEM's own use: the `symmetric_size` to pass to `initialize`."""
    from .buffer import Buffer

    return Buffer.size_hint(transport="nvshmem", **size_hint_kwargs) + (256 << 20)


def _stop() -> None:
    """At exit: NVSHMEM Buffers first (their memory is symmetric, freed by every PE
    together), then NVSHMEM itself."""
    from . import buffer as buffer_lib

    try:
        for buf in list(buffer_lib._REGISTRY.values()):
            if buf.transport == "nvshmem":
                buf.close()
    finally:
        _ext().nvshmem_stop()
