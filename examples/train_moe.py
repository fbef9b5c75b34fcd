"""Train a small MoE transformer language model with expert parallelism.

    python examples/train_moe.py --steps 200 --plot loss.png
    python -m jax_ep.launch --nproc 8 examples/train_moe.py --backend cuda   # GPUs

The model: token + position embeddings, a few pre-norm blocks of causal
self-attention and a `jax_ep.flax.MoE` feed-forward (DeepSeek-V3 gating,
shared expert, SwiGLU experts on `jax.lax.ragged_dot`), tied output head.
The data: a generated corpus of "topic" Markov chains; each sequence follows
one of a few random successor tables, so the next token is predictable from
the previous one once the topic is known from the context.

Training is the pjit style: parameters live on a 2-D mesh (data x ep) with
explicit `NamedSharding`s (expert weights split over "ep", the rest
replicated), the batch is split over every device, and one `jax.jit` with
in/out shardings runs forward, backward, the optax update and the
auxiliary-loss-free bias update. Without a GPU it runs on 8 simulated CPU
devices.

Where XLA's collectives cannot run (several processes sharing one GPU, as
`python -m jax_ep.launch --share-gpu` starts them), `--collectives jax_ep` (the
default there) writes the same step per device in one `shard_map`: each device
draws its own share of the batch, and the gradients of the replicated
parameters, the loss, the gradient norm and the layers' load statistics are
summed by `jax_ep.all_reduce` on the layers' Buffer. The mesh is then 1 x N.
"""

from __future__ import annotations

import os

_CPU_DEVICES = "--xla_force_host_platform_device_count"
# Only the CPU client reads this flag; it must be set before the first backend starts.
if _CPU_DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_DEVICES}=8".strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep.flax import MoE, update_bias  # noqa: E402
from jax_ep.flax.moe import place_from_host  # noqa: E402


# ---------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab: int = 128
    max_len: int = 64
    dim: int = 128
    heads: int = 4
    layers: int = 2
    experts: int = 16
    top_k: int = 2
    n_group: int = 4
    topk_group: int = 2
    expert_ffn: int = 64
    shared_experts: int = 1
    capacity_factor: Optional[float] = 2.0
    fp8: bool = False
    backend: str = "auto"
    moe_dtype: str = "float32"  # compute dtype of the MoE layers (and their Buffer)
    collectives: str = "xla"  # how the MoE layers sum their statistics ("xla" or "jax_ep")


