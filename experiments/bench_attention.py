"""Benchmark: KDA prefill (recurrent scan vs chunkwise) vs softmax attention, and decode, vs sequence length.

    python experiments/bench_attention.py --out results/attention   # minutes on 2 CPU cores
    python experiments/bench_attention.py --quick                   # smoke test, tiny shapes

Prefill (``B`` sequences of ``T`` tokens, ``H`` heads, head size ``D`` for keys and values):

* ``kda_recurrent``: :func:`lrjax.nn.attention.recurrent_kda` (``lax.scan`` over tokens);
* ``kda_chunk``: :func:`lrjax.nn.attention.chunk_kda` (chunk ``--chunk``, default 64);
* ``softmax``: ``jax.nn.dot_product_attention(q, k, v, is_causal=True)`` (XLA; the quadratic
  baseline).

Each is one jitted call on random inputs (L2-normalized keys, KDA log-decay in ``[-1, 0]``);
timings are medians over ``--repeats`` round-robin calls (:func:`lrjax.benchmark.time_round_robin`,
compilation excluded, ``block_until_ready``). Memory is XLA's compiled memory analysis of the call
(temporaries + outputs, bytes). Decode: one token at context ``T``: ``kda_step`` (a fixed
``[B, H, D, D]`` state) against softmax attention reading a ``[B, T, H, D]`` K and V cache; the
state / cache bytes are reported.

Targets (issue 13): chunkwise >= 5x faster than the recurrent scan at T = 4096 (``speedup`` row)
and linear in T: a least-squares fit ``ms = a + b T`` over T >= 512 and the log-log slope
(1 = linear) are reported. Writes ``<out>/bench_attention.{json,md,png}``.
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
from tqdm.auto import tqdm

from lrjax.benchmark import describe, device_info, summarize, time_round_robin
from lrjax.nn.attention import chunk_kda, kda_step, recurrent_kda

PREFILL = ("kda_recurrent", "kda_chunk", "softmax")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--out", default="runs/bench_attention", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="disable tqdm bars")
    p.add_argument("--lengths", default=None, help="comma-separated T (default 64..8192 by x2; quick 64,128,256)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="heads H = HV (default 4; quick 2)")
    p.add_argument("--head-dim", type=int, default=None, help="K = V (default 64; quick 16)")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 5; quick 2)")
    p.add_argument("--max-recurrent", type=int, default=8192, help="skip the recurrent scan above this T")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    q = a.quick
    a.lengths = [int(t) for t in (a.lengths or ("64,128,256" if q else
                                                ",".join(str(64 * 2 ** i) for i in range(8)))).split(",")]
    a.heads = a.heads or (2 if q else 4)
    a.head_dim = a.head_dim or (16 if q else 64)
    a.repeats = a.repeats or (2 if q else 5)
    return a


def inputs(args, T, key):
    B, H, D = args.batch, args.heads, args.head_dim
    kq, kk, kv, kg, kb = jax.random.split(key, 5)
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, T, H, D))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(kv, (B, T, H, D))
    g = -jax.random.uniform(kg, (B, T, H, D))
    beta = jax.nn.sigmoid(jax.random.normal(kb, (B, T, H)))
    return q, k, v, g, beta


def _memory(fn, *a):
    try:
        m = jax.jit(fn).lower(*a).compile().memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def bench_prefill(args, progress):
    C = args.chunk
    fns = {"kda_recurrent": jax.jit(lambda q, k, v, g, b: recurrent_kda(q, k, v, g, b)),
           "kda_chunk": jax.jit(lambda q, k, v, g, b: chunk_kda(q, k, v, g, b, chunk_size=C)),
           "softmax": jax.jit(lambda q, k, v, g, b: jax.nn.dot_product_attention(q, k, v, is_causal=True))}
    raw = {"kda_recurrent": lambda q, k, v, g, b: recurrent_kda(q, k, v, g, b),
           "kda_chunk": lambda q, k, v, g, b: chunk_kda(q, k, v, g, b, chunk_size=C),
           "softmax": lambda q, k, v, g, b: jax.nn.dot_product_attention(q, k, v, is_causal=True)}
    rows = {}
    for T in tqdm(args.lengths, desc="prefill", disable=not progress, file=sys.stdout, leave=False):
        a = inputs(args, T, jax.random.key(args.seed))
        names = [n for n in PREFILL if not (n == "kda_recurrent" and T > args.max_recurrent)]
        calls = {n: (lambda f=fns[n]: jax.block_until_ready(f(*a))) for n in names}
        times = time_round_robin(calls, args.repeats, warmup=1, progress=False)
        row = {}
        for n in names:
            s = summarize(times[n])
            s["tokens_per_s"] = args.batch * T / (s["median_ms"] / 1e3)
            s["memory_bytes"] = _memory(raw[n], *a)
            row[n] = s
        o_r = fns["kda_recurrent"](*a)[0] if "kda_recurrent" in names else None
        if o_r is not None:
            row["chunk_vs_recurrent_max_abs"] = float(jnp.abs(fns["kda_chunk"](*a)[0] - o_r).max())
        rows[T] = row
    return rows


def bench_decode(args, progress):
    B, H, D = args.batch, args.heads, args.head_dim
    step = jax.jit(lambda q, k, v, g, b, s: kda_step(q, k, v, g, b, s))

    def attn_decode(q, kc, vc):  # one query against a full cache of T keys
        return jax.nn.dot_product_attention(q, kc, vc)

    attn = jax.jit(attn_decode)
    rows = {}
    for T in tqdm(args.lengths, desc="decode", disable=not progress, file=sys.stdout, leave=False):
        key = jax.random.key(args.seed + 1)
        q, k, v, g, beta = (x[:, 0] for x in inputs(args, 1, key))
        s = jax.random.normal(key, (B, H, D, D))
        kc = jax.random.normal(key, (B, T, H, D))
        vc = jax.random.normal(jax.random.key(2), (B, T, H, D))
        q1 = q[:, None]
        times = time_round_robin({"kda_step": lambda: jax.block_until_ready(step(q, k, v, g, beta, s)),
                                  "softmax_kv_cache": lambda: jax.block_until_ready(attn(q1, kc, vc))},
                                 max(args.repeats * 4, 5), warmup=2, progress=False)
        rows[T] = {"kda_step": dict(summarize(times["kda_step"]), state_bytes=int(s.size * 4)),
                   "softmax_kv_cache": dict(summarize(times["softmax_kv_cache"]),
                                            cache_bytes=int(kc.size * 4 + vc.size * 4))}
        for n in rows[T]:
            rows[T][n]["tokens_per_s"] = B / (rows[T][n]["median_ms"] / 1e3)
    return rows


def fits(prefill, lengths):
    """ms = a + b T over T >= 512 (or all if fewer than 3 such) and the log-log slope."""
    out = {}
    for n in PREFILL:
        Ts = [T for T in lengths if n in prefill[T]]
        big = [T for T in Ts if T >= 512]
        use = big if len(big) >= 3 else Ts
        if len(use) < 2:
            continue
        t = np.array(use, float)
        ms = np.array([prefill[T][n]["median_ms"] for T in use])
        b, a = np.polyfit(t, ms, 1)
        slope = np.polyfit(np.log(t), np.log(ms), 1)[0]
        out[n] = {"fit_T": use, "ms_per_1k_tokens": float(b * 1e3), "intercept_ms": float(a),
                  "loglog_slope": float(slope)}
    return out


def targets(prefill, fit):
    t = {}
    T = 4096 if 4096 in prefill else max(T for T in prefill if "kda_recurrent" in prefill[T])
    r = prefill[T]
    if "kda_recurrent" in r:
        sp = r["kda_recurrent"]["median_ms"] / r["kda_chunk"]["median_ms"]
        t["speedup_chunk_vs_recurrent"] = {"T": T, "value": float(sp), "target": 5.0, "met": bool(sp >= 5.0)}
    if "kda_chunk" in fit:
        s = fit["kda_chunk"]["loglog_slope"]
        t["chunk_linear_in_T"] = {"loglog_slope": s, "ms_per_1k_tokens": fit["kda_chunk"]["ms_per_1k_tokens"],
                                  "met": bool(s <= 1.2)}
    return t


def tables(out):
    pf, dc = out["prefill"], out["decode"]
    L = ["| T | recurrent ms | chunk ms | softmax ms | chunk tok/s | softmax tok/s | recurrent/chunk | "
         "chunk mem MiB | softmax mem MiB | max abs diff |", "|" + "---|" * 10]
    for T, r in pf.items():
        def ms(n):
            return f"{r[n]['median_ms']:.2f}" if n in r else "-"

        def mib(n):
            m = r.get(n, {}).get("memory_bytes")
            return "-" if m is None else f"{m / 2 ** 20:.1f}"
        sp = f"{r['kda_recurrent']['median_ms'] / r['kda_chunk']['median_ms']:.1f}x" if "kda_recurrent" in r else "-"
        diff = f"{r['chunk_vs_recurrent_max_abs']:.1e}" if "chunk_vs_recurrent_max_abs" in r else "-"
        L.append(f"| {T} | {ms('kda_recurrent')} | {ms('kda_chunk')} | {ms('softmax')} | "
                 f"{r['kda_chunk']['tokens_per_s']:.3g} | {r['softmax']['tokens_per_s']:.3g} | {sp} | "
                 f"{mib('kda_chunk')} | {mib('softmax')} | {diff} |")
    L += ["", "| context T | KDA decode ms/token | KDA state KiB | softmax decode ms/token | KV cache KiB |",
          "|---|---|---|---|---|"]
    for T, r in dc.items():
        L.append(f"| {T} | {r['kda_step']['median_ms']:.3f} | {r['kda_step']['state_bytes'] / 1024:.0f} | "
                 f"{r['softmax_kv_cache']['median_ms']:.3f} | {r['softmax_kv_cache']['cache_bytes'] / 1024:.0f} |")
    L += ["", "| fit (prefill) | ms per 1k tokens | log-log slope | T used |", "|---|---|---|---|"]
    for n, f in out["fit"].items():
        L.append(f"| {n} | {f['ms_per_1k_tokens']:.3f} | {f['loglog_slope']:.2f} | {f['fit_T'][0]}..{f['fit_T'][-1]} |")
    return "\n".join(L)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pf, dc = out["prefill"], out["decode"]
    fig, axs = plt.subplots(1, 3, figsize=(14, 4))
    for n in PREFILL:
        Ts = [T for T in pf if n in pf[T]]
        axs[0].loglog(Ts, [pf[T][n]["median_ms"] for T in Ts], "o-", label=n)
        mem = [(T, pf[T][n]["memory_bytes"]) for T in Ts if pf[T][n]["memory_bytes"]]
        if mem:
            axs[1].loglog([m[0] for m in mem], [m[1] / 2 ** 20 for m in mem], "o-", label=n)
    axs[0].set(xlabel="T", ylabel="prefill ms (median)", title="prefill time")
    axs[1].set(xlabel="T", ylabel="MiB (XLA temp + output)", title="prefill memory")
    Ts = list(dc)
    ax = axs[2]
    ax.loglog(Ts, [dc[T]["kda_step"]["state_bytes"] / 1024 for T in Ts], "o-", label="KDA state KiB")
    ax.loglog(Ts, [dc[T]["softmax_kv_cache"]["cache_bytes"] / 1024 for T in Ts], "s-", label="KV cache KiB")
    ax2 = ax.twinx()
    ax2.plot(Ts, [dc[T]["kda_step"]["median_ms"] for T in Ts], "o--", color="C2", label="KDA ms/token")
    ax2.plot(Ts, [dc[T]["softmax_kv_cache"]["median_ms"] for T in Ts], "s--", color="C3", label="softmax ms/token")
    ax2.set_ylabel("decode ms / token")
    ax.set(xlabel="context T", ylabel="KiB", title="decode: memory (solid), time (dashed)")
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="lower right")
    for a in axs[:2]:
        a.legend(fontsize=8)
    d = out["device"]
    fig.suptitle(f"KDA vs softmax attention, {d['platform']} / {d['device_kind']}, B={out['config']['batch']} "
                 f"H={out['config']['heads']} D={out['config']['head_dim']}, load {d['load_avg']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    t0 = time.perf_counter()
    device = device_info()
    cmd = "python experiments/bench_attention.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"reproduce: {cmd}\ndevice: {describe(device)}")
    out = {"command": cmd, "device": device, "config": {k: v for k, v in vars(args).items()}}
    out["prefill"] = bench_prefill(args, progress)
    out["decode"] = bench_decode(args, progress)
    out["fit"] = fits(out["prefill"], args.lengths)
    out["targets"] = targets(out["prefill"], out["fit"])
    out["device_after"] = {"load_avg": device_info()["load_avg"]}
    out["table_markdown"] = tables(out)
    out["wall_s"] = time.perf_counter() - t0
    print(out["table_markdown"])
    print("\ntargets:", json.dumps(out["targets"], indent=1))
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(args.out, "bench_attention.md"), "w") as f:
        f.write(f"# bench_attention\n\n`{cmd}`\n\ndevice: {describe(device)} (load after: "
                f"{out['device_after']['load_avg']})\n\n{out['table_markdown']}\n\ntargets: "
                f"```\n{json.dumps(out['targets'], indent=1)}\n```\n")
    plot(out, os.path.join(args.out, "bench_attention.png"))
    print(f"\nwrote {args.out}/bench_attention.{{json,md,png}} in {out['wall_s']:.1f} s")
    return out


if __name__ == "__main__":
    main()
