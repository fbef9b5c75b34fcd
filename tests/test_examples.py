"""The quick start and the examples run as documented (CPU, subprocesses)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def test_demo():
    out = run(["-m", "jax_ep.demo"])
    assert "on 8 cpu device(s)" in out
    assert "max |EP - dense|" in out and out.rstrip().endswith("OK")


def test_quickstart_fp8_bf16():
    out = run(["examples/quickstart.py", "--tokens", "64", "--hidden", "128", "--experts", "32",
               "--dtype", "bfloat16", "--fp8", "--iters", "1"])
    assert "fp8 dispatch" in out and out.rstrip().endswith("OK")


def test_demo_fails_loudly_on_bad_arguments():
    with pytest.raises(AssertionError, match="exited 2"):
        run(["-m", "jax_ep.demo", "--experts", "12"])


def test_train_moe(tmp_path):
    plot = tmp_path / "loss.png"
    out = run(["examples/train_moe.py", "--steps", "3", "--layers", "1", "--plot", str(plot)])
    assert "tokens/s" in out and "loss" in out
    assert plot.stat().st_size > 1000


def test_decode():
    out = run(["examples/decode.py", "--train-steps", "0", "--layers", "1", "--new", "6"])
    assert "low-latency step vs normal-mode forward" in out and out.rstrip().endswith("OK")


def test_decode_low_latency():
    out = run(["examples/decode_low_latency.py", "--steps", "3", "--hidden", "256", "--tokens", "16"])
    assert "split + overlap" in out and "fused" in out and "us per step" in out
    assert "first step vs float32 reference" in out and out.rstrip().endswith("check passed")
