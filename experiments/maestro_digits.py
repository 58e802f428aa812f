"""Maestro on digits: accuracy vs rank of a Maestro-trained MLP against a dense MLP truncated post hoc by SVD.

    python experiments/maestro_digits.py                 # a few minutes on 2 CPU cores
    python experiments/maestro_digits.py --quick         # smoke test, seconds (writes to runs/)

Fixture: ``experiments/_digits_bench.py`` (scikit-learn digits, 1438 train / 359 test images, MLP
``64-256-256-10`` with exact GELU). Arms, same steps, batch and optimizer (Adam ``--lr``), ``--seeds``
seeds each:

* ``dense``: the plain MLP (``_digits_bench.init_params``), trained with cross-entropy; evaluated at
  rank ``r`` by replacing every kernel by its best rank-``min(r, d_i)`` approximation (thin SVD,
  :func:`lrjax.nn.maestro.from_dense` + :func:`~lrjax.nn.maestro.truncate`): post-hoc truncation;
* ``maestro per_layer``: every layer a :mod:`lrjax.nn.maestro` factorized layer ``W = U V^T`` (``d =
  min(in, out)``: 64, 256, 10 components; torch-default init), trained from scratch with the official
  loss ``CE(full) + CE(trunc, sg(softmax(full)))`` and the per-layer ordered-dropout sampler (the
  paper's; :func:`~lrjax.nn.maestro.maestro_loss`, ``gp_lambda = 0``); evaluated at rank ``r`` by
  keeping the first ``min(r, d_i)`` components of every layer (no retraining, no SVD);
* ``maestro across_layers``: the same with the independent sampler (every layer truncated every step);
* ``maestro+lasso``: per-layer sampler plus the hierarchical group lasso (``--gp-lambda``); afterwards
  :func:`~lrjax.nn.maestro.shrink` at ``--threshold`` is applied once (the paper shrinks after every
  epoch; here once at the end, so no optimizer state has to be re-created) and the kept ranks and
  the accuracy of the shrunk model are reported.

Rank ``r`` is applied to every layer as ``min(r, d_i)`` (so the 10-component output layer is cut
only for ``r < 10``); ``params@r`` is the factorized parameter count at that rank
(``sum_i min(r, d_i) (in_i + out_i)`` + biases), dense = 85,002.

The paper's claim [Maestro, Sec. 5]: the ordered-dropout-trained model degrades gracefully as the
rank drops, while post-hoc SVD truncation of a dense model collapses at low rank.

Timing (jitted, warmed up, medians of ``block_until_ready`` calls, interleaved round robin, batch
``--batch``): the Maestro training step (two forwards: full and sampled; the lasso; backward; Adam)
against the **limit**: the dense training step (forward, backward, Adam) of the same MLP; and the
inference forward of the truncated Maestro model (static slicing) at a few ranks against the dense
forward. Writes ``<out>/maestro_digits.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _digits_bench as D  # noqa: E402
import _report as R  # noqa: E402

from lrjax.benchmark import blocking, summarize, time_round_robin  # noqa: E402
from lrjax.nn import maestro as M  # noqa: E402

RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GELU = lambda h: jax.nn.gelu(h, approximate=False)  # noqa: E731  (the fixture's exact GELU)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few steps, one seed (smoke test)")
    p.add_argument("--out", default=None, help="output directory (default results/maestro_digits; "
                                               "quick: runs/maestro_digits)")
    p.add_argument("--steps", type=int, default=None, help="training steps, default 2000 (quick: 40)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (all arms)")
    p.add_argument("--seeds", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--gp-lambda", type=float, default=1e-3, help="hierarchical group lasso weight (maestro+lasso)")
    p.add_argument("--threshold", type=float, default=1e-2, help="importance threshold of the final shrink")
    p.add_argument("--arms", nargs="+", default=None,
                   help="subset of arms (default all; quick: dense (post-hoc SVD), maestro+lasso)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per entry, default 40 (quick: 3)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(steps=(40, 2000), seeds=(1, 3), repeats=(3, 40),
                arms=(["dense (post-hoc SVD)", "maestro+lasso"],
                      ["dense (post-hoc SVD)", "maestro per_layer", "maestro across_layers", "maestro+lasso"]),
                out=("runs/maestro_digits", "results/maestro_digits"))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    unknown = sorted(set(a.arms) - set(arm_specs(a)))
    if unknown:
        p.error(f"--arms: unknown {unknown}; choose from {sorted(arm_specs(a))}")
    return a


# ------------------------------------------------------------------------------------ models
def arm_specs(args):
    """``{arm: (kind, sampler, gp_lambda)}``."""
    return {"dense (post-hoc SVD)": ("dense", None, 0.0),
            "maestro per_layer": ("maestro", "per_layer", 0.0),
            "maestro across_layers": ("maestro", "across_layers", 0.0),
            "maestro+lasso": ("maestro", "per_layer", args.gp_lambda)}


def dense_to_maestro(params):
    """The dense MLP as Maestro layers holding each kernel's SVD (post-hoc decomposition)."""
    return [M.from_dense(params[n]["kernel"], params[n]["bias"]) for n in D.LAYERS]