class Attention(nnx.Module):
    """Causal multi-head self-attention that reads and writes a KV cache.

    Training passes a fresh cache of the sequence length; decoding passes the
    running cache and the position of the first new token.
    """

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)

    def __call__(self, x, cache, start):
        b, s, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, s, 3 * self.heads, d // self.heads), 3, axis=2)
        ck = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache.dtype), start, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache.dtype), start, axis=1)
        q_pos = start + jnp.arange(s)
        mask = jnp.arange(ck.shape[1])[None, :] <= q_pos[:, None]  # [s, L]
        att = jnp.einsum("bqhd,bkhd->bhqk", q, ck) / math.sqrt(d // self.heads)
        att = jax.nn.softmax(jnp.where(mask[None, None], att, -1e30), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, cv).reshape(b, s, d)
        return self.out(y), jnp.stack([ck, cv])


class Block(nnx.Module):
    def __init__(self, cfg: LMConfig, mesh, *, rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(cfg.dim, rngs=rngs)
        self.attn = Attention(cfg.dim, cfg.heads, rngs=rngs)
        self.norm2 = nnx.RMSNorm(cfg.dim, rngs=rngs)
        self.moe = MoE(
            cfg.dim, cfg.expert_ffn, cfg.experts, cfg.top_k, mesh=mesh, ep_axis="ep",
            n_group=cfg.n_group, topk_group=cfg.topk_group, num_shared_experts=cfg.shared_experts,
            capacity_factor=cfg.capacity_factor, fp8=cfg.fp8, backend=cfg.backend,
            collectives=cfg.collectives, dtype=jnp.dtype(cfg.moe_dtype), rngs=rngs,
        )

    def __call__(self, x, cache, start, decode=False):
        a, cache = self.attn(self.norm1(x), cache, start)
        x = x + a
        y, stats = self.moe(self.norm2(x), decode=decode)
        return x + y, cache, stats


class MoELM(nnx.Module):
    """Decoder-only LM; `__call__(tokens [B, S]) -> (logits [B, S, V], stats per layer, cache)`."""

    def __init__(self, cfg: LMConfig, mesh, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab, cfg.dim, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (cfg.max_len, cfg.dim)) * 0.02)
        self.blocks = nnx.List([Block(cfg, mesh, rngs=rngs) for _ in range(cfg.layers)])
        self.norm = nnx.RMSNorm(cfg.dim, rngs=rngs)

    def empty_cache(self, batch: int, length: Optional[int] = None, dtype=jnp.float32):
        """Zero KV caches, one [2, B, L, heads, head_dim] array per layer."""
        c = self.cfg
        shape = (2, batch, length or c.max_len, c.heads, c.dim // c.heads)
        return [jnp.zeros(shape, dtype) for _ in range(c.layers)]

    def __call__(self, tokens, caches=None, start=0, decode=False):
        b, s = tokens.shape
        if caches is None:
            caches = self.empty_cache(b, s)
        x = self.embed(tokens) + jax.lax.dynamic_slice_in_dim(self.pos[...], start, s)[None]
        stats, new_caches = [], []
        for block, cache in zip(self.blocks, caches):
            x, cache, st = block(x, cache, start, decode)
            stats.append(st)
            new_caches.append(cache)
        logits = self.embed.attend(self.norm(x))
        return logits, stats, new_caches

    @property
    def moe_layers(self):
        return [b.moe for b in self.blocks]


def model_shardings(model: nnx.Module, mesh):
    """NamedSharding of every variable: its partitioning metadata, else replicated."""
    specs = nnx.get_partition_spec(nnx.state(model))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def build(cfg: LMConfig, mesh, seed: int = 0) -> MoELM:
    """The model with every variable placed on the mesh (from host memory: no XLA
    collective, so this works where processes share one GPU)."""
    model = MoELM(cfg, mesh, rngs=nnx.Rngs(seed))

    def place(a, sh):
        return a if a.sharding == sh else place_from_host(a, sh)

    nnx.update(model, jax.tree.map(place, nnx.state(model), model_shardings(model, mesh)))
    return model


# ---------------------------------------------------------------- the data


def successor_tables(vocab: int, topics: int, seed: int = 1234):
    """int32 [topics, vocab]: the most likely next token of each token, per topic."""
    keys = jax.random.split(jax.random.key(seed), topics)
    return jnp.stack([jax.random.permutation(k, vocab) for k in keys]).astype(jnp.int32)


def make_batch(key, tables, batch: int, length: int, noise: float = 0.1):
    """int32 [batch, length]: each row follows one topic's table, with `noise`
    probability of a uniformly random token at each step."""
    topics, vocab = tables.shape
    kt, k0, kn, kr = jax.random.split(key, 4)
    topic = jax.random.randint(kt, (batch,), 0, topics)
    first = jax.random.randint(k0, (batch,), 0, vocab)
    flip = jax.random.bernoulli(kn, noise, (length - 1, batch))
    rand = jax.random.randint(kr, (length - 1, batch), 0, vocab)

    def step(prev, inp):
        f, r = inp
        nxt = jnp.where(f, r, tables[topic, prev])
        return nxt, nxt

    _, rest = jax.lax.scan(step, first, (flip, rand))
    return jnp.concatenate([first[:, None], rest.T], axis=1).astype(jnp.int32)


# ---------------------------------------------------------------- training


def make_mesh(ep: Optional[int] = None):
    n = jax.device_count()
    ep = ep or min(n, 4)
    if n % ep:
        raise SystemExit(f"--ep {ep} must divide the {n} devices")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((n // ep, ep), ("data", "ep"), axis_types=auto)


def cross_entropy(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def make_train_step(graphdef, optimizer, bias_rate: float):
    """(params, rest, opt_state, tokens) -> (params, rest, opt_state, loss, loads [L, E], violation [L])."""

    def train_step(params, rest, opt_state, tokens):
        (loss, stats), grads = _loss_and_grads(graphdef, params, rest, tokens)
        return _update(graphdef, optimizer, bias_rate, params, rest, opt_state, grads, loss, stats)

    return train_step


def _loss_and_grads(graphdef, params, rest, tokens):
    """((next-token loss, MoE stats per layer), gradients) of the model on `tokens`."""
    def loss_fn(p):
        logits, stats, _ = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:]), stats

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def _update(graphdef, optimizer, bias_rate, params, rest, opt_state, grads, loss, stats):
    """The optimizer step and the balancing bias step; the step's outputs."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    model = nnx.merge(graphdef, params, rest)
    for moe, st in zip(model.moe_layers, stats):
        update_bias(moe, st.tokens_per_expert, bias_rate)
    rest = nnx.state(model, nnx.Not(nnx.Param))
    loads = jnp.stack([st.tokens_per_expert for st in stats])
    violation = jnp.stack([st.max_violation for st in stats])
    return params, rest, opt_state, loss, loads, violation


def _has_ep(sharding) -> bool:
    spec = getattr(sharding, "spec", ())
    return any(a == "ep" or (isinstance(a, tuple) and "ep" in a) for a in spec)


def make_train_step_per_device(graphdef, optimizer, bias_rate: float, expert_leaf, num_devices: int,
                               max_norm: float = 1.0):
    """The step of `make_train_step` written for one device of a 1 x N mesh, to run
    inside `shard_map(check_vma=False)`; its only communication is jax_ep's.

    `expert_leaf`: per parameter leaf, whether it is split over "ep" (its gradient
    is complete on its device); every other leaf is replicated, and its gradient
    is summed over the devices. Gradients are of the sum of the N local mean
    losses, so all of them are divided by N (the global mean), then clipped by the
    global norm as `optax.clip_by_global_norm` does; `optimizer` must not clip.
    """
    n = num_devices

    def train_step(params, rest, opt_state, tokens):
        (loss, stats), grads = _loss_and_grads(graphdef, params, rest, tokens)
        leaves, tdef = jax.tree.flatten(grads)
        shared = [g for g, e in zip(leaves, expert_leaf) if not e]
        expert_sq = sum((jnp.sum(jnp.square(g)) for g, e in zip(leaves, expert_leaf) if e), jnp.zeros(()))
        moe = nnx.merge(graphdef, params, rest).moe_layers[0]  # its Buffer and backend
        shared, loss, expert_sq = jax_ep.all_reduce(
            (shared, loss, expert_sq), axis_name="ep", buffer=moe.buffer, backend=moe.backend)
        it = iter(shared)
        leaves = [(g if e else next(it)) / n for g, e in zip(leaves, expert_leaf)]
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g, e in zip(leaves, expert_leaf) if not e)
                        + expert_sq / (n * n))
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        grads = jax.tree.unflatten(tdef, [g * scale for g in leaves])
        return _update(graphdef, optimizer, bias_rate, params, rest, opt_state, grads, loss / n, stats)

    return train_step


class Progress:
    """A rich (or tqdm) progress bar when available, plain lines otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar, self.task = total, enabled, None, None
        if not enabled:
            return
        try:
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                    TextColumn("{task.description}"), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("", total=total)
            self.kind = "rich"
        except ImportError:
            try:
                from tqdm import tqdm

                self.bar, self.kind = tqdm(total=total), "tqdm"
            except ImportError:
                self.kind = "print"

    def update(self, step: int, text: str):
        if not self.enabled:
            return
        if self.kind == "rich":
            self.bar.update(self.task, completed=step, description=text)
        elif self.kind == "tqdm":
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(text)
        elif step == self.total or step % max(1, self.total // 10) == 0:
            print(f"step {step}/{self.total}  {text}", flush=True)

    def close(self):
        if self.enabled and self.kind in ("rich", "tqdm"):
            (self.bar.stop if self.kind == "rich" else self.bar.close)()


def save_plot(path: str, losses, violations):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(range(1, len(losses) + 1), losses)
    a.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    b.plot(range(1, len(violations) + 1), violations)
    b.set(xlabel="step", ylabel="max load / mean - 1", title="expert load imbalance (mean over layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fit(model: MoELM, mesh, tables, *, steps: int, batch: int, seq: int, lr: float = 3e-3,
        bias_rate: float = 1e-3, seed: int = 0, on_step=None, collectives: str = "xla") -> dict:
    """Train `model` in place on generated batches; returns the history.

    `on_step(step, loss, imbalance, tokens_per_s)` is called after every step.
    `collectives="jax_ep"`: the per-device step (`make_train_step_per_device`)
    on a 1 x N mesh, each device drawing its share of every batch.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(20, steps), max(steps, 21))
    per_device = collectives == "jax_ep"
    if any(m.collectives != collectives for m in model.moe_layers):
        raise ValueError(f"fit(collectives={collectives!r}) needs MoE layers built with the same "
                         "collectives (LMConfig.collectives)")
    clip = optax.identity() if per_device else optax.clip_by_global_norm(1.0)  # per device: in the step
    optimizer = optax.chain(clip, optax.adamw(schedule, weight_decay=0.01))
    data_sh = NamedSharding(mesh, P(("data", "ep"), None))
    repl = NamedSharding(mesh, P())
    param_sh = jax.tree.map(lambda a: a.sharding, params)
    rest_sh = jax.tree.map(lambda a: a.sharding, rest)
    opt_sh = opt_shardings(optimizer, params, param_sh, mesh)
    opt_state = init_opt_state(optimizer, params, param_sh, opt_sh, mesh)

    if per_device:
        batches, step_fn = _per_device_fns(graphdef, optimizer, bias_rate, mesh, tables, batch, seq,
                                           (param_sh, rest_sh, opt_sh))
    else:
        batches = jax.jit(lambda k: make_batch(k, tables, batch, seq), out_shardings=data_sh)
        step_fn = jax.jit(
            make_train_step(graphdef, optimizer, bias_rate),
            in_shardings=(param_sh, rest_sh, opt_sh, data_sh),
            out_shardings=(param_sh, rest_sh, opt_sh, repl, repl, repl),
            donate_argnums=(0, 1, 2),
        )

    key = jax.random.key(seed + 1)
    hist = dict(loss=[], imbalance=[], loads=None)
    timed_tokens, t_timed = 0, 0.0
    for step in range(1, steps + 1):
        key, sub = jax.random.split(key)
        t0 = time.perf_counter()
        params, rest, opt_state, loss, loads, violation = step_fn(params, rest, opt_state, batches(sub))
        loss = float(loss)  # waits for the step
        if step > 1:  # the first step compiles
            timed_tokens += batch * (seq - 1)
            t_timed += time.perf_counter() - t0
        hist["loss"].append(loss)
        hist["imbalance"].append(float(jnp.mean(violation)))
        hist["tokens_per_s"] = timed_tokens / t_timed if t_timed else float("nan")
        if on_step is not None:
            on_step(step, loss, hist["imbalance"][-1], hist["tokens_per_s"])
    hist["loads"] = [[int(v) for v in row] for row in jax.device_get(loads)] if steps else None
    nnx.update(model, params, rest)
    return hist


def opt_shardings(optimizer, params, param_sh, mesh):
    """The optimizer state's shardings: moments follow their parameters, scalars
    (step counts) are replicated."""
    return optax.tree_map_params(optimizer, lambda _, sh: sh, jax.eval_shape(optimizer.init, params),
                                 param_sh, transform_non_params=lambda _: NamedSharding(mesh, P()))


def init_opt_state(optimizer, params, param_sh, opt_sh, mesh):
    """The optimizer state on its shardings, made on every device from its own
    parameter shards (no XLA collective)."""
    spec = lambda t: jax.tree.map(lambda sh: sh.spec, t)  # noqa: E731
    init = jax.shard_map(optimizer.init, mesh=mesh, in_specs=(spec(param_sh),), out_specs=spec(opt_sh),
                         check_vma=False)
    return jax.jit(init)(params)


def _per_device_fns(graphdef, optimizer, bias_rate, mesh, tables, batch, seq, shardings):
    """(batches, step) of the per-device step: no XLA collective anywhere."""
    n = mesh.size
    if mesh.shape["data"] != 1:
        raise SystemExit(f"--collectives jax_ep needs the mesh 1 x N (--ep {n}), got {dict(mesh.shape)}")
    specs = jax.tree.map(lambda sh: sh.spec, shardings)
    tok = P(("data", "ep"), None)
    expert_leaf = [_has_ep(sh) for sh in jax.tree.leaves(shardings[0])]

    def draw(key_data):
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), jax.lax.axis_index("ep"))
        return make_batch(key, tables, batch // n, seq)

    draw = jax.jit(jax.shard_map(draw, mesh=mesh, in_specs=P(), out_specs=tok, check_vma=False))

    def batches(key):  # the key as host data: every process holds it, no transfer between them
        return draw(np.asarray(jax.random.key_data(key)))

    step = jax.shard_map(
        make_train_step_per_device(graphdef, optimizer, bias_rate, expert_leaf, n), mesh=mesh,
        in_specs=(*specs, tok), out_specs=(*specs, P(), P(), P()), check_vma=False,
    )
    return batches, jax.jit(step, donate_argnums=(0, 1, 2))


def make_buffer(model: MoELM, mesh, tokens_per_rank: int, backend: str, low_latency: bool = False):
    """On GPUs, a jax_ep.Buffer so that backend "auto"/"cuda" runs the kernels."""
    if backend == "xla" or mesh.devices.flat[0].platform != "gpu":
        return None
    try:
        return model.moe_layers[0].create_buffer(tokens_per_rank, low_latency=low_latency)
    except (ImportError, RuntimeError) as e:
        if backend == "cuda":
            raise
        print(f"no jax_ep.Buffer ({e}); using the xla backend")
        return None


def make_config(args, max_len: int) -> LMConfig:
    grouped = args.experts % 4 == 0
    return LMConfig(
        max_len=max_len, layers=args.layers, experts=args.experts, top_k=args.top_k,
        n_group=4 if grouped else 1, topk_group=2 if grouped else 1,
        capacity_factor=args.capacity_factor or None, fp8=args.fp8, backend=args.backend,
        moe_dtype=args.dtype, collectives=getattr(args, "collectives", "xla"),
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="sequences per step (global)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bias-rate", type=float, default=1e-3, help="balancing bias step per update")
    add_model_args(p)
    p.add_argument("--plot", default=None, help="save the loss curve to this PNG")
    p.add_argument("--collectives", choices=("auto", "xla", "jax_ep"), default="auto",
                   help="reductions by XLA, or by jax_ep.all_reduce in a per-device step (auto: "
                        "jax_ep where processes share one GPU, JAX_EP_SHARED_GPU=1)")
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ep", type=int, default=None, help="EP group size (default: min(devices, 4))")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=2.0, help="0: dropless")
    p.add_argument("--fp8", action="store_true", help="FP8 dispatch (dequantized to bfloat16)")
    p.add_argument("--backend", choices=("auto", "xla", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the MoE layers (bfloat16 on GPUs)")
    p.add_argument("--topics", type=int, default=4, help="Markov chains in the generated corpus")
    p.add_argument("--seed", type=int, default=0)


def init_distributed() -> None:
    """Join the multi-process job when started by `python -m jax_ep.launch`."""
    try:
        from jax_ep import distributed
    except ImportError:
        return
    distributed.initialize()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    init_distributed()
    lead = jax.process_index() == 0
    if args.collectives == "auto":
        shared = os.environ.get("JAX_EP_SHARED_GPU") == "1" and jax.process_count() > 1
        args.collectives = "jax_ep" if shared else "xla"
    if args.collectives == "jax_ep" and args.ep is None:
        args.ep = jax.device_count()
    mesh = make_mesh(args.ep)
    n = mesh.size
    if args.batch % n:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {n} devices")
    cfg = make_config(args, args.seq)
    model = build(cfg, mesh, args.seed)
    make_buffer(model, mesh, (args.batch // n) * (args.seq - 1), args.backend)
    n_params = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if lead:
        print(f"MoE LM: {cfg.layers} layers, dim {cfg.dim}, {cfg.experts} experts top-{cfg.top_k}, "
              f"{n_params / 1e6:.2f}M parameters; mesh {dict(mesh.shape)} on "
              f"{mesh.devices.flat[0].platform}, backend {args.backend}"
              f"{', fp8 dispatch' if args.fp8 else ''}, {args.dtype}; batch {args.batch} x {args.seq} tokens"
              f"{'; reductions by jax_ep.all_reduce' if args.collectives == 'jax_ep' else ''}")

    progress = Progress(args.steps, lead)
    t_start = time.perf_counter()
    hist = fit(
        model, mesh, successor_tables(cfg.vocab, args.topics), steps=args.steps, batch=args.batch,
        seq=args.seq, lr=args.lr, bias_rate=args.bias_rate, seed=args.seed, collectives=args.collectives,
        on_step=lambda s, loss, imb, tps: progress.update(
            s, f"loss {loss:.3f}  imbalance {imb:.2f}  {tps:,.0f} tok/s"),
    )
    progress.close()
    total = time.perf_counter() - t_start
    if lead:
        losses, imb = hist["loss"], hist["imbalance"]
        last = sum(losses[-10:]) / len(losses[-10:])
        print(f"loss {losses[0]:.3f} -> {last:.3f} (mean of the last {min(10, len(losses))} steps); "
              f"{hist['tokens_per_s']:,.0f} tokens/s after compilation; {total:.1f} s in all")
        print(f"expert load imbalance (max/mean - 1, mean over layers): "
              f"{imb[0]:.2f} at step 1 -> {imb[-1]:.2f} at step {args.steps}")
        print("tokens per expert at the last step, layer 0:", hist["loads"][0])
        if args.plot:
            save_plot(args.plot, losses, imb)
            print(f"saved {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
