"""Smoke tests of the EGGROLL experiment scripts in ``--quick`` mode."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _run(script, out, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--quick", "--out", str(out),
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_bench_es_quick(tmp_path):
    out = tmp_path / "res"
    proc = _run("bench_es.py", out, tmp_path)
    assert "| width | N | method |" in proc.stdout and "reproduce:" in proc.stdout
    res = json.loads((out / "bench_es.json").read_text())
    assert (out / "bench_es.png").stat().st_size > 0
    for k in ("command", "device", "config", "workloads", "digits", "table_markdown"):
        assert k in res, k
    assert {"platform", "device_kind", "cpu_count", "jax"} <= set(res["device"])
    w = res["workloads"][0]
    assert {"inference", "open_es", "eggroll_r4", "eggroll_r4_rad", "eggroll_r4_table", "eggroll_r4_regen",
            "eggroll_r4_eager", "limit_r4"} <= set(w["methods"])
    for m, r in w["methods"].items():
        assert r["median_ms"] > 0 and r["ratio_to_inference"] > 0 and r["memory_bytes"] > 0, m
        assert ("ratio_to_limit" in r) == m.startswith("eggroll"), m
        if m.startswith("eggroll"):
            lim = w["methods"]["limit_" + m.split("_")[1]]["median_ms"]
            assert r["ratio_to_limit"] == r["median_ms"] / lim, m
    assert "| / limit |" in res["table_markdown"] and "Hyperscale throughput" in res["table_markdown"]
    hs = res["hyperscale"]
    assert hs["config"] == "quick" and {"inference", "eggroll_r4", "table_r4", "pregen_r4"} == set(hs["methods"])
    for m, r in hs["methods"].items():
        assert r["percent_of_inference"] == 100.0 * hs["methods"]["inference"]["median_ms"] / r["median_ms"], m
    assert max(hs["check_rel_err"]) < 1e-5   # on-the-fly members equal the materialized W + sigma E_i
    h = res["digits"]["history"]
    assert len(h["test_acc"]) >= 2 and h["test_acc"][-1] > 0.2  # ES alone beats chance (0.1)


def test_es_lm_quick(tmp_path):
    out = tmp_path / "res"
    proc = _run("es_lm.py", out, tmp_path)
    assert "bigram model" in proc.stdout and "reproduce:" in proc.stdout
    res = json.loads((out / "es_lm.json").read_text())
    assert (out / "es_lm.png").stat().st_size > 0 and (out / "es_lm.md").stat().st_size > 0
    assert res["fallback"] == [] and res["factored_kernel_uses"] == 2    # conv and readout, factored
    b = res["baselines"]
    # on the same held-out characters: uniform > unigram > bigram model >= the pairs' own entropy
    assert np.log2(96) > b["unigram"] > b["bigram"] >= b["bigram_oracle"] > 0
    assert 3.0 < b["train_bigram_cond_entropy"] < b["train_unigram_entropy"] < 5.0
    h = res["history"]
    assert len(h["heldout"]) >= 2 and all(np.isfinite(h["heldout"]) & np.isfinite(h["train_fresh"]))
    assert h["train_shared"][0] is None and h["train_shared"][-1] is not None
    assert len(res["minibatch_member_mean_bpc"]) == res["generations_run"] == res["config"]["generations"]
