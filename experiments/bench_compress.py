"""Post-training low-rank compression study (``lrjax.compress``): accuracy / perplexity vs bytes.

    python experiments/bench_compress.py            # a few minutes on 2 CPU cores
    python experiments/bench_compress.py --quick    # smoke test, seconds

Two trained models are compressed with every method of :mod:`lrjax.compress` at several budgets
(PELA's compression ratio ``c``; the WeLore runs target the same parameter reduction ``1 - 1/c``):

1. **digits MLP** (``lrjax.data.load('digits')``, 8x8 images, 64-256-256-10 tanh MLP (quick: 64-64-64-10) trained here
   with Adam); the three kernels are compressed (the 256x10 output layer too).
2. **char transformer** (:class:`lrjax.models.CharTransformer`, the quickstart model, pretrained
   here on the first 60% of ``stdlib_chars``), the attention ``q,k,v,o`` and MLP kernels
   (``lrjax.models.ADAPTER_TARGETS``); the metric is held-out perplexity.

Methods (rows): ``svd`` (truncated SVD, PELA's rank rule), ``randomized`` (randomized SVD, same
ranks), ``whitened`` (Palu's whitened SVD, calibration activations collected with
:func:`lrjax.compress.collect_activations` on training inputs, same ranks), ``welore`` (one global
tau, non-uniform ranks), ``uniform`` (the same fraction of rank cut everywhere, same parameter
reduction as WeLore). Recovery rows (after ``--recover-steps`` of training, factors only, the rest
frozen): ``svd+ft`` (cross-entropy only), ``pela`` (PELA: SVD init + CE + per-layer feature MSE to
the frozen teacher with the paper code's defaults, kd_alpha 1; the features are the hidden layers of
the MLP and every block's output of the transformer), ``welore+ft`` (WeLore's LRC-only
fine-tuning with CE). Other structures, on the digits MLP's two hidden kernels (the 10-output layer
stays dense) and on every adapter kernel of the transformer (``--quick``: its MLP kernels only): ``dsformer`` (dense basis ``k`` x
coefficients with ``--ds-s`` nonzeros per output, alternating-least-squares init) and
``dsformer+stf`` (then trained with the straight-through factorizer, task loss); ``pq`` (product
quantization of size-``--vq-m`` subvectors, ``--vq-k`` codewords), ``lr2vq`` (PCA codes of
dimension ``d``, then k-means), ``lr2vq+lr`` (the low-rank stage: ``P`` and the codes trained with
the task loss for ``--recover-steps``, then k-means) and ``lr2vq+dkm`` (then DKM fine-tuning of
``P``, the codes and the codebook through soft assignments, ``--dkm-temp``, ``--dkm-iters``, for
``--recover-steps``; hard assignment at the end; same bytes as ``lr2vq+lr``).
Bytes are those a deployed model stores (float32): the factors plus every
untouched leaf.

Timing: each rule's compression of the transformer (``compress`` end to end: SVDs in jitted
calls, rank selection on the host), ``--time-repeats`` calls after a warm-up call that includes
compilation, ``block_until_ready``, medians (``lrjax.benchmark.time_round_robin``).

Writes ``<out>/bench_compress.json``, ``<out>/bench_compress.md`` and ``<out>/bench_compress.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lrjax
import lrjax.compress as C
from lrjax.benchmark import blocking, device_info, summarize, time_round_robin
from lrjax.compress import dsformer, lr2vq, pela, welore

LOWRANK = ("svd", "randomized", "whitened", "welore", "uniform")
RECOVER = ("svd+ft", "pela", "welore+ft")
OTHER = ("dsformer", "dsformer+stf", "pq", "lr2vq", "lr2vq+lr", "lr2vq+dkm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-test settings")
    p.add_argument("--out", default="runs/bench_compress")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits-steps", type=int, default=None, help="MLP training steps, default 400 (quick: 40)")
    p.add_argument("--lm-steps", type=int, default=None, help="transformer pretraining steps, default 1000 (quick: 6)")
    p.add_argument("--recover-steps", type=int, default=None, help="recovery steps, default 100 (quick: 3)")
    p.add_argument("--recover-lr", type=float, default=3e-3)
    p.add_argument("--ds-s", type=int, default=4, help="DSFormer nonzeros per output column")
    p.add_argument("--vq-m", type=int, default=8, help="LR^2VQ subvector size")
    p.add_argument("--vq-k", type=int, default=16, help="LR^2VQ / PQ codewords")
    p.add_argument("--dkm-temp", type=float, default=0.1,
                   help="DKM temperature, relative to the mean squared code-to-centroid distance")
    p.add_argument("--dkm-iters", type=int, default=3, help="DKM soft k-means rounds per forward")
    p.add_argument("--time-repeats", type=int, default=None, help="default 5 (quick: 1)")
    p.add_argument("--no-progress", action="store_true")
    for name, what in (("ratios", "digits compression factors c"), ("lm-ratios", "transformer compression factors c"),
                       ("ds-k", "digits DSFormer basis sizes"), ("lm-ds-k", "transformer DSFormer basis sizes"),
                       ("vq-d", "LR^2VQ code dimensions")):  # overrides for reduced named runs
        p.add_argument(f"--{name}", type=float if "ratios" in name else int, nargs="+", default=None,
                       help=f"{what} (default: the built-in list)")
    a = p.parse_args(argv)
    given = {k: getattr(a, k) for k in ("ratios", "lm_ratios", "ds_k", "lm_ds_k", "vq_d")}
    for k, (q, full) in dict(digits_steps=(40, 400), lm_steps=(6, 1000), recover_steps=(3, 100),
                             time_repeats=(1, 5)).items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    a.ratios = [3.0] if a.quick else [1.5, 2.0, 3.0, 4.0, 6.0, 8.0]
    a.lm_ratios = [2.0] if a.quick else [1.5, 2.0, 3.0, 4.0]
    a.ds_k = [8] if a.quick else [8, 16, 32, 48]
    a.lm_ds_k = [8] if a.quick else [16, 32, 64]
    a.vq_d = [4] if a.quick else [1, 2, 4, 6, 8]
    for k, v in given.items():
        if v is not None:
            setattr(a, k, list(v))
    return a


# ----------------------------------------------------------------------------- methods
def compress_all(params, targets, c, calib, key):
    """{method: Compressed} at compression ratio ``c`` (WeLore/uniform: parameter reduction 1 - 1/c)."""
    out = {"svd": C.compress(params, targets, ratio=c),
           "randomized": C.compress(params, targets, ratio=c, method="randomized", key=key),
           "whitened": C.compress(params, targets, ratio=c, method="whitened", calib=calib)}
    try:
        out["welore"] = welore.compress(params, 1 - 1 / c, targets)
        out["uniform"] = welore.uniform(params, 1 - 1 / c, targets)
    except ValueError as e:  # a budget WeLore cannot reach on these shapes
        print(f"  welore/uniform skipped at c={c}: {e}")
    return out


def continue_dense(params, loss_fn, data_iter, steps, lr):
    """The fair ceiling for every recovery row: the *uncompressed* params trained the same ``steps`` with the
    same optimizer and learning rate on ``loss_fn(params, batch)`` (all weights trainable)."""
    opt = optax.adam(lr)
    st = opt.init(params)

    @jax.jit
    def step(p, st, batch):
        g = jax.grad(lambda p: loss_fn(p, batch))(p)
        u, st = opt.update(g, st, p)
        return optax.apply_updates(p, u), st

    for _ in range(steps):
        params, st = step(params, st, next(data_iter))
    return params


def recover(comp, loss_fn, data_iter, steps, lr):
    """Train ``comp.factors`` only (Adam) on ``loss_fn(base, factors, batch)``; returns the new factors."""
    opt = optax.adam(lr)
    f = comp.factors
    st = opt.init(f)

    @jax.jit
    def step(base, f, st, batch):
        g = jax.grad(lambda f: loss_fn(base, f, batch))(f)
        u, st = opt.update(g, st, f)
        return optax.apply_updates(f, u), st

    for _ in range(steps):
        f, st = step(comp.base, f, st, next(data_iter))
    return f


# ------------------------------------------------------------------------------ digits
def digits_study(args):
    from lrjax import data
    tr = data.as_arrays(data.load("digits", split="train"))
    te = data.as_arrays(data.load("digits", split="test"))
    xtr = jnp.asarray(tr["image"].reshape(-1, 64) / 16.0, jnp.float32)
    ytr = jnp.asarray(tr["label"], jnp.int32)
    xte = jnp.asarray(te["image"].reshape(-1, 64) / 16.0, jnp.float32)
    yte = jnp.asarray(te["label"], jnp.int32)
    k = jax.random.split(jax.random.key(args.seed), 3)
    dims = [64, 64, 64, 10] if args.quick else [64, 256, 256, 10]
    names = ["fc1", "fc2", "out"]
    params = {n: {"kernel": jax.random.normal(kk, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
              for n, kk, a, b in zip(names, k, dims[:-1], dims[1:])}
    targets = tuple(f"{n}/kernel" for n in names)

    def forward(p, x):
        feats = []
        h = x
        for n in names[:-1]:
            h = jnp.tanh(h @ p[n]["kernel"] + p[n]["bias"])
            feats.append(h)
        return h @ p["out"]["kernel"] + p["out"]["bias"], feats

    def ce(logits, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    opt = optax.adam(3e-3)
    st = opt.init(params)

    @jax.jit
    def train_step(p, st, x, y):
        g = jax.grad(lambda p: ce(forward(p, x)[0], y))(p)
        u, st = opt.update(g, st, p)
        return optax.apply_updates(p, u), st

    rng = np.random.default_rng(args.seed)

    def batches():
        while True:
            idx = rng.choice(xtr.shape[0], 128, replace=False)
            yield xtr[idx], ytr[idx]

    it = batches()
    for _ in range(args.digits_steps):
        params, st = train_step(params, st, *next(it))
    acc = jax.jit(lambda p: jnp.mean(jnp.argmax(forward(p, xte)[0], -1) == yte))
    teacher_acc = float(acc(params))
    total = C.tree_bytes(params)
    calib = C.collect_activations(lambda p, x: forward(p, x)[0], params, targets, xtr)
    teacher_ft = float(acc(continue_dense(params, lambda p, b: ce(forward(p, b[0])[0], b[1]), it,
                                          args.recover_steps, args.recover_lr)))

    def fact_acc(comp, f):
        gg = lrjax.factored(forward, comp.rp)
        return float(jnp.mean(jnp.argmax(gg(comp.base, f, xte)[0], -1) == yte))

    rows = []
    for c in args.ratios:
        comps = compress_all(params, targets, c, calib, jax.random.key(args.seed + 1))
        for m, comp in comps.items():
            rows.append({"model": "digits", "method": m, "c": c, "bytes": comp.report.model_bytes_after,
                         "metric": float(acc(comp.materialize())), "rank_ratio": comp.report.ratio,
                         "ranks": {r.path: r.rank for r in comp.report.layers}})
        # recoveries
        variants = {"svd+ft": (comps["svd"], "ce"), "pela": (pela.compress(params, c, targets, skip=()), "pela")}
        if "welore" in comps:
            variants["welore+ft"] = (comps["welore"], "ce")
        for m, (comp, kind) in variants.items():
            gg = lrjax.factored(forward, comp.rp)

            def loss(base, f, batch, gg=gg, kind=kind):
                x, y = batch
                logits, feats = gg(base, f, x)
                l = ce(logits, y)
                if kind == "pela":
                    t_logits, t_feats = forward(params, x)
                    l, _ = pela.distill_loss(l, feats, t_feats, logits, t_logits)
                return l

            f = recover(comp, loss, it, args.recover_steps, args.recover_lr)
            rows.append({"model": "digits", "method": m, "c": c, "bytes": comp.report.model_bytes_after,
                         "metric": fact_acc(comp, f), "before": fact_acc(comp, comp.factors)})
    rows += digits_other(args, params, forward, ce, acc, it, total)
    return {"teacher": teacher_acc, "teacher_ft": teacher_ft, "bytes": total, "metric": "test accuracy", "rows": rows,
            "config": {"dims": dims, "train_steps": args.digits_steps, "optimizer": "adam(3e-3)", "batch": 128}}


def digits_other(args, params, forward, ce, acc, it, total):
    """DSFormer (fc1, fc2; the 10-output layer stays dense) and LR^2VQ / PQ (fc1, fc2)."""
    rows = []
    t = ("fc1/kernel", "fc2/kernel")
    s = args.ds_s
    for kb in args.ds_k:
        comp = dsformer.compress(params, kb, s, t)
        err = {}
        for lay in comp.report.layers:  # weight error against truncated SVD with as many stored values
            w = params[lay.path.split("/")[0]]["kernel"]
            r = dsformer.svd_rank_at_equal_params(lay.m, lay.n, kb, s)
            u, sv, vt = lrjax.linalg.svd(w, r)
            err[lay.path] = {"dsformer": lay.rel_error, "svd_rank": r,
                             "svd": float(jnp.linalg.norm(w - (u * sv) @ vt) / jnp.linalg.norm(w))}
        rows.append({"model": "digits", "method": "dsformer", "setting": f"k={kb}, s={s}",
                     "bytes": comp.report.model_bytes_after, "metric": float(acc(comp.materialize())),
                     "rel_error": err})
        gg = lrjax.factored(forward, comp.rp)

        def loss(base, f, batch, gg=gg):
            return ce(gg(base, dsformer.ste_factors(f, s), batch[0])[0], batch[1])

        f = recover(comp, loss, it, args.recover_steps, args.recover_lr)
        f = {p: {**v, "b": v["b"] * dsformer.topk_mask(v["b"], s)} for p, v in f.items()}  # hard top-s
        rows.append({"model": "digits", "method": "dsformer+stf", "setting": f"k={kb}, s={s}",
                     "bytes": comp.report.model_bytes_after, "metric": float(acc(comp.rp.materialize(comp.base, f)))})
    def loss_p(p, batch):
        return ce(forward(p, batch[0])[0], batch[1])

    rows += vq_rows(args, "digits", params, t, loss_p, lambda p: float(acc(p)), it, total)
    return rows


def vq_rows(args, model, params, paths, loss_p, metric, it, total, *, smoke=False):
    """PQ and LR^2VQ rows for the kernels at ``paths`` (matrix view ``[M, N]``, subvectors of size
    ``--vq-m`` along ``M``, ``--vq-k`` codewords): ``pq``; ``lr2vq`` (PCA codes, k-means);
    ``lr2vq+lr`` (the low-rank stage: ``P`` and the codes trained with ``loss_p(params, batch)`` for
    ``--recover-steps``, then k-means); ``lr2vq+dkm`` (from there, DKM fine-tuning: ``P``, the codes and
    the codebook trained through DKM's soft assignments for ``--recover-steps``, then the hard
    assignment; same bytes as ``lr2vq+lr``, whose metric is its ``before``). Quick mode runs DKM for
    the first ``d`` only; ``smoke=True`` (the transformer in quick mode) skips the ``pq`` and
    ``lr2vq+dkm`` rows, whose code the digits rows already smoke-test."""
    from lrjax import axes as axes_lib
    from lrjax import tree as tree_lib
    rows = []
    m, k = args.vq_m, args.vq_k
    flat = tree_lib.flatten(params)
    axs = {n: axes_lib.resolve(n, flat[n].shape, None) for n in paths}
    mats = {n: axes_lib.to_matrix(flat[n], axs[n]) for n in paths}
    shapes = {n: mats[n].shape for n in paths}

    def vq_bytes(d, with_p=True):
        out = total
        for n in paths:
            n_sub = int(np.prod(shapes[n])) // m
            out += -int(np.prod(shapes[n])) * 4 + math.ceil(n_sub * math.log2(k) / 8) + 4 * (k * d + (m * d if with_p else 0))
        return out

    def with_kernels(kern):
        return tree_lib.replace(params, {n: axes_lib.from_matrix(kern[n], axs[n], flat[n].shape) for n in kern})

    def codebooks(lr_params, key):
        return {n: lr2vq.kmeans(lr_params[n][1], k, key=jax.random.fold_in(key, i)) for i, n in enumerate(paths)}

    def quantized(lr_params, key):
        cbs = codebooks(lr_params, key)
        return {n: lr2vq.from_subvectors(lr2vq.decode(lr_params[n][0], cbs[n][0][cbs[n][1]]), shapes[n])
                for n in paths}

    key = jax.random.key(args.seed + 3)
    eye = {n: (jnp.eye(m), lr2vq.to_subvectors(mats[n], m)) for n in paths}
    if not smoke:
        rows.append({"model": model, "method": "pq", "setting": f"m={m}, k={k}", "bytes": vq_bytes(m, with_p=False),
                     "metric": metric(with_kernels(quantized(eye, key)))})
    for j, d in enumerate(args.vq_d):
        lrp = {n: lr2vq.lowrank_init(mats[n], m, d) for n in paths}
        rows.append({"model": model, "method": "lr2vq", "setting": f"m={m}, k={k}, d={d}", "bytes": vq_bytes(d),
                     "metric": metric(with_kernels(quantized(lrp, key)))})
        # the low-rank stage: train P and Z end to end, then cluster the codes
        opt = optax.adam(args.recover_lr)
        st = opt.init(lrp)

        def lr_loss(lrp, batch):
            kern = {n: lr2vq.from_subvectors(lr2vq.decode(*lrp[n]), shapes[n]) for n in paths}
            return loss_p(with_kernels(kern), batch)

        @jax.jit
        def step(lrp, st, batch):
            g = jax.grad(lr_loss)(lrp, batch)
            u, st = opt.update(g, st, lrp)
            return optax.apply_updates(lrp, u), st

        for _ in range(args.recover_steps):
            lrp, st = step(lrp, st, next(it))
        lr_metric = metric(with_kernels(quantized(lrp, key)))
        rows.append({"model": model, "method": "lr2vq+lr", "setting": f"m={m}, k={k}, d={d}",
                     "bytes": vq_bytes(d), "metric": lr_metric})
        if smoke or (args.quick and j > 0):
            continue
        # DKM fine-tuning: start from the k-means codebook above; the temperature of each layer is
        # --dkm-temp x the mean squared distance of the codes to their nearest centroid (held fixed)
        cbs = codebooks(lrp, key)
        temps = {}
        for n in paths:
            z, cb = lrp[n][1], cbs[n][0]
            temps[n] = args.dkm_temp * max(float(jnp.mean(jnp.sum((z - cb[cbs[n][1]]) ** 2, 1))), 1e-12)
        dk = {n: (lrp[n][0], lrp[n][1], cbs[n][0]) for n in paths}
        st = opt.init(dk)

        def dkm_kernels(dk):
            return {n: lr2vq.from_subvectors(lr2vq.decode(dk[n][0], lr2vq.dkm(dk[n][1], dk[n][2], temperature=temps[n],
                                                                              iters=args.dkm_iters)[1]), shapes[n])
                    for n in paths}

        @jax.jit
        def dkm_step(dk, st, batch):
            g = jax.grad(lambda dk: loss_p(with_kernels(dkm_kernels(dk)), batch))(dk)
            u, st = opt.update(g, st, dk)
            return optax.apply_updates(dk, u), st

        for _ in range(args.recover_steps):
            dk, st = dkm_step(dk, st, next(it))
        kern = {}
        for n in paths:  # inference: DKM's final centroids, hard nearest-centroid assignment, decode
            cb, _ = lr2vq.dkm(dk[n][1], dk[n][2], temperature=temps[n], iters=args.dkm_iters)
            kern[n] = lr2vq.from_subvectors(lr2vq.decode(dk[n][0], cb[lr2vq.assign(dk[n][1], cb)]), shapes[n])
        rows.append({"model": model, "method": "lr2vq+dkm", "setting": f"m={m}, k={k}, d={d}",
                     "bytes": vq_bytes(d), "metric": metric(with_kernels(kern)), "before": lr_metric})
    return rows


# -------------------------------------------------------------------------- transformer
def lm_study(args):
    from lrjax import data
    from lrjax.models import ADAPTER_TARGETS, CharTransformer, apply_fn, loss_fn
    kw = {"config": "small"} if args.quick else {}
    toks = data.as_arrays(data.load("stdlib_chars", split="train[:60%]", **kw), keys="tokens")["tokens"]
    held = np.arange(len(toks)) % 10 == 9
    train, ev = toks[~held], jnp.asarray(toks[held][:64])
    dm, nl, dff = (32, 1, 64) if args.quick else (128, 2, 512)
    model = CharTransformer(96, d_model=dm, n_layers=nl, n_heads=4, d_ff=dff, max_len=train.shape[1],
                            rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)
    apply = apply_fn(graphdef)

    def apply_feats(s, ids):  # the quickstart forward, also returning every block's output (PELA's features)
        mdl = nnx.merge(graphdef, s)
        h = mdl.tok_embed(ids) + mdl.pos_embed[...][:ids.shape[-1]]
        feats = []
        for blk in mdl.blocks:
            h = blk(h)
            feats.append(h)
        return mdl.head(mdl.ln_f(h)), feats

    def lm_loss(logits, ids):
        return loss_fn(logits[:, :-1], ids[:, 1:])

    opt = optax.adamw(3e-3)
    st = opt.init(state)

    @jax.jit
    def step(s, st, ids):
        g = jax.grad(lambda s: lm_loss(apply(s, ids), ids))(s)
        u, st = opt.update(g, st, s)
        return optax.apply_updates(s, u), st

    def batches(seed):
        for b in data.batches({"tokens": train}, 16, seed=seed, num_steps=10 ** 9):
            yield jnp.asarray(b["tokens"])

    it = batches(args.seed)
    for _ in range(args.lm_steps):
        state, st = step(state, st, next(it))
    ppl = jax.jit(lambda s: jnp.exp(lm_loss(apply(s, ev), ev)))
    teacher = float(ppl(state))
    calib_ids = next(it)
    calib = C.collect_activations(apply, state, ADAPTER_TARGETS, calib_ids)
    teacher_ft = float(ppl(continue_dense(state, lambda s, ids: lm_loss(apply(s, ids), ids), it,
                                          args.recover_steps, args.recover_lr)))
    rows = []

    def fppl(comp, f):
        g = lrjax.factored(apply, comp.rp)
        return float(jnp.exp(lm_loss(g(comp.base, f, ev), ev)))

    for c in args.lm_ratios:
        comps = compress_all(state, ADAPTER_TARGETS, c, calib, jax.random.key(args.seed + 1))
        for m, comp in comps.items():
            rows.append({"model": "char transformer", "method": m, "c": c, "bytes": comp.report.model_bytes_after,
                         "metric": float(ppl(comp.materialize())), "rank_ratio": comp.report.ratio})
        variants = {"svd+ft": (comps["svd"], "ce"), "pela": (comps["svd"], "pela")}
        if "welore" in comps:
            variants["welore+ft"] = (comps["welore"], "ce")
        for m, (comp, kind) in variants.items():
            g = lrjax.factored(apply_feats, comp.rp)

            def loss(base, f, ids, g=g, kind=kind):
                logits, feats = g(base, f, ids)
                l = lm_loss(logits, ids)
                if kind == "pela":  # CE + kd_alpha (1.0) x mean over blocks of MSE(block output) to the teacher
                    l, _ = pela.distill_loss(l, feats, apply_feats(state, ids)[1])
                return l

            f = recover(comp, loss, it, args.recover_steps, args.recover_lr)
            rows.append({"model": "char transformer", "method": m, "c": c, "bytes": comp.report.model_bytes_after,
                         "metric": fppl(comp, f), "before": fppl(comp, comp.factors)})
    other_targets = ADAPTER_TARGETS[1:] if args.quick else ADAPTER_TARGETS  # quick: the MLP kernels only
    rows += lm_other(args, state, apply, lm_loss, ppl, it, other_targets, C.tree_bytes(state))
    # timing of each rule's compression
    key = jax.random.key(args.seed + 2)
    calls = {
        "svd rank=16": lambda: C.compress(state, ADAPTER_TARGETS, rank=min(16, dm)).factors,
        "svd energy=0.9": lambda: C.compress(state, ADAPTER_TARGETS, energy=0.9).factors,
        "svd ratio=2 (PELA)": lambda: C.compress(state, ADAPTER_TARGETS, ratio=2.0).factors,
        "svd reduction=0.5 (WeLore)": lambda: C.compress(state, ADAPTER_TARGETS, reduction=0.5).factors,
        "whitened ratio=2": lambda: C.compress(state, ADAPTER_TARGETS, ratio=2.0, method="whitened",
                                               calib=calib).factors,
        "randomized ratio=2": lambda: C.compress(state, ADAPTER_TARGETS, ratio=2.0, method="randomized",
                                                 key=key).factors,
    }
    times = time_round_robin({k: blocking(f) for k, f in calls.items()}, args.time_repeats, warmup=1,
                             desc="compress timing", progress=not args.no_progress)
    timing = {k: summarize(v) for k, v in times.items()}
    return {"teacher": teacher, "teacher_ft": teacher_ft, "bytes": C.tree_bytes(state), "metric": "held-out perplexity", "rows": rows,
            "timing": timing,
            "config": {"d_model": dm, "n_layers": nl, "d_ff": dff, "pretrain_steps": args.lm_steps,
                       "targets": list(ADAPTER_TARGETS), "other_targets": list(other_targets),
                       "calib_tokens": int(calib_ids.size)}}


def lm_other(args, state, apply, lm_loss, ppl, it, targets, total):
    """DSFormer (``dsformer``, ``dsformer+stf``) and PQ / LR^2VQ rows on the transformer's adapter
    kernels (every q, k, v, o, fc1, fc2)."""
    from lrjax import tree as tree_lib
    rows = []
    s = args.ds_s
    flat = tree_lib.flatten(state)
    for kb in args.lm_ds_k:
        comp = dsformer.compress(state, kb, s, targets)
        errs = []
        for lay in comp.report.layers:  # weight error against truncated SVD with as many stored values
            w = flat[lay.path]
            r = dsformer.svd_rank_at_equal_params(lay.m, lay.n, kb, s)
            u, sv, vt = lrjax.linalg.svd(w, r)
            errs.append((lay.rel_error, float(jnp.linalg.norm(w - (u * sv) @ vt) / jnp.linalg.norm(w)), r))
        err = {"mean over kernels": {"dsformer": float(np.mean([e[0] for e in errs])),
                                     "svd": float(np.mean([e[1] for e in errs])),
                                     "svd_rank": "/".join(sorted({str(e[2]) for e in errs}))}}
        rows.append({"model": "char transformer", "method": "dsformer", "setting": f"k={kb}, s={s}",
                     "bytes": comp.report.model_bytes_after, "metric": float(ppl(comp.materialize())),
                     "rel_error": err})
        g = lrjax.factored(apply, comp.rp)

        def loss(base, f, ids, g=g):
            return lm_loss(g(base, dsformer.ste_factors(f, s), ids), ids)

        f = recover(comp, loss, it, args.recover_steps, args.recover_lr)
        f = {p: {**v, "b": v["b"] * dsformer.topk_mask(v["b"], s)} for p, v in f.items()}  # hard top-s
        rows.append({"model": "char transformer", "method": "dsformer+stf", "setting": f"k={kb}, s={s}",
                     "bytes": comp.report.model_bytes_after,
                     "metric": float(ppl(comp.rp.materialize(comp.base, f)))})
    paths = tree_lib.select(state, targets)

    def loss_p(p, ids):
        return lm_loss(apply(p, ids), ids)

    rows += vq_rows(args, "char transformer", state, paths, loss_p, lambda p: float(ppl(p)), it, total,
                    smoke=args.quick)
    return rows


# ------------------------------------------------------------------------------ report
def table(res) -> str:
    lines = []
    for key in ("digits", "lm"):
        r = res[key]
        up = key == "digits"
        lines.append(f"\n**{'digits MLP' if up else 'char transformer'}** ({r['metric']}; uncompressed "
                     f"{r['teacher']:.4g} at {r['bytes']} bytes; uncompressed + the same "
                     f"{res['config']['recover_steps']} recovery steps, all weights trained: {r['teacher_ft']:.4g}, "
                     "the ceiling for the `+ft` / `pela` columns)\n")
        lines.append("| c | " + " | ".join(LOWRANK + RECOVER) + " |")
        lines.append("|---:|" + "---:|" * (len(LOWRANK) + len(RECOVER)))
        for c in sorted({x["c"] for x in r["rows"] if "c" in x}):
            cells = []
            for m in LOWRANK + RECOVER:
                hit = [x for x in r["rows"] if x.get("c") == c and x["method"] == m]
                cells.append(f"{hit[0]['metric']:.4g} ({hit[0]['bytes'] / r['bytes']:.2f}x)" if hit else "-")
            lines.append(f"| {c:g} | " + " | ".join(cells) + " |")
    lm_what = ("every q, k, v, o, fc1, fc2 kernel compressed" if len(res["lm"]["config"]["other_targets"]) > 1
               else "the MLP fc1, fc2 kernels compressed (quick)")
    for key, what, name in (("digits", "fc1, fc2 compressed", "digits MLP"), ("lm", lm_what, "char transformer")):
        r = res[key]
        lines.append(f"\n**{name}, other structures** ({what}; {r['metric']}; `+dkm`: value before DKM, i.e. "
                     "the `+lr` row, in brackets)\n")
        lines.append("| method | setting | bytes / uncompressed | metric | weight rel. error: dense-sparse "
                     "vs SVD at equal values |\n|---|---|---:|---:|---|")
        for x in r["rows"]:
            if x["method"] in OTHER:
                e = x.get("rel_error")
                es = ", ".join(f"{v['dsformer']:.3f} vs {v['svd']:.3f} (r={v['svd_rank']})"
                               for v in e.values()) if e else ""
                bf = f" (before {x['before']:.4f})" if "before" in x else ""
                lines.append(f"| {x['method']} | {x['setting']} | {x['bytes'] / r['bytes']:.3f} | "
                             f"{x['metric']:.4f}{bf} | {es} |")
    t = res["lm"]["timing"]
    lines.append("\n**compression time** (char transformer, median ms over repeats after a warm-up)\n")
    lines.append("| rule | median ms | IQR ms |\n|---|---:|---:|")
    for k, v in t.items():
        lines.append(f"| {k} | {v['median_ms']:.1f} | {v['iqr_ms']:.1f} |")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axs, ("digits", "lm")):
        r = res[key]
        for i, m in enumerate(LOWRANK + RECOVER + OTHER):
            pts = sorted((x["bytes"] / r["bytes"], x["metric"]) for x in r["rows"] if x["method"] == m)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-" if m in LOWRANK else ("s--" if m in RECOVER else "^-."), label=m,
                        color=f"C{i % 10}")
        ax.axhline(r["teacher"], color="k", lw=0.8, ls=":", label="uncompressed")
        ax.axhline(r["teacher_ft"], color="k", lw=0.8, ls="--", label="uncompressed + recovery steps")
        ax.set_xlabel("stored bytes / uncompressed")
        ax.set_ylabel(r["metric"])
        ax.set_title("digits MLP" if key == "digits" else "char transformer")
        if key == "lm":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    res = {"command": "python experiments/bench_compress.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "device": device_info(), "config": {k: v for k, v in vars(args).items() if k != "out"}}
    res["digits"] = digits_study(args)
    res["lm"] = lm_study(args)
    res["wall_s"] = time.perf_counter() - t0
    md = table(res)
    res["table_markdown"] = md
    with open(os.path.join(args.out, "bench_compress.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(args.out, "bench_compress.md"), "w") as f:
        f.write(md + "\n")
    plot(res, os.path.join(args.out, "bench_compress.png"))
    print(md)
    print(f"\nreproduce: {res['command']}  ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
