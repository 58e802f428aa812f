"""MTLoRA on digits: three tasks (class, parity, ">4") on one backbone pretrained on the class only.

    python experiments/mtlora_digits.py                  # a few minutes on 2 CPU cores
    python experiments/mtlora_digits.py --quick          # smoke test, seconds (writes to runs/)

Fixture: ``experiments/_digits_bench.py`` (scikit-learn digits, MLP ``64-256-256-10`` with GELU,
pretrained ``--pretrain-steps`` Adam steps on the original 10-class task). The multi-task model keeps
the backbone ``fc1 -> fc2`` and gets three heads ``[256 -> 10]`` (class; initialized from the
pretrained ``out`` layer), ``[256 -> 2]`` (parity) and ``[256 -> 2]`` (digit > 4) (random init),
stored stacked as ``[T=3, 256, 10]`` with the unused logits of the binary heads masked, so all
tasks run in one ``einsum``. The fine-tuning inputs are the ``--shift`` version of the images
(default ``rot90``: the pretrained features no longer fit, so the backbone must adapt; with
``original`` every method is within noise of the heads-only probe). Loss: mean over the three
tasks of the softmax cross-entropy. Every method trains its heads too (as the official MTLoRA
trains its decoders).

Methods (same steps, batch, optimizer; Adam, learning rate picked per method from ``--lrs`` on a
validation split = every 5th training image, test accuracy reported at that rate, mean over
``--seeds``):

* ``heads_only``: frozen backbone, heads only (the linear-probe floor);
* ``shared_lora_r{r}``: one LoRA on ``fc1`` and ``fc2`` shared by all tasks, scale 4 (MTLoRA's
  shared scale), at ``--rank`` and at ``--rank-matched`` (about MTLoRA's trainable count);
* ``mtlora``: :class:`lrjax.reparam.mtlora.MTLoRA` -- a shared pair (``--rank``) on ``fc1`` and
  ``fc2``, plus per-task pairs (``--task-rank``) on ``fc2``, the last block, which runs as three
  streams (``jax.vmap`` over the task axis of ``materialize_tasks``) into the per-task heads;
  ``shared_mode="matrix"`` (the official default: the streams do not read ``fc2``'s shared pair, which
  therefore gets no gradient; it is counted in the trainable parameters, and listed as unused);
* ``mtlora_v2``: the same with ``shared_mode="matrixv2"`` (streams add the shared term);
* ``full_ft``: every backbone weight and the heads.

MTLoRA trains through :meth:`MTLoRA.linear` at ``fc2``: its input is the shared stream, so the
official layer (``x W`` once plus three rank-``r_t`` terms) is exactly the per-task merge there, and
it avoids running the dense ``fc2`` once per task. The merged model for serving is the three
streams of ``materialize_tasks`` (= ``merge_task(t)`` for every ``t``).

Timing (jitted, warmed up, medians of ``block_until_ready`` calls, methods interleaved round robin,
batch ``--time-batch``; XLA's flop count beside each, which the machine's load does not change):
the training step of every method (forward, backward, Adam update) and the inference forward of the
merged model; for MTLoRA also the step through ``materialize_tasks`` and the factored forward. The
**limit** is the plain forward of the pretrained backbone with the three heads (what any merged
shared-backbone model costs); MTLoRA's merged streams run ``fc2`` once per task, so their floor is
the "3-stream forward" row. Writes ``<out>/mtlora_digits.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _digits_bench as D  # noqa: E402
import _report as R  # noqa: E402

import lrjax  # noqa: E402
from lrjax.benchmark import blocking, summarize, time_round_robin  # noqa: E402
from lrjax.reparam.mtlora import MTLoRA  # noqa: E402

TASKS = ("class", "parity", "gt4")
NCLS = (10, 2, 2)
MASK = np.array([[c < k for c in range(10)] for k in NCLS])  # [T, 10] valid logits per head


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few steps, one seed, one LR (smoke test)")
    p.add_argument("--out", default=None, help="output directory (default results/mtlora; quick: runs/mtlora)")
    p.add_argument("--shift", default="rot90", choices=("original",) + D.TASKS)
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps, default 400 (quick: 8)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="default 1e-3 3e-3 1e-2 (quick: 3e-3)")
    p.add_argument("--seeds", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--rank", type=int, default=8, help="shared rank (MTLoRA r_shared, shared LoRA)")
    p.add_argument("--task-rank", type=int, default=4, help="MTLoRA per-task rank")
    p.add_argument("--rank-matched", type=int, default=16, help="shared LoRA rank matching MTLoRA's count")
    p.add_argument("--scale", type=float, default=4.0, help="MTLoRA shared and task scale (paper configs: 4)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default 200 (quick: 50)")
    p.add_argument("--time-batch", type=int, default=None, help="default 1024 (quick: 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method, default 30 (quick: 2)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of methods to run (default all; quick: heads_only shared_lora_r8 mtlora full_ft)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(steps=(8, 400), lrs=([3e-3], [1e-3, 3e-3, 1e-2]), seeds=(1, 3), pretrain_steps=(50, 200),
                time_batch=(64, 1024), repeats=(2, 30), out=("runs/mtlora", "results/mtlora"))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    if a.methods is None and a.quick:
        a.methods = ["heads_only", f"shared_lora_r{a.rank}", "mtlora", "full_ft"]
    return a


# ---------------------------------------------------------------------------------- data, model
def data(shift):
    """``(train, val, test)``, each ``(x [B, 64], y [T, B])``; val = every 5th training image."""
    (xtr, ytr), (xte, yte) = D.task(shift)
    lab = lambda y: np.stack([y, y % 2, (y > 4).astype(np.int32)])
    val = np.arange(len(xtr)) % 5 == 0
    return ((xtr[~val], lab(ytr[~val])), (xtr[val], lab(ytr[val])), (xte, lab(yte)))


def init_heads(pre, seed):
    """Stacked heads ``kernel [T, 256, 10]``, ``bias [T, 10]``: the class head is the pretrained
    ``out`` layer, the binary heads are ``N(0, 1/256)`` with zero bias."""
    h = pre["out"]["kernel"].shape[0]
    rnd = jax.random.normal(jax.random.key(1000 + seed), (len(TASKS) - 1, h, 10)) / np.sqrt(h)
    return {"kernel": jnp.concatenate([pre["out"]["kernel"][None], rnd]),
            "bias": jnp.concatenate([pre["out"]["bias"][None], jnp.zeros((len(TASKS) - 1, 10))])}


def head_logits(hs, heads):
    """``hs``: one shared feature ``[B, H]`` or per-task streams ``[T, B, H]`` -> logits ``[T, B, 10]``."""
    eq = "bh,thc->tbc" if hs.ndim == 2 else "tbh,thc->tbc"
    z = jnp.einsum(eq, hs, heads["kernel"]) + heads["bias"][:, None]
    return jnp.where(jnp.asarray(MASK)[:, None], z, -1e9)


def shared_features(p, x):
    h = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False)
    return jax.nn.gelu(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], approximate=False)


def stream_features(p, axes, x):
    """Backbone ``fc1`` shared, the last block ``fc2`` as T streams (vmap over the task axis)."""
    h = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False)
    blk = lambda q: jax.nn.gelu(h @ q["kernel"] + q["bias"], approximate=False)
    return jax.vmap(blk, in_axes=(axes["fc2"],))(p["fc2"])


def multi_loss(z, y):
    """Mean over tasks of the mean softmax cross-entropy; ``z [T, B, 10]``, ``y [T, B]``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))


