"""Synthetic MQAR (multi-query associative recall): KDA vs GDN vs softmax vs plain linear attention.

    python experiments/mqar.py --out results/attention    # "basic" setting, minutes on 2 CPU cores
    python experiments/mqar.py --setting hard --out results/mqar/hard   # capacity-limited setting
    python experiments/mqar.py --quick                    # smoke test

Task (Zoology's MQAR, Arora et al. 2023, in a simple form): a sequence starts with ``--pairs``
key-value pairs ``k_1 v_1 ... k_P v_P`` (keys from the first half of the vocabulary, values from
the second, keys distinct), followed by query keys drawn from the same ``P`` keys; at each query
position the model must output the value paired with that key. Accuracy is over query positions
only (chance ``2 / vocab``).

Models (same everything except the token mixer): embedding -> ``--layers`` pre-norm blocks
(``x + mixer(RMSNorm(x))``, ``x + SwiGLU(RMSNorm(x))``) -> RMSNorm -> linear head; width ``--dim``,
``--heads`` heads. Mixers:

* ``kda``: :class:`lrjax.nn.attention.KimiDeltaAttention` (per-dimension decay);
* ``gdn``: the same layer with ``gate='gdn'`` (Gated DeltaNet, one decay per head);
* ``softmax``: causal multi-head softmax attention (``jax.nn.dot_product_attention``) with the same
  q/k/v projections and causal short convolutions as KDA, plus learned absolute position embeddings
  added to the token embedding (``--softmax-pos learned``, the default; ``none`` gives the old NoPE,
  no-conv baseline together with ``--no-softmax-conv``), so that it is not handicapped against the
  recurrent mixers, which get positions from their short convolutions and the causal recurrence;
* ``linear``: plain causal linear attention ``o_t = sum_{i<=t} (q_t . k_i) v_i`` with the same
  projections, short convolutions and L2-normalized q/k as KDA, no decay and no delta rule.

Named settings (``--setting``; any explicit flag overrides them):

* ``basic`` (default): vocab 64, 8 pairs, T = 64, width 64 (head dim 32). Every mixer with a short
  convolution saturates (KDA 0.997, GDN 0.999, linear 1.000 in ``results/attention``).
* ``medium``: vocab 128, 16 pairs, T = 64, width 32 (2 heads of dim 16): as many pairs as key
  dimensions per head.
* ``hard``: vocab 256, 24 pairs, T = 96, width 32 (2 heads of dim 16). The recurrent state of one head
  is ``16 x 16``, fewer key dimensions than pairs, so the recurrent mixers are capacity-limited while
  softmax attention keeps all ``T`` keys; the gap between them is what MQAR is meant to show.

All models see the same batches, Adam (``--lr``, default 3e-3), ``--steps`` steps; held-out accuracy every
``--eval-every`` steps on a fixed batch. Writes ``<out>/mqar.{json,md,png}``.
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

from lrjax.benchmark import describe, device_info
from lrjax.nn.attention import KimiDeltaAttention, ShortConvolution, SoftmaxAttention
from lrjax.nn.attention.kda import l2_normalize

MIXERS = ("kda", "gdn", "softmax", "linear")
SETTINGS = {"basic": {},
            "medium": {"vocab": 128, "pairs": 16, "seq_len": 64, "dim": 32, "steps": 600, "batch": 32,
                       "eval_every": 50, "eval_batch": 128},
            "hard": {"vocab": 256, "pairs": 24, "seq_len": 96, "dim": 32, "steps": 600, "batch": 32,
                     "eval_every": 50, "eval_batch": 128}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny task and few steps (smoke test)")
    p.add_argument("--out", default="runs/mqar", help="output directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--mixers", default=",".join(MIXERS))
    p.add_argument("--setting", default="basic", choices=sorted(SETTINGS), help="named task size")
    p.add_argument("--softmax-pos", default="learned", choices=("learned", "none"),
                   help="position embeddings of the softmax model")
    p.add_argument("--no-softmax-conv", action="store_true", help="softmax without the short convolutions")
    p.add_argument("--vocab", type=int, default=None, help="default 64 (quick 16)")
    p.add_argument("--pairs", type=int, default=None, help="key-value pairs (default 8; quick 2)")
    p.add_argument("--seq-len", type=int, default=None, help="default 64 (quick 16)")
    p.add_argument("--dim", type=int, default=None, help="model width (default 64; quick 16)")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="default 2 (quick 1)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (quick 8)")
    p.add_argument("--steps", type=int, default=None, help="default 1500 (quick 6)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=None, help="default 100 (quick 3)")
    p.add_argument("--eval-batch", type=int, default=None, help="default 256 (quick 8)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    q = a.quick
    for name, val in SETTINGS[a.setting].items():
        if getattr(a, name) is None and not q:
            setattr(a, name, val)
    for name, full, quick in (("vocab", 64, 16), ("pairs", 8, 2), ("seq_len", 64, 16), ("dim", 64, 16),
                              ("layers", 2, 1), ("batch", 64, 8), ("steps", 1500, 6), ("eval_every", 100, 3),
                              ("eval_batch", 256, 8)):
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    a.mixers = [m for m in a.mixers.split(",") if m]
    bad = [m for m in a.mixers if m not in MIXERS]
    if bad:
        p.error(f"--mixers must be among {MIXERS}, got {bad}")
    if 2 * a.pairs >= a.seq_len or a.pairs > a.vocab // 2:
        p.error("need 2 * pairs < seq_len and pairs <= vocab / 2")
    return a


def make_batch(rng: np.random.Generator, batch: int, vocab: int, pairs: int, seq_len: int):
    """``(tokens [B, T] int32, targets [B, T] int32, mask [B, T] bool)``: targets at query positions."""
    half = vocab // 2
    toks = np.zeros((batch, seq_len), np.int32)
    tgt = np.zeros((batch, seq_len), np.int32)
    mask = np.zeros((batch, seq_len), bool)
    nq = seq_len - 2 * pairs
    for b in range(batch):
        keys = rng.choice(half, size=pairs, replace=False)
        vals = half + rng.integers(0, half, size=pairs)
        toks[b, 0:2 * pairs:2], toks[b, 1:2 * pairs:2] = keys, vals
        which = rng.integers(0, pairs, size=nq)
        toks[b, 2 * pairs:] = keys[which]
        tgt[b, 2 * pairs:] = vals[which]
        mask[b, 2 * pairs:] = True
    return toks, tgt, mask


class LinearAttention(nnx.Module):
    """Plain causal linear attention with KDA's projections, short convs and L2-normalized q/k."""

    def __init__(self, d, heads, rngs):
        self.h, self.dh = heads, d // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nnx.Linear(d, d, use_bias=False, rngs=rngs) for _ in range(4))
        self.q_conv, self.k_conv, self.v_conv = (ShortConvolution(d, 4, rngs=rngs) for _ in range(3))

    def __call__(self, x, cache=None):
        B, T, d = x.shape
        q = l2_normalize(self.q_conv(self.q_proj(x))[0].reshape(B, T, self.h, self.dh)) * self.dh ** -0.5
        k = l2_normalize(self.k_conv(self.k_proj(x))[0].reshape(B, T, self.h, self.dh))
        v = self.v_conv(self.v_proj(x))[0].reshape(B, T, self.h, self.dh)
        s = jnp.einsum("bthd,bshd->bhts", q, k) * jnp.tril(jnp.ones((T, T)))
        o = jnp.einsum("bhts,bshd->bthd", s, v).reshape(B, T, d)
        return self.o_proj(o), None


