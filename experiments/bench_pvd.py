"""Benchmark: progressive volume distillation (PVD) vs training the student field from scratch.

    python experiments/bench_pvd.py                  # hours on 2 shared CPU cores; see docs/bench_pvd.md
    python experiments/bench_pvd.py --quick          # smoke test, tiny shapes

1. Render the procedural scene (``--scene textured``: :func:`lrjax.fields.scenes.textured_scene`, 3 spheres
   and a box with a fine solid sine texture, ``--size`` px views, ``--views`` training views; ``spheres``:
   the plain scene of the first study).
2. Train a teacher (``--teacher hash`` or ``mlp``) on the training images; its test PSNR is ``P_T``.
3. For every student field (MLP, dense grid, CP, VM, hash, Plenoxel SH grid) and every mode of
   ``--modes``: ``scratch`` (photometric training on the images), ``ray`` (:class:`lrjax.fields.pvd.PVD`,
   random cameras, no images), ``ray_al`` (PVD-AL), ``point`` (:class:`lrjax.fields.pvd.PointDistill`,
   point queries from the teacher's occupied volume, ``--point-batch`` points = by default the ray mode's
   ``batch x samples`` teacher queries per step) and ``point_al`` (with the hard-point pool), all with the
   same optimiser and learning-rate schedule, until the test PSNR reaches ``P_T - 0.5`` dB or the student's
   step budget runs out (``--max-steps``; ``--mlp-max-steps`` for the MLP). Only optimisation steps are
   timed (jit warm-up excluded, each step ``block_until_ready``); test PSNR is checked every
   ``--eval-every`` steps. A run that never reaches the target reports ``>`` its full budget, so a
   speed-up shown for it is a bound (``>=`` / ``<=``) or undefined (``n/a``, then the speed-up at the
   PSNR both runs reached is given).
4. PVD's block-wise schedule as in the official code, scaled to the budget: stage 1 (feature loss
   only) for the first ``--stages[0]`` fraction of the student's budget, stage 2 (feature + point
   density + point colour, no rendering loss) until ``--stages[1]``, then all terms incl. the
   rendered colour; defaults 2000/30000 and 5000/30000 as in ``main_distill_mutual.py``.
5. Limit measured in the same run: the teacher's own forward pass on one step's samples (a
   distillation step must at least run it), and each mode's median step time as a multiple of it.

Writes ``<out>/bench_pvd.json``, ``<out>/bench_pvd.png`` (test PSNR against training seconds, every mode,
per student), ``<out>/pvd_renders.png`` (test view: teacher | per student: its fastest distillation mode
and from scratch | ground truth) and prints a markdown table. The load average is recorded at the
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
    ap.add_argument("--scene", choices=["textured", "spheres"], default="textured",
                    help="textured: 3 spheres + a box with a fine solid sine texture (slow from scratch); "
                         "spheres: the plain 3-sphere scene of the first study")
    ap.add_argument("--modes", default=None,
                    help="comma-separated training modes per student: scratch (photometric, on the images), "
                         "ray (PVD), ray_al (PVD-AL), point (point-query PVD), point_al (point-query + "
                         "hard-point pool); scratch is always run first (it is the reference)")
    ap.add_argument("--gt-samples", type=int, default=96)
    ap.add_argument("--point-batch", type=int, default=None,
                    help="points per point-mode step (default batch * samples: the ray mode's teacher queries)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--views", type=int, default=40)
    ap.add_argument("--test-views", type=int, default=3)
    ap.add_argument("--teacher-steps", type=int, default=1000)
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
        args.size, args.views, args.test_views, args.gt_samples = 12, 6, 1, 32
        args.teacher_steps, args.max_steps, args.mlp_max_steps, args.eval_every = 20, 10, 10, 5
        args.batch, args.samples, args.stages = 128, 16, "2,5"
    if args.modes is None:
        args.modes = "scratch,point" if args.quick else "scratch,ray,ray_al,point,point_al"
    if args.students is None:
        args.students = "grid" if args.quick else "mlp,grid,cp,vm,sh,hash"
    return args


def make_field(name, quick):
    r = 8 if quick else 64
    return {"mlp": L.MLPField(), "grid": L.GridField(resolution=r),
            "cp": L.CPField(resolution=r, rank_sigma=16, rank_app=32),
            "vm": L.VMField(resolution=r, rank_sigma=8, rank_app=16),
            "sh": L.SHGridField(resolution=r, sh_degree=3),
            "hash": L.HashGridField(log2_table_size=10 if quick else 14)}[name]


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


def run_point(teacher, tparams, field, data, args, target, key, progress, steps, active):
    lr = T.default_lr(field)
    nb = args.point_batch or args.batch * args.samples
    cfg = P.PointConfig(batch_points=nb, occupancy_res=16 if args.quick else 64,
                        w_sigma=1.0, w_color=1.0, w_feature=1.0,
                        active_ratio=0.1 if active else 0.0, pool_size=8 * nb, min_pool=nb)
    d = P.PointDistill(teacher, field, T.make_optimizer(lr, steps), teacher_params=tparams, config=cfg)
    st = d.init(key)
    ev = T.make_evaluator(field, data, n_samples=args.samples)
    res = T.train_loop(lambda s, k: (d.step(s, k)[0],), (st,), steps=steps,
                       key=jax.random.fold_in(key, 1), evaluate=ev, params_of=lambda s: s[0].params,
                       eval_every=args.eval_every, target_psnr=target, progress=progress,
                       desc=f"point{'-AL' if active else ''} {type(field).__name__}")
    return res, res.state[0].params, ev


def run_pvd(teacher, tparams, field, data, args, target, key, progress, steps, active=None):
    lr = T.default_lr(field)
    active = args.active if active is None else active
    cfg = P.PVDConfig(stage_steps=stage_steps(args, steps), batch_rays=args.batch, n_samples=args.samples,
                      point_mask=args.point_mask, weight_threshold=args.weight_threshold,
                      w_sigma=args.density_weight, density_mask=args.density_mask,
                      density_space=args.density_space, w_color=args.color_weight,
                      w_feature=args.feature_weight, inherit_head=not args.no_inherit_head,
                      active=P.ActiveConfig(pool_size=16 * args.batch, min_pool=2 * args.batch)
                      if active else None)
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
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    styles = {"scratch": "k--", "ray": "C0-", "ray_al": "C1-", "point": "C2-", "point_al": "C3-"}
    for ax, (name, info) in zip(axes[0], students.items()):
        for m, r in info["modes"].items():
            h = np.asarray(r["history"])
            ax.plot(h[:, 1], h[:, 2], styles.get(m, "-"), label=m, lw=1)
        ax.axhline(t_psnr, color="k", lw=0.6, label="teacher")
        ax.axhline(target, color="r", lw=0.6, ls=":", label="target")
        ax.set_xscale("log")
        ax.set_title(f"{name} ({info['params']} params)", fontsize=8)
        ax.set_xlabel("train seconds (log)", fontsize=7)
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
    from lrjax.fields.scenes import textured_scene
    scene = textured_scene() if args.scene == "textured" else L.default_scene()
    data = L.make_dataset(scene, n_train=args.views, n_test=args.test_views, height=args.size, width=args.size,
                          gt_samples=args.gt_samples)
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
    modes = ["scratch"] + [m for m in args.modes.split(",") if m and m != "scratch"]
    student_panels, students = [], {}
    for idx, name in enumerate([s for s in args.students.split(",") if s and s != args.teacher]):
        field = make_field(name, args.quick)
        k = jax.random.fold_in(key, idx + 1)
        steps = budget(name, args)
        info = {"params": None, "bytes": None, "budget_steps": steps, "pvd_stage_steps": stage_steps(args, steps),
                "modes": {}}
        old = prev["students"].get(name) if prev else None
        renders = {}
        for m in modes:
            if m == "scratch" and old is not None and old["budget_steps"] == steps:
                info["modes"][m] = old["modes"]["scratch"] if "modes" in old else old["scratch"]
                info["scratch_reused_from"] = args.scratch_from
                continue
            if m == "scratch":
                res, params, ev = run_scratch(field, data, args, target, k, progress, steps)
            elif m in ("ray", "ray_al"):
                res, params, ev = run_pvd(teacher, tparams, field, data, args, target, k, progress, steps,
                                          active=m == "ray_al")
            elif m in ("point", "point_al"):
                res, params, ev = run_point(teacher, tparams, field, data, args, target, k, progress, steps,
                                            active=m == "point_al")
            else:
                raise ValueError(f"--modes: unknown mode {m!r} (scratch, ray, ray_al, point, point_al)")
            r = info["modes"][m] = summary(res, args)
            r["step_over_teacher_forward"] = r["median_step_ms"] / fwd_ms
            info["params"], info["bytes"] = L.count_params(params), L.param_bytes(params)
            renders[m] = (r, ev(params, True)["images"][0])
            print(f"{name} {m}: {'' if r['reached'] else '>'}{r['steps']} steps / {r['seconds']:.1f} s "
                  f"({r['final_psnr']:.2f} dB)", flush=True)
        sc = info["modes"]["scratch"]
        for m in modes[1:]:
            pv = info["modes"][m]
            bound = {(True, True): "=", (False, True): ">=", (True, False): "<=",
                     (False, False): "n/a"}[(sc["reached"], pv["reached"])]
            q = min(target, max(h[2] for h in sc["history"]), max(h[2] for h in pv["history"]))
            ms, mp = steps_to(sc["history"], q), steps_to(pv["history"], q)
            pv.update(speedup_time=sc["seconds"] / max(pv["seconds"], 1e-9),
                      speedup_steps=sc["steps"] / max(pv["steps"], 1), speedup_bound=bound,
                      matched={"psnr": q, "scratch_steps": ms[0], "scratch_seconds": ms[1], "steps": mp[0],
                               "seconds": mp[1], "speedup_steps": ms[0] / mp[0],
                               "speedup_time": ms[1] / max(mp[1], 1e-9)})
        # the first distillation mode run is also stored under the keys of the first study
        first = next((m for m in modes[1:]), None)
        info["scratch"] = sc
        if first is not None:
            info["pvd"] = info["modes"][first]
            info["speedup_time"] = info["pvd"]["speedup_time"]
            info["pvd_step_over_teacher_forward"] = info["pvd"]["step_over_teacher_forward"]
        students[name] = info
        if renders:
            best = min((m for m in renders if m != "scratch"), default=None,
                       key=lambda m: (not renders[m][0]["reached"], renders[m][0]["seconds"]))
            for m in [best, "scratch"]:
                if m in renders:
                    r, img = renders[m]
                    student_panels.append((f"{name} {m} {'' if r['reached'] else '>'}{r['steps']} st, "
                                           f"{r['final_psnr']:.1f} dB", img))

    rows = ["| student | params | budget | mode | steps to target | seconds to target | speed-up (time) | "
            "speed-up (steps) | final dB | median step ms | step / teacher fwd |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, info in students.items():
        for m, r in info["modes"].items():
            b = r.get("speedup_bound")
            if m == "scratch":
                spt = sps = "1x (reference)"
            elif b == "n/a":
                spt = sps = f"n/a ({r['matched']['speedup_time']:.1f}x at {r['matched']['psnr']:.2f} dB)"
            else:
                pre = "" if b == "=" else b
                spt, sps = f"{pre}{r['speedup_time']:.1f}x", f"{pre}{r['speedup_steps']:.1f}x"
            mark = "" if r["reached"] else ">"
            rows.append(f"| {name} | {info['params']} | {info['budget_steps']} | {m} | {mark}{r['steps']} | "
                        f"{mark}{r['seconds']:.1f} | {spt} | {sps} | {r['final_psnr']:.2f} | "
                        f"{r['median_step_ms']:.1f} | {r.get('step_over_teacher_forward', float('nan')):.1f}x |")
    table = (f"\n## PVD vs from scratch -- scene {args.scene} {args.size}px, teacher {args.teacher} "
             f"({L.count_params(tparams)} params, {L.param_bytes(tparams)} bytes), {t_psnr:.2f} dB, target "
             f"{target:.2f} dB; teacher forward {fwd_ms:.2f} ms/step\n\n" + "\n".join(rows))
    print(table)
    save_png(os.path.join(args.out, "pvd_renders.png"), [teacher_panel] + student_panels + [("ground truth", gt)],
             f"test view 0 ({args.scene} scene); teacher | per student: fastest distillation mode, from scratch | "
             f"ground truth; target {target:.1f} dB")
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
