"""The oracle itself, on tiny cases worked out by hand from DESIGN.md section 3."""

import numpy as np
import pytest

import oracle
from oracle import BF16, F8

# R=2 ranks, E=4 experts (E_local=2), T=2 tokens, K=2.
#   rank 0: t0 -> [1, 2], t1 -> [0, -1]
#   rank 1: t0 -> [3, 0], t1 -> [2, 3]
IDX = np.array([[[1, 2], [0, -1]], [[3, 0], [2, 3]]], np.int32)
W = np.array([[[0.25, 0.5], [1.0, 9.0]], [[2.0, 4.0], [8.0, 16.0]]], np.float32)


def test_sizes():
    assert oracle.capacity(0.5, 2, 2, 4) == 1
    assert oracle.capacity(0.0, 2, 2, 4) == 1
    assert oracle.capacity(1.0, 8, 4, 16) == 2
    assert oracle.capacity(1.25, 8, 4, 16) == 3  # ceil(2.5)
    assert oracle.num_rows(2, 2, 4, 2) == 8  # T*R*min(K, El)
    assert oracle.num_rows(2, 4, 4, 2) == 8  # min(K, El) = 2
    assert oracle.num_rows(2, 2, 4, 2, layout="tokens") == 4
    assert oracle.num_rows(2, 2, 4, 2, capacity_factor=0.5) == 4  # El*R*c
    assert oracle.num_rows(8, 2, 16, 2, layout="tokens", capacity_factor=0.5) == 2 * min(8, 8)
    assert oracle.num_rows(8, 2, 64, 2, layout="tokens", capacity_factor=0.01) == 16
    assert oracle.num_rows(2, 2, 4, 2, capacity_factor=0.5, max_rows=3) == 3


def test_experts_layout_order_and_sizes():
    rt = oracle.route(IDX, W, num_experts=4)
    assert rt.C == 8
    # rank 0 owns experts 0, 1: expert 0 gets (s0,t1), (s1,t0); expert 1 gets (s0,t0)
    assert rt.rows[0] == [(0, 1, 0), (1, 0, 0), (0, 0, 1)]
    # rank 1 owns experts 2, 3: e2 gets (s0,t0), (s1,t1); e3 gets (s1,t0), (s1,t1)
    assert rt.rows[1] == [(0, 0, 0), (1, 1, 0), (1, 0, 1), (1, 1, 1)]
    np.testing.assert_array_equal(rt.group_sizes, [[2, 1], [2, 2]])
    np.testing.assert_array_equal(rt.row_weight[0], [1.0, 4.0, 0.25, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rt.row_weight[1], [0.5, 8.0, 2.0, 16.0, 0, 0, 0, 0])
    assert rt.pair_rows[(1, 1, 1)] == [1, 3]
    np.testing.assert_array_equal(rt.num_overflow, [0, 0])
    np.testing.assert_array_equal(rt.num_invalid, [0, 0])
    assert not rt.dropped.any()


def test_dispatch_rows_and_padding():
    x = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3) + 1
    out = oracle.dispatch(x, IDX, W, num_experts=4)
    np.testing.assert_array_equal(out.x[0, :3], [x[0, 1], x[1, 0], x[0, 0]])
    np.testing.assert_array_equal(out.x[1, :4], [x[0, 0], x[1, 1], x[1, 0], x[1, 1]])
    assert not out.x[0, 3:].any() and not out.x[1, 4:].any()


def test_tokens_layout():
    rt = oracle.route(IDX, W, num_experts=4, layout="tokens")
    assert rt.C == 4
    assert rt.rows[0] == [(0, 0, -1), (0, 1, -1), (1, 0, -1)]
    assert rt.rows[1] == [(0, 0, -1), (1, 0, -1), (1, 1, -1)]
    np.testing.assert_array_equal(rt.out_topk_idx[0, :3], [[1, -1], [0, -1], [-1, 0]])
    np.testing.assert_array_equal(rt.out_topk_idx[1, :3], [[-1, 0], [1, -1], [0, 1]])
    np.testing.assert_array_equal(rt.out_topk_idx[:, 3], -1)
    np.testing.assert_array_equal(rt.row_weight[0, :3], [[0.25, 0], [1.0, 0], [0, 4.0]])
    np.testing.assert_array_equal(rt.row_weight[1, :3], [[0, 0.5], [2.0, 0], [8.0, 16.0]])
    np.testing.assert_array_equal(rt.group_sizes, [[2, 1], [2, 2]])


