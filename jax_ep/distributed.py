"""Multi-process bootstrap: `jax.distributed` from what `python -m jax_ep.launch` sets.

The launcher gives every process these environment variables:

    JAX_EP_COORDINATOR      host:port of the coordinator (process 0 serves it)
    JAX_EP_NUM_PROCESSES    processes in the job
    JAX_EP_PROCESS_ID       this process, 0 .. JAX_EP_NUM_PROCESSES-1
    JAX_EP_NUM_NODES        (simulated) nodes; processes are grouped into nodes contiguously
    JAX_EP_NODE_RANK        this process's node
    JAX_EP_LOCAL_RANK       this process's index inside its node
    JAX_EP_LOCAL_SIZE       processes per node

`initialize()` turns them into a `jax.distributed` job, and `kv_store()` exposes the
job's key-value store so processes can exchange bytes (IPC handles, NVSHMEM unique
ids, configuration checks).
"""

from __future__ import annotations

import base64
import os
from typing import Any

import jax

ENV_COORDINATOR = "JAX_EP_COORDINATOR"
ENV_NUM_PROCESSES = "JAX_EP_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_EP_PROCESS_ID"
ENV_NUM_NODES = "JAX_EP_NUM_NODES"
ENV_NODE_RANK = "JAX_EP_NODE_RANK"
ENV_LOCAL_RANK = "JAX_EP_LOCAL_RANK"
ENV_LOCAL_SIZE = "JAX_EP_LOCAL_SIZE"

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def is_launched() -> bool:
    """True when this process was started by `python -m jax_ep.launch`."""
    return all(os.environ.get(v) for v in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID))


def _client() -> Any:
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def is_initialized() -> bool:
    """True once `jax.distributed` is up in this process (by us or by the user)."""
    return _client() is not None


def _use_gloo_on_cpu() -> None:
    # Cross-process collectives on CPU devices need an implementation; setting it only
    # affects the CPU client, so it is harmless on GPU jobs.
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:
        pass


def initialize(*, initialization_timeout: int = 300) -> bool:
    """Starts `jax.distributed` from the launcher's environment variables.

    Call it before anything touches a JAX device. Idempotent.

    Returns:
        True when `jax.distributed` is initialized after the call (now or before);
        False, doing nothing, when the process was not started by the launcher.
    """
    if is_initialized():
        return True
    if not is_launched():
        return False
    coordinator = os.environ[ENV_COORDINATOR]
    kwargs: dict[str, Any] = dict(
        coordinator_address=coordinator,
        num_processes=int(os.environ[ENV_NUM_PROCESSES]),
        process_id=int(os.environ[ENV_PROCESS_ID]),
        initialization_timeout=initialization_timeout,
        # Everything comes from the launcher: a scheduler's variables (SLURM, Open MPI)
        # must not override it, nor pick local devices behind CUDA_VISIBLE_DEVICES.
        cluster_detection_method="deactivate",
    )
    # A loopback coordinator is served on loopback only, not on every interface.
    if coordinator.rsplit(":", 1)[0] in _LOOPBACK_HOSTS:
        kwargs["coordinator_bind_address"] = coordinator
    _use_gloo_on_cpu()
    jax.distributed.initialize(**kwargs)
    return True


def process_index() -> int:
    """This process's index in the job (`jax.process_index()` when not launched)."""
    value = _env_int(ENV_PROCESS_ID)
    return jax.process_index() if value is None else value


def num_processes() -> int:
    """Processes in the job (`jax.process_count()` when not launched)."""
    value = _env_int(ENV_NUM_PROCESSES)
    return jax.process_count() if value is None else value


def num_nodes() -> int:
    """(Simulated) nodes in the job; 1 unless the launcher was given `--nodes`."""
    return _env_int(ENV_NUM_NODES) or 1


def node_rank() -> int:
    """This process's node, 0 .. num_nodes()-1."""
    return _env_int(ENV_NODE_RANK) or 0


def local_rank() -> int:
    """This process's index inside its node."""
    return _env_int(ENV_LOCAL_RANK) or 0


def local_size() -> int:
    """Processes per node."""
    value = _env_int(ENV_LOCAL_SIZE)
    return num_processes() // num_nodes() if value is None else value


def _default_timeout_s() -> float:
    return float(os.environ.get("JAX_EP_TIMEOUT_S", "100"))


class KVStore:
    """Bytes exchange between the job's processes over JAX's key-value store.

    Keys live under `namespace/`. A key is written once; reads block until it exists
    or `timeout_s` passes (default `JAX_EP_TIMEOUT_S`, 100 s).
    """

    def __init__(self, client: Any, namespace: str):
        self._client = client
        self.namespace = namespace.rstrip("/")
        self._native_bytes = hasattr(client, "key_value_set_bytes") and hasattr(
            client, "blocking_key_value_get_bytes"
        )

    def _key(self, key: str) -> str:
        return f"{self.namespace}/{key}"

    def set(self, key: str, value: bytes | str) -> None:
        """Publishes `value` under `key`."""
        data = value.encode() if isinstance(value, str) else bytes(value)
        if self._native_bytes:
            self._client.key_value_set_bytes(self._key(key), data)
        else:
            self._client.key_value_set(self._key(key), base64.b64encode(data).decode("ascii"))

    def get(self, key: str, *, timeout_s: float | None = None) -> bytes:
        """Waits for `key` and returns its bytes."""
        ms = int(1000 * (_default_timeout_s() if timeout_s is None else timeout_s))
        if self._native_bytes:
            return bytes(self._client.blocking_key_value_get_bytes(self._key(key), ms))
        return base64.b64decode(self._client.blocking_key_value_get(self._key(key), ms))

    def all_gather(self, key: str, value: bytes | str, *,
                   timeout_s: float | None = None) -> list[bytes]:
        """Publishes this process's `value` and returns every process's, in process order."""
        self.set(f"{key}/{process_index()}", value)
        return [self.get(f"{key}/{p}", timeout_s=timeout_s) for p in range(num_processes())]

    def barrier(self, name: str, *, timeout_s: float | None = None) -> None:
        """Blocks until every process of the job reaches the barrier `name`."""
        ms = int(1000 * (_default_timeout_s() if timeout_s is None else timeout_s))
        self._client.wait_at_barrier(self._key(name), ms)


def kv_store(namespace: str = "jax_ep") -> KVStore:
    """The job's key-value store, with keys prefixed by `namespace/`.

    Raises:
        RuntimeError: `jax.distributed` is not initialized.
    """
    client = _client()
    if client is None:
        raise RuntimeError(
            "jax.distributed is not initialized: run under `python -m jax_ep.launch` and call "
            "jax_ep.distributed.initialize() first"
        )
    return KVStore(client, namespace)
