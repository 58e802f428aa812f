"""Train a character language model on the embedded corpus with EGGROLL only (no backprop), against
the corpus's unigram and bigram baselines on the same held-out characters.

    python experiments/es_lm.py --out results/es_lm     # the committed run (25 min of training)
    python experiments/es_lm.py --quick                  # smoke test, < 15 s

Data: ``lrjax.data.load('stdlib_chars')`` (Python standard-library source, 96 symbols; windows of
129 characters; ``train`` = the first 90% of the stream, ``test`` = the last 10%, other files).

Held-out set: EVERY test window (quick: every 8th), each window's targets ``ctx .. 128`` (the first
``ctx`` characters of a window are context only), so every model and baseline is scored on exactly
the same characters. The baselines use only training counts:

* ``unigram``: cross-entropy on the held-out targets of the training character frequencies (add-0.5);
* ``bigram``: cross-entropy on the held-out targets of the training bigram table (add-``k``,
  ``k`` chosen on a slice of the training split) -- the bigram *model*;
* ``bigram_oracle``: the held-out targets' own conditional entropy ``H(x_t | x_{t-1})`` (counts
  taken on the held-out pairs themselves, so no bigram model can do better on them); and the
  training corpus's conditional entropy ``H(x_t | x_{t-1})`` for reference.

Models (``--model``):

* ``ngram`` (default): a causal convolution over the last ``ctx`` characters. Each position's input
  is the concatenated one-hot codes of its ``ctx`` predecessors (``[ctx * 96]``), then
  ``h = tanh(x W1 + b1)`` (``W1: [ctx*96, hidden]``), ``logits = h W2 + b2 + x_k D`` where ``x_k``
  is the one-hot codes of the ``k = --direct`` nearest predecessors and ``D: [k*96, 96]`` (zero at
  the start) their direct connections to the output (Bengio et al. 2003's NPLM; ``k = 1`` alone is
  a bigram table). The one-hot input is shared by all members, so ``x W1`` and ``x_k D`` are
  computed once per generation and a member costs only its rank-``r`` corrections plus the
  readout; every position is independent (no scan).
* ``gru``: the previous default, a minimal GRU over the window (embedding ``96 x d``, cell
  ``h' = (1 - z) h + z tanh(x Wx + h Wh + b)``, ``z = sigmoid(x Uz + h Vz + c)``, readout), scored
  on the same held-out targets after reading the whole window from its start.

Every matrix is perturbed low-rank and run factored through :func:`lrjax.es.perturbed_call` (the
model code knows nothing about ES). Fitness: mean next-character log-likelihood on a FRESH
minibatch of random training windows each generation (shared by all members, as ES needs);
shaping ``centered_rank``, antithetic pairs; the estimate goes to Adam (``optax.scale_by_adam``)
with a warmup-cosine learning rate that decays over the run's budget (generations or wall-clock,
whichever ends first). The minibatch size matters most (measured, 2 CPU cores shared by two runs,
equal wall-clock): 8 windows x 64 targets per generation let the fitness noise dominate (held-out
rose from 4.59 to 5.01 at the peak learning rate and ended at 4.48 after 2,634 generations), 32
windows ended at 3.92 after 312 generations, 64 windows at 4.16 after 145; hence the default 32.
The peak learning rate next (two 25-minute runs on quiet cores): at 0.02 the held-out value rose
from 4.16 to 4.44 during the high-rate phase and ended at 3.90; at 0.008 (the default) it fell
steadily, crossed the bigram model after ~1,200 generations (11 minutes) and ended at 3.48.

Diagnostic (the "minibatch vs held-out gap" of the earlier GRU run, 3.0-4.0 vs 4.5 bits/char): at
every evaluation the script scores the current params on (a) the batch the last generation was
fitted on, (b) a fresh random training batch of the same size, (c) a fixed 256-window training
sample, (d) the held-out set, and (e) the old held-out set (the first 128 test windows, which the
earlier run used), with the unigram/bigram baselines of (e) too. (a) vs (b) measures overfitting
to the shared batch; (c) vs (d) the train/test shift; (d) vs (e) the old held-out set's bias.

Writes ``<out>/es_lm.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import _report as R  # noqa: E402
from lrjax import data  # noqa: E402
from lrjax.es import Eggroll, FactoredStats  # noqa: E402

V = data.VOCAB_SIZE
LOG2 = float(np.log(2.0))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few generations (smoke test)")
    p.add_argument("--out", default=None, help="default runs/es_lm (quick: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="ngram", choices=["ngram", "embed", "gru"])
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget for the training loop (default 25; quick: none)")
    p.add_argument("--generations", type=int, default=None, help="upper bound (and lr schedule length), default 5000 (quick: 6)")
    p.add_argument("--population", type=int, default=None, help="default 256 (quick: 16)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--sigma", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=0.008, help="peak Adam learning rate")
    p.add_argument("--warmup", type=int, default=30, help="generations of linear warmup")
    p.add_argument("--ctx", type=int, default=8, help="context characters (ngram model)")
    p.add_argument("--direct", type=int, default=None,
                   help="ngram model: direct one-hot-to-logit connections from the k nearest predecessors "
                        "(Bengio et al. 2003; k = 1 is a bigram table, zero-initialised); default 2 (quick: 0)")
    p.add_argument("--hidden", type=int, default=None, help="hidden width, default 128 (quick: 16)")
    p.add_argument("--embed", type=int, default=16, help="embedding width (embed model)")
    p.add_argument("--bias-init", default="zeros", choices=["unigram", "zeros"],
                   help="readout bias at the start: training log-frequencies (counts, no gradient) or zeros")
    p.add_argument("--batch", type=int, default=None, help="windows per generation, default 32 (quick: 2)")
    p.add_argument("--seq-len", type=int, default=64, help="targets per training window")
    p.add_argument("--eval-every", type=int, default=None, help="default 100 generations (quick: 3)")
    p.add_argument("--noise", default="normal", choices=["normal", "rademacher"])
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for k, (q, full) in dict(generations=(6, 5000), population=(16, 256), hidden=(16, 128), batch=(2, 32),
                             eval_every=(3, 100), direct=(0, 2)).items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    if a.minutes is None:
        a.minutes = 1e9 if a.quick else 25.0
    if a.out is None:
        import tempfile
        a.out = tempfile.mkdtemp(prefix="es_lm_") if a.quick else "runs/es_lm"
    if not 0 <= a.direct <= a.ctx:
        p.error("need 0 <= direct <= ctx")
    if a.ctx < 1 or a.ctx + a.seq_len + 1 > 129:
        p.error("need 1 <= ctx and ctx + seq_len + 1 <= 129 (the corpus windows)")
    return a


# --------------------------------------------------------------------------- baselines
def ngram_baselines(train, held, ctx, k_grid=(0.01, 0.03, 0.1, 0.3, 1.0)):
    """Unigram / bigram bits per character on the held-out targets ``held[:, ctx:]`` (each with its
    predecessor), counts from ``train`` (all its adjacent pairs) only; see the module docstring."""
    prev, tgt = held[:, ctx - 1:-1].ravel(), held[:, ctx:].ravel()
    uni = np.bincount(train.ravel(), minlength=V) + 0.5
    uni = uni / uni.sum()
    pairs = np.zeros((V, V))
    np.add.at(pairs, (train[:, :-1].ravel(), train[:, 1:].ravel()), 1.0)
    # smoothing chosen on the training split's last 10% with counts from the first 90%
    cut = int(0.9 * train.shape[0])
    fit = np.zeros((V, V))
    np.add.at(fit, (train[:cut, :-1].ravel(), train[:cut, 1:].ravel()), 1.0)
    vp, vt = train[cut:, :-1].ravel(), train[cut:, 1:].ravel()

    def ce(table, k, p_, t_):
        pr = (table + k) / (table + k).sum(1, keepdims=True)
        return float(-np.mean(np.log2(pr[p_, t_])))

    k = min(k_grid, key=lambda kk: ce(fit, kk, vp, vt))
    joint = np.zeros((V, V))
    np.add.at(joint, (prev, tgt), 1.0)

    def cond_entropy(j):
        j = j / j.sum()
        px = j.sum(1, keepdims=True)
        nz = j > 0
        return float(-np.sum(j[nz] * np.log2((j / np.where(px > 0, px, 1.0))[nz])))

    return {"unigram_probs": uni, "unigram": float(-np.mean(np.log2(uni[tgt]))), "bigram": ce(pairs, k, prev, tgt),
            "bigram_smoothing_k": k, "bigram_oracle": cond_entropy(joint),
            "train_unigram_entropy": float(-np.sum(uni * np.log2(uni))),
            "train_bigram_cond_entropy": cond_entropy(pairs), "targets": int(tgt.size)}


# --------------------------------------------------------------------------- models
def init_ngram(key, ctx, hidden, direct=0):
    k1, k2 = jax.random.split(key)
    p = {"conv": {"kernel": jax.random.normal(k1, (ctx * V, hidden)) / np.sqrt(ctx), "bias": jnp.zeros(hidden)},
         "readout": {"kernel": jax.random.normal(k2, (hidden, V)) / np.sqrt(hidden), "bias": jnp.zeros(V)}}
    if direct:
        p["direct"] = {"kernel": jnp.zeros((direct * V, V))}
    return p


def ngram_logits(p, onehot):
    """onehot [B, T, ctx * V] (the ctx predecessors of each target, nearest last) -> logits [B, T, V].
    With ``p["direct"]`` ([k * V, V], Bengio et al. 2003's direct connections) the k nearest
    predecessors' one-hot codes also feed the logits linearly (k = 1: a bigram table)."""
    h = jnp.tanh(onehot @ p["conv"]["kernel"] + p["conv"]["bias"])
    out = h @ p["readout"]["kernel"] + p["readout"]["bias"]
    if "direct" in p:
        out = out + onehot[..., onehot.shape[-1] - p["direct"]["kernel"].shape[0]:] @ p["direct"]["kernel"]
    return out


def ngram_inputs(tokens, ctx):
    """tokens [B, L] -> (onehot [B, L - ctx, ctx * V], targets [B, L - ctx])."""
    t = tokens.shape[1] - ctx
    cols = [jax.nn.one_hot(tokens[:, j:j + t], V, dtype=jnp.float32) for j in range(ctx)]
    return jnp.concatenate(cols, -1), tokens[:, ctx:]


def init_embed(key, ctx, e, hidden):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {"embed": jax.random.normal(k1, (V, e)),
            **({"conv": {"kernel": jax.random.normal(k2, (ctx * e, hidden)) / np.sqrt(ctx * e),
                         "bias": jnp.zeros(hidden)}} if hidden else {}),
            "bigram": jax.random.normal(k3, (V, V)) * 0.01,
            "readout": {"kernel": jax.random.normal(k4, (hidden or ctx * e, V)) / np.sqrt(hidden or ctx * e),
                        "bias": jnp.zeros(V)}}


def embed_logits(p, tokens, ctx):
    """tokens [B, L] -> logits [B, L - ctx, V] of targets tokens[:, ctx:]: one-hot codes times the
    embedding (a matmul, so the shared one-hot input is multiplied once for all members), the ctx
    predecessors' embeddings concatenated, ``tanh`` hidden layer, readout, plus a direct bigram table
    (``onehot(previous) @ bigram``)."""
    t = tokens.shape[1] - ctx
    oh = jax.nn.one_hot(tokens[:, :-1], V, dtype=jnp.float32)        # [B, L - 1, V]
    emb = oh @ p["embed"]                                             # [B, L - 1, e]
    x = jnp.concatenate([emb[:, j:j + t] for j in range(ctx)], -1)    # [B, T, ctx * e]
    h = jnp.tanh(x @ p["conv"]["kernel"] + p["conv"]["bias"]) if "conv" in p else x
    return h @ p["readout"]["kernel"] + p["readout"]["bias"] + oh[:, ctx - 1:] @ p["bigram"]


def init_gru(key, d):
    k = jax.random.split(key, 6)
    n = lambda kk, shp, fan: jax.random.normal(kk, shp) / np.sqrt(fan)  # noqa: E731
    return {"embed": n(k[0], (V, d), 1.0) * 0.5,
            "cell": {"wx": n(k[1], (d, d), d), "wh": n(k[2], (d, d), d) * 0.5, "b": jnp.zeros(d),
                     "uz": n(k[3], (d, d), d), "vz": n(k[4], (d, d), d), "c": jnp.zeros(d)},
            "readout": {"kernel": n(k[5], (d, V), d), "bias": jnp.zeros(V)}}


def gru_logits(p, ids):
    """ids [B, T] -> logits [B, T, V] (position t has read ids[:, :t + 1])."""
    x = p["embed"][ids]
    c = p["cell"]

    def step(h, xt):
        z = jax.nn.sigmoid(xt @ c["uz"] + h @ c["vz"] + c["c"])
        h = (1 - z) * h + z * jnp.tanh(xt @ c["wx"] + h @ c["wh"] + c["b"])
        return h, h

    h0 = jnp.zeros((ids.shape[0], c["wx"].shape[1]), x.dtype)
    _, hs = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(hs, 0, 1) @ p["readout"]["kernel"] + p["readout"]["bias"]


def make_model(args):
    """(params, nll(params, tokens [B, L]) -> mean nats over targets tokens[:, ctx:], targets)."""
    key = jax.random.key(args.seed)
    if args.model == "embed":
        params = init_embed(key, args.ctx, args.embed, args.hidden)

        def nll(p, tokens):
            y = tokens[:, args.ctx:]
            lg = embed_logits(p, tokens, args.ctx)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), y[..., None], -1))
        return params, nll, ["embed", "bigram", "readout/kernel"] + (["conv/kernel"] if args.hidden else [])
    if args.model == "ngram":
        params = init_ngram(key, args.ctx, args.hidden, args.direct)

        def nll(p, tokens):
            x, y = ngram_inputs(tokens, args.ctx)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(ngram_logits(p, x)), y[..., None], -1))
        return params, nll, ["conv/kernel", "readout/kernel"] + (["direct/kernel"] if args.direct else [])
    params = init_gru(key, args.hidden)

    def nll(p, tokens):
        lg = gru_logits(p, tokens[:, :-1])[:, args.ctx - 1:]
        y = tokens[:, args.ctx:]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), y[..., None], -1))
    # the embedding table is indexed (a gather), not multiplied: it gets full-rank noise
    return params, nll, ["cell/w.*", "cell/uz", "cell/vz", "readout/kernel"]