class ConvSoftmaxAttention(nnx.Module):
    """Causal softmax attention with KDA's q/k/v projections and (optionally) its short convolutions."""

    def __init__(self, d, heads, conv, rngs):
        self.h, self.dh, self.conv = heads, d // heads, conv
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nnx.Linear(d, d, use_bias=False, rngs=rngs) for _ in range(4))
        if conv:
            self.q_conv, self.k_conv, self.v_conv = (ShortConvolution(d, 4, rngs=rngs) for _ in range(3))

    def __call__(self, x, cache=None):
        B, T, d = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv:
            q, k, v = self.q_conv(q)[0], self.k_conv(k)[0], self.v_conv(v)[0]
        q, k, v = (t.reshape(B, T, self.h, self.dh) for t in (q, k, v))
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.reshape(B, T, d)), None


class _RMS(nnx.Module):
    def __init__(self, d):
        self.w = nnx.Param(jnp.ones((d,)))

    def __call__(self, x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * self.w[...]


class Model(nnx.Module):
    def __init__(self, mixer, vocab, d, heads, layers, rngs, *, seq_len=None, softmax_pos="none",
                 softmax_conv=False):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = (nnx.Embed(seq_len, d, rngs=rngs) if mixer == "softmax" and softmax_pos == "learned"
                    else None)

        def mk():
            if mixer in ("kda", "gdn"):
                return KimiDeltaAttention(d, num_heads=heads, head_dim=d // heads, gate=mixer, chunk_size=16, rngs=rngs)
            if mixer == "softmax":
                if softmax_conv:
                    return ConvSoftmaxAttention(d, heads, True, rngs)
                return SoftmaxAttention(d, num_heads=heads, rngs=rngs)
            return LinearAttention(d, heads, rngs)

        self.mixers = nnx.List([mk() for _ in range(layers)])
        self.n1 = nnx.List([_RMS(d) for _ in range(layers)])
        self.n2 = nnx.List([_RMS(d) for _ in range(layers)])
        self.up = nnx.List([nnx.Linear(d, 8 * d, rngs=rngs) for _ in range(layers)])
        self.down = nnx.List([nnx.Linear(4 * d, d, rngs=rngs) for _ in range(layers)])
        self.nf = _RMS(d)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, toks):
        x = self.embed(toks)
        if self.pos is not None:
            x = x + self.pos(jnp.arange(toks.shape[1]))
        for i in range(len(self.mixers)):
            x = x + self.mixers[i](self.n1[i](x))[0]
            a, b = jnp.split(self.up[i](self.n2[i](x)), 2, axis=-1)
            x = x + self.down[i](jax.nn.silu(a) * b)
        return self.head(self.nf(x))


def train(mixer, args, progress):
    model = Model(mixer, args.vocab, args.dim, args.heads, args.layers, nnx.Rngs(args.seed), seq_len=args.seq_len,
                  softmax_pos=args.softmax_pos, softmax_conv=not args.no_softmax_conv)
    gdef, params = nnx.split(model)
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    opt = optax.adam(args.lr)
    opt_state = opt.init(params)

    def loss_fn(p, toks, tgt, mask):
        logits = nnx.merge(gdef, p)(toks)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
        acc = (jnp.argmax(logits, -1) == tgt)
        m = mask.astype(jnp.float32)
        return jnp.sum(ce * m) / jnp.sum(m), jnp.sum(acc * m) / jnp.sum(m)

    @jax.jit
    def step(p, s, toks, tgt, mask):
        (loss, acc), gr = jax.value_and_grad(loss_fn, has_aux=True)(p, toks, tgt, mask)
        up, s = opt.update(gr, s, p)
        return optax.apply_updates(p, up), s, loss, acc

    evaluate = jax.jit(loss_fn)
    data_rng = np.random.default_rng(args.seed + 1)      # identical batches for every mixer
    ev = make_batch(np.random.default_rng(10_000 + args.seed), args.eval_batch, args.vocab, args.pairs, args.seq_len)
    hist = {"step": [], "eval_loss": [], "eval_acc": [], "train_loss": []}
    t_step = []
    for it in tqdm(range(1, args.steps + 1), desc=mixer, disable=not progress, file=sys.stdout, leave=False):
        b = make_batch(data_rng, args.batch, args.vocab, args.pairs, args.seq_len)
        t0 = time.perf_counter()
        params, opt_state, loss, acc = step(params, opt_state, *b)
        loss = float(loss)
        if it > 1:
            t_step.append(time.perf_counter() - t0)
        if it % args.eval_every == 0 or it == args.steps:
            el, ea = evaluate(params, *ev)
            hist["step"].append(it)
            hist["eval_loss"].append(float(el))
            hist["eval_acc"].append(float(ea))
            hist["train_loss"].append(loss)
    return {"params": n_params, "history": hist, "final_eval_acc": hist["eval_acc"][-1],
            "final_eval_loss": hist["eval_loss"][-1], "best_eval_acc": max(hist["eval_acc"]),
            "median_step_ms": float(np.median(t_step) * 1e3) if t_step else None}


def table(out):
    L = ["| mixer | params | final acc | best acc | final loss | median step ms |", "|---|---|---|---|---|---|"]
    for m, r in out["mixers"].items():
        ms = "-" if r["median_step_ms"] is None else f"{r['median_step_ms']:.1f}"
        L.append(f"| {m} | {r['params']} | {r['final_eval_acc']:.3f} | {r['best_eval_acc']:.3f} | "
                 f"{r['final_eval_loss']:.3f} | {ms} |")
    return "\n".join(L)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, r in out["mixers"].items():
        ax.plot(r["history"]["step"], r["history"]["eval_acc"], "o-", ms=3, label=m)
    c = out["config"]
    ax.axhline(2 / c["vocab"], color="gray", ls=":", label="chance")
    ax.set(xlabel="step", ylabel="held-out query accuracy",
           title=f"MQAR ({c.get('setting', 'basic')}): vocab {c['vocab']}, {c['pairs']} pairs, T={c['seq_len']}, d={c['dim']}, {c['layers']} layers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    device = device_info()
    cmd = "python experiments/mqar.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"reproduce: {cmd}\ndevice: {describe(device)}")
    out = {"command": cmd, "device": device, "config": {k: v for k, v in vars(args).items()}, "mixers": {}}
    for m in args.mixers:
        out["mixers"][m] = train(m, args, not args.no_progress)
        print(f"{m}: final acc {out['mixers'][m]['final_eval_acc']:.3f}", flush=True)
    out["table_markdown"] = table(out)
    out["wall_s"] = time.perf_counter() - t0
    out["device_after"] = {"load_avg": device_info()["load_avg"]}
    print(out["table_markdown"])
    with open(os.path.join(args.out, "mqar.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(args.out, "mqar.md"), "w") as f:
        f.write(f"# MQAR ({args.setting})\n\n`{cmd}`\n\ndevice: {describe(device)}\n\n{out['table_markdown']}\n")
    plot(out, os.path.join(args.out, "mqar.png"))
    print(f"\nwrote {args.out}/mqar.{{json,md,png}} in {out['wall_s']:.1f} s")
    return out


if __name__ == "__main__":
    main()
