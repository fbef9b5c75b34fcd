"""jax_ep.nvshmem on a machine without NVSHMEM in the build: clear errors, no side effects."""

import pytest

from jax_ep import nvshmem


def test_not_built_says_how_to_build():
    if nvshmem.available():
        pytest.skip("this build links NVSHMEM")
    assert not nvshmem.running()
    with pytest.raises(RuntimeError, match="JAX_EP_NVSHMEM=ON"):
        nvshmem.initialize()
