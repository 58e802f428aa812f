"""Benchmark: progressive volume distillation (PVD) vs training the student field from scratch.

    python experiments/bench_pvd.py                  # ~15-30 minutes on 2 shared CPU cores
    python experiments/bench_pvd.py --quick          # smoke test, tiny shapes, well under a minute

1. Render the procedural scene (:func:`lrjax.fields.make_dataset`: 3 spheres, ``--size`` px views).
2. Train a teacher (``--teacher hash`` or ``mlp``) on the training images; its test PSNR is ``P_T``.
3. For every other field type (MLP, dense grid, CP, VM, hash, Plenoxel SH grid): (a) train it from
   scratch on the images and (b) distil it from the teacher with :class:`lrjax.fields.pvd.PVD` (random
   cameras, no images), both with the same optimiser, learning-rate schedule and ray/sample budget,
   until the test PSNR reaches ``P_T - 0.5`` dB or the student's step budget runs out
   (``--max-steps``; ``--mlp-max-steps`` for the MLP, the slow case of the paper). Only optimisation
   steps are timed (jit warm-up excluded, each step ``block_until_ready``); test PSNR is checked
   every ``--eval-every`` steps. A run that never reaches the target reports ``>`` its full budget,
   so a speed-up shown for it is a lower bound (``>=``) or undefined (both missed: ``n/a``).
4. PVD's block-wise schedule as in the official code, scaled to the budget: stage 1 (feature loss
   only) for the first ``--stages[0]`` fraction of the student's budget, stage 2 (feature + point
   density + point colour, no rendering loss) until ``--stages[1]``, then all terms incl. the
   rendered colour; defaults 2000/30000 and 5000/30000 as in ``main_distill_mutual.py``.
5. Limit measured in the same run: the teacher's own forward pass on one step's samples (a PVD step
   must at least run it), and each method's median step time as a multiple of it.

Writes ``<out>/bench_pvd.json``, ``<out>/bench_pvd.png`` (test PSNR against steps, PVD and from
scratch, per student), ``<out>/pvd_renders.png`` (test view: teacher | each student by PVD | each
from scratch | ground truth) and prints a markdown table. The load average is recorded at the
start and at the end (``device`` / ``device_end`` in the JSON): timings on a shared machine are
noisy, steps-to-target are not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lrjax.benchmark import describe, device_info  # noqa: E402
from lrjax import fields as L  # noqa: E402
from lrjax.fields import pvd as P  # noqa: E402
from lrjax.fields import train as T  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/bench_pvd")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--teacher", choices=["hash", "mlp"], default="hash")
    ap.add_argument("--students", default=None,
                    help="comma-separated student fields (default mlp,grid,cp,vm,sh,hash; quick: grid); "
                         "'' for none (only the teacher)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--views", type=int, default=30)
    ap.add_argument("--test-views", type=int, default=6)
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--mlp-max-steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--stages", default="0.0667,0.1667",
                    help="PVD stage ends as fractions of the student's step budget (official 2k/30k, 5k/30k)")
    ap.add_argument("--active", action="store_true", help="PVD-AL (ray + point + pose levels)")
    ap.add_argument("--point-mask", choices=["weight", "all"], default="weight",
                    help="samples carrying the point colour/feature losses (PVDConfig.point_mask)")
    ap.add_argument("--weight-threshold", type=float, default=1e-4,
                    help="compositing-weight threshold of --point-mask weight")
    ap.add_argument("--density-weight", type=float, default=0.1, help="weight of the point density loss (w_sigma)")
    ap.add_argument("--density-mask", choices=["floor", "points"], default="floor",
                    help="density loss on every sample above the floor, or only on the selected points")
    ap.add_argument("--density-space", choices=["log", "alpha"], default="log",
                    help="density loss on the clipped log-density (paper) or on per-sample alpha")
    ap.add_argument("--color-weight", type=float, default=0.1, help="weight of the point colour loss (w_color)")
    ap.add_argument("--feature-weight", type=float, default=0.1, help="initial feature-loss weight (w_feature)")
    ap.add_argument("--no-inherit-head", action="store_true",
                    help="do not copy the teacher's colour head into the student")
    ap.add_argument("--teacher-cache", default=None,
                    help="directory for an orbax checkpoint of the trained teacher (+ teacher.json); "
                         "loaded if it exists, else written; saves retraining")
    ap.add_argument("--scratch-from", default=None,
                    help="bench_pvd.json of an earlier run with the same data, seed, student order and budgets: "
                         "reuse its from-scratch results instead of retraining (no scratch render panel)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.views, args.test_views = 16, 8, 2
        args.teacher_steps, args.max_steps, args.mlp_max_steps, args.eval_every = 40, 20, 20, 10
        args.batch, args.samples, args.stages = 256, 24, "4,10"
    if args.students is None:
        args.students = "grid" if args.quick else "mlp,grid,cp,vm,sh,hash"
    return args


def make_field(name, quick):
    r = 16 if quick else 48
    return {"mlp": L.MLPField(), "grid": L.GridField(resolution=r),
            "cp": L.CPField(resolution=r, rank_sigma=16, rank_app=32),
            "vm": L.VMField(resolution=r, rank_sigma=8, rank_app=16),
            "sh": L.SHGridField(resolution=r, sh_degree=3),
            "hash": L.HashGridField(log2_table_size=12 if quick else 14)}[name]


def budget(name, args):
    return args.mlp_max_steps if name == "mlp" else args.max_steps


def teacher_forward_ms(field, params, args, repeats=10):
    """Median ms of the teacher's forward on one step's ``batch x samples`` points."""
    x = jax.random.uniform(jax.random.key(0), (args.batch, args.samples, 3), minval=-1, maxval=1)
    fwd = jax.jit(lambda p, x: field.apply(p, x).rgb)
    jax.block_until_ready(fwd(params, x))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(params, x))
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def run_scratch(field, data, args, target, key, progress, steps):
    lr = T.default_lr(field)
    opt = T.make_optimizer(lr, steps)
    params = L.init_field(field, key)
    step = T.photometric_state_step(field, opt, data, batch=args.batch, n_samples=args.samples)
    ev = T.make_evaluator(field, data, n_samples=args.samples)
    res = T.train_loop(step, (params, opt.init(params)), steps=steps, key=jax.random.fold_in(key, 1),
                       evaluate=ev, params_of=lambda s: s[0], eval_every=args.eval_every,
                       target_psnr=target, progress=progress, desc=f"scratch {type(field).__name__}")
    return res, res.state[0], ev


def stage_steps(args, steps):
    f1, f2 = (float(v) for v in args.stages.split(","))
    return int(round(f1 * steps)), int(round(f2 * steps))


def run_pvd(teacher, tparams, field, data, args, target, key, progress, steps):
    lr = T.default_lr(field)
    cfg = P.PVDConfig(stage_steps=stage_steps(args, steps), batch_rays=args.batch, n_samples=args.samples,
                      point_mask=args.point_mask, weight_threshold=args.weight_threshold,
                      w_sigma=args.density_weight, density_mask=args.density_mask,
                      density_space=args.density_space, w_color=args.color_weight,
                      w_feature=args.feature_weight, inherit_head=not args.no_inherit_head,
                      active=P.ActiveConfig(pool_size=16 * args.batch, min_pool=2 * args.batch)
                      if args.active else None)
    poses = L.random_poses(args.seed + 7, 200)
    d = P.PVD(teacher, tparams, field, T.make_optimizer(lr, steps), poses=poses,
              height=data.height, width=data.width, focal=data.focal, config=cfg)
    st = d.init(key)
    d.compile(st, jax.random.fold_in(key, 2))
    ev = T.make_evaluator(field, data, n_samples=args.samples)
    res = T.train_loop(lambda s, k: (d.step(s, k)[0],), (st,), steps=steps,
                       key=jax.random.fold_in(key, 1), evaluate=ev, params_of=lambda s: s[0].params,
                       eval_every=args.eval_every, target_psnr=target, progress=progress,
                       desc=f"pvd {type(field).__name__}")
    return res, res.state[0].params, ev


def summary(res, args):
    med = 1e3 * float(np.median(res.step_times))
    last = res.history[-1]
    return {"reached": res.steps_to_target is not None,
            "steps": res.steps_to_target if res.steps_to_target is not None else len(res.step_times),
            "seconds": res.seconds_to_target if res.seconds_to_target is not None else last[1],
            "final_psnr": last[2], "median_step_ms": med, "history": res.history}


def save_png(path, panels, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.6))
    for ax, (name, img) in zip(np.atleast_1d(axes), panels):
        ax.imshow(np.clip(np.asarray(img), 0, 1))
        ax.set_title(name, fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def steps_to(history, psnr):
    """``(step, seconds)`` of the first evaluation at or above ``psnr``."""
    return next((h[0], h[1]) for h in history if h[2] >= psnr)


def save_curves(path, students, t_psnr, target):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = max(1, len(students))
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 2.8), squeeze=False)
    for ax, (name, info) in zip(axes[0], students.items()):
        for m, style in (("pvd", "-"), ("scratch", "--")):
            h = np.asarray(info[m]["history"])
            ax.plot(h[:, 0], h[:, 2], style, label=f"{'PVD' if m == 'pvd' else 'scratch'}")
        ax.axhline(t_psnr, color="k", lw=0.6, label="teacher")
        ax.axhline(target, color="r", lw=0.6, ls=":", label="target")
        ax.set_title(f"{name} ({info['params']} params)", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("test PSNR (dB)", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    os.makedirs(args.out, exist_ok=True)
    cmd = "python experiments/bench_pvd.py " + " ".join(sys.argv[1:] if argv is None else argv)
    device = device_info()
    print(f"reproduce: {cmd}\ndevice: {describe(device)}")
    key = jax.random.key(args.seed)

    t0 = time.perf_counter()
    data = L.make_dataset(n_train=args.views, n_test=args.test_views, height=args.size, width=args.size,
                          gt_samples=64 if args.quick else 256)
    data_s = time.perf_counter() - t0

    teacher = L.HashGridField(log2_table_size=12 if args.quick else 14) if args.teacher == "hash" \
        else L.MLPField()
    if args.teacher_cache and os.path.exists(os.path.join(args.teacher_cache, "teacher.json")):
        from lrjax import checkpoint
        tparams = checkpoint.restore_state(os.path.abspath(args.teacher_cache))
        with open(os.path.join(args.teacher_cache, "teacher.json")) as f:
            tinfo = json.load(f)
        tev = T.make_evaluator(teacher, data, n_samples=args.samples)
        print(f"teacher loaded from {args.teacher_cache}")
    else:
        tres, tparams, tev = run_scratch(teacher, data, args, None, jax.random.fold_in(key, 100), progress,
                                         args.teacher_steps)
        tinfo = summary(tres, args)
        if args.teacher_cache:
            from lrjax import checkpoint
            checkpoint.save_state(os.path.abspath(args.teacher_cache), 0, tparams)
            with open(os.path.join(args.teacher_cache, "teacher.json"), "w") as f:
                json.dump(tinfo, f)
    prev = None
    if args.scratch_from:
        with open(args.scratch_from) as f:
            prev = json.load(f)
        if abs(prev["target_psnr"] - (tinfo["final_psnr"] - 0.5)) > 1e-6:
            raise ValueError(f"--scratch-from {args.scratch_from}: different teacher/target")
    t_psnr = tinfo["final_psnr"]
    target = t_psnr - 0.5
    fwd_ms = teacher_forward_ms(teacher, tparams, args)
    print(f"teacher {args.teacher}: {t_psnr:.2f} dB after {args.teacher_steps} steps; target {target:.2f} dB; "
          f"teacher forward {fwd_ms:.2f} ms/step")

    gt = data.test_images[0]
    teacher_panel = (f"teacher {args.teacher} {t_psnr:.1f} dB", tev(tparams, True)["images"][0])
    pvd_panels, scratch_panels, students = [], [], {}
    for idx, name in enumerate([s for s in args.students.split(",") if s and s != args.teacher]):
        field = make_field(name, args.quick)
        k = jax.random.fold_in(key, idx + 1)
        info = {"params": None, "bytes": None}
        steps = budget(name, args)
        old = prev["students"].get(name) if prev else None
        if old is not None and old["budget_steps"] == steps:
            sparams = None
            info["scratch"] = old["scratch"]
            info["scratch_reused_from"] = args.scratch_from
        else:
            sres, sparams, sev = run_scratch(field, data, args, target, k, progress, steps)
            info["scratch"] = summary(sres, args)
        pres, pparams, pev = run_pvd(teacher, tparams, field, data, args, target, k, progress, steps)
        info["params"], info["bytes"] = L.count_params(pparams), L.param_bytes(pparams)
        info["pvd"] = summary(pres, args)
        sc, pv = info["scratch"], info["pvd"]
        info["speedup_time"] = sc["seconds"] / max(pv["seconds"], 1e-9)
        info["speedup_steps"] = sc["steps"] / max(pv["steps"], 1)
        info["budget_steps"], info["pvd_stage_steps"] = steps, stage_steps(args, steps)
        # both reached: exact; only PVD: lower bound; only scratch: upper bound; neither: undefined
        info["speedup_bound"] = {(True, True): "=", (False, True): ">=", (True, False): "<=",
                                 (False, False): "n/a"}[(sc["reached"], pv["reached"])]
        info["speedup_is_lower_bound"] = info["speedup_bound"] == ">="
        info["pvd_reached"] = pv["reached"]
        # matched quality, defined even when a run misses the target: the PSNR both runs reached
        q = min(target, max(h[2] for h in sc["history"]), max(h[2] for h in pv["history"]))
        ms, mp = steps_to(sc["history"], q), steps_to(pv["history"], q)
        info["matched"] = {"psnr": q, "scratch_steps": ms[0], "scratch_seconds": ms[1], "pvd_steps": mp[0],
                           "pvd_seconds": mp[1], "speedup_steps": ms[0] / mp[0],
                           "speedup_time": ms[1] / max(mp[1], 1e-9)}
        info["pvd_step_over_teacher_forward"] = pv["median_step_ms"] / fwd_ms
        info["scratch_step_over_teacher_forward"] = sc["median_step_ms"] / fwd_ms
        students[name] = info
        if sparams is not None:
            scratch_panels.append((f"{name} scratch {'' if sc['reached'] else '>'}{sc['steps']} st, "
                                   f"{sc['final_psnr']:.1f} dB", sev(sparams, True)["images"][0]))
        pvd_panels.append((f"{name} PVD {'' if pv['reached'] else '>'}{pv['steps']} st, "
                           f"{pv['final_psnr']:.1f} dB", pev(pparams, True)["images"][0]))
        print(f"{name}: scratch {'' if sc['reached'] else '>'}{sc['steps']} steps / {sc['seconds']:.1f} s "
              f"({sc['final_psnr']:.2f} dB), PVD {'' if pv['reached'] else '>'}{pv['steps']} steps / "
              f"{pv['seconds']:.1f} s ({pv['final_psnr']:.2f} dB)", flush=True)

    def fmt(info, m):
        r = info[m]
        return f"{'' if r['reached'] else '>'}{r['steps']}", f"{'' if r['reached'] else '>'}{r['seconds']:.1f}"

    rows = ["| student | params | bytes | budget | scratch steps | scratch s | PVD steps | PVD s | speed-up (time) | "
            "speed-up (steps) | PVD final dB | scratch final dB | PVD step / teacher fwd | matched dB | "
            "speed-up at matched dB (steps / time) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, info in students.items():
        ss, st = fmt(info, "scratch")
        ps, pt = fmt(info, "pvd")
        b = info["speedup_bound"]
        spt, sps = ("n/a", "n/a") if b == "n/a" else (
            f"{'' if b == '=' else b}{info['speedup_time']:.1f}x", f"{'' if b == '=' else b}{info['speedup_steps']:.1f}x")
        rows.append(f"| {name} | {info['params']} | {info['bytes']} | {info['budget_steps']} | {ss} | {st} | {ps} | "
                    f"{pt} | {spt} | {sps} | "
                    f"{info['pvd']['final_psnr']:.2f} | {info['scratch']['final_psnr']:.2f} | "
                    f"{info['pvd_step_over_teacher_forward']:.1f}x | {info['matched']['psnr']:.2f} | "
                    f"{info['matched']['speedup_steps']:.1f}x / {info['matched']['speedup_time']:.1f}x |")
    table = (f"\n## PVD vs from scratch -- teacher {args.teacher} ({L.count_params(tparams)} params, "
             f"{L.param_bytes(tparams)} bytes), {t_psnr:.2f} dB, target {target:.2f} dB; teacher forward "
             f"{fwd_ms:.2f} ms/step\n\n" + "\n".join(rows))
    print(table)
    save_png(os.path.join(args.out, "pvd_renders.png"), [teacher_panel] + pvd_panels + scratch_panels + [("ground truth", gt)],
             f"test view 0; teacher | students by PVD | from scratch | ground truth; target {target:.1f} dB")
    save_curves(os.path.join(args.out, "bench_pvd.png"), students, t_psnr, target)
    device_end = device_info()
    print(f"device at end: {describe(device_end)}")
    out = {"command": cmd, "device": device, "device_end": device_end, "config": vars(args), "data_seconds": data_s,
           "teacher": {"type": args.teacher, "params": L.count_params(tparams), "bytes": L.param_bytes(tparams),
                       **tinfo, "forward_ms_per_step": fwd_ms},
           "target_psnr": target, "students": students, "table_markdown": table}
    with open(os.path.join(args.out, "bench_pvd.json"), "w") as f:
        json.dump(out, f, indent=1, default=float)
    return out


if __name__ == "__main__":
    main()
