"""Low-rank KV caches on the quickstart char transformer: Palu (whitened SVD) vs plain SVD at
25/50/100% cache, and an MLA variant trained from scratch at the same cache sizes.

    python experiments/kv_cache.py            # a few minutes on 2 CPU cores
    python experiments/kv_cache.py --quick    # smoke test, tiny model, seconds

1. Pretrains :class:`lrjax.models.CharTransformer` (the quickstart model: d_model 128, 2 layers,
   4 heads, d_ff 512) on the ``stdlib_chars`` corpus (``train[:60%]``, the quickstart's pretraining
   slice; every 10th window held out), with the quickstart's optimizer and schedule
   (``experiments/quickstart.py``: ``make_fns``, ``lr_schedule``).
2. Calibration: the input of every layer's ``k``/``v`` projection (``ln1(h)``) on ``--calib-windows``
   training windows (one jitted pass; :func:`lrjax.compress.collect_activations` finds the same rows
   by interpreting the model's jaxpr op by op, which costs a compile per op on CPU).
3. Post-training KV compression (:func:`lrjax.nn.attention.kvcache.compress_kv`, head groups of
   ``--group-size``): ``palu`` (whitened SVD) and ``svd`` (plain SVD), uniform ranks, at each
   ``--ratios`` cache ratio; also ``palu`` with the energy allocation across layers/groups. Each is
   evaluated on the held-out windows with the attention recomputed from the cached latents
   (:func:`latent_self_attention`: ``K = (x A_k) B_k``, ``V = (x A_v) B_v``).
4. MLA (:class:`lrjax.nn.attention.mla.MultiHeadLatentAttention`) in place of every attention
   layer, trained from scratch with the same data, steps and schedule, latent width
   ``d_c = ratio * 2 d_model`` (the same cache numbers per token as Palu at that ratio) for each
   ``--mla-ratios``.

Reported per row: cache numbers per token (all layers), cache bytes of one ``seq_len`` sequence
in float32, the ratio to the full K/V cache, held-out loss (nats/char), bits/char and perplexity,
and the median held-out forward time with its ratio to the plain model's forward. The **limit** is
the full-cache model itself (its loss and its plain forward, measured in the same run); Palu at
100% must reproduce it (checked: ``palu_full_matches``).

Writes ``<out>/kv_cache.{json,md,png}``. Timings are medians of ``block_until_ready`` calls after
warm-up on a shared, loaded machine (load average in the record).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report as R  # noqa: E402
from quickstart import OPT, lr_schedule, make_fns  # noqa: E402

from lrjax import data  # noqa: E402
from lrjax.benchmark import blocking, summarize, time_round_robin  # noqa: E402
from lrjax.models import CharTransformer, apply_fn  # noqa: E402
from lrjax.models.char_transformer import MLP  # noqa: E402
from lrjax.nn.attention.kvcache import compress_kv, latent_self_attention  # noqa: E402
from lrjax.nn.attention.mla import MultiHeadLatentAttention  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    p.add_argument("--out", default=None, help="output dir (default results/kv_cache; quick: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps of each model, default 300 (quick: 12)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step, default 16 (quick: 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (the quickstart's pretraining lr)")
    p.add_argument("--d-model", type=int, default=None, help="default 128 (quick: 32)")
    p.add_argument("--n-layers", type=int, default=None, help="default 2 (quick: 1)")
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=None, help="default 512 (quick: 64)")
    p.add_argument("--group-size", type=int, default=None, help="heads per Palu group, default 4 (quick: 2)")
    p.add_argument("--ratios", default=None, help="cache ratios for Palu / SVD, default 0.25,0.5,1.0 (quick: 0.5,1.0)")
    p.add_argument("--mla-ratios", default=None, help="cache ratios for MLA, default 0.25,0.5 (quick: 0.25)")
    p.add_argument("--calib-windows", type=int, default=None, help="default 64 (quick: 8)")
    p.add_argument("--eval-windows", type=int, default=None, help="default 128 (quick: 16)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats, default 10 (quick: 2)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(steps=(12, 300), batch=(8, 16), d_model=(32, 128), n_layers=(1, 2), d_ff=(64, 512),
                group_size=(2, 4), calib_windows=(8, 64), eval_windows=(16, 128), repeats=(2, 10),
                mla_ratios=("0.25", "0.25,0.5"), ratios=("0.5,1.0", "0.25,0.5,1.0"))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    a.ratios = [float(r) for r in str(a.ratios).split(",")]
    a.mla_ratios = [float(r) for r in str(a.mla_ratios).split(",")]
    if a.out is None:
        a.out = tempfile.mkdtemp(prefix="kv_cache_") if a.quick else "results/kv_cache"
    return a


# ------------------------------------------------------------------------------------ data
def load(args):
    kw = {"config": "small"} if args.quick else {}
    toks = data.as_arrays(data.load("stdlib_chars", split="train[:60%]", **kw), keys="tokens")["tokens"]
    held = np.arange(len(toks)) % 10 == 9
    return toks[~held], toks[held][:args.eval_windows]


def batches(train, args, seed):
    for b in data.batches({"tokens": train}, args.batch, seed=seed, num_steps=args.steps):
        yield jnp.asarray(b["tokens"])


def train_model(model, train, args, progress, name):
    graphdef, state = nnx.split(model)
    apply = apply_fn(graphdef)
    step, _, _ = make_fns(lambda tr, fr, tok: apply(tr, tok), OPT)
    opt_state = OPT.init(state)
    lr = lr_schedule(args.lr, args.steps)
    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    losses = []
    for i, tok in enumerate(tqdm(list(batches(train, args, args.seed)), desc=name, disable=not progress,
                                 leave=False, file=sys.stdout), 1):
        state, opt_state, loss = step(state, opt_state, None, tok, lr(i - 1))
        losses.append(float(loss))
    return graphdef, state, {"train_loss_last": float(np.mean(losses[-5:])), "train_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------ models
class MLABlock(nnx.Module):
    """The char transformer's pre-LN block with MLA in place of its attention."""

    def __init__(self, d_model, n_heads, d_ff, d_latent, *, rngs):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = MultiHeadLatentAttention(d_model, n_heads, d_latent, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp = MLP(d_model, d_ff, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class MLACharTransformer(CharTransformer):
    """:class:`CharTransformer` with every block's attention replaced by MLA (latent width ``d_latent``)."""

    def __init__(self, vocab_size, d_model, n_layers, n_heads, d_ff, max_len, d_latent, *, rngs):
        super().__init__(vocab_size, d_model, n_layers, n_heads, d_ff, max_len, rngs=rngs)
        self.blocks = nnx.List([MLABlock(d_model, n_heads, d_ff, d_latent, rngs=rngs) for _ in range(n_layers)])


def latent_forward(graphdef, n_heads):
    """``(state, kvs, ids) -> logits`` of the char transformer with every layer's K/V recomputed from
    the latent cache (:func:`latent_self_attention`); the other weights are the model's."""
    def fwd(state, kvs, ids):
        m = nnx.merge(graphdef, state)
        h = m.tok_embed(ids) + m.pos_embed[...][:ids.shape[1]]
        for blk, kv in zip(m.blocks, kvs):
            a = blk.ln1(h)
            h = h + latent_self_attention(a, blk.attn.q.kernel[...], blk.attn.o.kernel[...], kv, n_heads=n_heads)
            h = h + blk.mlp(blk.ln2(h))
        return m.head(m.ln_f(h))
    return fwd


def calib_inputs(graphdef):
    """Jitted ``(state, ids) -> [L, B T, d]``: every block's ``ln1(h)``, the rows its k/v projections see."""
    @jax.jit
    def fn(state, ids):
        m = nnx.merge(graphdef, state)
        h = m.tok_embed(ids) + m.pos_embed[...][:ids.shape[1]]
        xs = []
        for blk in m.blocks:
            a = blk.ln1(h)
            xs.append(a.reshape(-1, a.shape[-1]))
            h = blk(h)
        return jnp.stack(xs)
    return fn


def nll(logits, tok):
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.mean(jnp.take_along_axis(lp, tok[:, 1:, None], -1))


# ------------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    out = R.start(__file__, argv, args)
    progress = not args.no_progress
    train, ev = load(args)
    seq_len = int(train.shape[1] - 1)
    ev = jnp.asarray(ev)
    d, L, H = args.d_model, args.n_layers, args.n_heads
    out["seq_len"], out["n_eval_windows"] = seq_len, int(ev.shape[0])
    print(f"stdlib_chars train[:60%]: {len(train)} train windows, {ev.shape[0]} held-out x {seq_len + 1} chars")

    # ---- 1. the full-cache model (the limit)
    model = CharTransformer(data.VOCAB_SIZE, d_model=d, n_layers=L, n_heads=H, d_ff=args.d_ff, max_len=seq_len,
                            rngs=nnx.Rngs(args.seed))
    graphdef, state, tinfo = train_model(model, train, args, progress, "base")
    apply = apply_fn(graphdef)
    base_eval = jax.jit(lambda s, tok: nll(apply(s, tok[:, :-1]), tok))
    lat_fwd = latent_forward(graphdef, H)
    lat_eval = jax.jit(lambda s, kvs, tok: nll(lat_fwd(s, kvs, tok[:, :-1]), tok))
    full_width = L * 2 * d  # numbers per token of the plain K/V cache
    isz = 4  # float32 cache

    def row(name, method, ratio_target, width, loss, extra=None):
        r = {"name": name, "method": method, "target_ratio": ratio_target, "cache_numbers_per_token": int(width),
             "cache_ratio": width / full_width, "cache_bytes_seq": int(width * seq_len * isz),
             "loss": float(loss), "bits_per_char": float(loss) / math.log(2), "ppl": float(math.exp(loss))}
        r.update(extra or {})
        return r

    base_loss = float(base_eval(state, ev))
    rows = [row("full K/V cache (limit)", "full", 1.0, full_width, base_loss, {"train": tinfo})]
    print(f"base: held-out loss {base_loss:.4f} ({base_loss / math.log(2):.3f} bits/char)")

    # ---- 2. calibration activations of the k/v projections
    calib_ids = jnp.asarray(train[:args.calib_windows, :-1])
    x = calib_inputs(graphdef)(state, calib_ids)
    w_k = jnp.stack([state["blocks"][i]["attn"]["k"]["kernel"][...] for i in range(L)])
    w_v = jnp.stack([state["blocks"][i]["attn"]["v"]["kernel"][...] for i in range(L)])
    out["calib_rows"] = int(x.shape[1])

    # ---- 3. post-training KV compression
    timed = {"full (plain forward)": blocking(base_eval, state, ev)}
    configs = [("palu", "whitened", "uniform"), ("svd", "svd", "uniform"), ("palu_energy", "whitened", "energy")]
    plans = {}
    for ratio in args.ratios:
        for label, method, alloc in configs:
            if alloc == "energy" and (ratio >= 1.0 or args.quick):  # quick: the allocation is unit-tested
                continue
            kvs, plan = compress_kv(w_k, w_v, x, n_heads=H, ratio=ratio, group_size=args.group_size,
                                    method=method, allocation=alloc)
            loss = float(lat_eval(state, kvs, ev))
            name = f"{label} {int(round(ratio * 100))}%"
            plans[name] = plan.as_dict()
            rows.append(row(name, label, ratio, sum(plan.widths), loss,
                            {"ranks_k": plan.ranks_k, "ranks_v": plan.ranks_v, "rel_err_k": plan.rel_err_k,
                             "rel_err_v": plan.rel_err_v}))
            if label != "palu_energy":
                timed[name] = blocking(lat_eval, state, kvs, ev)
            print(f"{name:18s} width {sum(plan.widths):4d}/{full_width}  loss {loss:.4f}  "
                  f"rel.err k {np.mean(plan.rel_err_k):.3f} v {np.mean(plan.rel_err_v):.3f}")
    full_rows = [r for r in rows if r["method"] == "palu" and r["target_ratio"] >= 1.0]
    out["palu_full_matches"] = {"abs_loss_diff": abs(full_rows[0]["loss"] - base_loss) if full_rows else None}

    # ---- 4. MLA from scratch at matched cache size
    for ratio in args.mla_ratios:
        dc = max(1, int(round(ratio * 2 * d)))
        mmodel = MLACharTransformer(data.VOCAB_SIZE, d, L, H, args.d_ff, seq_len, dc, rngs=nnx.Rngs(args.seed))
        mg, ms, minfo = train_model(mmodel, train, args, progress, f"mla d_c={dc}")
        mapply = apply_fn(mg)
        meval = jax.jit(lambda s, tok, f=mapply: nll(f(s, tok[:, :-1]), tok))
        loss = float(meval(ms, ev))
        name = f"mla {int(round(ratio * 100))}% (d_c={dc})"
        n_params = int(sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(ms)))
        rows.append(row(name, "mla", ratio, L * dc, loss, {"d_latent": dc, "params": n_params, "train": minfo}))
        timed[name] = blocking(meval, ms, ev)
        print(f"{name:18s} width {L * dc:4d}/{full_width}  loss {loss:.4f}")
    rows[0]["params"] = int(sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(state)))

    # ---- timing (held-out forward) against the plain forward
    times = time_round_robin(timed, args.repeats, desc="forward", progress=progress)
    lim = summarize(times["full (plain forward)"])["median_ms"]
    out["timing"] = {k: {**summarize(v), "ratio_to_limit": summarize(v)["median_ms"] / lim} for k, v in times.items()}
    for r in rows:
        key = "full (plain forward)" if r["method"] == "full" else r["name"]
        if key in out["timing"]:
            r["forward_ms"] = out["timing"][key]["median_ms"]
            r["forward_ratio"] = out["timing"][key]["ratio_to_limit"]
        r["loss_increase"] = r["loss"] - base_loss
    out["rows"], out["plans"], out["base_loss"] = rows, plans, base_loss
    R.finish(out, args, "kv_cache", tables, plot)
    return out


