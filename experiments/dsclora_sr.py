"""DSCLoRA on CPU: ConvLoRA + spatial-affinity distillation for x2 super-resolution on
scikit-learn's bundled sample images, merged into a model of the teacher's size and speed.

    python experiments/dsclora_sr.py --out results/dsclora     # the committed run (minutes on 2 CPU cores)
    python experiments/dsclora_sr.py --quick                   # smoke test (writes runs/dsclora)

DSCLoRA (Chai et al. 2025, arXiv:2504.11271; inference code Yaozzz666/DSCF-SR) starts from a
pretrained efficient SR network (SPAN), adds loralib-style ConvLoRA adapters
(:class:`lrjax.ConvLoRA`) to its block convolutions and to the pixel-shuffle upsampler and the conv
before it, and trains only the adapters with

    L = lambda_rec L1(SR_S, HR) + lambda_ts L1(SR_S, SR_T) + lambda_ad L_AD(F_S, F_T)

where the teacher T is the pretrained network itself and ``L_AD`` is the spatial affinity
distillation loss (:func:`lrjax.losses.spatial_affinity_loss`, FAKD's channel-normalized
``HW x HW`` affinity, L1). After training the adapters are merged, so the deployed model has the
teacher's architecture, parameter count and inference cost.

This script, scaled down:

* **Data**: the two images of ``sklearn.datasets.load_sample_images`` (offline), RGB in ``[0, 1]``.
  The left 75% of each image is the training region (random ``hr_patch`` crops), the right 25% the
  test region (non-overlapping tiles). LR = 2 x 2 box-filter downsampling of HR.
* **Network** (SPAN-like, plain-dict params, NHWC): ``conv_1`` (3 -> C), ``blocks`` of two 3x3
  convs with a residual, ``conv_2`` (C -> C) plus the shallow feature, ``upsampler`` (C -> 3*4,
  pixel shuffle x2) plus the bilinear upsampled input. The distilled feature ``F`` is the input of
  the upsampler (``[B, h, w, C]``).
* **Teacher**: trained from scratch briefly (L1, Adam, cosine decay).
* **Students**: the teacher's weights frozen + ConvLoRA with the note's layer config scaled to the
  width: DSCLoRA puts r=8, alpha=16 on ``conv_2`` and ``upsampler.0`` and r=2, alpha=4 on the block
  convs of SPAN (48 channels); here ``--rank-head = round(8 C / 48)`` and ``--rank-block =
  max(1, round(2 C / 48))`` with ``alpha = 2 r`` (two ``lrjax.ConvLoRA`` configs with disjoint
  targets). Trained with and without ``L_AD`` from the same adapter init and the same batches, over
  ``--seeds`` seeds.
* **Loss weights**: DSCLoRA does not publish its lambdas. With ``lambda_ts = lambda_rec`` the
  student starting at the teacher sits at a stationary point (``|s - hr| + |s - t|`` is flat for
  every ``s`` between ``t`` and ``hr``, so the L1 subgradients cancel pixel by pixel): a first run
  with 1/1/1 left every merged student at the teacher's PSNR to 3 decimals. The defaults are
  therefore ``lambda_rec = 1``, ``lambda_ts = 0.2``, ``lambda_ad = 1``.
* **Reported**: test PSNR (RGB, 2-pixel border cropped) and SSIM (luminance, 11x11 Gaussian window)
  of the merged students, the teacher, and bilinear upsampling; the merged model's parameter
  count vs the teacher's; the max |merged - unmerged adapted| output difference; and the jitted,
  warmed forward time of teacher vs merged student vs unmerged adapted student (medians,
  round-robin, ``block_until_ready``) on a full LR test image -- the teacher's forward is the
  limit a merged model can reach.

``lrjax.factored`` is not used: ConvLoRA's update is not a pair of convolutions (it is a rank-``r k``
matrix in a different matricization of the kernel, see :mod:`lrjax.reparam.conv`), so the factored
path would fall back to the materialized kernel for every adapted leaf anyway; training uses
``rp.materialize`` directly (a 3x3x16x16 kernel per step is negligible).

Writes ``<out>/dsclora.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

import lrjax
from lrjax.benchmark import blocking, describe, summarize, time_round_robin
from lrjax.losses import spatial_affinity_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report as R  # noqa: E402

BLOCK_TARGETS = r"blocks/\d+/c(1|2)/kernel"
HEAD_TARGETS = r"(conv_2|upsampler)/kernel"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    p.add_argument("--out", default="runs/dsclora")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=None, help="student seeds, default 2 (quick: 1)")
    p.add_argument("--channels", type=int, default=None, help="feature channels C, default 16 (quick: 8)")
    p.add_argument("--blocks", type=int, default=None, help="residual blocks, default 4 (quick: 1)")
    p.add_argument("--hr-patch", type=int, default=None, help="HR training/test patch side, default 32 (quick: 16)")
    p.add_argument("--train-patches", type=int, default=None, help="default 4096 (quick: 64)")
    p.add_argument("--batch", type=int, default=None, help="default 16 (quick: 4)")
    p.add_argument("--teacher-steps", type=int, default=None, help="default 1000 (quick: 10)")
    p.add_argument("--student-steps", type=int, default=None, help="default 500 (quick: 8)")
    p.add_argument("--rank-head", type=int, default=None,
                   help="ConvLoRA rank of conv_2 and upsampler (DSCLoRA: 8 of SPAN's 48 channels), default round(8 C / 48)")
    p.add_argument("--rank-block", type=int, default=None,
                   help="ConvLoRA rank of the block convs (DSCLoRA: 2 of 48), default max(1, round(2 C / 48))")
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--student-lr", type=float, default=2e-3)
    p.add_argument("--lambda-rec", type=float, default=1.0)
    p.add_argument("--lambda-ts", type=float, default=0.2)
    p.add_argument("--lambda-ad", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per model, default 60 (quick: 3)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(seeds=(1, 2), channels=(8, 16), blocks=(1, 4), hr_patch=(16, 32), train_patches=(64, 4096),
                batch=(4, 16), teacher_steps=(10, 1000), student_steps=(8, 500), repeats=(3, 60))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    if a.rank_head is None:
        a.rank_head = max(1, round(8 * a.channels / 48))
    if a.rank_block is None:
        a.rank_block = max(1, round(2 * a.channels / 48))
    if a.hr_patch % 2:
        p.error("--hr-patch must be even (x2 SR)")
    return a


# ------------------------------------------------------------------------------------- data
def downsample(hr):
    """x2 box filter: ``[..., 2h, 2w, 3] -> [..., h, w, 3]``."""
    *b, h, w, c = hr.shape
    return hr.reshape(*b, h // 2, 2, w // 2, 2, c).mean(axis=(-4, -2))


def load_data(args):
    from sklearn.datasets import load_sample_images
    imgs = [np.asarray(im, np.float32) / 255.0 for im in load_sample_images().images]
    rng = np.random.default_rng(args.seed)
    P = args.hr_patch
    train, test, full_test = [], [], []
    for im in imgs:
        h, w, _ = im.shape
        h2, w2 = h - h % 2, w - w % 2
        im = im[:h2, :w2]
        split = int(0.75 * w2) // 2 * 2
        tr, te = im[:, :split], im[:, split:]
        n = args.train_patches // len(imgs)
        ys = rng.integers(0, tr.shape[0] - P + 1, n)
        xs = rng.integers(0, tr.shape[1] - P + 1, n)
        train += [tr[y:y + P, x:x + P] for y, x in zip(ys, xs)]
        ny, nx = te.shape[0] // P, te.shape[1] // P
        if args.quick:
            ny, nx = min(ny, 2), min(nx, 2)
        test += [te[i * P:(i + 1) * P, j * P:(j + 1) * P] for i in range(ny) for j in range(nx)]
        full_test.append(te)
    hr_train, hr_test = np.stack(train), np.stack(test)
    full = full_test[0][: (256 if not args.quick else 32), : (128 if not args.quick else 32)]
    return {"hr_train": hr_train, "lr_train": downsample(hr_train), "hr_test": hr_test,
            "lr_test": downsample(hr_test), "lr_full": downsample(full)[None], "n_images": len(imgs)}


# ------------------------------------------------------------------------------------ model
def conv(x, p):
    y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"]


def init_params(key, c, n_blocks):
    def layer(k, cin, cout):
        bound = np.sqrt(6.0 / (9 * cin)) * 0.5
        return {"kernel": jax.random.uniform(k, (3, 3, cin, cout), jnp.float32, -bound, bound),
                "bias": jnp.zeros((cout,), jnp.float32)}

    ks = jax.random.split(key, 3 + 2 * n_blocks)
    return {"conv_1": layer(ks[0], 3, c),
            "blocks": {str(i): {"c1": layer(ks[3 + 2 * i], c, c), "c2": layer(ks[4 + 2 * i], c, c)}
                       for i in range(n_blocks)},
            "conv_2": layer(ks[1], c, c), "upsampler": layer(ks[2], c, 12)}


def forward(params, lr):
    """``lr [B, h, w, 3]`` -> ``(sr [B, 2h, 2w, 3], feature [B, h, w, C])``."""
    h0 = conv(lr, params["conv_1"])
    h = h0
    for i in range(len(params["blocks"])):
        blk = params["blocks"][str(i)]
        h = h + conv(jax.nn.leaky_relu(conv(h, blk["c1"]), 0.05), blk["c2"])
    feat = conv(h, params["conv_2"]) + h0
    y = conv(feat, params["upsampler"])  # [B, h, w, 12]
    b, hh, ww, _ = y.shape
    y = y.reshape(b, hh, ww, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * hh, 2 * ww, 3)  # pixel shuffle
    up = jax.image.resize(lr, (b, 2 * hh, 2 * ww, 3), "bilinear")
    return y + up, feat


def count(tree):
    return int(sum(x.size for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------- metrics
def psnr(sr, hr, border=2):
    sr = jnp.clip(sr, 0, 1)[..., border:-border, border:-border, :]
    hr = hr[..., border:-border, border:-border, :]
    mse = jnp.mean(jnp.square(sr - hr), axis=(-3, -2, -1))
    return 10 * jnp.log10(1.0 / jnp.maximum(mse, 1e-12))


def ssim(sr, hr, border=2):
    """Mean SSIM on luminance with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, range 1."""
    wts = jnp.asarray([0.299, 0.587, 0.114])
    x = (jnp.clip(sr, 0, 1) @ wts)[..., border:-border, border:-border, None]
    y = (hr @ wts)[..., border:-border, border:-border, None]
    g = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    g = g / g.sum()
    k = jnp.asarray(np.outer(g, g)[:, :, None, None], jnp.float32)

    def filt(z):
        return jax.lax.conv_general_dilated(z, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return jnp.mean(s, axis=(-3, -2, -1))


@jax.jit
def _metrics(sr, hr):
    return jnp.mean(psnr(sr, hr)), jnp.mean(ssim(sr, hr))


def evaluate(fwd_sr, data):
    p, s = _metrics(fwd_sr(data["lr_test"]), jnp.asarray(data["hr_test"]))
    return {"psnr_db": float(p), "ssim": float(s)}


# --------------------------------------------------------------------------------- training
def batches(n, batch, steps, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, (steps, batch))


def train_teacher(args, data, progress):
    params = init_params(jax.random.key(args.seed), args.channels, args.blocks)
    opt = optax.adam(optax.cosine_decay_schedule(args.teacher_lr, args.teacher_steps, 0.05))
    state = opt.init(params)
    lr_tr, hr_tr = jnp.asarray(data["lr_train"]), jnp.asarray(data["hr_train"])

    @jax.jit
    def step(params, state, idx):
        def loss(p):
            return jnp.mean(jnp.abs(forward(p, lr_tr[idx])[0] - hr_tr[idx]))
        val, g = jax.value_and_grad(loss)(params)
        up, state = opt.update(g, state, params)
        return optax.apply_updates(params, up), state, val

    hist, times = [], []
    for i, idx in enumerate(tqdm(batches(len(hr_tr), args.batch, args.teacher_steps, args.seed + 1), desc="teacher",
                                 disable=not progress, leave=False, file=sys.stdout)):
        t = time.perf_counter()
        params, state, val = jax.block_until_ready(step(params, state, idx))
        times.append((time.perf_counter() - t) * 1e3)
        if i % 50 == 0 or i == args.teacher_steps - 1:
            hist.append((i, float(val)))
    return params, {"loss_history": hist, "median_step_ms": float(np.median(times[1:] or times))}


def make_student(args):
    hi = lrjax.ConvLoRA(rank=args.rank_head, alpha=2.0 * args.rank_head, targets=HEAD_TARGETS)
    lo = lrjax.ConvLoRA(rank=args.rank_block, alpha=2.0 * args.rank_block, targets=BLOCK_TARGETS)
    return hi, lo


def teacher_targets(teacher, data, chunk=256):
    f = jax.jit(forward)
    srs, feats = [], []
    for i in range(0, len(data["lr_train"]), chunk):
        s, ft = f(teacher, jnp.asarray(data["lr_train"][i:i + chunk]))
        srs.append(s)
        feats.append(ft)
    return jnp.concatenate(srs), jnp.concatenate(feats)


def student_trainer(args, data, teacher, t_sr, t_feat):
    """One jitted step shared by every student run (one compilation per lambda_ad: without L_AD the
    affinity matrices are not computed at all)."""
    hi, lo = make_student(args)
    opt = optax.adam(optax.cosine_decay_schedule(args.student_lr, args.student_steps, 0.05))
    lr_tr, hr_tr = jnp.asarray(data["lr_train"]), jnp.asarray(data["hr_train"])

    def eff(ads):
        return lo.materialize(hi.materialize(teacher, ads[0]), ads[1])

    @functools.partial(jax.jit, static_argnums=3)
    def step(ads, state, idx, lam_ad):
        def loss(ads):
            sr, feat = forward(eff(ads), lr_tr[idx])
            rec = jnp.mean(jnp.abs(sr - hr_tr[idx]))
            ts = jnp.mean(jnp.abs(sr - t_sr[idx]))
            ad = spatial_affinity_loss(feat, t_feat[idx]) if lam_ad else jnp.zeros(())
            return args.lambda_rec * rec + args.lambda_ts * ts + lam_ad * ad, (rec, ts, ad)
        (val, parts), g = jax.value_and_grad(loss, has_aux=True)(ads)
        up, state = opt.update(g, state, ads)
        return optax.apply_updates(ads, up), state, val, parts

    def train(lam_ad, seed, progress):
        k1, k2 = jax.random.split(jax.random.key(1000 + seed))
        ads = (hi.init(k1, teacher)[1], lo.init(k2, teacher)[1])  # same init for every lambda_ad
        state = opt.init(ads)
        hist, times = [], []
        for i, idx in enumerate(tqdm(batches(len(hr_tr), args.batch, args.student_steps, 7 + seed),
                                     desc=f"student ad={lam_ad} seed={seed}", disable=not progress, leave=False,
                                     file=sys.stdout)):
            t = time.perf_counter()
            ads, state, val, parts = jax.block_until_ready(step(ads, state, idx, float(lam_ad)))
            times.append((time.perf_counter() - t) * 1e3)
            if i % 50 == 0 or i == args.student_steps - 1:
                hist.append((i, float(val), *(float(x) for x in parts)))
        n_train = hi.num_params(ads[0]) + lo.num_params(ads[1])
        return ads, {"loss_history": hist, "median_step_ms": float(np.median(times[1:] or times)),
                     "trainable_params": n_train}

    return train


# ------------------------------------------------------------------------------------- main
def run(args, progress):
    data = load_data(args)
    print(f"data: {data['n_images']} sklearn sample images; {len(data['hr_train'])} train patches "
          f"{args.hr_patch}x{args.hr_patch} (HR), {len(data['hr_test'])} test tiles; LR = 2x2 box downsample")
    teacher, t_info = train_teacher(args, data, progress)
    n_teacher = count(teacher)
    fwd_sr = jax.jit(lambda p, x: forward(p, x)[0])
    res = {"data": {"train_patches": int(len(data["hr_train"])), "test_tiles": int(len(data["hr_test"])),
                    "hr_patch": args.hr_patch, "full_test_lr_shape": list(data["lr_full"].shape)},
           "teacher": {**t_info, "params": n_teacher, **evaluate(lambda x: fwd_sr(teacher, x), data)}}
    bil = jax.jit(lambda x: jax.image.resize(x, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], 3), "bilinear"))
    res["bilinear"] = evaluate(bil, data)
    print(f"teacher: {n_teacher:,} params, {args.teacher_steps} steps ({t_info['median_step_ms']:.1f} ms/step): "
          f"test PSNR {res['teacher']['psnr_db']:.3f} dB (bilinear {res['bilinear']['psnr_db']:.3f})")
    t_sr, t_feat = teacher_targets(teacher, data)
    hi, lo = make_student(args)
    runs = {"without_ad": 0.0, "with_ad": args.lambda_ad}
    students = {}
    train_student = student_trainer(args, data, teacher, t_sr, t_feat)
    fwd_adapted = jax.jit(lambda ads, x: forward(lo.materialize(hi.materialize(teacher, ads[0]), ads[1]), x)[0])
    last = {}
    for name, lam in runs.items():
        per_seed = []
        for s in range(args.seeds):
            ads, info = train_student(lam, s, progress)
            merged = lo.merge(hi.merge(teacher, ads[0]), ads[1])
            ev = evaluate(lambda x: fwd_sr(merged, x), data)
            diff = float(jnp.max(jnp.abs(fwd_sr(merged, data["lr_test"]) - fwd_adapted(ads, data["lr_test"]))))
            same_tree = jax.tree.structure(merged) == jax.tree.structure(teacher)
            per_seed.append({**info, **ev, "merged_params": count(merged), "same_structure_as_teacher": same_tree,
                             "merged_vs_unmerged_max_abs_diff": diff})
            print(f"student {name} seed {s}: merged test PSNR {ev['psnr_db']:.3f} dB, SSIM {ev['ssim']:.4f}; "
                  f"|merged - unmerged| max {diff:.1e}; {info['trainable_params']:,} trainable params")
            last[name] = (ads, merged)
        ps = np.array([r["psnr_db"] for r in per_seed])
        ss = np.array([r["ssim"] for r in per_seed])
        students[name] = {"lambda_ad": lam, "seeds": per_seed, "psnr_db_mean": float(ps.mean()),
                          "psnr_db_std": float(ps.std()), "ssim_mean": float(ss.mean()),
                          "delta_psnr_vs_teacher_db": float(ps.mean() - res["teacher"]["psnr_db"]),
                          "trainable_params": per_seed[0]["trainable_params"],
                          "median_step_ms": float(np.median([r["median_step_ms"] for r in per_seed]))}
    res["students"] = students
    wo = np.array([r["psnr_db"] for r in students["without_ad"]["seeds"]])
    wi = np.array([r["psnr_db"] for r in students["with_ad"]["seeds"]])
    res["ad_gain_db"] = {"mean": float((wi - wo).mean()), "per_seed": [float(x) for x in wi - wo]}

    # inference: teacher (the limit) vs merged vs unmerged adapted, on a full LR test image
    ads, merged = last["with_ad"]
    x = jnp.asarray(data["lr_test"] if args.quick else data["lr_full"])  # quick: reuse the compiled test shape
    times = time_round_robin({"teacher": blocking(fwd_sr, teacher, x), "merged_student": blocking(fwd_sr, merged, x),
                              "unmerged_adapted_student": blocking(fwd_adapted, ads, x)},
                             args.repeats, warmup=2, desc="inference", progress=progress)
    inf = {k: {k2: v for k2, v in summarize(t).items() if k2 != "times_ms"} for k, t in times.items()}
    for k in inf:
        inf[k]["ratio_to_teacher"] = inf[k]["median_ms"] / inf["teacher"]["median_ms"]
    # the merged model runs the teacher's compiled program: same HLO, same shapes -> same cost by construction
    same_hlo = fwd_sr.lower(teacher, x).as_text() == fwd_sr.lower(merged, x).as_text()
    res["inference"] = {"input_shape": list(x.shape), "methods": inf, "merged_same_hlo_as_teacher": bool(same_hlo),
                        "params": {"teacher": n_teacher, "merged_student": count(merged),
                                   "unmerged_adapted_student": n_teacher + students["with_ad"]["trainable_params"]}}
    i = int(np.argmax(data["hr_test"].std(axis=(1, 2, 3))))  # the most textured test tile
    sr_t, sr_s = fwd_sr(teacher, data["lr_test"]), fwd_sr(merged, data["lr_test"])
    res["_examples"] = {"lr": data["lr_test"][i], "hr": data["hr_test"][i], "teacher": np.asarray(sr_t[i]),
                        "student": np.asarray(sr_s[i]), "index": i}
    return res


def table(out):
    r = out["results"]
    c = out["config"]
    rows = [f"x2 SR on scikit-learn's sample images ({r['data']['train_patches']} train patches, "
            f"{r['data']['test_tiles']} test tiles of {c['hr_patch']} px; SPAN-like CNN C={c['channels']}, "
            f"{c['blocks']} blocks; {c['seeds']} seed(s); {describe(out['device'])})\n",
            "| model | trainable params | deployed params | test PSNR (dB) | SSIM (Y) | vs teacher (dB) |",
            "|---|---:|---:|---:|---:|---:|",
            f"| bilinear | - | 0 | {r['bilinear']['psnr_db']:.3f} | {r['bilinear']['ssim']:.4f} | "
            f"{r['bilinear']['psnr_db'] - r['teacher']['psnr_db']:+.3f} |",
            f"| teacher ({c['teacher_steps']} steps from scratch) | {r['teacher']['params']:,} | {r['teacher']['params']:,} | "
            f"{r['teacher']['psnr_db']:.3f} | {r['teacher']['ssim']:.4f} | 0 |"]
    for name, s in r["students"].items():
        label = ("ConvLoRA, L1(SR,HR) + L1(S,T)" if s["lambda_ad"] == 0 else
                 f"ConvLoRA, L1(SR,HR) + L1(S,T) + {s['lambda_ad']:g} L_AD")
        rows.append(f"| {label}, merged ({c['student_steps']} steps) | {s['trainable_params']:,} | "
                    f"{s['seeds'][0]['merged_params']:,} | {s['psnr_db_mean']:.3f} +- {s['psnr_db_std']:.3f} | "
                    f"{s['ssim_mean']:.4f} | {s['delta_psnr_vs_teacher_db']:+.3f} |")
    inf = r["inference"]
    rows += ["", f"L_AD gain (with - without, same seeds): {r['ad_gain_db']['mean']:+.3f} dB "
             f"(per seed {', '.join(f'{x:+.3f}' for x in r['ad_gain_db']['per_seed'])}); max |merged - unmerged adapted| "
             f"output {max(s['merged_vs_unmerged_max_abs_diff'] for v in r['students'].values() for s in v['seeds']):.1e}.",
             "", f"Inference on a full LR test crop {inf['input_shape']} (jit, warmed, median of {c['repeats']}, "
             "round robin); the teacher's forward is the limit:\n",
             "| forward | params | median (ms) | IQR (ms) | x teacher (limit) |", "|---|---:|---:|---:|---:|"]
    for k, m in inf["methods"].items():
        rows.append(f"| {k} | {inf['params'][k]:,} | {m['median_ms']:.2f} | {m['iqr_ms']:.2f} | {m['ratio_to_teacher']:.2f} |")
    rows += ["", "The merged student's jitted forward lowers to the same HLO text as the teacher's: "
             f"{inf['merged_same_hlo_as_teacher']} (same program, same shapes: any timing difference is load noise)."]
    return "\n".join(rows)


def plot(out, ex, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = out["results"]
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.2))
    names = ["bilinear", "teacher"] + [f"student\n{k}" for k in r["students"]]
    vals = [r["bilinear"]["psnr_db"], r["teacher"]["psnr_db"]] + [s["psnr_db_mean"] for s in r["students"].values()]
    errs = [0, 0] + [s["psnr_db_std"] for s in r["students"].values()]
    axes[0].bar(names, vals, yerr=errs, color=["0.6", "tab:gray", "tab:blue", "tab:orange"])
    lo_, hi_ = min(vals), max(vals)
    axes[0].set_ylim(lo_ - 0.3 * (hi_ - lo_ + 0.1), hi_ + 0.3 * (hi_ - lo_ + 0.1))
    axes[0].set(ylabel="test PSNR (dB)", title="merged models")
    axes[0].tick_params(axis="x", labelsize=7)
    for ax, (t, im) in zip(axes[1:], [("LR (nearest)", np.repeat(np.repeat(ex["lr"], 2, 0), 2, 1)),
                                      ("teacher", ex["teacher"]), ("student + L_AD (merged)", ex["student"]),
                                      ("HR", ex["hr"])]):
        ax.imshow(np.clip(im, 0, 1))
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    out = R.start(__file__, argv, args)
    print(f"device: {describe(out['device'])}")
    res = run(args, progress)
    ex = res.pop("_examples")
    out["results"] = res

    def tables(out):
        out["table_markdown"] = table(out)
        return out["table_markdown"]

    return R.finish(out, args, "dsclora", tables, lambda out, path: plot(out, ex, path))


if __name__ == "__main__":
    main()