# --------------------------------------------------------------------------- run
def main(argv=None):
    args = parse_args(argv)
    out = R.start(__file__, argv, args)
    progress = not args.no_progress
    train = np.asarray(data.as_arrays(data.load("stdlib_chars", split="train"))["tokens"])
    test = np.asarray(data.as_arrays(data.load("stdlib_chars", split="test"))["tokens"])
    held = test[::8] if args.quick else test            # every test window (quick: every 8th)
    old_held = test[:16 if args.quick else 128]          # the earlier run's held-out set
    base = ngram_baselines(train, held, args.ctx)
    base_old = ngram_baselines(train, old_held, args.ctx)
    out["baselines"] = {k: v for k, v in base.items() if k != "unigram_probs"}
    out["baselines_old_heldout"] = {k: v for k, v in base_old.items() if k != "unigram_probs"}

    wlen = args.ctx + args.seq_len                       # ctx context chars + seq_len targets
    params, nll, targets = make_model(args)
    if args.bias_init == "unigram":   # a count-based start (no gradient): the training log-frequencies
        lp = np.log(base["unigram_probs"])
        params["readout"]["bias"] = jnp.asarray(lp - lp.mean(), jnp.float32)
    es = Eggroll(args.population, rank=args.rank, sigma=args.sigma, shaping="centered_rank",
                 maximize=False, targets=targets, noise=args.noise)
    st = es.init(jax.random.key(args.seed + 1))
    budget = args.minutes * 60.0

    def lr_at(gen, t_train):
        """Linear warmup, then cosine decay to 5% of ``--lr`` over the run's progress: the larger of
        the fraction of ``--generations`` done and the fraction of the ``--minutes`` budget spent
        (ES' progress is noise-limited, so the decay must reach its end whichever budget ends
        first)."""
        frac = min(1.0, max(gen / args.generations, t_train / budget))
        warm = min(1.0, (gen + 1) / max(1, args.warmup))
        return args.lr * warm * (0.05 + 0.95 * 0.5 * (1.0 + np.cos(np.pi * frac)))

    opt = optax.scale_by_adam()
    os_ = opt.init(params)
    stats = FactoredStats()

    @jax.jit
    def bpc(p, tokens):
        return nll(p, tokens) / LOG2

    def bpc_many(p, windows, size=128):   # fixed-size pieces: one compiled program per window length
        vals = []
        for i in range(0, windows.shape[0], size):
            w = windows[i:i + size]
            n = w.shape[0]
            if n < size:
                w = np.concatenate([w, np.repeat(w[:1], size - n, 0)])
                vals.append((float(bpc_rows(p, jnp.asarray(w))[:n].mean()), n))
            else:
                vals.append((float(bpc_rows(p, jnp.asarray(w)).mean()), n))
        return sum(v * n for v, n in vals) / sum(n for _, n in vals)

    @jax.jit
    def bpc_rows(p, tokens):
        return jax.vmap(lambda t: nll(p, t[None]))(tokens) / LOG2

    @jax.jit
    def apply(p, o, g, lr):
        u, o = opt.update(g, o, p)
        return jax.tree.map(lambda a, b: a - lr * b, p, u), o

    rng = np.random.default_rng(args.seed)
    fixed_train = train[rng.choice(train.shape[0], 32 if args.quick else 256, replace=False)]

    def sample():
        rows = rng.choice(train.shape[0], args.batch, replace=False)
        off = rng.integers(0, train.shape[1] - wlen + 1, size=args.batch)
        return np.stack([train[r, o:o + wlen] for r, o in zip(rows, off)])

    hist = {k: [] for k in ("generation", "wall_s", "train_shared", "train_fresh", "train_sample", "heldout",
                            "old_heldout", "lr")}

    def evaluate(gen, wall, shared):
        hist["generation"].append(gen)
        hist["wall_s"].append(wall)
        hist["lr"].append(float(lr_at(gen, wall)))
        hist["train_shared"].append(float(bpc(params, jnp.asarray(shared))) if shared is not None else None)
        hist["train_fresh"].append(float(bpc(params, jnp.asarray(sample()))))
        hist["train_sample"].append(bpc_many(params, fixed_train))
        hist["heldout"].append(bpc_many(params, held))
        hist["old_heldout"].append(bpc_many(params, old_held))

    t_train, gen, shared, minibatch = 0.0, 0, None, []
    evaluate(0, 0.0, None)
    bar = tqdm(total=args.generations, desc="ES char-LM", disable=not progress, file=sys.stdout)
    while gen < args.generations and t_train < budget:
        batch = jnp.asarray(sample())
        t0 = time.perf_counter()
        g, st, info = es.estimate(st, params, nll, batch, stats=stats if gen == 0 else None)
        params, os_ = apply(params, os_, g, jnp.float32(lr_at(gen, t_train)))
        jax.block_until_ready(params)
        t_train += time.perf_counter() - t0
        # the members' own fitness on this batch: what a "per-generation minibatch" curve shows
        minibatch.append(float(np.mean(np.asarray(info.fitness))) / LOG2)
        shared, gen = batch, gen + 1
        bar.update(1)
        if gen % args.eval_every == 0:
            evaluate(gen, t_train, shared)
            bar.set_postfix(heldout=f"{hist['heldout'][-1]:.3f}")
    bar.close()
    if hist["generation"][-1] != gen:
        evaluate(gen, t_train, shared)
    out.update({"model": args.model, "generations_run": gen, "train_wall_s": t_train,
                "num_params": int(sum(v.size for v in jax.tree.leaves(params))),
                "factored_kernel_uses": stats.factored, "fallback": stats.fallback,
                "initial_heldout_bpc": hist["heldout"][0], "final_heldout_bpc": hist["heldout"][-1],
                "best_heldout_bpc": min(hist["heldout"]), "history": hist,
                "minibatch_member_mean_bpc": minibatch,
                "beats_bigram": hist["heldout"][-1] < base["bigram"],
                "beats_bigram_oracle": hist["heldout"][-1] < base["bigram_oracle"]})
    R.finish(out, args, "es_lm", tables, plot)
    return out


