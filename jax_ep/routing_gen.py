"""Routings for benchmarks and tests: seeded, NumPy only, and cheap at full size.

Three generators, each returning ``(topk_idx int32 [T, K], topk_weights float32 [T, K])``
with K distinct experts per token, deterministic for a given seed:

- `group_limited_topk`: DeepSeek-V3 gating. Random logits give sigmoid affinities;
  experts form ``n_group`` groups, a group scores the sum of its two best affinities,
  the ``topk_group`` best groups stay and the K best experts among them are picked.
  Weights are the picked affinities normalized to sum to one.
- `uniform_topk`: K distinct experts, uniformly at random.
- `zipf_topk`: K distinct experts drawn without replacement with probability
  proportional to ``1 / rank**s`` (expert popularity ranks shuffled by the seed, so
  hot experts land on random EP ranks). Real routers are skewed like this.

Row counts (BENCHMARKS.md "Row counts") are computed on the host from the *global*
routing ``[R*T, K]`` (rank s owns rows ``[s*T, (s+1)*T)``; rank r owns experts
``[r*E/R, (r+1)*E/R)``): `rows_tok`, `rows_exp` and `pair_tokens`.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .checks import check_group_limits

__all__ = [
    "group_limited_topk", "uniform_topk", "zipf_topk", "generate", "ROUTINGS",
    "rows_tok", "rows_exp", "pair_tokens", "token_rank_counts", "num_valid",
]


def as_rng(key_or_rng) -> np.random.Generator:
    """A NumPy generator from an int seed, a sequence of ints, a generator or a JAX key."""
    if isinstance(key_or_rng, np.random.Generator):
        return key_or_rng
    if isinstance(key_or_rng, (int, np.integer)):
        return np.random.default_rng(int(key_or_rng))
    if isinstance(key_or_rng, (tuple, list)):
        return np.random.default_rng([int(v) for v in key_or_rng])
    try:  # a JAX PRNG key, typed or raw uint32
        import jax

        data = key_or_rng
        if jax.dtypes.issubdtype(getattr(data, "dtype", None), jax.dtypes.prng_key):
            data = jax.random.key_data(data)
        words = np.asarray(data).astype(np.uint64).ravel()
        return np.random.default_rng([int(w) for w in words])
    except Exception as e:  # pragma: no cover - message only
        raise TypeError(
            f"key_or_rng must be an int seed, a numpy Generator or a JAX key, got {type(key_or_rng).__name__}"
        ) from e


def _check(num_tokens: int, num_experts: int, top_k: int) -> None:
    if num_tokens < 0 or num_experts < 1 or top_k < 1:
        raise ValueError(f"need num_tokens >= 0, num_experts >= 1, top_k >= 1; got "
                         f"{num_tokens}, {num_experts}, {top_k}")
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) cannot exceed num_experts ({num_experts})")


def _top_k_sorted(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, largest first (ties: lower index)."""
    n = scores.shape[1]
    if k <= 16 and k < n:
        # k passes of argmax beat a full argpartition for the small k of MoE routers.
        work = np.array(scores, dtype=np.float32, copy=True)
        rows = np.arange(work.shape[0])
        out = np.empty((work.shape[0], k), np.int64)
        for j in range(k):
            best = work.argmax(axis=1)
            out[:, j] = best
            work[rows, best] = -np.inf
        return out
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), scores.shape).copy()
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 sigmoid, in place on a float32 array."""
    np.negative(x, out=x)
    np.exp(x, out=x)
    x += np.float32(1)
    np.reciprocal(x, out=x)
    return x


def _normalized(affinity: np.ndarray, idx: np.ndarray) -> np.ndarray:
    w = np.take_along_axis(affinity, idx, axis=1).astype(np.float32)
    return (w / np.maximum(w.sum(axis=1, keepdims=True), np.float32(1e-20))).astype(np.float32)


def group_limited_topk(key_or_rng, num_tokens: int, num_experts: int, top_k: int,
                       n_group: int = 8, topk_group: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3 group-limited gating on random logits.

    Each token's K experts lie in at most ``topk_group`` of the ``n_group`` groups
    of ``num_experts // n_group`` consecutive experts.
    """
    _check(num_tokens, num_experts, top_k)
    check_group_limits(num_experts, top_k, n_group, topk_group)
    per_group = num_experts // n_group
    rng = as_rng(key_or_rng)
    affinity = _sigmoid(rng.standard_normal((num_tokens, num_experts), dtype=np.float32))
    grouped = affinity.reshape(num_tokens, n_group, per_group)
    best = grouped.max(axis=2)
    if per_group > 1:  # plus the second best (the best itself once, ties kept)
        first = grouped.argmax(axis=2)
        rest = grouped.copy()
        np.put_along_axis(rest, first[..., None], -np.inf, axis=2)
        group_score = best + rest.max(axis=2)
    else:
        group_score = best
    groups = _top_k_sorted(group_score, topk_group)  # [T, topk_group], best first
    # Top-k among the kept groups' experts only, then back to global ids.
    kept = np.take_along_axis(grouped, groups[..., None], axis=1).reshape(num_tokens, -1)
    local = _top_k_sorted(kept, top_k)
    expert = groups[:, :, None] * per_group + np.arange(per_group)[None, None, :]
    idx = np.take_along_axis(expert.reshape(num_tokens, -1), local, axis=1).astype(np.int32)
    return idx, _normalized(affinity, idx)


