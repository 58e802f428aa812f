"""Activation-space adapters (FlyLoRA, NeRA, sequential bottleneck) on CPU: FlyLoRA's multi-task
merge vs LoRA's, NeRA vs LoRA on a nonlinear shift, and the step time of every branch.

    python experiments/bench_activation_adapters.py --out results/activation_adapters   # minutes, 2 cores
    python experiments/bench_activation_adapters.py --quick                            # smoke test, seconds

(a) **Multi-task merge** (the issue's figure; FlyLoRA's ``merge_lora_adapters.py`` protocol): the
    digits MLP of ``experiments/_digits_bench.py`` (64-256-256-10, pretrained on the original task)
    is adapted to three tasks (``rot90``, ``rot180``, ``rot270``) at ``fc1`` and ``fc2`` with LoRA
    (rank 8, alpha 16) and with FlyLoRA (rank 32, top-k 8, alpha 64, u 1e-3: the fork's MMLU
    config), each task from the same init key (so FlyLoRA's frozen A is shared), Adam, the same
    steps, batch and learning rate. The three adapters are merged by elementwise averaging
    (:func:`lrjax.reparam.flylora.average_adapters`; LoRA's A and B averaged separately, as the
    official script does for its LoRA baseline) and each task is evaluated before and after the
    merge. Reported: per-task test accuracy before/after, the mean drop, over ``--seeds`` seeds.
(b) **NeRA vs LoRA** on a nonlinear shift: the teacher is the pretrained MLP with its first hidden
    layer warped, ``h1 -> h1 + beta sin(omega h1)`` (an input-wise nonlinearity LoRA can only
    linearize); the student adapts ``fc2`` (whose input is ``h1``) to match the teacher's logits
    (MSE) with LoRA and NeRA at equal rank (8) and at equal trainable parameters (LoRA at NeRA-r8's
    count; NeRA r1 at about LoRA-r8's). Test MSE vs steps.
(c) **Step time**: forward + backward to the trainable factors through :func:`lrjax.factored` on an
    MLP (``--layers`` x Dense(width -> width), GELU, batch ``--batch``, MSE), jitted, warmed,
    methods interleaved (:func:`lrjax.benchmark.time_round_robin`), medians. Rows: LoRA r8 (the
    reference), FlyLoRA r32/k8 and r8/k2, NeRA r8 (K 8), SeqBottleneck (reduction 16), and the
    **limit**: the same forward + backward through the frozen base alone (gradient to the biases
    only). Ratios to LoRA and to the limit.

Writes ``<out>/bench_activation_adapters.{json,md,png}``.
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

import lrjax  # noqa: E402
from lrjax.benchmark import blocking, summarize, time_round_robin  # noqa: E402
from lrjax.reparam.bottleneck import SeqBottleneck  # noqa: E402
from lrjax.reparam.flylora import FlyLoRA, average_adapters  # noqa: E402
from lrjax.reparam.nera import NeRA  # noqa: E402

MERGE_TASKS = ("rot90", "rot180", "rot270")
MERGE_TARGETS = ("fc1/kernel", "fc2/kernel")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps (smoke test)")
    p.add_argument("--out", default="runs/activation_adapters", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=None, help="merge study seeds, default 3 (quick: 1)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default 200 (quick: 40)")
    p.add_argument("--steps", type=int, default=None, help="adaptation steps per task, default 300 (quick: 10)")
    p.add_argument("--lr", type=float, default=3e-3, help="NeRA-vs-LoRA learning rate")
    p.add_argument("--merge-lrs", default=None, help="comma-separated Adam learning rates of the merge study, each "
                   "method reported at its best single-task one; default 3e-3,3e-2 (quick: 3e-2)")
    p.add_argument("--batch", type=int, default=None, help="train batch / timed batch, default 128 (quick: 32)")
    p.add_argument("--nera-steps", type=int, default=None, help="default 400 (quick: 8)")
    p.add_argument("--beta", type=float, default=0.5, help="teacher warp amplitude")
    p.add_argument("--omega", type=float, default=3.0, help="teacher warp frequency")
    p.add_argument("--nera-alpha", type=float, default=1.0, help="NeRA's initial gain (official default 1e-3)")
    p.add_argument("--width", type=int, default=None, help="timed MLP width, default 512 (quick: 64)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=None, help="timed steps per method, default 20 (quick: 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(seeds=(1, 3), pretrain_steps=(40, 200), steps=(10, 300), batch=(32, 128), nera_steps=(8, 400),
                width=(64, 512), repeats=(2, 20))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    if a.merge_lrs is None:
        a.merge_lrs = "3e-2" if a.quick else "3e-3,3e-2"
    a.merge_lrs = [float(v) for v in str(a.merge_lrs).split(",")]
    return a


# ------------------------------------------------------------------------------ training helpers
def train_adapter(cache, rp, base, loss_of, xtr, ytr, key, steps, batch, lr, data_key):
    """Adam on ``rp``'s trainable factors for ``steps`` minibatches; returns the final adapters.
    ``loss_of(g, base, adapters, x, y) -> (loss, state or None)``; rule-updated state is put back
    into the frozen half after every step (FlyLoRA's router bias). The compiled loop is kept in
    ``cache`` per config (one compile per method and base, shared by the tasks)."""
    _, ad = rp.init(key, base)
    tr, fr = rp.split(ad)
    opt = optax.adam(lr)
    if (rp, lr) not in cache:
        g = lrjax.factored(D.forward, rp)

        @jax.jit
        def run(tr, fr, idx, xtr, ytr):
            def body(c, i):
                tr, fr, s = c
                (l, state), gr = jax.value_and_grad(lambda t: loss_of(g, base, rp.join(t, fr), xtr[i], ytr[i]),
                                                    has_aux=True)(tr)
                u, s = opt.update(gr, s, tr)
                tr = optax.apply_updates(tr, u)
                if state is not None:
                    fr = {p: {**f, **state.get(p, {})} for p, f in fr.items()}
                return (tr, fr, s), l
            (tr, fr, _), losses = jax.lax.scan(body, (tr, fr, opt.init(tr)), idx)
            return tr, fr, losses
        cache[rp, lr] = run
    idx = jax.random.randint(data_key, (steps, batch), 0, xtr.shape[0])
    tr, fr, losses = cache[rp, lr](tr, fr, idx, xtr, ytr)
    return rp.join(tr, fr), np.asarray(losses)


def _ce_loss(g, base, ad, x, y):
    out = g(base, ad, x)
    logits, state = out if isinstance(out, tuple) else (out, None)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), state


def _accuracy(rp, base, ad, x, y):
    out = lrjax.factored(D.forward, rp)(base, ad, x)
    logits = out[0] if isinstance(out, tuple) else out
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


# ------------------------------------------------------------------------------ (a) merge study
def merge_study(args, progress):
    configs = {"lora": lrjax.LoRA(rank=8, alpha=16.0, targets=MERGE_TARGETS),
               "flylora": FlyLoRA(rank=32, top_k=8, alpha=64.0, u=1e-3, targets=MERGE_TARGETS)}
    methods = {f"{m}@{lr:g}": (rp, lr) for m, rp in configs.items() for lr in args.merge_lrs}
    res = {m: {"before": {t: [] for t in MERGE_TASKS}, "after": {t: [] for t in MERGE_TASKS}, "trainable": None}
           for m in methods}
    base_acc = {t: [] for t in MERGE_TASKS}
    bar = tqdm(total=args.seeds * len(methods) * len(MERGE_TASKS), desc="merge study", disable=not progress,
               file=sys.stdout, leave=False)
    for s in range(args.seeds):
        seed = args.seed + s
        base = D.pretrain(seed, steps=args.pretrain_steps)
        data = {t: D.task(t) for t in MERGE_TASKS}
        cache = {}
        for t in MERGE_TASKS:
            (_, _), (xte, yte) = data[t]
            base_acc[t].append(float(D.accuracy(base, jnp.asarray(xte), jnp.asarray(yte))))
        for name, (rp, lr) in methods.items():
            ads = []
            for ti, t in enumerate(MERGE_TASKS):
                (xtr, ytr), (xte, yte) = data[t]
                ad, _ = train_adapter(cache, rp, base, _ce_loss, jnp.asarray(xtr), jnp.asarray(ytr),
                                      jax.random.key(1000 + seed), args.steps, args.batch, lr,
                                      jax.random.key(2000 + 17 * seed + ti))
                ads.append(ad)
                res[name]["before"][t].append(_accuracy(rp, base, ad, jnp.asarray(xte), jnp.asarray(yte)))
                res[name]["trainable"] = rp.num_params(ad)
                bar.update()
            merged = average_adapters(ads)
            for t in MERGE_TASKS:
                (_, _), (xte, yte) = data[t]
                res[name]["after"][t].append(_accuracy(rp, base, merged, jnp.asarray(xte), jnp.asarray(yte)))
    bar.close()
    for name, r in res.items():
        b = np.array([r["before"][t] for t in MERGE_TASKS])  # [task, seed]
        a = np.array([r["after"][t] for t in MERGE_TASKS])
        r["before_mean"] = float(b.mean())
        r["after_mean"] = float(a.mean())
        r["drop_mean"] = float((b - a).mean())
        r["drop_per_seed"] = [float(v) for v in (b - a).mean(0)]
        r["drop_std_over_seeds"] = float(np.std((b - a).mean(0)))
        r["lr"] = methods[name][1]
    # the headline: each method at the learning rate of its best single-task (before-merge) accuracy
    best = {m: max((k for k in res if k.startswith(m + "@")), key=lambda k: res[k]["before_mean"]) for m in configs}
    return {"methods": res, "best": best, "base_acc": {t: float(np.mean(v)) for t, v in base_acc.items()},
            "config": {m: repr(rp) for m, rp in configs.items()}, "tasks": list(MERGE_TASKS),
            "seeds": args.seeds, "steps": args.steps, "lrs": list(args.merge_lrs), "batch": args.batch}


# ------------------------------------------------------------------------------ (b) NeRA vs LoRA
def teacher_forward(params, x, beta, omega):
    h = jax.nn.gelu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"], approximate=False)
    h = h + beta * jnp.sin(omega * h)
    h = jax.nn.gelu(h @ params["fc2"]["kernel"] + params["fc2"]["bias"], approximate=False)
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def nera_study(args, progress):
    base = D.pretrain(args.seed, steps=args.pretrain_steps)
    (xtr, _), (xte, _) = D.task("original")
    xtr, xte = jnp.asarray(xtr), jnp.asarray(xte)
    ttr = teacher_forward(base, xtr, args.beta, args.omega)
    tte = teacher_forward(base, xte, args.beta, args.omega)
    m, n = D.DIMS[1], D.DIMS[2]
    nera8 = NeRA(rank=8, num_knots=8, alpha=args.nera_alpha, targets="fc2/kernel")
    nera_params = m * 8 * 8 + m * 8 + m + 8 * n + 1
    r_eq = int(min(min(m, n), max(1, round(nera_params / (m + n)))))
    methods = {"lora_r8": lrjax.LoRA(rank=8, alpha=16.0, targets="fc2/kernel"),
               "nera_r8": nera8,
               f"lora_r{r_eq}": lrjax.LoRA(rank=r_eq, alpha=2.0 * r_eq, targets="fc2/kernel"),
               "nera_r1": NeRA(rank=1, num_knots=8, alpha=args.nera_alpha, targets="fc2/kernel")}
    if args.quick:  # the smoke test: one row per code path
        methods = {k: methods[k] for k in ("lora_r8", "nera_r8")}
    every = max(1, args.nera_steps // (20 if not args.quick else 2))
    res, cache = {}, {}

    def mse_loss(g, base, ad, x, y):
        return jnp.mean((g(base, ad, x) - y) ** 2), None

    for name, rp in tqdm(methods.items(), desc="NeRA vs LoRA", disable=not progress, file=sys.stdout, leave=False):
        _, ad = rp.init(jax.random.key(args.seed), base)
        g = lrjax.factored(D.forward, rp)
        curve, steps_done = [float(jnp.mean((g(base, ad, xte) - tte) ** 2))], [0]
        for c in range(0, args.nera_steps, every):
            # continue training from the current adapters: chunks of `every` steps
            ad = _continue(cache, rp, base, ad, mse_loss, xtr, ttr, every, args.batch, args.lr, args.seed * 7919 + c)
            curve.append(float(jnp.mean((g(base, ad, xte) - tte) ** 2)))
            steps_done.append(c + every)
        res[name] = {"trainable": rp.num_params(ad), "steps": steps_done, "test_mse": curve,
                     "final_mse": curve[-1], "config": repr(rp)}
    base_mse = float(jnp.mean((D.forward(base, xte) - tte) ** 2))
    return {"methods": res, "base_mse": base_mse, "beta": args.beta, "omega": args.omega,
            "steps": args.nera_steps, "lr": args.lr, "nera_alpha0": args.nera_alpha}


def _continue(cache, rp, base, ad, loss_of, xtr, ytr, steps, batch, lr, data_seed):
    """``steps`` more Adam steps from ``ad`` (the compiled run and the optimizer state carry over
    between chunks in ``cache``)."""
    key = rp
    tr, fr = rp.split(ad)
    opt = optax.adam(lr)
    if key not in cache:
        g = lrjax.factored(D.forward, rp)

        @jax.jit
        def run(tr, fr, s, idx):
            def body(c, i):
                tr, s = c
                l, gr = jax.value_and_grad(lambda t: loss_of(g, base, rp.join(t, fr), xtr[i], ytr[i])[0])(tr)
                u, s = opt.update(gr, s, tr)
                return (optax.apply_updates(tr, u), s), l
            (tr, s), _ = jax.lax.scan(body, (tr, s), idx)
            return tr, s
        cache[key] = [run, opt.init(tr)]
    run, s = cache[key]
    idx = jax.random.randint(jax.random.key(data_seed), (steps, batch), 0, xtr.shape[0])
    tr, s = run(tr, fr, s, idx)
    cache[key][1] = s
    return rp.join(tr, fr)


# ------------------------------------------------------------------------------ (c) step time
def timing_study(args, progress):
    w, L, bsz = args.width, args.layers, args.batch
    keys = jax.random.split(jax.random.key(args.seed), L + 2)
    params = {f"l{i}": {"kernel": jax.random.normal(keys[i], (w, w)) / np.sqrt(w), "bias": jnp.zeros(w)}
              for i in range(L)}
    x = jax.random.normal(keys[L], (bsz, w))
    y = jax.random.normal(keys[L + 1], (bsz, w))

    def fwd(p, x):
        h = x
        for i in range(L):
            h = h @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
            h = jax.nn.gelu(h) if i < L - 1 else h
        return h

    methods = {"lora_r8": lrjax.LoRA(rank=8, alpha=16.0), "flylora_r32_k8": FlyLoRA(rank=32, top_k=8, alpha=64.0),
               "flylora_r8_k2": FlyLoRA(rank=8, top_k=2, alpha=16.0), "nera_r8_k8": NeRA(rank=8, alpha=1.0),
               "seq_bottleneck_rf16": SeqBottleneck(reduction_factor=16)}
    if args.quick:  # the smoke test: one row per code path
        methods = {k: methods[k] for k in ("lora_r8", "flylora_r8_k2", "nera_r8_k8", "seq_bottleneck_rf16")}
    calls, info = {}, {}
    for name, rp in methods.items():
        _, ad = rp.init(jax.random.key(1), params)
        tr, fr = rp.split(ad)
        g = lrjax.factored(fwd, rp)

        def loss(t, fr, x, y, g=g, rp=rp):
            out = g(params, rp.join(t, fr), x)
            pred, state = out if isinstance(out, tuple) else (out, None)
            return jnp.mean((pred - y) ** 2), state

        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        calls[name] = blocking(step, tr, fr, x, y)
        info[name] = {"trainable_params": rp.num_params(ad), "config": repr(rp)}

    bias_of = {k: v["bias"] for k, v in params.items()}

    def limit_loss(b, x, y):
        p = {k: {"kernel": params[k]["kernel"], "bias": b[k]} for k in params}
        return jnp.mean((fwd(p, x) - y) ** 2)

    calls["limit"] = blocking(jax.jit(jax.value_and_grad(limit_loss)), bias_of, x, y)
    info["limit"] = {"trainable_params": L * w, "config": "frozen base, gradient to the biases only"}
    times = time_round_robin(calls, args.repeats, args.warmup, desc="step time", progress=progress)
    out = {}
    for name, ms in times.items():
        out[name] = {**info[name], **{k: v for k, v in summarize(ms).items()}}
    for name, r in out.items():
        r["ratio_to_lora"] = r["median_ms"] / out["lora_r8"]["median_ms"]
        r["ratio_to_limit"] = r["median_ms"] / out["limit"]["median_ms"]
    return {"methods": out, "shape": {"width": w, "layers": L, "batch": bsz}, "repeats": args.repeats}


# ------------------------------------------------------------------------------ report
def tables(out):
    mg = out["merge"]
    bl, bf = (mg["methods"][mg["best"][m]] for m in ("lora", "flylora"))
    rows = [f"**(a) Multi-task merge by averaging** (digits MLP, tasks {', '.join(mg['tasks'])}; adapters on fc1, fc2; "
            f"{mg['steps']} Adam steps at each lr of {mg['lrs']}, batch {mg['batch']}; {mg['seeds']} seed(s); test "
            "accuracy, mean over seeds; `*` = the method's best single-task lr, the headline)\n",
            f"Headline: merge drop FlyLoRA **{bf['drop_mean']:.3f}** ({mg['best']['flylora']}) vs LoRA "
            f"**{bl['drop_mean']:.3f}** ({mg['best']['lora']}); merged accuracy {bf['after_mean']:.3f} vs "
            f"{bl['after_mean']:.3f}.\n",
            "| method | trainable params | " + " | ".join(f"{t} before / after" for t in mg["tasks"])
            + " | mean before | mean after | **drop** (± std over seeds) |",
            "|---|---:|" + "---:|" * len(mg["tasks"]) + "---:|---:|---:|"]
    for name, r in mg["methods"].items():
        cells = " | ".join(f"{np.mean(r['before'][t]):.3f} / {np.mean(r['after'][t]):.3f}" for t in mg["tasks"])
        star = "*" if name in mg["best"].values() else ""
        rows.append(f"| {name}{star} | {r['trainable']:,} | {cells} | {r['before_mean']:.3f} | {r['after_mean']:.3f} | "
                    f"**{r['drop_mean']:.3f}** ± {r['drop_std_over_seeds']:.3f} |")
    rows.append("| base (no adapter) | 0 | " + " | ".join(f"{mg['base_acc'][t]:.3f}" for t in mg["tasks"]) + " | | | |")
    nr = out["nera"]
    rows += ["", f"**(b) NeRA vs LoRA on a nonlinear shift** (teacher: h1 -> h1 + {nr['beta']} sin({nr['omega']} h1); "
             f"student adapts fc2; logit MSE on the test images; {nr['steps']} Adam steps, lr {nr['lr']}; NeRA alpha0 "
             f"{nr['nera_alpha0']}; base MSE {nr['base_mse']:.4f})\n",
             "| method | trainable params | MSE after 1/4 of the steps | final MSE |", "|---|---:|---:|---:|"]
    for name, r in nr["methods"].items():
        q = r["test_mse"][max(1, len(r["test_mse"]) // 4)]
        rows.append(f"| {name} | {r['trainable']:,} | {q:.5f} | {r['final_mse']:.5f} |")
    tm = out["timing"]
    s = tm["shape"]
    rows += ["", f"**(c) Step time** (forward + backward to the trainable factors, lrjax.factored, MLP {s['layers']} x "
             f"Dense({s['width']}->{s['width']}), batch {s['batch']}, jit, warmed, median of {tm['repeats']})\n",
             "| method | trainable params | median (ms) | IQR (ms) | x lora_r8 | x limit |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in tm["methods"].items():
        rows.append(f"| {name} | {r['trainable_params']:,} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | "
                    f"{r['ratio_to_lora']:.2f} | {r['ratio_to_limit']:.2f} |")
    return "\n".join(rows)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 3, figsize=(15, 4.2))
    mg = out["merge"]
    names = list(mg["best"].values())  # each method at its best single-task lr
    xs = np.arange(len(mg["tasks"]))
    for i, nm in enumerate(names):
        r = mg["methods"][nm]
        axs[0].bar(xs + (2 * i) * 0.2 - 0.3, [np.mean(r["before"][t]) for t in mg["tasks"]], 0.2,
                   label=f"{nm} before", color=f"C{i}", alpha=0.5)
        axs[0].bar(xs + (2 * i + 1) * 0.2 - 0.3, [np.mean(r["after"][t]) for t in mg["tasks"]], 0.2,
                   label=f"{nm} merged (drop {r['drop_mean']:.3f})", color=f"C{i}")
    axs[0].set(xticks=xs, xticklabels=mg["tasks"], ylabel="test accuracy", title="(a) merge 3 tasks by averaging")
    axs[0].legend(fontsize=7)
    for nm, r in out["nera"]["methods"].items():
        axs[1].plot(r["steps"], r["test_mse"], label=f"{nm} ({r['trainable']:,} params)")
    axs[1].set(xlabel="step", ylabel="test logit MSE", yscale="log", title="(b) nonlinear shift of h1")
    axs[1].legend(fontsize=7)
    tm = out["timing"]["methods"]
    axs[2].bar(list(tm), [r["ratio_to_limit"] for r in tm.values()], color=["0.6" if k == "limit" else "C0" for k in tm])
    axs[2].axhline(tm["lora_r8"]["ratio_to_limit"], color="k", ls="--", lw=0.8, label="lora_r8")
    axs[2].set(ylabel="step time / limit", title="(c) forward+backward step")
    axs[2].tick_params(axis="x", rotation=30)
    axs[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    out = R.start(__file__, argv, args)
    out["merge"] = merge_study(args, progress)
    out["nera"] = nera_study(args, progress)
    out["timing"] = timing_study(args, progress)
    return R.finish(out, args, "bench_activation_adapters", tables, plot)


if __name__ == "__main__":
    main()
