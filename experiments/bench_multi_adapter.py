"""Many adapters in one batch (``lrjax.reparam.bank.AdapterBank``) and Hot-Swap MarkBoard.

    python experiments/bench_multi_adapter.py                       # several minutes on 2 CPU cores
    python experiments/bench_multi_adapter.py --quick               # smoke test

1. **Mixed-adapter batch** (timing). MLP of ``--layers`` x Dense(W -> W), GELU, batch B, plain-dict
   params, MSE; ``--adapters`` LoRA adapters of ranks ``linspace(4, 32)`` (alpha = 2 r) on every
   kernel; each example carries an adapter id (balanced, shuffled). Two steps, jitted, warmed up,
   medians of round-robin repeats (:func:`lrjax.benchmark.time_round_robin`):
   *train* = forward + backward to the adapter factors + an Adam update; *infer* = the forward.

   * ``bank`` -- all adapters in one :class:`AdapterBank` (packed ranks, sorted tiles, gathered
     factors) through :func:`lrjax.factored`;
   * ``one_adapter`` -- one LoRA of rank 32 (the bank's window) on the same batch (issue target:
     ``bank <= 1.3 x one_adapter``);
   * ``loop`` -- a loop over the adapters, each run on the whole batch, keeping its own examples'
     rows (issue target: ``bank`` at least 5x faster);
   * ``loop_split`` -- a loop over the adapters, each on its own sub-batch (the batch regrouped on
     the host: the cheapest loop);
   * ``masked_packed`` -- the rejected alternative: every row computes *all* adapters' packed
     columns ``(x A_all) * mask_row B_all`` (what :func:`lrjax.nn.mixture.mixture_delta` does for a
     mixture), for the "why";
   * ``base`` -- the limit: the plain forward (train: forward + backward through the frozen
     kernels, gradient to the biases only).

   PEFT side by side (torch CPU, the same shapes and weights, ``model.eval()``, ``no_grad``):
   ``peft_mixed`` = ``model(x, adapter_names=[...])`` (PEFT's mixed-adapter batch; inference only,
   PEFT refuses it in training mode), ``peft_one`` = the rank-32 adapter alone, ``torch_base``.
   The PEFT mixed output is compared with the bank's (the same function).
2. **Hot-Swap MarkBoard** (:mod:`lrjax.reparam.markboard`) on the digits MLP fixture
   (``experiments/_digits_bench.py``): ``--bits`` bits (16 branches of LoRA rank 4 on fc1, fc2,
   out), trigger sets of 16 noisy key patterns per bit, trained ``--mb-steps`` steps with 4 random
   signatures per step; then ``--signatures`` random signatures are signed by swapping branches
   only and verified black-box (bit accuracy, signatures fully recovered), the clean test accuracy
   of each signed model against the base, the time to sign (all branches) and to re-sign (one
   bit: two branch swaps), and the unwatermarked base decoded as a control.

Writes ``<out>/bench_multi_adapter.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _digits_bench as D  # noqa: E402
import _report as R  # noqa: E402

import lrjax  # noqa: E402
from lrjax.benchmark import blocking, summarize, time_round_robin, usable_cpus  # noqa: E402
from lrjax.reparam.bank import AdapterBank  # noqa: E402
from lrjax.reparam.markboard import MarkBoard  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test)")
    p.add_argument("--out", default="runs/bench_multi_adapter", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method, default 10 (quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="default 2 (quick: 1)")
    p.add_argument("--width", type=int, default=None, help="default 1024 (quick: 64)")
    p.add_argument("--layers", type=int, default=None, help="default 4 (quick: 2)")
    p.add_argument("--batch", type=int, default=None, help="default 512 (quick: 64)")
    p.add_argument("--adapters", type=int, default=None, help="default 16 (quick: 4)")
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--bits", type=int, default=None, help="MarkBoard bits, default 8 (quick: 2)")
    p.add_argument("--mb-steps", type=int, default=None, help="MarkBoard training steps, default 300 (quick: 20)")
    p.add_argument("--signatures", type=int, default=None, help="random signatures verified, default 20 (quick: 3)")
    p.add_argument("--no-torch", action="store_true", help="skip PEFT")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(repeats=(2, 10), width=(64, 1024), layers=(2, 4), batch=(64, 512), bits=(2, 8), mb_steps=(20, 300),
                signatures=(3, 20), adapters=(4, 16), warmup=(1, 2))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    return a


# ------------------------------------------------------------------------ 1. mixed batch
def workload(args):
    w, L, B, K = args.width, args.layers, args.batch, args.adapters
    keys = jax.random.split(jax.random.key(args.seed), L + 2)
    params = {f"d{i}": {"kernel": jax.random.normal(keys[i], (w, w)) / np.sqrt(w), "bias": jnp.zeros((w,))}
              for i in range(L)}

    def apply(p, x):
        for i in range(L):
            x = x @ p[f"d{i}"]["kernel"] + p[f"d{i}"]["bias"]
            if i < L - 1:
                x = jax.nn.gelu(x)
        return x

    x = jax.random.normal(keys[L], (B, w))
    y = jax.random.normal(keys[L + 1], (B, w))
    ranks = [int(r) for r in np.linspace(4, 32, K).round()]
    adapters = []
    for j, r in enumerate(ranks):
        rp = lrjax.LoRA(rank=r, alpha=2.0 * r)
        _, ad = rp.init(jax.random.key(100 + j), params)
        ad = {p: {"a": f["a"], "b": 0.02 * jax.random.normal(jax.random.key(200 + j), f["b"].shape)}
              for p, f in ad.items()}  # non-zero B so outputs differ per adapter
        adapters.append((rp, ad))
    ids = np.random.default_rng(args.seed).permutation(np.arange(B) % K).astype(np.int32)
    return params, apply, x, y, ranks, adapters, ids


def mse(o, y):
    return jnp.mean((o - y) ** 2)


def build(args):
    params, apply, x, y, ranks, adapters, ids = workload(args)
    K, B = args.adapters, args.batch
    bank = AdapterBank(slots=K, rank=max(ranks), capacity=sum(ranks), tile=args.tile)
    base, bk = bank.init(jax.random.key(1), params)
    for j, (rp, ad) in enumerate(adapters):
        bk = bank.load(bk, j, ad, rp)
    routed = bank.route(bk, jnp.asarray(ids))
    btr, bfr = bank.split(routed)
    gb = lrjax.factored(apply, bank)
    opt = optax.adam(1e-3)
    sel = [np.nonzero(ids == k)[0] for k in range(K)]
    infer, train = {}, {}

    # bank
    def bank_fwd(t, fr, x):
        return gb(base, bank.join(t, fr), x)

    def bank_step(t, s, fr, x, y):
        lv, g = jax.value_and_grad(lambda t: mse(bank_fwd(t, fr, x), y))(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, lv

    infer["bank"] = (bank_fwd, (btr, bfr, x))
    train["bank"] = (bank_step, (btr, opt.init(btr), bfr, x, y))

    # one adapter of the window rank
    rp1 = lrjax.LoRA(rank=max(ranks), alpha=2.0 * max(ranks))
    _, ad1 = rp1.init(jax.random.key(7), params)
    g1 = lrjax.factored(apply, rp1)

    def one_step(a, s, x, y):
        lv, g = jax.value_and_grad(lambda a: mse(g1(params, a, x), y))(a)
        u, s = opt.update(g, s, a)
        return optax.apply_updates(a, u), s, lv

    infer["one_adapter"] = (lambda a, x: g1(params, a, x), (ad1, x))
    train["one_adapter"] = (one_step, (ad1, opt.init(ad1), x, y))

    # loops over the adapters
    gs = [lrjax.factored(apply, rp) for rp, _ in adapters]
    ads = [ad for _, ad in adapters]
    sel_j = [jnp.asarray(s) for s in sel]

    def loop_fwd(ads, x):
        out = jnp.zeros((B, args.width), x.dtype)
        for k in range(K):
            out = out.at[sel_j[k]].set(gs[k](params, ads[k], x)[sel_j[k]])
        return out

    def loop_loss(ads, x, y):
        return sum(mse(gs[k](params, ads[k], x)[sel_j[k]], y[sel_j[k]]) * len(sel[k]) for k in range(K)) / B

    def split_fwd(ads, xs):
        return [gs[k](params, ads[k], xs[k]) for k in range(K)]

    def split_loss(ads, xs, ys):
        return sum(mse(gs[k](params, ads[k], xs[k]), ys[k]) * len(sel[k]) for k in range(K)) / B

    def mk_step(loss):
        def step(a, s, *data):
            lv, g = jax.value_and_grad(loss)(a, *data)
            u, s = opt.update(g, s, a)
            return optax.apply_updates(a, u), s, lv
        return step

    xs = [x[s] for s in sel]
    ys = [y[s] for s in sel]
    infer["loop"] = (loop_fwd, (ads, x))
    train["loop"] = (mk_step(loop_loss), (ads, opt.init(ads), x, y))
    infer["loop_split"] = (split_fwd, (ads, xs))
    train["loop_split"] = (mk_step(split_loss), (ads, opt.init(ads), xs, ys))

    # masked packed: every row computes all adapters' columns, masked to its own
    colslot = np.full(sum(ranks), -1)
    colscale = np.zeros(sum(ranks), np.float32)
    f0 = next(iter(bk.values()))
    for k in range(K):
        o, r = int(f0["offsets"][k]), int(f0["ranks"][k])
        colslot[o:o + r] = k
        colscale[o:o + r] = float(f0["scales"][k])
    mask = jnp.asarray((colslot[None, :] == ids[:, None]) * colscale[None, :], jnp.float32)  # [B, C]
    packed = {p: {"a": f["a"], "b": f["b"]} for p, f in bk.items()}

    def packed_fwd(pk, x):
        for i in range(args.layers):
            f = pk[f"d{i}/kernel"]
            x = x @ params[f"d{i}"]["kernel"] + ((x @ f["a"]) * mask) @ f["b"] + params[f"d{i}"]["bias"]
            if i < args.layers - 1:
                x = jax.nn.gelu(x)
        return x

    infer["masked_packed"] = (packed_fwd, (packed, x))
    train["masked_packed"] = (mk_step(lambda pk, x, y: mse(packed_fwd(pk, x), y)), (packed, opt.init(packed), x, y))

    # the limit
    sub = {f"d{i}": {"bias": params[f"d{i}"]["bias"]} for i in range(args.layers)}

    def lim_step(sub, x, y):
        return jax.grad(lambda s: mse(apply({k: {**params[k], **s[k]} for k in params}, x), y))(sub)

    infer["base"] = (lambda x: apply(params, x), (x,))
    train["base"] = (lim_step, (sub, x, y))
    ref = jax.jit(loop_fwd)(ads, x)
    check = {"bank_vs_loop_max_abs": float(jnp.max(jnp.abs(jax.jit(bank_fwd)(btr, bfr, x) - ref))),
             "packed_vs_loop_max_abs": float(jnp.max(jnp.abs(jax.jit(packed_fwd)(packed, x) - ref)))}
    return infer, train, dict(params=params, x=x, ids=ids, ranks=ranks, adapters=adapters,
                              bank_out=np.asarray(jax.jit(bank_fwd)(btr, bfr, x)), check=check,
                              bank_cfg=dict(slots=K, rank=max(ranks), capacity=sum(ranks), tile=args.tile),
                              cache_size=None, bank=bank, bk=bk, gb=gb, base=base)


def cache_check(ctx):
    """Swap adapters between slots several times; the jitted forward keeps one compile-cache entry."""
    bank, bk, gb, base, x, ids = ctx["bank"], ctx["bk"], ctx["gb"], ctx["base"], ctx["x"], ctx["ids"]
    f = jax.jit(lambda b, i: gb(base, bank.route(b, i), x))
    jax.block_until_ready(f(bk, jnp.asarray(ids)))
    t_swap = []
    ad = ctx["adapters"]
    k = len(ad)
    for j in range(3):  # exchange the adapters of slots j and k-1-j (ranks differ: columns move)
        t0 = time.perf_counter()
        bk = bank.unload(bank.unload(bk, j), k - 1 - j)
        bk = bank.load(bank.load(bk, j, ad[k - 1 - j][1], ad[k - 1 - j][0]), k - 1 - j, ad[j][1], ad[j][0])
        jax.block_until_ready(bk)
        t_swap.append((time.perf_counter() - t0) * 1e3)
        jax.block_until_ready(f(bk, jnp.asarray(np.roll(ids, j + 1))))
    return {"compile_cache_entries_after_3_swaps": f._cache_size(), "swap_ms_median": float(np.median(t_swap)),
            "swap": "exchange the adapters of two slots (2 unloads + 2 loads, eager)"}


def peft_side(args, ctx, progress):
    try:
        import peft
        import torch
    except Exception as e:  # pragma: no cover - reference extra missing
        return {"available": False, "note": repr(e)}
    torch.set_num_threads(usable_cpus())
    L, w = args.layers, args.width
    params = ctx["params"]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(w, w) for _ in range(L)])
            with torch.no_grad():
                for i, m in enumerate(self.layers):
                    m.weight.copy_(torch.from_numpy(np.asarray(params[f"d{i}"]["kernel"]).T.copy()))
                    m.bias.copy_(torch.from_numpy(np.asarray(params[f"d{i}"]["bias"])))

        def forward(self, x):
            for i, m in enumerate(self.layers):
                x = m(x)
                if i < L - 1:
                    x = torch.nn.functional.gelu(x, approximate="tanh")  # jax.nn.gelu's default
            return x

    targets = [f"layers.{i}" for i in range(L)]
    model = None
    for j, (rp, ad) in enumerate(ctx["adapters"]):
        cfg = peft.LoraConfig(r=rp.rank, lora_alpha=float(rp.alpha), target_modules=targets)
        if model is None:
            model = peft.get_peft_model(Net(), cfg, adapter_name=f"a{j}")
        else:
            model.add_adapter(f"a{j}", cfg)
        with torch.no_grad():
            for i in range(L):
                lyr = model.base_model.model.layers[i]
                f = ad[f"d{i}/kernel"]
                lyr.lora_A[f"a{j}"].weight.copy_(torch.from_numpy(np.asarray(f["a"]).T.copy()))
                lyr.lora_B[f"a{j}"].weight.copy_(torch.from_numpy(np.asarray(f["b"]).T.copy()))
    model.eval()
    xt = torch.from_numpy(np.asarray(ctx["x"]))
    names = [f"a{int(k)}" for k in ctx["ids"]]
    last = f"a{len(ctx['adapters']) - 1}"  # the rank-32 adapter
    with torch.no_grad():
        mixed = model(xt, adapter_names=names).numpy()
    diff = float(np.max(np.abs(mixed - ctx["bank_out"])))

    def run_mixed():
        with torch.no_grad():
            model(xt, adapter_names=names)

    def run_one():
        model.set_adapter(last)
        with torch.no_grad():
            model(xt)

    def run_base():
        with torch.no_grad(), model.disable_adapter():
            model(xt)

    times = time_round_robin({"peft_mixed": run_mixed, "peft_one": run_one, "torch_base": run_base}, args.repeats,
                             args.warmup, "peft", progress)
    return {"available": True, "peft": peft.__version__, "torch": torch.__version__,
            "num_threads": torch.get_num_threads(), "max_abs_diff_vs_bank": diff,
            "methods": {k: summarize(v) for k, v in times.items()}}


def bench_batch(args, progress):
    infer, train, ctx = build(args)
    res = {"shape": {"layers": args.layers, "width": args.width, "batch": args.batch, "adapters": args.adapters,
                     "ranks": ctx["ranks"], "bank": ctx["bank_cfg"]}, "check": ctx["check"]}
    for kind, methods in (("train", train), ("infer", infer)):
        calls = {}
        for name, (fn, fargs) in methods.items():
            calls[name] = blocking(jax.jit(fn), *fargs)
        times = time_round_robin(calls, args.repeats, args.warmup, kind, progress)
        r = {k: summarize(v) for k, v in times.items()}
        one, base, bank = r["one_adapter"]["median_ms"], r["base"]["median_ms"], r["bank"]["median_ms"]
        for k, v in r.items():
            v["x_one_adapter"] = v["median_ms"] / one
            v["x_base"] = v["median_ms"] / base
            v["x_bank"] = v["median_ms"] / bank
        r["targets"] = {"bank_over_one_adapter": bank / one, "bank_over_one_adapter_target": 1.3,
                        "bank_over_one_adapter_met": bool(bank / one <= 1.3),
                        "loop_over_bank": r["loop"]["median_ms"] / bank, "loop_over_bank_target": 5.0,
                        "loop_over_bank_met": bool(r["loop"]["median_ms"] / bank >= 5.0)}
        res[kind] = r
    res["swaps"] = cache_check(ctx)
    if not args.no_torch:
        res["peft"] = peft_side(args, ctx, progress)
    return res


# ------------------------------------------------------------------------ 2. MarkBoard
def bench_markboard(args, progress):
    params = D.pretrain(args.seed)
    (xtr, ytr), (xte, yte) = D.task("original")
    mb = MarkBoard(bits=args.bits, rp=lrjax.LoRA(rank=4))
    br = mb.init(jax.random.key(args.seed + 1), params)
    xt, lab = mb.triggers(jax.random.key(args.seed + 2), (64,), 10, 16)
    t0 = time.perf_counter()
    br, losses = mb.train(jax.random.key(args.seed + 3), D.forward, params, br, xt, lab, xtr, ytr,
                          steps=args.mb_steps)
    jax.block_until_ready(losses)
    train_s = time.perf_counter() - t0
    acc = jax.jit(D.accuracy)
    base_acc = float(acc(params, xte, yte))
    rng = np.random.default_rng(args.seed)
    sign = jax.jit(lambda s: mb.sign(params, br, s))
    rows, bit_hits = [], 0
    prev = None
    for _ in range(args.signatures):
        sig = rng.integers(0, 2, args.bits)
        p = sign(jnp.asarray(sig))
        bits = np.asarray(mb.verify(jax.jit(lambda q, p=p: D.forward(p, q)), xt, lab))
        bit_hits += int((bits == sig).sum())
        rows.append({"signature": sig.tolist(), "decoded": bits.tolist(), "ok": bool((bits == sig).all()),
                     "clean_acc": float(acc(p, xte, yte))})
        prev = (sig, p)
    # timing: sign from the base (all branches) and a one-bit re-sign (two branch swaps), jitted
    sig, p = prev
    flip = sig.copy()
    flip[0] ^= 1
    resign = jax.jit(lambda p: mb.resign(p, br, sig, flip))
    copy = jax.jit(lambda p: jax.tree.map(lambda v: v + 0, p))
    times = time_round_robin({"sign_all_branches": blocking(sign, jnp.asarray(sig)),
                              "resign_one_bit": blocking(resign, p),
                              "limit: copy of the weights": blocking(copy, p)},
                             max(args.repeats, 5), args.warmup, "markboard swaps", progress)
    ctrl = np.asarray(mb.verify(jax.jit(lambda q: D.forward(params, q)), xt, lab))
    accs = [r["clean_acc"] for r in rows]
    return {"bits": args.bits, "branches": 2 * args.bits, "branch_rank": 4, "trigger_size": 16,
            "train_steps": args.mb_steps, "train_s": train_s, "final_loss": float(losses[-1]),
            "signatures": rows, "verified": sum(r["ok"] for r in rows), "n_signatures": len(rows),
            "bit_accuracy": bit_hits / (len(rows) * args.bits), "base_clean_acc": base_acc,
            "signed_clean_acc_mean": float(np.mean(accs)), "signed_clean_acc_min": float(np.min(accs)),
            "clean_acc_drop_points": 100 * (base_acc - float(np.mean(accs))),
            "base_decoded": ctrl.tolist(), "base_bits_read_as_watermark": int((ctrl >= 0).sum()),
            "timing": {k: summarize(v) for k, v in times.items()}}


# ------------------------------------------------------------------------------ report
def tables(out):
    b = out["batch"]
    s = b["shape"]
    rows = [f"**Mixed-adapter batch**: MLP {s['layers']} x Dense({s['width']}->{s['width']}), batch {s['batch']}, "
            f"{s['adapters']} LoRA adapters of ranks {s['ranks'][0]}..{s['ranks'][-1]} (sum {sum(s['ranks'])}), "
            f"bank window {s['bank']['rank']}, capacity {s['bank']['capacity']}, tile {s['bank']['tile']} "
            f"({out['device']['platform']}, {out['device']['usable_cpus']} CPUs, "
            f"load {out['load_avg_before'][0]:.1f})\n",
            "| method | train step (ms) | x one adapter | x base | infer (ms) | x one adapter | x base |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for k in b["train"]:
        if k == "targets":
            continue
        t, i = b["train"][k], b["infer"][k]
        rows.append(f"| {k} | {t['median_ms']:.1f} | {t['x_one_adapter']:.2f} | {t['x_base']:.2f} | "
                    f"{i['median_ms']:.1f} | {i['x_one_adapter']:.2f} | {i['x_base']:.2f} |")
    p = b.get("peft", {})
    if p.get("available"):
        pm = p["methods"]
        one = pm["peft_one"]["median_ms"]
        base = pm["torch_base"]["median_ms"]
        for k in ("peft_mixed", "peft_one", "torch_base"):
            rows.append(f"| {k} (PEFT {p['peft']}, torch {p['torch']}) | n/a | | | {pm[k]['median_ms']:.1f} | "
                        f"{pm[k]['median_ms'] / one:.2f} | {pm[k]['median_ms'] / base:.2f} |")
    rows.append("")
    for kind in ("train", "infer"):
        t = b[kind]["targets"]
        rows.append(f"- {kind}: bank / one adapter = {t['bank_over_one_adapter']:.2f} (target <= 1.3: "
                    f"{'met' if t['bank_over_one_adapter_met'] else 'NOT met'}); loop / bank = "
                    f"{t['loop_over_bank']:.2f} (target >= 5: {'met' if t['loop_over_bank_met'] else 'NOT met'})")
    sw = b["swaps"]
    rows.append(f"- swaps: {sw['compile_cache_entries_after_3_swaps']} compile-cache entry after 3 load/unload swaps "
                f"(median swap {sw['swap_ms_median']:.1f} ms, eager); bank vs loop max |diff| "
                f"{b['check']['bank_vs_loop_max_abs']:.2e}" + (f", bank vs PEFT mixed {p['max_abs_diff_vs_bank']:.2e}"
                                                               if p.get("available") else ""))
    m = out["markboard"]
    rows += ["", f"**Hot-Swap MarkBoard** on the digits MLP: {m['bits']} bits ({m['branches']} LoRA branches of rank "
             f"{m['branch_rank']}), {m['trigger_size']} triggers per bit, {m['train_steps']} training steps "
             f"({m['train_s']:.0f} s)\n",
             "| quantity | value |", "|---|---:|",
             f"| signatures fully verified | {m['verified']} / {m['n_signatures']} |",
             f"| bit accuracy | {100 * m['bit_accuracy']:.1f}% |",
             f"| clean test accuracy: base | {100 * m['base_clean_acc']:.2f}% |",
             f"| clean test accuracy: signed models, mean (min) | {100 * m['signed_clean_acc_mean']:.2f}% "
             f"({100 * m['signed_clean_acc_min']:.2f}%) |",
             f"| clean accuracy drop (points) | {m['clean_acc_drop_points']:.2f} |",
             f"| unwatermarked base: bits read as a watermark label (control) | {m['base_bits_read_as_watermark']} / "
             f"{m['bits']} |"]
    for k, v in m["timing"].items():
        rows.append(f"| time: {k} (ms, jitted) | {v['median_ms']:.3f} |")
    return "\n".join(rows)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = out["batch"]
    names = [k for k in b["train"] if k != "targets"]
    fig, axs = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axs, ("train", "infer")):
        vals = [b[kind][k]["x_one_adapter"] for k in names]
        extra = []
        if kind == "infer" and b.get("peft", {}).get("available"):
            pm = b["peft"]["methods"]
            extra = [("peft_mixed / peft_one", pm["peft_mixed"]["median_ms"] / pm["peft_one"]["median_ms"])]
        ax.bar(names + [e[0] for e in extra], vals + [e[1] for e in extra],
               color=["tab:blue" if n == "bank" else "0.6" if n == "base" else "tab:orange" for n in names]
               + ["tab:green"] * len(extra))
        ax.axhline(1.3, color="k", ls="--", lw=0.8, label="target bank <= 1.3x")
        ax.set_yscale("log")
        ax.set(title=f"{kind}: time / one adapter (log)", ylabel="x one adapter")
        ax.tick_params(axis="x", rotation=40)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    out = R.start(__file__, argv, args)
    out["batch"] = bench_batch(args, progress)
    out["markboard"] = bench_markboard(args, progress)
    return R.finish(out, args, "bench_multi_adapter", tables, plot)


if __name__ == "__main__":
    main()
