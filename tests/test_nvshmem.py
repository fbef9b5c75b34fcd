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


@pytest.mark.parametrize("hidden,tokens,experts,ranks", [(256, 8, 8, 2), (7168, 128, 256, 8), (7168, 1, 256, 1)])
def test_nvshmem_staging_fits_the_kernels(hidden, tokens, experts, ranks):
    """The send kernels stage a token at ll_send + t * (message stride + 16 headers of
    16 bytes) and a combine row at ll_comb_send + g * 2H, g < R * M * min(K, E/R)."""
    from jax_ep.buffer import Layout

    top_k = 8
    off = Layout(ranks, hidden, tokens, top_k, experts, 2, True, "nvshmem").offsets()
    names = sorted((k for k in off if k not in ("half_bytes", "total")), key=off.get)
    ends = [off[k] for k in names[1:]] + [off["total"]]
    size = {k: end - off[k] for k, end in zip(names, ends)}
    stride = (16 + 2 * hidden + 15) // 16 * 16 + 16 * 16
    assert size["ll_send"] >= tokens * stride
    local_slots = min(top_k, experts // ranks)
    assert size["ll_comb_send"] >= ranks * tokens * local_slots * hidden * 2
    assert "ll_send" not in Layout(ranks, hidden, tokens, top_k, experts, 2, True, "peer").offsets()


def test_heap_bytes_holds_the_buffer():
    import jax_ep

    kw = dict(num_ranks=8, hidden=7168, max_tokens_per_rank=128, num_experts=256, top_k=8,
              low_latency=True)
    assert nvshmem.heap_bytes(**kw) == jax_ep.Buffer.size_hint(transport="nvshmem", **kw) + (256 << 20)