def task_accuracy(z, y):
    return jnp.mean(jnp.argmax(z, -1) == y, axis=-1)  # [T]


# -------------------------------------------------------------------------------------- methods
def methods(args, pre):
    """name -> dict(init(seed) -> trainable, logits(trainable, x) -> [T, B, 10], merged(trainable) ->
    (fn, params) for inference, count, unused, kind)."""
    bb = {k: pre[k] for k in ("fc1", "fc2")}
    out = {}

    def plain_logits(bb_params, heads, x):
        return head_logits(shared_features(bb_params, x), heads)

    out["heads_only"] = dict(
        init=lambda s: {"heads": init_heads(pre, s)},
        logits=lambda t, x: plain_logits(bb, t["heads"], x),
        merged=lambda t: (plain_logits, (bb, t["heads"])), unused=0, kind="probe")
    out["full_ft"] = dict(
        init=lambda s: {"bb": bb, "heads": init_heads(pre, s)},
        logits=lambda t, x: plain_logits(t["bb"], t["heads"], x),
        merged=lambda t: (plain_logits, (t["bb"], t["heads"])), unused=0, kind="full")
    tg = ["fc1/kernel", "fc2/kernel"]
    for r in dict.fromkeys((args.rank, args.rank_matched)):
        rp = lrjax.LoRA(rank=r, alpha=args.scale * r, targets=tg)

        def lora_init(s, rp=rp):
            return {"ad": rp.init(jax.random.key(s), bb)[1], "heads": init_heads(pre, s)}

        out[f"shared_lora_r{r}"] = dict(
            init=lora_init, logits=lambda t, x, rp=rp: plain_logits(rp.materialize(bb, t["ad"]), t["heads"], x),
            merged=lambda t, rp=rp: (plain_logits, (rp.merge(bb, t["ad"]), t["heads"])), unused=0, kind="shared LoRA")
    for name, mode in (("mtlora", "matrix"), ("mtlora_v2", "matrixv2")):
        rp = MTLoRA(rank=args.rank, task_rank=args.task_rank, num_tasks=len(TASKS), targets=tg,
                    task_targets="fc2/kernel", shared_scale=args.scale, task_scale=args.scale, shared_mode=mode)

        def mt_init(s, rp=rp):
            return {"ad": rp.init(jax.random.key(s), bb)[1], "heads": init_heads(pre, s)}

        def mt_streams_logits(t, x, rp=rp):
            """The streams from materialize_tasks: fc2 as 3 merged weights, vmapped."""
            axes = rp.task_axes(bb, t["ad"])
            return head_logits(stream_features(rp.materialize_tasks(bb, t["ad"]), axes, x), t["heads"])

        def mt_logits(t, x, rp=rp):
            """Training path: fc2's input is the shared stream, so rp.linear (the official layer,
            exactly the per-task merge here) computes x W once plus 3 rank-r_t terms."""
            p = rp.materialize(bb, t["ad"])
            h = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False)
            _, y_t = rp.linear(bb["fc2"]["kernel"], t["ad"]["fc2/kernel"], h, bias=bb["fc2"]["bias"])
            return head_logits(jax.nn.gelu(y_t, approximate=False), t["heads"])

        def mt_merged(t, rp=rp):
            axes = rp.task_axes(bb, t["ad"])
            p = jax.lax.stop_gradient(rp.materialize_tasks(bb, t["ad"]))  # = merge_task(t) for every t
            return (lambda p, heads, x: head_logits(stream_features(p, axes, x), heads)), (p, t["heads"])

        unused = args.rank * (256 + 256) if mode == "matrix" else 0  # fc2's shared pair: no stream reads it
        out[name] = dict(init=mt_init, logits=mt_logits, merged=mt_merged, unused=unused,
                         kind=f"MTLoRA ({mode})", streams_logits=mt_streams_logits)
    for m in out.values():
        m["count"] = int(sum(x.size for x in jax.tree.leaves(m["init"](0))))
    return out