def tables(out):
    b, bo, h = out["baselines"], out["baselines_old_heldout"], out["history"]
    c = out["config"]
    rows = [f"ES-only character LM ({out['model']}, {out['num_params']} params; population {c['population']}, "
            f"rank {c['rank']}, sigma {c['sigma']}, Adam peak lr {c['lr']} warmup-cosine, {c['batch']} windows x "
            f"{c['seq_len']} targets per generation): {out['generations_run']} generations in "
            f"{out['train_wall_s']:.0f} s of training.",
            "",
            f"| held-out bits/char ({b['targets']} test characters) | value |", "|---|---|",
            f"| uniform over {V} symbols | {np.log2(V):.3f} |",
            f"| unigram (training frequencies) | {b['unigram']:.3f} |",
            f"| bigram model (training counts, add-{b['bigram_smoothing_k']}) | {b['bigram']:.3f} |",
            f"| bigram oracle (the held-out pairs' own H(x_t given x_t-1)) | {b['bigram_oracle']:.3f} |",
            f"| ES model, start | {out['initial_heldout_bpc']:.3f} |",
            f"| **ES model, end** | **{out['final_heldout_bpc']:.3f}** |",
            "",
            f"Training corpus: unigram entropy {b['train_unigram_entropy']:.3f}, bigram conditional entropy "
            f"{b['train_bigram_cond_entropy']:.3f} bits/char.",
            "",
            "| generation | train s | lr | last batch (shared) | fresh batch | 256 train windows | held-out | "
            "old held-out (test[:128]) |",
            "|---|---|---|---|---|---|---|---|"]
    n = len(h["generation"])
    for i in sorted(set(list(range(0, n, max(1, n // 10))) + [n - 1])):
        sh = h["train_shared"][i]
        rows.append(f"| {h['generation'][i]} | {h['wall_s'][i]:.0f} | {h['lr'][i]:.4f} | "
                    f"{'' if sh is None else f'{sh:.3f}'} | {h['train_fresh'][i]:.3f} | {h['train_sample'][i]:.3f} | "
                    f"{h['heldout'][i]:.3f} | {h['old_heldout'][i]:.3f} |")
    rows += ["", f"Old held-out set (first 128 test windows): unigram {bo['unigram']:.3f}, bigram "
             f"{bo['bigram']:.3f}, bigram oracle {bo['bigram_oracle']:.3f} bits/char."]
    return "\n".join(rows)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h, b = out["history"], out["baselines"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(h["wall_s"], h["heldout"], marker=".", label="held-out (all test windows)")
    ax.plot(h["wall_s"], h["train_sample"], alpha=0.7, label="256 training windows")
    ax.plot(h["wall_s"], h["old_heldout"], alpha=0.5, ls=":", label="old held-out (test[:128])")
    for name, val, ls in (("unigram", b["unigram"], "--"), ("bigram model", b["bigram"], "-."),
                          ("bigram oracle", b["bigram_oracle"], ":")):
        ax.axhline(val, color="k", ls=ls, lw=1, label=f"{name} {val:.2f}")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("bits per character")
    ax.set_ylim(min(min(h["heldout"]), b["bigram_oracle"]) - 0.3, min(7.0, max(h["heldout"]) + 0.2))
    ax.set_title(f"EGGROLL only ({out['model']}): N={out['config']['population']}, r={out['config']['rank']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
