"""Mixtures of low-rank experts (``lrjax.nn.mixture``): step time against a dense LoRA of the same
active rank, ReMix against a softmax top-2 router on rotated digits, and FlexMoRE accuracy vs rank.

    python experiments/bench_mixtures.py                 # a few minutes on 2 CPU cores
    python experiments/bench_mixtures.py --quick         # smoke test, seconds

1. **Training step** (timing). MLP of ``--layers`` x Dense(W -> W), GELU, batch B, MSE, plain-dict
   params; every layer carries an adapter, and one jitted step is forward + backward to the adapter
   parameters + an Adam update:
   ``mixture`` -- 8 experts of rank r (packed, :func:`mixture_delta`), softmax top-2 router
   (:func:`topk_gates`), the router trained through the gates; ``lora`` -- a dense LoRA of the same
   *active* rank ``2 r``; ``limit`` -- the base Dense alone (forward + backward through the frozen
   kernels, gradient to the biases only: the work no adapter step avoids). The issue's target:
   ``mixture`` within 1.5x of ``lora``. Also timed, same step: ``mixture_hetero`` (8 experts of
   ranks alternating ``r/2`` and ``3r/2``, same total rank, packed), ``remix`` (the ReMix step: S=4
   sampled subsets per input, RLOO surrogate; ~S forward/backward passes by design), and the
   rejected implementations of the same mixture step: ``einsum_stacked`` (``[E, M, r]`` einsums),
   ``gather_topk`` (per-row gather of the k active experts' factors), ``ragged_dot`` (tokens sorted
   by expert, ``jax.lax.ragged_dot``), ``expert_loop`` (a Python loop over experts).
2. **ReMix vs softmax top-2** on the digits fixture (``experiments/_digits_bench.py``): the MLP
   64-256-256-10 pretrained on the original digits, then adapted on the union of the 4 rotations
   (0, 90, 180, 270 degrees) with a mixture of 8 experts of rank 2 on every layer (fc1, fc2, out),
   top-2; Adam, ``--steps`` of batch 128, ``--seeds`` seeds. ``softmax_top2``: renormalized softmax
   top-2 gates, trained by backprop; ``remix``: ReMix (omega = 1/2, S = 4 subsets per input, RLOO),
   deterministic top-2 at test time. Reported per layer on the test set: the effective support
   ``exp(H)`` of the router distribution ``pi`` and of the active gates (per token = per image),
   the expert-usage histogram (fraction of top-2 slots per expert), accuracy per rotation. Reference
   rows: the pretrained base, and a dense LoRA of rank 4 (the same active rank).
3. **FlexMoRE** (post hoc, no training of the experts' low-rank form): two domain experts fully
   fine-tuned from the pretrained MLP (``rot90`` and ``noise``), each layer's delta compressed to
   rank r with :func:`lrjax.linalg.lowrank_delta`; accuracy of each domain's test set through its
   own compressed expert (oracle routing) for r = 1, 2, 4, ..., against the full experts.

Timings are medians of ``block_until_ready`` calls after warm-up, interleaved round robin
(:func:`lrjax.benchmark.time_round_robin`). Writes ``<out>/bench_mixtures.{json,md,png}``.
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
from bench_lora import compile_fn  # noqa: E402

from lrjax import linalg  # noqa: E402
from lrjax.benchmark import blocking, summarize, time_round_robin  # noqa: E402
from lrjax.nn import mixture as mx  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few steps (smoke test)")
    p.add_argument("--out", default="runs/bench_mixtures", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=None, help="timed steps per method, default 15 (quick: 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--width", type=int, default=None, help="timing MLP width, default 1024 (quick: 64)")
    p.add_argument("--layers", type=int, default=None, help="timing MLP depth, default 4 (quick: 2)")
    p.add_argument("--batch", type=int, default=None, help="timing batch, default 512 (quick: 32)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--rank", type=int, default=None, help="timing rank per expert, default 8 (quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="digits training steps, default 600 (quick: 10)")
    p.add_argument("--seeds", type=int, default=None, help="digits seeds, default 3 (quick: 1)")
    p.add_argument("--samples", type=int, default=4, help="ReMix subsets per input (S)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--expert-steps", type=int, default=None, help="FlexMoRE full fine-tuning steps, default 300 "
                   "(quick: 5)")
    p.add_argument("--no-flexmore", action="store_true")
    p.add_argument("--sections", default="steps,digits,flexmore",
                   help="comma-separated sections to run (steps, digits, flexmore)")
    p.add_argument("--no-alternatives", action="store_true", help="skip the rejected implementations' timings")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(repeats=(2, 15), width=(64, 1024), layers=(2, 4), batch=(32, 512), rank=(2, 8), steps=(10, 600), seeds=(1, 3),
                expert_steps=(5, 300))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    if a.quick:
        a.warmup = 1
        a.no_alternatives = True  # their compiles dominate a smoke run; the full run times them
    return a


# --------------------------------------------------------------------------- 1. step timing
def _base(args):
    w, L, B = args.width, args.layers, args.batch
    keys = jax.random.split(jax.random.key(args.seed), L + 2)
    params = {f"dense_{i}": {"kernel": jax.random.normal(keys[i], (w, w)) / np.sqrt(w), "bias": jnp.zeros((w,))}
              for i in range(L)}
    return params, jax.random.normal(keys[L], (B, w)), jax.random.normal(keys[L + 1], (B, w))


def _mlp(params, x, branch):
    """x -> Dense layers with GELU; ``branch(i, h) -> [B, W]`` is added to layer i's output."""
    L = len(params)
    for i in range(L):
        p = params[f"dense_{i}"]
        h = x @ p["kernel"] + p["bias"] + branch(i, x)
        x = jax.nn.gelu(h) if i < L - 1 else h
    return x


