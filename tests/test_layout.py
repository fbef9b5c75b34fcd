"""Buffer layout: every region aligned, inside the buffer, and apart from the others,
for any configuration, with or without the low-latency regions and for both
transports (the kernels index into these regions by offset)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from jax_ep.buffer import Layout


@settings(max_examples=200, deadline=None)
@given(
    ranks=st.sampled_from([1, 2, 4, 8, 16]),
    hidden=st.integers(1, 64).map(lambda n: 128 * n),
    tokens=st.integers(1, 4096),
    top_k=st.integers(1, 16),
    per_rank=st.integers(1, 32),
    elem_bytes=st.sampled_from([2, 4]),
    low_latency=st.booleans(),
    transport=st.sampled_from(["peer", "nvshmem"]),
)
def test_regions_are_aligned_disjoint_and_inside(ranks, hidden, tokens, top_k, per_rank, elem_bytes,
                                                 low_latency, transport):
    layout = Layout(ranks, hidden, tokens, top_k, ranks * per_rank, elem_bytes, low_latency, transport)
    off = layout.offsets()
    total, half = off.pop("total"), off.pop("half_bytes")
    names = sorted(off, key=off.get)
    starts = [off[k] for k in names]
    ends = starts[1:] + [total]
    for name, start, end in zip(names, starts, ends):
        assert start % Layout.ALIGN == 0, name
        assert end > start, name  # every region holds something
    # the two halves have the same regions at the same distance
    for name in names:
        if name.endswith("0"):
            assert off[name[:-1] + "1"] - off[name] == half, name
    assert ("ll_send" in off) == (low_latency and transport == "nvshmem")
    assert ("ll_recv0" in off) == low_latency
    assert layout.total_bytes == total


def test_route_tables_hold_every_chunk():
    """route_cnt holds one count per (expert, source rank, route chunk) at the chunk
    size the kernels number by (the extension's `route_chunk`, where it is built)."""
    import pytest

    from jax_ep.buffer import ROUTE_CHUNK

    try:
        from jax_ep import _ext
    except ImportError:
        _ext = None
    if _ext is not None:
        assert _ext.route_chunk == ROUTE_CHUNK
    for tokens in (1, ROUTE_CHUNK, ROUTE_CHUNK + 1, 4096):
        off = Layout(8, 7168, tokens, 8, 256, 2, False, "peer").offsets()
        names = sorted((k for k in off if k not in ("total", "half_bytes")), key=off.get)
        after = names[names.index("route_cnt") + 1]
        chunks = -(-tokens // ROUTE_CHUNK)
        assert off[after] - off["route_cnt"] >= 256 * chunks * 4
    if _ext is None:
        pytest.skip("the CUDA extension is not built: its chunk size was not compared")


def test_a_stale_extension_is_refused(monkeypatch):
    """A build whose route chunk is unknown or different from ROUTE_CHUNK could
    overrun the route tables: creating the Buffer's memory refuses it by name."""
    import types

    import pytest

    from jax_ep.backends import cuda

    monkeypatch.setattr(cuda, "_ext", types.SimpleNamespace())
    with pytest.raises(RuntimeError, match="predates this jax_ep"):
        cuda.create_buffer(None)
    monkeypatch.setattr(cuda, "_ext", types.SimpleNamespace(route_chunk=128))
    with pytest.raises(RuntimeError, match="numbers 128 tokens per route chunk"):
        cuda.create_buffer(None)