@jax.jit
def _init_maestro(key):
    keys = jax.random.split(key, len(D.DIMS) - 1)
    return [M.init_layer(k, a, b) for k, a, b in zip(keys, D.DIMS[:-1], D.DIMS[1:])]


def init_maestro(seed):
    return _init_maestro(jax.random.key(10_000 + seed))


def at_rank(layers, r):
    return [M.truncate(l, min(r, M.layer_rank(l))) for l in layers]


def count(layers):
    return int(sum(x.size for x in jax.tree.leaves(layers)))


def count_at_rank(r, dims=D.DIMS):
    """Factorized parameters with every layer cut to ``min(r, d_i)``: ``sum min(r, d_i)(in + out) + out``."""
    return sum(min(r, a, b) * (a + b) + b for a, b in zip(dims[:-1], dims[1:]))


@jax.jit
def _accuracy(layers, x, y, ranks):
    return jnp.mean(jnp.argmax(M.mlp_apply(layers, x, ranks, activation=GELU), -1) == y)


def accuracy(layers, x, y, r=None):
    """Test accuracy with every layer cut to its first ``min(r, d_i)`` components (``None``: all).
    Uses the mask form (one compiled program for every rank), equal to slicing (:func:`at_rank`)."""
    full = [M.layer_rank(l) for l in layers]
    ranks = jnp.asarray(full if r is None else [min(r, d) for d in full], jnp.int32)
    return float(_accuracy(layers, x, y, ranks))


def batches(seed, steps, batch, n):
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.stack([rng.choice(n, batch, replace=False) for _ in range(steps)]))


def train(kind, seed, args, xtr, ytr, gp_lambda=0.0, sampler="per_layer"):
    opt = optax.adam(args.lr)
    if kind == "dense":
        params = D.init_params(seed)
        loss = lambda p, x, y, k: D.loss(p, x, y)  # noqa: E731
    else:
        params = init_maestro(seed)
        loss = lambda p, x, y, k: M.maestro_loss(p, x, y, k, sampler=sampler,  # noqa: E731
                                                 gp_lambda=gp_lambda, activation=GELU)

    @jax.jit
    def run(params, idx, key):
        def body(c, inp):
            p, s = c
            i, k = inp
            g = jax.grad(loss)(p, xtr[i], ytr[i], k)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), (idx, jax.random.split(key, idx.shape[0])))
        return p

    idx = batches(seed, args.steps, args.batch, len(xtr))
    p = run(params, idx, jax.random.key(20_000 + seed))
    return dense_to_maestro(p) if kind == "dense" else p, (run, params, idx)


# ------------------------------------------------------------------------------------ timing
def time_steps(args, xtr, ytr, progress):
    """Single training steps (jitted) and inference forwards; the dense step is the limit."""
    opt = optax.adam(args.lr)
    x, y = xtr[: args.batch], ytr[: args.batch]
    dense, mae = D.init_params(0), init_maestro(0)
    key = jax.random.key(0)

    def stepper(loss):
        @jax.jit
        def step(p, s, k):
            g = jax.grad(loss)(p, x, y, k)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s
        return step

    d_step = stepper(lambda p, x, y, k: D.loss(p, x, y))
    m_step = stepper(lambda p, x, y, k: M.maestro_loss(p, x, y, k, sampler="per_layer", gp_lambda=0.0,
                                                       activation=GELU))
    l_step = stepper(lambda p, x, y, k: M.maestro_loss(p, x, y, k, sampler="per_layer",
                                                       gp_lambda=args.gp_lambda, activation=GELU))
    xe = jnp.asarray(xtr)
    fwd_d = jax.jit(D.forward)
    calls = {"limit: dense step": blocking(d_step, dense, opt.init(dense), key),
             "maestro step": blocking(m_step, mae, opt.init(mae), key),
             "limit: dense forward (1438 rows)": blocking(fwd_d, dense, xe)}
    if not args.quick:
        calls["maestro+lasso step"] = blocking(l_step, mae, opt.init(mae), key)
    for r in ((32,) if args.quick else (8, 32, 256)):
        lay = at_rank(mae, r)
        calls[f"maestro forward r={r} (1438 rows)"] = blocking(
            jax.jit(lambda l, x: M.mlp_apply(l, x, activation=GELU)), lay, xe)
    times = time_round_robin(calls, args.repeats, warmup=2, desc="timing", progress=progress)
    return {k: summarize(v) for k, v in times.items()}


