"""jax_ep.nvshmem on a machine without NVSHMEM in the build: clear errors, no side effects."""

import pytest

from jax_ep import nvshmem


def test_not_built_says_how_to_build():
    if nvshmem.available():
        pytest.skip("this build links NVSHMEM")
    assert not nvshmem.running()
    with pytest.raises(RuntimeError, match="JAX_EP_NVSHMEM=ON"):
        nvshmem.initialize()


def test_buffer_transport_is_checked():
    import jax
    import jax.numpy as jnp

    import jax_ep

    mesh = jax.make_mesh((1,), ("ep",), devices=jax.devices("cpu")[:1])
    kw = dict(hidden=256, max_tokens_per_rank=8, num_experts=8, top_k=2, dtype=jnp.bfloat16,
              low_latency=True)
    with pytest.raises(ValueError, match="transport must be 'peer' or 'nvshmem'"):
        jax_ep.Buffer(mesh, "ep", name="bad-transport", transport="ib", **kw)
    # The NVSHMEM transport stages what its puts read: more memory per rank.
    sizes = {t: jax_ep.Buffer.size_hint(num_ranks=2, hidden=256, max_tokens_per_rank=8,
                                        num_experts=8, top_k=2, low_latency=True, transport=t)
             for t in ("peer", "nvshmem")}
    assert sizes["nvshmem"] > sizes["peer"]
    buf = jax_ep.Buffer(mesh, "ep", name="nvshmem-on-cpu", transport="nvshmem", **kw)
    try:
        assert buf.transport == "nvshmem" and not buf.allocated  # no GPU memory on a CPU mesh
    finally:
        buf.close()
