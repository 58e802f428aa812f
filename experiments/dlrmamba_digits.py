"""DLRMamba on digits: a full-rank SS2D teacher, then rank-r students trained with the task loss
only, with logit distillation, and with structure-aware state distillation.

    python experiments/dlrmamba_digits.py                # a few minutes on 2 CPU cores
    python experiments/dlrmamba_digits.py --quick        # smoke test, seconds (writes to runs/)

Data: scikit-learn's 8x8 digits through ``experiments/_digits_bench.py`` (1438 train / 359 test,
pixels in [0, 1]) read as 64 tokens of one pixel on the 8 x 8 grid. Model:
:class:`lrjax.nn.dlrmamba.DLRMambaClassifier` (token embedding + position table, ``--layers``
pre-norm residual SS2D blocks with four scan directions, mean pool, linear head). The teacher is
dense (``rank=None``); the students factorize ``in_proj``, ``x_proj``, ``out_proj`` and ``A_log``
of every block at ``--rank`` (same ``d_inner`` and ``N``, so the states compare without a
projection, ``P = I``). Every model: Adam ``--lr``, batch ``--batch``, ``--steps`` steps, the same
batch order per seed; students of one seed share their initialization.

Arms (students):

* ``task``: cross-entropy only;
* ``logit_kd``: CE + ``--lam-kd`` * ``T^2 KL(p_t || p_s)`` at ``T = --temperature`` (Hinton);
* ``state_kd``: CE + ``--lam-state`` * ``sum_layers mean((h_s - h_t)^2) / mean(h_t^2)`` over the
  SSM states of every block (``state_distill_loss(..., normalize=True)``) -- DLRMamba's
  structure-aware distillation [ours: the exact loss; the paper gives it only in words].

Reported: test accuracy (mean over ``--seeds``), the fraction of the teacher gap closed
``(acc_arm - acc_task) / (acc_teacher - acc_task)``, the relative state error of each student
against the teacher on the test set, parameter counts, and step times (jitted, warmed up, medians
of ``block_until_ready`` calls, round robin). The **limit** of a student's step is the teacher's
training step (the students are smaller; the distilling arms also run the teacher forward).
Writes ``<out>/dlrmamba_digits.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _digits_bench as D  # noqa: E402
import _report as R  # noqa: E402

from lrjax.benchmark import blocking, summarize, time_round_robin  # noqa: E402
from lrjax.nn.dlrmamba import DLRMambaClassifier, logit_kd_loss, state_distill_loss  # noqa: E402

ARMS = ("task", "logit_kd", "state_kd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few steps, tiny model, one seed (smoke test)")
    p.add_argument("--out", default=None, help="output directory (default results/dlrmamba_digits; quick: runs/dlrmamba_digits)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model, default 300 (quick: 3)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (quick: 16)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, default=None, help="default 2 (quick: 1)")
    p.add_argument("--rank", type=int, default=2, help="student rank of in_proj, x_proj, out_proj, A_log")
    p.add_argument("--d-model", type=int, default=None, help="default 16 (quick: 8)")
    p.add_argument("--expand", type=int, default=1)
    p.add_argument("--d-state", type=int, default=4)
    p.add_argument("--layers", type=int, default=None, help="default 2 (quick: 1)")
    p.add_argument("--lam-kd", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--lam-state", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per step, default 15 (quick: 2)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(steps=(3, 300), batch=(16, 64), seeds=(1, 2), d_model=(8, 16), layers=(1, 2), repeats=(2, 15),
                out=("runs/dlrmamba_digits", "results/dlrmamba_digits"))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    return a


def make(args, rank, seed):
    m = DLRMambaClassifier(10, d_model=args.d_model, n_layers=args.layers, d_state=args.d_state,
                           expand=args.expand, rank=rank, rngs=nnx.Rngs(seed))
    g, p = nnx.split(m)
    n = sum(int(a.size) for a in jax.tree_util.tree_leaves(p))
    return g, p, n


def ce(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def step_fn(g, opt, arm, args, tg=None):
    """One jitted Adam step. ``arm='teacher'`` or ``'task'``: cross-entropy only. ``arm='distill'``:
    ``CE + w_kd * KD + w_state * state loss`` with the weights as runtime scalars, so the three
    students share one compiled step (``w = (0, 0)`` is the task arm; the teacher forward then still
    runs, so the task arm's *timing* uses the ``'task'`` step)."""
    def loss(p, tp, w, x, y):
        logits, hs = nnx.merge(g, p)(x, return_states=True)
        task = ce(logits, y)
        if arm in ("teacher", "task"):
            return task
        tl, ht = nnx.merge(tg, tp)(x, return_states=True)
        return (task + w[0] * logit_kd_loss(logits, tl, temperature=args.temperature)
                + w[1] * state_distill_loss(hs, ht, normalize=True))

    @jax.jit
    def step(p, s, tp, w, x, y):
        val, gr = jax.value_and_grad(loss)(p, tp, w, x, y)
        upd, s = opt.update(gr, s, p)
        return optax.apply_updates(p, upd), s, val
    return step


def arm_weights(arm, args):
    return jnp.asarray({"task": (0.0, 0.0), "logit_kd": (args.lam_kd, 0.0), "state_kd": (0.0, args.lam_state),
                        "teacher": (0.0, 0.0)}[arm], jnp.float32)


def train(p, arm, args, data, seed, step, tp, progress=True):
    (xtr, ytr) = data
    s = optax.adam(args.lr).init(p)
    w = arm_weights(arm, args)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in tqdm(range(args.steps), desc=f"{arm} seed {seed}", leave=False, disable=not progress, file=sys.stdout):
        idx = rng.integers(0, len(xtr), args.batch)
        p, s, val = step(p, s, tp, w, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]))
        losses.append(float(val))
    return p, losses, s