# -------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    out = R.start(__file__, argv, args)
    (xtr, ytr), (xte, yte) = D.task("original")
    xtr, ytr, xte, yte = map(jnp.asarray, (xtr, ytr, xte, yte))
    arms = {k: v for k, v in arm_specs(args).items() if k in args.arms}
    out["ranks"] = list(RANKS)
    out["arms"] = {}
    jobs = [(a, s) for a in arms for s in range(args.seeds)]
    acc = {a: [] for a in arms}
    shrunk = []
    for a, s in tqdm(jobs, desc="train", disable=not progress, file=sys.stdout, dynamic_ncols=True):
        kind, sampler, lam = arms[a]
        layers, _ = train(kind, s, args, xtr, ytr, lam, sampler)
        acc[a].append([accuracy(layers, xte, yte, r) for r in RANKS])
        if a == "maestro+lasso":
            sh = M.shrink(layers, args.threshold)
            shrunk.append({"ranks": [M.layer_rank(l) for l in sh], "params": count(sh),
                           "acc": accuracy(sh, xte, yte),
                           "importance": [np.asarray(M.importance(l)).tolist() for l in layers]})
    for a in arms:
        v = np.asarray(acc[a])  # [seeds, ranks]
        out["arms"][a] = {"acc_mean": v.mean(0).tolist(), "acc_std": v.std(0).tolist(), "acc_by_seed": v.tolist(),
                          "sampler": arms[a][1], "gp_lambda": arms[a][2]}
    out["params_at_rank"] = [count_at_rank(r) for r in RANKS]
    out["dense_params"] = sum(a * b + b for a, b in zip(D.DIMS[:-1], D.DIMS[1:]))
    out["shrink"] = {"threshold": args.threshold, "by_seed": [{k: v for k, v in s.items() if k != "importance"}
                                                             for s in shrunk],
                     "importance_seed0": shrunk[0]["importance"] if shrunk else None}
    out["timing"] = time_steps(args, np.asarray(xtr), np.asarray(ytr), progress)
    t = out["timing"]
    out["step_ratio"] = t["maestro step"]["median_ms"] / t["limit: dense step"]["median_ms"]
    # area under the accuracy-vs-log2(rank) curve below full rank: the "graceful degradation" summary
    out["mean_acc_over_ranks"] = {a: float(np.mean(out["arms"][a]["acc_mean"])) for a in arms}
    return R.finish(out, args, "maestro_digits", table, plot)


def table(out):
    arms = list(out["arms"])
    rows = ["| rank r (per layer min(r, d_i)) | params@r | " + " | ".join(f"{a} acc (%)" for a in arms) + " |",
            "|---:|---:|" + "---:|" * len(arms)]
    for i, r in enumerate(out["ranks"]):
        cells = " | ".join(f"{100 * out['arms'][a]['acc_mean'][i]:.1f} +- {100 * out['arms'][a]['acc_std'][i]:.1f}"
                           for a in arms)
        rows.append(f"| {r} | {out['params_at_rank'][i]:,} | {cells} |")
    rows.append("| mean over ranks | - | " + " | ".join(f"{100 * out['mean_acc_over_ranks'][a]:.1f}" for a in arms)
                + " |")
    sh = out["shrink"]
    if sh["by_seed"]:
        rows += ["", f"maestro+lasso shrunk at importance >= {sh['threshold']:g} (hierarchical): "
                 + "; ".join(f"seed {i}: ranks {s['ranks']}, {s['params']:,} params, acc {100 * s['acc']:.1f}%"
                             for i, s in enumerate(sh["by_seed"]))
                 + f" (dense MLP: {out['dense_params']:,} params)."]
    t = out["timing"]
    ld, lf = t["limit: dense step"]["median_ms"], t["limit: dense forward (1438 rows)"]["median_ms"]
    rows += ["", "| timed call | median (ms) | IQR (ms) | / limit |", "|---|---:|---:|---:|"]
    for k, v in t.items():
        lim = ld if "step" in k else lf
        rows.append(f"| {k} | {v['median_ms']:.3f} | {v['iqr_ms']:.3f} | {v['median_ms'] / lim:.2f}x |")
    rows += ["", f"Maestro training step / dense training step (the limit): {out['step_ratio']:.2f}x "
                 "(two forwards: full + sampled sub-network)."]
    return "\n".join(rows)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    rs = out["ranks"]
    for a, v in out["arms"].items():
        m, s = 100 * np.asarray(v["acc_mean"]), 100 * np.asarray(v["acc_std"])
        a1.plot(rs, m, "o-", label=a)
        a1.fill_between(rs, m - s, m + s, alpha=0.2)
    a1.set(xscale="log", xlabel="rank per layer, min(r, d_i)", ylabel="test accuracy (%)",
           title="digits MLP 64-256-256-10: accuracy vs rank")
    a1.set_xscale("log", base=2)
    a1.legend(fontsize=8)
    t = out["timing"]
    names = list(t)
    lim = {k: (t["limit: dense step"] if "step" in k else t["limit: dense forward (1438 rows)"])["median_ms"]
           for k in names}
    a2.barh(np.arange(len(names)), [t[k]["median_ms"] / lim[k] for k in names])
    a2.axvline(1.0, color="k", ls="--", lw=0.8, label="limit (dense)")
    a2.set_yticks(np.arange(len(names)), names, fontsize=8)
    a2.set(xlabel="median time / dense limit", title="step and forward time")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
