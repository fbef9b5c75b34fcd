"""NVSHMEM between the job's processes (one PE each): bootstrap through the
key-value store and a put to the next PE. Skipped unless the extension links
NVSHMEM (build with -Ccmake.define.JAX_EP_NVSHMEM=ON)."""

import pytest

from jax_ep import nvshmem

pytestmark = pytest.mark.skipif(not nvshmem.available(), reason="jax_ep built without NVSHMEM")


def test_every_pe_receives_its_neighbour():
    from jax_ep import _ext

    pe, npes = nvshmem.initialize()
    assert npes >= 1 and 0 <= pe < npes
    assert nvshmem.initialize() == (pe, npes)  # a second call changes nothing
    got = _ext.nvshmem_ring_check()
    assert got == (pe - 1) % npes, (pe, npes, got)