def _gather_delta(x, a, b, gates, idx):
    gv = jnp.take_along_axis(gates, idx, -1)
    h = jnp.einsum("bm,bkmr->bkr", x, a[idx]) * gv[..., None]
    return jnp.einsum("bkr,bkrn->bn", h, b[idx])


def _ragged_delta(x, a, b, gates, idx):
    e, k = a.shape[0], idx.shape[-1]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat)
    tok = order // k
    gv = jnp.take_along_axis(gates, idx, -1).reshape(-1)[order]
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    h = jax.lax.ragged_dot(x[tok], a, sizes) * gv[:, None]
    return jnp.zeros((x.shape[0], b.shape[-1]), x.dtype).at[tok].add(jax.lax.ragged_dot(h, b, sizes))


def _loop_delta(x, a, b, gates):
    y = 0.0
    for e in range(a.shape[0]):
        y = y + gates[:, e:e + 1] * ((x @ a[e]) @ b[e])
    return y


def build_steps(args):
    params, x, y = _base(args)
    E, k, r, w, L = args.experts, args.k, args.rank, args.width, args.layers
    opt = optax.adam(1e-3)
    key = jax.random.key(args.seed + 1)

    def mixture_params(ranks):
        out = {}
        for i in range(L):
            k1, k2 = jax.random.split(jax.random.fold_in(key, i))
            out[f"dense_{i}"] = {"router": jax.random.normal(k1, (w, E)) / np.sqrt(w),
                                 "a": jax.random.normal(k2, (w, sum(ranks))) / np.sqrt(w),
                                 "b": jnp.zeros((sum(ranks), w))}
        return out

    def stacked(tp):
        return {n: {"router": v["router"], "a": jnp.swapaxes(v["a"].reshape(w, E, r), 0, 1),
                    "b": v["b"].reshape(E, r, w)} for n, v in tp.items()}

    def mix_loss(tp, x, y, ranks, kind="packed"):
        def branch(i, h):
            p = tp[f"dense_{i}"]
            g, idx = mx.topk_gates(h @ p["router"], k)
            if kind == "packed":
                return mx.mixture_delta(h, p["a"], p["b"], g, ranks=ranks)
            if kind == "einsum":
                return jnp.einsum("ber,ern->bn", jnp.einsum("bm,emr->ber", h, p["a"]) * g[..., None], p["b"])
            if kind == "gather":
                return _gather_delta(h, p["a"], p["b"], g, idx)
            if kind == "ragged":
                return _ragged_delta(h, p["a"], p["b"], g, idx)
            return _loop_delta(h, p["a"], p["b"], g)
        return jnp.mean((_mlp(params, x, branch) - y) ** 2)

    def make(loss_fn):
        def step(tp, s, x, y):
            lval, g = jax.value_and_grad(loss_fn)(tp, x, y)
            u, s = opt.update(g, s, tp)
            return optax.apply_updates(tp, u), s, lval
        return step

    methods = {}
    eq = (r,) * E
    tp = mixture_params(eq)
    methods["mixture"] = (make(lambda t, x, y: mix_loss(t, x, y, eq)), tp, f"{E} experts x rank {r}, top-{k}, packed")
    hr = tuple(max(1, r // 2) if i % 2 == 0 else r + r - max(1, r // 2) for i in range(E))
    methods["mixture_hetero"] = (make(lambda t, x, y: mix_loss(t, x, y, hr)), mixture_params(hr),
                                 f"ranks {hr}, top-{k}, packed")
    ka, kb = jax.random.split(key)
    lora = {f"dense_{i}": {"a": jax.random.normal(jax.random.fold_in(ka, i), (w, k * r)) / np.sqrt(w),
                           "b": jnp.zeros((k * r, w))} for i in range(L)}

    def lora_loss(t, x, y):
        return jnp.mean((_mlp(params, x, lambda i, h: (h @ t[f"dense_{i}"]["a"]) @ t[f"dense_{i}"]["b"]) - y) ** 2)

    methods["lora"] = (make(lora_loss), lora, f"dense LoRA rank {k * r} (= active rank)")
    S = args.samples

    def remix_loss(t, x, y, key):
        def one(kk):
            lp = jnp.zeros(x.shape[:1])

            def branch(i, h):
                nonlocal lp
                p = t[f"dense_{i}"]
                rt = mx.remix_gates(jax.random.fold_in(kk, i), h @ p["router"], k)
                lp = lp + rt.log_prob
                return mx.mixture_delta(h, p["a"], p["b"], rt.gates, ranks=eq)
            out = _mlp(params, x, branch)
            return jnp.mean((out - y) ** 2, -1), lp
        losses, lps = jax.vmap(one)(jax.random.split(key, S))
        return mx.rloo_surrogate(losses, lps)

    def remix_step(tp, s, x, y, key):
        lval, g = jax.value_and_grad(remix_loss)(tp, x, y, key)
        u, s = opt.update(g, s, tp)
        return optax.apply_updates(tp, u), s, lval

    methods["remix"] = (remix_step, tp, f"ReMix, S={S} subsets per input, RLOO")
    if not args.no_alternatives:
        st = stacked(tp)
        for kind, what in (("einsum", "stacked [E, M, r] einsums"), ("gather", "per-row gather of the top-k factors"),
                           ("ragged", "sort by expert + jax.lax.ragged_dot"), ("loop", "Python loop over experts")):
            name = {"einsum": "einsum_stacked", "gather": "gather_topk", "ragged": "ragged_dot",
                    "loop": "expert_loop"}[kind]
            methods[name] = (make(lambda t, x, y, kind=kind: mix_loss(t, x, y, eq, kind)), st, what)
    sub = {n: {"bias": v["bias"]} for n, v in params.items()}

    def limit_step(sub, x, y):
        def loss(sub):  # differentiate the biases only: the kernels are constants (no kernel gradient)
            p = {n: {"kernel": params[n]["kernel"], "bias": sub[n]["bias"]} for n in params}
            return jnp.mean((_mlp(p, x, lambda i, h: 0.0) - y) ** 2)
        return jax.grad(loss)(sub)

    built = {}
    for name, (fn, tp_, what) in methods.items():
        if name == "remix":
            fargs = (tp_, opt.init(tp_), x, y, jax.random.key(3))
        else:
            fargs = (tp_, opt.init(tp_), x, y)
        n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(tp_))
        built[name] = (fn, fargs, n, what)
    built["limit"] = (limit_step, (sub, x, y), 0, "base Dense alone: fwd + bwd through frozen kernels")
    return built


def bench_steps(args, progress):
    res, calls = {}, {}
    for name, (fn, fargs, n, what) in tqdm(build_steps(args).items(), desc="compile", leave=False,
                                            disable=not progress, file=sys.stdout):
        compiled, info = compile_fn(fn, *fargs)
        calls[name] = blocking(compiled, *fargs)
        calls[name]()
        res[name] = {"what": what, "trainable_params": n, **info}
    times = time_round_robin(calls, args.repeats, args.warmup, "train steps", progress)
    for k_, ms in times.items():
        res[k_].update(summarize(ms))
    lora, lim = res["lora"]["median_ms"], res["limit"]["median_ms"]
    for k_, r in res.items():
        r["ratio_to_lora"] = r["median_ms"] / lora
        r["ratio_to_limit"] = r["median_ms"] / lim
        r["target_ratio_to_lora"] = 1.5 if k_ == "mixture" else None
        r["meets_target"] = None if k_ != "mixture" else bool(r["ratio_to_lora"] <= 1.5)
    return {"shape": {"layers": args.layers, "width": args.width, "batch": args.batch, "experts": args.experts,
                      "k": args.k, "rank": args.rank, "active_rank": args.k * args.rank}, "methods": res}


# ------------------------------------------------------------------- 2. ReMix vs softmax top-2
ROTATIONS = ("original", "rot90", "rot180", "rot270")


def _union(names):
    tr = [D.task(n)[0] for n in names]
    te = [D.task(n)[1] for n in names]
    return ((np.concatenate([t[0] for t in tr]), np.concatenate([t[1] for t in tr])),
            [(jnp.asarray(t[0]), jnp.asarray(t[1])) for t in te])


def _adapted_forward(base, ad, x, kind, key=None, k=2):
    """Digits MLP with a mixture (or LoRA) on fc1, fc2, out. Returns (logits, log_prob [B], routing list)."""
    h, lp, routes = x, jnp.zeros(x.shape[:1]), []
    for j, n in enumerate(D.LAYERS):
        p, q = base[n], ad[n]
        z = h @ p["kernel"] + p["bias"]
        if kind == "lora":
            z = z + (h @ q["a"]) @ q["b"]
        else:
            logits = mx.router_logits(h, q["router"])
            if kind == "softmax_top2":
                g, idx = mx.topk_gates(logits, k)
                rt = mx.Routing(g, idx, jnp.zeros(x.shape[:1]), mx.router_probs(logits))
            else:
                rt = mx.remix_gates(None if key is None else jax.random.fold_in(key, j), logits, k)
            lp = lp + rt.log_prob
            routes.append(rt)
            z = z + mx.mixture_delta(h, q["a"], q["b"], rt.gates, ranks=q_ranks(q))
        h = jax.nn.gelu(z, approximate=False) if n != D.LAYERS[-1] else z
    return h, lp, routes


def q_ranks(q):
    return (q["a"].shape[1] // q["router"].shape[1],) * q["router"].shape[1]


def _init_adapters(key, kind, E, r):
    ad = {}
    for j, (n, m, nout) in enumerate(zip(D.LAYERS, D.DIMS[:-1], D.DIMS[1:])):
        k1, k2 = jax.random.split(jax.random.fold_in(key, j))
        if kind == "lora":
            ad[n] = {"a": jax.random.normal(k2, (m, r)) / np.sqrt(m), "b": jnp.zeros((r, nout))}
        else:
            ad[n] = {"router": jax.random.normal(k1, (m, E)) / np.sqrt(m),
                     "a": jax.random.normal(k2, (m, E * r)) / np.sqrt(m), "b": jnp.zeros((E * r, nout))}
    return ad


def train_digits(args, kind, seed, base, data, progress):
    (xtr, ytr), tests = data
    E, r, k, S = args.experts, 2, args.k, args.samples
    key = jax.random.key(1000 + seed)
    ad = _init_adapters(key, kind, E, k * r if kind == "lora" else r)
    opt = optax.adam(args.lr)
    xtr, ytr = jnp.asarray(xtr), jnp.asarray(ytr)
    rng = np.random.default_rng(seed)
    idx = jnp.asarray(np.stack([rng.choice(len(xtr), 128, replace=False) for _ in range(args.steps)]))

    def loss_fn(ad, xb, yb, kk):
        if kind == "remix":
            def one(ks):
                logits, lp, _ = _adapted_forward(base, ad, xb, kind, ks, k)
                return optax.softmax_cross_entropy_with_integer_labels(logits, yb), lp
            losses, lps = jax.vmap(one)(jax.random.split(kk, S))
            return mx.rloo_surrogate(losses, lps)
        logits, _, _ = _adapted_forward(base, ad, xb, kind, None, k)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

    def ess_pi(ad):
        _, _, routes = _adapted_forward(base, ad, tests[0][0], kind, None, k)
        return jnp.stack([jnp.mean(mx.effective_support(rt.probs)) for rt in routes])

    @jax.jit
    def chunk(carry, ids):
        def body(c, i):
            ad, s, kk = c
            kk, sk = jax.random.split(kk)
            l, g = jax.value_and_grad(loss_fn)(ad, xtr[i], ytr[i], sk)
            u, s = opt.update(g, s, ad)
            return (optax.apply_updates(ad, u), s, kk), l
        carry, ls = jax.lax.scan(body, carry, ids)
        return carry, ls, (ess_pi(carry[0]) if kind != "lora" else jnp.zeros(3))

    n_chunks = max(1, min(10, args.steps))
    carry, hist = (ad, opt.init(ad), jax.random.key(seed)), []
    t0 = time.perf_counter()
    for c in tqdm(np.array_split(np.arange(args.steps), n_chunks), desc=f"{kind} seed {seed}", leave=False,
                  disable=not progress, file=sys.stdout):
        carry, ls, ess = chunk(carry, idx[c])
        hist.append({"step": int(c[-1]) + 1, "loss": float(jnp.mean(ls)), "ess_pi": [float(v) for v in ess]})
    train_s = time.perf_counter() - t0
    ad = carry[0]
    out = {"train_s": train_s, "history": hist, "acc": {}}
    # one jitted evaluation on all rotations' test sets (deterministic routing: top-k)
    xall, yall = jnp.concatenate([t[0] for t in tests]), jnp.concatenate([t[1] for t in tests])
    logits, _, routes = jax.jit(lambda ad, x: _adapted_forward(base, ad, x, kind, None, k))(ad, xall)
    correct = np.asarray(jnp.argmax(logits, -1) == yall).reshape(len(tests), -1)
    for name, c in zip(ROTATIONS, correct):
        out["acc"][name] = float(np.mean(c))
    out["acc"]["mean"] = float(np.mean([out["acc"][n] for n in ROTATIONS]))
    if kind != "lora":
        out["layers"] = {}
        for n, rt in zip(D.LAYERS, routes):
            usage = np.bincount(np.asarray(rt.idx).reshape(-1), minlength=E) / rt.idx.size
            out["layers"][n] = {"ess_pi_entropy": float(jnp.mean(mx.effective_support(rt.probs))),
                                "ess_pi_simpson": float(jnp.mean(mx.effective_support(rt.probs, kind="simpson"))),
                                "ess_gates_entropy": float(jnp.mean(mx.effective_support(rt.gates))),
                                "experts_used_ge_1pct": int(np.sum(usage >= 0.01)),
                                "usage": [float(u) for u in usage]}
    return out


def bench_digits(args, progress):
    base = D.pretrain(seed=args.seed, steps=10 if args.quick else 200)
    data = _union(ROTATIONS)
    out = {"tasks": list(ROTATIONS), "experts": args.experts, "rank": 2, "k": args.k, "samples": args.samples,
           "steps": args.steps, "batch": 128, "lr": args.lr, "seeds": args.seeds, "methods": {}}
    out["base_acc"] = {n: float(D.accuracy(base, xt, yt)) for n, (xt, yt) in zip(ROTATIONS, data[1])}
    out["base_acc"]["mean"] = float(np.mean(list(out["base_acc"].values())))
    for kind in ("softmax_top2", "remix", "lora"):
        runs = [train_digits(args, kind, s, base, data, progress) for s in range(args.seeds)]
        agg = {"runs": runs, "acc_mean": float(np.mean([r["acc"]["mean"] for r in runs])),
               "acc_std": float(np.std([r["acc"]["mean"] for r in runs])),
               "train_s_mean": float(np.mean([r["train_s"] for r in runs]))}
        if kind != "lora":
            for key_ in ("ess_pi_entropy", "ess_gates_entropy", "experts_used_ge_1pct"):
                agg[key_] = {n: float(np.mean([r["layers"][n][key_] for r in runs])) for n in D.LAYERS}
        out["methods"][kind] = agg
    return out


# ----------------------------------------------------------------------------- 3. FlexMoRE
@jax.jit
def _finetune_run(p, xtr, ytr, idx, lr):
    opt = optax.adam(lr)

    def body(c, i):
        p, s = c
        g = jax.grad(D.loss)(p, xtr[i], ytr[i])
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (p, opt.init(p)), idx)[0][0]


def _finetune_full(base, name, steps, lr, seed):
    """All weights of the MLP fine-tuned on task ``name`` (Adam ``lr``, ``steps`` batches of 128)."""
    (xtr, ytr), _ = D.task(name)
    rng = np.random.default_rng(seed)
    idx = jnp.asarray(np.stack([rng.choice(len(xtr), 128, replace=False) for _ in range(steps)]))
    return _finetune_run(base, jnp.asarray(xtr), jnp.asarray(ytr), idx, lr)


@jax.jit
def _lowrank_expert_logits(base, expert, ab, x):
    """The rank-r expert as a 1-expert mixture with gate 1 (oracle routing): x W_0 + b_e + (x a) b."""
    h = x
    for n in D.LAYERS:
        a, b = ab[n]
        z = h @ base[n]["kernel"] + expert[n]["bias"] + mx.mixture_delta(h, a[None], b[None],
                                                                         jnp.ones(h.shape[:1] + (1,)))
        h = jax.nn.gelu(z, approximate=False) if n != D.LAYERS[-1] else z
    return h


def bench_flexmore(args, progress):
    base = D.pretrain(seed=args.seed, steps=10 if args.quick else 200)
    domains = ("rot90", "noise")
    experts = {d: _finetune_full(base, d, args.expert_steps, 1e-3, args.seed + i) for i, d in enumerate(domains)}
    ranks = [2] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    out = {"domains": list(domains), "expert_steps": args.expert_steps, "ranks": ranks, "acc": {}, "params": {}}
    for d in domains:
        xt, yt = (jnp.asarray(v) for v in D.task(d)[1])
        out["acc"][d] = {"base": float(D.accuracy(base, xt, yt)), "full_expert": float(D.accuracy(experts[d], xt, yt))}
    full_params = sum(m * n for m, n in zip(D.DIMS[:-1], D.DIMS[1:]))
    out["params"]["full_expert_kernels"] = full_params
    for r in tqdm(ranks, desc="flexmore ranks", leave=False, disable=not progress, file=sys.stdout):
        out["params"][str(r)] = 0
        for d in domains:
            a_b = {n: linalg.lowrank_delta(experts[d][n]["kernel"], base[n]["kernel"], min(r, *base[n]["kernel"].shape))
                   for n in D.LAYERS}
            xt, yt = (jnp.asarray(v) for v in D.task(d)[1])
            h = _lowrank_expert_logits(base, experts[d], a_b, xt)
            out["acc"][d][str(r)] = float(jnp.mean(jnp.argmax(h, -1) == yt))
            out["params"][str(r)] = sum(a.size + b.size for a, b in a_b.values())
    return out


# ---------------------------------------------------------------------------------- report
def tables(out):
    rows = []
    if "steps" in out:
        rows += _steps_table(out)
    if "digits" in out:
        rows += _digits_table(out)
    if "flexmore" in out:
        rows += _flexmore_table(out)
    return "\n".join(rows)


def _steps_table(out):
    st, dev = out["steps"], out["device"]
    s = st["shape"]
    rows = [f"**Training step**, MLP {s['layers']} x Dense({s['width']}->{s['width']}), batch {s['batch']}, "
            f"{s['experts']} experts of rank {s['rank']}, top-{s['k']} (active rank {s['active_rank']}) "
            f"({dev['platform']}, {dev.get('usable_cpus', '?')} CPUs)\n",
            "| method | what | trainable params | median step (ms) | IQR (ms) | x lora | target | x limit |",
            "|---|---|---:|---:|---:|---:|---|---:|"]
    for k_, r in st["methods"].items():
        tgt = "" if r["target_ratio_to_lora"] is None else \
            f"<= {r['target_ratio_to_lora']:.2f}: {'met' if r['meets_target'] else 'NOT met'}"
        rows.append(f"| {k_} | {r['what']} | {r['trainable_params']:,} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | "
                    f"{r['ratio_to_lora']:.2f} | {tgt} | {r['ratio_to_limit']:.2f} |")
    return rows


def _digits_table(out):
    rows = []
    dg = out["digits"]
    rows += ["", f"**ReMix vs softmax top-2**, digits MLP 64-256-256-10, union of {', '.join(dg['tasks'])}; "
             f"{dg['experts']} experts of rank {dg['rank']} on fc1/fc2/out, top-{dg['k']}, {dg['steps']} steps of "
             f"batch {dg['batch']}, Adam {dg['lr']}, {dg['seeds']} seed(s); ReMix S={dg['samples']}. "
             "ESS = exp(entropy), test-set mean per image, per layer fc1/fc2/out.\n",
             "| method | test acc (mean over rotations) | ESS of router pi | ESS of active gates | "
             "experts used (>= 1% of slots) | train time (s) |", "|---|---:|---|---|---|---:|"]
    fmt = lambda d: " / ".join(f"{d[n]:.2f}" for n in D.LAYERS)  # noqa: E731
    rows.append(f"| pretrained base (no adapter) | {dg['base_acc']['mean']:.3f} | | | | |")
    for k_, m in dg["methods"].items():
        acc = f"{m['acc_mean']:.3f} +- {m['acc_std']:.3f}"
        if k_ == "lora":
            rows.append(f"| dense LoRA rank {dg['k'] * dg['rank']} (same active rank) | {acc} | | | | "
                        f"{m['train_s_mean']:.1f} |")
        else:
            used = " / ".join(f"{m['experts_used_ge_1pct'][n]:.1f}" for n in D.LAYERS)
            rows.append(f"| {k_} | {acc} | {fmt(m['ess_pi_entropy'])} | {fmt(m['ess_gates_entropy'])} | {used} | "
                        f"{m['train_s_mean']:.1f} |")
    return rows


def _flexmore_table(out):
    rows = []
    if "flexmore" in out:
        fm = out["flexmore"]
        rows += ["", f"**FlexMoRE** (oracle routing): test accuracy of each domain through its own expert, "
                 f"fully fine-tuned {fm['expert_steps']} steps then each layer's delta truncated to rank r "
                 f"(lowrank_delta). Params = stored a, b per expert (full kernels: "
                 f"{fm['params']['full_expert_kernels']:,}).\n",
                 "| domain | base | " + " | ".join(f"r={r}" for r in fm["ranks"]) + " | full expert |",
                 "|---|---:|" + "---:|" * (len(fm["ranks"]) + 1)]
        for d in fm["domains"]:
            a = fm["acc"][d]
            rows.append(f"| {d} | {a['base']:.3f} | " + " | ".join(f"{a[str(r)]:.3f}" for r in fm["ranks"]) +
                        f" | {a['full_expert']:.3f} |")
        rows.append("| params per expert | | " + " | ".join(f"{fm['params'][str(r)]:,}" for r in fm["ranks"]) +
                    f" | {fm['params']['full_expert_kernels']:,} |")
    return rows


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    if "steps" not in out or "digits" not in out:  # a partial run: the step-time panel only, if any
        for ax in axes:
            ax.axis("off")
        if "steps" in out:
            ms = out["steps"]["methods"]
            axes[0].axis("on")
            axes[0].bar(list(ms), [ms[n]["ratio_to_lora"] for n in ms])
            axes[0].set(ylabel="step time / dense LoRA step")
            axes[0].tick_params(axis="x", rotation=60, labelsize=7)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    ms = out["steps"]["methods"]
    names = list(ms)
    ax = axes[0]
    ax.bar(names, [ms[n]["ratio_to_lora"] for n in names],
           color=["0.6" if n == "limit" else ("tab:red" if ms[n]["meets_target"] is False else "tab:blue")
                  for n in names])
    ax.axhline(1.5, color="k", ls="--", lw=0.8, label="target 1.5x (mixture)")
    ax.set(ylabel="step time / dense LoRA step", title="training step vs LoRA of the same active rank")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    dg = out["digits"]
    for kind, c in (("softmax_top2", "tab:orange"), ("remix", "tab:green")):
        for j, n in enumerate(D.LAYERS):
            h = dg["methods"][kind]["runs"][0]["history"]
            axes[1].plot([p["step"] for p in h], [p["ess_pi"][j] for p in h], color=c,
                         ls=("-", "--", ":")[j], label=f"{kind} {n}")
    axes[1].set(xlabel="step", ylabel="ESS exp(H(pi)), rot-0 test images", title="router effective support (seed 0)")
    axes[1].legend(fontsize=6)
    E = dg["experts"]
    w = 0.4
    for i, (kind, c) in enumerate((("softmax_top2", "tab:orange"), ("remix", "tab:green"))):
        u = np.mean([r["layers"]["fc2"]["usage"] for r in dg["methods"][kind]["runs"]], 0)
        axes[2].bar(np.arange(E) + (i - 0.5) * w, u, w, color=c, label=kind)
    axes[2].set(xlabel="expert", ylabel="fraction of top-2 slots", title="expert usage, layer fc2 (test set)")
    axes[2].legend(fontsize=7)
    if "flexmore" in out:
        fm = out["flexmore"]
        for d in fm["domains"]:
            line, = axes[3].plot(fm["ranks"], [fm["acc"][d][str(r)] for r in fm["ranks"]], "o-", label=d)
            axes[3].axhline(fm["acc"][d]["full_expert"], color=line.get_color(), ls="--", lw=0.8)
        axes[3].set_xscale("log", base=2)
        axes[3].set(xlabel="rank r", ylabel="test accuracy", title="FlexMoRE: compressed expert (dashed: full)")
        axes[3].legend(fontsize=7)
    else:
        axes[3].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    out = R.start(__file__, argv, args)
    out["section_s"] = {}
    for name, fn in (("steps", bench_steps), ("digits", bench_digits), ("flexmore", bench_flexmore)):
        if (name == "flexmore" and args.no_flexmore) or name not in args.sections.split(","):
            continue
        t1 = time.perf_counter()
        out[name] = fn(args, progress)
        out["section_s"][name] = time.perf_counter() - t1
    return R.finish(out, args, "bench_mixtures", tables, plot)


if __name__ == "__main__":
    main()
