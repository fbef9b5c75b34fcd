"""The internode Buffer: its regions and its argument checks (the kernels run in
tests/gpu/test_internode_gpu.py, on simulated nodes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jax_ep
from jax_ep.buffer import Layout

ARGS = dict(hidden=256, max_tokens_per_rank=64, num_experts=32, top_k=4)


def _mesh(n=8):
    return Mesh(np.array(jax.devices()[:n]), ("ep",))


def test_layout_adds_internode_regions_only_over_several_nodes():
    one = Layout(8, 256, 64, 4, 32, 2, False, "nvshmem", 1).offsets()
    two = Layout(8, 256, 64, 4, 32, 2, False, "nvshmem", 2).offsets()
    assert "rdma_recv0" not in one and "rdma_flag" not in one
    assert all(k in two for k in ("rdma_flag", "rdma_ready", "fwd_inbox"))
    for name in ("rdma_recv", "comb_fwd", "vals_fwd", "fwd_tag"):
        assert two[f"{name}1"] - two[f"{name}0"] == two["half_bytes"]
    # the staging regions are contiguous: one rdma_recv slot per node has their sub-layout
    stage = two["comb_recv0"] - two["x_stage0"]
    assert two["x_stage0"] < two["idx_stage0"] < two["w_stage0"] < two["comb_recv0"]
    assert two["comb_fwd0"] - two["rdma_recv0"] >= 2 * stage
    # forwarded partials take as much room as the partials received
    assert two["vals_fwd0"] - two["comb_fwd0"] >= two["vals_recv0"] - two["comb_recv0"]
    assert two["total"] > one["total"]
    assert jax_ep.Buffer.size_hint(num_ranks=8, transport="nvshmem", num_nodes=2, **ARGS) > \
        jax_ep.Buffer.size_hint(num_ranks=8, transport="nvshmem", **ARGS)


def test_peer_buffer_takes_groups_only_when_asked(monkeypatch):
    monkeypatch.setenv("JAX_EP_NUM_NODES", "4")
    grouped = jax_ep.Buffer(_mesh(), "ep", num_nodes=2, name="n1", **ARGS)
    plain = jax_ep.Buffer(_mesh(), "ep", name="n1b", **ARGS)
    assert not plain.windows and not grouped.windows  # no GPU memory: nothing mapped
    try:
        assert grouped.num_nodes == 2 and "rdma_recv0" in grouped.layout.offsets()
        assert plain.num_nodes == 1 and "rdma_recv0" not in plain.layout.offsets()
    finally:
        grouped.close()
        plain.close()


@pytest.mark.parametrize("nodes, match", [(3, "must divide"), (0, "positive int"), (True, "positive int"),
                                          (64, "divide|at most")])
def test_buffer_bad_num_nodes(nodes, match):
    with pytest.raises(ValueError, match=match):
        jax_ep.Buffer(_mesh(), "ep", transport="nvshmem", num_nodes=nodes, name="n2", **ARGS)


def test_buffer_nodes_default_from_the_launcher(monkeypatch):
    monkeypatch.setenv("JAX_EP_NUM_NODES", "2")
    nv = jax_ep.Buffer(_mesh(), "ep", transport="nvshmem", name="n3", **ARGS)
    peer = jax_ep.Buffer(_mesh(), "ep", name="n4", **ARGS)
    try:
        assert nv.num_nodes == 2 and "nodes=2" in repr(nv)
        assert peer.num_nodes == 1  # peer pointers: one node, whatever the launcher says
        assert nv.nbytes > peer.nbytes
    finally:
        nv.close()
        peer.close()


def test_internode_buffer_runs_the_xla_backend_on_cpu():
    """On CPU the Buffer only validates; dispatch/combine with it fall back to xla."""
    mesh = _mesh()
    buf = jax_ep.Buffer(mesh, "ep", transport="nvshmem", num_nodes=4, name="n5", **ARGS)
    try:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((8 * 16, 256)), jnp.bfloat16)
        idx = jnp.asarray(np.stack([rng.choice(32, 4, replace=False) for _ in range(8 * 16)]), jnp.int32)

        def f(x, idx):
            out = jax_ep.dispatch(x, idx, num_experts=32, axis_name="ep", buffer=buf)
            return jax_ep.combine(out.x, out.handle)

        P = jax.sharding.PartitionSpec
        y = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep")))(x, idx)
        np.testing.assert_allclose(np.asarray(y, np.float32), 4 * np.asarray(x, np.float32), rtol=1e-2)
    finally:
        buf.close()


def test_internode_rows_counts_each_domain():
    from jax_ep.bench import internode_rows

    # 4 ranks = 2 nodes x 2, 8 experts (2 per rank, 4 per node), 2 tokens per rank
    idx = np.array([
        [0, 1], [4, 6],    # rank 0: token 0 stays on rank 0; token 1 -> ranks 2, 3 (node 1)
        [2, 5], [-1, 0],   # rank 1: token 0 -> rank 1, rank 2 (node 1); token 1 -> rank 0
        [0, 7], [6, 7],    # rank 2: token 0 -> rank 0 (node 0), rank 3; token 1 -> rank 3
        [1, 2], [5, 5],    # rank 3: token 0 -> ranks 0, 1 (node 0, one put); token 1 -> rank 2
    ], np.int32)
    got = internode_rows(idx, R=4, E=8, nodes=2)
    np.testing.assert_array_equal(got["dispatch_rdma"], [1, 1, 1, 1])
    np.testing.assert_array_equal(got["dispatch_rdma_min"], [1, 1, 1, 1])
    # readers of rows from the other node: rank 0 (from 2, 3), rank 1 (from 3), rank 2 (from 0, 1), rank 3 (from 0)
    np.testing.assert_array_equal(got["dispatch_nvlink"], [2, 1, 2, 1])
    # unreduced partials back over the network: source 0 token 1 gets two (ranks 2, 3), source 3 token 0 two
    np.testing.assert_array_equal(got["combine_rdma"], [2, 1, 1, 2])


def test_bench_table_puts_internode_rows_apart(tmp_path):
    import json

    from jax_ep.bench import markdown_table

    base = dict(mode="normal", direction="combine", dtype="bf16", layout="tokens", tokens=64, backend="cuda",
                ranks=8, procs=8, sms=16, us=100.0, us_p10=90.0, us_p90=110.0, gbps=1.5, x_staging=0.5,
                check="ok")
    inter = dict(base, nodes=2, rdma_bytes=300.0, rdma_min_bytes=100.0, rdma_gbps=3.0, nvlink_gbps=4.0,
                 x_copy=0.25)
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"machine": {"device_kind": "GPU"}, "rows": [base, inter]}))
    out = markdown_table([str(path)])
    assert "| nodes |" in out and "RDMA / NVLink GB/s" in out
    assert "| 3.0 / 4.0 | 3.00x | 0.25 |" in out
    assert out.count("combine bf16 tokens T=64") == 2  # one row in each table