def test_capacity_drops():
    # c = max(1, ceil(0.5 * 2 * 2 / 4)) = 1. Rank 1: t0 takes e3, so t1's e3 drops.
    rt = oracle.route(IDX, W, num_experts=4, capacity_factor=0.5)
    assert rt.C == 4
    expect = np.zeros((2, 2, 2), bool)
    expect[1, 1, 1] = True
    np.testing.assert_array_equal(rt.dropped, expect)
    np.testing.assert_array_equal(rt.num_dropped, [0, 1])
    assert rt.rows[1] == [(0, 0, 0), (1, 1, 0), (1, 0, 1)]
    g = oracle.weight_grad(rt, np.arange(1, 9, dtype=np.float32).reshape(2, 4))
    assert g[1, 1, 1] == 0  # dropped slot: no weight gradient
    assert g[1, 1, 0] == 6  # rank 1, row 1
    # Capacity counts tokens in token order on each sender separately.
    idx = np.array([[[0], [0], [0]], [[0], [1], [0]]], np.int32)
    rt = oracle.route(idx, None, num_experts=2, capacity_factor=0.6)  # c = ceil(0.9) = 1
    np.testing.assert_array_equal(rt.dropped[..., 0], [[0, 1, 1], [0, 0, 1]])
    assert rt.rows[0] == [(0, 0, 0), (1, 0, 0)]


