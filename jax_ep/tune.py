"""Auto-tuning of the normal kernels' launch settings (the fields of `jax_ep.Config`).

    python -m jax_ep.tune --config tune.yaml [--dry-run] [--output FILE] [--show]
    python -m jax_ep.launch --nproc 8 --share-gpu --mps -m jax_ep.tune --config tune.yaml
    python -m jax_ep.tune --show

The YAML file names workloads and a search space per kernel (see
`examples/tune.yaml`). `--dry-run` validates it and prints the plan; errors name the
bad key and the allowed values. A run measures every candidate with the benchmark
machinery of `jax_ep.bench` (same job set-up, copy bandwidth, timers, L2 flushes and
output comparison), one row per candidate:

- the candidate's output is compared with the xla backend's before it is timed; a
  mismatch (or an error) disqualifies it and makes the exit code 1. Where the xla
  backend cannot run (several processes sharing one GPU) candidates are timed
  unchecked and marked so; `tests/gpu` covers their correctness there.
- the default configuration (what a call gets without a tuned entry: the
  launcher's share `JAX_EP_NUM_SMS`, else `Config()`, at most the SMs a rank may
  take) is always one of the candidates, so the best one is compared with it in the
  same run.
- per (ranks, hidden, dtype, mode) and kernel, the candidate with the smallest
  geometric mean of median µs over the cases measured (tokens x layouts of every
  matching workload) is written to the cache file: `--output`, else the YAML's
  `output`, else `$JAX_EP_TUNED`, else `$XDG_CACHE_HOME/jax_ep/tuned.json`
  (`~/.cache/jax_ep/tuned.json`). Entries of other keys already in the file are
  kept. Ties go to the default, then to fewer SMs.

The dispatch kernel is tuned per dispatch dtype (bf16, fp8); combine always moves
BF16, so its settings are stored under the bf16 key. Workloads whose `ranks` differ
from the job's rank count are skipped (one file can hold the EP1 and the
8-process workloads; run it once per layout of processes). The low-latency kernels
take no `Config`: low-latency workloads are accepted and skipped.

`jax_ep.config.resolve` picks the entries up automatically (an explicit `Config`,
`set_num_sms` and the launcher's share keep precedence; see its docstring).
The results are printed as a table and written as bench-style JSON (`--results`,
readable by `python -m jax_ep.bench table`) and a PNG plot (`--plot`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import config as config_lib
from .bench import TIMERS
from .config import Config
from .routing_gen import ROUTINGS

KERNELS = config_lib.KERNELS
FIELDS = tuple(f.name for f in dataclasses.fields(Config))
DTYPES = ("bf16", "fp8")
MODES = ("normal", "low-latency")
LAYOUTS = ("experts", "tokens")
BACKENDS = ("cuda", "xla")
TOP_KEYS = ("workloads", "search", "backend", "bench", "output", "results", "plot")
WORKLOAD_KEYS = ("name", "ranks", "launch", "tokens", "hidden", "top_k", "experts", "dtypes", "mode",
                 "layout", "routing", "seed", "zipf_s", "search")
REQUIRED = ("tokens", "hidden", "top_k", "experts")
# bench options a YAML may set: key -> (bench flag, type, minimum)
BENCH_KEYS = {
    "iters": ("--iters", int, 1), "warmup": ("--warmup", int, 0), "reps": ("--reps", int, 1),
    "timer": ("--timer", TIMERS, None), "flush_mb": ("--flush-mb", float, 0.0),
    "copy_mb": ("--copy-mb", float, 0.0), "copy_gbps": ("--copy-gbps", float, 0.0),
    "link_gbps": ("--link-gbps", float, 0.0),
}
FP8_BLOCK = 128


# ------------------------------------------------------------------ the file


class TuneConfigError(ValueError):
    """A tune.yaml that does not validate; `errors` lists every problem, one a line."""

    def __init__(self, source: str, errors: List[str]):
        self.source, self.errors = source, list(errors)
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(f"  {e}" for e in errors))


@dataclasses.dataclass
class Workload:
    name: str
    tokens: List[int]
    hidden: int
    top_k: int
    experts: int
    dtypes: List[str]
    mode: str
    layouts: List[str]
    routing: str
    seed: int
    zipf_s: float
    search: Dict[str, Dict[str, List[int]]]
    ranks: Optional[int] = None
    launch: Optional[str] = None


@dataclasses.dataclass
class Plan:
    source: str
    workloads: List[Workload]
    backend: str
    bench: Dict[str, Any]
    output: Optional[str] = None
    results: Optional[str] = None
    plot: Optional[str] = None


def _allowed(values) -> str:
    return ", ".join(str(v) for v in values)


def _unknown(path: str, key, allowed) -> str:
    close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"{path}.{key}" if path else str(key)
    return f"{where}: unknown key{hint}; allowed keys: {_allowed(allowed)}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(errors, path, v, minimum=1) -> Optional[int]:
    if not _is_int(v) or v < minimum:
        errors.append(f"{path}: {v!r} is not allowed; allowed values: an integer >= {minimum}")
        return None
    return v


def _int_list(errors, path, v, minimum=1) -> List[int]:
    vals = v if isinstance(v, list) else [v]
    if not vals:
        errors.append(f"{path}: empty list; allowed values: an integer >= {minimum} or a list of them")
        return []
    out = []
    for i, x in enumerate(vals):
        got = _int(errors, f"{path}[{i}]" if isinstance(v, list) else path, x, minimum)
        if got is not None and got not in out:
            out.append(got)
    return out


def _choices(errors, path, v, allowed, aliases=None) -> List[str]:
    vals = v if isinstance(v, list) else [v]
    if not vals:
        errors.append(f"{path}: empty list; allowed values: {_allowed(allowed)}")
        return []
    out = []
    for i, x in enumerate(vals):
        x = (aliases or {}).get(x, x)
        if x not in allowed:
            errors.append(f"{path}[{i}]: {x!r} is not allowed; allowed values: {_allowed(allowed)}"
                          if isinstance(v, list) else
                          f"{path}: {x!r} is not allowed; allowed values: {_allowed(allowed)}")
        elif x not in out:
            out.append(x)
    return out


def _search(errors, path, raw) -> Dict[str, Dict[str, List[int]]]:
    if not isinstance(raw, dict) or not raw:
        errors.append(f"{path}: expected a mapping of kernel -> settings; allowed kernels: {_allowed(KERNELS)}")
        return {}
    out = {}
    for kernel, space in raw.items():
        kp = f"{path}.{kernel}"
        if kernel not in KERNELS:
            errors.append(_unknown(path, kernel, KERNELS))
            continue
        if not isinstance(space, dict) or not space:
            errors.append(f"{kp}: expected a mapping of Config field -> list of values; "
                          f"allowed fields: {_allowed(FIELDS)}")
            continue
        fields = {}
        for field, vals in space.items():
            fp = f"{kp}.{field}"
            if field not in FIELDS:
                errors.append(_unknown(kp, field, FIELDS))
                continue
            good = []
            for i, v in enumerate(vals if isinstance(vals, list) else [vals]):
                ip = f"{fp}[{i}]" if isinstance(vals, list) else fp
                try:
                    Config(**{field: v})
                    if not _is_int(v):
                        raise ValueError(f"must be an int, got {v!r}")
                except (ValueError, TypeError) as e:
                    allowed = ("a positive integer" if field == "num_sms" else
                               "a multiple of 32 in [32, 1024]" if field == "block_size" else "see jax_ep.Config")
                    errors.append(f"{ip}: {v!r} is not allowed ({e}); allowed values: {allowed}")
                    continue
                if v not in good:
                    good.append(v)
            if isinstance(vals, list) and not vals:
                errors.append(f"{fp}: empty list; give at least one value")
            fields[field] = good
        out[kernel] = fields
    return out


def validate(data, source: str = "tune.yaml") -> Plan:
    """The Plan of a parsed tune.yaml, or TuneConfigError listing every problem."""
    errors: List[str] = []
    if not isinstance(data, dict):
        raise TuneConfigError(source, [f"the file must be a mapping with keys: {_allowed(TOP_KEYS)}"])
    for key in data:
        if key not in TOP_KEYS:
            errors.append(_unknown("", key, TOP_KEYS))
    backend = data.get("backend", "cuda")
    if backend not in BACKENDS:
        errors.append(f"backend: {backend!r} is not allowed; allowed values: {_allowed(BACKENDS)}")
    bench_opts: Dict[str, Any] = {}
    raw_bench = data.get("bench") or {}
    if not isinstance(raw_bench, dict):
        errors.append(f"bench: expected a mapping; allowed keys: {_allowed(BENCH_KEYS)}")
        raw_bench = {}
    for key, v in raw_bench.items():
        if key not in BENCH_KEYS:
            errors.append(_unknown("bench", key, BENCH_KEYS))
            continue
        _, typ, minimum = BENCH_KEYS[key]
        if isinstance(typ, tuple):
            if v not in typ:
                errors.append(f"bench.{key}: {v!r} is not allowed; allowed values: {_allowed(typ)}")
                continue
        elif typ is int:
            if _int(errors, f"bench.{key}", v, minimum) is None:
                continue
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= minimum:
                errors.append(f"bench.{key}: {v!r} is not allowed; allowed values: a number > {minimum}")
                continue
        bench_opts[key] = v
    for key in ("output", "results", "plot"):
        if key in data and not isinstance(data[key], str):
            errors.append(f"{key}: {data[key]!r} is not allowed; allowed values: a file path")
    search = None
    if "search" in data:
        search = _search(errors, "search", data["search"])
    workloads: List[Workload] = []
    raw_w = data.get("workloads")
    if raw_w is None:
        errors.append("workloads: missing required key 'workloads' (a list of workloads)")
        raw_w = []
    elif not isinstance(raw_w, list) or not raw_w:
        errors.append("workloads: expected a non-empty list of workloads")
        raw_w = []
    names = set()
    for i, w in enumerate(raw_w):
        p = f"workloads[{i}]"
        if not isinstance(w, dict):
            errors.append(f"{p}: expected a mapping with keys: {_allowed(WORKLOAD_KEYS)}")
            continue
        n0 = len(errors)
        for key in w:
            if key not in WORKLOAD_KEYS:
                errors.append(_unknown(p, key, WORKLOAD_KEYS))
        for key in REQUIRED:
            if key not in w:
                errors.append(f"{p}: missing required key {key!r}")
        name = w.get("name", f"w{i}")
        if not isinstance(name, str) or not name:
            errors.append(f"{p}.name: {name!r} is not allowed; allowed values: a non-empty string")
        elif name in names:
            errors.append(f"{p}.name: {name!r} is used twice; names must be unique")
        names.add(name)
        tokens = _int_list(errors, f"{p}.tokens", w["tokens"]) if "tokens" in w else []
        hidden = _int(errors, f"{p}.hidden", w["hidden"]) if "hidden" in w else None
        top_k = _int(errors, f"{p}.top_k", w["top_k"]) if "top_k" in w else None
        experts = _int(errors, f"{p}.experts", w["experts"]) if "experts" in w else None
        ranks = _int(errors, f"{p}.ranks", w["ranks"]) if "ranks" in w else None
        launch = w.get("launch")
        if launch is not None and not isinstance(launch, str):
            errors.append(f"{p}.launch: {launch!r} is not allowed; allowed values: a command line (text)")
        dtypes = _choices(errors, f"{p}.dtypes", w.get("dtypes", ["bf16"]), DTYPES)
        mode_l = _choices(errors, f"{p}.mode", w.get("mode", "normal"), MODES, {"low_latency": "low-latency"})
        if isinstance(w.get("mode"), list):
            errors.append(f"{p}.mode: one value, not a list; allowed values: {_allowed(MODES)}")
        layouts = _choices(errors, f"{p}.layout", w.get("layout", ["experts"]), LAYOUTS)
        routing_l = _choices(errors, f"{p}.routing", w.get("routing", "group"), ROUTINGS)
        seed = _int(errors, f"{p}.seed", w.get("seed", 0), 0)
        zipf_s = w.get("zipf_s", 1.2)
        if isinstance(zipf_s, bool) or not isinstance(zipf_s, (int, float)) or zipf_s <= 0:
            errors.append(f"{p}.zipf_s: {zipf_s!r} is not allowed; allowed values: a number > 0")
        wsearch = _search(errors, f"{p}.search", w["search"]) if "search" in w else search
        if "search" not in w and "search" not in data:
            errors.append(f"{p}: no search space: give a top-level 'search' or {p}.search "
                          f"(allowed kernels: {_allowed(KERNELS)})")
        if hidden and "fp8" in dtypes and hidden % FP8_BLOCK:
            errors.append(f"{p}.dtypes: fp8 needs hidden to be a multiple of {FP8_BLOCK}, got hidden={hidden}")
        if experts and ranks and experts % ranks:
            errors.append(f"{p}.experts: {experts} is not divisible by ranks={ranks}")
        if experts and top_k and top_k > experts:
            errors.append(f"{p}.top_k: {top_k} is more than experts={experts}")
        if len(errors) == n0:
            workloads.append(Workload(
                name=name, tokens=tokens, hidden=hidden, top_k=top_k, experts=experts, dtypes=dtypes,
                mode=mode_l[0], layouts=layouts, routing=routing_l[0], seed=seed, zipf_s=float(zipf_s),
                search=wsearch or {}, ranks=ranks, launch=launch))
    if errors:
        raise TuneConfigError(source, errors)
    return Plan(source=source, workloads=workloads, backend=backend, bench=bench_opts,
                output=data.get("output"), results=data.get("results"), plot=data.get("plot"))


def load(path: str) -> Plan:
    """Read and validate a tune.yaml."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise TuneConfigError(path, [f"cannot read the file: {e}"]) from None
    except yaml.YAMLError as e:
        raise TuneConfigError(path, [f"not valid YAML: {e}"]) from None
    return validate(data, path)


