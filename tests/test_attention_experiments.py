"""Smoke tests of experiments/bench_attention.py and experiments/mqar.py (``--quick``), and the MQAR
task generator."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _run(script, out, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"), MPLBACKEND="Agg",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--quick", "--out", str(out),
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_bench_attention_quick(tmp_path):
    out = tmp_path / "res"
    proc = _run("bench_attention.py", out, tmp_path)
    assert "reproduce:" in proc.stdout and "| T |" in proc.stdout
    res = json.loads((out / "bench_attention.json").read_text())
    assert (out / "bench_attention.png").stat().st_size > 0 and (out / "bench_attention.md").exists()
    for k in ("command", "device", "config", "prefill", "decode", "fit", "targets", "table_markdown"):
        assert k in res, k
    assert "load_avg" in res["device"]
    for T, row in res["prefill"].items():
        for m in ("kda_recurrent", "kda_chunk", "softmax"):
            assert row[m]["median_ms"] > 0 and row[m]["tokens_per_s"] > 0, (T, m)
        assert row["chunk_vs_recurrent_max_abs"] <= 1e-4
    states = {r["kda_step"]["state_bytes"] for r in res["decode"].values()}
    caches = [r["softmax_kv_cache"]["cache_bytes"] for r in res["decode"].values()]
    assert len(states) == 1 and caches == sorted(caches) and caches[0] < caches[-1]
    assert "speedup_chunk_vs_recurrent" in res["targets"] and "loglog_slope" in res["fit"]["kda_chunk"]


def test_mqar_quick(tmp_path):
    out = tmp_path / "res"
    proc = _run("mqar.py", out, tmp_path)
    assert "| mixer |" in proc.stdout
    res = json.loads((out / "mqar.json").read_text())
    assert (out / "mqar.png").stat().st_size > 0
    assert set(res["mixers"]) == {"kda", "gdn", "softmax", "linear"}
    for m, r in res["mixers"].items():
        assert 0.0 <= r["final_eval_acc"] <= 1.0 and np.isfinite(r["final_eval_loss"]), m
        assert len(r["history"]["step"]) == len(r["history"]["eval_acc"]) > 0


def test_mqar_batches():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        from mqar import make_batch
    finally:
        sys.path.pop(0)
    toks, tgt, mask = make_batch(np.random.default_rng(0), 4, 16, 3, 12)
    for b in range(4):
        keys, vals = toks[b, 0:6:2], toks[b, 1:6:2]
        assert len(set(keys)) == 3 and (keys < 8).all() and (vals >= 8).all()
        lut = dict(zip(keys, vals))
        assert not mask[b, :6].any() and mask[b, 6:].all()
        for t in range(6, 12):
            assert tgt[b, t] == lut[toks[b, t]]


def test_lama_keyword_quick(tmp_path):
    out = tmp_path / "res"
    proc = _run("lama_keyword.py", out, tmp_path)
    assert "| pooling |" in proc.stdout and "reproduce:" in proc.stdout
    res = json.loads((out / "lama_keyword.json").read_text())
    assert (out / "lama_keyword.png").stat().st_size > 0
    r = res["results"]
    assert set(r) == {"lama", "ssa"}
    # equal pooling parameters (within one d_a step), LAMA's is exactly 2 d m
    d, m = 2 * res["config"]["hidden"], res["config"]["heads"]
    assert r["lama"]["pool_params"] == 2 * d * m and abs(r["ssa"]["pool_params"] - 2 * d * m) <= d + m
    for v in r.values():
        assert 0.0 <= v["acc_mean"] <= 1.0 and 0.0 <= v["kw_mass_mean"] <= 1.0 + 1e-6
        assert v["timing"]["forward_ms"] > 0 and v["timing"]["ratio_to_limit"] > 0
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        from lama_keyword import make_batch
    finally:
        sys.path.pop(0)
    toks, mask, y, pos = make_batch(np.random.default_rng(0), 16, 10, 12, 3)
    for b in range(16):
        kw = sorted(toks[b, pos[b]])
        assert mask[b, pos[b]].all() and (toks[b][mask[b]] < 3).sum() == 2
        assert y[b] == kw[1] * (kw[1] + 1) // 2 + kw[0]


def test_drrl_rank_quick(tmp_path):
    out = tmp_path / "res"
    proc = _run("drrl_rank.py", out, tmp_path)
    assert "| planted rank |" in proc.stdout and "reproduce:" in proc.stdout
    res = json.loads((out / "drrl_rank.json").read_text())
    assert (out / "drrl_rank.png").stat().st_size > 0
    acts = res["actions"]
    for b in res["buckets"]:
        assert min(acts) <= b["policy_rank"] <= max(acts) and min(acts) <= b["oracle_rank"] <= max(acts)
        assert 1.0 <= b["eff_entropy_q"] <= res["config"]["dim"] and b["energy90_q"] <= b["energy99_q"]
    pv = res["policy_vs_fixed"]
    assert pv["oracle_mean_reward"] >= pv["policy_mean_reward"] - 1e-6
    assert pv["oracle_mean_reward"] >= pv["fixed_mean_reward"] - 1e-6
    assert res["timing_ms"]["full_attention (limit)"]["ratio_to_limit"] == 1.0
    dg = res["diagnosis"]
    assert dg["mean_gap_oracle_vs_rank_r_max"] >= -1e-6 and dg["mean_gap_oracle_vs_second_best"] >= -1e-6