def test_overflow():
    rt = oracle.route(IDX, W, num_experts=4, max_rows=2)
    np.testing.assert_array_equal(rt.num_overflow, [1, 2])
    np.testing.assert_array_equal(rt.group_sizes, [[2, 0], [2, 0]])
    assert rt.rows[1] == [(0, 0, 0), (1, 1, 0)]
    assert (1, 1, 0) in rt.pair_rows and rt.pair_rows[(1, 1, 0)] == []
    g = oracle.weight_grad(rt, np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(g, [[[0, 1], [1, 0]], [[0, 1], [1, 0]]])
    assert not rt.dropped.any()  # overflow is not a capacity drop


def test_invalid_and_repeated_ids():
    idx = np.array([[[5, 0], [-3, -1]], [[1, 1], [2, 2]]], np.int32)
    w = np.array([[[1, 2], [3, 4]], [[0.5, 0.25], [1, 1]]], np.float32)
    rt = oracle.route(idx, w, num_experts=4)
    np.testing.assert_array_equal(rt.num_invalid, [2, 0])
    # rank 0 gets (s0,t0,e0) and the repeated (s1,t0,e1) once, weight 0.5 + 0.25
    assert rt.rows[0] == [(0, 0, 0), (1, 0, 1)]
    assert rt.row_weight[0, 1] == np.float32(0.75)
    np.testing.assert_array_equal(rt.group_sizes, [[1, 1], [1, 0]])
    assert rt.row_weight[1, 0] == 2.0
    g = oracle.weight_grad(rt, np.arange(8, dtype=np.float32).reshape(2, 4) + 1)
    np.testing.assert_array_equal(g, [[[0, 1], [0, 0]], [[2, 2], [5, 5]]])
    # Without weights every slot weighs 1.0: the repeated expert's row weighs 2.0.
    rt = oracle.route(idx, None, num_experts=4)
    np.testing.assert_array_equal(rt.row_weight[0, :2], [1, 2])
    # Tokens layout keeps every slot as sent, group_sizes counts distinct pairs.
    rt = oracle.route(idx, w, num_experts=4, layout="tokens")
    np.testing.assert_array_equal(rt.out_topk_idx[0, 1], [1, 1])
    np.testing.assert_array_equal(rt.row_weight[0, 1], [0.5, 0.25])
    np.testing.assert_array_equal(rt.group_sizes, [[1, 1], [1, 0]])


def test_combine_order_and_rounding():
    rt = oracle.route(IDX, None, num_experts=4)
    eo = np.zeros((2, 8, 1), BF16)
    # token (s1, t1) has rows 1 (e2) and 3 (e3) on rank 1: 1 + 2**-8 ties to 1.0 in bf16
    eo[1, 1, 0] = 1.0
    eo[1, 3, 0] = 2.0 ** -8
    # token (s1, t0): rank 0 row 1 (e0) and rank 1 row 2 (e3)
    eo[0, 1, 0] = 3.0
    eo[1, 2, 0] = 2.0 ** -7
    eo[0, 3:, 0] = np.nan  # padding is never read
    y = oracle.combine(eo, rt)
    assert y.dtype == BF16
    assert float(y[1, 1, 0]) == 1.0
    assert float(y[1, 0, 0]) == 3.0  # 3 + 2**-7 ties back to 3 in bf16 (ulp 2**-6)
    y32 = oracle.combine(eo.astype(np.float32), rt)
    assert y32[1, 1, 0] == np.float32(1 + 2.0 ** -8)
    # Weighted: 0.5 + 2**-9 ties to 0.5 in bf16.
    w = np.zeros((2, 8), np.float32)
    w[1, 1], w[1, 3] = 0.5, 0.5
    y = oracle.combine(eo, rt, w)
    assert float(y[1, 1, 0]) == 0.5
    assert not np.isnan(y.astype(np.float32)).any()
    # sums start from -0.0, the additive identity: rows of -0.0 sum to -0.0
    eo2 = np.full((2, 8, 1), -0.0, np.float32)
    y = oracle.combine(eo2, rt)
    assert np.signbit(y).all() and not y.any()


def test_combine_rank_order_matters():
    # One token sent to 3 ranks (R=3, E=3). Partials 1e8, 1, -1e8 in float32:
    # (1e8 + 1) - 1e8 = 0 in float32 (1e8's ulp is 8) whereas other orders give 1.
    idx = np.array([[[0, 1, 2]], [[-1, -1, -1]], [[-1, -1, -1]]], np.int32)
    rt = oracle.route(idx, None, num_experts=3)
    eo = np.zeros((3, rt.C, 1), np.float32)
    eo[0, 0], eo[1, 0], eo[2, 0] = 1e8, 1.0, -1e8
    assert oracle.combine(eo, rt)[0, 0, 0] == 0.0
    eo[0, 0], eo[1, 0], eo[2, 0] = 1e8, -1e8, 1.0
    assert oracle.combine(eo, rt)[0, 0, 0] == 1.0


def test_combine_grad_rows():
    rt = oracle.route(IDX, W, num_experts=4)
    dy = np.arange(1, 5, dtype=np.float32).reshape(2, 2, 1)
    g = oracle.combine_grad_expert_out(rt, dy, rt.row_weight, np.float32)
    np.testing.assert_array_equal(g[0, :3, 0], [2 * 1.0, 3 * 4.0, 1 * 0.25])
    assert not g[0, 3:].any()


def test_fp8_quantize_hand_cases():
    x = np.zeros((4, 128), np.float32)
    x[1, 0], x[1, 1], x[1, 2] = 448.0, 1.0625 + 2.0 ** -23, 1.0625
    x[1, 3] = 1.5 * 2.0 ** -9  # a subnormal tie: rounds to the even 2**-8
    x[1, 4] = 2.0 ** -10  # half the smallest subnormal: ties to zero
    x[2, 0] = -448.0 * 3  # scale 3; rounded to 4 with round_scale
    x[2, 1] = 1.0
    x[3, 0] = 448.0 * 4
    data, scale = oracle.quantize(x)
    assert scale[0, 0] == np.float32(1e-4) / np.float32(448)
    assert not data[0].astype(np.float32).any()
    assert scale[1, 0] == 1.0
    np.testing.assert_array_equal(data[1, :5].astype(np.float32),
                                  [448.0, 1.125, 1.0, 2.0 ** -8, 0.0])
    assert scale[2, 0] == 3.0 and float(data[2, 0]) == -448.0
    assert float(data[2, 1]) == 0.34375  # 1/3 -> 1.375 * 2**-2 in e4m3
    data_r, scale_r = oracle.quantize(x, round_scale=True)
    np.testing.assert_array_equal(scale_r[:, 0], [2.0 ** -22, 1.0, 4.0, 4.0])
    assert float(data_r[2, 0]) == -320.0  # -336 ties to the even -320
    deq = oracle.dequantize(data, scale)
    assert deq.dtype == np.float32 and deq[2, 0] == -448.0 * 3


def test_fp8_saturates_and_round_pow2():
    rng = np.random.default_rng(0)
    x = oracle.make_x(rng, (64, 256), np.float32)
    data, scale = oracle.quantize(x)
    d = data.astype(np.float32)
    assert not np.isnan(d).any() and np.abs(d).max() == 448.0
    s = np.array([1.0, 0.75, 3.0, 2.0 ** -20 * 1.0001, 1e-4 / 448], np.float32)
    np.testing.assert_array_equal(oracle.round_pow2(s),
                                  np.array([1.0, 1.0, 4.0, 2.0 ** -19, 2.0 ** -22], np.float32))


def test_low_latency_hand_case():
    x = (np.arange(2 * 2 * 128) % 7).reshape(2, 2, 128).astype(BF16)
    ll = oracle.low_latency_dispatch(x, IDX, num_experts=4, max_tokens_per_rank=3, fp8=False)
    assert ll.x.shape == (2, 2, 6, 128)
    np.testing.assert_array_equal(ll.count, [[2, 1], [2, 2]])
    np.testing.assert_array_equal(bits(ll.x[0, 0, :2]), bits(np.stack([x[0, 1], x[1, 0]])))
    np.testing.assert_array_equal(bits(ll.x[1, 1, :2]), bits(np.stack([x[1, 0], x[1, 1]])))
    assert not ll.x[0, 1, 1:].astype(np.float32).any()
    eo = np.zeros((2, 2, 6, 128), BF16)
    eo[1, 0, 1] = 1.0  # (s1, t1) at e2
    eo[1, 1, 1] = 2.0  # (s1, t1) at e3
    w = np.ones((2, 2, 2), np.float32)
    w[1, 1] = [0.5, 0.25]
    y = oracle.low_latency_combine(eo, IDX, w, ll)
    assert float(y[1, 1, 0]) == 1.0
    # repeated ids: one row, added once per slot
    idx = np.array([[[1, 1]], [[-1, -1]]], np.int32)
    ll = oracle.low_latency_dispatch(x[:, :1], idx, num_experts=4, max_tokens_per_rank=1,
                                     fp8=True)
    np.testing.assert_array_equal(ll.count, [[0, 1], [0, 0]])
    eo = np.zeros((2, 2, 2, 128), BF16)
    eo[0, 1, 0] = 3.0
    y = oracle.low_latency_combine(eo, idx, np.full((2, 1, 2), 0.5, np.float32), ll)
    assert float(y[0, 0, 0]) == 3.0


def bits(a):
    return oracle.bits(a)


@pytest.mark.parametrize("kind", oracle.ROUTINGS)
def test_routing_generators(kind):
    rng = np.random.default_rng(1)
    idx = oracle.make_routing(kind, rng, 8, 5, 3, 16)
    assert idx.shape == (8, 5, 3) and idx.dtype == np.int32
    rt = oracle.route(idx, None, num_experts=16)
    assert (rt.group_sizes.sum(1) <= rt.C).all()
    if kind == "all_minus1":
        assert not rt.group_sizes.any()
    if kind != "invalid" and kind != "mixed":
        assert not rt.num_invalid.any()