def train(m, lr_list, seeds, dat, steps, batch, progress, desc):
    """Train every (lr, seed); returns {lr: [(val acc [T], test acc [T]) per seed]} plus the last
    trained state per lr (seed 0) for the merge check."""
    (xtr, ytr), (xva, yva), (xte, yte) = [(jnp.asarray(x), jnp.asarray(y)) for x, y in dat]
    opt = optax.scale_by_adam()

    @jax.jit
    def run(t, lr, idx):
        def body(c, i):
            t, s = c
            g = jax.grad(lambda t: multi_loss(m["logits"](t, xtr[i]), ytr[:, i]))(t)
            u, s = opt.update(g, s, t)
            return (jax.tree.map(lambda p, u: p - lr * u, t, u), s), None
        (t, _), _ = jax.lax.scan(body, (t, opt.init(t)), idx)
        return t, task_accuracy(m["logits"](t, xva), yva), task_accuracy(m["logits"](t, xte), yte)

    res, keep = {}, {}
    for lr in tqdm(lr_list, desc=desc, leave=False, disable=not progress, file=sys.stdout):
        res[lr] = []
        for s in range(seeds):
            rng = np.random.default_rng(s)
            idx = jnp.asarray(np.stack([rng.choice(len(xtr), batch, replace=False) for _ in range(steps)]))
            t, va, te = run(m["init"](s), jnp.float32(lr), idx)
            res[lr].append((np.asarray(va), np.asarray(te)))
            if s == 0:
                keep[lr] = t
    return res, keep


def _flops(fn, *a, skip=False):
    """XLA's flop count of the compiled ``fn(*a)`` (load-independent; None where unavailable or
    ``skip``: quick mode saves the extra compiles)."""
    if skip:
        return None
    try:
        ca = jax.jit(fn).lower(*a).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca["flops"])
    except Exception:  # noqa: BLE001 - cost analysis is optional per backend
        return None


