"""Smoke test of experiments/bench_optim.py --quick (the full run is in the README / results)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"adam", "optax_galore", "galore_svd", "galore_eigh", "galore_randomized", "galore_subspace", "fira", "dct", "owlore"}


def test_bench_optim_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"), MPLBACKEND="Agg",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_optim.py"), "--quick", "--out",
                           str(out), "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "| method |" in proc.stdout and "reproduce:" in proc.stdout
    res = json.loads((out / "bench_optim.json").read_text())
    assert (out / "bench_optim.png").stat().st_size > 0
    for k in ("platform", "device_kind", "jax", "cpu_count"):
        assert k in res["device"]
    for w in res["mlp"].values():
        assert set(w["methods"]) == METHODS and w["limit_ms"] > 0
        assert abs(w["projected_moment_ratio"] - w["theoretical_r_over_d"]) < 1e-9
        for r in w["methods"].values():
            for k in ("normal_ms", "refresh_ms", "amortized_ms", "ratio_to_adam", "ratio_to_limit",
                      "state_bytes", "state_ratio_to_adam"):
                assert np.isfinite(r[k]) and r[k] > 0, k
        assert w["methods"]["galore_svd"]["state_bytes"] < w["methods"]["adam"]["state_bytes"]
    t = res["transformer"]["methods"]
    assert set(t) == METHODS
    for r in t.values():
        assert np.isfinite(r["final_eval_loss"]) and len(r["history"]["eval_loss"]) >= 2
    assert "targets" in res and "table_markdown" in res
    lw = res["layerwise"]                     # compiled step memory: per-layer GaLore vs plain GaLore and Adam
    assert set(lw) == {"mlp", "stacked_transformer"}
    for w in lw.values():
        assert {"adam", "galore", "galore_layerwise", "adam_layerwise"} <= set(w["methods"])
        assert all(r["peak_bytes"] > 0 for r in w["methods"].values())
    # (at these tiny shapes fixed overheads decide the temp; the full run's tables are in docs/bench_optim.md)
    for w in lw.values():
        assert w["methods"]["galore_layerwise"]["peak_bytes"] < w["methods"]["adam"]["peak_bytes"]