# ---------------------------------------------------------------- candidates


def default_config() -> Config:
    """What a call gets without a tuned entry in this process (config.resolve minus tuned)."""
    n = config_lib.get_num_sms()
    if n is None:
        env = os.environ.get("JAX_EP_NUM_SMS")
        n = int(env) if env else None
    return Config(num_sms=n) if n else Config()


def candidates(space: Dict[str, List[int]], cap: Optional[int] = None) -> Tuple[List[Config], Config, List[str]]:
    """(candidates, default, notes): the grid of `space` (Config defaults for the fields
    it leaves out) plus the default config, num_sms clamped to `cap`, deduplicated."""
    notes = []
    base = default_config()
    default = base
    if cap is not None and default.num_sms > cap:
        default = dataclasses.replace(default, num_sms=cap)
        notes.append(f"the default num_sms {base.num_sms} is more than the {cap} SMs a rank may take "
                     f"here; the default candidate uses {cap}")
    axes = [space.get(f) or [getattr(default, f)] for f in FIELDS]
    out: List[Config] = []
    for combo in itertools.product(*axes):
        c = Config(**dict(zip(FIELDS, combo)))
        if cap is not None and c.num_sms > cap:
            notes.append(f"num_sms {c.num_sms} is more than the {cap} SMs a rank may take here; using {cap}")
            c = dataclasses.replace(c, num_sms=cap)
        if c not in out:
            out.append(c)
    if default not in out:
        out.append(default)
    return out, default, notes


