"""Benchmark: low-rank gradient optimizers (lrjax.optim) against Adam and optax.contrib.galore.

    python experiments/bench_optim.py               # several minutes on 2 CPU cores
    python experiments/bench_optim.py --quick       # smoke test, tiny shapes, < 40 s

Methods (every one an ``optax`` chain ``X`` then the learning rate; inner = ``scale_by_adam``):

* ``adam``: ``optax.scale_by_adam`` on every parameter (the baseline);
* ``optax_galore``: ``optax.contrib.scale_by_galore`` (exact SVD refresh);
* ``galore_svd`` / ``galore_eigh`` / ``galore_randomized`` / ``galore_subspace``:
  :func:`lrjax.optim.galore` with the exact (LAPACK SVD; Gram eigendecomposition), randomized
  (cold) and warm-started subspace-iteration refreshes;
* ``fira``: :func:`lrjax.optim.fira` (subspace refresh, residual + limiter);
* ``dct``: :func:`lrjax.optim.dct` (best-aligned DCT columns, no SVD);
* ``owlore``: :func:`lrjax.optim.owlore` (``gamma`` of the layers per period, GaLore inside,
  subspace refresh);
* ``limit`` (timing only): the forward + backward pass alone (``value_and_grad``), the work
  every one of these steps must do; no optimizer.

Workload (a), timing and memory: a 4-layer MLP of ``--width`` x ``--width`` Dense layers (GELU,
MSE, synthetic data) at two batch sizes, each with its own projection gap (``--configs``,
default batch 64 / gap 50 and batch 512 / gap 200), rank ``--rank``. A step's cost depends only
on whether it refreshes the projection, so each method is timed on a normal step and on a
refresh step (``count`` set to a multiple of the gap; for OwLore: a period start, with
``update_proj_gap = period``), round-robin over methods, medians over ``--repeats``; the
*amortized* step is ``((gap - 1) * normal + refresh) / gap``. Optimizer-state bytes are the
bytes of every array of the optimizer state; the moment bytes of the projected leaves are
compared with the theoretical ``r / d`` of Adam's.

Workload (b), quality: pretraining :class:`lrjax.models.CharTransformer` on
``lrjax.data.load("stdlib_chars")`` for a fixed budget of ``--train-steps`` steps, the same
batches and initialization for every method, warm-up + cosine learning-rate schedule, global-norm
clipping 1.0; projected leaves = the attention and MLP kernels (``ADAPTER_TARGETS``) for every
low-rank method, optax_galore included. Held-out loss every ``--eval-every`` steps; the final
held-out loss and the step time (gradient and update as two jitted calls: the gradient function
is compiled once for all methods) are reported.

Workload (c), memory (``--sections layerwise``): XLA's compiled memory analysis (temp, arguments,
outputs, peak) of one training step with Adam, plain GaLore (exact SVD; warm-started subspace) and
the same per layer (:func:`lrjax.optim.layerwise.layerwise_step`), on the 4-layer MLP (batch 64)
and on a weight-dominated ``nn.scan`` transformer LM (d 512, 4 layers, d_ff 2048, batch 2 x 16).
``--sections`` picks the workloads (default all three), ``--methods`` the optimizers of (a) and (b).

Timings are wall-clock (``block_until_ready``) after warm-up (compilation excluded) and depend on
whatever else runs on the machine. Writes ``<out>/bench_optim.json`` and ``<out>/bench_optim.png``
and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from lrjax.benchmark import describe, device_info, time_round_robin
import lrjax
import lrjax.optim as lo
from lrjax.optim import projection
from lrjax.optim.galore import ExactSVD

GALORES = ("galore_svd", "galore_eigh", "galore_randomized", "galore_subspace")
METHODS = ("adam", "optax_galore") + GALORES + ("fira", "dct", "owlore")


# ----------------------------------------------------------------------------- config
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps (smoke test)")
    p.add_argument("--out", default="runs/bench_optim", help="output directory for JSON and PNG")
    p.add_argument("--no-progress", action="store_true", help="disable tqdm bars")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None, help="MLP width (default 1024; quick 64)")
    p.add_argument("--rank", type=int, default=None, help="MLP projection rank (default 128; quick 8)")
    p.add_argument("--configs", default=None,
                   help="MLP 'batch:gap,...' (default '64:50,512:200'; quick '32:10')")
    p.add_argument("--repeats", type=int, default=None, help="timed normal steps per method (default 21)")
    p.add_argument("--refresh-repeats", type=int, default=None, help="timed refresh steps (default 5)")
    p.add_argument("--train-steps", type=int, default=None, help="transformer steps (default 300; quick 12)")
    p.add_argument("--batch", type=int, default=None, help="transformer batch (default 16; quick 4)")
    p.add_argument("--tf-rank", type=int, default=None, help="transformer rank (default 32; quick 4)")
    p.add_argument("--tf-gap", type=int, default=None, help="transformer update_proj_gap (default 50; quick 4)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (all methods)")
    p.add_argument("--eval-every", type=int, default=None, help="default 25 (quick 4)")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma list of the methods to run (adam, optax_galore and galore_svd always run)")
    p.add_argument("--sections", default="mlp,transformer,layerwise",
                   help="comma list of: mlp (timing), transformer (quality), layerwise (compiled memory)")
    a = p.parse_args(argv)
    dflt = dict(width=(64, 1024), rank=(8, 128), configs=("32:10", "64:50,512:200"), repeats=(3, 21),
                refresh_repeats=(2, 5), train_steps=(12, 300), batch=(4, 16), tf_rank=(4, 32), tf_gap=(4, 50),
                eval_every=(4, 25))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    if a.quick:
        a.eval_windows = min(a.eval_windows, 16)
    a.configs_parsed = [tuple(int(v) for v in c.split(":")) for c in a.configs.split(",")]
    want = set(x for x in a.methods.split(",") if x) | {"adam", "optax_galore", "galore_svd"}
    if want - set(METHODS):
        p.error(f"--methods: unknown {sorted(want - set(METHODS))}")
    a.methods_parsed = [m for m in METHODS if m in want]
    a.sections_parsed = [x for x in a.sections.split(",") if x]
    bad = set(a.sections_parsed) - {"mlp", "transformer", "layerwise"}
    if bad:
        p.error(f"--sections: unknown {sorted(bad)}")
    return a


# ----------------------------------------------------------------------------- optimizers
def make_transform(name, *, rank, gap, targets, seed, owlore_gamma, owlore_period, optax_dims=None):
    """The optimizer of ``name`` before the learning rate (a GradientTransformation)."""
    adam = optax.scale_by_adam()
    kw = dict(update_proj_gap=gap, targets=targets, seed=seed)
    if name == "adam":
        return adam
    if name == "optax_galore":
        return optax.contrib.scale_by_galore(rank=rank, update_proj_gap=gap, base_optimizer=adam,
                                             weight_dimension_numbers=optax_dims)
    if name.startswith("galore_"):
        return lo.galore(adam, rank, refresh=name.split("_", 1)[1], **kw)
    if name == "fira":
        return lo.fira(adam, rank, refresh="subspace", **kw)
    if name == "dct":
        return lo.dct(adam, rank, **kw)
    if name == "owlore":
        return lo.owlore(adam, rank, gamma=owlore_gamma, period=owlore_period, update_proj_gap=owlore_period,
                         refresh="subspace", seed=seed, targets=targets)
    raise ValueError(name)


def optax_dims_for(targets):
    """``weight_dimension_numbers`` for optax.contrib: project exactly the leaves lrjax projects."""
    dn = optax.contrib.GaLoreDimensionNumbers(0, 1)

    def fn(params):
        flat = lrjax.tree.flatten(params)
        chosen = set(projection.plan(params, rank=1, targets=targets))
        leaves = [dn if p in chosen else None for p in flat]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)
    return fn


def set_count(state, value):
    """Every scalar int32 ``count`` field of a (nested) optimizer state set to ``value``."""
    def f(path, x):
        last = path[-1] if path else None
        if (isinstance(last, jax.tree_util.GetAttrKey) and last.name == "count"
                and getattr(x, "ndim", None) == 0 and x.dtype == jnp.int32):
            return jnp.asarray(value, jnp.int32)
        return x
    return jax.tree_util.tree_map_with_path(f, state)


def moment_bytes(state, params, plans):
    """Bytes of the inner moments of the projected leaves vs Adam's for those leaves."""
    return sum(2 * 4 * int(np.prod(plans[p].proj_shape)) for p in plans), \
        sum(2 * 4 * int(np.prod(lrjax.tree.flatten(params)[p].shape)) for p in plans)


