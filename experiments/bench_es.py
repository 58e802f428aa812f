"""Benchmark: what one EGGROLL generation costs relative to batched inference, against evosax's
full-rank Open_ES, and how fast ES alone trains a digits classifier.

    python experiments/bench_es.py            # full run (minutes on 2 CPU cores)
    python experiments/bench_es.py --quick    # smoke test, tiny shapes, < 15 s

Cost workloads (float32, fixed seeds): an MLP of 3 Dense layers of width ``w`` with tanh between,
``in = out = w``, population ``N``, every member scored on the same 8 inputs (MSE to a fixed
target). Defaults: ``w=256, N=256``, ``w=1024, N=64`` and the wider ``w=2048, N=64``.

* ``inference``: one jitted forward of the ``N x 8`` rows (the same inputs, tiled per member) --
  the cost floor of any method that evaluates ``N`` different networks;
* ``limit_r{r}``: the unavoidable work of a rank-``r`` generation, one jitted call: the
  ``inference`` forward plus, for every matrix, the update's product
  ``A_all @ (f[:, None] * B_all)`` with PRE-GENERATED factors (``A_all: [m, K]``,
  ``B_all: [K, n]``, ``K = N/2 * r`` antithetic noise columns; ``2 m n K`` flops, about ``r/16``
  of the forward with 8 inputs per member) and no random numbers;
* ``eggroll_r{1,4,16}``: one generation, ``lrjax.es.Eggroll.estimate`` with the defaults (all
  members' perturbed forwards, fitness shaping and the update; ``store_noise='auto'`` keeps the
  forwards' draws for the update) with ``member_chunk=default_member_chunk(N, sharded=False)`` (one
  ``vmap`` of up to 256 members: these members do little work each, so one chunk is fastest) inside
  ``jax.jit`` (as a jitted training step runs it: the argument checks run
  once, at trace time); ``_rad``: Rademacher noise; ``_table``: ``noise='table'`` (Gaussian windows
  of a pre-drawn table at hashed offsets, the paper's int8 code's scheme); ``eggroll_r4_regen``:
  ``store_noise=False`` (the update draws the noise again, as with a mesh); ``eggroll_r4_eager``:
  the eager ``es.estimate`` call, i.e. plus its per-call Python checks (argument validation and the
  params' NaN/Inf check, ~1 ms);
* ``open_es``: one evosax ``Open_ES`` generation (ask, member forwards with materialized
  parameters via ``vmap``, tell), jitted.

Each is timed round-robin (``--repeats`` calls after ``--warmup``; each call ``block_until_ready``),
reported as medians; the ratio to inference is the headline (issue targets: <= 1.3x at rank <= 4,
>= 50x faster than Open_ES at width 1024), and every ``eggroll_r{r}*`` row also reports its ratio
to ``limit_r{r}`` measured in the same run (``ratio_to_limit``: what noise generation and
bookkeeping cost on top of the floor). Memory: XLA's compiled-program estimate (argument +
output + temporary bytes, ``compiled.memory_analysis()``).

Task: the sklearn 8x8 digits (``lrjax.data.load('digits')``), MLP 64-64-10, trained by EGGROLL
only (rank 4, centered ranks, Adam), test accuracy against generations and wall-clock, with the
wall-clock to reach ``--target-acc``.

Hyperscale throughput (the paper's setting, ``--hyperscale``): ONE ``D x D`` linear, population
``N = batch x chunks`` members, each scoring its own input row; a generation's forwards are
``chunks`` sequential batched calls of ``batch`` rows. Reported: the percent of pure batched
inference throughput (``x_c W`` for the same rows) for EGGROLL with the rank-``r`` factors drawn
on the fly inside the call (``eggroll_r{r}``), read on the fly as windows of the ``noise='table'``
table (``table_r{r}``) and pre-drawn (``pregen_r{r}``, the paper's
measurement; paper: 91% on one GH200). ``gpu`` (the default where a GPU is present):
``D = 8192`` bfloat16, ``batch = 1024``, ranks 1/4/16, ``chunks`` = 64 or as many as keep the
pre-drawn factors of the largest rank within a quarter of device memory. ``cpu`` (the default on
CPU, scaled down): ``D = 1024`` float32 (XLA:CPU has no fast bfloat16 matmul), ``batch = 256``,
4 chunks (``N = 1024``). The forward only, as in the paper; the update is in the rows above.

Writes ``<out>/bench_es<_tag>.json`` and ``<out>/bench_es<_tag>.png`` (``--tag cpu`` gives the
committed ``results/bench_es_cpu.*``); prints markdown tables.
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

from lrjax.benchmark import device_info, time_round_robin
from lrjax.es import Eggroll
from lrjax.es.eggroll import default_member_chunk


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test)")
    p.add_argument("--out", default="runs/bench_es")
    p.add_argument("--tag", default="", help="output name suffix: bench_es_<tag>.json/.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=None, help="default 10 (quick: 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--configs", default=None, help="width:population,... default 256:256,1024:64,2048:64 "
                   "(quick: 64:32)")
    p.add_argument("--ranks", default=None, help="default 1,4,16 (quick: 4)")
    p.add_argument("--inputs", type=int, default=8, help="inputs per member")
    p.add_argument("--no-open-es", action="store_true")
    p.add_argument("--task-generations", type=int, default=None, help="default 300 (quick: 10); 0 skips the digits task")
    p.add_argument("--task-population", type=int, default=None, help="default 512 (quick: 64)")
    p.add_argument("--target-acc", type=float, default=None, help="default 0.85 (quick: 0.3)")
    p.add_argument("--task-noises", default="normal", help="Eggroll noises the digits task trains with, "
                   "comma-separated (normal, rademacher, table); the first is plotted")
    p.add_argument("--hyperscale", default="auto", choices=["auto", "off", "gpu", "cpu"],
                   help="the paper's throughput config: 'gpu' = 8192-wide bf16 linear, 1024 members per "
                   "batched call; 'cpu' = the scaled-down run (see the module docstring); 'auto' picks by backend")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.repeats is None:
        a.repeats = 3 if a.quick else 10
    if a.configs is None:
        a.configs = "64:32" if a.quick else "256:256,1024:64,2048:64"
    if a.task_generations is None:
        a.task_generations = 10 if a.quick else 300
    if a.task_population is None:
        a.task_population = 64 if a.quick else 512
    if a.target_acc is None:
        a.target_acc = 0.3 if a.quick else 0.85
    if a.quick:
        a.warmup = 1
    a.configs = [tuple(int(v) for v in c.split(":")) for c in a.configs.split(",")]
    a.ranks = [int(r) for r in (a.ranks or ("4" if a.quick else "1,4,16")).split(",")]
    return a


def memory(compiled):
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # pragma: no cover
        return None


# --------------------------------------------------------------------------- cost workload
def mlp_params(key, w, layers=3):
    ks = jax.random.split(key, layers)
    return {f"dense_{i}": {"kernel": jax.random.normal(ks[i], (w, w)) / np.sqrt(w), "bias": jnp.zeros(w)}
            for i in range(layers)}


def mlp_apply(p, x):
    n = len(p)
    for i in range(n):
        x = x @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def mse_fitness(p, x, y):
    return jnp.mean((mlp_apply(p, x) - y) ** 2)


def cost_workload(args, w, pop):
    key = jax.random.key(args.seed)
    params = mlp_params(key, w)
    x = jax.random.normal(jax.random.fold_in(key, 1), (args.inputs, w))
    y = jax.random.normal(jax.random.fold_in(key, 2), (args.inputs, w))
    calls, mem, extra = {}, {}, {}

    xt = jnp.tile(x, (pop, 1))
    inf = jax.jit(mlp_apply).lower(params, xt).compile()
    calls["inference"] = lambda: jax.block_until_ready(inf(params, xt))
    mem["inference"] = memory(inf)

    layers = [params[k]["kernel"] for k in sorted(params)]
    kl = jax.random.fold_in(key, 3)
    for r in args.ranks:  # the floor: forward + the update's products from pre-generated factors
        k_cols = (pop // 2) * r
        fac = [(jax.random.normal(jax.random.fold_in(kl, 2 * i), (k.shape[0], k_cols)),
                jax.random.normal(jax.random.fold_in(kl, 2 * i + 1), (k_cols, k.shape[1]))) for i, k in enumerate(layers)]
        coef = jax.random.normal(jax.random.fold_in(kl, 1000), (k_cols,))

        def floor(params, xt, fac, coef):
            return mlp_apply(params, xt), [a @ (coef[:, None] * b) for a, b in fac]

        lim = jax.jit(floor).lower(params, xt, fac, coef).compile()
        calls[f"limit_r{r}"] = (lambda lim=lim, fac=fac, coef=coef: jax.block_until_ready(lim(params, xt, fac, coef)))
        mem[f"limit_r{r}"] = memory(lim)

    variants = [("normal", "", "auto"), ("rademacher", "_rad", "auto"), ("table", "_table", "auto"),
                ("normal", "_regen", False), ("normal", "_eager", "auto")]
    r_one = 4 if 4 in args.ranks else args.ranks[0]
    for noise, tag, store in variants:
        for r in args.ranks:
            if tag in ("_regen", "_eager") and r != r_one:
                continue                       # these trade-offs are shown at rank 4 only
            es = Eggroll(pop, rank=r, sigma=0.01, shaping="centered_rank", maximize=False, noise=noise,
                         store_noise=store, member_chunk=default_member_chunk(pop, sharded=False))
            st = es.init(jax.random.key(1))
            name = f"eggroll_r{r}{tag}"
            mem[name] = memory(es.lower(st, params, mse_fitness, x, y).compile())
            if tag == "_eager":   # the Python-side checks of an eager estimate call on top of its program
                es.estimate(st, params, mse_fitness, x, y)
                calls[name] = (lambda es=es, st=st: jax.block_until_ready(es.estimate(st, params, mse_fitness, x, y)))
                continue
            gen = jax.jit(lambda st, p, x, y, es=es: es.estimate(st, p, mse_fitness, x, y)[:2])
            jax.block_until_ready(gen(st, params, x, y))   # compile
            calls[name] = (lambda gen=gen, st=st: jax.block_until_ready(gen(st, params, x, y)))

    if not args.no_open_es:
        from evosax.algorithms import Open_ES
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        strat = Open_ES(pop, flat, optimizer=optax.sgd(1e-3), std_schedule=optax.constant_schedule(0.01))
        sp = strat.default_params
        s0 = strat.init(jax.random.key(1), flat, sp)

        def gen(state, key):
            k1, k2 = jax.random.split(key)
            popn, state = strat.ask(k1, state, sp)
            fit = jax.vmap(lambda v: mse_fitness(unravel(v), x, y))(popn)
            state, _ = strat.tell(k2, popn, fit, state, sp)
            return state

        g = jax.jit(gen).lower(s0, jax.random.key(2)).compile()
        mem["open_es"] = memory(g)
        open_call = lambda: jax.block_until_ready(g(s0, jax.random.key(2)))  # noqa: E731
        extra["open_es_population_floats"] = int(pop * flat.size)

    times = time_round_robin(calls, args.repeats, args.warmup, f"w={w} N={pop}", not args.no_progress)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratio = {k: med[k] / med["inference"] for k in med}
    if not args.no_open_es:
        # Open_ES allocates the whole N x D population (GBs at width 2048) and disturbed the calls
        # timed after it, so it gets its own round robin with inference; its ratio is to that.
        t2 = time_round_robin({"inference": calls["inference"], "open_es": open_call}, args.repeats,
                              args.warmup, f"w={w} N={pop} open_es", not args.no_progress)
        times["open_es"] = t2["open_es"]
        med["open_es"] = float(np.median(t2["open_es"]))
        ratio["open_es"] = med["open_es"] / float(np.median(t2["inference"]))
    res = {"width": w, "population": pop, "inputs_per_member": args.inputs, "methods": {}}
    for k in times:
        res["methods"][k] = {"median_ms": med[k], "times_ms": times[k],
                             "ratio_to_inference": ratio[k], "memory_bytes": mem[k]}
    for k in med:
        if k.startswith("eggroll"):
            lim = "limit_" + k.split("_")[1]  # eggroll_r4_rad -> limit_r4
            res["methods"][k]["ratio_to_limit"] = med[k] / med[lim]
            if "open_es" in med:   # in units of inference, each measured in its own round robin
                res["methods"][k]["speedup_vs_open_es"] = ratio["open_es"] / ratio[k]
    res.update(extra)
    return res


# --------------------------------------------------------------------------- hyperscale throughput
HYPERSCALE = {  # the paper's throughput setting (EGGROLL, Sarkar et al. 2025) and its CPU scale-down
    "gpu": dict(width=8192, dtype="bfloat16", batch=1024, chunks=64),
    "cpu": dict(width=1024, dtype="float32", batch=256, chunks=4),
    "quick": dict(width=64, dtype="float32", batch=32, chunks=2),
}


def hyperscale_config(args):
    if args.quick:
        return "quick" if args.hyperscale != "off" else None
    if args.hyperscale == "off":
        return None
    if args.hyperscale == "auto":
        return "gpu" if jax.default_backend() == "gpu" else "cpu"
    return args.hyperscale


def hyperscale_workload(args, name):
    """Throughput of one population's perturbed forwards through ONE ``D x D`` linear, each member
    scoring its own input row, as a percent of pure batched inference of the same rows.

    ``N = batch * chunks`` members; a generation runs ``chunks`` sequential batched calls of
    ``batch`` members (``lax.map``). Pure inference: ``x_c W`` per chunk (``x_c: [batch, D]``).
    EGGROLL: the same call plus member ``i``'s rank-``r`` term ``(sigma / sqrt r) (x_i A_i) B_i^T``,
    with ``A_i, B_i`` drawn ON THE FLY inside the call from the counter-based stream of
    :mod:`lrjax.es.noise` (``noise.draw`` for the member's noise index, as ``Eggroll`` draws
    them); ``pregen``: the same with the factors drawn beforehand and passed in (the paper's
    measurement). Fitness ``mean(y_i^2)`` per member; the output ``[N]`` is what is timed."""
    from lrjax.es import noise as noise_lib
    cfg = dict(HYPERSCALE[name])
    d, b, chunks = cfg["width"], cfg["batch"], cfg["chunks"]
    dt = jnp.dtype(cfg["dtype"])
    if name == "gpu":   # population sized to the device: the pre-drawn factors at the largest rank in 1/4 of it
        try:
            limit = jax.devices()[0].memory_stats()["bytes_limit"]
            per_chunk = b * 2 * d * max(args.ranks) * dt.itemsize
            chunks = cfg["chunks"] = int(max(1, min(chunks, 0.25 * limit // per_chunk)))
        except Exception:  # pragma: no cover - no memory_stats on this backend
            pass
    pop = b * chunks
    key = jax.random.key(args.seed)
    w = (jax.random.normal(key, (d, d)) / np.sqrt(d)).astype(dt)
    x = jax.random.normal(jax.random.fold_in(key, 1), (chunks, b, d)).astype(dt)

    def inference(w, x):
        return lax_map(lambda xc: jnp.mean(jnp.square((xc @ w).astype(jnp.float32)), -1), x).reshape(-1)

    ranks = args.ranks
    calls, res = {}, {"config": name, **cfg, "population": pop, "methods": {}}
    inf = jax.jit(inference).lower(w, x).compile()
    calls["inference"] = lambda: jax.block_until_ready(inf(w, x))
    for r in ranks:
        es = Eggroll(pop, rank=r, sigma=0.01, antithetic=False, member_chunk=b)
        plans = es.plan({"w": w})
        scale = jnp.asarray(0.01 / np.sqrt(r), dt)

        def factors(st_key, ids, dist="normal", table=None):
            z = jax.vmap(lambda j: noise_lib.draw_flat(plans, st_key, 0, j, r, 1, dist, table))(ids)
            (a, bb), = noise_lib.split(plans, z, r)
            return a.astype(dt), bb.astype(dt)            # [batch, D, r] each

        def member_rows(w, xc, a, bb):                    # row i of xc is member i's input
            y = xc @ w + scale * jnp.einsum("ir,inr->in", jnp.einsum("id,idr->ir", xc, a), bb)
            return jnp.mean(jnp.square(y.astype(jnp.float32)), -1)

        def on_the_fly(w, x, kd, table=None):
            k = jax.random.wrap_key_data(kd)
            ids = jnp.arange(pop, dtype=jnp.int32).reshape(chunks, b)
            dist = "normal" if table is None else "table"
            return lax_map(lambda c: member_rows(w, c[0], *factors(k, c[1], dist, table)), (x, ids)).reshape(-1)

        def pregen(w, x, a, bb):
            return lax_map(lambda c: member_rows(w, *c), (x, a, bb)).reshape(-1)

        kd = jax.random.key_data(jax.random.key(args.seed + 1))
        fly = jax.jit(on_the_fly).lower(w, x, kd).compile()
        calls[f"eggroll_r{r}"] = (lambda fly=fly: jax.block_until_ready(fly(w, x, kd)))
        table = noise_lib.make_table()    # noise='table': windows of the pre-drawn table, read on the fly
        tab = jax.jit(on_the_fly).lower(w, x, kd, table).compile()
        calls[f"table_r{r}"] = (lambda tab=tab, table=table: jax.block_until_ready(tab(w, x, kd, table)))
        ids = jnp.arange(pop, dtype=jnp.int32)
        a, bb = jax.jit(factors)(jax.random.key(args.seed + 1), ids)
        a, bb = a.reshape(chunks, b, d, r), bb.reshape(chunks, b, d, r)
        pre = jax.jit(pregen).lower(w, x, a, bb).compile()
        calls[f"pregen_r{r}"] = (lambda pre=pre, a=a, bb=bb: jax.block_until_ready(pre(w, x, a, bb)))
        if r == ranks[0]:   # the on-the-fly forward equals the materialized one for a few members
            got = np.asarray(fly(w, x, kd), np.float64)
            for i in (0, pop - 1):
                nz = es.member_noise(es.init(jax.random.key(args.seed + 1)), {"w": w}, i)["w"]
                wi = np.asarray(w, np.float64) + np.asarray(nz.dense(), np.float64)
                ref = np.mean((np.asarray(x.reshape(pop, d)[i], np.float64) @ wi) ** 2)
                res.setdefault("check_rel_err", []).append(float(abs(got[i] - ref) / abs(ref)))
        del a, bb
    times = time_round_robin(calls, args.repeats, args.warmup, f"hyperscale {name}", not args.no_progress)
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k in med:
        res["methods"][k] = {"median_ms": med[k], "times_ms": times[k],
                             "percent_of_inference": 100.0 * med["inference"] / med[k],
                             "members_per_s": pop / med[k] * 1e3}
    return res


def lax_map(f, xs):
    return jax.lax.map(f, xs)


def hyperscale_table(h):
    rows = [f"Hyperscale throughput ({h['config']}: one {h['width']}x{h['width']} {h['dtype']} linear, "
            f"{h['population']} members = {h['chunks']} batched calls of {h['batch']}, one input row each):", "",
            "| method | median ms | members/s | % of batched inference |", "|---|---|---|---|"]
    for k, r in h["methods"].items():
        rows.append(f"| {k} | {r['median_ms']:.2f} | {r['members_per_s']:.0f} | {r['percent_of_inference']:.1f}% |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- digits task
def digits_task(args, noise="normal"):
    from lrjax import data
    tr = data.as_arrays(data.load("digits", split="train"))
    te = data.as_arrays(data.load("digits", split="test"))
    xtr = jnp.asarray(tr["image"].reshape(-1, 64) / 16.0, jnp.float32)
    ytr = jnp.asarray(tr["label"], jnp.int32)
    xte = jnp.asarray(te["image"].reshape(-1, 64) / 16.0, jnp.float32)
    yte = jnp.asarray(te["label"], jnp.int32)
    k = jax.random.split(jax.random.key(args.seed), 2)
    params = {"hidden": {"kernel": jax.random.normal(k[0], (64, 64)) / 8.0, "bias": jnp.zeros(64)},
              "out": {"kernel": jax.random.normal(k[1], (64, 10)) / 8.0, "bias": jnp.zeros(10)}}

    def logits(p, x):
        h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        return h @ p["out"]["kernel"] + p["out"]["bias"]

    def loss(p, x, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits(p, x)), y[:, None], 1))

    acc = jax.jit(lambda p: jnp.mean(jnp.argmax(logits(p, xte), -1) == yte))
    es = Eggroll(args.task_population, rank=4, sigma=0.05, shaping="centered_rank", maximize=False, noise=noise,
                 member_chunk=default_member_chunk(args.task_population, sharded=False))  # small members: one vmap
    st = es.init(jax.random.key(args.seed + 1))
    opt = optax.adam(0.03)
    os_ = opt.init(params)

    @jax.jit
    def apply_update(p, o, g):
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o

    batch = 128
    rng = np.random.default_rng(args.seed)
    hist = {"generation": [], "wall_s": [], "test_acc": [], "train_loss": []}
    t0, reached = time.perf_counter(), None
    for gen in tqdm(range(args.task_generations + 1), desc="digits (ES only)", leave=False,
                    disable=args.no_progress, file=sys.stdout):
        if gen % max(1, args.task_generations // 30) == 0 or gen == args.task_generations:
            a = float(acc(params))
            hist["generation"].append(gen)
            hist["wall_s"].append(time.perf_counter() - t0)
            hist["test_acc"].append(a)
            hist["train_loss"].append(float(loss(params, xtr, ytr)))
            if reached is None and a >= args.target_acc:
                reached = {"generation": gen, "wall_s": hist["wall_s"][-1]}
        if gen == args.task_generations:
            break
        idx = rng.choice(xtr.shape[0], batch, replace=False)
        g, st, _ = es.estimate(st, params, loss, xtr[idx], ytr[idx])
        params, os_ = apply_update(params, os_, g)
    return {"config": {"population": args.task_population, "rank": 4, "sigma": 0.05, "optimizer": "adam(0.03)",
                       "noise": noise,
                       "batch": batch, "shaping": "centered_rank", "model": "64-64-10 tanh MLP"},
            "target_acc": args.target_acc, "reached": reached, "final_test_acc": hist["test_acc"][-1],
            "history": hist}


# --------------------------------------------------------------------------- report
def table(results):
    rows = ["| width | N | method | median ms | / inference | / limit | vs Open_ES | memory MiB |",
            "|---|---|---|---|---|---|---|---|"]
    for w in results:
        for m, r in w["methods"].items():
            sp, lim = r.get("speedup_vs_open_es"), r.get("ratio_to_limit")
            mem = r["memory_bytes"]
            rows.append(f"| {w['width']} | {w['population']} | {m} | {r['median_ms']:.2f} | "
                        f"{r['ratio_to_inference']:.2f}x | {'' if lim is None else f'{lim:.2f}x'} | "
                        f"{'' if sp is None else f'{sp:.0f}x faster'} | "
                        f"{'' if mem is None else f'{mem / 2**20:.1f}'} |")
    return "\n".join(rows)


def plot(results, task, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2 if task else 1, figsize=(11 if task else 6, 4), squeeze=False)
    ax = ax[0]
    names = [m for m in results[0]["methods"] if m != "inference"]
    xs = np.arange(len(results))
    for i, m in enumerate(names):
        ax[0].bar(xs + i * 0.8 / len(names), [w["methods"][m]["ratio_to_inference"] for w in results],
                  0.8 / len(names), label=m, hatch="//" if m.startswith("limit") else None)
    ax[0].axhline(1.3, color="k", ls="--", lw=1, label="1.3x target")
    ax[0].set_yscale("log")
    ax[0].set_xticks(xs + 0.4 - 0.4 / len(names), [f"w={w['width']}\nN={w['population']}" for w in results])
    ax[0].set_ylabel("generation time / batched inference")
    ax[0].legend(fontsize=7)
    if task is None:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return
    h = task["history"]
    ax[1].plot(h["generation"], h["test_acc"], marker=".")
    ax[1].axhline(task["target_acc"], color="k", ls="--", lw=1)
    ax[1].set_xlabel("generation")
    ax[1].set_ylabel("digits test accuracy (ES only)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    load_before = list(os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    results = [cost_workload(args, w, n) for w, n in args.configs]
    hs = hyperscale_config(args)
    hyper = hyperscale_workload(args, hs) if hs else None
    noises = [n.strip() for n in args.task_noises.split(",") if n.strip()]
    tasks = {n: digits_task(args, n) for n in noises} if args.task_generations > 0 else {}
    task = tasks[noises[0]] if tasks else None
    md = table(results) + ("\n\n" + hyperscale_table(hyper) if hyper else "")
    res = {"command": " ".join(sys.argv), "device": device_info(), "config": vars(args), "workloads": results,
           "hyperscale": hyper, "load_avg_before": load_before, "load_avg_after": list(os.getloadavg()), "digits": task,
           "digits_by_noise": {n: {k: t[k] for k in ("reached", "final_test_acc")} | {"final_train_loss": t["history"]["train_loss"][-1]}
                               for n, t in tasks.items()}, "table_markdown": md}
    stem = os.path.join(args.out, "bench_es" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    plot(results, task, stem + ".png")
    print(md)
    for n, t in tasks.items():
        r = t["reached"]
        print(f"\ndigits (ES only, N={args.task_population}, rank 4, noise={n}): final test acc "
              f"{t['final_test_acc']:.3f}, train loss {t['history']['train_loss'][-1]:.4f}; target "
              f"{args.target_acc:.2f} " + (f"reached at generation {r['generation']} after "
                                          f"{r['wall_s']:.1f} s" if r else "not reached"))
    print(f"reproduce: python experiments/bench_es.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
