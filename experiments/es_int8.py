"""Integer-only EGGROLL vs float EGGROLL vs backprop (Adam) on the embedded character corpus, at equal
wall-clock.

    python experiments/es_int8.py --out results/es_int8     # ~10 minutes on 2 CPU cores
    python experiments/es_int8.py --quick                   # smoke test, seconds (writes to runs/)

Three learners, each given the same training wall-clock budget (``--budget`` seconds of timed
steps, each step ``block_until_ready``; compilation, warm-up and the held-out evaluations are
outside the budget), on the ``stdlib_chars`` windows (one shared minibatch of ``--batch`` windows
per step):

* ``int8_eggroll`` -- :class:`lrjax.es.integer.IntEggroll` on an int8 recurrent char LM in the style
  of the paper's int8 model (nano-egg's EGG_GRU cell): int8 embedding, a gated recurrent cell
  ``f = clip(x Wf + h Uf + bf)``, ``g = (f + 127) h / 256``, ``c = clip(x Wh + g Uh + bh)``,
  ``h' = h + (f + 127)(c - h) / 256`` (clipping is the only nonlinearity, as in nano-egg), and an int8
  readout; every matmul is int8 x int8 -> int32 (:func:`~lrjax.es.integer.int_dense`), every matrix
  (the embedding included) is perturbed low-rank with integer noise, the update is the integer
  thresholded sign step with ``alpha`` annealed from 1 to 1/16 over the budget (nano-egg's schedule).
  The int8 logits ``l`` define ``p(c) ~ 2^(l_c / 16)`` (4 fractional bits); the fitness (mean
  log-likelihood of the minibatch) is the only float computation and only its pair-difference signs
  enter the update.
* ``float_eggroll`` -- :class:`lrjax.es.Eggroll` (float32) on the float GRU of ``experiments/es_lm.py``
  (same width), centered-rank shaping, Adam on the ES gradient (es_lm's settings).
* ``backprop_adam`` -- the same float GRU trained with ``jax.grad`` and Adam.

Reports held-out bits/char against wall-clock for each, with the add-one-smoothed unigram and bigram
models fitted on the training windows and scored on the same held-out windows, and the load average
(the machine is shared: timings are under load). Writes ``<out>/es_int8.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import _report  # noqa: E402
import es_lm  # noqa: E402  (the float GRU both float learners train)
from lrjax import data  # noqa: E402
from lrjax.es import Eggroll  # noqa: E402
from lrjax.es.integer import IntEggroll, clip_int8, int_dense, int_embed, rshift  # noqa: E402

LN2 = math.log(2.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 0.3 s budget per method (smoke test)")
    p.add_argument("--out", default=None, help="output directory (default runs/es_int8; quick: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=None, help="training seconds per method, default 150 (quick: 0.3)")
    p.add_argument("--d", type=int, default=None, help="hidden size, default 128 (quick: 16)")
    p.add_argument("--population", type=int, default=None, help="ES population, default 128 (quick: 8)")
    p.add_argument("--rank", type=int, default=4, help="ES perturbation rank (both ES learners)")
    p.add_argument("--sigma", type=float, default=0.02, help="float EGGROLL sigma (es_lm's)")
    p.add_argument("--es-lr", type=float, default=0.01, help="float EGGROLL Adam learning rate (es_lm's)")
    p.add_argument("--bp-lr", type=float, default=3e-3, help="backprop Adam learning rate")
    p.add_argument("--sigma-shift", type=int, default=8, help="int8 EGGROLL perturbation A B^T / 2^s")
    p.add_argument("--alpha-decay", type=float, default=4.0,
                   help="int8 alpha anneals 1 -> 2^-decay over the budget (nano-egg's default 4)")
    p.add_argument("--batch", type=int, default=None, help="windows per step, default 16 (quick: 2)")
    p.add_argument("--seq-len", type=int, default=None, help="default 64 (quick: 16)")
    p.add_argument("--held", type=int, default=None, help="held-out windows, default 256 (quick: 8)")
    p.add_argument("--evals", type=int, default=None, help="held-out evaluations per method, default 12 (quick: 2)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(budget=(0.3, 150.0), d=(16, 128), population=(8, 128), batch=(2, 16), seq_len=(16, 64),
                held=(8, 256), evals=(2, 12))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    if a.out is None:
        import tempfile
        a.out = tempfile.mkdtemp(prefix="es_int8_") if a.quick else "runs/es_int8"
    if a.quick:
        a.rank = min(a.rank, 2)
    return a


# --------------------------------------------------------------------------- int8 model
def int_init(seed, vocab, d):
    """int8 params ``clip(round(16 N(0, 1)))`` (4 fractional bits), zero biases; built in NumPy."""
    rng = np.random.default_rng(seed)
    w = lambda *s: np.clip(np.round(rng.normal(size=s) * 16), -127, 127).astype(np.int8)  # noqa: E731
    z = lambda n: np.zeros((n,), np.int8)  # noqa: E731
    return jax.tree.map(jnp.asarray, {
        "embed": w(vocab, d),
        "cell": {"wf": w(d, d), "uf": w(d, d), "bf": z(d), "wh": w(d, d), "uh": w(d, d), "bh": z(d)},
        "readout": {"kernel": w(d, vocab), "bias": z(vocab)}})


def int_logits(p, nz, ids):
    """ids [B, T] -> int8 logits [B, T, V]; ``nz`` the member's noise tree (None leaves unperturbed)."""
    c, n = p["cell"], nz["cell"]
    x = int_embed(ids, p["embed"], nz["embed"])  # [B, T, d] int8

    def add3(a, b, bias):
        return clip_int8(a.astype(jnp.int32) + b.astype(jnp.int32) + bias.astype(jnp.int32))

    def step(h, xt):
        f = add3(int_dense(xt, c["wf"], n["wf"]), int_dense(h, c["uf"], n["uf"]), c["bf"]).astype(jnp.int32) + 127
        hi = h.astype(jnp.int32)
        g = clip_int8(rshift(f * hi, 8))
        cand = add3(int_dense(xt, c["wh"], n["wh"]), int_dense(g, c["uh"], n["uh"]), c["bh"]).astype(jnp.int32)
        h = clip_int8(hi + rshift(f * (cand - hi), 8))
        return h, h

    h0 = jnp.zeros((ids.shape[0], c["wf"].shape[1]), jnp.int8)
    _, hs = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    hs = jnp.swapaxes(hs, 0, 1)
    return int_dense(hs, p["readout"]["kernel"], nz["readout"]["kernel"], p["readout"]["bias"])


