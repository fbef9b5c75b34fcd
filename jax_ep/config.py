"""Kernel launch configuration: how many SMs the normal kernels may take.

Where a call's settings come from (`resolve`), first match wins:

1. an explicit `Config` passed to the call;
2. `set_num_sms(n)` in this process;
3. the launcher's share, `JAX_EP_NUM_SMS` (`python -m jax_ep.launch
   --sms-per-rank`), together with a tuned entry if one matches: the tuned
   `num_sms` is used when it fits the share and clamped to the share when not;
   without a tuned entry the share itself is used;
4. a tuned entry from `python -m jax_ep.tune` matching (ranks, hidden, dtype, mode)
   and the kernel;
5. the `Config` defaults.

Tuned entries live in a JSON cache file: `$JAX_EP_TUNED` when set (`none` or `off`
disables them), else `$XDG_CACHE_HOME/jax_ep/tuned.json`, else
`~/.cache/jax_ep/tuned.json`. The file is read once per path, lazily, at the first
lookup; a file that cannot be parsed is ignored with a warning. `reload_tuned()`
forgets what was read (`python -m jax_ep.tune` calls it after writing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import warnings
from typing import Any, Dict, Optional

_DEFAULT_NUM_SMS: Optional[int] = None

CACHE_VERSION = 1
KERNELS = ("dispatch", "combine")
MODES = ("normal", "low_latency")


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
    """Set the SM budget used when a call passes no `Config` (it wins over tuned ones)."""
    global _DEFAULT_NUM_SMS
    Config(num_sms=n)  # validates
    _DEFAULT_NUM_SMS = n


def get_num_sms() -> Optional[int]:
    return _DEFAULT_NUM_SMS


def low_latency_sms() -> int:
    """SMs (thread blocks) of a low-latency kernel: `set_num_sms`, else the launcher's
    share (`JAX_EP_NUM_SMS`), else 0, which the kernels read as every SM of the GPU.

    The low-latency kernels take no `Config` and no tuned entry. Their work is a few
    rows per warp, bound by memory latency, so without a budget they spread over the
    whole GPU; processes sharing a GPU must set a budget (the launcher does)."""
    if _DEFAULT_NUM_SMS is not None:
        return _DEFAULT_NUM_SMS
    share = _launcher_share()
    return 0 if share is None else Config(num_sms=share).num_sms  # validates: a positive int


def _launcher_share() -> Optional[int]:
    """`JAX_EP_NUM_SMS` (the launcher's `--sms-per-rank` or shared-GPU share), or None."""
    env = os.environ.get("JAX_EP_NUM_SMS")
    return int(env) if env else None


# ------------------------------------------------------------- tuned configs


def tuned_path() -> Optional[str]:
    """The cache file tuned configs are read from (None: disabled by JAX_EP_TUNED)."""
    env = os.environ.get("JAX_EP_TUNED")
    if env is not None and env.strip():
        if env.strip().lower() in ("none", "off", "0", "false"):
            return None
        return os.path.expanduser(env.strip())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jax_ep", "tuned.json")


def dtype_name(dtype) -> Optional[str]:
    """The cache's name of a dtype: bf16, fp8, f16 or f32 (None when not given)."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in ("bf16", "fp8", "f16", "f32"):
        return dtype
    import numpy as np

    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name.startswith("float8"):
        return "fp8"
    return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(name, name)


def mode_name(mode) -> str:
    m = "normal" if mode is None else str(mode).replace("-", "_")
    return m


def tuned_key(num_ranks: int, hidden: int, dtype, mode="normal") -> str:
    """The cache key of (ranks, hidden, dtype, mode), e.g. "R8/H7168/bf16/normal"."""
    return f"R{int(num_ranks)}/H{int(hidden)}/{dtype_name(dtype)}/{mode_name(mode)}"


_lock = threading.Lock()
_loaded: Dict[str, Dict[str, Any]] = {}


def _validate_cache(data) -> Dict[str, Any]:
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise ValueError('expected a JSON object with an "entries" object')
    if data.get("version") != CACHE_VERSION:
        raise ValueError(f"version {data.get('version')!r}, this jax_ep reads version {CACHE_VERSION}")
    entries = {}
    for key, entry in data["entries"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"entry {key!r} is not an object")
        for kernel in KERNELS:
            if kernel in entry:
                k = entry[kernel]
                if not isinstance(k, dict) or "num_sms" not in k:
                    raise ValueError(f"entry {key!r}: {kernel} needs num_sms")
                Config(num_sms=k["num_sms"], block_size=k.get("block_size", Config.block_size))
        entries[key] = entry
    return entries


def load_tuned(path: Optional[str] = None) -> Dict[str, Any]:
    """The entries of a tuned-config cache file ({} when absent, disabled or malformed).

    Read once per path and kept in memory; a malformed file gives one warning."""
    path = tuned_path() if path is None else path
    if path is None:
        return {}
    with _lock:
        if path in _loaded:
            return _loaded[path]
        entries: Dict[str, Any] = {}
        try:
            with open(path) as f:
                entries = _validate_cache(json.load(f))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as e:
            warnings.warn(f"jax_ep: ignoring the tuned-config cache {path}: {e} "
                          "(rewrite it with `python -m jax_ep.tune`, or set JAX_EP_TUNED=none)",
                          RuntimeWarning, stacklevel=2)
        _loaded[path] = entries
        return entries


def reload_tuned() -> None:
    """Forget the cache files read so far; the next lookup reads them again."""
    with _lock:
        _loaded.clear()


def tuned_config(num_ranks, hidden, dtype, mode="normal", kernel: Optional[str] = None) -> Optional[Config]:
    """The tuned Config of a (ranks, hidden, dtype, mode) and kernel, or None.

    kernel "dispatch" or "combine"; None takes the entry's dispatch settings, or its
    combine ones when it has no dispatch."""
    if num_ranks is None or hidden is None or dtype is None:
        return None
    entry = load_tuned().get(tuned_key(num_ranks, hidden, dtype, mode))
    if not entry:
        return None
    order = (kernel,) if kernel is not None else KERNELS
    for k in order:
        if isinstance(entry.get(k), dict):
            e = entry[k]
            return Config(num_sms=int(e["num_sms"]), block_size=int(e.get("block_size", Config.block_size)))
    return None


def resolve(config: Optional[Config], *, num_ranks: Optional[int] = None, hidden: Optional[int] = None,
            dtype=None, mode: Optional[str] = None, kernel: Optional[str] = None) -> Config:
    """The launch settings of one call.

    Precedence: an explicit Config > `set_num_sms` > `JAX_EP_NUM_SMS` (the launcher's
    share, `--sms-per-rank`) > a tuned entry > the defaults. The launcher's share is
    a bound, not a preference: a tuned entry still applies under it, with its
    num_sms clamped to the share (min(tuned, share)); without a tuned entry the share
    is used. Tuned entries are looked up only when num_ranks, hidden and dtype are
    given (mode defaults to "normal"); calls that pass none of them keep the old
    behaviour (explicit > set_num_sms > JAX_EP_NUM_SMS > defaults).
    """
    if config is not None:
        if not isinstance(config, Config):
            raise TypeError(f"config must be a jax_ep.Config, got {type(config).__name__}")
        return config
    if _DEFAULT_NUM_SMS is not None:
        return Config(num_sms=_DEFAULT_NUM_SMS)
    share = _launcher_share()
    tuned = tuned_config(num_ranks, hidden, dtype, mode, kernel)
    if tuned is not None:
        if share is not None and tuned.num_sms > share:
            return dataclasses.replace(tuned, num_sms=share)
        return tuned
    if share is not None:
        return Config(num_sms=share)
    return Config()