# ----------------------------------------------------------------------------- timing
def mlp_workload(width, batch, seed):
    k = jax.random.split(jax.random.key(seed), 8)
    params = {"layers": {str(i): {"kernel": jax.random.normal(k[i], (width, width)) / np.sqrt(width),
                                  "bias": jnp.zeros((width,))} for i in range(4)}}
    x = jax.random.normal(k[5], (batch, width))
    y = jax.random.normal(k[6], (batch, width))

    def loss(p, x, y):
        h = x
        for i in range(4):
            h = h @ p["layers"][str(i)]["kernel"] + p["layers"][str(i)]["bias"]
            if i < 3:
                h = jax.nn.gelu(h)
        return jnp.mean((h - y) ** 2)
    return params, x, y, loss


def bench_mlp(args, batch, gap, progress):
    params, x, y, loss = mlp_workload(args.width, batch, args.seed)
    targets = r"layers/\d+/kernel"
    rank = args.rank
    plans = projection.plan(params, rank=rank, targets=targets)
    res = {"batch": batch, "update_proj_gap": gap, "rank": rank, "width": args.width, "methods": {}}
    steps, states, txs = {}, {}, {}
    methods = args.methods_parsed
    for name in methods:
        tx = optax.chain(make_transform(name, rank=rank, gap=gap, targets=targets, seed=args.seed,
                                        owlore_gamma=2, owlore_period=gap,
                                        optax_dims=optax_dims_for(targets)),
                         optax.scale(-1e-3))

        def step(p, s, x, y, tx=tx):
            l, g = jax.value_and_grad(loss)(p, x, y)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, l
        steps[name] = jax.jit(step)
        s0 = tx.init(params)
        # one real (refresh) step so bases are initialized; then count=1 is a normal step
        _, s1, _ = steps[name](params, s0, x, y)
        states[name] = (set_count(s1, 1), set_count(s1, gap))
        txs[name] = tx
    limit = jax.jit(jax.value_and_grad(loss))
    calls = {n: (lambda n=n: jax.block_until_ready(steps[n](params, states[n][0], x, y))) for n in methods}
    calls["limit"] = lambda: jax.block_until_ready(limit(params, x, y))
    normal = time_round_robin(calls, args.repeats, 2, f"mlp b={batch} normal", progress)
    rcalls = {n: (lambda n=n: jax.block_until_ready(steps[n](params, states[n][1], x, y))) for n in methods
              if n != "adam"}
    refresh = time_round_robin(rcalls, args.refresh_repeats, 2, f"mlp b={batch} refresh", progress)
    lim = float(np.median(normal["limit"]))
    adam_ms = float(np.median(normal["adam"]))
    adam_bytes = projection.nbytes(states["adam"][0])
    for n in methods:
        t_n = float(np.median(normal[n]))
        t_r = float(np.median(refresh[n])) if n in refresh else t_n
        amort = ((gap - 1) * t_n + t_r) / gap
        sb = projection.nbytes(states[n][0])
        r = {"normal_ms": t_n, "refresh_ms": t_r, "amortized_ms": amort, "refresh_only_ms": max(t_r - t_n, 0.0),
             "normal_iqr_ms": float(np.subtract(*np.percentile(normal[n], [75, 25]))),
             "state_bytes": sb, "state_ratio_to_adam": sb / adam_bytes}
        res["methods"][n] = r
    ex = res["methods"]["galore_svd"]["refresh_only_ms"]
    for n, r in res["methods"].items():
        r["refresh_speedup_vs_exact_svd"] = ex / r["refresh_only_ms"] if r["refresh_only_ms"] > 0 else None
        r["ratio_to_adam"] = r["amortized_ms"] / res["methods"]["adam"]["amortized_ms"]
        r["ratio_to_limit"] = r["amortized_ms"] / lim
    mp, ma = moment_bytes(None, params, plans)
    res["projected_moment_ratio"] = mp / ma
    res["theoretical_r_over_d"] = rank / args.width
    res["theoretical_galore_state_bytes"] = projection.theoretical_state_bytes(
        params, rank=rank, basis=ExactSVD(), targets=targets)
    res["limit_ms"] = lim
    res["adam_normal_ms"] = adam_ms
    return res


