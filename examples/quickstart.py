"""Quick start: one expert-parallel MoE step on every local device, checked
against a dense computation. Same as `python -m jax_ep.demo`; see that module
for the options (`--help`).
"""

import sys

from jax_ep.demo import main

if __name__ == "__main__":
    sys.exit(main())
