"""LAMA vs structured self-attention (Lin et al. 2017) at equal parameters on synthetic keyword detection.

    python experiments/lama_keyword.py --out results/lama_keyword   # a few minutes on 2 CPU cores
    python experiments/lama_keyword.py --quick                      # smoke test (temp dir)

Task: random filler tokens (ids ``K..V-1``) of a random length in ``[T/2, T]`` (right-padded with a
mask); two keywords (ids ``0..K-1``, possibly equal) are planted at two random distinct positions.
The label is the unordered keyword pair (``K (K + 1) / 2`` classes); chance ``2 / (K (K + 1))``
at best for one class.

Model (identical except the pooling): embedding ``[V, e]`` -> BiGRU (``--hidden`` per direction, so
``d = 2 hidden``) -> attention pooling with ``m`` heads -> ``M`` ``[m, d]`` flattened -> linear
classifier. Poolings: ``lama`` (:class:`lrjax.nn.attention.lama.LAMA`, ``2 d m`` parameters, context
= masked mean of the states), ``ssa`` (:class:`lrjax.nn.attention.lama.StructuredSelfAttention`
with ``d_a`` chosen so that ``d_a (d + m) ~= 2 d m``: equal pooling parameters) and ``ssa_big``
(``d_a = d``: Lin et al.'s shape at this width, about ``(d + m) / (2 m)`` times LAMA's pooling);
``lama_nonorm`` (ablation, opt-in): LAMA without the L2 normalization over heads (with it every
score lies in [-1, 1], which caps how peaked the softmax over t can be).
Reported: held-out accuracy (mean over seeds), pooling and total parameters, the attention mass on
the two planted keyword positions (interpretability), and the jitted forward time next to its limit,
the BiGRU encoder's forward alone (the work every pooling must do anyway), with the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report as R  # noqa: E402

from lrjax.nn.attention.lama import LAMA, StructuredSelfAttention  # noqa: E402

POOLS = ("lama", "lama_nonorm", "ssa", "ssa_big")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny task, few steps (smoke test, temp dir)")
    p.add_argument("--out", default=None, help="output dir (default results/lama_keyword; quick: a temp dir)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--pools", default=None, help="default lama,ssa,ssa_big (quick lama,ssa); also lama_nonorm")
    p.add_argument("--keywords", type=int, default=4, help="K keyword ids")
    p.add_argument("--vocab", type=int, default=None, help="default 48 (quick 16)")
    p.add_argument("--seq-len", type=int, default=None, help="max length T (default 40; quick 12)")
    p.add_argument("--embed", type=int, default=16)
    p.add_argument("--hidden", type=int, default=None, help="GRU width per direction (default 16; quick 4)")
    p.add_argument("--heads", type=int, default=4, help="m (LAMA rank = heads of both poolings)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (quick 8)")
    p.add_argument("--steps", type=int, default=None, help="default 600 (quick 4)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-batch", type=int, default=None, help="default 1024 (quick 16)")
    p.add_argument("--seeds", type=int, default=None, help="default 3 (quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats (default 20; quick 2)")
    a = p.parse_args(argv)
    q = a.quick
    for name, full, quick in (("vocab", 48, 16), ("seq_len", 40, 12), ("hidden", 16, 4), ("batch", 64, 8),
                              ("steps", 600, 4), ("eval_batch", 1024, 16), ("seeds", 3, 1), ("repeats", 20, 2)):
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    if q:
        a.embed = min(a.embed, 4)
    if a.out is None:
        a.out = tempfile.mkdtemp(prefix="lama_keyword_") if q else "results/lama_keyword"
    a.pools = [x for x in (a.pools or ("lama,ssa" if q else "lama,ssa,ssa_big")).split(",") if x]
    if any(x not in POOLS for x in a.pools):
        p.error(f"--pools must be among {POOLS}")
    if a.vocab <= a.keywords + 1 or a.seq_len < 4:
        p.error("need vocab > keywords + 1 and seq-len >= 4")
    return a


def make_batch(rng: np.random.Generator, n, T, V, K):
    """(tokens [n, T] int32, mask [n, T] bool, labels [n], keyword positions [n, 2])."""
    lengths = rng.integers(T // 2, T + 1, size=n)
    toks = rng.integers(K, V, size=(n, T))
    mask = np.arange(T)[None] < lengths[:, None]
    toks = np.where(mask, toks, 0)
    pos = np.stack([rng.choice(L, size=2, replace=False) for L in lengths])
    kw = rng.integers(0, K, size=(n, 2))
    toks[np.arange(n), pos[:, 0]] = kw[:, 0]
    toks[np.arange(n), pos[:, 1]] = kw[:, 1]
    lo, hi = kw.min(1), kw.max(1)
    label = hi * (hi + 1) // 2 + lo                                 # index of the unordered pair
    return toks.astype(np.int32), mask, label.astype(np.int32), pos


class Encoder(nnx.Module):
    def __init__(self, V, e, hidden, *, rngs):
        self.emb = nnx.Embed(V, e, rngs=rngs)
        self.rnn = nnx.Bidirectional(nnx.RNN(nnx.GRUCell(e, hidden, rngs=rngs)),
                                     nnx.RNN(nnx.GRUCell(e, hidden, rngs=rngs)), rngs=rngs)

    def __call__(self, toks, mask):
        return self.rnn(self.emb(toks), seq_lengths=jnp.sum(mask, axis=-1).astype(jnp.int32))


def ssa_hidden(d, m):
    """d_a with d_a (d + m) closest to LAMA's 2 d m."""
    return max(1, int(round(2 * d * m / (d + m))))


