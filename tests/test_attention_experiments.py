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
