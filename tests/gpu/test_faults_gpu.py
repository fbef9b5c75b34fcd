"""Faults through the launcher: two processes on this GPU, one scenario each
(tests/gpu/faults.py). Runs from a single-process pytest only (it starts its own
jobs); under a multi-process launcher run it is skipped."""

import os
import re
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DEADLINE_S = 5.0

pytestmark = pytest.mark.skipif(
    int(os.environ.get("JAX_EP_NUM_PROCESSES", "1")) > 1, reason="starts its own launcher jobs")


def _run(scenario: str):
    # Ranks that compile different programs (the mismatch scenarios) must not
    # wait for each other inside XLA's autotuning, which it shares between the
    # processes of a job; jax_ep's own check is what is tested here.
    xla_flags = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_shard_autotuning=false").strip()
    # This pytest process may hold most of the GPU already (XLA's pool): the two
    # ranks grow theirs as they go instead of each taking a share at start-up.
    env = dict(os.environ, JAX_EP_TIMEOUT_S=str(DEADLINE_S), JAX_PLATFORMS="cuda,cpu", XLA_FLAGS=xla_flags,
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    cmd = [sys.executable, "-m", "jax_ep.launch", "--nproc", "2", "--share-gpu", "--timeout", "150",
           "--grace", "3", "--", sys.executable, os.path.join(HERE, "faults.py"), scenario]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=env)
    out = p.stdout + p.stderr
    starts = [float(v) for v in re.findall(r"\[faults\] \S+ rank \d+ start ([0-9.]+)", out)]
    to_error = time.time() - max(starts) if starts else None
    left = subprocess.run(["pgrep", "-f", f"faults.py {scenario}"], capture_output=True, text=True).stdout
    print(f"\n=== {scenario}: exit {p.returncode}, {time.time() - t0:.1f} s in all, "
          f"{'%.1f s' % to_error if to_error is not None else 'n/a'} from the call to the job's end")
    print("\n".join(line for line in out.splitlines() if "jax_ep:" in line or "[launch]" in line))
    return p.returncode, out, to_error, left.strip()


def test_control_run_passes():
    rc, out, _, left = _run("ok")
    assert rc == 0, out[-3000:]
    assert out.count("done") == 2 and not left


def test_missing_rank_is_named_within_the_deadline():
    rc, out, to_error, left = _run("missing")
    assert rc != 0
    assert re.search(r"TIMEOUT on rank 0: dispatch .*rank 1 never signalled", out), out[-3000:]
    # The launcher names whichever rank ended first: rank 0 after its deadline, or the
    # idle rank 1, which JAX's coordination service may abort once rank 0 has failed.
    assert re.search(r"rank [01] failed first", out), out[-3000:]
    assert to_error is not None and to_error < DEADLINE_S + 20
    assert not left, f"processes left behind: {left}"


def test_killed_rank_ends_the_job():
    rc, out, to_error, left = _run("killed")
    assert rc != 0
    assert re.search(r"rank 1 failed first \(.*(SIGKILL|signal 9|killed)", out, re.I), out[-3000:]
    assert to_error is not None and to_error < DEADLINE_S + 20
    assert not left, f"processes left behind: {left}"


@pytest.mark.parametrize("scenario", ["hidden", "capacity", "layout"])
def test_different_calls_are_a_mismatch(scenario):
    rc, out, to_error, left = _run(scenario)
    assert rc != 0
    assert re.search(r"MISMATCH on rank [01]: dispatch .*rank [01] made a different call", out), out[-3000:]
    assert to_error is not None and to_error < DEADLINE_S + 20  # found at the first signal, not the deadline
    assert "the call returned" not in out
    assert not left, f"processes left behind: {left}"


def test_two_sends_in_a_row_are_an_order_error():
    rc, out, to_error, left = _run("order")
    assert rc != 0
    assert re.search(r"ORDER on rank [01]: low_latency_dispatch_send began while the previous", out), out[-3000:]
    assert to_error is not None and to_error < DEADLINE_S + 20  # found at the second send
    assert "the call returned" not in out
    assert not left, f"processes left behind: {left}"


def test_config_disagreement_fails_at_creation():
    rc, out, _, left = _run("config")
    assert rc != 0
    assert "every rank of an EP group must create the same Buffer" in out, out[-3000:]
    assert "did not fail" not in out
    assert not left