def forward_fn(g):
    return jax.jit(lambda p, x: nnx.merge(g, p)(x, return_states=True))


def run(args, progress):
    (xtr, ytr), (xte, yte) = D.task("original")
    res = {"teacher": {"acc": [], "params": None}, **{a: {"acc": [], "state_err": [], "params": None} for a in ARMS}}
    keep = {}
    opt = optax.adam(args.lr)
    xt = jnp.asarray(xte)
    for seed in range(args.seeds):
        tg, tp, tn = make(args, None, seed)
        if seed == 0:
            tstep, tfwd = step_fn(tg, opt, "teacher", args), forward_fn(tg)
        tp, tl, ts = train(tp, "teacher", args, (xtr, ytr), seed, tstep, tp, progress)
        tlog, ht = tfwd(tp, xt)
        res["teacher"]["params"] = tn
        res["teacher"]["acc"].append(float(np.mean(np.argmax(np.asarray(tlog), -1) == yte)))
        res["teacher"].setdefault("final_loss", []).append(float(np.mean(tl[-20:])))
        keep["teacher"] = (tp, ts)
        for arm in ARMS:
            g, p, n = make(args, args.rank, 1000 + seed)
            if seed == 0 and arm == ARMS[0]:
                sstep, sfwd = step_fn(g, opt, "distill", args, tg), forward_fn(g)
            p, ls, s = train(p, arm, args, (xtr, ytr), seed, sstep, tp, progress)
            logits, hs = sfwd(p, xt)
            res[arm]["params"] = n
            res[arm]["acc"].append(float(np.mean(np.argmax(np.asarray(logits), -1) == yte)))
            res[arm]["state_err"].append(float(state_distill_loss(hs, ht, normalize=True)) / len(hs))
            res[arm].setdefault("final_loss", []).append(float(np.mean(ls[-20:])))
            keep[arm] = (g, p, s)
    for v in res.values():
        v["acc_mean"] = float(np.mean(v["acc"]))
        v["acc_std"] = float(np.std(v["acc"]))
        if "state_err" in v:
            v["state_err_mean"] = float(np.mean(v["state_err"]))
    gap = res["teacher"]["acc_mean"] - res["task"]["acc_mean"]
    for arm in ARMS:
        res[arm]["gap_closed"] = float((res[arm]["acc_mean"] - res["task"]["acc_mean"]) / gap) if gap > 0 else None
    res["teacher_gap"] = float(gap)
    # timing: every step on the same batch, round robin; the teacher step is the limit
    x = jnp.asarray(xtr[:args.batch])
    y = jnp.asarray(ytr[:args.batch])
    tp, ts = keep["teacher"]
    g, p, s = keep["task"]
    task_step = step_fn(g, opt, "task", args)
    w = arm_weights("state_kd", args)
    calls = {"limit: teacher step": blocking(tstep, tp, ts, tp, w, x, y),
             "student task step": blocking(task_step, p, s, tp, w, x, y),
             "student distill step": blocking(sstep, p, s, tp, w, x, y)}
    times = time_round_robin(calls, args.repeats, desc="timing", progress=progress)
    timing = {k: summarize(v) for k, v in times.items()}
    return res, timing


def table(out):
    r, tm = out["results"], out["timing"]
    a = out["config"]
    lim = tm["limit: teacher step"]["median_ms"]
    rows = [f"| model | rank | params | test acc (mean +- std, {a['seeds']} seeds) | teacher gap closed | "
            "state error vs teacher | step (ms) | / teacher step |", "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| teacher (dense) | full | {r['teacher']['params']} | {r['teacher']['acc_mean']:.4f} +- "
            f"{r['teacher']['acc_std']:.4f} | 1 | 0 | {lim:.1f} | 1.00 (limit) |"]
    for arm in ARMS:
        v = r[arm]
        st = tm["student task step" if arm == "task" else "student distill step"]["median_ms"]
        gc = "n/a (no gap)" if v["gap_closed"] is None else f"{v['gap_closed']:.2f}"
        rows.append(f"| student, {arm} | {a['rank']} | {v['params']} | {v['acc_mean']:.4f} +- {v['acc_std']:.4f} | "
                    f"{gc} | {v['state_err_mean']:.3f} | {st:.1f} | {st / lim:.2f} |")
    rows.append("")
    rows.append(f"Teacher gap (teacher - task-only student): {r['teacher_gap']:+.4f}. State error: "
                "mean over layers of mean((h_s - h_t)^2) / mean(h_t^2) on the test set.")
    return "\n".join(rows)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    r = out["results"]
    names = ["teacher"] + list(ARMS)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].bar(names, [r[n]["acc_mean"] for n in names], yerr=[r[n]["acc_std"] for n in names], color="C0")
    lo = min(r[n]["acc_mean"] for n in names)
    ax[0].set_ylim(max(0.0, lo - 0.1), 1.0)
    ax[0].set_ylabel("test accuracy")
    ax[0].set_title(f"digits, student rank {out['config']['rank']}")
    ax[1].bar(list(ARMS), [r[n]["state_err_mean"] for n in ARMS], color="C1")
    ax[1].set_ylabel("relative state error vs teacher")
    for a in ax:
        a.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    out = R.start(__file__, argv, args)
    out["results"], out["timing"] = run(args, progress)
    return R.finish(out, args, "dlrmamba_digits", table, plot)


if __name__ == "__main__":
    main()