def time_methods(ms, trained, pre, args, progress):
    (xtr, ytr), _, _ = data(args.shift)
    x = jnp.asarray(np.resize(xtr, (args.time_batch, xtr.shape[1])))
    y = jnp.asarray(np.resize(ytr, (3, args.time_batch)))
    opt = optax.adam(1e-3)
    calls, infer, flops = {}, {}, {}
    bb = {k: pre[k] for k in ("fc1", "fc2")}
    plain = jax.jit(lambda p, h, x: head_logits(shared_features(p, x), h))
    heads0 = init_heads(pre, 0)
    infer["limit: plain forward"] = blocking(plain, bb, heads0, x)
    flops["limit: plain forward"] = _flops(plain, bb, heads0, x, skip=args.quick)
    # MTLoRA's own floor: the pretrained weights run as T streams in the last block (fc2 once per task)
    stacked = {"fc1": bb["fc1"], "fc2": {"kernel": jnp.stack([bb["fc2"]["kernel"]] * len(TASKS)),
                                          "bias": bb["fc2"]["bias"]}}
    streams = jax.jit(lambda p, h, x: head_logits(stream_features(p, {"fc2": {"kernel": 0, "bias": None}}, x), h))
    infer["limit: 3-stream forward"] = blocking(streams, stacked, heads0, x)
    flops["limit: 3-stream forward"] = _flops(streams, stacked, heads0, x, skip=args.quick)
    for name, m in ms.items():
        t = m["init"](0)

        @jax.jit
        def step(t, s, x, y, m=m):
            g = jax.grad(lambda t: multi_loss(m["logits"](t, x), y))(t)
            u, s = opt.update(g, s, t)
            return optax.apply_updates(t, u), s

        calls[name] = blocking(step, t, opt.init(t), x, y)
        flops[name] = _flops(step, t, opt.init(t), x, y, skip=args.quick)
        fn, args_ = m["merged"](trained[name])
        infer[f"{name} (merged)"] = blocking(jax.jit(fn), *args_, x)
        flops[f"{name} (merged)"] = _flops(fn, *args_, x, skip=args.quick)
        if "streams_logits" in m:  # the same model trained/served through the materialized streams
            sl = m["streams_logits"]

            @jax.jit
            def sstep(t, s, x, y, sl=sl):
                g = jax.grad(lambda t: multi_loss(sl(t, x), y))(t)
                u, s = opt.update(g, s, t)
                return optax.apply_updates(t, u), s

            calls[f"{name}: step via materialize_tasks"] = blocking(sstep, t, opt.init(t), x, y)
            flops[f"{name}: step via materialize_tasks"] = _flops(sstep, t, opt.init(t), x, y, skip=args.quick)
            infer[f"{name}: factored forward (rp.linear)"] = blocking(jax.jit(m["logits"]), trained[name], x)
            flops[f"{name}: factored forward (rp.linear)"] = _flops(m["logits"], trained[name], x, skip=args.quick)
    tt = time_round_robin({**calls, **infer}, args.repeats, warmup=1 if args.quick else 2, desc="timing", progress=progress)
    return {k: {**summarize(v), "xla_flops": flops[k]} for k, v in tt.items()}


def merge_check(ms, trained, dat):
    """Merged inference = the training-time forward (max |logit difference| on the test set)."""
    _, _, (xte, _) = dat
    x = jnp.asarray(xte)
    out = {}
    for name, m in ms.items():
        fn, a = m["merged"](trained[name])
        z1, z2 = m["logits"](trained[name], x), fn(*a, x)
        out[name] = float(jnp.max(jnp.abs(jnp.where(jnp.asarray(MASK)[:, None], z1 - z2, 0.0))))
    return out


