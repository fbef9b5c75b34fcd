"""Run a multi-process JAX job on this host.

    python -m jax_ep.launch --nproc N [--nodes K] [--share-gpu] [--mps]
        [--sms-per-rank S] [--timeout SECONDS] [--grace SECONDS]
        [--] (script.py | -m module | command) [args...]

Starts N processes with a coordinator on 127.0.0.1 (a free port) and the environment
that `jax_ep.distributed.initialize()` reads (see that module). Every output line of
rank i is printed as `[rank i] ...`. The first rank that exits non-zero ends the job:
the launcher names it, stops the other ranks (SIGTERM to each rank's process group,
SIGKILL after `--grace` seconds) and exits non-zero. `--timeout` does the same when
the job runs too long (exit code 124). Ctrl-C is forwarded to every rank.

GPUs (found with `nvidia-smi -L`, restricted to CUDA_VISIBLE_DEVICES when set):
  default        one GPU per process: process i gets the i-th GPU of this host
                 (with `--nodes`, the simulated nodes share this host's GPUs).
  --share-gpu    every process on the first GPU, each with XLA_PYTHON_CLIENT_MEM_FRACTION=
                 0.5/N of its memory for XLA (one pool, made at start-up, that peers can
                 map), unless a preallocation or memory fraction is already set, and, without
                 --sms-per-rank (or JAX_EP_NUM_SMS in the environment), JAX_EP_NUM_SMS=SMs//N
                 so that the waiting kernels of all N processes fit the GPU at once;
                 JAX_EP_SHARED_GPU=1 tells programs that XLA's collectives (NCCL)
                 cannot run between these processes (`jax_ep.all_reduce` can).
  --mps          starts the CUDA MPS daemon for the job (pipe and log directories in a
                 fresh temporary directory) and stops it afterwards.
  --sms-per-rank caps each process at S SMs: JAX_EP_NUM_SMS=S for the library and
                 CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=ceil(100*S/SMs) for MPS, where SMs
                 is JAX_EP_GPU_SMS (default 132, an H100 SXM).
On a host without `nvidia-smi` the processes get JAX_PLATFORMS=cpu unless it is set.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import BinaryIO, Sequence

_VALUE_OPTIONS = {"--nproc", "--nodes", "--sms-per-rank", "--timeout", "--grace"}
_DEFAULT_GPU_SMS = 132
_TIMEOUT_EXIT_CODE = 124


def _note(message: str) -> None:
    sys.stderr.write(f"[launch] {message}\n")
    sys.stderr.flush()


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits the launcher's options from the command it runs."""
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return argv[:i], argv[i + 1:]
        if arg == "-m" or not arg.startswith("-"):
            return argv[:i], argv[i:]
        i += 2 if arg in _VALUE_OPTIONS else 1
    return argv, []


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jax_ep.launch",
        usage="%(prog)s --nproc N [options] [--] (script.py | -m module | command) [args...]",
        description="Run N processes of a multi-process JAX job on this host.",
    )
    p.add_argument("--nproc", type=int, required=True, metavar="N", help="processes to start")
    p.add_argument("--nodes", type=int, default=1, metavar="K",
                   help="simulated nodes; ranks are grouped into nodes contiguously")
    p.add_argument("--share-gpu", action="store_true", help="put every process on one GPU")
    p.add_argument("--mps", action="store_true", help="run the job under a fresh CUDA MPS daemon")
    p.add_argument("--sms-per-rank", type=int, default=None, metavar="S",
                   help="SMs each process may use")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="end the job after this many seconds")
    p.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between SIGTERM and SIGKILL when stopping ranks")
    return p


