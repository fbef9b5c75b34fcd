"""jax_ep.tune on CPU: the YAML checks, the cache file, the automatic pick-up by
`jax_ep.config.resolve`, and a tiny search on the xla backend (8 host devices)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jax_ep import config as config_lib
from jax_ep import tune
from jax_ep.config import Config

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "backend": "xla",
    "bench": {"iters": 2, "warmup": 1, "reps": 2, "copy_mb": 1, "flush_mb": 1},
    "workloads": [{"name": "tiny", "ranks": 8, "tokens": 32, "hidden": 256, "top_k": 4, "experts": 16,
                   "dtypes": ["bf16"], "mode": "normal", "layout": "experts"}],
    "search": {"dispatch": {"num_sms": [8, 16]}, "combine": {"num_sms": [8]}},
}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No tuned cache of the user's, no launcher share, no set_num_sms from elsewhere."""
    monkeypatch.setenv("JAX_EP_TUNED", str(tmp_path / "none-yet.json"))
    monkeypatch.delenv("JAX_EP_NUM_SMS", raising=False)
    monkeypatch.setattr(config_lib, "_DEFAULT_NUM_SMS", None)
    config_lib.reload_tuned()
    yield
    config_lib.reload_tuned()


_DROP = object()


def _good(**changes):
    """GOOD with changes at "a/0/b" paths (value _DROP removes the key)."""
    d = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        target = d
        parts = path.split("/")
        for p in parts[:-1]:
            target = target[int(p)] if p.isdigit() else target[p]
        last = parts[-1]
        if value is _DROP:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return d


def _errors(data) -> list:
    with pytest.raises(tune.TuneConfigError) as e:
        tune.validate(data, "t.yaml")
    return e.value.errors


# ------------------------------------------------------------------ validation


def test_good_file_validates():
    plan = tune.validate(GOOD, "t.yaml")
    (w,) = plan.workloads
    assert (w.tokens, w.hidden, w.top_k, w.experts, w.ranks) == ([32], 256, 4, 16, 8)
    assert w.layouts == ["experts"] and w.dtypes == ["bf16"] and w.mode == "normal"
    assert w.search == {"dispatch": {"num_sms": [8, 16]}, "combine": {"num_sms": [8]}}
    assert plan.backend == "xla" and plan.bench["iters"] == 2


def test_bad_keys_are_named_with_the_allowed_ones():
    errs = _errors(_good(**{"serach": {"dispatch": {"num_sms": [8]}}}))
    assert errs == ["serach: unknown key (did you mean 'search'?); allowed keys: "
                    "workloads, search, backend, bench, output, results, plot"]
    errs = _errors(_good(**{"workloads/0/hiden": 256}))
    assert len(errs) == 1 and errs[0].startswith("workloads[0].hiden: unknown key (did you mean 'hidden'?)")
    assert "allowed keys: name, ranks, launch, tokens, hidden" in errs[0]
    errs = _errors(_good(**{"search/dispach": {"num_sms": [8]}}))
    assert errs == ["search.dispach: unknown key (did you mean 'dispatch'?); allowed keys: dispatch, combine"]
    errs = _errors(_good(**{"search/combine": {"num_sm": [8]}}))
    assert errs == ["search.combine.num_sm: unknown key (did you mean 'num_sms'?); "
                    "allowed keys: num_sms, block_size"]
    errs = _errors(_good(**{"bench/iter": 3}))
    assert errs[0].startswith("bench.iter: unknown key (did you mean 'iters'?)")