def uniform_topk(key_or_rng, num_tokens: int, num_experts: int, top_k: int
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """K distinct experts per token, uniformly at random; sigmoid-affinity weights."""
    _check(num_tokens, num_experts, top_k)
    rng = as_rng(key_or_rng)
    affinity = _sigmoid(rng.standard_normal((num_tokens, num_experts), dtype=np.float32))
    idx = _top_k_sorted(affinity, top_k).astype(np.int32)
    return idx, _normalized(affinity, idx)


def zipf_popularity(num_experts: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """float64 [E]: probability of each expert, 1/rank**s over a seeded shuffle of ranks."""
    ranks = rng.permutation(num_experts) + 1
    p = 1.0 / ranks.astype(np.float64) ** s
    return p / p.sum()


def zipf_topk(key_or_rng, num_tokens: int, num_experts: int, top_k: int, s: float = 1.2
              ) -> Tuple[np.ndarray, np.ndarray]:
    """K distinct experts per token drawn without replacement from a Zipf(s) popularity.

    Exponential race: the K smallest of ``Exp(1) / p_e`` (equivalently the K largest
    of ``log p_e`` plus Gumbel noise) are a draw without replacement proportional to
    ``p``. Weights: normalized random sigmoid affinities.
    """
    _check(num_tokens, num_experts, top_k)
    if s < 0:
        raise ValueError(f"s must be >= 0, got {s}")
    rng = as_rng(key_or_rng)
    p = zipf_popularity(num_experts, s, rng).astype(np.float32)
    race = rng.standard_exponential((num_tokens, num_experts), dtype=np.float32)
    race *= -1.0 / p[None, :]  # larger is earlier
    idx = _top_k_sorted(race, top_k).astype(np.int32)
    affinity = _sigmoid(rng.standard_normal((num_tokens, top_k), dtype=np.float32))
    w = affinity / affinity.sum(axis=1, keepdims=True)
    return idx, w.astype(np.float32)


ROUTINGS = ("group", "uniform", "zipf")


def generate(kind: str, seed, num_tokens: int, num_experts: int, top_k: int, *,
             n_group: int = 8, topk_group: int = 4, zipf_s: float = 1.2):
    """The routing named `kind` ("group", "uniform" or "zipf").

    "group" falls back to fewer groups when the expert count does not allow
    ``n_group`` groups holding K experts in ``topk_group`` of them.
    """
    if kind == "group":
        g = n_group
        while g > 1 and (num_experts % g or top_k > topk_group * (num_experts // g)
                         or topk_group > g):
            g //= 2
        return group_limited_topk(seed, num_tokens, num_experts, top_k, n_group=g,
                                  topk_group=min(topk_group, g))
    if kind == "uniform":
        return uniform_topk(seed, num_tokens, num_experts, top_k)
    if kind == "zipf":
        return zipf_topk(seed, num_tokens, num_experts, top_k, s=zipf_s)
    raise ValueError(f"routing must be one of {ROUTINGS}, got {kind!r}")


# ----------------------------------------------------------------------- row counts


def token_rank_counts(global_idx: np.ndarray, num_ranks: int, num_experts: int) -> np.ndarray:
    """int32 [N, R]: distinct valid experts of each token on each rank.

    Ids outside [0, E) make no row (as in the library: -1 and invalid ids are
    skipped); an expert repeated within a token counts once.
    """
    idx = np.asarray(global_idx)
    if idx.ndim != 2:
        raise ValueError(f"global_idx must be [R*T, K], got shape {idx.shape}")
    if num_experts % num_ranks:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_ranks ({num_ranks})")
    n = idx.shape[0]
    valid = (idx >= 0) & (idx < num_experts)
    picked = np.zeros((n, num_experts), bool)
    rows = np.broadcast_to(np.arange(n)[:, None], idx.shape)
    picked[rows[valid], idx[valid]] = True
    return picked.reshape(n, num_ranks, num_experts // num_ranks).sum(axis=2, dtype=np.int32)


def rows_exp(global_idx: np.ndarray, num_ranks: int, num_experts: int) -> np.ndarray:
    """int64 [R]: (source token, expert on r) pairs received by rank r."""
    return token_rank_counts(global_idx, num_ranks, num_experts).sum(axis=0, dtype=np.int64)


def rows_tok(global_idx: np.ndarray, num_ranks: int, num_experts: int) -> np.ndarray:
    """int64 [R]: (source token, r) pairs where the token picks an expert on rank r."""
    return (token_rank_counts(global_idx, num_ranks, num_experts) > 0).sum(axis=0, dtype=np.int64)


def pair_tokens(global_idx: np.ndarray, num_ranks: int, num_experts: int) -> np.ndarray:
    """int64 [R_src, R_dst]: tokens of source rank s with at least one expert on rank d.

    The global routing has ``R * T`` rows, rank s owning rows ``[s*T, (s+1)*T)``.
    Column sums are `rows_tok`; the diagonal is the traffic that stays local.
    """
    n = np.asarray(global_idx).shape[0]
    if n % num_ranks:
        raise ValueError(f"global_idx has {n} rows, not a multiple of num_ranks ({num_ranks})")
    has = token_rank_counts(global_idx, num_ranks, num_experts) > 0
    return has.reshape(num_ranks, n // num_ranks, num_ranks).sum(axis=1, dtype=np.int64)


def num_valid(global_idx: np.ndarray, num_ranks: int, num_experts: int) -> np.ndarray:
    """int64 [R_src]: slots with ``topk_idx != -1`` per source rank (low-latency bytes).

    This is the count in BENCHMARKS.md's low-latency formula; ids outside [-1, E)
    are counted too, exactly as ``count(topk_idx != -1)`` does.
    """
    idx = np.asarray(global_idx)
    return (idx != -1).reshape(num_ranks, -1).sum(axis=1, dtype=np.int64)