def tables(out) -> str:
    cfg = out["config"]
    head = (f"KV cache of the char transformer (d_model {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} "
            f"heads, {cfg['steps']} training steps; held-out {out['n_eval_windows']} windows x {out['seq_len']} chars; "
            f"Palu/SVD head groups of {cfg['group_size']}; {out['calib_rows']} calibration rows)\n\n"
            "| cache | numbers/token | bytes/seq (f32) | ratio to full | loss (nats) | bits/char | ppl | "
            "delta loss | forward ms | x plain fwd |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in out["rows"]:
        fm = f"{r['forward_ms']:.2f}" if "forward_ms" in r else "-"
        fr = f"{r['forward_ratio']:.2f}" if "forward_ratio" in r else "-"
        lines.append(f"| {r['name']} | {r['cache_numbers_per_token']} | {r['cache_bytes_seq']} | {r['cache_ratio']:.3f} | "
                     f"{r['loss']:.4f} | {r['bits_per_char']:.3f} | {r['ppl']:.3f} | {r['loss_increase']:+.4f} | "
                     f"{fm} | {fr} |")
    d = out["palu_full_matches"]["abs_loss_diff"]
    tail = (f"\n\nPalu at 100% vs the full model: |delta loss| = {d:.2e}." if d is not None else "")
    return head + "\n".join(lines) + tail


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    marks = {"palu": "o-", "svd": "s--", "palu_energy": "^:", "mla": "D"}
    for m, st in marks.items():
        rs = sorted([r for r in out["rows"] if r["method"] == m], key=lambda r: r["cache_ratio"])
        if rs:
            ax.plot([r["cache_ratio"] for r in rs], [r["bits_per_char"] for r in rs], st, label=m)
    ax.axhline(out["base_loss"] / math.log(2), color="k", lw=0.8, label="full cache (limit)")
    ax.set_xlabel("cache size / full K/V cache")
    ax.set_ylabel("held-out bits/char")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Low-rank KV caches: char transformer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
