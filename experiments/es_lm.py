"""Train a small recurrent character LM on the embedded corpus with EGGROLL only (no backprop).

    python experiments/es_lm.py            # a few minutes on 2 CPU cores
    python experiments/es_lm.py --quick    # smoke test, < 40 s

Model: embedding (96 x d) -> a GRU-style minimal recurrent cell (``h' = (1 - z) h + z tanh(x Wx + h Wh + b)``,
``z = sigmoid(x Uz + h Vz + c)``) -> readout (d x 96). Every matrix is perturbed low-rank and
run factored through :func:`lrjax.es.perturbed_call` (the model code knows nothing about ES); the
recurrence is a ``lax.scan`` over time. Fitness: mean next-character log-likelihood on one shared
minibatch of the ``stdlib_chars`` training windows per generation; the estimate goes to Adam.

Reports bits per character (train minibatch and a fixed held-out set) against generations and
wall-clock, writes ``<out>/es_lm.json`` and ``<out>/es_lm.png``. The unigram entropy of the corpus
is printed as a reference point (a model that learned only character frequencies).
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

from lrjax.benchmark import device_info
from lrjax import data
from lrjax.es import Eggroll, FactoredStats


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/es_lm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generations", type=int, default=None, help="default 400 (quick: 12)")
    p.add_argument("--population", type=int, default=None, help="default 256 (quick: 32)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--sigma", type=float, default=0.02)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--d", type=int, default=None, help="hidden size, default 128 (quick: 32)")
    p.add_argument("--batch", type=int, default=None, help="windows per generation, default 16 (quick: 4)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--noise", default="normal", choices=["normal", "rademacher"])
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for k, (q, full) in dict(generations=(12, 400), population=(32, 256), d=(32, 128), batch=(4, 16)).items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    return a


def init_params(key, vocab, d):
    k = jax.random.split(key, 6)
    n = lambda kk, shp, fan: jax.random.normal(kk, shp) / np.sqrt(fan)  # noqa: E731
    return {"embed": n(k[0], (vocab, d), 1.0) * 0.5,
            "cell": {"wx": n(k[1], (d, d), d), "wh": n(k[2], (d, d), d) * 0.5, "b": jnp.zeros(d),
                     "uz": n(k[3], (d, d), d), "vz": n(k[4], (d, d), d), "c": jnp.zeros(d)},
            "readout": {"kernel": n(k[5], (d, vocab), d), "bias": jnp.zeros(vocab)}}


def logits_fn(p, ids):
    """ids [B, T] -> logits [B, T, V]."""
    x = p["embed"][ids]  # [B, T, d]
    c = p["cell"]

    def step(h, xt):
        z = jax.nn.sigmoid(xt @ c["uz"] + h @ c["vz"] + c["c"])
        h = (1 - z) * h + z * jnp.tanh(xt @ c["wx"] + h @ c["wh"] + c["b"])
        return h, h

    h0 = jnp.zeros((ids.shape[0], c["wx"].shape[1]), x.dtype)
    _, hs = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    hs = jnp.swapaxes(hs, 0, 1)
    return hs @ p["readout"]["kernel"] + p["readout"]["bias"]


def nll(p, tokens):
    """Mean next-character negative log-likelihood in nats; tokens [B, T + 1]."""
    lg = logits_fn(p, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), tokens[:, 1:, None], -1))


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train = data.as_arrays(data.load("stdlib_chars", split="train"))["tokens"]
    test = data.as_arrays(data.load("stdlib_chars", split="test"))["tokens"]
    t = args.seq_len + 1
    train, test = np.asarray(train)[:, :t], np.asarray(test)[:, :t]
    counts = np.bincount(train.ravel(), minlength=data.VOCAB_SIZE) + 1e-9
    pr = counts / counts.sum()
    unigram_bpc = float(-(pr * np.log2(pr)).sum())
    held = jnp.asarray(test[: (16 if args.quick else 128)])

    params = init_params(jax.random.key(args.seed), data.VOCAB_SIZE, args.d)
    # the embedding table is indexed (a gather), not multiplied: give it full-rank noise
    es = Eggroll(args.population, rank=args.rank, sigma=args.sigma, shaping="centered_rank",
                 maximize=False, targets=["cell/w.*", "cell/uz", "cell/vz", "readout/kernel"],
                 noise=args.noise)
    st = es.init(jax.random.key(args.seed + 1))
    opt = optax.adam(args.lr)
    os_ = opt.init(params)
    stats = FactoredStats()
    eval_bpc = jax.jit(lambda p: nll(p, held) / np.log(2))

    @jax.jit
    def apply(p, o, g):
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o

    rng = np.random.default_rng(args.seed)
    hist = {"generation": [], "wall_s": [], "train_bpc": [], "heldout_bpc": []}
    every = max(1, args.generations // 40)
    t0 = time.perf_counter()
    for gen in tqdm(range(args.generations + 1), desc="ES char-LM", disable=args.no_progress, file=sys.stdout):
        batch = jnp.asarray(train[rng.choice(train.shape[0], args.batch, replace=False)])
        if gen % every == 0 or gen == args.generations:
            hist["generation"].append(gen)
            hist["wall_s"].append(time.perf_counter() - t0)
            hist["heldout_bpc"].append(float(eval_bpc(params)))
            hist["train_bpc"].append(float(nll(params, batch) / np.log(2)))
        if gen == args.generations:
            break
        g, st, info = es.estimate(st, params, nll, batch, stats=stats if gen == 0 else None)
        params, os_ = apply(params, os_, g)
    res = {"command": " ".join(sys.argv), "config": vars(args),
           "device": device_info(),
           "unigram_bpc": unigram_bpc, "uniform_bpc": float(np.log2(data.VOCAB_SIZE)),
           "factored_kernel_uses": stats.factored, "fallback": stats.fallback,
           "initial_heldout_bpc": hist["heldout_bpc"][0], "final_heldout_bpc": hist["heldout_bpc"][-1],
           "history": hist}
    with open(os.path.join(args.out, "es_lm.json"), "w") as f:
        json.dump(res, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(hist["generation"], hist["heldout_bpc"], label="held-out")
    ax.plot(hist["generation"], hist["train_bpc"], alpha=0.5, label="train minibatch")
    ax.axhline(unigram_bpc, color="k", ls="--", lw=1, label="unigram entropy")
    ax.set_xlabel("generation")
    ax.set_ylabel("bits per character")
    ax.set_title(f"EGGROLL only: N={args.population}, r={args.rank}, d={args.d}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "es_lm.png"), dpi=110)
    print("| generation | wall s | held-out bpc |\n|---|---|---|")
    for i in range(0, len(hist["generation"]), max(1, len(hist["generation"]) // 8)):
        print(f"| {hist['generation'][i]} | {hist['wall_s'][i]:.1f} | {hist['heldout_bpc'][i]:.3f} |")
    print(f"final held-out bpc {res['final_heldout_bpc']:.3f} (start {res['initial_heldout_bpc']:.3f}, "
          f"unigram {unigram_bpc:.3f}); factored kernel uses {stats.factored}, fallbacks {stats.fallback}")


if __name__ == "__main__":
    main()
