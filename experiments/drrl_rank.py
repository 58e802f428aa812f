"""DR-RL's chosen rank vs the effective rank of Q/K on synthetic segments with a planted rank.

    python experiments/drrl_rank.py --out results/drrl_rank   # a few minutes on 2 CPU cores
    python experiments/drrl_rank.py --quick                   # smoke test (temp dir)

Data: each segment ``X = Z B / sqrt(k) + noise * E`` ``[T, d]`` with ``Z`` ``[T, k]``, ``B`` ``[k, d]``, ``E``
standard normal, the planted rank ``k`` uniform in ``[--k-min, --k-max]``; ``Q = X W_q``, ``K = X W_k``,
``V = X W_v`` with fixed random ``W`` ``[d, d]`` (one head, ``d_h = d``). A contextual bandit: per segment
the policy (:mod:`lrjax.nn.attention.drrl`: MLP over the segment's normalized singular values; the previous-action input is 0) picks
``r`` in ``{r_min, r_min + step, ..., r_max}``; the reward is the paper's Eq. 12
``R = alpha cos(O, O_r) - beta FLOPs(r) / FLOPs(r_max) - gamma ||dA||_F`` with ``||dA||_F`` the
spectra-only score perturbation bound (drrl module docstring) and FLOPs relative to ``r_max`` (the
paper's ``FLOPs / 1e9`` is ~0 at this size; ``--beta`` default 0.2 instead of 0.05 so that the
cost of one extra rank step is visible). REINFORCE, Adam.

Training fixes (defaults; ``--plain`` restores the original run: batch-mean baseline, raw advantages,
no entropy bonus, linear-scale features). The committed plain runs collapsed to one rank for every
segment; the run measures why (``diagnosis`` in the JSON: the spread of the reward across segments vs
across the actions of one segment) and by default trains with (1) ``--samples`` (4) actions per
segment and the leave-one-out (RLOO) baseline, computed on the within-segment ranks of the rewards
(``--shaping rank``; the reward is the paper's, ranking only removes its heavy tail -- ranks below the
planted rank score ~-10 -- from the advantage); ``--samples 1`` uses a learned linear state value
``V(s)`` instead (tried; still collapsed); (2) per-batch advantage normalization; (3) an entropy
bonus ``--entropy`` annealed linearly to 0 over the first ``--entropy-frac`` of the steps (the final
objective is the paper's reward); (4) log-spectrum features (``segment_features(log=True)``).

Reported per planted-rank bucket on held-out segments: the greedy policy rank, the oracle rank (the
action with the best reward, by enumeration), the effective ranks of ``Q`` and ``K`` (entropy
effective rank ``exp(H(sigma / sum sigma))``, Roy & Vetterli 2007; energy 90% / 99% rank), and
fidelity ``cos(O, O_r)`` and FLOPs proxy of the policy vs the fixed rank nearest its mean rank
(equal mean FLOPs). Timing: the low-rank path (SVDs + attention) and the policy vs its limit, the
plain full attention on the same segments (the low-rank path is NOT faster at these sizes: the
FLOPs proxy is nominal, as in the paper's code).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report as R  # noqa: E402

from lrjax.nn.attention.drrl import (attention, drrl_reward, lowrank_attention, perturbation_bound,  # noqa: E402
                                     policy_init, policy_logits, rank_actions, reinforce_loss, segment_features)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps (smoke test, temp dir)")
    p.add_argument("--out", default=None, help="output dir (default results/drrl_rank; quick: a temp dir)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seg-len", type=int, default=None, help="T (default 32; quick 8)")
    p.add_argument("--dim", type=int, default=None, help="d = d_h (default 32; quick 8)")
    p.add_argument("--r-step", type=int, default=None, help="action step (default 4; quick 2)")
    p.add_argument("--k-min", type=int, default=None, help="default 2 (quick 1)")
    p.add_argument("--k-max", type=int, default=None, help="default 30 (quick 7)")
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.2)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=None, help="segments per step (default 128; quick 8)")
    p.add_argument("--steps", type=int, default=None, help="default 1500 (quick 5)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--plain", action="store_true",
                   help="original training: batch-mean baseline, raw advantage, no entropy, linear features")
    p.add_argument("--samples", type=int, default=4,
                   help="actions sampled per segment; > 1 uses the leave-one-out (RLOO) baseline, 1 a learned V(s)")
    p.add_argument("--shaping", default="rank", choices=("rank", "none"),
                   help="with --samples > 1: advantage from the within-segment reward ranks or the raw reward")
    p.add_argument("--entropy", type=float, default=0.02, help="initial entropy bonus (annealed to 0)")
    p.add_argument("--entropy-frac", type=float, default=0.5, help="fraction of steps to anneal the bonus over")
    p.add_argument("--eval", type=int, default=None, help="held-out segments (default 2048; quick 16)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats (default 20; quick 2)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    q = a.quick
    for name, full, quick in (("seg_len", 32, 8), ("dim", 32, 8), ("r_step", 4, 2), ("k_min", 2, 1), ("k_max", 30, 7),
                              ("batch", 128, 8), ("steps", 1500, 5), ("eval", 2048, 16), ("repeats", 20, 2)):
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    if a.out is None:
        a.out = tempfile.mkdtemp(prefix="drrl_rank_") if q else "results/drrl_rank"
    if not 1 <= a.k_min <= a.k_max <= min(a.seg_len, a.dim):
        p.error("need 1 <= k-min <= k-max <= min(seg-len, dim)")
    return a


def make_segments(rng, n, T, d, k_min, k_max, noise):
    ks = rng.integers(k_min, k_max + 1, size=n)
    X = np.empty((n, T, d), np.float32)
    for i, k in enumerate(ks):
        X[i] = rng.normal(size=(T, k)) @ rng.normal(size=(k, d)) / np.sqrt(k)
    X += noise * rng.normal(size=X.shape).astype(np.float32)
    return X, ks


def effective_ranks(s):
    """Entropy effective rank and 90% / 99% energy ranks of singular values ``s`` [..., n]."""
    s = np.maximum(np.asarray(s, np.float64), 0)
    p = s / np.maximum(s.sum(-1, keepdims=True), 1e-300)
    ent = np.exp(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1))
    e = np.cumsum(s ** 2, -1) / np.maximum((s ** 2).sum(-1, keepdims=True), 1e-300)
    return ent, 1 + np.sum(e < 0.90, -1), 1 + np.sum(e < 0.99, -1)


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    out = R.start(__file__, argv, args)
    T, d = args.seg_len, args.dim
    actions = jnp.array(rank_actions(args.r_step, min(T, d), args.r_step))
    A = int(actions.shape[0])
    key = jax.random.key(args.seed)
    kw, kp = jax.random.split(key)
    W = jax.random.normal(kw, (3, d, d)) / np.sqrt(d)
    flops_scale = 2.0 * T * int(actions[-1]) * d

    def qkv(X):
        return X @ W[0], X @ W[1], X @ W[2]

    def reward(X, a_idx):
        q, k, v = qkv(X)
        r = actions[a_idx]
        o = attention(q, k, v, causal=True)
        o_r, sq, sk = lowrank_attention(q, k, v, r, causal=True)
        pert = perturbation_bound(sq, sk, r, d)
        return drrl_reward(o, o_r, r, pert, d_h=d, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                           flops_scale=flops_scale), o, o_r

    fixed = not args.plain

    def feats(X):
        return segment_features(X, jnp.zeros(X.shape[:1], jnp.int32), A, log=fixed)

    opt = optax.adam(args.lr)
    F = min(T, d) + A
    params = policy_init(kp, F, A, 32)
    vparams = {"w": jnp.zeros((F,)), "c": jnp.zeros(())}
    state = opt.init((params, vparams))
    n_anneal = max(1, int(args.entropy_frac * args.steps))

    def value(vp, f):
        return f @ vp["w"] + vp["c"]

    @jax.jit
    def step(params, vparams, state, X, key, ent_coef):
        m = args.samples if fixed else 1
        X = jnp.repeat(X, m, axis=0)                      # m actions per segment (consecutive rows)
        f = feats(X)
        a = jax.random.categorical(key, policy_logits(params, f))
        R_, _, _ = reward(X, a)
        if fixed and m > 1:
            Rm = R_.reshape(-1, m)
            if args.shaping == "rank":     # centered within-segment ranks of the rewards (ties averaged)
                gt = (Rm[:, :, None] > Rm[:, None, :]).sum(-1)
                eq = (Rm[:, :, None] == Rm[:, None, :]).sum(-1) - 1
                Rm = (gt + 0.5 * eq) / (m - 1) - 0.5
            Rs = Rm.reshape(-1)
            loo = ((Rm.sum(1, keepdims=True) - Rm) / (m - 1)).reshape(-1)   # leave-one-out baseline

            def total(pv):
                return reinforce_loss(pv[0], f, a, Rs, loo, normalize=True, entropy=ent_coef)
        elif fixed:
            def total(pv):
                p, vp = pv
                v = value(vp, f)
                return (reinforce_loss(p, f, a, R_, v, normalize=True, entropy=ent_coef)
                        + jnp.mean((v - R_) ** 2))
        else:
            def total(pv):
                return reinforce_loss(pv[0], f, a, R_)
        g = jax.grad(total)((params, vparams))
        upd, state = opt.update(g, state, (params, vparams))
        params, vparams = optax.apply_updates((params, vparams), upd)
        return params, vparams, state, jnp.mean(R_), jnp.mean(actions[a].astype(jnp.float32))

    rng = np.random.default_rng(args.seed)
    curve = []
    keys = jax.random.split(jax.random.key(args.seed + 1), args.steps)
    for i in tqdm(range(args.steps), desc="REINFORCE", leave=False, disable=not progress, file=sys.stdout):
        X, _ = make_segments(rng, args.batch, T, d, args.k_min, args.k_max, args.noise)
        ent_coef = jnp.float32(args.entropy * max(0.0, 1.0 - i / n_anneal) if fixed else 0.0)
        params, vparams, state, mr, mrank = step(params, vparams, state, jnp.asarray(X), keys[i], ent_coef)
        if i % max(1, args.steps // 100) == 0 or i == args.steps - 1:
            curve.append((i, float(mr), float(mrank)))

    # held-out evaluation
    Xe, ks = make_segments(np.random.default_rng(args.seed + 7), args.eval, T, d, args.k_min, args.k_max, args.noise)
    Xe = jnp.asarray(Xe)
    greedy = jax.jit(lambda p, X: jnp.argmax(policy_logits(p, feats(X)), -1))
    a_pol = np.asarray(greedy(params, Xe))
    all_r = jax.jit(jax.vmap(lambda ai, X: reward(X, jnp.full(X.shape[:1], ai))[0], in_axes=(0, None)))(
        jnp.arange(A), Xe)                                                  # [A, N]
    all_r = np.asarray(all_r)
    a_orc = all_r.argmax(0)
    # diagnosis: how much of the reward's spread is the segment (what a batch-mean baseline leaves in the
    # advantage) vs the action (the signal REINFORCE must find)
    out["diagnosis"] = {"std_across_segments_of_mean_reward": float(all_r.mean(0).std()),
                        "mean_std_across_actions": float(all_r.std(0).mean()),
                        "mean_gap_oracle_vs_rank_r_max": float((all_r.max(0) - all_r[-1]).mean()),
                        "mean_gap_oracle_vs_second_best": float(np.mean(np.sort(all_r, 0)[-1] - np.sort(all_r, 0)[-2]))}
    out["training"] = ("plain: batch-mean baseline, raw advantage, no entropy, linear features" if args.plain else
                       f"fixed: {args.samples} actions per segment with the leave-one-out baseline"
                       + (" on within-segment reward ranks" if args.shaping == "rank" else "")
                       if args.samples > 1 else "fixed: learned V(s) baseline")
    out["training"] += ("" if args.plain else f", normalized advantage, entropy {args.entropy} annealed to 0 "
                        f"over {n_anneal} steps, log-spectrum features")
    q, k, _ = jax.jit(qkv)(Xe)
    sq = np.asarray(jnp.linalg.svd(q, compute_uv=False))
    sk = np.asarray(jnp.linalg.svd(k, compute_uv=False))
    ent_q, e90_q, e99_q = effective_ranks(sq)
    ent_k, e90_k, e99_k = effective_ranks(sk)
    acts = np.asarray(actions)
    r_pol, r_orc = acts[a_pol], acts[a_orc]
    fid = jax.jit(lambda X, ai: (lambda R_, o, o_r: jnp.sum(o * o_r, (-2, -1)) /
                                 (jnp.linalg.norm(o, axis=(-2, -1)) * jnp.linalg.norm(o_r, axis=(-2, -1))))(
        *reward(X, ai)))
    cos_pol = np.asarray(fid(Xe, jnp.asarray(a_pol)))
    a_fix = int(np.argmin(np.abs(acts - r_pol.mean())))
    cos_fix = np.asarray(fid(Xe, jnp.full((Xe.shape[0],), a_fix)))
    rows = []
    edges = np.unique(np.linspace(args.k_min, args.k_max + 1, 8).astype(int))
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (ks >= lo) & (ks < hi)
        if not m.any():
            continue
        rows.append({"planted": f"{lo}-{hi - 1}", "n": int(m.sum()), "policy_rank": float(r_pol[m].mean()),
                     "oracle_rank": float(r_orc[m].mean()), "planted_mean": float(ks[m].mean()),
                     "eff_entropy_q": float(ent_q[m].mean()), "eff_entropy_k": float(ent_k[m].mean()),
                     "energy90_q": float(e90_q[m].mean()), "energy99_q": float(e99_q[m].mean()),
                     "energy99_k": float(e99_k[m].mean())})
    corr = {name: float(np.corrcoef(r_pol, x)[0, 1]) if np.std(r_pol) > 0 else float("nan")
            for name, x in (("planted", ks), ("entropy_q", ent_q), ("energy99_q", e99_q), ("oracle", r_orc))}
    out["buckets"] = rows
    out["correlation_policy_rank_with"] = corr
    out["policy_vs_fixed"] = {"policy_mean_rank": float(r_pol.mean()), "policy_mean_cos": float(cos_pol.mean()),
                              "policy_mean_reward": float(all_r[a_pol, np.arange(len(a_pol))].mean()),
                              "oracle_mean_reward": float(all_r.max(0).mean()),
                              "fixed_rank": int(acts[a_fix]), "fixed_mean_cos": float(cos_fix.mean()),
                              "fixed_mean_reward": float(all_r[a_fix].mean()),
                              "policy_flops_ratio": float(r_pol.mean() / acts[-1]),
                              "fixed_flops_ratio": float(acts[a_fix] / acts[-1]),
                              "agreement_with_oracle": float(np.mean(a_pol == a_orc))}
    out["curve"] = curve
    out["actions"] = acts.tolist()

    # timing: low-rank path and policy vs the plain full attention on the same segments (the limit)
    Xt = Xe[: min(256, Xe.shape[0])]
    qt, kt, vt = jax.jit(qkv)(Xt)
    fns = {"full_attention (limit)": jax.jit(lambda q, k, v: attention(q, k, v, causal=True)),
           "lowrank_attention (SVD + attn)": jax.jit(lambda q, k, v: lowrank_attention(
               q, k, v, jnp.full(q.shape[:1], int(acts[a_fix])), causal=True)[0]),
           "policy decision": jax.jit(lambda q, k, v: greedy(params, Xt))}
    timing = {}
    for name, f in fns.items():
        jax.block_until_ready(f(qt, kt, vt))
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f(qt, kt, vt))
            ts.append(time.perf_counter() - t0)
        timing[name] = 1e3 * float(np.median(ts))
    lim = timing["full_attention (limit)"]
    out["timing_ms"] = {n: {"median_ms": t, "ratio_to_limit": t / lim} for n, t in timing.items()}
    out["timing_segments"] = int(Xt.shape[0])
    return R.finish(out, args, "drrl_rank", tables, plot)


def tables(out):
    c = out["config"]
    pv = out["policy_vs_fixed"]
    dg = out["diagnosis"]
    lines0 = [f"Training: {out['training']}.", "",
              f"Diagnosis: reward spread across segments (std of per-segment mean reward) "
              f"{dg['std_across_segments_of_mean_reward']:.4f}; across the actions of one segment (mean std) "
              f"{dg['mean_std_across_actions']:.4f}; oracle minus rank r_max {dg['mean_gap_oracle_vs_rank_r_max']:.4f}; "
              f"oracle minus second-best action {dg['mean_gap_oracle_vs_second_best']:.4f}.", ""]
    lines = lines0 + [f"DR-RL chosen rank vs effective rank (T = {c['seg_len']}, d_h = {c['dim']}, actions {out['actions']}, "
             f"{c['steps']} REINFORCE steps x {c['batch']} segments)" + (" [QUICK smoke run]" if c["quick"] else ""), "",
             "| planted rank | n | policy rank | oracle rank | entropy eff. rank Q / K | energy 90% / 99% rank Q | "
             "energy 99% rank K |", "|---|---|---|---|---|---|---|"]
    for r in out["buckets"]:
        lines.append(f"| {r['planted']} (mean {r['planted_mean']:.1f}) | {r['n']} | {r['policy_rank']:.1f} | "
                     f"{r['oracle_rank']:.1f} | {r['eff_entropy_q']:.1f} / {r['eff_entropy_k']:.1f} | "
                     f"{r['energy90_q']:.1f} / {r['energy99_q']:.1f} | {r['energy99_k']:.1f} |")
    cr = out["correlation_policy_rank_with"]
    lines += ["", "Correlation of the policy's rank with: " + ", ".join(f"{k} {v:.3f}" for k, v in cr.items()), "",
              "| ranks | mean rank | FLOPs proxy vs r_max | mean cos(O, O_r) | mean reward |", "|---|---|---|---|---|",
              f"| DR-RL policy (greedy) | {pv['policy_mean_rank']:.1f} | {pv['policy_flops_ratio']:.3f} | "
              f"{pv['policy_mean_cos']:.4f} | {pv['policy_mean_reward']:.4f} |",
              f"| fixed rank (nearest equal FLOPs) | {pv['fixed_rank']} | {pv['fixed_flops_ratio']:.3f} | "
              f"{pv['fixed_mean_cos']:.4f} | {pv['fixed_mean_reward']:.4f} |",
              f"| oracle (best action per segment) | | | | {pv['oracle_mean_reward']:.4f} |", "",
              f"Policy agrees with the oracle action on {100 * pv['agreement_with_oracle']:.1f}% of held-out segments.",
              "", f"| step ({out['timing_segments']} segments) | median ms | ratio to full attention (limit) |",
              "|---|---|---|"]
    for n, t in out["timing_ms"].items():
        lines.append(f"| {n} | {t['median_ms']:.3f} | {t['ratio_to_limit']:.2f}x |")
    return "\n".join(lines)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    b = out["buckets"]
    x = [r["planted_mean"] for r in b]
    for key, lab in (("policy_rank", "DR-RL policy"), ("oracle_rank", "oracle"), ("eff_entropy_q", "entropy eff. rank Q"),
                     ("energy99_q", "99% energy rank Q")):
        ax[0].plot(x, [r[key] for r in b], "o-", label=lab)
    ax[0].plot(x, x, "k:", label="planted")
    ax[0].set_xlabel("planted rank"); ax[0].set_ylabel("rank"); ax[0].legend(fontsize=7)
    cv = np.array(out["curve"])
    ax[1].plot(cv[:, 0], cv[:, 1]); ax[1].set_xlabel("step"); ax[1].set_ylabel("mean reward")
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


if __name__ == "__main__":
    main()