def int_nll_bits(p, nz, tokens):
    """Mean next-char bits under p(c) ~ 2^(l_c / 16) from the int8 logits l."""
    lg = int_logits(p, nz, tokens[:, :-1]).astype(jnp.float32) * (LN2 / 16)
    ll = jnp.take_along_axis(jax.nn.log_softmax(lg), tokens[:, 1:, None], -1)
    return -jnp.mean(ll) / LN2


# --------------------------------------------------------------------------- float model (es_lm's GRU)
def float_init(seed, vocab, d):
    """es_lm's initialization (scaled normals, zero biases), drawn in NumPy."""
    rng = np.random.default_rng(seed)
    n = lambda shp, fan: (rng.normal(size=shp) / np.sqrt(fan)).astype(np.float32)  # noqa: E731
    return jax.tree.map(jnp.asarray, {
        "embed": n((vocab, d), 1.0) * 0.5,
        "cell": {"wx": n((d, d), d), "wh": n((d, d), d) * 0.5, "b": np.zeros(d, np.float32),
                 "uz": n((d, d), d), "vz": n((d, d), d), "c": np.zeros(d, np.float32)},
        "readout": {"kernel": n((d, vocab), d), "bias": np.zeros(vocab, np.float32)}})


def float_nll_bits(p, tokens):
    """Mean bits/char of es_lm's float GRU (``es_lm.gru_logits``) on ``tokens [B, L]``."""
    lg = es_lm.gru_logits(p, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), tokens[:, 1:, None], -1)) / LN2


