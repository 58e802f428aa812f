"""TracksTo4D on synthetic scenes (``lrjax.fields.tracks``): unsupervised training on 2-D tracks,
held-out reprojection error, test-time fine-tuning, and the baselines that bound it.

    python experiments/tracks4d.py            # a few minutes on 2 CPU cores
    python experiments/tracks4d.py --quick    # smoke test, seconds (writes to runs/, not results/)

Data: every training step draws ``--batch`` fresh scenes from :func:`synthetic_tracks` (``--frames``
frames, ``--points`` points, 25% of them moving in a shared basis of ``--true-bases`` dynamic bases,
a random orbiting camera, 10% random drop-outs); the held-out set is ``--eval-scenes`` scenes from
another seed. Models: :class:`TracksTo4D` with ``K = --n-bases`` dynamic bases, and the same network
with ``K = 0`` (static-only: every point is fixed in the world), trained identically (Adam
``--lr``, ``--steps`` steps, the paper's four losses with their default weights). Reported on the
held-out set (mean Euclidean reprojection error over visible entries, normalized image units,
split into static and dynamic points):

* ``untrained`` -> ``trained`` (one feed-forward pass) -> ``test-time fine-tuned`` (``--ft-steps``
  Adam steps of the whole network on each held-out scene alone, all scenes fine-tuned in parallel
  with ``jax.vmap``);
* baselines: the ground-truth geometry and cameras through the same projection (the floor: 0 up
  to float rounding); a direct per-scene optimisation of bases, coefficients, cameras and sigma
  with the same losses and the same number of Adam steps as the fine-tuning (at 10x ``--lr``), from the
  untrained network's initial prediction (what the encoder's prior saves); and the static-only model.
* time: one batched forward pass over the held-out set (ms per scene; the limit of the method's
  inference cost, the paper's runtime claim), one fine-tuning step, one training step.

Timings are medians of ``block_until_ready`` calls after warm-up, measured on a shared, loaded
machine (load averages in the run record). Writes ``<out>/tracks4d.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report as R  # noqa: E402

from lrjax.benchmark import blocking, summarize, time_round_robin  # noqa: E402
from lrjax.fields.tracks import (TracksOutput, TracksTo4D, predict_tracks, rotation_6d,  # noqa: E402
                                 synthetic_tracks, tracks_losses)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few steps (smoke test)")
    p.add_argument("--out", default="runs/tracks4d", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps, default 800 (quick: 20)")
    p.add_argument("--eval-every", type=int, default=None, help="default 100 (quick: 10)")
    p.add_argument("--batch", type=int, default=None, help="scenes per step, default 4 (quick: 1)")
    p.add_argument("--frames", type=int, default=None, help="default 12 (quick: 6)")
    p.add_argument("--points", type=int, default=None, help="default 32 (quick: 12)")
    p.add_argument("--width", type=int, default=None, help="default 32 (quick: 16)")
    p.add_argument("--depth", type=int, default=None, help="attention layer pairs, default 2 (quick: 1)")
    p.add_argument("--n-bases", type=int, default=3, help="model's dynamic bases K")
    p.add_argument("--true-bases", type=int, default=2, help="scenes' dynamic bases")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ft-steps", type=int, default=None, help="test-time fine-tuning steps, default 200 (quick: 10)")
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--eval-scenes", type=int, default=None, help="default 4 (quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls, default 3 (quick: 1)")
    p.add_argument("--models", default=None, help="comma list of tracks4d,static_only; default both (quick: tracks4d)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    q = a.quick
    for name, full, quick in (("steps", 800, 20), ("eval_every", 100, 10), ("batch", 4, 1), ("frames", 12, 6),
                              ("points", 32, 12), ("width", 32, 16), ("depth", 2, 1), ("ft_steps", 200, 10),
                              ("eval_scenes", 4, 1), ("repeats", 3, 1),
                              ("models", "tracks4d,static_only", "tracks4d")):
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    a.eval_every = min(a.eval_every, a.steps)
    a.steps = -(-a.steps // a.eval_every) * a.eval_every     # whole chunks: one compiled chunk length
    return a


def scenes(key, n, args):
    return _scenes(key, n, args.frames, args.points, args.true_bases)


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _scenes(key, n, frames, points, true_bases):
    return jax.vmap(lambda k: synthetic_tracks(k, frames, points, n_bases=true_bases))(jax.random.split(key, n))


def split_errors(out: TracksOutput, data):
    """Held-out mean reprojection error, overall and on static / dynamic points (per-scene means)."""
    return {k: float(v) for k, v in _split_errors(out, data.tracks, data.dynamic).items()}


@jax.jit
def _split_errors(out, tracks, dynamic):
    xy, _ = predict_tracks(out)
    vis = tracks[..., 2]
    e = jnp.sqrt(jnp.sum((xy - tracks[..., :2]) ** 2, -1)) * vis
    dyn = dynamic[:, None, :].astype(e.dtype)

    def mean(m):
        return jnp.mean(jnp.sum(e * m, (-1, -2)) / jnp.maximum(jnp.sum(vis * m, (-1, -2)), 1.0))
    return {"all": mean(jnp.ones_like(dyn)), "static": mean(1.0 - dyn), "dynamic": mean(dyn)}


def make_runner(apply):
    """``run(states[S], opts[S], data[S, n, B, T, P, 3]) -> (states, opts), errors [S, n], outputs``: n Adam
    steps of S independent model copies (vmap), copy s on the batches ``data[s]``; the learning rate sits in
    the optimizer state (``optax.inject_hyperparams``), so training (S = 1, B scenes per step) and test-time
    fine-tuning (S held-out scenes, B = 1) share one program when their shapes agree (``--quick``)."""
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)

    def loss_fn(st, tr):
        return tracks_losses(apply(st, tr), tr)

    def step(carry, tr):
        st, o = carry
        (_, terms), g = jax.value_and_grad(loss_fn, has_aux=True)(st, tr)
        upd, o = tx.update(g, o, st)
        return (optax.apply_updates(st, upd), o), terms["error"]

    def run(st, o, data):
        (st, o), errs = jax.lax.scan(step, (st, o), data)
        return (st, o), errs, apply(st, data[-1])

    def init(st, lr, copies):
        o = tx.init(st)
        o.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (copies,) + jnp.shape(x)), o)
    return jax.jit(jax.vmap(run)), init


def train_model(args, n_bases, held, progress):
    # built under one jit: the initializers compile as one program, not one per parameter shape
    graphdef, state = jax.jit(lambda: nnx.split(TracksTo4D(n_bases, width=args.width, depth=args.depth,
                                                           rngs=nnx.Rngs(args.seed))))()
    apply = lambda st, tr: nnx.merge(graphdef, st)(tr)  # noqa: E731
    run, opt_init = make_runner(apply)
    states = jax.tree.map(lambda x: x[None], state)
    opt = opt_init(state, args.lr, 1)
    fwd = jax.jit(apply)
    init_out = fwd(state, held.tracks)
    curve = [(0, split_errors(init_out, held))]
    untrained = curve[0][1]
    key = jax.random.key(args.seed + 1)
    t0 = time.perf_counter()
    train_err = []
    n, b = args.eval_every, args.batch
    for _ in tqdm(range(args.steps // n), desc=f"train K={n_bases}", leave=False, disable=not progress,
                  file=sys.stdout):
        key, sub = jax.random.split(key)
        data = scenes(sub, max(n * b, args.eval_scenes), args).tracks[:n * b].reshape(1, n, b, *held.tracks.shape[1:])
        (states, opt), errs, _ = run(states, opt, data)
        train_err += [float(x) for x in errs[0]]
        curve.append((curve[-1][0] + n, split_errors(fwd(jax.tree.map(lambda x: x[0], states), held.tracks), held)))
    train_s = time.perf_counter() - t0
    return {"graphdef": graphdef, "state": jax.tree.map(lambda x: x[0], states), "states": states, "opt": opt,
            "apply": apply, "run": run, "opt_init": opt_init, "fwd": fwd, "init_out": init_out,
            "untrained": untrained, "trained": curve[-1][1], "curve": curve, "train_error": train_err,
            "train_s": train_s, "params": int(sum(x.size for x in jax.tree.leaves(state))),
            "train_data": data}


def finetune(args, m, held, progress):
    """Test-time fine-tuning: every held-out scene gets its own copy of the trained network (vmap) and
    ``--ft-steps`` Adam steps on that scene alone."""
    s = args.eval_scenes
    states = jax.tree.map(lambda x: jnp.broadcast_to(x, (s,) + x.shape), m["state"])
    opt = m["opt_init"](m["state"], args.ft_lr, s)
    data = jnp.broadcast_to(held.tracks[:, None, None], (s, args.ft_steps, 1) + held.tracks.shape[1:])
    t0 = time.perf_counter()
    _, errs, outs = m["run"](states, opt, data)
    jax.block_until_ready(outs)
    ft_s = time.perf_counter() - t0
    outs = jax.tree.map(lambda x: x[:, 0], outs)
    return {"after": split_errors(outs, held), "curve": np.asarray(errs).mean(0).tolist(), "wall_s": ft_s,
            "call": (m["run"], states, opt, data)}


def direct_optimisation(args, m, held):
    """Per-scene optimisation without a network: the outputs themselves are the parameters, started
    from the untrained network's prediction, same losses and number of steps as fine-tuning, Adam at 10x
    ``--lr`` (the outputs move directly; no weight sharing, no learned prior)."""
    init = m["init_out"]
    r6 = jnp.concatenate([init.rotations[..., :, 0], init.rotations[..., :, 1]], -1)   # the same rotations
    params = {"bases": init.bases, "coeffs": init.coeffs[..., 1:], "r6": r6, "t": init.translations,
              "s": init.sigma - 1.0 - 1e-4}
    tx = optax.adam(args.lr * 10)   # the outputs move directly; 10x the network's rate, see docs

    def to_out(p):
        c = jnp.concatenate([jnp.ones(p["coeffs"].shape[:-1] + (1,)), p["coeffs"]], -1)
        return TracksOutput(p["bases"], c, rotation_6d(p["r6"]), p["t"], jax.nn.elu(p["s"]) + 1.0 + 1e-4)

    def run(p, tr):
        o = tx.init(p)

        def step(carry, _):
            q, o = carry
            (_, terms), g = jax.value_and_grad(lambda q: tracks_losses(to_out(q), tr), has_aux=True)(q)
            upd, o = tx.update(g, o, q)
            return (optax.apply_updates(q, upd), o), terms["error"]
        (p, _), errs = jax.lax.scan(step, (p, o), None, length=args.ft_steps)
        return p, errs
    p, errs = jax.jit(jax.vmap(run))(params, held.tracks)
    return {"after": split_errors(jax.jit(jax.vmap(to_out))(p), held), "curve": np.asarray(errs).mean(0).tolist()}


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    out = R.start(__file__, argv, args)
    # drawn with the training chunk's shape (one compiled generator), the first --eval-scenes kept
    n_gen = max(args.eval_every * args.batch, args.eval_scenes)
    held = jax.tree.map(lambda x: x[:args.eval_scenes], scenes(jax.random.key(10_000 + args.seed), n_gen, args))
    out["held_out_visible_fraction"] = float(held.tracks[..., 2].mean())
    gt = TracksOutput(held.bases, held.coeffs, held.rotations, held.translations, held.bases[..., 0, 0] * 0 + 1)
    out["ground_truth"] = split_errors(gt, held)
    out["models"] = {}
    models = {}
    for name, k in (("tracks4d", args.n_bases), ("static_only", 0)):
        if name not in args.models.split(","):
            continue
        m = train_model(args, k, held, progress)
        m["n_bases"] = k
        ft = finetune(args, m, held, progress)
        models[name] = (m, ft)
        out["models"][name] = {
            "n_bases": k, "params": m["params"], "untrained": m["untrained"], "trained": m["trained"],
            "finetuned": ft["after"], "finetune_curve": ft["curve"], "finetune_wall_s": ft["wall_s"],
            "curve": [(s, e) for s, e in m["curve"]], "train_s": m["train_s"],
            "train_error_first_last": [float(np.mean(m["train_error"][:10])), float(np.mean(m["train_error"][-10:]))]}
    m = models["tracks4d"][0]
    out["direct"] = direct_optimisation(args, m, held)

    # timings of the already compiled programs: the batched forward over the held-out set (inference),
    # the vmapped fine-tuning of every held-out scene, one training chunk
    calls = {"forward": blocking(m["fwd"], m["state"], held.tracks),
             "finetune": blocking(*models["tracks4d"][1]["call"]),
             "train_chunk": blocking(m["run"], m["states"], m["opt"], m["train_data"])}
    ms = time_round_robin(calls, args.repeats, warmup=0, desc="timing", progress=progress)
    t = out["timing_ms"] = {k: summarize(v) for k, v in ms.items()}
    t["forward_per_scene"] = t["forward"]["median_ms"] / args.eval_scenes
    t["finetune_step_per_scene"] = t["finetune"]["median_ms"] / (args.eval_scenes * args.ft_steps)
    t["train_step"] = t["train_chunk"]["median_ms"] / args.eval_every
    return R.finish(out, args, "tracks4d", tables, plot)


def _fmt(e):
    return f"{e['all']:.4f} | {e['static']:.4f} | {e['dynamic']:.4f}"


def tables(out):
    c = out["config"]
    rows = [f"Held-out reprojection error (mean Euclidean distance over visible entries, normalized image "
            f"units; {c['eval_scenes']} scenes of {c['frames']} frames x {c['points']} points, "
            f"{c['true_bases']} true dynamic bases; training {c['steps']} steps x {c['batch']} scenes; "
            f"fine-tuning / direct optimisation {c['ft_steps']} steps per scene).", "",
            "| model / baseline | params | all | static pts | dynamic pts |", "|---|---|---|---|---|",
            f"| ground-truth geometry and cameras (floor) | - | {_fmt(out['ground_truth'])} |"]
    for name, r in out["models"].items():
        label = f"TracksTo4D K={r['n_bases']}" if name == "tracks4d" else "static-only (K=0)"
        rows += [f"| {label}, untrained | {r['params']} | {_fmt(r['untrained'])} |",
                 f"| {label}, trained (feed-forward) | {r['params']} | {_fmt(r['trained'])} |",
                 f"| {label}, + test-time fine-tuning | {r['params']} | {_fmt(r['finetuned'])} |"]
    rows.append(f"| direct per-scene optimisation (no network, same steps) | - | {_fmt(out['direct']['after'])} |")
    t = out["timing_ms"]
    rows += ["", "| time (median ms) | value |", "|---|---|",
             f"| forward pass, {c['eval_scenes']} scenes batched (inference limit) | {t['forward']['median_ms']:.2f} |",
             f"| forward pass per scene | {t['forward_per_scene']:.3f} |",
             f"| one test-time fine-tuning step per scene (vmapped over the scenes) | "
             f"{t['finetune_step_per_scene']:.3f} ({t['finetune_step_per_scene'] / t['forward_per_scene']:.1f}x "
             f"a per-scene forward; {c['ft_steps']} steps = {c['ft_steps'] * t['finetune_step_per_scene']:.0f} ms) |",
             f"| one training step, {c['batch']} scenes | {t['train_step']:.2f} |"]
    return "\n".join(rows)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in out["models"].items():
        steps = [s for s, _ in r["curve"]]
        axes[0].plot(steps, [e["all"] for _, e in r["curve"]], label=f"{name} all")
        axes[0].plot(steps, [e["dynamic"] for _, e in r["curve"]], "--", label=f"{name} dynamic pts")
        axes[1].plot(r["finetune_curve"], label=f"{name} fine-tuned")
    axes[1].plot(out["direct"]["curve"], label="direct optimisation")
    axes[0].set(xlabel="training step", ylabel="held-out reprojection error", yscale="log",
                title="training (feed-forward)")
    axes[1].set(xlabel="per-scene step", ylabel="reprojection error", yscale="log", title="test-time")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
