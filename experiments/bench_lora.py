"""Benchmark: what a LoRA / DoRA training step costs in lrjax, against full fine-tuning, the
unavoidable work of such a step, and PyTorch + PEFT on the same shapes.

    python experiments/bench_lora.py                 # a few minutes on 2 CPU cores
    python experiments/bench_lora.py --quick         # smoke test, tiny shapes, seconds

Workloads (float32, synthetic data, fixed seeds):

* ``mlp``: 4 x Dense(1024 -> 1024) with GELU between, batch 512, MSE loss;
* ``char_transformer``: :class:`lrjax.models.CharTransformer` (d_model 128, 2 layers, 4 heads,
  d_ff 512) on 32 x 128 random tokens, next-token cross-entropy.

Training-step methods (each a ``jit``-compiled step: loss, gradient and ``optax.adam`` update):

* ``full``: full fine-tuning, gradient and Adam over every parameter;
* ``lora_factored``: LoRA r=8 on every kernel (transformer: attention q/k/v/o and MLP kernels),
  trained through :func:`lrjax.factored` (``x W + s (x A) B``; ``W + sAB`` never formed);
* ``lora_materialized``: the same LoRA through ``fn(rp.materialize(base, adapters), x)``;
* ``dora_factored``: DoRA r=8 through :func:`lrjax.factored`;
* ``limit``: the unavoidable work of any adapter step on these kernels. Definition used here:
  the gradient with respect to the *non-kernel* parameters only (biases and LayerNorm
  scales/biases; embeddings excluded), every kernel frozen, no optimizer update. That is every
  forward matmul plus the input-gradient matmuls ``dy W^T`` that carry the gradient back to the
  first layer's output -- which any method that trains something at every layer must do -- and
  no weight-gradient ``x^T dy`` matmul. For the MLP it is exactly forward + the input gradients of
  layers 2..4. For the transformer it also pushes the gradient through block 0's q/k/v kernels
  (to reach ``blocks/0/ln1``), which a LoRA step does not need, so a LoRA step may come in
  slightly under this "limit" there.

For every method: median step time over ``--repeats`` timed calls after warm-up (each call
``block_until_ready``), its interquartile range, the ratios to full fine-tuning and to the limit,
XLA's FLOP count (``compiled.cost_analysis()``) and the compiled executable's memory
(``compiled.memory_analysis()``: argument, output and temporary buffer bytes; on a GPU also the
device allocator's running peak from ``device.memory_stats()``). Methods are timed round-robin
(one call of each method per repeat) so that load from other processes affects all alike.

Inference on each workload: the base forward, the forward with merged LoRA weights
(``rp.merge``; the same compiled program, so the same cost) and the unmerged factored forward.

PyTorch peers (if ``torch`` and ``peft`` import): the same MLP in ``torch.nn`` with
``torch.optim.Adam`` (full), PEFT ``LoraConfig(r=8)`` and ``LoraConfig(r=8, use_dora=True)``,
and the same "limit" (bias gradients only), timed in the same round-robin, with
``torch.set_num_threads`` set to the usable CPU count (``os.cpu_count()`` unless pinned by taskset).

Writes ``<out>/bench_lora.json`` and ``<out>/bench_lora.png`` and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

from lrjax.benchmark import blocking, describe, device_info, summarize, time_round_robin, usable_cpus
import lrjax
from lrjax.models import ADAPTER_TARGETS, CharTransformer, apply_fn, loss_fn
from lrjax.reparam import FactoredStats

JAX_METHODS = ("full", "lora_factored", "lora_materialized", "dora_factored", "limit")
TORCH_METHODS = ("torch_full", "peft_lora", "peft_dora", "torch_limit")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test)")
    p.add_argument("--out", default="runs/bench_lora", help="output directory for JSON and PNG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method, default 20 (quick: 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per method after compiling")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--mlp-width", type=int, default=None, help="default 1024 (quick: 128)")
    p.add_argument("--mlp-layers", type=int, default=4)
    p.add_argument("--mlp-batch", type=int, default=None, help="default 512 (quick: 64)")
    p.add_argument("--tf-batch", type=int, default=None, help="default 32 (quick: 4)")
    p.add_argument("--tf-seq", type=int, default=None, help="default 128 (quick: 32)")
    p.add_argument("--tf-d-model", type=int, default=None, help="default 128 (quick: 32)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch/PEFT peers")
    p.add_argument("--no-progress", action="store_true", help="disable tqdm bars")
    a = p.parse_args(argv)
    dflt = dict(repeats=(3, 20), mlp_width=(128, 1024), mlp_batch=(64, 512), tf_batch=(4, 32),
                tf_seq=(32, 128), tf_d_model=(32, 128))
    for k, (q, full) in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, q if a.quick else full)
    if a.quick:
        a.warmup = min(a.warmup, 1)
    return a


# ------------------------------------------------------------------------------- utils
def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def compile_fn(fn, *args):
    """``jax.jit(fn)`` lowered and compiled for ``args``; returns (compiled, info dict)."""
    compiled = jax.jit(fn).lower(*args).compile()
    info = {}
    try:
        m = compiled.memory_analysis()
        info["memory"] = {
            "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes),
            "total_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes
                               + m.temp_size_in_bytes - m.alias_size_in_bytes),
        }
    except Exception as e:  # pragma: no cover - backend without memory analysis
        info["memory"] = {"error": repr(e)}
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        info["flops"] = float(ca.get("flops", float("nan")))
    except Exception:  # pragma: no cover
        info["flops"] = float("nan")
    return compiled, info


def device_peak_bytes():
    try:
        st = jax.devices()[0].memory_stats()
    except Exception:  # pragma: no cover
        st = None
    return int(st["peak_bytes_in_use"]) if st and "peak_bytes_in_use" in st else None


# ----------------------------------------------------------------------- workloads
def mlp_workload(args):
    """Plain-dict params ``{"dense_i": {"kernel", "bias"}}``; apply(params, x)."""
    w, L, B = args.mlp_width, args.mlp_layers, args.mlp_batch
    keys = jax.random.split(jax.random.key(args.seed), L + 2)
    params = {f"dense_{i}": {"kernel": jax.random.normal(keys[i], (w, w)) / np.sqrt(w),
                             "bias": jnp.zeros((w,))} for i in range(L)}

    def apply(p, x):
        for i in range(L):
            x = x @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"]
            if i < L - 1:
                x = jax.nn.gelu(x)
        return x

    x = jax.random.normal(keys[L], (B, w))
    y = jax.random.normal(keys[L + 1], (B, w))
    loss = lambda out, y: jnp.mean((out - y) ** 2)  # noqa: E731
    return {"name": "mlp", "params": params, "apply": apply, "x": x, "y": y, "loss": loss,
            "targets": "kernel", "is_kernel": lambda p: p.endswith("kernel"),
            "is_embedding": lambda p: False,
            "shape": {"layers": L, "width": w, "batch": B, "loss": "mse", "dtype": "float32"}}


def transformer_workload(args):
    d = args.tf_d_model
    model = CharTransformer(96, d_model=d, n_layers=2, n_heads=4, d_ff=4 * d,
                            max_len=args.tf_seq, rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)
    ids = jax.random.randint(jax.random.key(args.seed + 1), (args.tf_batch, args.tf_seq + 1), 0, 96)
    return {"name": "char_transformer", "params": state, "apply": apply_fn(graphdef),
            "x": ids[:, :-1], "y": ids[:, 1:], "loss": loss_fn, "targets": ADAPTER_TARGETS,
            "is_kernel": lambda p: p.endswith("kernel"),
            "is_embedding": lambda p: "embed" in p,
            "shape": {"vocab": 96, "d_model": d, "n_layers": 2, "n_heads": 4, "d_ff": 4 * d,
                      "batch": args.tf_batch, "seq_len": args.tf_seq, "loss": "cross-entropy",
                      "dtype": "float32"}}


def build_jax_methods(wl, args):
    """{method: (step_fn, example args, trainable param count)} plus extras for inference."""
    apply, params, x, y, loss = wl["apply"], wl["params"], wl["x"], wl["y"], wl["loss"]
    opt = optax.adam(1e-3)
    key = jax.random.key(args.seed + 7)
    out, extras = {}, {}

    def full_step(p, s, x, y):
        l, g = jax.value_and_grad(lambda p: loss(apply(p, x), y))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, l

    out["full"] = (full_step, (params, opt.init(params), x, y), count(params))

    def adapter_step(fwd):
        def step(ad, s, base, x, y):
            l, g = jax.value_and_grad(lambda ad: loss(fwd(base, ad, x), y))(ad)
            u, s = opt.update(g, s, ad)
            return optax.apply_updates(ad, u), s, l
        return step

    for name, cls in (("lora", lrjax.LoRA), ("dora", lrjax.DoRA)):
        rp = cls(rank=args.rank, alpha=args.alpha, targets=wl["targets"])
        base, ad = rp.init(key, params)
        st = FactoredStats()
        jax.eval_shape(lrjax.factored(apply, rp, stats=st), base, ad, x)
        extras[f"{name}_stats"] = {"adapted_leaves": len(ad), "factored": int(st.factored),
                                   "fallback": list(st.fallback)}
        g = lrjax.factored(apply, rp)
        sargs = (ad, opt.init(ad), base, x, y)
        out[f"{name}_factored"] = (adapter_step(g), sargs, rp.num_params(ad))
        if name == "lora":
            mat = lambda b, a, x, rp=rp: apply(rp.materialize(b, a), x)  # noqa: E731
            out["lora_materialized"] = (adapter_step(mat), sargs, rp.num_params(ad))
            extras["lora"] = (rp, base, ad, g)

    # limit: gradient w.r.t. the non-kernel, non-embedding leaves only; no optimizer
    flat = lrjax.tree.flatten(params)
    small = [p for p in flat if not wl["is_kernel"](p) and not wl["is_embedding"](p)]
    train_sub = {p: flat[p] for p in small}

    def limit_step(sub, params, x, y):
        return jax.grad(lambda sub: loss(apply(lrjax.tree.replace(params, sub), x), y))(sub)

    out["limit"] = (limit_step, (train_sub, params, x, y), count(train_sub))
    extras["limit_leaves"] = small
    return out, extras


def bench_jax_workload(wl, args, progress, torch_calls=None):
    methods, extras = build_jax_methods(wl, args)
    res = {"shape": wl["shape"], "total_params": count(wl["params"]), "methods": {},
           "factored_stats": {"lora": extras["lora_stats"], "dora": extras["dora_stats"]},
           "limit_grad_leaves": extras["limit_leaves"]}
    calls = {}
    for name, (fn, fargs, n_train) in tqdm(methods.items(), desc=f"{wl['name']}: compile",
                                           leave=False, disable=not progress, file=sys.stdout):
        compiled, info = compile_fn(fn, *fargs)
        calls[name] = blocking(compiled, *fargs)
        calls[name]()
        info["device_peak_bytes_after"] = device_peak_bytes()
        res["methods"][name] = {"trainable_params": n_train, **info}
    # inference: base forward, merged LoRA (rp.merge) forward, unmerged factored forward
    rp, base, ad, g = extras["lora"]
    ad = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(3), a.shape, a.dtype), ad)
    merged = rp.merge(base, ad)
    x = wl["x"]
    fwd_c, fwd_info = compile_fn(wl["apply"], wl["params"], x)
    fac_c, fac_info = compile_fn(g, base, ad, x)
    y_m = fwd_c(merged, x)
    y_f = fac_c(base, ad, x)
    res["inference"] = {"merged_vs_factored_max_abs_diff": float(jnp.max(jnp.abs(y_m - y_f))),
                        "methods": {"base_forward": {**fwd_info}, "merged_lora_forward": {**fwd_info},
                                    "factored_lora_forward": {**fac_info}}}
    inf_calls = {"base_forward": blocking(fwd_c, wl["params"], x),
                 "merged_lora_forward": blocking(fwd_c, merged, x),
                 "factored_lora_forward": blocking(fac_c, base, ad, x)}
    all_calls = {**calls, **(torch_calls or {})}
    times = time_round_robin(all_calls, args.repeats, args.warmup, f"{wl['name']}: train steps", progress)
    itimes = time_round_robin(inf_calls, args.repeats, args.warmup, f"{wl['name']}: inference", progress)
    for k, ms in times.items():
        if k in res["methods"]:
            res["methods"][k].update(summarize(ms))
    full, lim = res["methods"]["full"]["median_ms"], res["methods"]["limit"]["median_ms"]
    for k, r in res["methods"].items():
        r["ratio_to_full"] = r["median_ms"] / full
        r["ratio_to_limit"] = r["median_ms"] / lim
    for k, ms in itimes.items():
        res["inference"]["methods"][k].update(summarize(ms))
    base_ms = res["inference"]["methods"]["base_forward"]["median_ms"]
    for r in res["inference"]["methods"].values():
        r["ratio_to_base"] = r["median_ms"] / base_ms
    torch_times = {k: ms for k, ms in times.items() if k not in res["methods"]}
    return res, torch_times


# ----------------------------------------------------------------------- torch peers
def torch_mlp_calls(wl, args):
    """Step closures for the PyTorch/PEFT peers on the MLP's exact shapes (or a skip note)."""
    try:
        import torch
        import peft
    except Exception as e:  # noqa: BLE001
        return None, {"available": False, "note": f"torch/peft not importable ({e!r}); peers skipped"}
    torch.set_num_threads(usable_cpus())  # = os.cpu_count() unless the process is pinned
    dev = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(args.seed)
    w, L = args.mlp_width, args.mlp_layers
    x = torch.from_numpy(np.array(wl["x"])).to(dev)
    y = torch.from_numpy(np.array(wl["y"])).to(dev)
    flat = lrjax.tree.flatten(wl["params"])

    def make_model():
        layers = []
        for i in range(L):
            lin = torch.nn.Linear(w, w)
            with torch.no_grad():  # same weights as the JAX MLP (torch stores W^T)
                lin.weight.copy_(torch.from_numpy(np.asarray(flat[f"dense_{i}/kernel"]).T.copy()))
                lin.bias.copy_(torch.from_numpy(np.array(flat[f"dense_{i}/bias"])))
            layers.append(lin)
            if i < L - 1:
                layers.append(torch.nn.GELU())
        return torch.nn.Sequential(*layers).to(dev)

    lin_names = [str(2 * i) for i in range(L)]  # Sequential indices of the Linear layers
    info = {"available": True, "torch": torch.__version__, "peft": peft.__version__,
            "device": dev, "num_threads": torch.get_num_threads(), "methods": {}}
    calls = {}

    def step_closure(model, params):
        opt = torch.optim.Adam(params, lr=1e-3) if params is not None else None

        def step():
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if opt is not None:
                opt.step()
            else:
                for p in model.parameters():
                    p.grad = None
            sync()
        return step

    m = make_model()
    calls["torch_full"] = step_closure(m, list(m.parameters()))
    info["methods"]["torch_full"] = {"trainable_params": sum(p.numel() for p in m.parameters())}
    for name, dora in (("peft_lora", False), ("peft_dora", True)):
        cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                              target_modules=lin_names, use_dora=dora)
        pm = peft.get_peft_model(make_model(), cfg)
        tr = [p for p in pm.parameters() if p.requires_grad]
        calls[name] = step_closure(pm, tr)
        info["methods"][name] = {"trainable_params": sum(p.numel() for p in tr)}
    m = make_model()  # limit: bias gradients only, weights frozen, no optimizer
    for n, p in m.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    calls["torch_limit"] = step_closure(m, None)
    info["methods"]["torch_limit"] = {"trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad)}
    return calls, info


# ------------------------------------------------------------------------ reporting
def fmt_mb(b):
    return f"{b / 2**20:.1f}" if isinstance(b, (int, float)) else "-"


def jax_table(res, title):
    rows = [f"\n**{title}**\n",
            "| method | trainable params | median step (ms) | IQR (ms) | x full FT | x limit | "
            "GFLOP (XLA) | temp MB | total MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in res["methods"].items():
        mem = r.get("memory", {})
        rows.append(f"| {k} | {r['trainable_params']:,} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | "
                    f"{r['ratio_to_full']:.2f} | {r['ratio_to_limit']:.2f} | {r['flops'] / 1e9:.2f} | "
                    f"{fmt_mb(mem.get('temp_bytes'))} | {fmt_mb(mem.get('total_bytes'))} |")
    rows += ["", "| inference | median (ms) | IQR (ms) | x base |", "|---|---:|---:|---:|"]
    for k, r in res["inference"]["methods"].items():
        rows.append(f"| {k} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {r['ratio_to_base']:.2f} |")
    return "\n".join(rows)


def torch_table(info, title):
    if not info.get("available"):
        return f"\n**{title}**: {info.get('note')}"
    rows = [f"\n**{title}** (torch {info['torch']}, peft {info['peft']}, {info['device']}, "
            f"{info['num_threads']} threads)\n",
            "| method | trainable params | median step (ms) | IQR (ms) | x torch full | x torch limit |",
            "|---|---:|---:|---:|---:|---:|"]
    for k, r in info["methods"].items():
        rows.append(f"| {k} | {r['trainable_params']:,} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | "
                    f"{r['ratio_to_full']:.2f} | {r['ratio_to_limit']:.2f} |")
    return "\n".join(rows)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"full": "tab:blue", "lora_factored": "tab:orange", "lora_materialized": "tab:red",
              "dora_factored": "tab:green", "limit": "0.5", "torch_full": "tab:cyan",
              "peft_lora": "tab:pink", "peft_dora": "tab:olive", "torch_limit": "0.75"}
    panels = [("mlp", "MLP training step"), ("char_transformer", "CharTransformer training step")]
    for ax, (wk, title) in zip(axes[:2], panels):
        ms = dict(out["workloads"][wk]["methods"])
        if wk == "mlp" and out["torch"].get("available"):
            ms.update(out["torch"]["methods"])
        names = list(ms)
        med = [ms[n]["median_ms"] for n in names]
        err = np.array([[ms[n]["median_ms"] - ms[n]["p25_ms"] for n in names],
                        [ms[n]["p75_ms"] - ms[n]["median_ms"] for n in names]])
        ax.bar(range(len(names)), med, yerr=err, capsize=3, color=[colors.get(n, "k") for n in names])
        ax.axhline(ms["limit"]["median_ms"], color="k", ls=":", lw=1, label="lrjax limit")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set(title=f"{title} (median, IQR)", ylabel="ms / step")
        ax.legend(fontsize=8)
    ax = axes[2]
    meths = list(JAX_METHODS)
    wid = 0.38
    for j, (wk, lab) in enumerate([("mlp", "MLP"), ("char_transformer", "CharTransformer")]):
        vals = [out["workloads"][wk]["methods"][m].get("memory", {}).get("total_bytes", np.nan) / 2**20
                for m in meths]
        ax.bar(np.arange(len(meths)) + (j - 0.5) * wid, vals, wid, label=lab)
    ax.set_xticks(range(len(meths)), meths, rotation=35, ha="right", fontsize=8)
    ax.set(title="compiled step memory (args + outputs + temps)", ylabel="MiB")
    ax.legend(fontsize=8)
    d = out["device"]
    fig.suptitle(f"lrjax LoRA benchmark on {d['platform']} / {d['device_kind']} "
                 f"({d['usable_cpus']} CPUs), jax {d['jax']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    t0 = time.perf_counter()
    cmd = "python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv)))
    device = device_info()
    dev_line = describe(device)
    print(f"reproduce: {cmd}\ndevice: {dev_line}")

    mlp = mlp_workload(args)
    tcalls, tinfo = (None, {"available": False, "note": "skipped (--no-torch)"}) if args.no_torch \
        else torch_mlp_calls(mlp, args)
    mlp_res, torch_times = bench_jax_workload(mlp, args, progress, tcalls)
    if tinfo.get("available"):
        for k, ms in torch_times.items():
            tinfo["methods"][k].update(summarize(ms))
        tf, tl = tinfo["methods"]["torch_full"]["median_ms"], tinfo["methods"]["torch_limit"]["median_ms"]
        for r in tinfo["methods"].values():
            r["ratio_to_full"] = r["median_ms"] / tf
            r["ratio_to_limit"] = r["median_ms"] / tl
    tf_res, _ = bench_jax_workload(transformer_workload(args), args, progress)

    s = mlp["shape"]
    t = tf_res["shape"]
    tables = [
        f"\n## lrjax LoRA benchmark -- device: {dev_line}\nreproduce: `{cmd}`",
        jax_table(mlp_res, f"MLP {s['layers']} x Dense({s['width']}->{s['width']}), batch {s['batch']}, "
                           f"float32 -- JAX/lrjax, {args.repeats} repeats"),
        torch_table(tinfo, "MLP, same shapes -- PyTorch / PEFT peers"),
        jax_table(tf_res, f"CharTransformer d_model={t['d_model']} layers={t['n_layers']} "
                          f"batch {t['batch']}x{t['seq_len']} -- JAX/lrjax, {args.repeats} repeats"),
    ]
    for wk, r in (("mlp", mlp_res), ("char_transformer", tf_res)):
        for m in ("lora", "dora"):
            st = r["factored_stats"][m]
            tables.append(f"- {wk} {m}: lrjax.factored per forward: {st['factored']} factored kernel "
                          f"products for {st['adapted_leaves']} adapted kernels, fallbacks: "
                          f"{st['fallback'] or 'none'}")
        tables.append(f"- {wk}: max |merged - factored| forward output: "
                      f"{r['inference']['merged_vs_factored_max_abs_diff']:.2e}")
    lr = mlp_res["methods"]["lora_factored"]["ratio_to_full"]
    lim = mlp_res["methods"]["limit"]["ratio_to_full"]
    fl = mlp_res["methods"]["limit"]["flops"] / mlp_res["methods"]["full"]["flops"]
    tables.append(f"- MLP LoRA (factored) / full FT step time: {lr:.2f}x (target <= 0.5x: "
                  f"{'met' if lr <= 0.5 else 'not met'}); the limit itself is {lim:.2f}x full FT in "
                  f"time and {fl:.2f}x in XLA FLOPs, a floor for any adapter step on this workload")
    tables.append("- memory: XLA's compiled-executable analysis (arguments + outputs + temporaries); "
                  "'temp' can read ~0 when XLA reuses output buffers as scratch, so compare 'total'")
    text = "\n".join(tables)
    print(text)

    out = {"command": cmd, "device": device, "config": vars(args),
           "workloads": {"mlp": mlp_res, "char_transformer": tf_res}, "torch": tinfo,
           "table_markdown": text, "total_time_s": time.perf_counter() - t0}
    with open(os.path.join(args.out, "bench_lora.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(out, os.path.join(args.out, "bench_lora.png"))
    print(f"\nwrote {os.path.join(args.out, 'bench_lora.json')} and {os.path.join(args.out, 'bench_lora.png')} "
          f"({out['total_time_s']:.1f}s total)")
    return out


if __name__ == "__main__":
    main()