def _cfg_text(c: Config) -> str:
    return " ".join(f"{f}={getattr(c, f)}" for f in FIELDS)


def _kernel_cases(w: Workload) -> List[Tuple[str, str]]:
    """(kernel, dtype) pairs a workload measures: dispatch per dtype, combine in BF16."""
    out = [("dispatch", d) for d in w.dtypes if "dispatch" in w.search]
    if "combine" in w.search:
        out.append(("combine", "bf16"))
    return out


def describe(plan: Plan, output: str, ranks: Optional[int] = None, cap: Optional[int] = None) -> str:
    """The plan, as --dry-run prints it."""
    lines = [f"tune plan from {plan.source}: backend {plan.backend}",
             f"cache file: {output}"]
    if plan.bench:
        lines.append("bench options: " + ", ".join(f"{k}={v}" for k, v in plan.bench.items()))
    if plan.backend == "xla":
        lines.append("note: on the xla backend the settings change nothing (a pipeline check)")
    if any(space.get("block_size") for w in plan.workloads for space in w.search.values()):
        lines.append("note: block_size is a Config field, but only num_sms reaches the kernels today; "
                     "candidates that differ only in block_size time the same")
    lines.append("default = the launcher's share JAX_EP_NUM_SMS when set (--sms-per-rank), else Config(); "
                 "num_sms above the SMs a rank may take is clamped when the job starts")
    total = 0
    for w in plan.workloads:
        where = f"ranks {w.ranks}" if w.ranks else "any rank count"
        lines.append(f"- {w.name} ({where}): {w.mode}, tokens {_allowed(w.tokens)}, hidden {w.hidden}, "
                     f"top-{w.top_k} of {w.experts} experts, dtypes {_allowed(w.dtypes)}, "
                     f"layout {_allowed(w.layouts)}, routing {w.routing} (seed {w.seed})")
        if w.launch:
            lines.append(f"    launch: {w.launch}")
        if w.mode != "normal":
            lines.append("    skipped: the low-latency kernels take no jax_ep.Config; nothing to tune")
            continue
        if ranks is not None and w.ranks is not None and w.ranks != ranks:
            lines.append(f"    skipped in this job: it has {ranks} ranks")
            continue
        n_cases = len(w.tokens) * len(w.layouts)
        for kernel, dtype in _kernel_cases(w):
            cands, default, notes = candidates(w.search[kernel], cap)
            key = config_lib.tuned_key(w.ranks or ranks or 0, w.hidden, dtype).replace("R0/", "R?/")
            lines.append(f"    {kernel} {dtype} -> {key}: {len(cands)} candidates x {n_cases} case(s); "
                         f"default {_cfg_text(default)}")
            lines.append("      " + "; ".join(_cfg_text(c) for c in cands))
            total += len(cands) * n_cases
    lines.append(f"{total} measurements" + ("" if ranks is not None else
                                            " (for workloads of any rank count; those of other ranks are skipped)"))
    return "\n".join(lines)