# --------------------------------------------------------------------------- baselines
def ngram_baselines(train, test, vocab):
    """Held-out bits/char of add-one-smoothed unigram and bigram models fitted on ``train``."""
    uni = np.bincount(train[:, 1:].ravel(), minlength=vocab) + 1.0
    uni /= uni.sum()
    big = np.ones((vocab, vocab))
    np.add.at(big, (train[:, :-1].ravel(), train[:, 1:].ravel()), 1.0)
    big /= big.sum(1, keepdims=True)
    prev, nxt = test[:, :-1].ravel(), test[:, 1:].ravel()
    return {"uniform_bpc": math.log2(vocab), "unigram_bpc": float(-np.mean(np.log2(uni[nxt]))),
            "bigram_bpc": float(-np.mean(np.log2(big[prev, nxt])))}


# --------------------------------------------------------------------------- runs
def _run(name, args, step, evaluate, state, rng, train):
    """Train ``state`` with ``step(state, batch, progress) -> state`` for ``args.budget`` seconds of
    timed steps, evaluating held-out bits/char ``args.evals`` times (outside the budget)."""
    batch = lambda: jnp.asarray(train[rng.choice(train.shape[0], args.batch, replace=False)])  # noqa: E731
    jax.block_until_ready(step(state, batch(), 0.0))  # compile + warm-up (result discarded)
    jax.block_until_ready(evaluate(state))
    hist = {"wall_s": [0.0], "steps": [0], "heldout_bpc": [float(evaluate(state))]}
    marks = [args.budget * (i + 1) / args.evals for i in range(args.evals)]
    spent, steps, step_ms = 0.0, 0, []
    bar = tqdm(total=args.evals, desc=name, disable=args.no_progress, file=sys.stdout)
    for mark in marks:
        while spent < mark:
            b = batch()
            t0 = time.perf_counter()
            state = jax.block_until_ready(step(state, b, min(1.0, spent / args.budget)))
            dt = time.perf_counter() - t0
            spent += dt
            step_ms.append(dt * 1e3)
            steps += 1
        hist["wall_s"].append(spent)
        hist["steps"].append(steps)
        hist["heldout_bpc"].append(float(evaluate(state)))
        bar.update(1)
    bar.close()
    return {"steps": steps, "median_step_ms": float(np.median(step_ms)), "history": hist,
            "final_heldout_bpc": hist["heldout_bpc"][-1], "best_heldout_bpc": min(hist["heldout_bpc"])}


