"""Smoke test of experiments/lragent.py --quick (1-layer model: the shared cache is exact at depth 0)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lragent_experiment_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "lragent.py"), "--quick", "--out", str(out),
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"lragent.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "| scheme |" in proc.stdout and "reproduce:" in proc.stdout
    res = json.loads((out / "lragent.json").read_text())
    assert (out / "lragent.png").stat().st_size > 0 and (out / "lragent.md").exists()
    for k in ("command", "device", "config", "loss", "cache_bytes", "prefill", "decode", "ratios", "checks",
              "table_markdown"):
        assert k in res, k
    c = res["checks"]
    assert c["shared_A_v_identical"] is True
    assert c["max_abs_logit_diff_functional_vs_CharTransformer"] < 1e-4
    assert c["max_abs_logit_diff_per_agent_vs_model"] < 1e-4
    assert c["max_abs_logit_diff_lragent_vs_per_agent_agent0"] < 1e-5   # agent 0 wrote the cache: exact
    # one layer: every agent's depth-0 hidden states are the embeddings, so LRAgent is exact for all agents
    assert res["config"]["n_layers"] == 1
    assert all(abs(g) < 1e-5 for g in (x - y for x, y in zip(res["loss"]["per_agent_mean"]["lragent"],
                                                                res["loss"]["per_agent_mean"]["per_agent"])))
    d, r, n = res["config"]["d_model"], res["config"]["rank"], res["config"]["agents"]
    ratio = res["cache_bytes_ratio"]
    assert abs(ratio["lragent"] - (2 * d + r) / (2 * d * n)) < 1e-9
    assert abs(ratio["fully_shared"] - 1 / n) < 1e-9 and ratio["per_agent"] == 1.0
    for k in ("base_limit", "per_agent", "lragent"):
        assert res["decode"][k]["median_ms"] > 0 and res["prefill"][k]["median_ms"] > 0