# ------------------------------------------------------------------- progress


class Progress:
    """rich's progress bar on a terminal (tqdm's if rich is missing), plain lines otherwise."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.n, self.enabled = total, 0, enabled
        self.t0 = time.monotonic()
        self._bar = self._task = self._tqdm = None
        if not enabled or not sys.stderr.isatty():
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn

            self._bar = RP(TextColumn("[bold]tune"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TextColumn("{task.description}"), console=Console(file=sys.stderr))
            self._task = self._bar.add_task("", total=total)
            self._bar.start()
        except ImportError:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm(total=total, file=sys.stderr, desc="tune")
            except ImportError:
                pass

    def step(self, what: str, result: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"{what}: {result}")
        elif self._tqdm is not None:
            self._tqdm.set_postfix_str(f"{what}: {result}")
            self._tqdm.update(1)
        else:
            sys.stderr.write(f"[tune {self.n}/{self.total} {time.monotonic() - self.t0:6.1f}s] {what}: {result}\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._tqdm is not None:
            self._tqdm.close()


# ------------------------------------------------------------------ the search


def _bench_args(plan: Plan, results: Optional[str], plot: Optional[str], devices: Optional[int], verbose: bool):
    from . import bench

    argv = ["normal", "--backends", plan.backend]
    for key, v in plan.bench.items():
        argv += [BENCH_KEYS[key][0], str(v)]
    args = bench._parser().parse_args(argv)
    args.quiet = not verbose
    args.json, args.plot, args.devices = results, plot, devices
    return args


def _failed(row: dict) -> bool:
    return (str(row.get("check") or "").startswith("MISMATCH")
            or str(row.get("note") or "").startswith(("error", "disqualified")))


def _checked(check: str) -> bool:
    return check.startswith("ok")


def select(rows: List[dict]) -> Dict[Tuple[str, str], dict]:
    """The best candidate per (cache key, kernel) from the rows of a search.

    A candidate qualifies when it was measured, and passed its check, in every case
    of its key and kernel; the score is the geometric mean of its median µs."""
    groups: Dict[Tuple[str, str], Dict[Tuple[int, ...], Dict[str, dict]]] = {}
    cases: Dict[Tuple[str, str], set] = {}
    for r in rows:
        if r.get("tune_key") is None:
            continue
        g = (r["tune_key"], r["direction"])
        case = r["tune_case"]
        cases.setdefault(g, set()).add(case)
        groups.setdefault(g, {}).setdefault(tuple(r[f] for f in ("sms", "block_size")), {})[case] = r
    best = {}
    for g, by_cfg in groups.items():
        scored = []
        for cfg, per_case in by_cfg.items():
            ok = (set(per_case) == cases[g]
                  and all(r.get("us") is not None and not _failed(r) for r in per_case.values()))
            if not ok:
                continue
            score = math.exp(sum(math.log(max(r["us"], 1e-3)) for r in per_case.values()) / len(per_case))
            is_default = all(r.get("tune_default") for r in per_case.values())
            scored.append((score, not is_default, cfg[0], cfg[1], per_case, is_default))
        default = [s for s in scored if s[5]]
        if not scored:
            best[g] = {"error": "no candidate qualified (every one failed its check or its measurement)",
                       "cases": sorted(cases[g])}
            continue
        scored.sort(key=lambda s: s[:4])
        s = scored[0]
        any_row = next(iter(s[4].values()))
        entry = {"num_sms": s[2], "block_size": s[3], "us": s[0],
                 "checked": all(_checked(str(r.get("check") or "")) for r in s[4].values()),
                 "cases": sorted(cases[g]), "candidates": len(by_cfg), "qualified": len(scored),
                 "backend": any_row["backend"]}
        if default:
            d = default[0]
            entry["default"] = {"num_sms": d[2], "block_size": d[3], "us": d[0]}
            entry["speedup"] = d[0] / s[0] if s[0] > 0 else None
        best[g] = entry
    return best


def search(plan: Plan, *, results: Optional[str], plot: Optional[str], devices: Optional[int] = None,
           verbose: bool = False, progress: bool = True):
    """Measure every candidate; returns (exit code, rows, best, job, notes)."""
    import jax.numpy as jnp

    import jax_ep

    from . import bench

    args = _bench_args(plan, results, plot, devices, verbose)
    job = bench.make_job(devices)
    R = job.R
    notes: List[str] = []
    work = []
    for w in plan.workloads:
        if w.mode != "normal":
            notes.append(f"workload {w.name}: skipped, the low-latency kernels take no jax_ep.Config")
        elif w.ranks is not None and w.ranks != R:
            notes.append(f"workload {w.name}: skipped, it is for {w.ranks} ranks and this job has {R}")
        elif w.experts % R:
            notes.append(f"workload {w.name}: skipped, {w.experts} experts are not divisible by {R} ranks")
        else:
            work.append(w)
    if not work:
        raise SystemExit(f"jax_ep.tune: no workload of {plan.source} runs with {R} rank(s) "
                         "(see `ranks` and `mode`); " + "; ".join(notes))
    ok, why = job.cuda_runs() if plan.backend == "cuda" else job.xla_runs
    if not ok:
        raise SystemExit(f"jax_ep.tune: backend {plan.backend} cannot run here ({why}); "
                         "`backend: xla` runs the pipeline on any platform")
    run = bench.Run(args, job)
    run.notes += notes
    # calls timed after a device barrier across the ranks, as the bench times them
    align_buf = bench._start_align(run, job, job.cuda_runs()[0])
    xla_ok, xla_why = job.xla_runs
    multi_gpu = not job.shared_gpu and R > 1
    cands = {(w.name, k): candidates(w.search[k], job.sm_cap) for w in work for k in w.search}
    for (name, k), (_, _, cn) in cands.items():
        run.notes += [f"{name} {k}: {n}" for n in dict.fromkeys(cn)]
    total = sum(len(cands[(w.name, k)][0]) * len(w.tokens) * len(w.layouts)
                for w in work for k, _ in _kernel_cases(w))
    bar = Progress(total, enabled=progress and job.main)
    header = run.header()
    try:
        for w in work:
            for T in w.tokens:
                _search_tokens(run, job, args, w, T, cands, bar, header, xla_ok, xla_why, multi_gpu,
                               jax_ep, jnp, bench)
    finally:
        bar.close()
        bench._close(align_buf)
    best = select(run.rows)
    for r in run.rows:
        g = (r.get("tune_key"), r.get("direction"))
        b = best.get(g, {})
        marks = []
        if r.get("tune_default"):
            marks.append("default")
        if b.get("num_sms") == r.get("sms") and b.get("block_size") == r.get("block_size"):
            marks.append("best")
        if _failed(r):
            marks.append("disqualified")
        r["tune"] = ", ".join(marks)
    header.append("tuned: the chosen candidate per (ranks, hidden, dtype, mode) and kernel is marked best "
                  "(smallest geometric mean of median µs over its cases); default = the settings a call "
                  "gets without a tuned entry")
    title = f"jax_ep tune ({plan.backend}): {R} ranks in {job.nproc} process(es)"
    rc = run.finish(title, TUNE_COLUMNS, header, plot_search)
    return rc, run.rows, best, job, run.notes


def _search_tokens(run, job, args, w: Workload, T: int, cands, bar: Progress, header, xla_ok, xla_why,
                   multi_gpu, jax_ep, jnp, bench) -> None:
    R, H, E, K = job.R, w.hidden, w.experts, w.top_k
    EP = bench.EP
    routing = bench.make_routing(w.routing, w.seed, R, T, E, K, w.zipf_s)
    header.append(f"{w.name} T={T}: routing {w.routing} (seed {w.seed}); rows_tok max "
                  f"{routing.rows_tok.max()}, rows_exp max {routing.rows_exp.max()}")
    x = bench.random_tokens(job, T, H, w.seed)
    idx = bench.put_ranks(job, lambda r: routing.idx[r * T:(r + 1) * T])
    wts = bench.put_ranks(job, lambda r: routing.w[r * T:(r + 1) * T])
    buf = None
    if run.backends == ["cuda"]:
        buf = jax_ep.Buffer(job.mesh, EP, hidden=H, max_tokens_per_rank=T, num_experts=E, top_k=K,
                            dtype=jnp.bfloat16, name=f"jax_ep_tune_{w.name}_{T}")
    backend = run.backends[0]
    try:
        for layout in w.layouts:
            rows_out = routing.rows_exp if layout == "experts" else routing.rows_tok
            C = bench.round_up(int(rows_out.max()), 128)
            weighted = layout == "experts"

            def dispatch_op(be, dtype, cfg):
                def op(xv, iv, wv):
                    return jax_ep.dispatch(xv, iv, wv, num_experts=E, axis_name=EP, max_rows=C, layout=layout,
                                           fp8=(dtype == "fp8"), buffer=buf if be == "cuda" else None,
                                           config=cfg, backend=be)
                return op

            def combine_op(cfg):
                if weighted:
                    return lambda ex, wt, h: jax_ep.combine(ex, h, wt, config=cfg)
                return lambda ex, h: jax_ep.combine(ex, h, config=cfg)

            def ins_of(out):
                return (out.x, out.weights, out.handle) if weighted else (out.x, out.handle)

            kcases = _kernel_cases(w)
            # the xla reference of every output compared
            ref: Dict[Any, Any] = {}
            if xla_ok:
                for dtype in sorted({d for _, d in kcases}):
                    try:
                        out = bench.sharded(job, dispatch_op("xla", dtype, None))(x, idx, wts)
                        ref[("dispatch", dtype)] = bench._dispatch_view(out)
                        if dtype == "bf16" and "combine" in w.search:
                            ref[("combine", "bf16")] = bench.sharded(job, combine_op(None))(*ins_of(out))
                        del out
                    except Exception as e:  # noqa: BLE001
                        ref[("error", dtype)] = run.error(f"xla reference {dtype} {layout}", e)

            def limits(direction, dtype):
                roof_b, stage_b = bench.normal_bytes(direction, T, H, rows_out, routing.rows_tok, dtype)
                t_roof = bench.limit_seconds(roof_b, job.gpu_of_rank, run.B)
                t_stage = bench.limit_seconds(stage_b, job.gpu_of_rank, run.B)
                if multi_gpu:
                    t_link = bench.link_seconds(routing.pair_tok, H, bench.wire_bytes(dtype), args.link_gbps * 1e9)
                    t_roof, t_stage = max(t_roof, t_link), max(t_stage, t_link)
                return t_roof * 1e6, t_stage * 1e6

            for kernel, dtype in kcases:
                cand_list, default, _ = cands[(w.name, kernel)]
                roof_us, stage_us = limits(kernel, dtype)
                combine_ins = None
                if kernel == "combine":
                    try:
                        combine_ins = ins_of(bench.sharded(job, dispatch_op(backend, "bf16", default))(x, idx, wts))
                    except Exception as e:  # noqa: BLE001
                        combine_ins = run.error(f"{backend} dispatch for combine {layout}", e)
                for cfg in cand_list:
                    row = dict(mode="normal", workload=f"{kernel} {dtype} {layout} T={T}", direction=kernel,
                               dtype=dtype, layout=layout, routing=w.routing, backend=backend, ranks=R,
                               procs=job.nproc, sms=cfg.num_sms, block_size=cfg.block_size, max_rows=C,
                               roofline_us=roof_us, staging_us=stage_us, tokens=T, hidden=H, top_k=K,
                               experts=E, rows_tok_mean=float(routing.rows_tok.mean()),
                               tune_workload=w.name, tune_key=config_lib.tuned_key(R, H, dtype, "normal"),
                               tune_case=f"{w.name}/T={T}/{layout}", tune_default=(cfg == default))
                    name = f"tune/{w.name}/{layout}/{kernel}/{dtype}/{T}/sms{cfg.num_sms}/bs{cfg.block_size}"
                    what = f"{w.name} {kernel} {dtype} {layout} T={T} {_cfg_text(cfg)}"
                    try:
                        if kernel == "dispatch":
                            op = dispatch_op(backend, dtype, cfg)
                            out = bench.sharded(job, op)(x, idx, wts)
                            row["check"] = _check(run, job, args, ref, ("dispatch", dtype),
                                                  bench._dispatch_view(out), xla_ok, xla_why)
                            if backend == "cuda":
                                row["overflow"] = bench._overflow(out)
                                if row["overflow"] and not row["check"].startswith("MISMATCH"):
                                    row["check"] = f"MISMATCH: {row['overflow']} rows overflowed"
                            del out
                            ins = (x, idx, wts)
                        else:
                            if isinstance(combine_ins, str):
                                raise RuntimeError(combine_ins)
                            op = combine_op(cfg)
                            y = bench.sharded(job, op)(*combine_ins)
                            row["check"] = _check(run, job, args, ref, ("combine", "bf16"), y, xla_ok, xla_why)
                            del y
                            ins = combine_ins
                        if row["check"].startswith("MISMATCH"):
                            row["note"] = "disqualified: output differs from the xla backend"
                        else:
                            row = run.timed_row(row, name, op, ins, flush=True)
                    except Exception as e:  # noqa: BLE001
                        row["note"] = run.error(name, e)
                    if row.get("us") is not None and row["us"] > 0:
                        row["gbps"] = bench.logical_gbps(routing.rows_tok.mean(), H, row["us"] * 1e-6, dtype)
                        row["x_roofline"] = row["roofline_us"] / row["us"]
                        row["x_staging"] = row["staging_us"] / row["us"]
                    run.add(row)
                    bar.step(what, f"{row['us']:.1f} µs {row['check']}" if row.get("us") is not None
                             else str(row.get("note") or row.get("check")))
                del combine_ins
            ref.clear()
    finally:
        job.kv.barrier("tune-close")
        bench._close(buf)


def _check(run, job, args, ref, key, got, xla_ok, xla_why) -> str:
    from . import bench

    if not xla_ok:
        return "unchecked: " + (xla_why[5:] if xla_why.startswith("n/a: ") else xla_why)
    if ("error", key[1]) in ref:
        return "MISMATCH: no xla reference (" + ref[("error", key[1])] + ")"
    return bench._check_against(run, job, args, ref, key, got, xla_ok)


TUNE_COLUMNS = [
    ("workload", "workload"), ("backend", "backend"), ("EP", "ranks"), ("procs", "procs"),
    ("SMs", "sms"), ("block", "block_size"), ("µs med [p10-p90]", "_us"), ("µs wall", "_wall"),
    ("GB/s", "_gbps"), ("x roof", "_roof"), ("x stage", "_stage"), ("check", "check"), ("tuned", "tune"),
]


def plot_search(path: str, rows: List[dict]) -> None:
    """µs against num_sms per kernel and dtype; one line per case and block size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: Dict[str, Dict[str, List[Tuple[int, float, dict]]]] = {}
    for r in rows:
        if r.get("us") is None or r.get("sms") is None:
            continue
        panel = f"{r['direction']} {r['dtype']} ({r['tune_key']})"
        label = f"{r['tune_workload']} {r['layout']} T={r['tokens']} block={r['block_size']}"
        panels.setdefault(panel, {}).setdefault(label, []).append((r["sms"], r["us"], r))
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    for ax, (panel, series) in zip(axes[0], sorted(panels.items())):
        ticks = set()
        for i, (label, pts) in enumerate(sorted(series.items())):
            pts.sort(key=lambda p: p[0])
            ticks.update(p[0] for p in pts)
            color = f"C{i % 10}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=label)
            for s, us, r in pts:
                if "best" in str(r.get("tune")):
                    ax.plot([s], [us], marker="*", markersize=16, color=color, linestyle="none")
                if r.get("tune_default"):
                    ax.plot([s], [us], marker="s", markersize=11, markerfacecolor="none", color="k",
                            linestyle="none")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("num_sms per rank (star: best, square: default)")
        ax.set_ylabel("µs per call (median)")
        if len(ticks) > 1:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no measurements", ha="center", va="center")
    fig.suptitle("jax_ep tune: candidates")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------- the cache