def table(out):
    lim = out["timing"]["limit: plain forward"]["median_ms"]
    rows = ["| method | trainable params | of which unused | mean task acc (test) | class | parity | >4 | "
            "best LR | train step (ms) | step / plain fwd | step GFLOP | merged fwd (ms) | fwd / plain fwd | fwd GFLOP |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    gf = lambda k: "-" if out["timing"][k]["xla_flops"] is None else f"{out['timing'][k]['xla_flops'] / 1e9:.3f}"
    for n, r in out["methods"].items():
        st = out["timing"][n]["median_ms"]
        fw = out["timing"][f"{n} (merged)"]["median_ms"]
        acc = r["test_acc_mean"]
        rows.append(f"| {n} | {r['params']:,} | {r['unused_params']:,} | {100 * r['mean_task_acc']:.1f} "
                    f"+- {100 * r['mean_task_acc_std']:.1f} | {100 * acc[0]:.1f} | {100 * acc[1]:.1f} | "
                    f"{100 * acc[2]:.1f} | {r['lr']:g} | {st:.2f} | {st / lim:.1f}x | {gf(n)} | {fw:.3f} | {fw / lim:.2f}x | "
                    f"{gf(n + ' (merged)')} |")
    rows.append(f"| limit: plain forward (pretrained backbone + 3 heads) | - | - | - | - | - | - | - | - | - | - | "
                f"{lim:.3f} | 1.00x | {gf('limit: plain forward')} |")
    l3 = out["timing"]["limit: 3-stream forward"]["median_ms"]
    rows.append(f"| limit: 3-stream forward (pretrained, fc2 once per task: MTLoRA's floor) | - | - | - | - | - | - | "
                f"- | - | - | - | {l3:.3f} | {l3 / lim:.2f}x | {gf('limit: 3-stream forward')} |")
    extra = [k for k in out["timing"] if ": step via" in k or ": factored forward" in k]
    if extra:
        rows += ["", "| other paths of the MTLoRA model | median (ms) | / plain fwd | GFLOP |", "|---|---:|---:|---:|"]
        for k in extra:
            v = out["timing"][k]["median_ms"]
            rows.append(f"| {k} | {v:.2f} | {v / lim:.2f}x | {gf(k)} |")
    return "\n".join(rows)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = out["methods"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for n, r in ms.items():
        a1.errorbar(r["params"], 100 * r["mean_task_acc"], yerr=100 * r["mean_task_acc_std"], fmt="o", capsize=3)
        a1.annotate(n, (r["params"], 100 * r["mean_task_acc"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    a1.set(xscale="log", xlabel="trainable parameters (incl. heads)", ylabel="mean task accuracy (%)",
           title=f"digits ({out['config']['shift']}), 3 tasks")
    tm = out["timing"]
    # load-independent XLA flop counts where available (quick mode skips them), else medians in ms
    key = "xla_flops" if all(v.get("xla_flops") for v in tm.values()) else "median_ms"
    lim = tm["limit: plain forward"][key]
    names = list(ms)
    xs = np.arange(len(names))
    a2.bar(xs - 0.2, [tm[n][key] / lim for n in names], 0.4, label="train step")
    a2.bar(xs + 0.2, [tm[f"{n} (merged)"][key] / lim for n in names], 0.4, label="merged forward")
    a2.axhline(1.0, color="k", ls="--", lw=0.8, label="limit: plain forward")
    a2.axhline(tm["limit: 3-stream forward"][key] / lim, color="tab:red", ls=":", lw=0.8,
               label="limit: 3-stream forward (MTLoRA)")
    a2.set_xticks(xs, names, rotation=35, ha="right", fontsize=8)
    what = "XLA flops" if key == "xla_flops" else "time (ms)"
    a2.set(ylabel=f"{what} / plain forward", yscale="log",
           title=f"cost per call, batch {out['config']['time_batch']} ({what}; ms in the table)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    out = R.start(__file__, argv, args)
    pre = D.pretrain(0, args.pretrain_steps)
    dat = data(args.shift)
    ms = methods(args, pre)
    if args.methods is not None:
        unknown = sorted(set(args.methods) - set(ms))
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; choose from {sorted(ms)}")
        ms = {k: v for k, v in ms.items() if k in args.methods}
    out["methods"], trained = {}, {}
    for name, m in ms.items():
        res, keep = train(m, args.lrs, args.seeds, dat, args.steps, args.batch, progress, name)
        best = max(res, key=lambda lr: np.mean([v.mean() for v, _ in res[lr]]))
        te = np.stack([t for _, t in res[best]])  # [seeds, T]
        trained[name] = keep[best]
        out["methods"][name] = {
            "kind": m["kind"], "params": m["count"], "unused_params": m["unused"], "lr": best,
            "mean_task_acc": float(te.mean()), "mean_task_acc_std": float(te.mean(1).std()),
            "test_acc_mean": te.mean(0).tolist(),
            "val_mean_task_acc_by_lr": {str(lr): float(np.mean([v.mean() for v, _ in r])) for lr, r in res.items()},
            "test_acc_by_seed": te.tolist()}
    out["merge_check_max_abs_logit_diff"] = merge_check(ms, trained, dat)
    out["timing"] = time_methods(ms, trained, pre, args, progress)
    return R.finish(out, args, "mtlora_digits", table, plot)


if __name__ == "__main__":
    main()