class Classifier(nnx.Module):
    def __init__(self, pool, args, *, rngs):
        d, m = 2 * args.hidden, args.heads
        self.enc = Encoder(args.vocab, args.embed, args.hidden, rngs=rngs)
        if pool in ("lama", "lama_nonorm"):
            self.pool = LAMA(d, m, normalize=pool == "lama", rngs=rngs)
        else:
            self.pool = StructuredSelfAttention(d, m, ssa_hidden(d, m) if pool == "ssa" else d, rngs=rngs)
        n_cls = args.keywords * (args.keywords + 1) // 2
        self.head = nnx.Linear(m * d, n_cls, rngs=rngs)

    def __call__(self, toks, mask):
        h = self.enc(toks, mask)
        M, A = self.pool(h, mask)
        return self.head(M.reshape(M.shape[0], -1)), A


def n_params(mod):
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(mod, nnx.Param))))


def run_one(pool, seed, args, progress):
    model = Classifier(pool, args, rngs=nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, toks, mask, y):
        def loss_fn(model):
            logits, _ = model(toks, mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, g = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, g)
        return loss

    @nnx.jit
    def evaluate(model, toks, mask, y, pos):
        logits, A = model(toks, mask)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        on_kw = jnp.take_along_axis(A, jnp.broadcast_to(pos[:, None, :], A.shape[:2] + (2,)), axis=-1)
        return acc, jnp.mean(jnp.sum(on_kw, -1))

    rng = np.random.default_rng(1000 + seed)
    losses = []
    for _ in tqdm(range(args.steps), desc=f"{pool} seed {seed}", leave=False, disable=not progress,
                  file=sys.stdout):
        toks, mask, y, _ = make_batch(rng, args.batch, args.seq_len, args.vocab, args.keywords)
        losses.append(float(step(model, opt, toks, mask, y)))
    te = make_batch(np.random.default_rng(seed + 99), args.eval_batch, args.seq_len, args.vocab, args.keywords)
    acc, kw_mass = evaluate(model, *te)
    return model, {"acc": float(acc), "keyword_attention_mass": float(kw_mass), "final_loss": float(np.mean(losses[-20:])),
                   "loss_curve": [float(x) for x in losses[:: max(1, args.steps // 50)]]}


def time_forward(model, args, limit_ms=None):
    """Median jitted forward ms; with ``limit_ms=None`` also the encoder-only forward (the limit)."""
    toks, mask, _, _ = make_batch(np.random.default_rng(5), args.batch, args.seq_len, args.vocab, args.keywords)
    fwd = nnx.jit(lambda m, t, k: m(t, k)[0])
    enc = nnx.jit(lambda m, t, k: m.enc(t, k))
    out = {} if limit_ms is None else {"limit_encoder_ms": limit_ms}
    todo = (("forward", fwd),) + ((("limit_encoder", enc),) if limit_ms is None else ())
    for name, f in todo:
        mod = model
        jax.block_until_ready(f(mod, toks, mask))
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f(mod, toks, mask))
            ts.append(time.perf_counter() - t0)
        out[name + "_ms"] = 1e3 * float(np.median(ts))
    out["ratio_to_limit"] = out["forward_ms"] / out["limit_encoder_ms"]
    return out


def tables(out):
    lines = [f"LAMA vs structured self-attention, synthetic keyword pairs ({out['n_classes']} classes, "
             f"chance {1 / out['n_classes']:.3f}); {out['config']['seeds']} seed(s), {out['config']['steps']} steps"
             + (" [QUICK smoke run]" if out["config"]["quick"] else ""), "",
             "| pooling | pooling params | total params | accuracy (mean +- sd) | attention mass on keywords | "
             "forward ms | encoder-only ms (limit) | ratio |", "|---|---|---|---|---|---|---|---|"]
    for pool, r in out["results"].items():
        t = r["timing"]
        lines.append(f"| {pool} | {r['pool_params']} | {r['total_params']} | {r['acc_mean']:.3f} +- {r['acc_std']:.3f} "
                     f"| {r['kw_mass_mean']:.3f} | {t['forward_ms']:.2f} | {t['limit_encoder_ms']:.2f} | "
                     f"{t['ratio_to_limit']:.2f}x |")
    return "\n".join(lines)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    for pool, r in out["results"].items():
        curve = np.mean([s["loss_curve"] for s in r["seeds"]], axis=0)
        ax[0].plot(np.arange(len(curve)) * max(1, out["config"]["steps"] // 50), curve, label=pool)
    ax[0].set_xlabel("step"); ax[0].set_ylabel("train loss"); ax[0].legend()
    names = list(out["results"])
    ax[1].bar(names, [out["results"][n]["acc_mean"] for n in names],
              yerr=[out["results"][n]["acc_std"] for n in names])
    for i, n in enumerate(names):
        ax[1].text(i, 0.02, f"{out['results'][n]['pool_params']} p", ha="center")
    ax[1].set_ylabel("held-out accuracy"); ax[1].set_ylim(0, 1)
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    out = R.start(__file__, argv, args)
    out["n_classes"] = args.keywords * (args.keywords + 1) // 2
    out["results"] = {}
    limit_ms = None
    for pool in args.pools:
        seeds, model = [], None
        for s in range(args.seeds):
            model, r = run_one(pool, s, args, progress)
            seeds.append(r)
        accs = [r["acc"] for r in seeds]
        out["results"][pool] = {"pool_params": n_params(model.pool), "total_params": n_params(model),
                                "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)),
                                "kw_mass_mean": float(np.mean([r["keyword_attention_mass"] for r in seeds])),
                                "seeds": seeds, "timing": time_forward(model, args, limit_ms)}
        limit_ms = out["results"][pool]["timing"]["limit_encoder_ms"]  # same encoder for every pooling
    return R.finish(out, args, "lama_keyword", tables, plot)


if __name__ == "__main__":
    main()
