"""CPU test set-up: 8 host devices, before anything imports jax."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile(
    "ep",
    max_examples=15,
    deadline=None,
    derandomize=True,
    # no shrinking: each example compiles a program, and the first failure is enough
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ep"))


@pytest.fixture(scope="session")
def mesh_1d():
    from ep_helpers import SETUPS
    return SETUPS["1d"].mesh


@pytest.fixture(scope="session")
def mesh_2d():
    from ep_helpers import SETUPS
    return SETUPS["2d"].mesh
