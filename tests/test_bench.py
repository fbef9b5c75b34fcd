"""The benchmark CLI (jax_ep.bench) at tiny sizes on CPU, its formulas, and the routing generators."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jax_ep import bench, routing_gen

ROOT = Path(__file__).resolve().parents[1]

# Tiny, fast settings shared by the CLI tests.
FAST = ["--iters", "2", "--warmup", "1", "--reps", "2", "--copy-mb", "1", "--flush-mb", "1", "--quiet"]


# ------------------------------------------------------------------ routing generators


def test_group_limited_topk_shape_determinism_and_groups():
    T, E, K, G, TG = 512, 64, 6, 8, 3
    idx, w = routing_gen.group_limited_topk(7, T, E, K, n_group=G, topk_group=TG)
    assert idx.shape == (T, K) and idx.dtype == np.int32
    assert w.shape == (T, K) and w.dtype == np.float32
    idx2, w2 = routing_gen.group_limited_topk(7, T, E, K, n_group=G, topk_group=TG)
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_array_equal(w, w2)
    idx3, _ = routing_gen.group_limited_topk(8, T, E, K, n_group=G, topk_group=TG)
    assert not np.array_equal(idx, idx3)
    assert idx.min() >= 0 and idx.max() < E
    for row in idx:
        assert len(set(row.tolist())) == K  # no repeated expert
        assert len(set((row // (E // G)).tolist())) <= TG  # within topk_group groups
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    assert (w > 0).all()


def test_group_limited_topk_picks_the_best_groups():
    # With a generator we can replay the logits and check the selection rule itself.
    T, E, K, G, TG = 64, 32, 4, 4, 2
    idx, _ = routing_gen.group_limited_topk(np.random.default_rng(3), T, E, K, n_group=G, topk_group=TG)
    logits = np.random.default_rng(3).standard_normal((T, E), dtype=np.float32)
    aff = 1 / (1 + np.exp(-logits))
    g = aff.reshape(T, G, E // G)
    score = np.sort(g, axis=2)[:, :, -2:].sum(axis=2)
    for t in range(T):
        best = set(np.argsort(-score[t])[:TG].tolist())
        allowed = [e for e in range(E) if e // (E // G) in best]
        want = sorted(allowed, key=lambda e: -aff[t, e])[:K]
        assert idx[t].tolist() == want


def test_group_limited_topk_accepts_a_jax_key():
    import jax

    a, _ = routing_gen.group_limited_topk(jax.random.key(1), 16, 32, 4)
    b, _ = routing_gen.group_limited_topk(jax.random.key(1), 16, 32, 4)
    np.testing.assert_array_equal(a, b)


def test_uniform_topk_is_distinct_and_even():
    idx, w = routing_gen.uniform_topk(0, 4000, 32, 4)
    assert all(len(set(r.tolist())) == 4 for r in idx)
    counts = np.bincount(idx.ravel(), minlength=32)
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)


def test_zipf_topk_is_skewed_without_repeats():
    T, E, K = 4000, 64, 4
    idx, w = routing_gen.zipf_topk(5, T, E, K, s=1.2)
    assert idx.dtype == np.int32 and w.dtype == np.float32
    assert all(len(set(r.tolist())) == K for r in idx)
    counts = np.bincount(idx.ravel(), minlength=E)
    assert counts.max() > 4 * counts.mean()  # a few hot experts
    assert np.median(counts) < counts.mean()
    # The hot experts are the most popular ones of the seeded Zipf law.
    p = routing_gen.zipf_popularity(E, 1.2, np.random.default_rng(5))
    assert int(np.argmax(counts)) == int(np.argmax(p))
    again, _ = routing_gen.zipf_topk(5, T, E, K, s=1.2)
    np.testing.assert_array_equal(idx, again)
    flat, _ = routing_gen.zipf_topk(5, T, E, K, s=0.0)
    assert np.bincount(flat.ravel(), minlength=E).max() < 1.5 * counts.mean()


def test_generate_falls_back_to_fewer_groups_for_small_expert_counts():
    idx, w = routing_gen.generate("group", 0, 32, 16, 4)  # 8 groups of 2 experts, 4 kept: fits
    assert idx.shape == (32, 4)
    idx, _ = routing_gen.generate("group", 0, 32, 8, 6)  # 8 groups of 1: fewer groups needed
    assert all(len(set(r.tolist())) == 6 for r in idx)
    with pytest.raises(ValueError):
        routing_gen.generate("bogus", 0, 4, 8, 2)


# ------------------------------------------------------------------------ row counts


def _hand_routing():
    # R = 2 ranks, T = 2 tokens each, E = 4 experts (rank 0: 0, 1; rank 1: 2, 3), K = 3.
    return np.array([
        [0, 1, -1],   # rank 0, token 0: two experts on rank 0
        [1, 2, -1],   # rank 0, token 1: one on rank 0, one on rank 1
        [3, 9, -1],   # rank 1, token 0: 9 is invalid (no row), 3 on rank 1
        [2, 2, -1],   # rank 1, token 1: repeated expert 2 -> one row
    ], np.int32)


def test_row_counts_hand_worked():
    idx = _hand_routing()
    np.testing.assert_array_equal(routing_gen.rows_exp(idx, 2, 4), [3, 3])
    np.testing.assert_array_equal(routing_gen.rows_tok(idx, 2, 4), [2, 3])
    np.testing.assert_array_equal(routing_gen.pair_tokens(idx, 2, 4), [[2, 1], [0, 2]])
    np.testing.assert_array_equal(routing_gen.num_valid(idx, 2, 4), [4, 4])  # count(idx != -1)
    rt = bench.routing_from(idx, np.ones(idx.shape, np.float32), 2, 4)
    np.testing.assert_array_equal(rt.rows_exp, [3, 3])
    np.testing.assert_array_equal(rt.rows_tok, [2, 3])
    np.testing.assert_array_equal(rt.pair_tok, [[2, 1], [0, 2]])
    # Roofline bytes of this example, tokens layout (rows_out = rows_tok), H = 128, BF16.
    roof, stage = bench.normal_bytes("dispatch", 2, 128, rt.rows_tok, rt.rows_tok)
    np.testing.assert_allclose(roof, [2 * 128 * 2 + 2 * 128 * 2, 2 * 128 * 2 + 3 * 128 * 2])
    np.testing.assert_allclose(stage - roof, [2 * 2 * 128 * 2, 2 * 3 * 128 * 2])


def test_byte_formulas_hand_worked():
    T, H = 2, 128
    rows_exp, rows_tok = np.array([3, 3]), np.array([2, 3])
    roof, stage = bench.normal_bytes("dispatch", T, H, rows_exp, rows_tok, "bf16")
    np.testing.assert_allclose(roof, [2 * 128 * 2 + 3 * 128 * 2] * 2)  # 1280 each
    np.testing.assert_allclose(stage, [1280 + 2 * 2 * 128 * 2, 1280 + 2 * 3 * 128 * 2])
    roof8, stage8 = bench.normal_bytes("dispatch", T, H, rows_exp, rows_tok, "fp8")
    b8 = 1 + 4 / 128
    np.testing.assert_allclose(roof8, [512 + 3 * 128 * b8] * 2)
    np.testing.assert_allclose(stage8, [512 + 3 * 128 * b8 + 2 * 2 * 128 * b8,
                                        512 + 3 * 128 * b8 + 2 * 3 * 128 * b8])
    roofc, _ = bench.normal_bytes("combine", T, H, rows_exp, rows_tok)
    np.testing.assert_allclose(roofc, [3 * 128 * 2 + 2 * 128 * 2] * 2)
    # Ranks sharing one GPU add up; one GPU each: the busiest GPU counts.
    assert bench.limit_seconds([1280, 1280], ["g", "g"], 1e3) == pytest.approx(2.56)
    assert bench.limit_seconds([1280, 2000], ["a", "b"], 1e3) == pytest.approx(2.0)
    # Link: remote rows in/out per rank (pair [[2, 1], [0, 2]]: rank 0 sends 1, rank 1 receives 1).
    assert bench.link_seconds(np.array([[2, 1], [0, 2]]), H, 2.0, 256.0) == pytest.approx(1.0)


def test_design_bytes_hand_worked():
    T, H = 2, 128
    rows_exp, rows_tok = np.array([3, 3]), np.array([2, 3])
    b8 = 1 + 4 / 128
    kw = dict(ranks=2)
    # windows, BF16: each transferred row read where it is, each output row written
    got = bench.design_bytes("dispatch", T, H, rows_exp, rows_tok, "bf16", windows=True, **kw)
    np.testing.assert_allclose(got, [(2 + 3) * 256, (3 + 3) * 256])
    # copies: the input staged first (read 2 bytes, write the wire's), then the same
    got = bench.design_bytes("dispatch", T, H, rows_exp, rows_tok, "bf16", windows=False, **kw)
    np.testing.assert_allclose(got, [2 * 128 * 4 + 5 * 256, 2 * 128 * 4 + 6 * 256])
    # FP8 quantized in the call stages even with windows; an Fp8Array does not
    q = bench.design_bytes("dispatch", T, H, rows_exp, rows_tok, "fp8", windows=True, **kw)
    np.testing.assert_allclose(q, [2 * 128 * (2 + b8) + 5 * 128 * b8, 2 * 128 * (2 + b8) + 6 * 128 * b8])
    p = bench.design_bytes("dispatch", T, H, rows_exp, rows_tok, "fp8in", windows=True, **kw)
    np.testing.assert_allclose(p, [5 * 128 * b8, 6 * 128 * b8])
    # combine: the roofline with windows, plus each partial written and read back without
    roof, stage = bench.normal_bytes("combine", T, H, rows_exp, rows_tok)
    np.testing.assert_allclose(bench.design_bytes("combine", T, H, rows_exp, rows_tok, windows=True, **kw), roof)
    np.testing.assert_allclose(bench.design_bytes("combine", T, H, rows_exp, rows_tok, windows=False, **kw), stage)
    # one rank reads its input in place: the roofline, unless it quantizes
    one = bench.design_bytes("dispatch", T, H, [3], [2], "bf16", ranks=1, windows=False)
    np.testing.assert_allclose(one, bench.normal_bytes("dispatch", T, H, [3], [2], "bf16")[0])


def test_formulas_match_the_published_anchors():
    # EP1, 4096 tokens, hidden 7168, top-8, BF16: ~0.53 GB each way, ~179 µs at 2.96 TB/s.
    T, H, K = 4096, 7168, 8
    roof, _ = bench.normal_bytes("dispatch", T, H, [T * K], [T], "bf16")
    assert roof[0] / 1e9 == pytest.approx(0.5285, rel=1e-3)
    assert bench.limit_seconds(roof, ["g"], 2.96e12) * 1e6 == pytest.approx(178.6, rel=1e-3)
    # EP8 tokens layout with uniform routing: staging bytes ~2.7x the roofline's.
    idx, _ = routing_gen.uniform_topk(0, 8 * 512, 256, 8)
    rows_tok = routing_gen.rows_tok(idx, 8, 256) * (T // 512)
    roof, stage = bench.normal_bytes("dispatch", T, H, rows_tok, rows_tok)
    assert stage.sum() / roof.sum() == pytest.approx(2.68, abs=0.03)
    # DeepEP's 95 GB/s at 3,268 µs is the logical bandwidth of ~21.7k rows per rank.
    assert bench.logical_gbps(21_658, H, 3268e-6) == pytest.approx(95.0, rel=1e-3)
    assert bench.logical_gbps(1000, 1000, 1e-3) == pytest.approx(2.0)
    assert bench.logical_gbps(1000, 1000, 1e-3, "fp8") == pytest.approx(2.0 * (1 + 4 / 128) / 2)
    # Low latency messages.
    assert bench.ll_message_bytes(7168, True) == 7168 + 56 * 4 + 16
    assert bench.ll_message_bytes(7168, False) == 2 * 7168
    np.testing.assert_allclose(bench.ll_bytes([10, 2], 7168, True), [74080, 14816])


def test_sm_values_clamps_to_the_share():
    assert bench.sm_values("auto", 16) == ([4, 8, 16], [])
    assert bench.sm_values(None, 132)[0] == [4, 8, 16, 32, 64, 128, 132]
    vals, notes = bench.sm_values("8,24,16", 16)
    assert vals == [8, 16] and len(notes) == 1 and "24" in notes[0]


def test_stats_and_round_up():
    s = bench.stats_us([1e-6 * v for v in range(1, 11)])
    assert s["median"] == pytest.approx(5.5) and s["n"] == 10
    assert s["p10"] == pytest.approx(1.9) and s["p90"] == pytest.approx(9.1)
    assert bench.round_up(1, 128) == 128 and bench.round_up(257, 128) == 384
    assert bench.round_up(256, 128) == 256


# ------------------------------------------------------------------- the trace timer


def _meta(pid, name):
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}


def _ev(pid, ts, dur, name="k"):
    return {"ph": "X", "pid": pid, "tid": 1, "ts": ts, "dur": dur, "name": name}


def test_trace_spans_one_cluster_per_call():
    events = [_meta(1, "/device:GPU:0 (pid 1)"), _meta(2, "/host:CPU")]
    for c in range(3):  # calls 5 ms apart: two kernels 17 + 11 µs with a 4 µs gap
        t = 1000.0 + 5000.0 * c
        events += [_ev(1, t, 17.0), _ev(1, t + 21.0, 11.0 + c)]
        events += [_ev(2, t - 50.0, 400.0), _ev(2, t + 700.0, 10.0)]  # host events: ignored
    events.reverse()  # any order
    assert bench.trace_spans(events, 3) == pytest.approx([32.0, 33.0, 34.0])
    assert bench.trace_spans(events) == pytest.approx([32.0, 33.0, 34.0])  # no count check
    # A gap longer than the threshold inside a call splits it; with the count known,
    # the shortest gaps are joined again (the calls are apart by far longer ones).
    assert len(bench.trace_spans(events, gap_us=2.0)) == 6
    assert bench.trace_spans(events, 3, gap_us=2.0) == pytest.approx([32.0, 33.0, 34.0])
    # Fewer clusters than calls cannot be mended.
    with pytest.raises(RuntimeError, match="has 3 clusters .* expected 4"):
        bench.trace_spans(events, 4)


def test_trace_spans_covers_every_gpu_of_the_process():
    events = [_meta(1, "/device:GPU:0"), _meta(2, "/device:GPU:1"), {"ph": "M", "pid": 1, "tid": 7,
              "name": "thread_name", "args": {"name": "Stream #13"}}]
    for c in range(2):
        t = 10_000.0 * c
        events += [_ev(1, t, 20.0), _ev(1, t + 30.0, 10.0),  # GPU 0: 0-40
                   _ev(2, t + 5.0, 50.0),  # GPU 1 overlaps, ends last (55)
                   _ev(2, t + 35.0, 2.0)]  # starts before the latest end: same cluster
    assert bench.trace_spans(events, 2) == pytest.approx([55.0, 55.0])


def test_trace_spans_flush_and_call_in_turn():
    events = [_meta(3, "/device:GPU:0")]
    for c in range(4):
        t = 100_000.0 * c
        events += [_ev(3, t, 300.0, "flush")]  # the L2 flush
        events += [_ev(3, t + 3000.0, 40.0 + c), _ev(3, t + 3050.0, 10.0)]  # then the call (60 + c)
    assert bench.trace_spans(events, 4, every=2) == pytest.approx([60.0, 60.0, 60.0, 60.0])
    assert bench.trace_spans(events, 8) == pytest.approx([300.0, 60.0] * 4)
    with pytest.raises(RuntimeError, match=r"has 8 clusters .* expected 10: 5 x a flush and a call"):
        bench.trace_spans(events, 5, every=2)
    # a call split by a long idle inside it is joined again, flushes kept apart
    events += [_ev(3, 400_000.0, 300.0, "flush"), _ev(3, 403_000.0, 20.0), _ev(3, 404_000.0, 30.0)]
    assert bench.trace_spans(events, 5, every=2) == pytest.approx([60.0, 60.0, 60.0, 60.0, 1030.0])


def test_trace_spans_without_gpu_events_is_an_error():
    events = [_meta(1, "/host:CPU"), _ev(1, 0.0, 10.0), _ev(9, 0.0, 10.0)]  # pid 9: no name
    with pytest.raises(RuntimeError, match="no GPU events"):
        bench.trace_spans(events, 1)


def test_load_trace_events(tmp_path):
    import gzip

    events = [_meta(1, "/device:GPU:0"), _ev(1, 0.0, 12.5)]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as fh:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, fh)
    assert bench.load_trace_events(str(tmp_path)) == events
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as fh:
        json.dump(events, fh)  # a bare list
    assert bench.trace_spans(bench.load_trace_events(str(tmp_path)), 1) == [12.5]
    with pytest.raises(RuntimeError, match="no perfetto_trace.json.gz"):
        bench.load_trace_events(str(tmp_path / "empty"))


# ------------------------------------------------------------------------ the CLI


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    for key in ("mode", "machine", "config", "copy", "limits", "rows", "notes"):
        assert key in data, key
    for key in ("device_kind", "jax", "date", "processes", "devices"):
        assert key in data["machine"], key
    assert data["copy"]["B"] > 0
    return data


def _is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_normal_one_device(tmp_path, capsys):
    js, png = tmp_path / "n1.json", tmp_path / "n1.png"
    rc = bench.main(["normal", "--devices", "1", "--tokens", "32", "--hidden", "128", "--experts", "8",
                     "--top-k", "2", "--layout", "experts", "--dtype", "bf16",
                     "--backends", "cuda,xla,sort", *FAST, "--json", str(js), "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "jax_ep normal" in out and "max_rows" in out and "copy bandwidth B" in out
    data = _load(js)
    rows = {(r["backend"], r["direction"]): r for r in data["rows"]}
    assert set(rows) == {("xla", "dispatch"), ("xla", "combine"), ("sort", "dispatch"),
                         ("sort", "combine"), ("cuda", "dispatch"), ("cuda", "combine")}
    assert rows[("xla", "dispatch")]["check"] == "ref"
    assert rows[("sort", "dispatch")]["check"] == "ok"  # the same rows, bit for bit
    assert rows[("sort", "combine")]["check"].startswith("ok")
    assert rows[("cuda", "dispatch")]["us"] is None and rows[("cuda", "dispatch")]["note"] == "n/a"
    for key in (("xla", "dispatch"), ("sort", "combine")):
        r = rows[key]
        assert r["us"] is not None and r["us_wall"] > 0 and r["ranks"] == 1 and r["procs"] == 1
        assert r["max_rows"] == 128 and r["roofline_us"] > 0 and r["staging_us"] >= r["roofline_us"]
    r = rows[("xla", "dispatch")]
    if r["us"] > 0:
        assert r["gbps"] > 0 and r["x_roofline"] > 0
    if rows[("sort", "dispatch")]["us"] and r["us"]:
        assert r["vs_sort"] == pytest.approx(rows[("sort", "dispatch")]["us"] / r["us"])
    assert _is_png(png)


def test_cli_normal_eight_devices(tmp_path, capsys):
    js = tmp_path / "n8.json"
    rc = bench.main(["normal", "--tokens", "16", "--hidden", "128", "--experts", "16", "--top-k", "4",
                     "--layout", "tokens", "--dtype", "fp8", "--routing", "zipf",
                     "--backends", "xla,sort", "--timer", "wall", *FAST, "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = _load(js)
    assert data["machine"]["devices"] == 8
    xla = [r for r in data["rows"] if r["backend"] == "xla"]
    assert {(r["direction"], r["dtype"]) for r in xla} == {("dispatch", "fp8"), ("combine", "bf16")}
    assert all(r["check"] == "ref" and r["ranks"] == 8 and r["layout"] == "tokens" for r in xla)
    assert all(r["timer"] == "wall" and r["us"] == r["us_wall"] for r in xla)
    lim = [l for l in data["limits"] if l["direction"] == "dispatch"][0]
    # max_rows is the most rows any rank receives, rounded up to 128.
    assert lim["max_rows"] % 128 == 0 and lim["max_rows"] >= lim["rows_out_max"]
    assert lim["rows_out_max"] == lim["rows_tok_max"]  # tokens layout


def test_cli_low_latency_padding_unset(tmp_path, capsys):
    """--padding unset: the dispatch and round-trip rows say so and run with
    zero_padding=False (the combine alone is the same call either way)."""
    js = tmp_path / "ll.json"
    rc = bench.main(["low-latency", "--devices", "2", "--tokens", "4", "--hidden", "128",
                     "--experts", "8", "--top-k", "2", "--backends", "xla", "--timer", "wall", *FAST,
                     "--padding", "unset", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = {r["workload"]: r for r in _load(js)["rows"]}
    assert set(rows) == {"dispatch fp8 T=4, padding unset", "round trip fp8 T=4, padding unset",
                         "combine bf16 T=4"}
    assert all(r["zero_padding"] is False and r["check"] == "ref" for r in rows.values())


def test_cli_low_latency(tmp_path, capsys):
    js, png = tmp_path / "ll.json", tmp_path / "ll.png"
    rc = bench.main(["low-latency", "--devices", "1", "--tokens", "4", "--hidden", "128",
                     "--experts", "8", "--top-k", "2", "--backends", "xla,cuda", "--timer", "wall", *FAST,
                     "--json", str(js), "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "jax_ep low-latency" in out
    data = _load(js)
    assert data["mode"] == "low-latency"
    xla = [r for r in data["rows"] if r["backend"] == "xla"]
    assert sorted((r["tokens"], r["direction"]) for r in xla) == [
        (4, "combine"), (4, "dispatch"), (4, "round trip")]
    for r in xla:
        assert r["check"] == "ref" and r["us"] is not None
        fp8, bf16 = bench.ll_message_bytes(128, True), bench.ll_message_bytes(128, False)
        msg = {"dispatch": fp8, "combine": bf16, "round trip": fp8 + bf16}[r["direction"]]
        assert r["bytes_per_rank"] == pytest.approx(r["tokens"] * 2 * msg)  # top-2, no -1 slots
    assert all(r["note"] == "n/a" for r in data["rows"] if r["backend"] == "cuda")
    assert _is_png(png)


def test_cli_cuda_path_with_a_stand_in_backend(tmp_path, capsys, monkeypatch):
    """The cuda rows (SM sweep, buffer, checks against xla) with the xla backend standing in."""
    import jax_ep

    real = jax_ep.dispatch
    made = []

    class StandInBuffer:
        def __init__(self, mesh, axis, **kw):
            made.append(kw)
            self.closed = False

        def close(self):
            self.closed = True

    def dispatch(*a, backend="auto", buffer=None, config=None, **k):
        assert backend in ("xla", "cuda")
        if backend == "cuda":
            assert isinstance(buffer, StandInBuffer) and config.num_sms in (4, 8)
        return real(*a, backend="xla", config=config, **k)

    monkeypatch.setattr(jax_ep, "dispatch", dispatch)
    monkeypatch.setattr(jax_ep, "Buffer", StandInBuffer)
    monkeypatch.setattr(bench.Job, "cuda_runs", lambda self: (True, ""))
    js, png = tmp_path / "c.json", tmp_path / "c.png"
    rc = bench.main(["normal", "--devices", "1", "--tokens", "32", "--hidden", "128", "--experts", "8",
                     "--top-k", "2", "--layout", "tokens", "--dtype", "bf16", "--sms", "4,8",
                     "--backends", "cuda,xla", "--timer", "wall", *FAST, "--json", str(js),
                     "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert made and made[0]["max_tokens_per_rank"] == 32 and made[0]["hidden"] == 128
    rows = [r for r in _load(js)["rows"] if r["backend"] == "cuda"]
    assert sorted((r["sms"], r["direction"]) for r in rows) == [
        (4, "combine"), (4, "dispatch"), (8, "combine"), (8, "dispatch")]
    assert all(r["check"] == "ok" and r["us"] is not None for r in rows)
    assert all(r["vs_xla"] is not None and r["deepep_us"] is None for r in rows)
    assert _is_png(png)


def test_cli_trace_timer_with_stand_in_gpu_events(tmp_path, capsys, monkeypatch):
    """--timer trace end to end on CPU: the profiler runs, the GPU events are made up
    (a 12 µs call, and a 300 µs flush before it in normal mode)."""
    real_job, real_spans = bench.make_job, bench.trace_spans
    seen = []

    def make_job(devices_arg=None):
        job = real_job(devices_arg)
        job.platform = "gpu"  # past the check at start-up; the cuda rows say n/a (no extension)
        return job

    def trace_spans(events, calls=None, *, gap_us=bench.TRACE_GAP_US, every=1, after=None):
        assert any(e.get("ph") == "M" for e in events)  # the real trace, loaded
        seen.append((calls, every))
        fake = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
        for c in range(calls):
            t = 10_000.0 * c
            if every == 2:
                fake.append({"ph": "X", "pid": 1, "ts": t, "dur": 300.0})
            fake += [{"ph": "X", "pid": 1, "ts": t + 3000.0, "dur": 5.0},
                     {"ph": "X", "pid": 1, "ts": t + 3010.0, "dur": 2.0}]
        assert after is None
        return real_spans(fake + list(events), calls, gap_us=gap_us, every=every)

    monkeypatch.setattr(bench, "make_job", make_job)
    monkeypatch.setattr(bench, "trace_spans", trace_spans)
    js = tmp_path / "t.json"
    rc = bench.main(["low-latency", "--devices", "1", "--tokens", "4", "--hidden", "128", "--experts", "8",
                     "--top-k", "2", "--backends", "xla", "--timer", "trace", *FAST, "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "span of the call's GPU work in a profiler trace" in out and "copy kernel, trace timer: 12" in out
    data = _load(js)
    assert data["copy"]["kernel_timer"] == "trace" and data["copy"]["kernel_us"] == pytest.approx(12.0)
    assert all(l["copy_same_bytes_us"] == pytest.approx(12.0) for l in data["limits"])
    assert len(data["rows"]) == 3
    for r in data["rows"]:
        assert r["timer"] == "trace" and r["us"] == pytest.approx(12.0) and r["samples"] == 2
        assert r["us_wall"] > 0 and r["empty_loop_us"] is None
    assert set(seen) == {(5, 1), (2, 1)}  # the copy kernel's 5 calls, then 2 per row; no flush
    seen.clear()
    rc = bench.main(["normal", "--devices", "1", "--tokens", "32", "--hidden", "128", "--experts", "8",
                     "--top-k", "2", "--layout", "experts", "--dtype", "bf16", "--backends", "xla",
                     "--timer", "trace", *FAST, "--json", str(js)])
    assert rc == 0, capsys.readouterr().out
    rows = _load(js)["rows"]
    assert {r["direction"] for r in rows} == {"dispatch", "combine"}
    assert all(r["timer"] == "trace" and r["us"] == pytest.approx(12.0) for r in rows)
    assert (2, 2) in seen  # the L2 flush before every call: flush and call in turn


def test_trace_spans_after_the_device_barrier():
    events = [_meta(1, "/device:GPU:0"), _meta(2, "/device:GPU:1")]
    for c in range(3):  # per call: the barrier's two kernels on each GPU, then the call
        t = 20_000.0 * c
        events += [_ev(1, t, 3.0, "all_reduce_stage_kernel"), _ev(1, t + 3.0, 40.0 + c, "all_reduce_sum_kernel"),
                   _ev(2, t + 1.0, 2.0, "all_reduce_stage_kernel"), _ev(2, t + 4.0, 30.0, "all_reduce_sum_kernel"),
                   _ev(1, t + 45.0 + c, 10.0, "send"), _ev(2, t + 36.0, 25.0, "recv")]
    # from the earlier barrier end (GPU 1: 34) to the last end (61)
    assert bench.trace_spans(events, 3) == pytest.approx([61.0, 61.0, 61.0])
    assert bench.trace_spans(events, 3, after=bench.ALIGN_KERNEL) == pytest.approx([27.0, 27.0, 27.0])
    clusters = bench.after_marker(events, bench.trace_clusters(events, 3), bench.ALIGN_KERNEL)
    rows = bench.call_kernels(events, clusters)
    assert [r["name"] for r in rows] == ["recv", "send", "(idle inside the call)"]  # the barrier left out
    with pytest.raises(RuntimeError, match="no kernel named like 'all_reduce_sum'"):
        bench.trace_spans([e for e in events if "all_reduce" not in e.get("name", "")] + [_meta(1, "/device:GPU:0")],
                          3, after=bench.ALIGN_KERNEL)


def test_loop_body_runs_the_barrier_before_every_call():
    import jax
    import jax.numpy as jnp

    seen = []

    def pre(args):  # stands in for the device barrier: marks the args it passes through
        seen.append(len(args))
        return tuple(a + 1 for a in args)

    op = lambda a: a * 2  # noqa: E731
    for fn, want in ((op, 2 * 3), (None, 0)):
        prog = jax.jit(bench.Timer.loop_body(fn, 3, False, pre))
        sc, last = prog((jnp.zeros((2,)),), jnp.zeros((4,)), jnp.ones(()), jnp.zeros((2,)))
        # three iterations, each one barrier (+1) and then the call on its output
        assert float(last[0]) == want
    assert seen == [1, 1]  # traced once per program


def test_cli_align_device_with_a_stand_in_barrier(tmp_path, capsys, monkeypatch):
    """--align device on the trace timer: the span starts where the barrier's kernel ends
    (made-up GPU events: a 50 µs barrier, then a 12 µs call)."""
    real_job, real_spans = bench.make_job, bench.trace_spans
    aligned = []

    def make_job(devices_arg=None):
        job = real_job(devices_arg)
        job.platform = "gpu"
        return job

    def start_align(run, job, cuda_ok):
        assert run.args.align == "device"
        run.timer.set_align(lambda args: (aligned.append(job.R), args)[1])
        return None

    def trace_spans(events, calls=None, *, gap_us=bench.TRACE_GAP_US, every=1, after=None):
        fake = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
        for c in range(calls):
            t = 10_000.0 * c
            if after is not None:
                fake.append({"ph": "X", "pid": 1, "ts": t + 2950.0, "dur": 50.0, "name": "all_reduce_sum_kernel"})
            fake += [{"ph": "X", "pid": 1, "ts": t + 3000.0, "dur": 12.0, "name": "k"}]
        return real_spans(fake, calls, gap_us=gap_us, every=every, after=after)

    monkeypatch.setattr(bench, "make_job", make_job)
    monkeypatch.setattr(bench, "_start_align", start_align)
    monkeypatch.setattr(bench, "trace_spans", trace_spans)
    js = tmp_path / "a.json"
    rc = bench.main(["low-latency", "--devices", "1", "--tokens", "4", "--hidden", "128", "--experts", "8",
                     "--top-k", "2", "--backends", "xla", "--timer", "trace", "--align", "device", *FAST,
                     "--json", str(js)])
    assert rc == 0, capsys.readouterr().out
    rows = _load(js)["rows"]
    assert rows and all(r["aligned"] and r["us"] == pytest.approx(12.0) for r in rows)
    assert aligned and set(aligned) == {1}


def test_align_needs_the_kernels(tmp_path, capsys):
    js = tmp_path / "n.json"
    rc = bench.main(["low-latency", "--devices", "4", "--tokens", "4", "--hidden", "128", "--experts", "8",
                     "--top-k", "2", "--backends", "xla", "--timer", "wall", "--align", "device", *FAST,
                     "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "--align device needs the cuda kernels on GPUs" in out
    assert all(r["aligned"] is False for r in _load(js)["rows"])


def test_align_skips_a_job_over_several_hosts():
    from types import SimpleNamespace

    hosts = iter([["a", "b"], ["a", "a"]])
    job = SimpleNamespace(R=2, platform="gpu", kv=SimpleNamespace(gather=lambda name, obj: next(hosts)))
    run = SimpleNamespace(args=SimpleNamespace(align="auto"), notes=[])
    assert bench._start_align(run, job, True) is None
    assert "span several hosts" in run.notes[0]
    # one host: on to the barrier's Buffer (here no mesh to make it on: a note, no barrier)
    run.notes.clear()
    run.error = lambda what, e: f"error: {type(e).__name__}"
    job.mesh = None
    assert bench._start_align(run, job, True) is None
    assert run.notes and "no barrier Buffer" in run.notes[0]


def test_token_order_largest_buffer_first_over_nvshmem():
    assert bench._token_order("1,128,256", False) == [1, 128, 256]
    assert bench._token_order("1,128,256", True) == [256, 128, 1]


def test_deepep_figures_only_for_the_same_setting():
    from types import SimpleNamespace

    shape = dict(bench.DEEPEP_SHAPE)
    harness = SimpleNamespace(shared_gpu=True, nproc=8, R=8)
    assert bench._deepep(harness, "dispatch", "bf16", 16, shape) == (3268, 95)
    assert bench._deepep(harness, "combine", "bf16", 8, shape) == (3195, 97)
    assert bench._deepep(harness, "dispatch", "fp8", 4, shape) is None  # no figure at 4 SMs
    assert bench._deepep(harness, "dispatch", "bf16", 16, dict(shape, tokens=8192)) is None
    ep2 = SimpleNamespace(shared_gpu=True, nproc=2, R=2)
    assert bench._deepep(ep2, "dispatch", "fp8", 64, shape) == (202, 299)
    gpus = SimpleNamespace(shared_gpu=False, nproc=8, R=8)  # eight real GPUs: another setting
    assert bench._deepep(gpus, "dispatch", "bf16", 16, shape) is None


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "jax_ep.bench", "normal", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for opt in ("--tokens", "--dtype", "--layout", "--routing", "--backends", "--sms", "--json", "--plot"):
        assert opt in r.stdout
    r = subprocess.run([sys.executable, "-m", "jax_ep.bench", "low-latency", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--round-scale" in r.stdout


def test_trace_timer_on_cpu_stops_at_once():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "jax_ep.bench", "low-latency", "--timer", "trace"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert ("--timer trace needs GPU events in the profiler trace; on CPU use --timer loop or wall"
            in r.stderr.strip().splitlines()[-1])
    assert "Traceback" not in r.stderr and "copy bandwidth" not in r.stderr


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit):
        bench.main(["normal", "--layout", "rows"])
    with pytest.raises(SystemExit):
        bench.main(["normal", "--iters", "0"])


def test_call_kernels_breaks_a_span_down():
    events = [_meta(1, "/device:GPU:0")]
    for c in range(3):  # a memset, then two kernels with a 4 µs gap, 5 ms apart
        t = 1000.0 + 5000.0 * c
        events += [_ev(1, t, 2.0, "memset"), _ev(1, t + 2.0, 15.0 + c, "route"), _ev(1, t + 21.0, 11.0, "expand")]
    clusters = bench.trace_clusters(events, 3)
    assert [e - s for s, e in clusters] == pytest.approx(bench.trace_spans(events, 3))
    rows = bench.call_kernels(events, clusters)
    assert [r["name"] for r in rows] == ["memset", "route", "expand", "(idle inside the call)"]
    assert rows[1]["us"] == pytest.approx(16.0) and rows[2]["start_us"] == pytest.approx(21.0)
    assert rows[1]["us_max"] == pytest.approx(17.0) and rows[2]["us_max"] == pytest.approx(11.0)
    assert rows[-1]["us"] == pytest.approx(32.0 - 2.0 - 16.0 - 11.0) and rows[-1]["calls"] == 3
    # a call with other kernels is left out of the medians
    events += [_ev(1, 100_000.0, 5.0, "other")]
    rows = bench.call_kernels(events, bench.trace_clusters(events, 4))
    assert rows[-1]["calls"] == 3


def test_kernels_flag_names_the_processes():
    p = bench._parser()
    assert p.parse_args(["normal"]).kernels is None
    assert p.parse_args(["normal", "--kernels"]).kernels == "main"
    assert p.parse_args(["low-latency", "--kernels", "all"]).kernels == "all"
    with pytest.raises(SystemExit):
        p.parse_args(["normal", "--kernels", "some"])
