"""Speed of the adapter zoo: every variant's training step against lrjax LoRA at the same rank,
and data-aware inits (LoRA-GA, LoRA-SB) in one jit against PEFT's ``preprocess_loraga``.

    python experiments/bench_adapter_speed.py            # a few minutes on 2 CPU cores
    python experiments/bench_adapter_speed.py --quick    # smoke test, seconds

1. **Training step** on the MLP of ``experiments/bench_lora.py`` (4 x Dense(1024 -> 1024), GELU,
   batch 512, MSE; plain-dict params): one jitted step = forward, backward to the trainable
   factors (``rp.split``: frozen factors and seeds get no gradient), optimizer update. Every
   weight-space variant runs through :func:`lrjax.factored` with Adam (the same path and
   optimizer as the ``lora`` row); the optimizer-side variants (LoRA-Pro efficient/full,
   LoRA-FA, Riemannian) are LoRA adapters with their own optax transformation. All at rank 8
   (alpha 16); NOLA with ``k = 1024`` bases per factor; Block-LoRA with 4 blocks. The issue's
   targets: every weight-space variant within 1.15x of ``lora`` (LoRA-Pro's full variant
   excepted: it keeps m x n moments), NOLA within 1.5x. The **limit** row is the unavoidable
   work of the same step: forward and backward through the frozen kernels (gradient to the
   biases only), no adapter, no optimizer.
2. **Data-aware init** of the quickstart transformer (``CharTransformer``: d_model 128, 2
   layers, 4 heads, d_ff 512, vocab 96; adapters on q, k, v, o, fc1, fc2 at rank 8):
   ``estimate_grads(..., stacked=True)`` over ``--init-batches`` batches plus ``rp.init`` in a
   single ``jax.jit`` (first call = compile + run; then warm calls), against PEFT's
   ``preprocess_loraga`` (the same number of forward/backward passes on a torch port of the same
   model with the same weights, then its SVDs) followed by ``get_peft_model``. ``lora_ga`` uses
   lrjax's default exact SVD; ``lora_ga_rsvd`` the randomized one PEFT and the official code use
   (``n_iter=4``, sketch ``min(4r, m, n)``), the like-for-like row.

Timings are medians of ``block_until_ready`` calls after warm-up, methods interleaved round
robin (:func:`lrjax.benchmark.time_round_robin`) so that load from other processes hits all
alike. Writes ``<out>/bench_adapter_speed.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

import jax
import optax
from flax import nnx
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lora import compile_fn, count, mlp_workload  # noqa: E402

import lrjax  # noqa: E402
from lrjax import reparam as R  # noqa: E402
from lrjax.benchmark import blocking, device_info, summarize, time_round_robin, usable_cpus  # noqa: E402
from lrjax.models import ADAPTER_TARGETS, CharTransformer, apply_fn, loss_fn  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test)")
    p.add_argument("--out", default="runs/bench_adapter_speed", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=None, help="timed steps per method, default 15 (quick: 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--nola-k", type=int, default=None, help="NOLA bases per factor, default 1024 (quick: 32)")
    p.add_argument("--mlp-width", type=int, default=None, help="default 1024 (quick: 64)")
    p.add_argument("--mlp-layers", type=int, default=4)
    p.add_argument("--mlp-batch", type=int, default=None, help="default 512 (quick: 32)")
    p.add_argument("--init-batches", type=int, default=None, help="gradient batches, default 8 (quick: 2)")
    p.add_argument("--init-batch", type=int, default=None, help="sequences per batch, default 8 (quick: 2)")
    p.add_argument("--init-repeats", type=int, default=None, help="warm init calls, default 3 (quick: 1)")
    p.add_argument("--tf-seq", type=int, default=None, help="default 128 (quick: 16)")
    p.add_argument("--tf-d-model", type=int, default=None, help="default 128 (quick: 32)")
    p.add_argument("--no-torch", action="store_true", help="skip PEFT's preprocess_loraga")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dflt = dict(repeats=(2, 15), nola_k=(32, 1024), mlp_width=(64, 1024), mlp_batch=(32, 512),
                init_batches=(2, 8), init_batch=(2, 8), init_repeats=(1, 3), tf_seq=(16, 128), tf_d_model=(32, 128))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    if a.quick:
        a.warmup = 1
    return a


# ------------------------------------------------------------------------ 1. training steps
def variants(args):
    """name -> (config, optimizer or None for Adam, kind)."""
    r, al = args.rank, args.alpha
    out = {
        "lora": (R.LoRA(rank=r, alpha=al), None, "weight"),
        "rslora": (R.RSLoRA(rank=r, alpha=al), None, "weight"),
        "dora": (R.DoRA(rank=r, alpha=al), None, "weight"),
        "pissa": (R.PiSSA(rank=r, alpha=al), None, "weight"),
        "lora_ga": (R.LoRAGA(rank=r, alpha=al), None, "weight"),
        "lora_sb": (R.LoRASB(rank=r), None, "weight"),
        "lora_xs": (R.LoRAXS(rank=r), None, "weight"),
        "nola": (R.NOLA(rank=r, alpha=al, num_basis=args.nola_k), None, "weight"),
        "block_lora": (R.BlockLoRA(rank=r, alpha=al, blocks=4), None, "weight"),
        "codyra": (R.CoDyRA(rank=r), None, "weight"),
    }
    lora = R.LoRA(rank=r, alpha=al)
    out["lora_pro"] = (lora, lrjax.optim.lora_pro(1e-3, lora, variant="efficient"), "optimizer")
    out["lora_pro_full"] = (lora, lrjax.optim.lora_pro(1e-3, lora, variant="full"), "optimizer (m x n moments)")
    out["lora_fa"] = (lora, lrjax.optim.lora_fa(1e-3, lora), "optimizer")
    out["riemannian"] = (lora, lrjax.optim.riemannian_lora(1e-3, lora), "optimizer")
    return out


def build_steps(wl, args):
    apply, params, x, y, loss = wl["apply"], wl["params"], wl["x"], wl["y"], wl["loss"]
    key = jax.random.key(args.seed + 7)
    grads = R.estimate_grads(lambda p, b: loss(apply(p, b[0]), b[1]), params, [(x, y)], "kernel")
    methods = {}
    for name, (rp, opt, kind) in variants(args).items():
        opt = opt or optax.adam(1e-3)
        kw = {"grads": grads} if rp.needs_grads else {}
        base, ad = rp.init(key, params, **kw)
        tr, fr = rp.split(ad)
        g = lrjax.factored(apply, rp)

        def step(tr, s, fr, base, x, y, g=g, rp=rp, opt=opt):
            lval, gr = jax.value_and_grad(lambda t: loss(g(base, rp.join(t, fr), x), y))(tr)
            u, s = opt.update(gr, s, tr)
            return optax.apply_updates(tr, u), s, lval

        methods[name] = (step, (tr, opt.init(tr), fr, base, x, y), rp.num_params(ad), kind)

    flat = lrjax.tree.flatten(params)
    sub = {p: v for p, v in flat.items() if not p.endswith("kernel")}

    def limit_step(sub, params, x, y):
        return jax.grad(lambda s: loss(apply(lrjax.tree.replace(params, s), x), y))(sub)

    methods["limit"] = (limit_step, (sub, params, x, y), count(sub), "limit")
    return methods


def bench_steps(args, progress):
    wl = mlp_workload(argparse.Namespace(mlp_width=args.mlp_width, mlp_layers=args.mlp_layers,
                                         mlp_batch=args.mlp_batch, seed=args.seed))
    methods = build_steps(wl, args)
    res, calls = {}, {}
    for name, (fn, fargs, n, kind) in tqdm(methods.items(), desc="compile", leave=False, disable=not progress,
                                            file=sys.stdout):
        compiled, info = compile_fn(fn, *fargs)
        calls[name] = blocking(compiled, *fargs)
        calls[name]()
        res[name] = {"trainable_params": n, "kind": kind, **info}
    times = time_round_robin(calls, args.repeats, args.warmup, "train steps", progress)
    for k, ms in times.items():
        res[k].update(summarize(ms))
    lora, lim = res["lora"]["median_ms"], res["limit"]["median_ms"]
    for k, r in res.items():
        r["ratio_to_lora"] = r["median_ms"] / lora
        r["ratio_to_limit"] = r["median_ms"] / lim
        target = None if k in ("lora", "limit", "lora_pro_full") else (1.5 if k == "nola" else 1.15)
        r["target_ratio_to_lora"] = target
        r["meets_target"] = None if target is None else bool(r["ratio_to_lora"] <= target)
    return {"shape": wl["shape"], "rank": args.rank, "nola_k": args.nola_k, "methods": res}


# ----------------------------------------------------------------------- 2. data-aware init
def transformer(args):
    seq, d = args.tf_seq, args.tf_d_model
    model = CharTransformer(96, d_model=d, n_layers=2, n_heads=4, d_ff=4 * d, max_len=seq, rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)
    ids = jax.random.randint(jax.random.key(args.seed + 1), (args.init_batches, args.init_batch, seq + 1), 0, 96)
    return graphdef, state, ids


def torch_port(state, args):
    """The same CharTransformer in torch (weights copied; Flax kernels [in, out] = torch W^T)."""
    import torch

    flat = {k: np.asarray(v, np.float32) for k, v in lrjax.tree.flatten(state).items()}
    d, nh = args.tf_d_model, 4

    def lin(w_in_out, bias=None):
        m = torch.nn.Linear(*w_in_out.shape, bias=bias is not None)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(w_in_out.T.copy()))
            if bias is not None:
                m.bias.copy_(torch.from_numpy(bias))
        return m

    def ln(prefix):
        m = torch.nn.LayerNorm(d, eps=1e-6)  # flax nnx.LayerNorm default epsilon
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(flat[f"{prefix}/scale"]))
            m.bias.copy_(torch.from_numpy(flat[f"{prefix}/bias"]))
        return m

    class Block(torch.nn.Module):
        def __init__(self, i):
            super().__init__()
            p = f"blocks/{i}"
            self.ln1, self.ln2 = ln(f"{p}/ln1"), ln(f"{p}/ln2")
            self.q, self.k, self.v, self.o = (lin(flat[f"{p}/attn/{n}/kernel"]) for n in "qkvo")
            self.fc1 = lin(flat[f"{p}/mlp/fc1/kernel"], flat[f"{p}/mlp/fc1/bias"])
            self.fc2 = lin(flat[f"{p}/mlp/fc2/kernel"], flat[f"{p}/mlp/fc2/bias"])

        def forward(self, x):
            b, t, _ = x.shape
            h = self.ln1(x)
            q, k, v = (m(h).view(b, t, nh, d // nh).transpose(1, 2) for m in (self.q, self.k, self.v))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Embedding(96, d)
            with torch.no_grad():
                self.tok.weight.copy_(torch.from_numpy(flat["tok_embed/embedding"]))
            self.pos = torch.nn.Parameter(torch.from_numpy(flat["pos_embed"]).clone())
            self.blocks = torch.nn.ModuleList([Block(i) for i in range(2)])
            self.ln_f = ln("ln_f")
            self.head = lin(flat["head/kernel"], flat["head/bias"])

        def forward(self, ids):
            x = self.tok(ids) + self.pos[: ids.shape[1]]
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln_f(x))

    return Net()


def bench_init(args, progress):
    graphdef, state, ids = transformer(args)
    apply = apply_fn(graphdef)

    def nll(p, tok):
        return loss_fn(apply(p, tok[:, :-1]), tok[:, 1:])

    out = {"model": {"d_model": args.tf_d_model, "n_layers": 2, "n_heads": 4, "d_ff": 4 * args.tf_d_model,
                     "seq_len": args.tf_seq, "params": count(state)},
           "batches": args.init_batches, "batch": args.init_batch, "rank": args.rank, "methods": {}}
    for name, rp in (("lora_ga", R.LoRAGA(rank=args.rank, alpha=args.alpha, targets=ADAPTER_TARGETS)),
                     # PEFT's and the official SVD: randomized, sketch min(4r, m, n), 4 power iterations
                     ("lora_ga_rsvd", R.LoRAGA(rank=args.rank, alpha=args.alpha, n_iter=4, targets=ADAPTER_TARGETS)),
                     ("lora_ga_peft_semantics", R.LoRAGA(rank=args.rank, alpha=args.alpha, semantics="peft",
                                                         targets=ADAPTER_TARGETS)),
                     ("lora_sb", R.LoRASB(rank=args.rank, targets=ADAPTER_TARGETS))):
        @jax.jit
        def init(params, batches, rp=rp):
            g = R.estimate_grads(nll, params, batches, rp.targets, stacked=True)
            return rp.init(jax.random.key(0), params, grads=g)

        t0 = time.perf_counter()
        jax.block_until_ready(init(state, ids))
        first = time.perf_counter() - t0
        warm = []
        for _ in range(args.init_repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(init(state, ids))
            warm.append(time.perf_counter() - t0)
        out["methods"][name] = {"first_call_s": first, "warm_median_s": float(np.median(warm)),
                                "one_jit": True}
    if not args.no_torch:
        try:
            import peft
            import torch
            from peft.tuners.lora.config import LoraGAConfig
            from peft.tuners.lora.loraga import preprocess_loraga
        except Exception as e:  # pragma: no cover - reference extra missing
            out["peft"] = {"available": False, "note": repr(e)}
            return out
        torch.set_num_threads(usable_cpus())
        net = torch_port(state, args)
        tids = torch.from_numpy(np.asarray(ids).astype(np.int64))
        with torch.no_grad():  # the port computes the same function
            diff = float(np.max(np.abs(net(tids[0, :, :-1]).numpy() - np.asarray(apply(state, ids[0, :, :-1])))))
        cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, init_lora_weights="lora_ga",
                              target_modules=["q", "k", "v", "o", "fc1", "fc2"], lora_ga_config=LoraGAConfig())
        times = []
        for _ in range(1 + args.init_repeats):
            model = copy.deepcopy(net)

            def train_step(model=model):
                for tb in tids:
                    logits = model(tb[:, :-1])
                    torch.nn.functional.cross_entropy(logits.reshape(-1, 96), tb[:, 1:].reshape(-1)).backward()

            t0 = time.perf_counter()
            preprocess_loraga(model, cfg, train_step)
            peft.get_peft_model(model, cfg)
            times.append(time.perf_counter() - t0)
        out["peft"] = {"available": True, "peft": peft.__version__, "torch": torch.__version__,
                       "num_threads": torch.get_num_threads(), "port_max_abs_logit_diff": diff,
                       "first_call_s": times[0], "warm_median_s": float(np.median(times[1:]))}
        for m in out["methods"].values():
            m["ratio_to_peft_warm"] = m["warm_median_s"] / out["peft"]["warm_median_s"]
            m["ratio_first_to_peft_first"] = m["first_call_s"] / out["peft"]["first_call_s"]
    return out


# ---------------------------------------------------------------------------------- report
def tables(out):
    st = out["steps"]
    s = st["shape"]
    rows = [f"**Training step**, MLP {s['layers']} x Dense({s['width']}->{s['width']}), batch {s['batch']}, "
            f"rank {st['rank']}, NOLA k={st['nola_k']} ({out['device']['platform']}, "
            f"{out['device'].get('cpu_count', '?')} CPUs)\n",
            "| method | kind | trainable params | median step (ms) | IQR (ms) | x lora | target | x limit |",
            "|---|---|---:|---:|---:|---:|---|---:|"]
    for k, r in st["methods"].items():
        tgt = "" if r["target_ratio_to_lora"] is None else \
            f"<= {r['target_ratio_to_lora']:.2f}: {'met' if r['meets_target'] else 'NOT met'}"
        rows.append(f"| {k} | {r['kind']} | {r['trainable_params']:,} | {r['median_ms']:.1f} | "
                    f"{r['iqr_ms']:.1f} | {r['ratio_to_lora']:.2f} | {tgt} | {r['ratio_to_limit']:.2f} |")
    ini = out["init"]
    m = ini["model"]
    rows += ["", f"**Data-aware init** of CharTransformer (d_model {m['d_model']}, {m['n_layers']} layers, "
             f"{m['params']:,} params, seq {m['seq_len']}), {ini['batches']} gradient batches of {ini['batch']}, "
             f"rank {ini['rank']}, q/k/v/o/fc1/fc2\n",
             "| method | first call (s, incl. compile) | warm (s) | warm x PEFT |", "|---|---:|---:|---:|"]
    for k, r in ini["methods"].items():
        rows.append(f"| lrjax {k} (estimate_grads + init in one jit) | {r['first_call_s']:.2f} | "
                    f"{r['warm_median_s']:.3f} | {r.get('ratio_to_peft_warm', float('nan')):.2f} |")
    p = ini.get("peft", {})
    if p.get("available"):
        rows.append(f"| PEFT {p['peft']} preprocess_loraga + get_peft_model (torch {p['torch']}) | "
                    f"{p['first_call_s']:.2f} | {p['warm_median_s']:.3f} | 1.00 |")
    return "\n".join(rows)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = out["steps"]["methods"]
    names = list(ms)
    fig, ax = plt.subplots(figsize=(9, 4))
    vals = [ms[n]["ratio_to_lora"] for n in names]
    colors = ["0.6" if n == "limit" else ("tab:red" if ms[n]["meets_target"] is False else "tab:blue") for n in names]
    ax.bar(names, vals, color=colors)
    ax.axhline(1.15, color="k", ls="--", lw=0.8, label="target 1.15x (NOLA: 1.5x)")
    ax.axhline(1.0, color="0.3", lw=0.6)
    ax.set(ylabel="step time / lrjax LoRA step", title="training step vs LoRA at the same rank (red: target missed)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    t0 = time.perf_counter()
    out = {"command": "python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))),
           "device": device_info(), "config": vars(args), "load_avg_before": os.getloadavg()}
    out["steps"] = bench_steps(args, progress)
    out["init"] = bench_init(args, progress)
    out["load_avg_after"] = os.getloadavg()
    out["total_s"] = time.perf_counter() - t0
    md = tables(out)
    print(md)
    with open(os.path.join(args.out, "bench_adapter_speed.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    with open(os.path.join(args.out, "bench_adapter_speed.md"), "w") as f:
        f.write(md + f"\n\nReproduce: `{out['command']}`; load average before/after {out['load_avg_before']} / "
                f"{out['load_avg_after']}.\n")
    plot(out, os.path.join(args.out, "bench_adapter_speed.png"))
    print(f"wrote {args.out}/bench_adapter_speed.{{json,md,png}} ({out['total_s']:.0f}s)")
    return out


if __name__ == "__main__":
    main()
