"""LoLA-SpecViT on CPU: LoRA in a tiny local-window ViT on synthetic hyperspectral scenes, with SGDR
(cosine annealing with warm restarts, from ``optax`` schedules) vs plain cosine vs full fine-tuning,
at 1% and 5% labels.

    python experiments/lola_specvit.py --out results/lola_specvit   # the committed run (minutes, 2 CPU cores)
    python experiments/lola_specvit.py --quick                      # smoke test (writes runs/lola_specvit)

LoLA-SpecViT (FadiZidiDz/LoLA-SpecViT-Model) fine-tunes a hyperspectral GCViT with LoRA on the
attention and MLP projections and a cyclical learning rate (``CosineAnnealingWarmRestarts``,
``T_0 = 10`` epochs, ``T_mult = 2``, after a linear warm-up; AdamW, weight decay 0.01, label
smoothing 0.1, gradient clipping 0.5). This script, scaled down to seconds:

* **Scenes** (:func:`make_scene`, fixed seeds): ``size x size`` pixels, 15 bands. A class map from
  the argmax of Gaussian-smoothed random fields (spatially coherent regions); one smooth spectrum
  per class (a shared base curve plus class-specific Gaussian absorption/reflection bumps); each
  pixel = its class spectrum x a smooth illumination field + spatially smoothed spectral noise +
  white noise; bands standardized. The pretraining scene and the target scene use different class
  spectra (different seeds) and a different class map.
* **Model**: :class:`lrjax.models.window_vit.WindowViT` (one token per pixel of a ``9 x 9`` patch,
  a 3 x 3-window block then a global block, centre-token readout) + a separate linear head.
* **Pretraining** on the source scene (many labels); then a new head for the target scene's
  classes and fine-tuning on 1% / 5% of its pixels (stratified, at least one per class), tested on
  all other pixels: OA (overall accuracy), AA (mean per-class recall), Cohen's kappa.
* **Methods** (same steps, batch, AdamW, clipping and label smoothing; the head is trained in all):
  full fine-tuning with warm-up + cosine; ``lrjax.LoRA`` (rank ``--rank``, alpha ``2 r`` as the
  paper's 32/16) on the q/k/v/o/fc1/fc2 kernels through :func:`lrjax.factored`, with warm-up + cosine
  or warm-up + SGDR (``optax.sgdr_schedule``: cycles ``T_0, 2 T_0, 4 T_0`` filling the run,
  ``eta_min = 1e-3 x peak``); the paper's gated "enhanced LoRA" option
  (:class:`~lrjax.models.window_vit.EnhancedLoRALinear`, ``y = x W + b + sigmoid(x G) (s x A B) + x R``)
  with SGDR -- its ``G`` and ``R`` are **full-rank** trainable matrices, so its trainable count is
  larger than full fine-tuning's kernels (stated in the table); and a head-only linear probe.
* **Timing**: median step time per method (jit, warmed, ``block_until_ready``) with the head-only
  step (a forward through the frozen backbone + the head's update) as the limit, and the inference
  forward of the base model (the limit), the merged LoRA model and the unmergeable enhanced model.

Writes ``<out>/lola_specvit.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

import lrjax
from lrjax.benchmark import blocking, describe, summarize, time_round_robin
from lrjax.models.window_vit import ADAPTER_TARGETS, ENHANCED_TRAINABLE, WindowViT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report as R  # noqa: E402

METHODS = ("full_cosine", "lora_cosine", "lora_sgdr", "enhanced_sgdr", "head_only")
LABELS = {"full_cosine": "full fine-tuning, cosine", "lora_cosine": "LoRA r={r}, cosine",
          "lora_sgdr": "LoRA r={r}, SGDR", "enhanced_sgdr": "gated enhanced LoRA r={r} (full-rank G, R), SGDR",
          "head_only": "head only (linear probe), cosine"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/lola_specvit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=None, help="label draws per setting, default 3 (quick: 1)")
    p.add_argument("--size", type=int, default=None, help="scene side, default 64 (quick: 24)")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--bands", type=int, default=15)
    p.add_argument("--patch", type=int, default=9)
    p.add_argument("--d-model", type=int, default=None, help="default 32 (quick: 16)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--fractions", default="0.01,0.05", help="labelled fractions of the target scene")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default 600 (quick: 10)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps, default 280 (quick: 7)")
    p.add_argument("--batch", type=int, default=None, help="default 32 (quick: 8)")
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--full-lr", type=float, default=1e-3)
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--head-lr", type=float, default=3e-3)
    p.add_argument("--repeats", type=int, default=None, help="timed steps/forwards, default 20 (quick: 2)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(seeds=(1, 3), size=(24, 64), d_model=(16, 32), pretrain_steps=(10, 600), steps=(7, 280),
                batch=(8, 32), repeats=(2, 20))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    a.fractions = [float(x) for x in a.fractions.split(",")]
    return a


# ------------------------------------------------------------------------------------- data
def _smooth(field, sigma):
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(field, sigma=sigma, mode="wrap")


def make_scene(seed: int, size: int, n_classes: int, bands: int = 15, noise: float = 0.02):
    """A synthetic hyperspectral scene: ``(cube [size, size, bands] float32 standardized per band,
    labels [size, size] int32)`` from a fixed ``seed`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    fields = np.stack([_smooth(rng.normal(size=(size, size)), size / 10) for _ in range(n_classes)])
    labels = np.argmax(fields, axis=0).astype(np.int32)
    wl = np.linspace(0.0, 1.0, bands)
    base = 0.4 + 0.2 * wl + 0.1 * np.sin(3 * wl + rng.uniform(0, 3))
    spectra = []
    for _ in range(n_classes):
        s = base.copy()
        for _ in range(3):
            mu, sd, amp = rng.uniform(0, 1), rng.uniform(0.05, 0.2), rng.uniform(-0.12, 0.12)
            s = s + amp * np.exp(-0.5 * ((wl - mu) / sd) ** 2)
        spectra.append(s)
    spectra = np.stack(spectra)
    illum = 1.0 + 0.15 * _smooth(rng.normal(size=(size, size)), size / 8)[..., None] / 0.05
    spatial_noise = np.stack([_smooth(rng.normal(size=(size, size)), 2.0) for _ in range(bands)], -1)
    cube = spectra[labels] * np.clip(illum, 0.6, 1.4) + 0.04 * spatial_noise + noise * rng.normal(size=(size, size, bands))
    cube = (cube - cube.mean((0, 1))) / cube.std((0, 1))
    return cube.astype(np.float32), labels


def patches(cube, patch):
    """Every pixel's ``patch x patch`` neighbourhood (reflect padding): ``[size*size, P, P, bands]``."""
    r = patch // 2
    pad = np.pad(cube, ((r, r), (r, r), (0, 0)), mode="reflect")
    h, w, _ = cube.shape
    win = np.lib.stride_tricks.sliding_window_view(pad, (patch, patch), axis=(0, 1))  # [h, w, bands, P, P]
    return np.ascontiguousarray(win.transpose(0, 1, 3, 4, 2).reshape(h * w, patch, patch, -1))


def stratified(labels, frac, rng, n_classes):
    """Indices of a stratified labelled subset (``frac`` of each class, at least one) and the rest."""
    idx = []
    for c in range(n_classes):
        cls = np.flatnonzero(labels == c)
        if len(cls):
            idx.append(rng.choice(cls, max(1, int(round(frac * len(cls)))), replace=False))
    tr = np.concatenate(idx)
    te = np.setdiff1d(np.arange(len(labels)), tr)
    return tr, te


# ---------------------------------------------------------------------------------- metrics
def scores(pred, y, n_classes):
    """OA, AA (mean recall over classes present in ``y``) and Cohen's kappa."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (y, pred), 1)
    n = cm.sum()
    oa = np.trace(cm) / n
    present = cm.sum(1) > 0
    aa = np.mean(np.diag(cm)[present] / cm.sum(1)[present])
    pe = float((cm.sum(0) * cm.sum(1)).sum()) / n ** 2
    kappa = (oa - pe) / (1 - pe) if pe < 1 else 1.0
    return {"oa": float(oa), "aa": float(aa), "kappa": float(kappa)}


# --------------------------------------------------------------------------------- training
def cosine(peak, steps, warmup):
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps, peak * 1e-3)


def sgdr(peak, steps, warmup):
    """Warm-up, then cosine cycles of T_0, 2 T_0, 4 T_0 (T_mult = 2) filling ``steps``: ``optax.sgdr_schedule``."""
    t0 = max(1, (steps - warmup) // 7)
    lens = [warmup + t0, 2 * t0, steps - warmup - 3 * t0]
    kw = [dict(init_value=0.0 if i == 0 else peak, peak_value=peak, warmup_steps=warmup if i == 0 else 0,
               decay_steps=n, end_value=peak * 1e-3) for i, n in enumerate(lens)]
    return optax.sgdr_schedule(kw)


def adamw(schedule):
    return optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(schedule, weight_decay=0.01))


def head_init(key, d, n):
    return {"kernel": 0.02 * jax.random.normal(key, (d, n), jnp.float32), "bias": jnp.zeros((n,), jnp.float32)}


def head_apply(h, z):
    return z @ h["kernel"] + h["bias"]


def ce(logits, y, n_classes, smoothing=0.1):
    return jnp.mean(optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(y, n_classes), smoothing)))


def make_step(logits_fn, opt, n_classes):
    @jax.jit
    def step(tr, st, fz, x, y):
        val, g = jax.value_and_grad(lambda t: ce(logits_fn(t, fz, x), y, n_classes))(tr)
        up, st = opt.update(g, st, tr)
        return optax.apply_updates(tr, up), st, val
    return step


_JIT = {}


CHUNK = 512


def first_chunk(x, chunk=CHUNK):
    x = x[:chunk]
    return np.concatenate([x, np.zeros((chunk - len(x), *x.shape[1:]), x.dtype)]) if len(x) < chunk else x


def compiled(logits_fn):
    """``jax.jit(logits_fn)``, one per model function (shared by prediction, the merge check and timing)."""
    return _JIT.setdefault(id(logits_fn), (logits_fn, jax.jit(logits_fn)))[1]


def predict(logits_fn, tr, fz, x, chunk=CHUNK):
    """Class predictions for ``x`` in fixed-size chunks (the last one padded): one compilation per model."""
    f = compiled(logits_fn)
    n = len(x)
    pad = (-n) % chunk
    xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    out = [np.asarray(jnp.argmax(f(tr, fz, jnp.asarray(xp[i:i + chunk])), -1)) for i in range(0, len(xp), chunk)]
    return np.concatenate(out)[:n]


def count(tree):
    return int(sum(x.size for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------- main
def run(args, progress):
    C = args.classes
    cube_a, lab_a = make_scene(args.seed + 11, args.size, C, args.bands)
    cube_b, lab_b = make_scene(args.seed + 23, args.size, C, args.bands)
    xa, ya = patches(cube_a, args.patch), lab_a.reshape(-1)
    xb, yb = patches(cube_b, args.patch), lab_b.reshape(-1)
    n_heads = 2
    model = WindowViT(args.bands, args.patch, d_model=args.d_model, n_heads=n_heads, d_ff=2 * args.d_model,
                      windows=(3, args.patch), rngs=nnx.Rngs(args.seed))
    graphdef, state0 = nnx.split(model)
    feat = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
    n_backbone = count(state0)
    d = args.d_model
    res = {"scene": {"size": args.size, "classes": C, "bands": args.bands, "patch": args.patch,
                     "class_counts_target": np.bincount(yb, minlength=C).tolist()},
           "model": {"backbone_params": n_backbone, "d_model": d, "blocks": 2, "windows": [3, args.patch]}}

    # ---- pretraining on scene A (half its pixels labelled)
    rng = np.random.default_rng(args.seed)
    tr_a, te_a = stratified(ya, 0.5, rng, C)
    full_fn = lambda tr, fz, x: head_apply(tr[1], feat(tr[0], x))  # noqa: E731
    opt = adamw(cosine(args.pretrain_lr, args.pretrain_steps, max(1, args.pretrain_steps // 20)))
    tr = (state0, head_init(jax.random.key(1), d, C))
    st = opt.init(tr)
    step = make_step(full_fn, opt, C)
    xa_j, ya_j = jnp.asarray(xa), jnp.asarray(ya)
    t0 = time.perf_counter()
    for i in tqdm(range(args.pretrain_steps), desc="pretrain", disable=not progress, leave=False, file=sys.stdout):
        idx = rng.choice(tr_a, args.batch)
        tr, st, val = step(tr, st, None, xa_j[idx], ya_j[idx])
    jax.block_until_ready(tr)
    pre = scores(predict(full_fn, tr, None, xa)[te_a], ya[te_a], C)
    pretrained = tr[0]
    res["pretrain"] = {**pre, "steps": args.pretrain_steps, "wall_s": time.perf_counter() - t0}
    # the pretrained backbone on scene B with only a new linear probe is the head_only row
    print(f"pretrain on scene A: {args.pretrain_steps} steps, held-out OA {pre['oa']:.3f} "
          f"({res['pretrain']['wall_s']:.1f}s); backbone {n_backbone:,} params")

    # ---- methods on scene B
    key = jax.random.key(args.seed + 5)
    rp = lrjax.LoRA(rank=args.rank, alpha=2.0 * args.rank, targets=ADAPTER_TARGETS)
    base, ad0 = rp.init(key, pretrained)
    g = lrjax.factored(feat, rp)
    stats = lrjax.reparam.FactoredStats()
    jax.eval_shape(lrjax.factored(feat, rp, stats=stats), base, ad0, xb[:2])
    enh = WindowViT(args.bands, args.patch, d_model=d, n_heads=n_heads, d_ff=2 * d, windows=(3, args.patch),
                    enhanced_rank=args.rank, rngs=nnx.Rngs(args.seed + 7))
    g_e, st_e = nnx.split(enh)
    pflat, eflat = lrjax.tree.flatten(pretrained), lrjax.tree.flatten(st_e)
    st_e = lrjax.tree.replace(st_e, {p: v for p, v in pflat.items() if p in eflat})
    e_train0 = {p: v for p, v in eflat.items() if re.fullmatch(ENHANCED_TRAINABLE, p)}
    feat_e = lambda st, x: nnx.merge(g_e, st)(x)  # noqa: E731
    warm = max(1, args.steps // 20)

    def setup(method, head0):
        if method == "full_cosine":
            return full_fn, (pretrained, head0), None, adamw(cosine(args.full_lr, args.steps, warm))
        if method == "head_only":
            return (lambda tr, fz, x: head_apply(tr, feat(fz, x)), head0, pretrained,
                    adamw(cosine(args.head_lr, args.steps, warm)))
        if method.startswith("lora"):
            sch = (sgdr if method == "lora_sgdr" else cosine)(args.lora_lr, args.steps, warm)
            return (lambda tr, fz, x: head_apply(tr[1], g(fz, tr[0], x)), (ad0, head0), base, adamw(sch))
        return (lambda tr, fz, x: head_apply(tr[1], feat_e(lrjax.tree.replace(fz, tr[0]), x)),
                (e_train0, head0), st_e, adamw(sgdr(args.lora_lr, args.steps, warm)))

    steps_cache, results, timing_calls = {}, {}, {}
    for method in METHODS:
        logits_fn, tr0, fz, opt = setup(method, head_init(jax.random.key(2), d, C))
        step = steps_cache.setdefault(method, make_step(logits_fn, opt, C))
        n_train = count(tr0)
        per = {}
        for frac in args.fractions:
            runs = []
            for s in range(args.seeds):
                rng = np.random.default_rng(1000 * s + int(frac * 1e4))
                tr_idx, te_idx = stratified(yb, frac, rng, C)
                tr, st = tr0, opt.init(tr0)
                times = []
                for i in tqdm(range(args.steps), desc=f"{method} {frac:.0%} seed {s}", disable=not progress,
                              leave=False, file=sys.stdout):
                    idx = rng.choice(tr_idx, args.batch)
                    x, y = jnp.asarray(xb[idx]), jnp.asarray(yb[idx])
                    t = time.perf_counter()
                    tr, st, val = jax.block_until_ready(step(tr, st, fz, x, y))
                    times.append((time.perf_counter() - t) * 1e3)
                sc = scores(predict(logits_fn, tr, fz, xb)[te_idx], yb[te_idx], C)
                runs.append({**sc, "labelled": int(len(tr_idx)), "median_step_ms": float(np.median(times[1:]))})
                if method.startswith("lora") and s == 0 and frac == args.fractions[-1]:
                    merged = rp.merge(base, tr[0])
                    xm = jnp.asarray(first_chunk(xb))  # same shapes as prediction: no new compilation
                    a1 = compiled(logits_fn)(tr, fz, xm)
                    a2 = compiled(full_fn)((merged, tr[1]), None, xm)
                    results.setdefault("merge_check", {})[method] = {
                        "max_abs_logit_diff": float(jnp.max(jnp.abs(a1 - a2))),
                        "merged_params": count(merged), "base_params": n_backbone}
                    timing_calls["merged_lora_forward"] = (merged, tr[1])
                if method == "enhanced_sgdr" and s == 0:
                    timing_calls["enhanced_forward"] = (compiled(logits_fn), tr, fz)
                timing_calls.setdefault("step_" + method, (step, tr, st, fz, x, y))
            per[f"{frac:g}"] = {"runs": runs, **{k: float(np.mean([r[k] for r in runs])) for k in ("oa", "aa", "kappa")},
                                **{k + "_std": float(np.std([r[k] for r in runs])) for k in ("oa", "aa", "kappa")},
                                "labelled": runs[0]["labelled"]}
            print(f"{method:14s} {frac:5.0%} labels ({per[f'{frac:g}']['labelled']} px): OA {per[f'{frac:g}']['oa']:.3f} "
                  f"AA {per[f'{frac:g}']['aa']:.3f} kappa {per[f'{frac:g}']['kappa']:.3f}")
        results[method] = {"label": LABELS[method].format(r=args.rank), "trainable_params": n_train,
                           "trainable_pct_of_backbone": 100.0 * n_train / n_backbone, "fractions": per}
    res["methods"] = {m: results[m] for m in METHODS}
    res["merge_check"] = results.get("merge_check", {})
    res["factored_stats"] = {"factored": int(stats.factored), "fallback": list(stats.fallback), "adapted_leaves": len(ad0)}
    res["enhanced_param_breakdown"] = {
        k: int(sum(v.size for p, v in e_train0.items() if p.endswith(k))) for k in ("lora_a", "lora_b", "gate", "residual")}

    # ---- timing: training steps (head-only step = the limit) and inference forwards (base forward = the limit)
    calls = {m: (lambda c=timing_calls["step_" + m]: jax.block_until_ready(c[0](*c[1:]))) for m in METHODS}
    tt = time_round_robin(calls, args.repeats, warmup=1, desc="steps", progress=progress)
    steps_t = {m: {k: v for k, v in summarize(t).items() if k != "times_ms"} for m, t in tt.items()}
    for m in steps_t:
        steps_t[m]["ratio_to_limit"] = steps_t[m]["median_ms"] / steps_t["head_only"]["median_ms"]
    xt = jnp.asarray(first_chunk(xb))
    merged, mh = timing_calls["merged_lora_forward"]
    fe, etr, efz = timing_calls["enhanced_forward"]
    fwd = compiled(full_fn)
    ti = time_round_robin({"base_forward": blocking(fwd, (pretrained, mh), None, xt),
                           "merged_lora_forward": blocking(fwd, (merged, mh), None, xt),
                           "enhanced_forward": blocking(fe, etr, efz, xt)}, args.repeats, warmup=2,
                          desc="inference", progress=progress)
    inf = {m: {k: v for k, v in summarize(t).items() if k != "times_ms"} for m, t in ti.items()}
    for m in inf:
        inf[m]["ratio_to_limit"] = inf[m]["median_ms"] / inf["base_forward"]["median_ms"]
    res["timing"] = {"steps": steps_t, "inference": inf, "inference_batch": CHUNK}
    return res


def table(out):
    r, c = out["results"], out["config"]
    fr = [f"{f:g}" for f in c["fractions"]]
    head = " | ".join(f"OA / AA / kappa @ {float(f):.0%}" for f in fr)
    rows = [f"Target scene {r['scene']['size']}x{r['scene']['size']} px, {r['scene']['classes']} classes, "
            f"{r['scene']['bands']} bands, {r['scene']['patch']}x{r['scene']['patch']} patches; backbone "
            f"{r['model']['backbone_params']:,} params pretrained on a scene with other class spectra (held-out OA "
            f"{r['pretrain']['oa']:.3f}); {c['steps']} fine-tuning steps, batch {c['batch']}, mean of {c['seeds']} label "
            f"draw(s); {describe(out['device'])}\n",
            f"| method | trainable params (% of backbone) | {head} | step (ms) | x limit |",
            "|---|---:|" + "---:|" * len(fr) + "---:|---:|"]
    for m, v in r["methods"].items():
        cells = " | ".join(f"{v['fractions'][f]['oa']:.3f} / {v['fractions'][f]['aa']:.3f} / {v['fractions'][f]['kappa']:.3f}"
                           for f in fr)
        t = r["timing"]["steps"][m]
        rows.append(f"| {v['label']} | {v['trainable_params']:,} ({v['trainable_pct_of_backbone']:.1f}%) | {cells} | "
                    f"{t['median_ms']:.2f} | {t['ratio_to_limit']:.2f} |")
    eb = r["enhanced_param_breakdown"]
    inf = r["timing"]["inference"]
    rows += ["", f"Enhanced LoRA's trainable parts: A {eb['lora_a']:,} + B {eb['lora_b']:,} (low rank) + G {eb['gate']:,} + "
             f"R {eb['residual']:,} (full rank) = {sum(eb.values()):,}, plus the head; limit of a step = the head-only "
             "step (frozen backbone forward + head update).",
             "", f"Inference, batch {r['timing']['inference_batch']} (jit, warmed, median; limit = the base forward):\n",
             "| forward | median (ms) | x limit |", "|---|---:|---:|"]
    for m, t in inf.items():
        rows.append(f"| {m} | {t['median_ms']:.2f} | {t['ratio_to_limit']:.2f} |")
    mc = r["merge_check"]
    rows += ["", "Merged LoRA = factored LoRA: max |logit diff| " +
             ", ".join(f"{k} {v['max_abs_logit_diff']:.1e}" for k, v in mc.items()) +
             f"; merged backbone params = base ({next(iter(mc.values()))['merged_params']:,}); factored path: "
             f"{r['factored_stats']['factored']} products factored, fallbacks {r['factored_stats']['fallback'] or 'none'}."]
    return "\n".join(rows)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, c = out["results"], out["config"]
    fr = [f"{f:g}" for f in c["fractions"]]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    w = 0.8 / len(r["methods"])
    for i, (m, v) in enumerate(r["methods"].items()):
        ys = [v["fractions"][f]["oa"] for f in fr]
        es = [v["fractions"][f]["oa_std"] for f in fr]
        ax.bar(np.arange(len(fr)) + i * w, ys, w, yerr=es, label=v["label"])
    ax.set_xticks(np.arange(len(fr)) + 0.4 - w / 2, [f"{float(f):.0%} labels" for f in fr])
    ax.set(ylabel="test OA", title="LoLA-SpecViT (synthetic hyperspectral scene)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    out = R.start(__file__, argv, args)
    print(f"device: {describe(out['device'])}")
    out["results"] = run(args, progress)

    def tables(out):
        out["table_markdown"] = table(out)
        return out["table_markdown"]

    return R.finish(out, args, "lola_specvit", tables, plot)


if __name__ == "__main__":
    main()