def main(argv=None):
    args = parse_args(argv)
    out = _report.start(__file__, argv, args)
    t = args.seq_len + 1
    train = np.asarray(data.as_arrays(data.load("stdlib_chars", split="train"))["tokens"])[:, :t]
    test = np.asarray(data.as_arrays(data.load("stdlib_chars", split="test"))["tokens"])[:, :t]
    held = jnp.asarray(test[:args.held])
    vocab = data.VOCAB_SIZE
    out["baselines"] = ngram_baselines(train, test[:args.held], vocab)
    out["methods"] = {}
    key = jax.random.key(args.seed)

    # int8 EGGROLL
    ies = IntEggroll(args.population, rank=args.rank, sigma_shift=args.sigma_shift, maximize=False)
    ist = ies.init(jax.random.fold_in(key, 1))
    none = jax.tree.map(lambda _: None, int_init(args.seed, vocab, args.d))
    int_eval = jax.jit(lambda p: int_nll_bits(p, none, held))
    alpha = lambda prog: 1.0 / ((2.0 ** args.alpha_decay - 1.0) * prog + 1.0)  # noqa: E731  nano-egg's schedule

    def int_step(s, b, prog):
        p, st = s
        p, st, _ = ies.step(st, p, int_nll_bits, b, alpha=alpha(prog))
        return p, st

    r = _run("int8_eggroll", args, int_step, lambda s: int_eval(s[0]), (int_init(args.seed, vocab, args.d), ist),
             np.random.default_rng(args.seed), train)
    r.update(population=args.population, rank=args.rank, sigma_shift=args.sigma_shift,
             params_bytes=int(sum(v.size for v in jax.tree.leaves(int_init(args.seed, vocab, args.d)))))
    out["methods"]["int8_eggroll"] = r

    # float EGGROLL (es_lm's setup) and backprop on the same float model
    fp0 = float_init(args.seed, vocab, args.d)
    float_eval = jax.jit(lambda p: float_nll_bits(p, held))
    fes = Eggroll(args.population, rank=args.rank, sigma=args.sigma, shaping="centered_rank", maximize=False,
                  targets=["cell/w.*", "cell/uz", "cell/vz", "readout/kernel"])
    opt = optax.adam(args.es_lr)

    @jax.jit
    def apply(p, o, g):
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o

    def es_step(s, b, prog):
        p, o, st = s
        g, st, _ = fes.estimate(st, p, float_nll_bits, b)
        p, o = apply(p, o, g)
        return p, o, st

    r = _run("float_eggroll", args, es_step, lambda s: float_eval(s[0]),
             (fp0, opt.init(fp0), fes.init(jax.random.fold_in(key, 1))), np.random.default_rng(args.seed), train)
    r.update(population=args.population, rank=args.rank, sigma=args.sigma, lr=args.es_lr,
             params_bytes=int(sum(v.size * 4 for v in jax.tree.leaves(fp0))))
    out["methods"]["float_eggroll"] = r

    bopt = optax.adam(args.bp_lr)

    @jax.jit
    def bp_step(s, b, prog):
        p, o = s
        g = jax.grad(float_nll_bits)(p, b)
        u, o = bopt.update(g, o, p)
        return optax.apply_updates(p, u), o

    r = _run("backprop_adam", args, lambda s, b, prog: bp_step(s, b, 0.0), lambda s: float_eval(s[0]),
             (fp0, bopt.init(fp0)), np.random.default_rng(args.seed), train)
    r.update(lr=args.bp_lr, params_bytes=int(sum(v.size * 4 for v in jax.tree.leaves(fp0))))
    out["methods"]["backprop_adam"] = r

    def tables(o):
        b = o["baselines"]
        lines = [f"Held-out bits/char after {args.budget:.0f} s of training each (d={args.d}, "
                 f"seq {args.seq_len}, batch {args.batch}; ES population {args.population}, rank {args.rank}).", "",
                 "| method | steps | median step ms | start bpc | final bpc | best bpc | params bytes |",
                 "|---|---|---|---|---|---|---|"]
        for m, r in o["methods"].items():
            h = r["history"]["heldout_bpc"]
            lines.append(f"| {m} | {r['steps']} | {r['median_step_ms']:.1f} | {h[0]:.3f} | {h[-1]:.3f} | "
                         f"{r['best_heldout_bpc']:.3f} | {r['params_bytes']} |")
        lines += ["", f"Baselines on the same held-out windows: uniform {b['uniform_bpc']:.3f}, "
                      f"unigram {b['unigram_bpc']:.3f}, bigram {b['bigram_bpc']:.3f} bits/char (add-one "
                      f"smoothed, fitted on the training windows)."]
        return "\n".join(lines)

    def plot(o, path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for m, r in o["methods"].items():
            ax.plot(r["history"]["wall_s"], r["history"]["heldout_bpc"], marker="o", ms=3, label=m)
        b = o["baselines"]
        ax.axhline(b["unigram_bpc"], color="k", ls="--", lw=1, label="unigram")
        ax.axhline(b["bigram_bpc"], color="gray", ls=":", lw=1, label="bigram")
        ax.set_xlabel("training wall-clock (s, under load)")
        ax.set_ylabel("held-out bits/char")
        ax.set_title(f"int8 vs float EGGROLL vs backprop (d={args.d}, N={args.population}, r={args.rank})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    _report.finish(out, args, "es_int8", tables, plot)


if __name__ == "__main__":
    main()