def test_bad_values_are_named_with_the_allowed_ones():
    errs = _errors(_good(**{"workloads/0/dtypes": ["bf16", "fp16"]}))
    assert errs == ["workloads[0].dtypes[1]: 'fp16' is not allowed; allowed values: bf16, fp8"]
    errs = _errors(_good(**{"workloads/0/mode": "decode"}))
    assert errs == ["workloads[0].mode: 'decode' is not allowed; allowed values: normal, low-latency"]
    errs = _errors(_good(**{"workloads/0/layout": "rows"}))
    assert errs == ["workloads[0].layout: 'rows' is not allowed; allowed values: experts, tokens"]
    errs = _errors(_good(**{"backend": "nccl"}))
    assert errs == ["backend: 'nccl' is not allowed; allowed values: cuda, xla"]
    errs = _errors(_good(**{"bench/timer": "cuda-events"}))
    assert errs == ["bench.timer: 'cuda-events' is not allowed; allowed values: loop, trace, wall"]
    errs = _errors(_good(**{"workloads/0/tokens": [32, 0]}))
    assert errs == ["workloads[0].tokens[1]: 0 is not allowed; allowed values: an integer >= 1"]
    errs = _errors(_good(**{"search/dispatch/block_size": [256, 100]}))
    assert len(errs) == 1 and errs[0].startswith("search.dispatch.block_size[1]: 100 is not allowed")
    assert errs[0].endswith("allowed values: a multiple of 32 in [32, 1024]")
    errs = _errors(_good(**{"search/combine/num_sms": [0]}))
    assert len(errs) == 1 and errs[0].startswith("search.combine.num_sms[0]: 0 is not allowed")
    assert errs[0].endswith("allowed values: a positive integer")
    errs = _errors(_good(**{"workloads/0/hidden": 200, "workloads/0/dtypes": ["fp8"]}))
    assert errs == ["workloads[0].dtypes: fp8 needs hidden to be a multiple of 128, got hidden=200"]
    errs = _errors(_good(**{"workloads/0/experts": 12}))
    assert errs == ["workloads[0].experts: 12 is not divisible by ranks=8"]


def test_missing_fields_and_several_errors_at_once():
    errs = _errors(_good(**{"workloads/0/hidden": _DROP}))
    assert errs == ["workloads[0]: missing required key 'hidden'"]
    errs = _errors(_good(**{"search": _DROP}))
    assert len(errs) == 1 and errs[0].startswith("workloads[0]: no search space")
    errs = _errors(_good(**{"workloads": _DROP}))
    assert errs == ["workloads: missing required key 'workloads' (a list of workloads)"]
    errs = _errors(_good(**{"workloads/0/top_k": _DROP, "workloads/0/mode": "x", "bench/reps": 0}))
    assert len(errs) == 3  # every problem is listed, not just the first


