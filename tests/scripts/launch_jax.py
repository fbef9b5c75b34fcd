"""jax.distributed through jax_ep.distributed: process count, key-value store, collectives."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_ep import distributed

assert distributed.initialize()
assert distributed.initialize()  # idempotent
me, n = distributed.process_index(), distributed.num_processes()
assert (jax.process_index(), jax.process_count()) == (me, n)
assert len(jax.devices()) == 2 * n and len(jax.local_devices()) == 2
print(f"process {jax.process_index()} of {jax.process_count()}, {len(jax.devices())} devices")

kv = distributed.kv_store("launch-test")
payload = bytes([me, 0, 255]) + f"rank {me}".encode()
got = kv.all_gather("payload", payload)
assert got == [bytes([p, 0, 255]) + f"rank {p}".encode() for p in range(n)], got
kv.barrier("after-payload")
print(f"kv round trip ok: {len(got)} payloads")

shard_map = getattr(jax, "shard_map", None)
if shard_map is None:
    from jax.experimental.shard_map import shard_map

mesh = jax.make_mesh((2 * n,), ("ep",))
sharding = NamedSharding(mesh, P("ep"))
rows = np.arange(2 * n * 4, dtype=np.float32).reshape(2 * n, 4)
x = jax.make_array_from_callback(rows.shape, sharding, lambda idx: rows[idx])


def step(block):
    total = jax.lax.psum(block, "ep")
    # Row j of every shard goes to device j: the all_to_all the xla backend relies on.
    swapped = jax.lax.all_to_all(jnp.tile(block, (2 * n, 1)), "ep", 0, 0, tiled=True)
    return total, swapped


total, swapped = jax.jit(shard_map(step, mesh=mesh, in_specs=P("ep"), out_specs=(P(), P("ep"))))(x)
np.testing.assert_array_equal(np.asarray(total.addressable_data(0)), rows.sum(0, keepdims=True))
for shard in swapped.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), rows)
print(f"psum ok: {np.asarray(total.addressable_data(0)).tolist()}")
