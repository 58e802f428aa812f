"""MCUFormer on digits: a ViT supernet of factorized linears, then an evolutionary search under a
peak-memory budget with the rank ratio in the search space vs fixed at 1.

    python experiments/mcuformer_digits.py              # a few minutes on 2 CPU cores
    python experiments/mcuformer_digits.py --quick      # smoke test, seconds (writes to runs/)

1. **Supernet** (:mod:`lrjax.nn.mcuformer`): 8x8 digits (``experiments/_digits_bench.py``'s data; the
   search scores on a validation split = every 5th training image, the supernet trains on the
   rest) as patch tokens; patch 2 or 4, embed up to 64, depth up to 3, mlp ratio 1 or 2, every
   block linear factorized ``v [in, r] -> s [r, r] -> u [r, out]`` (SVD init at full rank). Trained
   ``--steps`` Adam steps (batch ``--batch``) with the sandwich rule: every step averages the loss
   of the largest subnet, the smallest (patch 4, embed 32, depth 1, mlp 1, smallest rank ratio) and
   two uniformly sampled ones (one per patch size), all through the masked supernet forward (one
   compilation; the masks are the sliced subnet to float rounding, tested in tests/test_mcuformer.py).
2. **Search** (:func:`lrjax.search.evolution_search`, candidates deduplicated by
   :func:`lrjax.search.arch_hash`): score = the subnet's validation accuracy with the inherited
   supernet weights (no retraining, as AutoFormer/MCUFormer's search); memory = the *deployed*
   subnet's peak bytes for one image from XLA's compiled memory analysis
   (:func:`lrjax.nn.mcuformer.subnet_memory`: weights + input + output + peak temporaries, since
   the weights are the call's arguments; Sigma folded into u, and a linear whose factors are not
   smaller than its dense kernel served dense, so ``rank_ratio = 1`` is the plain ViT). Budgets are
   fractions ``--budgets`` of the memory of the largest plain (rank ratio 1) subnet. Two arms per
   budget: ``rank`` (rank ratio in {0.25, 0.5, 0.75, 1}) and ``no_rank`` (rank ratio fixed 1).
   Reported: the best spec, its memory, validation and test accuracy, the number of distinct
   candidates measured/scored and the duplicates skipped, per search seed (``--search-seeds``).
   The *limit* row: the largest subnet (every dim at its maximum; what any budget can at most reach).

The paper's claim checked here: at a tight budget, accuracy with rank in the space is higher than
without (the direction only; ImageNet/STM32 numbers are not reproducible on CPU).
Writes ``<out>/mcuformer_digits.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _digits_bench as D  # noqa: E402
import _report as R  # noqa: E402

from lrjax.nn import mcuformer as M  # noqa: E402
from lrjax.search import arch_hash, evolution_search  # noqa: E402

RANKS = (0.25, 0.5, 0.75, 1.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny supernet and search (smoke test)")
    p.add_argument("--out", default="runs/mcuformer_digits", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="supernet Adam steps, default 300 (quick: 3)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--budgets", default="0.1,0.2,1.0", help="budgets as fractions of the largest plain subnet's memory")
    p.add_argument("--search-seeds", type=int, default=None, help="search seeds per arm, default 1 (quick: 1)")
    p.add_argument("--population", type=int, default=None, help="default 12 (quick: 4)")
    p.add_argument("--select", type=int, default=None, help="default 4 (quick: 2)")
    p.add_argument("--mutation", type=int, default=None, help="default 4 (quick: 1)")
    p.add_argument("--crossover", type=int, default=None, help="default 4 (quick: 1)")
    p.add_argument("--epochs", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(steps=(3, 300), search_seeds=(1, 1), population=(4, 12), select=(2, 4), mutation=(1, 4),
                crossover=(1, 4), epochs=(1, 3))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    a.budgets = [float(b) for b in a.budgets.split(",")]
    return a


def config(args):
    """Supernet dims and search space (quick: a tiny supernet, 8 specs)."""
    if args.quick:
        sup = dict(patches=(4,), embed=32, depth=1, mlp_ratio=2)
        space = {"patch": (4,), "embed": (16, 32), "depth": (1,), "mlp_ratio": (1, 2), "rank_ratio": (0.25, 1.0)}
    else:
        sup = dict(patches=(2, 4), embed=64, depth=3, mlp_ratio=2)
        space = dict(M.SPACE, rank_ratio=RANKS)
    return sup, space


def data():
    (xtr, ytr), (xte, yte) = D.task("original")
    val = np.arange(len(xtr)) % 5 == 4
    return {"train": (jnp.asarray(xtr[~val]), jnp.asarray(ytr[~val])), "val": (jnp.asarray(xtr[val]), jnp.asarray(ytr[val])),
            "test": (jnp.asarray(xte), jnp.asarray(yte))}


def _extreme(space, which):
    f = max if which == "max" else min
    return {k: f(v) for k, v in space.items()}


def train_supernet(args, sup_cfg, space, dat, progress):
    """Sandwich-rule training through the masked supernet forward; one jitted lax.scan per chunk."""
    params = M.init_supernet(jax.random.key(args.seed), **sup_cfg)
    patches = sorted(space["patch"])
    rng = np.random.default_rng(args.seed)
    big, small = _extreme(space, "max"), _extreme(space, "min")
    big["patch"], small["patch"] = min(patches), max(patches)  # more tokens = the larger net

    def rand(patch):
        s = {k: v[rng.integers(len(v))] for k, v in space.items()}
        s["patch"] = patch
        return s

    # per step: a list of (patch, dims) for the 4 sandwich members, grouped by patch (fixed shapes)
    chunk = -(-args.steps // 10)  # ten jitted chunks of equal length (steps rounded up to a multiple)
    steps = chunk * -(-args.steps // chunk)
    groups = {p: [] for p in patches}
    for _ in range(steps):
        members = [big, small] + [rand(p) for p in (patches if len(patches) > 1 else patches * 2)]
        by_p = {p: [M.spec_dims(s, params) for s in members if s["patch"] == p] for p in patches}
        for p in patches:
            groups[p].append(by_p[p])
    dims = {p: jnp.asarray(np.array(groups[p], np.int32)) for p in patches}  # [steps, k_p, 4]
    xtr, ytr = dat["train"]
    idx = jnp.asarray(np.stack([rng.choice(len(xtr), args.batch, replace=False) for _ in range(steps)]))
    opt = optax.adam(args.lr)

    def loss(p, x, y, dims_by_patch):
        tot, n = 0.0, 0
        for patch, d in dims_by_patch.items():
            logits = jax.vmap(lambda dd: M.supernet_forward(p, x, dd, patch=patch))(d)  # [k, B, 10]
            tot = tot + jnp.sum(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y[None]), -1))
            n += d.shape[0]
        return tot / n

    @jax.jit
    def run(params, state, idx, dims):
        def body(c, inp):
            p, s = c
            i, d = inp
            lval, g = jax.value_and_grad(loss)(p, xtr[i], ytr[i], d)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), lval
        (p, s), losses = jax.lax.scan(body, (params, state), (idx, dims))
        return p, s, losses

    state = opt.init(params)
    losses = []
    t0 = time.perf_counter()
    for a in tqdm(range(0, steps, chunk), desc="supernet", disable=not progress):
        sl = lambda t: t[a:a + chunk]  # noqa: E731
        params, state, lv = run(params, state, sl(idx), {p: sl(dims[p]) for p in patches})
        losses.extend(np.asarray(lv).tolist())
    jax.block_until_ready(params)
    return params, {"train_s": time.perf_counter() - t0, "loss_first": losses[0], "loss_last": float(np.mean(losses[-chunk:])),
                    "steps": len(losses)}


def make_fns(params, dat):
    acc_fn = jax.jit(lambda p, x, y, d, patch: jnp.mean(jnp.argmax(M.supernet_forward(p, x, d, patch=patch), -1) == y),
                     static_argnames="patch")
    mem_cache, acc_cache, timing = {}, {}, {"memory_s": 0.0, "score_s": 0.0}

    def acc(spec, split):
        key = (arch_hash(spec), split)
        if key not in acc_cache:
            t = time.perf_counter()
            x, y = dat[split]
            acc_cache[key] = float(acc_fn(params, x, y, jnp.asarray(M.spec_dims(spec, params), jnp.int32),
                                          patch=spec["patch"]))
            timing["score_s"] += time.perf_counter() - t
        return acc_cache[key]

    def memory(spec):
        h = arch_hash(spec)
        if h not in mem_cache:
            t = time.perf_counter()
            mem_cache[h] = M.subnet_memory(params, spec, breakdown=True)
            timing["memory_s"] += time.perf_counter() - t
        return mem_cache[h]["peak"]

    return acc, memory, mem_cache, timing


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    out = R.start(__file__, argv, args)
    sup_cfg, space = config(args)
    out["supernet"], out["space"] = {k: list(v) if isinstance(v, tuple) else v for k, v in sup_cfg.items()}, \
        {k: list(v) for k, v in space.items()}
    dat = data()
    params, out["training"] = train_supernet(args, sup_cfg, space, dat, progress)
    acc, memory, mem_cache, timing = make_fns(params, dat)

    big = _extreme(space, "max")
    big["patch"] = min(space["patch"])
    plain_big = dict(big, rank_ratio=1.0)
    ref = memory(plain_big)
    out["limit"] = {"spec": plain_big, "memory": ref, "val_acc": acc(plain_big, "val"), "test_acc": acc(plain_big, "test"),
                    "params": M.num_params(M.deploy(M.subnet(params, plain_big)))}
    small = _extreme(space, "min")
    small["patch"] = max(space["patch"])
    out["smallest"] = {"spec": small, "memory": memory(small), "val_acc": acc(small, "val"), "test_acc": acc(small, "test")}
    arms = {"rank": space, "no_rank": dict(space, rank_ratio=(1.0,))}
    kw = dict(population=args.population, select=args.select, mutation=args.mutation, crossover=args.crossover,
              epochs=args.epochs, structural=("depth", "embed"))
    out["searches"] = []
    runs = [(b, arm, s) for b in args.budgets for arm in arms for s in range(args.search_seeds)]
    for frac, arm, s in tqdm(runs, desc="searches", disable=not progress):
        budget = frac * ref
        t = time.perf_counter()
        try:
            res = evolution_search(arms[arm], lambda sp: acc(sp, "val"), memory, budget, seed=s, **kw)
        except ValueError as e:  # a budget under every spec of this arm: recorded, not fatal
            out["searches"].append({"budget_frac": frac, "budget": budget, "arm": arm, "seed": s, "error": str(e)})
            continue
        b = res.best
        out["searches"].append({
            "budget_frac": frac, "budget": budget, "arm": arm, "seed": s, "best": b, "hash": arch_hash(b),
            "memory": res.best_memory, "val_acc": res.best_score, "test_acc": acc(b, "test"),
            "params": M.num_params(M.deploy(M.subnet(params, b))), "distinct_measured": res.memory_evaluations,
            "scored": res.evaluations, "duplicates_skipped": res.duplicates, "search_s": time.perf_counter() - t,
            "candidates": [(r["memory"], r["score"]) for r in res.history]})
    out["memory_compiles"] = len(mem_cache)
    out["timing"] = timing
    out["summary"] = summarize(out)
    return R.finish(out, args, "mcuformer_digits", table, plot)


def summarize(out):
    rows = {}
    for r in out["searches"]:
        if "error" in r:
            continue
        rows.setdefault((r["budget_frac"], r["arm"]), []).append(r)
    summ = {}
    for (frac, arm), rs in rows.items():
        summ[f"{frac}:{arm}"] = {"budget_frac": frac, "arm": arm, "val_acc_mean": float(np.mean([r["val_acc"] for r in rs])),
                                 "test_acc_mean": float(np.mean([r["test_acc"] for r in rs])),
                                 "memory_mean": float(np.mean([r["memory"] for r in rs])), "n": len(rs)}
    return summ


def table(out):
    kb = lambda b: f"{b / 1024:.1f}"  # noqa: E731
    lim = out["limit"]
    rows = ["| budget (KiB) | arm | seed | best spec (patch, embed, depth, mlp, rank ratio) | peak KiB | params | val acc | "
            "test acc | measured / scored / dup. skipped |", "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in out["searches"]:
        if "error" in r:
            rows.append(f"| {kb(r['budget'])} | {r['arm']} | {r['seed']} | no spec fits | | | | | |")
            continue
        b = r["best"]
        rows.append(f"| {kb(r['budget'])} ({r['budget_frac']:g}x) | {r['arm']} | {r['seed']} | {b['patch']}, {b['embed']}, "
                    f"{b['depth']}, {b['mlp_ratio']}, {b['rank_ratio']:g} | {kb(r['memory'])} | {r['params']} | "
                    f"{100 * r['val_acc']:.1f} | {100 * r['test_acc']:.1f} | {r['distinct_measured']} / {r['scored']} / "
                    f"{r['duplicates_skipped']} |")
    for name in ("limit", "smallest"):
        v = out[name]
        s = v["spec"]
        what = "limit: largest subnet" if name == "limit" else "smallest subnet"
        rows.append(f"| - | {what} | - | {s['patch']}, {s['embed']}, {s['depth']}, {s['mlp_ratio']}, {s['rank_ratio']:g} | "
                    f"{kb(v['memory'])} | {v.get('params', '')} | {100 * v['val_acc']:.1f} | {100 * v['test_acc']:.1f} | |")
    rows += ["", "| budget | arm | mean val acc | mean test acc | mean peak KiB | searches |", "|---|---|---:|---:|---:|---:|"]
    for v in out["summary"].values():
        rows.append(f"| {v['budget_frac']:g}x | {v['arm']} | {100 * v['val_acc_mean']:.1f} | {100 * v['test_acc_mean']:.1f} | "
                    f"{kb(v['memory_mean'])} | {v['n']} |")
    t = out["training"]
    rows += ["", f"Supernet: {t['steps']} sandwich steps in {t['train_s']:.1f} s (loss {t['loss_first']:.3f} -> "
             f"{t['loss_last']:.3f}); {out['memory_compiles']} distinct subnets compiled for the memory model "
             f"({out['timing']['memory_s']:.1f} s), scoring {out['timing']['score_s']:.1f} s. Budgets are fractions of the "
             f"largest plain subnet's peak ({kb(lim['memory'])} KiB)."]
    return "\n".join(rows)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"rank": "tab:blue", "no_rank": "tab:orange"}
    seen = set()
    for r in out["searches"]:
        if "error" in r:
            continue
        pts = np.array([(m, s) for m, s in r["candidates"] if s is not None], float)
        lab = r["arm"] if r["arm"] not in seen else None
        seen.add(r["arm"])
        if len(pts):
            ax.scatter(pts[:, 0] / 1024, 100 * pts[:, 1], s=8, alpha=0.35, color=colors[r["arm"]], label=lab)
        ax.scatter([r["memory"] / 1024], [100 * r["val_acc"]], s=60, marker="*", color=colors[r["arm"]], edgecolor="k")
    for frac in out["config"]["budgets"]:
        ax.axvline(frac * out["limit"]["memory"] / 1024, color="k", ls="--", lw=0.8)
    ax.set(xlabel="peak memory, XLA compiled analysis (KiB, batch 1)", ylabel="validation accuracy (%)",
           title="MCUFormer search on digits: scored candidates (dots), best per search (stars), budgets (dashed)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
