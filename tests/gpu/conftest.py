"""GPU tests: run every rank's process through the launcher, e.g.

    python -m jax_ep.launch --nproc 8 --share-gpu --mps -- \
        env JAX_PLATFORMS=cuda,cpu python -m pytest -q tests/gpu

Each process drives one GPU device (all on the same card with --share-gpu);
the oracle is the xla backend on the process's own CPU devices over the same
global inputs. Without a GPU everything here is skipped.
"""

import os

os.environ.setdefault("JAX_EP_TIMEOUT_S", "30")

from jax_ep import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU (run through python -m jax_ep.launch on a GPU machine)")
    for item in items:
        if "tests/gpu" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)
