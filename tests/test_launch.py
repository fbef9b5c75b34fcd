"""python -m jax_ep.launch and jax_ep.distributed, with 2-4 CPU processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jax_ep import distributed, launch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _launch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "jax_ep.launch", *args]


def run_launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(_launch_cmd(*args), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (exited, waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pids(pid_dir: Path, nproc: int) -> list[int]:
    files = [pid_dir / f"rank{r}" for r in range(nproc)]
    assert all(f.exists() for f in files), sorted(p.name for p in pid_dir.iterdir())
    return [int(p) for f in files for p in f.read_text().split()]


def _assert_all_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 5
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)], "processes left running"


def test_success_prefixes_every_line_of_every_rank():
    r = run_launch("--nproc", "4", "--nodes", "2", str(SCRIPTS / "launch_echo.py"), "a", "--b")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    for rank in range(4):
        mine = [line for line in out if line.startswith(f"[rank {rank}] ")]
        assert mine[0] == (f"[rank {rank}] PROCESS_ID={rank} NUM_PROCESSES=4 LOCAL_RANK={rank % 2} "
                           f"LOCAL_SIZE=2 NODE_RANK={rank // 2} NUM_NODES=2")
        assert mine[1].startswith(f"[rank {rank}] COORDINATOR=127.0.0.1:")
        assert f"[rank {rank}] ARGS=a --b" in mine
        assert f"[rank {rank}] no newline at the end" in mine
        assert f"[rank {rank}] to stderr" in r.stderr.splitlines()
    assert len({line.split()[2] for line in out if "COORDINATOR=" in line}) == 1


def test_module_form_and_separator():
    r = run_launch("--nproc", "2", "-m", "platform")
    assert r.returncode == 0, r.stderr
    assert sorted(line.split("] ")[0] for line in r.stdout.splitlines()) == ["[rank 0", "[rank 1"]
    r = run_launch("--nproc", "2", "--", sys.executable, "-c", "print('hi')")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["[rank 0] hi", "[rank 1] hi"]


@pytest.mark.parametrize("others", ["finish", "hang", "ignore-term"])
def test_first_failure_ends_the_job(tmp_path, others):
    r = run_launch("--nproc", "3", "--grace", "1", str(SCRIPTS / "launch_fail.py"),
                   str(tmp_path), "1", "3", others)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "[launch] rank 1 failed first (exit code 3)" in r.stderr
    assert "[rank 1] failing now" in r.stderr
    _assert_all_gone(_pids(tmp_path, 3))


def test_timeout_stops_every_rank(tmp_path):
    r = run_launch("--nproc", "2", "--timeout", "4", "--grace", "1",
                   str(SCRIPTS / "launch_fail.py"), str(tmp_path), "-1", "0", "hang")
    assert r.returncode == 124, r.stdout + r.stderr
    assert "[launch] timed out after 4 s; stopping ranks 0, 1" in r.stderr
    _assert_all_gone(_pids(tmp_path, 2))


def test_ctrl_c_is_forwarded(tmp_path):
    proc = subprocess.Popen(
        _launch_cmd("--nproc", "2", "--grace", "1", str(SCRIPTS / "launch_fail.py"),
                    str(tmp_path), "-1", "0", "hang"),
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("rank?"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "[launch] SIGINT: forwarding to ranks 0, 1" in err
    _assert_all_gone(_pids(tmp_path, 2))


@pytest.mark.parametrize("nproc", [2, 3])
def test_distributed_initialize_kv_store_and_collectives(nproc):
    r = run_launch("--nproc", str(nproc), str(SCRIPTS / "launch_jax.py"), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    expected = sum(range(2 * nproc * 4))
    for rank in range(nproc):
        assert f"[rank {rank}] process {rank} of {nproc}, {2 * nproc} devices" in r.stdout
        assert f"[rank {rank}] kv round trip ok: {nproc} payloads" in r.stdout
        assert f"[rank {rank}] psum ok: [[" in r.stdout
    sums = [line for line in r.stdout.splitlines() if "psum ok" in line]
    assert sum(json.loads(sums[0].split("psum ok: ")[1])[0]) == expected


def test_bad_arguments_are_named():
    r = run_launch("--nproc", "3", "--nodes", "2", "x.py")
    assert r.returncode == 2 and "--nodes must divide --nproc (3), got 2" in r.stderr
    r = run_launch("--nproc", "2")
    assert r.returncode == 2 and "no command to run" in r.stderr


def test_missing_mps_binary_is_a_note():
    if launch.shutil.which("nvidia-cuda-mps-control"):
        pytest.skip("this host has MPS")
    r = run_launch("--nproc", "2", "--mps", "--", sys.executable, "-c", "pass")
    assert r.returncode == 0, r.stderr
    assert "nvidia-cuda-mps-control not found; running without MPS" in r.stderr


def _envs(monkeypatch, argv: list[str], gpus: list[str] | None) -> list[dict[str, str]]:
    for name in ("JAX_PLATFORMS", "JAX_EP_GPU_SMS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                 "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    options, _ = launch._split_argv(argv)
    return launch._rank_envs(launch._parser().parse_args(options), gpus, 1234, {})


def test_gpu_assignment(monkeypatch):
    envs = _envs(monkeypatch, ["--nproc", "4", "x.py"], ["0", "1", "2", "3"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2", "3"]
    assert "JAX_PLATFORMS" not in envs[0] and "XLA_PYTHON_CLIENT_PREALLOCATE" not in envs[0]

    envs = _envs(monkeypatch, ["--nproc", "4", "--share-gpu", "--sms-per-rank", "16", "x.py"],
                 ["3", "5"])
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} == {"3"}
    assert envs[0]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.1250"  # 0.5 / 4: one pool each
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in envs[0]
    assert envs[0]["JAX_EP_NUM_SMS"] == "16"
    assert envs[0]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "13"  # ceil(100 * 16 / 132)

    monkeypatch.setenv("JAX_EP_GPU_SMS", "78")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".1")
    options, _ = launch._split_argv(["--nproc", "2", "--share-gpu", "--sms-per-rank", "39", "x"])
    envs = launch._rank_envs(launch._parser().parse_args(options), ["0"], 1, {})
    assert envs[1]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in envs[1]
    assert envs[1]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".1"  # the user's

    envs = _envs(monkeypatch, ["--nproc", "2", "x.py"], None)
    assert envs[0]["JAX_PLATFORMS"] == "cpu" and "CUDA_VISIBLE_DEVICES" not in envs[0]


def test_shared_gpu_gets_a_share_of_sms(monkeypatch):
    """Processes sharing a GPU get an equal SM budget unless one is given, so their
    waiting kernels fit at once; one process per GPU gets none (the whole GPU)."""
    monkeypatch.delenv("JAX_EP_NUM_SMS", raising=False)
    envs = _envs(monkeypatch, ["--nproc", "8", "--share-gpu", "x.py"], ["0"])
    assert {e["JAX_EP_NUM_SMS"] for e in envs} == {"16"}  # 132 // 8
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in envs[0]
    envs = _envs(monkeypatch, ["--nproc", "2", "--share-gpu", "--sms-per-rank", "40", "x.py"], ["0"])
    assert envs[0]["JAX_EP_NUM_SMS"] == "40"
    assert "JAX_EP_NUM_SMS" not in _envs(monkeypatch, ["--nproc", "2", "x.py"], ["0", "1"])[0]
    monkeypatch.setenv("JAX_EP_NUM_SMS", "12")  # the user's own budget is kept
    assert _envs(monkeypatch, ["--nproc", "8", "--share-gpu", "x.py"], ["0"])[0]["JAX_EP_NUM_SMS"] == "12"


def test_split_argv():
    assert launch._split_argv(["--nproc", "2", "-m", "pytest", "-q"]) == (["--nproc", "2"],
                                                                        ["-m", "pytest", "-q"])
    assert launch._split_argv(["--nproc", "2", "--mps", "s.py", "--nproc"]) == (
        ["--nproc", "2", "--mps"], ["s.py", "--nproc"])
    assert launch._split_argv(["--nproc=2", "--", "python", "-V"]) == (["--nproc=2"],
                                                                      ["python", "-V"])


def test_initialize_outside_the_launcher_is_a_no_op(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    if distributed.is_initialized():
        pytest.skip("jax.distributed is already initialized in this process")
    assert distributed.initialize() is False
    assert not distributed.is_initialized()
    with pytest.raises(RuntimeError, match="jax.distributed is not initialized"):
        distributed.kv_store()