def cache_path(output: Optional[str] = None) -> str:
    """Where a search writes: `output`, else $JAX_EP_TUNED, else the per-user default."""
    if output:
        return os.path.expanduser(output)
    path = config_lib.tuned_path()
    if path is None:  # JAX_EP_TUNED=none: write to the default, which nothing reads now
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "jax_ep", "tuned.json")
    return path


def read_cache(path: str) -> dict:
    """The cache file as a dict (a fresh one when absent); ValueError when malformed."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {"version": config_lib.CACHE_VERSION, "entries": {}}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    config_lib._validate_cache(data)
    return data


def write_cache(path: str, best: Dict[Tuple[str, str], dict], info: dict) -> dict:
    """Merge the winners into the cache file at `path` (other keys and kernels are kept)."""
    from . import bench

    try:
        data = read_cache(path)
    except ValueError as e:
        bad = path + ".bad"
        os.replace(path, bad)
        sys.stderr.write(f"jax_ep.tune: {e}; moved it to {bad} and started a new cache\n")
        data = {"version": config_lib.CACHE_VERSION, "entries": {}}
    entries = data["entries"]
    for (key, kernel), b in sorted(best.items()):
        if "error" in b:
            continue
        R, H, dtype, mode = key.split("/")
        e = entries.setdefault(key, {})
        e.update(ranks=int(R[1:]), hidden=int(H[1:]), dtype=dtype, mode=mode)
        e[kernel] = dict(b, **info)
    data["version"] = config_lib.CACHE_VERSION
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    bench.write_json(path, data)
    config_lib.reload_tuned()
    return data


def summary(best: Dict[Tuple[str, str], dict]) -> str:
    lines = []
    for (key, kernel), b in sorted(best.items()):
        if "error" in b:
            lines.append(f"{key} {kernel}: {b['error']}")
            continue
        line = (f"{key} {kernel}: num_sms={b['num_sms']} block_size={b['block_size']} "
                f"{b['us']:,.1f} µs (geomean of {len(b['cases'])} case(s), {b['qualified']}/"
                f"{b['candidates']} candidates qualified{'' if b['checked'] else ', unchecked'})")
        d = b.get("default")
        if d:
            line += (f"; default num_sms={d['num_sms']} block_size={d['block_size']} {d['us']:,.1f} µs"
                     + (f" -> {b['speedup']:.2f}x" if b.get("speedup") else ""))
        lines.append(line)
    return "\n".join(lines)


def show(path: Optional[str] = None) -> str:
    """What `resolve` uses: the cache file, its entries and the settings they give now."""
    env_path = os.environ.get("JAX_EP_TUNED")
    path = config_lib.tuned_path() if path is None else path
    lines = []
    if path is None:
        return f"tuned configs: disabled (JAX_EP_TUNED={env_path})"
    source = "JAX_EP_TUNED" if env_path else ("$XDG_CACHE_HOME" if os.environ.get("XDG_CACHE_HOME") else "default")
    lines.append(f"tuned-config cache: {path} ({source}{'' if os.path.exists(path) else '; does not exist'})")
    share = os.environ.get("JAX_EP_NUM_SMS")
    lines.append("precedence: explicit Config > set_num_sms > JAX_EP_NUM_SMS (launcher share; clamps tuned "
                 "num_sms) > tuned > Config() defaults" + (f"; JAX_EP_NUM_SMS={share}" if share else ""))
    try:
        data = read_cache(path)
    except ValueError as e:
        lines.append(f"malformed, ignored: {e}")
        return "\n".join(lines)
    entries = data["entries"]
    if not entries:
        lines.append("no entries")
        return "\n".join(lines)
    head = ("key", "kernel", "num_sms", "block", "µs", "default", "speedup", "in use", "device", "date")
    table = [head]
    for key in sorted(entries):
        e = entries[key]
        for kernel in KERNELS:
            k = e.get(kernel)
            if not isinstance(k, dict):
                continue
            d = k.get("default") or {}
            use = config_lib.resolve(None, num_ranks=e.get("ranks"), hidden=e.get("hidden"),
                                     dtype=e.get("dtype"), mode=e.get("mode"), kernel=kernel)
            table.append((key, kernel, str(k["num_sms"]), str(k.get("block_size", "")),
                          f"{k['us']:,.1f}" if k.get("us") is not None else "",
                          f"{d['us']:,.1f} (sms {d['num_sms']})" if d.get("us") is not None else "",
                          f"{k['speedup']:.2f}x" if k.get("speedup") else "",
                          f"num_sms={use.num_sms}", str(k.get("device_kind", "")),
                          str(k.get("date", ""))[:19]))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, r in enumerate(table):
        lines.append("  ".join(v.ljust(wd) for v, wd in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jax_ep.tune",
                                description="Search jax_ep.Config settings of the normal kernels and cache "
                                            "the best per (ranks, hidden, dtype, mode).")
    p.add_argument("--config", help="the tune.yaml (see examples/tune.yaml)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="validate and print the plan only")
    p.add_argument("--output", help="cache file to write (default: $JAX_EP_TUNED, else "
                                    "$XDG_CACHE_HOME/jax_ep/tuned.json or ~/.cache/jax_ep/tuned.json)")
    p.add_argument("--results", help="bench-style JSON of every candidate (default: tune_results.json)")
    p.add_argument("--plot", help="PNG plot of the search (default: tune_results.png)")
    p.add_argument("--show", action="store_true", help="print the cache in use and its entries")
    p.add_argument("--devices", type=int, default=None, help="use the first N devices (one process)")
    p.add_argument("--verbose", action="store_true", help="also print the benchmark's own progress lines")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar or lines")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if not args.config:
        if args.show:
            print(show(os.path.expanduser(args.output) if args.output else None))
            return 0
        _parser().error("--config is required (or --show alone)")
    try:
        plan = load(args.config)
    except TuneConfigError as e:
        print(f"jax_ep.tune: {e}", file=sys.stderr)
        return 2
    output = cache_path(args.output or plan.output)
    if args.dry_run:
        print(describe(plan, output))
        print("valid: nothing was run (--dry-run)")
        return 0
    results = args.results or plan.results or "tune_results.json"
    plot = args.plot or plan.plot or "tune_results.png"
    rc, rows, best, job, notes = search(plan, results=results, plot=plot, devices=args.devices,
                                        verbose=args.verbose, progress=not args.no_progress)
    if job.main:
        print(summary(best))
        info = {"device_kind": job.device_kind, "platform": job.platform, "procs": job.nproc,
                "ranks_per_gpu": job.procs_per_gpu, "sm_cap": job.sm_cap,
                "share": os.environ.get("JAX_EP_NUM_SMS"), "source": os.path.abspath(args.config),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if any("error" not in b for b in best.values()):
            write_cache(output, best, info)
            print(f"wrote {output}")
        else:
            print("nothing qualified: the cache was not written")
            rc = rc or 1
        if config_lib.tuned_path() is None:
            print("note: JAX_EP_TUNED disables tuned configs in this environment")
        elif os.path.abspath(config_lib.tuned_path()) != os.path.abspath(output):
            print(f"note: jax_ep reads {config_lib.tuned_path()}; set JAX_EP_TUNED={output} to use this file")
        if args.show:
            print(show(output))
    job.kv.barrier("tune-end")
    return rc


if __name__ == "__main__":
    sys.exit(main())
