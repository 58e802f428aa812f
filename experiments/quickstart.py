"""Quickstart: pretrain a small character transformer, then fine-tune it nine ways.

    python experiments/quickstart.py            # ~3-4 min on 2 CPU cores (254 s in the run of docs/quickstart.md)
    python experiments/quickstart.py --quick    # smoke test, tiny model, seconds

What it does, end to end (everything is seeded and deterministic):

1. Builds the ``stdlib_chars`` corpus with :func:`lrjax.data.load` (character windows of
   Python standard-library source; offline, no TensorFlow). The training stream is split by
   position: the first ``--pretrain-frac`` of it (``train[:60%]``: ``argparse.py`` ... ``enum.py``)
   is the *pretraining slice*, the rest (``train[60%:]``: ``fractions.py`` ... ``locale.py``) the
   *fine-tuning slice*. In each slice every 10th window is held out for evaluation.
2. Pretrains :class:`lrjax.models.CharTransformer` on the pretraining slice (full training,
   ``optax.adamw``, jitted step).
3. From that checkpoint, fine-tunes on the fine-tuning slice with

   * **full**: all parameters, ``optax.adamw``;
   * **LoRA** r=8 (alpha 16) on the attention ``q,k,v,o`` and MLP ``fc1,fc2`` kernels, trained
     through :func:`lrjax.factored` (``x W + s (x A) B``, ``W + sAB`` never formed);
   * **DoRA** r=8 on the same kernels, also through :func:`lrjax.factored`;
   * **LoRA-GA** r=8: LoRA initialized from the SVD of the mean gradient of ``--ga-batches``
     fine-tuning batches (:func:`lrjax.reparam.estimate_grads` + :class:`lrjax.LoRAGA`, one
     ``lax.scan``), the base rewritten to ``W - s A0 B0`` so the model starts unchanged;
   * **NOLA** r=8: only ``2 k`` coefficients per kernel train (``--nola-k`` bases per factor,
     regenerated from a stored seed every step, never stored; :class:`lrjax.NOLA`);
   * **GaLore** rank 32: all parameters trained, Adam's moments kept in a rank-32 projection of
     each targeted kernel's gradient (``lrjax.optim.galore``, warm-started subspace refresh);
   * **EGGROLL** (:mod:`lrjax.es`, no backprop at all): the same kernels as LoRA/DoRA trained
     directly by low-rank evolution strategies (rank-4 perturbations, population 32, antithetic,
     centered ranks, Adam on the ES gradient); every member's forward runs the unmodified model
     through :func:`lrjax.es.perturbed_call`. Each generation evaluates all members on one shared
     batch of ``--es-batch`` sequences, so a "step" is a generation of ``--es-population``
     forward passes. Expect a much smaller improvement than backprop's in this budget: ES needs
     far more evaluations per unit of progress; the row shows what it costs and what it gets;
   * two combinations: **GaLore over LoRA factors** (Adam's moments of each ``A``/``B`` kept in
     a rank-4 projection) and **EGGROLL over LoRA adapters only** (the factors are the ES
     parameters; the pretrained base is a constant, never perturbed nor updated -- checked
     bitwise).

   Embeddings, LayerNorms, biases and the output head stay frozen for LoRA/DoRA/EGGROLL.
4. Prints a markdown table (trainable parameters, median step time after warm-up, held-out
   loss before/after on the fine-tuning slice, and on the pretraining slice after, i.e.
   forgetting), checks that the merged LoRA/DoRA weights (``rp.merge``) give the same eval loss
   as the factored path, and writes ``<out>/quickstart.json`` and ``<out>/quickstart_loss.png``.

Step times are wall-clock medians of ``jit`` step calls with ``block_until_ready`` (the first
``--warmup`` steps, which include compilation, are excluded); they depend on the machine and on
whatever else runs on it. On a model this narrow (d_model 128, 2048 tokens per step) a LoRA step
is *not* cheaper than a full fine-tuning step on a CPU: it does less work (XLA cost analysis
4.37 vs 5.92 GFLOP) but its rank-8 products run far below the dense matmuls' efficiency. ``experiments/bench_lora.py`` measures where the time goes.
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
from flax import nnx
from tqdm.auto import tqdm

import lrjax
from lrjax.benchmark import device_info
from lrjax import data
from lrjax.models import ADAPTER_TARGETS, CharTransformer, apply_fn, loss_fn
from lrjax.reparam import FactoredStats

METHODS = ("full", "lora", "dora", "lora_ga", "nola", "galore", "eggroll", "galore_lora", "eggroll_lora")
ADAPTERS = ("lora", "dora", "lora_ga", "nola", "galore_lora")  # trained by backprop through lrjax.factored
LABELS = {"full": "full fine-tuning", "lora": "LoRA r={r} (factored)", "dora": "DoRA r={r} (factored)",
          "lora_ga": "LoRA-GA r={r} (init from {gb} gradient batches, factored)",
          "nola": "NOLA r={r}, k={nk} bases per factor (seed-regenerated, factored)",
          "galore": "GaLore r={gr} (all params, projected Adam)",
          "eggroll": "EGGROLL r={er}, N={en} (ES, no backprop; step = 1 generation)",
          "galore_lora": "GaLore r={hr} over LoRA r={r} factors (projected Adam on A, B)",
          "eggroll_lora": "EGGROLL r={er}, N={en} over LoRA r={r} adapters only (base never perturbed)"}


# ----------------------------------------------------------------------------- config
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke-test settings: small corpus config, tiny model, a few steps")
    p.add_argument("--out", default="runs/quickstart", help="output directory for JSON and PNG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=None, help="default 200 (quick: 15)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per method, default 100 (quick: 8)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step, default 16 (quick: 8)")
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--full-lr", type=float, default=1e-3, help="full fine-tuning peak learning rate")
    p.add_argument("--adapter-lr", type=float, default=1e-2, help="LoRA/DoRA peak learning rate")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--ga-batches", type=int, default=None, help="LoRA-GA gradient batches, default 8 (quick: 2)")
    p.add_argument("--nola-k", type=int, default=None, help="NOLA bases per factor, default 256 (quick: 16)")
    p.add_argument("--d-model", type=int, default=None, help="default 128 (quick: 32)")
    p.add_argument("--n-layers", type=int, default=None, help="default 2 (quick: 1)")
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=None, help="default 512 (quick: 64)")
    p.add_argument("--pretrain-frac", type=int, default=60,
                   help="percent of the train split used for pretraining; the rest is fine-tuned on")
    p.add_argument("--eval-every", type=int, default=None, help="default 20 (quick: 4)")
    p.add_argument("--eval-windows", type=int, default=64,
                   help="held-out windows per eval set (cap; fixed subset)")
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the step-time median")
    p.add_argument("--es-generations", type=int, default=None,
                   help="EGGROLL generations, default --steps")
    p.add_argument("--es-population", type=int, default=None, help="EGGROLL population, default 32 (quick: 8)")
    p.add_argument("--es-batch", type=int, default=None,
                   help="sequences per generation shared by all members, default 4 (quick: 2)")
    p.add_argument("--es-rank", type=int, default=4)
    p.add_argument("--es-sigma", type=float, default=0.01)
    p.add_argument("--es-lr", type=float, default=1e-3, help="EGGROLL peak Adam learning rate")
    p.add_argument("--no-progress", action="store_true", help="disable tqdm bars")
    a = p.parse_args(argv)
    dflt = dict(pretrain_steps=(15, 200), steps=(8, 100), batch=(8, 16), d_model=(32, 128),
                n_layers=(1, 2), d_ff=(64, 512), eval_every=(4, 20), es_population=(8, 32),
                es_batch=(2, 4), ga_batches=(2, 8), nola_k=(16, 256))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    if a.es_generations is None:
        a.es_generations = a.steps
    if a.quick:
        a.eval_windows = min(a.eval_windows, 32)
        a.warmup = min(a.warmup, 2)
    return a


# ------------------------------------------------------------------------------- data
def load_corpus(args):
    """Pretrain / fine-tune slices of the stdlib char corpus, each split 9:1 into train/held-out."""
    kw = {"config": "small"} if args.quick else {}
    f = args.pretrain_frac
    slices = {"pretrain": f"train[:{f}%]", "finetune": f"train[{f}%:]"}
    out = {}
    for name, split in slices.items():
        toks = data.as_arrays(data.load("stdlib_chars", split=split, **kw), keys="tokens")["tokens"]
        held = np.arange(len(toks)) % 10 == 9  # every 10th window is held out
        ev = toks[held]
        out[name] = {"split": split, "train": {"tokens": toks[~held]}, "eval": jnp.asarray(ev),
                     "n_train_windows": int((~held).sum()), "n_eval_windows": int(len(ev))}
    # both eval sets get the same number of windows, so one compiled eval serves both
    n_eval = min(args.eval_windows, *(len(out[k]["eval"]) for k in slices))
    for k in slices:
        out[k]["eval"] = out[k]["eval"][:n_eval]
        out[k]["n_eval_windows"] = n_eval
    out["seq_len"] = int(out["pretrain"]["train"]["tokens"].shape[1] - 1)
    return out


def batch_iter(arrays, args, num_steps, seed, batch=None):
    for b in data.batches(arrays, batch or args.batch, seed=seed, num_steps=num_steps):
        yield jnp.asarray(b["tokens"])


# --------------------------------------------------------------------------- training
def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def lr_schedule(peak, steps):
    """Linear warm-up over the first 10% of steps, then cosine decay to ``peak / 10``."""
    sched = optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 10),
                                               max(steps, steps // 10 + 2), peak * 0.1)
    return lambda i: np.float32(sched(i))


#: Adam moments with global-norm clipping; the learning rate is a step argument so that one
#: compiled step serves every schedule (pretraining and full fine-tuning share it).
OPT = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())


def make_fns(forward, opt=OPT):
    """Jitted ``step(tr, opt_state, fr, tok, lr)``, ``evaluate(tr, fr, tok)`` and the optimizer
    for ``forward(trainable, frozen, ids) -> logits``; ``tok`` holds ``seq_len + 1`` ids."""
    def loss_of(tr, fr, tok):
        return loss_fn(forward(tr, fr, tok[:, :-1]), tok[:, 1:])

    @jax.jit
    def step(tr, opt_state, fr, tok, lr):
        loss, grads = jax.value_and_grad(loss_of)(tr, fr, tok)
        updates, opt_state = opt.update(grads, opt_state, tr)
        updates = jax.tree.map(lambda u: -lr * u, updates)
        return optax.apply_updates(tr, updates), opt_state, loss

    return step, jax.jit(loss_of), opt


def _loop(name, batches_, one_step, run_eval, args, progress):
    """The timed loop shared by every method: ``one_step(i, tok) -> loss`` (blocking) and
    ``run_eval() -> {set: loss}`` every ``--eval-every`` steps. Returns the history."""
    hist = {"step": [], "train_loss": [], "step_ms": [], "eval_step": [0], "eval": []}
    t0 = time.perf_counter()
    hist["eval"].append(run_eval())
    batches_ = list(batches_)
    bar = tqdm(batches_, desc=f"{name:8s}", leave=False, disable=not progress, file=sys.stdout,
               dynamic_ncols=True)
    for i, tok in enumerate(bar, 1):
        ts = time.perf_counter()
        loss = one_step(i, tok)
        hist["step_ms"].append((time.perf_counter() - ts) * 1e3)
        hist["step"].append(i)
        hist["train_loss"].append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        if i % args.eval_every == 0 or i == len(batches_):
            hist["eval_step"].append(i)
            hist["eval"].append(run_eval())
    bar.close()
    hist["wall_s"] = time.perf_counter() - t0
    timed = hist["step_ms"][args.warmup:] or hist["step_ms"]
    hist["median_step_ms"] = float(np.median(timed))
    return hist


def train(name, fns, trainable, frozen, batches_, eval_sets, lr, args, progress):
    """Jitted training loop. Returns ``(trainable, history)``: per-step train loss and wall
    time (``block_until_ready``), and held-out losses every ``--eval-every`` steps."""
    step, evaluate, _ = fns
    box = {"tr": trainable, "opt": fns[2].init(trainable)}

    def one_step(i, tok):
        box["tr"], box["opt"], loss = step(box["tr"], box["opt"], frozen, tok, lr(i - 1))
        return float(jax.block_until_ready(loss))

    hist = _loop(name, batches_, one_step,
                 lambda: {k: float(evaluate(box["tr"], frozen, v)) for k, v in eval_sets.items()}, args, progress)
    return box["tr"], hist


def train_es(params, nll, targets, batches_, eval_sets, args, progress, name="eggroll"):
    """Train the leaves ``targets`` of ``params`` with EGGROLL only (no gradients); ``nll(params, tok)``.

    Returns ``(params, history, info)`` with the history keys of :func:`train`; ``step_ms`` is
    the wall time of one generation (all members' forwards, the update and Adam) and
    ``train_loss`` the mean loss of the generation's members on its batch."""
    from lrjax.es import Eggroll

    targets = set(targets)
    rest = set(lrjax.tree.paths(params)) - targets
    es = Eggroll(args.es_population, rank=args.es_rank, sigma=args.es_sigma, shaping="centered_rank",
                 maximize=False, targets=sorted(targets), frozen=(lambda p, _: p in rest) if rest else None)
    n = args.es_generations
    opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, args.es_lr, max(1, n // 10),
                                                         max(n, n // 10 + 2), args.es_lr * 0.1))

    @jax.jit
    def apply_update(p, o, g):
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o

    evaluate = jax.jit(nll)
    st, opt_state, stats = es.init(jax.random.key(args.seed + 2)), opt.init(params), FactoredStats()
    box = {"p": params, "st": st, "opt": opt_state}

    def one_step(i, tok):
        g, box["st"], info = es.estimate(box["st"], box["p"], nll, tok, stats=stats if i == 1 else None)
        box["p"], box["opt"] = apply_update(box["p"], box["opt"], g)
        return float(jax.block_until_ready(jnp.mean(info.fitness)))

    hist = _loop(name, batches_, one_step,
                 lambda: {k: float(evaluate(box["p"], v)) for k, v in eval_sets.items()}, args, progress)
    params = box["p"]
    info = {"targets": len(targets), "trainable_params": int(sum(np.prod(v.shape) for p, v in
                                                              lrjax.tree.flatten(params).items() if p in targets)),
            "factored": int(stats.factored), "fallback": list(stats.fallback),
            "member_forwards_per_generation": args.es_population,
            "sequences_per_generation": args.es_batch}
    return params, hist, info


# -------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    print(f"device: {dev.platform} / {dev.device_kind} ({os.cpu_count()} CPUs), jax {jax.__version__}")

    corpus = load_corpus(args)
    seq_len = corpus["seq_len"]
    for k in ("pretrain", "finetune"):
        c = corpus[k]
        print(f"{k:9s} slice {c['split']!r}: {c['n_train_windows']} train windows, "
              f"{c['n_eval_windows']} held-out windows x {seq_len + 1} chars")
    evals = {"finetune": corpus["finetune"]["eval"], "pretrain": corpus["pretrain"]["eval"]}

    model = CharTransformer(data.VOCAB_SIZE, d_model=args.d_model, n_layers=args.n_layers,
                            n_heads=args.n_heads, d_ff=args.d_ff, max_len=seq_len,
                            rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)
    apply = apply_fn(graphdef)
    n_total = count(state)
    print(f"CharTransformer: d_model={args.d_model} layers={args.n_layers} heads={args.n_heads} "
          f"d_ff={args.d_ff}: {n_total:,} parameters")

    # ---- 1. pretraining (full training) on the pretraining slice
    full_fwd = lambda tr, fr, tok: apply(tr, tok)  # noqa: E731
    full_fns = make_fns(full_fwd)  # shared by pretraining, full fine-tuning and the merge check
    pre_batches = batch_iter(corpus["pretrain"]["train"], args, args.pretrain_steps, args.seed)
    state, pre_hist = train("pretrain", full_fns, state, None, pre_batches, evals,
                            lr_schedule(args.pretrain_lr, args.pretrain_steps), args, progress)
    print(f"pretrain: {args.pretrain_steps} steps in {pre_hist['wall_s']:.1f}s, held-out loss "
          f"pretrain slice {pre_hist['eval'][-1]['pretrain']:.3f}, "
          f"fine-tune slice {pre_hist['eval'][-1]['finetune']:.3f}")
    pretrained = state

    # ---- 2. fine-tuning on the other slice, three ways
    results, checks, stats_out = {}, {}, {}
    key = jax.random.key(args.seed + 1)
    for method in METHODS:
        if method in ("eggroll", "eggroll_lora"):
            es_batches = batch_iter(corpus["finetune"]["train"], args, args.es_generations, args.seed + 100,
                                    batch=args.es_batch)
            if method == "eggroll":  # the pretrained kernels themselves
                es_params, es_targets = pretrained, lrjax.tree.select(pretrained, ADAPTER_TARGETS)
                nll = lambda p, tok: loss_fn(apply(p, tok[:, :-1]), tok[:, 1:])  # noqa: E731
            else:  # only the LoRA factors: the base is a closed-over constant, never perturbed or updated
                rp = lrjax.LoRA(rank=args.rank, alpha=args.alpha, targets=ADAPTER_TARGETS)
                base, es_params = rp.init(key, pretrained)
                es_targets = lrjax.tree.paths(es_params)
                g = lrjax.factored(apply, rp, mode="factored")  # plain dots, which EGGROLL's interpreter follows
                nll = lambda ad, tok, g=g, base=base: loss_fn(g(base, ad, tok[:, :-1]), tok[:, 1:])  # noqa: E731
            trained, hist, es_info = train_es(es_params, nll, es_targets, es_batches, evals, args, progress,
                                              name=method)
            stats_out[method] = es_info
            n_train = es_info["trainable_params"]
            if method == "eggroll_lora":
                same = all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(base),
                                                                       jax.tree.leaves(pretrained)))
                checks[method] = {"base_unchanged": same}
                print(f"eggroll_lora: EGGROLL on {len(rp.split(trained)[0])} LoRA adapters only; base weights "
                      f"bitwise unchanged: {same}")
            print(f"{method}: lrjax.es.perturbed_call per member forward: {es_info['factored']} kernel products "
                  f"factored ({es_info['targets']} perturbed leaves), fallbacks: {es_info['fallback'] or 'none'}; "
                  f"{args.es_generations} generations x {args.es_population} members x {args.es_batch} sequences")
        ft_batches = batch_iter(corpus["finetune"]["train"], args, args.steps, args.seed + 100)
        if method == "full":
            trainable, frozen, fns = pretrained, None, full_fns
            lr = lr_schedule(args.full_lr, args.steps)
            n_train = n_total
        elif method == "galore":
            # Adam's moments live in a rank-gr projection of each targeted kernel's gradient
            gopt = optax.chain(optax.clip_by_global_norm(1.0),
                               lrjax.optim.galore(optax.scale_by_adam(), rank=4 * args.rank, refresh="subspace",
                                                  update_proj_gap=max(1, args.steps // 4),
                                                  targets=ADAPTER_TARGETS))
            trainable, frozen, fns = pretrained, None, make_fns(full_fwd, gopt)
            lr = lr_schedule(args.full_lr, args.steps)
            n_train = n_total
        elif method in ADAPTERS:
            kw = dict(rank=args.rank, alpha=args.alpha, targets=ADAPTER_TARGETS)
            rp = {"dora": lambda: lrjax.DoRA(**kw), "lora_ga": lambda: lrjax.LoRAGA(**kw),
                  "nola": lambda: lrjax.NOLA(num_basis=args.nola_k, **kw)}.get(method, lambda: lrjax.LoRA(**kw))()
            init_kw = {}
            if rp.needs_grads:  # LoRA-GA: mean gradient of the targeted kernels on a few fine-tuning batches
                gb = jnp.stack(list(batch_iter(corpus["finetune"]["train"], args, args.ga_batches, args.seed + 50)))
                init_kw["grads"] = lrjax.reparam.estimate_grads(
                    lambda p, tok: loss_fn(apply(p, tok[:, :-1]), tok[:, 1:]), pretrained, gb, rp.targets, stacked=True)
            base, adapters = rp.init(key, pretrained, **init_kw)  # LoRA-GA: base = W - s A0 B0
            g = lrjax.factored(apply, rp)
            # how lrjax.factored handled the kernel uses of one forward pass
            st = FactoredStats()
            jax.eval_shape(lrjax.factored(apply, rp, stats=st), base, adapters, evals["finetune"][:, :-1])
            stats_out[method] = {"adapted_leaves": len(adapters), "factored": int(st.factored),
                                 "fallback": list(st.fallback)}
            trainable, fr = rp.split(adapters)  # NOLA: the seeds stay out of grad and Adam
            frozen = (base, fr)
            opt = OPT
            if method == "galore_lora":  # Adam's moments of each [M, r] / [r, N] factor in a rank-r/2 projection
                opt = optax.chain(optax.clip_by_global_norm(1.0),
                                  lrjax.optim.galore(optax.scale_by_adam(), rank=max(1, args.rank // 2),
                                                     refresh="subspace", update_proj_gap=max(1, args.steps // 4),
                                                     targets=r"(a|b)"))
            fns = make_fns(lambda tr, fz, tok, g=g, rp=rp: g(fz[0], rp.join(tr, fz[1]), tok), opt)
            lr = lr_schedule(args.adapter_lr, args.steps)
            n_train = rp.num_params(adapters)
        if method not in ("eggroll", "eggroll_lora"):
            trainable, hist = train(method, fns, trainable, frozen, ft_batches, evals, lr, args, progress)
        if method in ADAPTERS:
            # merged dense weights must reproduce the factored path's eval loss
            merged = rp.merge(base, rp.join(trainable, fr))
            l_fact = hist["eval"][-1]["finetune"]
            l_merged = float(full_fns[1](merged, None, evals["finetune"]))
            checks[method] = {"factored_eval_loss": l_fact, "merged_eval_loss": l_merged,
                              "abs_diff": abs(l_fact - l_merged)}
            print(f"{method}: lrjax.factored per forward: {st.factored} kernel products factored "
                  f"({len(adapters)} adapted kernels), fallbacks: {st.fallback or 'none'}; "
                  f"eval loss merged {l_merged:.6f} vs factored {l_fact:.6f} "
                  f"(|diff| {abs(l_fact - l_merged):.1e})")
        results[method] = {
            "label": LABELS[method].format(r=args.rank, gr=4 * args.rank, er=args.es_rank,
                                           en=args.es_population, hr=max(1, args.rank // 2),
                                           gb=args.ga_batches, nk=args.nola_k),
            "trainable_params": n_train,
            "trainable_pct": 100.0 * n_train / n_total,
            "median_step_ms": hist["median_step_ms"],
            "initial_eval_loss": hist["eval"][0]["finetune"],
            "final_eval_loss": hist["eval"][-1]["finetune"],
            "final_pretrain_eval_loss": hist["eval"][-1]["pretrain"],
            "train_wall_s": hist["wall_s"],
            "history": hist,
        }

    # ---- 3. report
    header = (f"\nFine-tuning on {corpus['finetune']['split']} after pretraining on "
              f"{corpus['pretrain']['split']} of stdlib_chars ({args.steps} steps, batch "
              f"{args.batch}x{seq_len}; EGGROLL: {args.es_generations} generations of "
              f"{args.es_population} members on {args.es_batch}x{seq_len}; device "
              f"{dev.platform}/{dev.device_kind}, {os.cpu_count()} CPUs)\n")
    rows = ["| method | trainable params | % of total | median step (ms) | eval loss before | "
            "eval loss after | pretrain-slice loss after |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        r = results[m]
        rows.append(f"| {r['label']} | {r['trainable_params']:,} | {r['trainable_pct']:.2f}% | "
                    f"{r['median_step_ms']:.1f} | {r['initial_eval_loss']:.3f} | "
                    f"{r['final_eval_loss']:.3f} | {r['final_pretrain_eval_loss']:.3f} |")
    table = "\n".join(rows)
    print(header + table)
    print(f"(eval loss: mean next-char cross-entropy in nats on {corpus['finetune']['n_eval_windows']} "
          "held-out windows of the fine-tuning slice; the last column is on held-out windows of "
          "the pretraining slice)")

    total_s = time.perf_counter() - t_start
    out = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))),
        "device": device_info(),
        "config": vars(args),
        "corpus": {k: {kk: corpus[k][kk] for kk in ("split", "n_train_windows", "n_eval_windows")}
                   for k in ("pretrain", "finetune")} | {"seq_len": seq_len},
        "model": {"total_params": n_total, "targets": list(ADAPTER_TARGETS)},
        "pretrain": pre_hist,
        "methods": results,
        "merge_check": checks,
        "factored_stats": stats_out,
        "table_markdown": table,
        "total_time_s": total_s,
    }
    with open(os.path.join(args.out, "quickstart.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(out, os.path.join(args.out, "quickstart_loss.png"))
    print(f"wrote {os.path.join(args.out, 'quickstart.json')} and "
          f"{os.path.join(args.out, 'quickstart_loss.png')} ({total_s:.1f}s total)")
    return out


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(y, k=10):
        y = np.asarray(y, dtype=float)
        if len(y) < k:
            return y
        return np.convolve(y, np.ones(k) / k, mode="valid")

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    pre = out["pretrain"]
    ax0.plot(pre["step"], pre["train_loss"], color="0.7", lw=0.8, label="train (per step)")
    ax0.plot(pre["eval_step"], [e["pretrain"] for e in pre["eval"]], "o-", color="k", ms=3,
             label="held-out, pretrain slice")
    ax0.plot(pre["eval_step"], [e["finetune"] for e in pre["eval"]], "s--", color="tab:purple",
             ms=3, label="held-out, fine-tune slice")
    ax0.set(title="pretraining (full)", xlabel="step", ylabel="cross-entropy (nats/char)")
    ax0.legend(fontsize=8)
    colors = {"full": "tab:blue", "lora": "tab:orange", "dora": "tab:green", "galore": "tab:red",
              "eggroll": "tab:brown", "galore_lora": "tab:pink", "eggroll_lora": "tab:olive",
              "lora_ga": "tab:cyan", "nola": "tab:gray"}
    for m, r in out["methods"].items():
        h = r["history"]
        k = min(10, max(1, len(h["train_loss"]) // 5))
        ax1.plot(h["step"][k - 1:], smooth(h["train_loss"], k), color=colors[m], alpha=0.35, lw=1)
        ax1.plot(h["eval_step"], [e["finetune"] for e in h["eval"]], "o-", color=colors[m], ms=3,
                 label=f"{r['label']} (held-out)")
    ax1.set(title="fine-tuning on the other slice (faint: smoothed train loss)",
            xlabel="step (EGGROLL: generation)",
            ylabel="cross-entropy (nats/char)")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
