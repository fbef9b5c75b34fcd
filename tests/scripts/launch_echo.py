"""Prints what the launcher gave this rank, on stdout and stderr."""

import os
import sys

names = ("PROCESS_ID", "NUM_PROCESSES", "LOCAL_RANK", "LOCAL_SIZE", "NODE_RANK", "NUM_NODES")
print(" ".join(f"{n}={os.environ[f'JAX_EP_{n}']}" for n in names))
print(f"COORDINATOR={os.environ['JAX_EP_COORDINATOR']} "
      f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')}")
print(f"ARGS={' '.join(sys.argv[1:])}")
print("to stderr", file=sys.stderr)
sys.stdout.write("no newline at the end")
