"""Kernel launch configuration: how many SMs the normal kernels may take."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

_DEFAULT_NUM_SMS: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch settings of the normal (training/prefill) kernels.

    num_sms:     SMs (thread blocks) one call may occupy on its GPU. Kernels that
                 wait on other ranks never launch more blocks than this, so the
                 SM budget of every rank stays resident (DESIGN 2).
    block_size:  threads per block of the copy kernels (a multiple of 32).
    """

    num_sms: int = 24
    block_size: int = 512

    def __post_init__(self):
        if not isinstance(self.num_sms, int) or self.num_sms < 1:
            raise ValueError(f"Config.num_sms must be a positive int, got {self.num_sms!r}")
        if self.block_size % 32 or not 32 <= self.block_size <= 1024:
            raise ValueError(
                f"Config.block_size must be a multiple of 32 in [32, 1024], got {self.block_size!r}"
            )


def set_num_sms(n: int) -> None:
    """Set the SM budget used when a call passes no `Config` (and no tuned one matches)."""
    global _DEFAULT_NUM_SMS
    Config(num_sms=n)  # validates
    _DEFAULT_NUM_SMS = n


def get_num_sms() -> Optional[int]:
    return _DEFAULT_NUM_SMS


def resolve(config: Optional[Config]) -> Config:
    """An explicit Config wins, then `set_num_sms`, then JAX_EP_NUM_SMS (set by
    `python -m jax_ep.launch --sms-per-rank`), then the defaults."""
    if config is not None:
        if not isinstance(config, Config):
            raise TypeError(f"config must be a jax_ep.Config, got {type(config).__name__}")
        return config
    if _DEFAULT_NUM_SMS is not None:
        return Config(num_sms=_DEFAULT_NUM_SMS)
    env = os.environ.get("JAX_EP_NUM_SMS")
    if env:
        return Config(num_sms=int(env))
    return Config()
