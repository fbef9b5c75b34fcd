"""jax_ep: expert-parallel dispatch and combine for Mixture-of-Experts in JAX.

Public API (DESIGN 3): `dispatch`, `combine`, `low_latency_dispatch`,
`low_latency_combine` and their `_send`/`_recv` halves, `overlap`, `Fp8Array`
and `fp8.quantize`, `rows_needed`, `Buffer`, `Config`, `set_num_sms`; and
`all_reduce`, a sum over the EP group on the Buffer (for the processes that
share one GPU, where XLA's collectives cannot run).
"""

from . import debug, fp8
from .buffer import Buffer
from .collectives import all_reduce
from .config import Config, set_num_sms
from .fp8 import Fp8Array
from .low_latency import (
    low_latency_combine,
    low_latency_combine_recv,
    low_latency_combine_send,
    low_latency_dispatch,
    low_latency_dispatch_recv,
    low_latency_dispatch_send,
    overlap,
)
from .normal import combine, dispatch
from .routing import rows_needed
from .types import (
    DispatchHandle,
    DispatchOutput,
    LowLatencyHandle,
    LowLatencyOutput,
    LowLatencyPending,
)

__version__ = "0.1.0"

__all__ = [
    "Buffer", "Config", "DispatchHandle", "DispatchOutput", "Fp8Array", "LowLatencyHandle",
    "LowLatencyOutput", "LowLatencyPending", "all_reduce", "combine", "debug", "dispatch", "fp8",
    "low_latency_combine", "low_latency_combine_recv", "low_latency_combine_send",
    "low_latency_dispatch", "low_latency_dispatch_recv", "low_latency_dispatch_send", "overlap",
    "rows_needed", "set_num_sms",
]