def _python_command(command: list[str]) -> list[str]:
    if command[0] == "-m":
        return [sys.executable, *command]
    if command[0].endswith(".py"):
        return [sys.executable, *command]
    return command


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _visible_gpus() -> list[str] | None:
    """IDs to put in CUDA_VISIBLE_DEVICES, or None on a host without NVIDIA GPUs."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if count == 0:
        return None
    user = os.environ.get("CUDA_VISIBLE_DEVICES")
    if user is not None:
        return [d.strip() for d in user.split(",") if d.strip()]
    return [str(i) for i in range(count)]


def _rank_envs(args: argparse.Namespace, gpus: list[str] | None, port: int,
               extra: dict[str, str]) -> list[dict[str, str]]:
    local_size = args.nproc // args.nodes
    base = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    base.update(
        JAX_EP_COORDINATOR=f"127.0.0.1:{port}",
        JAX_EP_NUM_PROCESSES=str(args.nproc),
        JAX_EP_NUM_NODES=str(args.nodes),
        JAX_EP_LOCAL_SIZE=str(local_size),
    )
    if gpus is None:
        base.setdefault("JAX_PLATFORMS", "cpu")
    elif args.share_gpu and args.nproc > 1:
        base["JAX_EP_SHARED_GPU"] = "1"  # XLA's collectives cannot run between these processes
    if args.share_gpu and not any(
        v in os.environ for v in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION")
    ):
        # One XLA memory pool per process, made at start-up: the processes' shares
        # leave room for the Buffers, and a pool that never grows is one
        # allocation, which peers can map (the Buffer's windows).
        base["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.5 / args.nproc:.4f}"
    sms = int(os.environ.get("JAX_EP_GPU_SMS", _DEFAULT_GPU_SMS))
    if args.sms_per_rank is not None:
        base["JAX_EP_NUM_SMS"] = str(args.sms_per_rank)
        percent = min(100, max(1, math.ceil(100 * args.sms_per_rank / sms)))
        base["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(percent)
    elif args.share_gpu and gpus is not None and "JAX_EP_NUM_SMS" not in os.environ:
        # Kernels that wait on other ranks must all be resident at once (DESIGN 2):
        # without a given share, each process's kernels take an equal one.
        base["JAX_EP_NUM_SMS"] = str(max(1, sms // args.nproc))
    envs = []
    for rank in range(args.nproc):
        env = dict(base)
        env.update(
            JAX_EP_PROCESS_ID=str(rank),
            JAX_EP_NODE_RANK=str(rank // local_size),
            JAX_EP_LOCAL_RANK=str(rank % local_size),
        )
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[0] if args.share_gpu else gpus[rank]
        envs.append(env)
    return envs


class _Mps:
    """A CUDA MPS control daemon private to this job."""

    def __init__(self) -> None:
        self.binary = shutil.which("nvidia-cuda-mps-control")
        self.dir: str | None = None
        self.env: dict[str, str] = {}

    def start(self) -> dict[str, str]:
        if self.binary is None:
            _note("--mps: nvidia-cuda-mps-control not found; running without MPS")
            return {}
        self.dir = tempfile.mkdtemp(prefix="jax_ep_mps_")
        self.env = {
            "CUDA_MPS_PIPE_DIRECTORY": os.path.join(self.dir, "pipe"),
            "CUDA_MPS_LOG_DIRECTORY": os.path.join(self.dir, "log"),
        }
        for d in self.env.values():
            os.makedirs(d)
        started = subprocess.run([self.binary, "-d"], env=dict(os.environ, **self.env))
        if started.returncode != 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            _note(f"--mps: the MPS daemon did not start (exit code {started.returncode})")
            raise SystemExit(1)
        _note(f"MPS daemon started (pipe directory {self.env['CUDA_MPS_PIPE_DIRECTORY']})")
        return self.env

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            subprocess.run([self.binary], input=b"quit\n", env=dict(os.environ, **self.env),
                           timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            _note(f"stopping the MPS daemon failed: {e}")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _relay(stream: BinaryIO, out: BinaryIO, prefix: bytes, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        if not line.endswith(b"\n"):
            line += b"\n"
        with lock:
            out.write(prefix + line)
            out.flush()
    stream.close()


class _Job:
    """The ranks of one job: their processes, output relays and exit codes."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.relays: list[list[threading.Thread]] = []
        self.exits: queue.Queue[tuple[int, int]] = queue.Queue()

    def start(self, command: list[str], envs: list[dict[str, str]]) -> None:
        lock = threading.Lock()
        stdout = sys.stdout.buffer
        stderr = sys.stderr.buffer
        for rank, env in enumerate(envs):
            # Each rank leads its own process group so that stopping it also stops
            # whatever it started.
            proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
            self.procs.append(proc)
            prefix = f"[rank {rank}] ".encode()
            self.relays.append([
                threading.Thread(target=_relay, args=(stream, out, prefix, lock), daemon=True)
                for stream, out in ((proc.stdout, stdout), (proc.stderr, stderr))
            ])
            for t in self.relays[-1]:
                t.start()
            threading.Thread(target=self._wait, args=(rank, proc), daemon=True).start()

    def _wait(self, rank: int, proc: subprocess.Popen) -> None:
        self.exits.put((rank, proc.wait()))

    def running(self) -> list[int]:
        return [r for r, p in enumerate(self.procs) if p.poll() is None]

    def send(self, signum: int) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, grace: float, signum: int = signal.SIGTERM) -> None:
        """`signum` to every rank's process group, SIGKILL to what is left after `grace`."""
        self.send(signum)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # Also reaches processes a rank started that ignored SIGTERM.
        self.send(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def drain(self, ranks: Sequence[int] | None = None, timeout: float = 5.0) -> None:
        """Waits (at most `timeout`) until the output of `ranks` (default all) is relayed."""
        deadline = time.monotonic() + timeout
        for rank in range(len(self.procs)) if ranks is None else ranks:
            for t in self.relays[rank]:
                t.join(timeout=max(0.0, deadline - time.monotonic()))


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def _supervise(job: _Job, args: argparse.Namespace) -> int:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    remaining = len(job.procs)
    while remaining:
        try:
            rank, returncode = job.exits.get(timeout=0.5)
        except queue.Empty:
            if deadline is None or time.monotonic() < deadline:
                continue
            _note(f"timed out after {args.timeout:g} s; stopping ranks "
                  f"{', '.join(map(str, job.running()))}")
            job.stop(args.grace)
            return _TIMEOUT_EXIT_CODE
        remaining -= 1
        if returncode != 0:
            job.drain([rank], timeout=1.0)  # its last words before the launcher's
            others = [r for r in job.running() if r != rank]
            _note(f"rank {rank} failed first ({_describe(returncode)})"
                  + (f"; stopping ranks {', '.join(map(str, others))}" if others else ""))
            job.stop(args.grace)
            return _exit_code(returncode)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    options, command = _split_argv(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(options)
    if not command or command == ["-m"]:
        parser.error("no command to run: give script.py, -m module or a command after the options")
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    if args.nodes < 1 or args.nproc % args.nodes:
        parser.error(f"--nodes must divide --nproc ({args.nproc}), got {args.nodes}")
    if args.sms_per_rank is not None and args.sms_per_rank < 1:
        parser.error("--sms-per-rank must be at least 1")

    gpus = _visible_gpus()
    if gpus is not None and not args.share_gpu and len(gpus) < args.nproc:
        parser.error(f"{args.nproc} processes need {args.nproc} GPUs but {len(gpus)} are visible; "
                     "pass --share-gpu to put them all on one GPU")

    mps = _Mps()
    job = _Job()
    # SIGTERM to the launcher ends the job like Ctrl-C does.
    def on_signal(signum, frame):
        raise _Interrupted(signum)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        extra = mps.start() if args.mps else {}
        envs = _rank_envs(args, gpus, _free_port(), extra)
        job.start(_python_command(command), envs)
        code = _supervise(job, args)
    except _Interrupted as e:
        code = 128 + e.signum
        _note(f"{signal.Signals(e.signum).name}: forwarding to ranks "
              f"{', '.join(map(str, job.running()))}")
        job.stop(args.grace, e.signum)
    except OSError as e:
        _note(f"cannot start {command[0]!r}: {e}")
        code = 127
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if job.running():
            job.stop(args.grace)
        # Whatever the ranks left behind in their process groups goes too.
        job.send(signal.SIGKILL)
        job.drain()
        mps.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
