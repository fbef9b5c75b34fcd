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


def test_train_moe_collectives_jax_ep():
    """The per-device step (reductions by jax_ep.all_reduce) on the command line."""
    out = run(["examples/train_moe.py", "--steps", "3", "--layers", "1", "--collectives", "jax_ep"])
    assert "reductions by jax_ep.all_reduce" in out and "'data': 1, 'ep': 8" in out


def test_per_device_step_equals_the_pjit_step():
    """One step of each on the same tokens: the same loss, statistics and parameters."""
    sys.path.insert(0, str(ROOT / "examples"))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    import train_moe as tm

    mesh = tm.make_mesh(8)
    tables = tm.successor_tables(128, 4)
    tokens = tm.make_batch(jax.random.key(3), tables, 16, 17)
    outs = []
    for coll in ("xla", "jax_ep"):
        cfg = tm.LMConfig(max_len=16, layers=1, collectives=coll, capacity_factor=None)
        graphdef, params, rest = nnx.split(tm.build(cfg, mesh), nnx.Param, ...)
        shardings = tuple(jax.tree.map(lambda a: a.sharding, t) for t in (params,))
        clip = optax.identity() if coll == "jax_ep" else optax.clip_by_global_norm(1.0)
        opt = optax.chain(clip, optax.sgd(0.5))  # SGD: a wrong gradient scale shows
        state = opt.init(params)
        if coll == "xla":
            step = jax.jit(tm.make_train_step(graphdef, opt, 1e-3))
        else:
            state_sh = tm.opt_shardings(opt, params, shardings[0], mesh)
            state = jax.device_put(state, state_sh)
            rest_sh = jax.tree.map(lambda a: a.sharding, rest)
            _, step = tm._per_device_fns(graphdef, opt, 1e-3, mesh, tables, 16, 17,
                                         (shardings[0], rest_sh, state_sh))
        x = jax.device_put(tokens, NamedSharding(mesh, P(("data", "ep"), None)))
        outs.append(jax.device_get(step(params, rest, state, x)))
    (p0, r0, _, l0, load0, v0), (p1, r1, _, l1, load1, v1) = outs
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_array_equal(load1, load0)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
    for a, b in zip(jax.tree.leaves(r1), jax.tree.leaves(r0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(jax.tree.leaves(p1)[0]),
                           np.asarray(jax.tree.leaves(nnx.split(tm.build(cfg, mesh), nnx.Param, ...)[1])[0]))