def test_load_and_cli_dry_run(tmp_path, capsys):
    import yaml

    good, bad, broken = tmp_path / "good.yaml", tmp_path / "bad.yaml", tmp_path / "broken.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    bad.write_text(yaml.safe_dump(_good(**{"workloads/0/dtypes": ["int8"]})))
    broken.write_text("workloads: [\n")
    out_file = tmp_path / "cache.json"
    assert tune.main(["--config", str(good), "--dry-run", "--output", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "tiny (ranks 8)" in out and "dispatch bf16 -> R8/H256/bf16/normal: 3 candidates" in out
    assert "combine bf16 -> R8/H256/bf16/normal: 2 candidates" in out
    assert str(out_file) in out and "valid: nothing was run" in out
    assert not out_file.exists()
    assert tune.main(["--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "workloads[0].dtypes[0]: 'int8' is not allowed; allowed values: bf16, fp8" in err
    assert tune.main(["--config", str(broken), "--dry-run"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert tune.main(["--config", str(tmp_path / "absent.yaml"), "--dry-run"]) == 2


def test_example_file_validates():
    plan = tune.load(str(ROOT / "examples" / "tune.yaml"))
    assert {w.ranks for w in plan.workloads} == {1, 8}


def test_module_entry_point(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(textwrap.dedent("""\
        workloads:
          - {tokens: 32, hidden: 256, top_k: 4, experts: 16, layout: [experts, tokens]}
        search:
          dispatch: {num_sms: [8, 16], block_size: [256, 512]}
        """))
    r = subprocess.run([sys.executable, "-m", "jax_ep.tune", "--config", str(cfg), "--dry-run"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "5 candidates x 2 case(s)" in r.stdout  # 2 x 2 grid + the default (24, 512)
    assert "block_size is a Config field, but only num_sms reaches the kernels" in r.stdout


def test_candidates_add_the_default_and_clamp(monkeypatch):
    cands, default, notes = tune.candidates({"num_sms": [8, 64]}, cap=32)
    assert default == Config() and [c.num_sms for c in cands] == [8, 32, 24]
    assert any("64" in n for n in notes)
    monkeypatch.setenv("JAX_EP_NUM_SMS", "16")  # the launcher's share is the default
    cands, default, _ = tune.candidates({"num_sms": [8, 16]}, cap=16)
    assert default == Config(num_sms=16) and [c.num_sms for c in cands] == [8, 16]


def test_select_skips_disqualified_and_incomplete_candidates():
    def row(sms, case, us, check="ok", default=False, note=None):
        return dict(tune_key="R8/H256/bf16/normal", direction="dispatch", tune_case=case, sms=sms,
                    block_size=512, us=us, check=check, note=note, tune_default=default, backend="xla")

    rows = [row(8, "a", 1.0, check="MISMATCH 3/100", note="disqualified"),  # fastest, but wrong
            row(8, "b", 1.0),
            row(16, "a", 5.0), row(16, "b", 30.0),
            row(24, "a", 10.0, default=True), row(24, "b", 10.0, default=True),
            row(32, "a", 2.0)]  # not measured in case b
    best = tune.select(rows)[("R8/H256/bf16/normal", "dispatch")]
    assert best["num_sms"] == 24 and best["default"]["num_sms"] == 24  # 10 beats sqrt(5 * 30)
    assert best["qualified"] == 2 and best["candidates"] == 4 and best["checked"]
    assert best["us"] == pytest.approx(10.0) and best["speedup"] == pytest.approx(1.0)


# ------------------------------------------------------------------- the cache


BEST = {
    ("R8/H256/bf16/normal", "dispatch"): {"num_sms": 32, "block_size": 256, "us": 10.0,
                                          "default": {"num_sms": 24, "block_size": 512, "us": 12.0},
                                          "speedup": 1.2, "checked": True},
    ("R8/H256/bf16/normal", "combine"): {"num_sms": 16, "block_size": 512, "us": 9.0, "checked": True},
    ("R1/H256/fp8/normal", "dispatch"): {"num_sms": 64, "block_size": 512, "us": 5.0, "checked": True},
    ("R2/H256/bf16/normal", "combine"): {"error": "no candidate qualified"},
}


def test_cache_round_trip_and_merge(tmp_path):
    path = tmp_path / "sub" / "tuned.json"
    tune.write_cache(str(path), BEST, {"device_kind": "test"})
    data = json.loads(path.read_text())
    assert data["version"] == config_lib.CACHE_VERSION
    assert set(data["entries"]) == {"R8/H256/bf16/normal", "R1/H256/fp8/normal"}  # no entry without a winner
    e = data["entries"]["R8/H256/bf16/normal"]
    assert (e["ranks"], e["hidden"], e["dtype"], e["mode"]) == (8, 256, "bf16", "normal")
    assert e["dispatch"]["num_sms"] == 32 and e["dispatch"]["device_kind"] == "test"
    entries = config_lib.load_tuned(str(path))
    assert entries == data["entries"]
    # a second run replaces what it tuned and keeps the rest
    tune.write_cache(str(path), {("R8/H256/bf16/normal", "dispatch"): {"num_sms": 48, "block_size": 512,
                                                                        "us": 8.0}}, {})
    data = json.loads(path.read_text())
    assert data["entries"]["R8/H256/bf16/normal"]["dispatch"]["num_sms"] == 48
    assert data["entries"]["R8/H256/bf16/normal"]["combine"]["num_sms"] == 16
    assert "R1/H256/fp8/normal" in data["entries"]


def test_malformed_cache_is_ignored_with_a_warning(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    path.write_text("{not json")
    monkeypatch.setenv("JAX_EP_TUNED", str(path))
    config_lib.reload_tuned()
    with pytest.warns(RuntimeWarning, match="ignoring the tuned-config cache"):
        assert config_lib.resolve(None, num_ranks=8, hidden=256, dtype="bf16", mode="normal") == Config()
    config_lib.resolve(None, num_ranks=8, hidden=256, dtype="bf16")  # read once: no second warning
    path.write_text(json.dumps({"version": 1, "entries": {"k": {"dispatch": {"num_sms": 0}}}}))
    config_lib.reload_tuned()
    with pytest.warns(RuntimeWarning, match="num_sms"):
        assert config_lib.load_tuned() == {}
    # the tuner moves a broken file aside instead of failing
    path.write_text("[]")
    tune.write_cache(str(path), BEST, {})
    assert (tmp_path / "tuned.json.bad").read_text() == "[]"
    assert "R8/H256/bf16/normal" in json.loads(path.read_text())["entries"]


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_EP_TUNED")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config_lib.tuned_path() == str(tmp_path / "xdg" / "jax_ep" / "tuned.json")
    assert tune.cache_path() == config_lib.tuned_path()
    assert tune.cache_path(str(tmp_path / "o.json")) == str(tmp_path / "o.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_lib.tuned_path() == str(tmp_path / "home" / ".cache" / "jax_ep" / "tuned.json")
    monkeypatch.setenv("JAX_EP_TUNED", "none")
    assert config_lib.tuned_path() is None and config_lib.load_tuned() == {}


# ---------------------------------------------------------------- the pick-up


@pytest.fixture
def tuned_cache(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    tune.write_cache(str(path), BEST, {})
    monkeypatch.setenv("JAX_EP_TUNED", str(path))
    config_lib.reload_tuned()
    return path


def test_resolve_picks_up_tuned_entries(tuned_cache, monkeypatch):
    import jax.numpy as jnp

    r = config_lib.resolve
    kw = dict(num_ranks=8, hidden=256, mode="normal")
    assert r(None, dtype="bf16", **kw) == Config(num_sms=32, block_size=256)  # dispatch by default
    assert r(None, dtype=jnp.bfloat16, kernel="dispatch", **kw).num_sms == 32
    assert r(None, dtype=jnp.bfloat16, kernel="combine", **kw).num_sms == 16
    assert r(None, num_ranks=1, hidden=256, dtype="fp8", mode="normal").num_sms == 64
    assert r(None, num_ranks=1, hidden=256, dtype=jnp.float8_e4m3fn).num_sms == 64  # mode defaults to normal
    # no matching entry, or no key given (the old call form): the defaults
    assert r(None, dtype="bf16", num_ranks=8, hidden=512) == Config()
    assert r(None, dtype="bf16", num_ranks=8, hidden=256, mode="low-latency") == Config()
    assert r(None) == Config()
    # an explicit Config wins, then set_num_sms
    assert r(Config(num_sms=7), dtype="bf16", **kw) == Config(num_sms=7)
    monkeypatch.setattr(config_lib, "_DEFAULT_NUM_SMS", 5)
    assert r(None, dtype="bf16", **kw) == Config(num_sms=5)
    monkeypatch.setattr(config_lib, "_DEFAULT_NUM_SMS", None)
    # the launcher's share bounds a tuned value; without a tuned entry it is the value
    monkeypatch.setenv("JAX_EP_NUM_SMS", "16")
    assert r(None, dtype="bf16", **kw) == Config(num_sms=16, block_size=256)
    assert r(None, dtype="bf16", kernel="combine", **kw).num_sms == 16
    monkeypatch.setenv("JAX_EP_NUM_SMS", "20")
    assert r(None, dtype="bf16", kernel="combine", **kw).num_sms == 16  # fits the share: kept
    assert r(None, dtype="bf16", num_ranks=8, hidden=512) == Config(num_sms=20)
    monkeypatch.setenv("JAX_EP_TUNED", "off")
    assert r(None, dtype="bf16", **kw) == Config(num_sms=20)


def test_dispatch_and_combine_use_the_tuned_settings(tuned_cache, monkeypatch):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    import jax_ep
    from jax_ep import normal

    seen = []
    d_fn, c_fn = normal._dispatch_fn, normal._combine_fn
    monkeypatch.setattr(normal, "_dispatch_fn", lambda *a: (seen.append(("dispatch", a[4])), d_fn(*a))[1])
    monkeypatch.setattr(normal, "_combine_fn", lambda *a: (seen.append(("combine", a[2])), c_fn(*a))[1])
    mesh = Mesh(np.array(jax.devices()[:8]), ("ep",))
    T, H, E, K = 8, 256, 16, 2

    def step(cfg):
        def body(x, idx):
            out = jax_ep.dispatch(x, idx, num_experts=E, axis_name="ep", backend="xla", config=cfg)
            return jax_ep.combine(out.x, out.handle, out.weights, config=cfg)
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))

    x = jnp.ones((8 * T, H), jnp.bfloat16)
    idx = jnp.tile(jnp.arange(K, dtype=jnp.int32)[None], (8 * T, 1))
    step(None)(x, idx)
    assert seen == [("dispatch", 32), ("combine", 16)]
    seen.clear()
    step(Config(num_sms=3))(x, idx)
    assert seen == [("dispatch", 3), ("combine", 3)]


def test_show_lists_the_entries_in_use(tuned_cache, capsys, monkeypatch):
    assert tune.main(["--show"]) == 0
    out = capsys.readouterr().out
    assert f"tuned-config cache: {tuned_cache} (JAX_EP_TUNED)" in out
    lines = [l for l in out.splitlines() if l.startswith("R8/H256/bf16/normal")]
    assert len(lines) == 2 and "num_sms=32" in lines[0] and "1.20x" in lines[0]
    monkeypatch.setenv("JAX_EP_TUNED", "none")
    assert tune.main(["--show"]) == 0
    assert "disabled" in capsys.readouterr().out


# ------------------------------------------------------------------ a search


def test_tiny_search_on_the_xla_backend(tmp_path, capsys, monkeypatch):
    import yaml

    cfg, cache = tmp_path / "tune.yaml", tmp_path / "tuned.json"
    res, png = tmp_path / "res.json", tmp_path / "res.png"
    cfg.write_text(yaml.safe_dump(GOOD))
    monkeypatch.setenv("JAX_EP_TUNED", str(cache))
    # the first dispatch candidate (num_sms 8) is made to disagree with the reference
    calls = {"n": 0}
    real = tune._check

    def check(run, job, args, ref, key, got, *rest):
        got_check = real(run, job, args, ref, key, got, *rest)
        if key[0] == "dispatch":
            calls["n"] += 1
            if calls["n"] == 1:
                return "MISMATCH 1/8192"
        return got_check

    monkeypatch.setattr(tune, "_check", check)
    rc = tune.main(["--config", str(cfg), "--results", str(res), "--plot", str(png), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1, out  # a mismatch is a failure to report, but the others still count
    assert "jax_ep tune (xla): 8 ranks" in out and f"wrote {cache}" in out
    rows = json.loads(res.read_text())["rows"]
    disp = {r["sms"]: r for r in rows if r["direction"] == "dispatch"}
    comb = {r["sms"]: r for r in rows if r["direction"] == "combine"}
    assert set(disp) == {8, 16, 24} and set(comb) == {8, 24}
    assert disp[8]["us"] is None and disp[8]["note"].startswith("disqualified")
    assert "disqualified" in disp[8]["tune"]
    for r in [disp[16], disp[24], *comb.values()]:
        assert r["check"] == "ok" and r["us"] is not None and r["backend"] == "xla"
    assert disp[24]["tune_default"] and "default" in disp[24]["tune"]
    entry = json.loads(cache.read_text())["entries"]["R8/H256/bf16/normal"]
    assert entry["dispatch"]["num_sms"] in (16, 24) and entry["dispatch"]["qualified"] == 2
    assert entry["combine"]["num_sms"] in (8, 24) and entry["combine"]["default"]["num_sms"] == 24
    assert entry["dispatch"]["us"] <= entry["dispatch"]["default"]["us"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what was written is what the library now uses
    got = config_lib.resolve(None, num_ranks=8, hidden=256, dtype="bf16", mode="normal", kernel="combine")
    assert got.num_sms == entry["combine"]["num_sms"]


def test_a_job_with_no_matching_workload_says_so(tmp_path):
    import yaml

    cfg = tmp_path / "tune.yaml"
    data = _good(**{"workloads/0/ranks": 2})
    data["workloads"].append(dict(data["workloads"][0], name="decode", ranks=8, mode="low-latency"))
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit, match="no workload of .* runs with 8 rank") as e:
        tune.main(["--config", str(cfg), "--output", str(tmp_path / "c.json"), "--no-progress"])
    assert "it is for 2 ranks" in str(e.value) and "low-latency kernels take no jax_ep.Config" in str(e.value)
    assert not (tmp_path / "c.json").exists()


def test_low_latency_grid_rule(tuned_cache, monkeypatch):
    """Low-latency kernels: set_num_sms, else the launcher's share, else 0 (every SM);
    never a tuned entry or the normal-mode default."""
    assert config_lib.resolve(None, num_ranks=1, hidden=256, dtype="fp8").num_sms == 64  # a tuned entry exists
    assert config_lib.low_latency_sms() == 0
    monkeypatch.setenv("JAX_EP_NUM_SMS", "16")
    assert config_lib.low_latency_sms() == 16
    monkeypatch.setattr(config_lib, "_DEFAULT_NUM_SMS", 5)
    assert config_lib.low_latency_sms() == 5