# ----------------------------------------------------------------------------- transformer
def load_tokens(args):
    from lrjax import data
    kw = {"config": "small"} if args.quick else {}
    toks = data.as_arrays(data.load("stdlib_chars", split="train", **kw), keys="tokens")["tokens"]
    held = np.arange(len(toks)) % 10 == 9
    return toks[~held], jnp.asarray(toks[held][:args.eval_windows])


def bench_transformer(args, progress):
    from flax import nnx
    from lrjax import data
    from lrjax.models import ADAPTER_TARGETS, CharTransformer, loss_fn, split

    train_toks, eval_toks = load_tokens(args)
    seq = int(train_toks.shape[1] - 1)
    cfg = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64) if args.quick else \
        dict(d_model=128, n_layers=2, n_heads=4, d_ff=512)
    model = CharTransformer(data.VOCAB_SIZE, max_len=seq, rngs=nnx.Rngs(args.seed), **cfg)
    _, params0, apply = split(model)
    batches = [jnp.asarray(b["tokens"]) for b in
               data.batches({"tokens": train_toks}, args.batch, seed=args.seed, num_steps=args.train_steps)]
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.train_steps // 10),
                                               args.train_steps, args.lr * 0.1)

    def loss_of(p, tok):
        return loss_fn(apply(p, tok[:, :-1]), tok[:, 1:])
    grad_fn = jax.jit(jax.value_and_grad(loss_of))      # compiled once, shared by every method
    n_ev = max(1, len(eval_toks) // args.batch) * args.batch
    eval_chunks = [eval_toks[i:i + args.batch] for i in range(0, n_ev, args.batch)]

    def evaluate(p, _toks=None):
        # held-out loss from the same compiled function (no extra compilation): mean over chunks
        return float(np.mean([float(grad_fn(p, c)[0]) for c in eval_chunks]))
    res = {"config": {**cfg, "seq_len": seq, "batch": args.batch, "steps": args.train_steps,
                      "rank": args.tf_rank, "update_proj_gap": args.tf_gap, "lr": args.lr,
                      "eval_windows": n_ev, "targets": list(ADAPTER_TARGETS), "owlore": {"gamma": 1, "period": args.tf_gap}},
           "methods": {}}
    for name in args.methods_parsed:
        tx = optax.chain(optax.clip_by_global_norm(1.0),
                         make_transform(name, rank=args.tf_rank, gap=args.tf_gap, targets=ADAPTER_TARGETS,
                                        seed=args.seed, owlore_gamma=1, owlore_period=args.tf_gap,
                                        optax_dims=optax_dims_for(ADAPTER_TARGETS)),
                         optax.scale_by_learning_rate(sched))

        @jax.jit
        def apply_update(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        p, s = params0, tx.init(params0)
        hist = {"train_loss": [], "step_ms": [], "eval_step": [0], "eval_loss": [float(evaluate(p, eval_toks))]}
        for i, tok in enumerate(tqdm(batches, desc=f"transformer {name}", leave=False, disable=not progress,
                                     file=sys.stdout, dynamic_ncols=True), 1):
            t = time.perf_counter()
            l, g = grad_fn(p, tok)
            p, s = apply_update(p, s, g)
            l = float(jax.block_until_ready(l))
            jax.block_until_ready(p)
            hist["step_ms"].append((time.perf_counter() - t) * 1e3)
            hist["train_loss"].append(l)
            if i % args.eval_every == 0 or i == len(batches):
                hist["eval_step"].append(i)
                hist["eval_loss"].append(float(evaluate(p, eval_toks)))
        timed = hist["step_ms"][2:] or hist["step_ms"]
        res["methods"][name] = {"final_eval_loss": hist["eval_loss"][-1],
                                "final_train_loss": float(np.mean(hist["train_loss"][-10:])),
                                "median_step_ms": float(np.median(timed)),
                                "mean_step_ms": float(np.mean(timed)),
                                "state_bytes": projection.nbytes(s), "history": hist}
    a = res["methods"]["adam"]
    for r in res["methods"].values():
        r["ratio_to_adam_time"] = r["mean_step_ms"] / a["mean_step_ms"]
        r["state_ratio_to_adam"] = r["state_bytes"] / a["state_bytes"]
    og = res["methods"]["optax_galore"]["final_eval_loss"]
    for r in res["methods"].values():
        r["loss_rel_to_optax_galore"] = r["final_eval_loss"] / og - 1.0
    return res


# ----------------------------------------------------------------------------- layerwise memory
def stacked_lm(vocab, d, layers, heads, d_ff):
    """A pre-LN causal transformer LM whose blocks are one linen ``nn.scan`` stack (params [L, ...])."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            y = nn.LayerNorm(name="ln1")(x)
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
            x = x + nn.MultiHeadDotProductAttention(num_heads=heads, name="attn")(y, y, mask=mask)
            y = nn.LayerNorm(name="ln2")(x)
            y = nn.Dense(d, name="fc2")(jax.nn.gelu(nn.Dense(d_ff, name="fc1")(y)))
            return x + y, None

    class LM(nn.Module):
        @nn.compact
        def __call__(self, tok):
            h = nn.Embed(vocab, d, name="embed")(tok)
            h = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=layers)(name="blocks")(h, None)[0]
            return nn.Dense(vocab, name="head")(nn.LayerNorm(name="ln_f")(h))
    return LM()


def compiled_memory(fn, *args):
    """XLA's memory analysis of ``jax.jit(fn)`` (MiB): temp, arguments, outputs, peak = sum."""
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    t, a, o = m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes
    return {"temp_bytes": int(t), "argument_bytes": int(a), "output_bytes": int(o), "peak_bytes": int(t + a + o)}


def bench_layerwise(args, progress):
    """Compiled step memory: Adam, plain GaLore (exact SVD; warm-started subspace), the same per layer
    (lrjax.optim.layerwise), per-layer Adam; for the stack also per layer inside the nn.scan."""
    from lrjax.optim.layerwise import layerwise_init, layerwise_step
    res = {}
    workloads = {}
    params, x, y, loss = mlp_workload(args.width, 64, args.seed)
    workloads["mlp"] = dict(params=params, batch=(x, y), loss=loss, targets=r"layers/\d+/kernel", rank=args.rank,
                            desc=f"MLP {args.width}x{args.width} x4, batch 64, rank {args.rank}")
    # weight-dominated (short sequences, as in the paper's regime where the weights and their gradients,
    # not the activations, fill the memory)
    cfg = dict(vocab=96, d=32, layers=2, heads=4, d_ff=64) if args.quick else \
        dict(vocab=96, d=512, layers=4, heads=4, d_ff=2048)
    lm = stacked_lm(**cfg)
    seq, bsz = (8, 2) if args.quick else (16, 2)
    tok = jax.random.randint(jax.random.key(args.seed), (bsz, seq + 1), 0, cfg["vocab"])
    lp = lm.init(jax.random.key(args.seed), tok[:, :-1])

    def lm_loss(p, tok):
        logits = lm.apply(p, tok[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()
    tf_rank = max(1, cfg["d"] // 8)
    workloads["stacked_transformer"] = dict(
        params=lp, batch=(tok,), loss=lm_loss, targets=r"blocks/.*(query|key|value|out|fc1|fc2)/kernel",
        rank=tf_rank, desc=(f"nn.scan transformer d {cfg['d']}, {cfg['layers']} layers, d_ff {cfg['d_ff']}, "
                            f"batch {bsz} x {seq}, rank {tf_rank}"))
    for name, w in tqdm(workloads.items(), desc="layerwise memory", disable=not progress, file=sys.stdout):
        adam = optax.chain(optax.scale_by_adam(), optax.scale(-1e-3))
        gal = optax.chain(lo.galore(optax.scale_by_adam(), w["rank"], update_proj_gap=50, targets=w["targets"]),
                          optax.scale(-1e-3))

        def plain(tx, loss=w["loss"]):
            def step(p, s, *b):
                l, g = jax.value_and_grad(loss)(p, *b)
                u, s = tx.update(g, s, p)
                return l, optax.apply_updates(p, u), s
            return step
        sub = optax.chain(lo.galore(optax.scale_by_adam(), w["rank"], update_proj_gap=50, targets=w["targets"],
                                    refresh="subspace"), optax.scale(-1e-3))
        p = w["params"]
        rows = {"adam": compiled_memory(plain(adam), p, adam.init(p), *w["batch"]),
                "galore": compiled_memory(plain(gal), p, gal.init(p), *w["batch"]),
                "galore_layerwise": compiled_memory(layerwise_step(w["loss"], gal), p, layerwise_init(gal, p),
                                                    *w["batch"]),
                "galore_subspace": compiled_memory(plain(sub), p, sub.init(p), *w["batch"]),
                "galore_subspace_layerwise": compiled_memory(layerwise_step(w["loss"], sub), p,
                                                             layerwise_init(sub, p), *w["batch"]),
                "adam_layerwise": compiled_memory(layerwise_step(w["loss"], adam), p, layerwise_init(adam, p),
                                                  *w["batch"])}
        if name == "stacked_transformer":      # per layer inside the nn.scan (module doc of layerwise)
            rows["galore_layerwise_scan"] = compiled_memory(layerwise_step(w["loss"], gal, scan_layers=True), p,
                                                            layerwise_init(gal, p), *w["batch"])
        pbytes = projection.nbytes(p)
        res[name] = {"desc": w["desc"], "param_bytes": pbytes, "methods": rows,
                     "grad_bytes_whole_model": pbytes}
    return res


# ----------------------------------------------------------------------------- report
def mb(b):
    return f"{b / 2**20:.2f}"


def tables(out):
    lines = []
    for key, w in out.get("mlp", {}).items():
        lines += [f"\n**MLP {w['width']}x{w['width']} x4, batch {w['batch']}, rank {w['rank']}, "
                  f"gap {w['update_proj_gap']}** (limit = forward+backward alone: {w['limit_ms']:.1f} ms; "
                  f"projected moments / Adam's = {w['projected_moment_ratio']:.4f}, r/d = "
                  f"{w['theoretical_r_over_d']:.4f})\n",
                  "| method | normal step ms | refresh step ms | amortized ms | x Adam | x limit | state MiB | state / Adam |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, r in w["methods"].items():
            lines.append(f"| {n} | {r['normal_ms']:.1f} | {r['refresh_ms']:.1f} | {r['amortized_ms']:.1f} | "
                         f"{r['ratio_to_adam']:.3f} | {r['ratio_to_limit']:.3f} | {mb(r['state_bytes'])} | "
                         f"{r['state_ratio_to_adam']:.3f} |")
    for key, w in out.get("layerwise", {}).items():
        lines += [f"\n**Compiled step memory, {w['desc']}** (XLA memory_analysis; params {mb(w['param_bytes'])} MiB "
                  f"= one full-size gradient of the whole model)\n",
                  "| step | temp MiB | arguments MiB | outputs MiB | peak MiB | temp / plain GaLore |",
                  "|---|---|---|---|---|---|"]
        g = w["methods"]["galore"]["temp_bytes"]
        for n, r in w["methods"].items():
            lines.append(f"| {n} | {mb(r['temp_bytes'])} | {mb(r['argument_bytes'])} | {mb(r['output_bytes'])} | "
                         f"{mb(r['peak_bytes'])} | {r['temp_bytes'] / g:.3f} |")
    if "transformer" not in out:
        return "\n".join(lines)
    t = out["transformer"]
    c = t["config"]
    lines += [f"\n**CharTransformer pretraining** (d_model {c['d_model']}, {c['n_layers']} layers, d_ff {c['d_ff']}, "
              f"seq {c['seq_len']}, batch {c['batch']}, {c['steps']} steps, rank {c['rank']}, gap "
              f"{c['update_proj_gap']}, peak lr {c['lr']})\n",
              "| method | final held-out loss | vs optax_galore | mean step ms | x Adam | state MiB | state / Adam |",
              "|---|---|---|---|---|---|---|"]
    for n, r in t["methods"].items():
        lines.append(f"| {n} | {r['final_eval_loss']:.4f} | {100 * r['loss_rel_to_optax_galore']:+.2f}% | "
                     f"{r['mean_step_ms']:.1f} | {r['ratio_to_adam_time']:.3f} | {mb(r['state_bytes'])} | "
                     f"{r['state_ratio_to_adam']:.3f} |")
    return "\n".join(lines)


def targets_report(out):
    rep = {}
    for key, w in out.get("layerwise", {}).items():
        m = w["methods"]
        rep[f"layerwise_{key}"] = {
            "temp_below_plain_galore": m["galore_layerwise"]["temp_bytes"] < m["galore"]["temp_bytes"],
            "peak_below_plain_galore": m["galore_layerwise"]["peak_bytes"] < m["galore"]["peak_bytes"],
            "peak_below_adam": m["galore_layerwise"]["peak_bytes"] < m["adam"]["peak_bytes"],
            "subspace_temp_below_plain": m["galore_subspace_layerwise"]["temp_bytes"] < m["galore_subspace"]["temp_bytes"]}
    for key, w in out.get("mlp", {}).items():
        m = w["methods"]
        og = m["optax_galore"]["amortized_ms"]
        rep[key] = {n: {"faster_than_optax_galore": m[n]["amortized_ms"] < og,
                        "normal_step_not_slower_than_optax_galore": m[n]["normal_ms"] <= m["optax_galore"]["normal_ms"],
                        "ratio_to_adam": m[n]["ratio_to_adam"]}
                    for n in GALORES if n in m}
    if "transformer" not in out:
        return rep
    t = out["transformer"]["methods"]
    loss = {n: t[n]["final_eval_loss"] for n in t}
    rep["transformer"] = {
        # signed: negative = lower (better) held-out loss than optax.contrib.galore
        "galore_loss_rel_to_optax_galore": {n: t[n]["loss_rel_to_optax_galore"]
                                            for n in GALORES if n in t},
        "galore_not_worse_than_optax_galore_by_2pct": {
            n: t[n]["loss_rel_to_optax_galore"] <= 0.02 for n in GALORES if n in t}}
    if "fira" in loss:
        rep["transformer"].update({
            "fira_closer_to_adam_than_galore": abs(loss["fira"] - loss["adam"]) < abs(loss["galore_svd"] - loss["adam"]),
            "fira_below_galore": loss["fira"] < loss["galore_svd"],
            "fira_below_adam": loss["fira"] < loss["adam"]})
    return rep


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 3, figsize=(18, 4.5))
    keys = list(out.get("mlp", {}))
    ms = [n for n in METHODS if keys and n in out["mlp"][keys[0]]["methods"]]
    x = np.arange(len(ms))
    wdt = 0.8 / max(1, len(keys))
    for j, k in enumerate(keys):
        w = out["mlp"][k]
        axs[0].bar(x + j * wdt, [w["methods"][n]["ratio_to_adam"] for n in ms], wdt,
                   label=f"batch {w['batch']}, gap {w['update_proj_gap']}")
    axs[0].axhline(1.0, color="k", lw=0.8)
    axs[0].axhline(1.1, color="gray", ls="--", lw=0.8)
    axs[0].set_xticks(x + wdt * (len(keys) - 1) / 2, ms, rotation=30, ha="right")
    axs[0].set_ylabel("amortized step time / Adam")
    axs[0].set_title("MLP step cost")
    axs[0].legend(fontsize=8)
    for n, r in out.get("transformer", {}).get("methods", {}).items():
        h = r["history"]
        axs[1].plot(h["eval_step"], h["eval_loss"], label=n, lw=1.2)
    axs[1].set_xlabel("step")
    axs[1].set_ylabel("held-out loss (nats/char)")
    axs[1].set_title("CharTransformer pretraining")
    axs[1].legend(fontsize=8)
    lw = out.get("layerwise", {})
    for j, (k, w) in enumerate(lw.items()):
        names = list(w["methods"])
        axs[2].bar(np.arange(len(names)) + j * 0.4, [w["methods"][n]["peak_bytes"] / 2**20 for n in names], 0.4,
                   label=k)
        axs[2].set_xticks(np.arange(len(names)) + 0.2, names, rotation=20, ha="right")
    axs[2].set_ylabel("compiled peak MiB (args + outputs + temp)")
    axs[2].set_title("step memory (XLA memory_analysis)")
    if lw:
        axs[2].legend(fontsize=8)
    d = out["device"]
    fig.suptitle(f"lrjax.optim on {d['platform']} / {d['device_kind']}, jax {d['jax']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    t0 = time.perf_counter()
    dev = jax.devices()[0]
    device = device_info()
    cmd = "python experiments/bench_optim.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"reproduce: {cmd}\ndevice: {describe(device)}")
    out = {"command": cmd, "device": device, "config": {k: v for k, v in vars(args).items()},
           "load_average_start": list(os.getloadavg())}
    if "mlp" in args.sections_parsed:
        out["mlp"] = {f"batch{batch}": bench_mlp(args, batch, gap, progress) for batch, gap in args.configs_parsed}
    if "transformer" in args.sections_parsed:
        out["transformer"] = bench_transformer(args, progress)
    if "layerwise" in args.sections_parsed:
        out["layerwise"] = bench_layerwise(args, progress)
    out["load_average_end"] = list(os.getloadavg())
    out["targets"] = targets_report(out)
    out["table_markdown"] = tables(out)
    out["wall_s"] = time.perf_counter() - t0
    print(f"\n## lrjax.optim benchmark -- {dev.platform} / {dev.device_kind}, jax {jax.__version__}")
    print(out["table_markdown"])
    print("\ntargets:", json.dumps(out["targets"], indent=1))
    with open(os.path.join(args.out, "bench_optim.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(out, os.path.join(args.out, "bench_optim.png"))
    print(f"\nwrote {args.out}/bench_optim.json and bench_optim.png in {out['wall_s']:.1f} s")
    return out


if __name__ == "__main__":
    main()
