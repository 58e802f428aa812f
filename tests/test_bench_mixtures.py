"""Smoke run of experiments/bench_mixtures.py --quick: every section runs and writes its outputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_mixtures_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_mixtures.py"), "--quick", "--out",
                           str(out), "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench_mixtures failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "| method |" in proc.stdout
    res = json.loads((out / "bench_mixtures.json").read_text())
    ms = res["steps"]["methods"]
    assert {"mixture", "mixture_hetero", "lora", "remix", "limit"} <= set(ms)
    assert all(r["median_ms"] > 0 and r["ratio_to_lora"] > 0 for r in ms.values())
    assert isinstance(ms["mixture"]["meets_target"], bool)
    dg = res["digits"]["methods"]
    assert set(dg) == {"softmax_top2", "remix", "lora"}
    for kind in ("softmax_top2", "remix"):
        lay = dg[kind]["runs"][0]["layers"]
        for n in ("fc1", "fc2", "out"):
            assert 1.0 <= lay[n]["ess_pi_entropy"] <= res["digits"]["experts"] + 1e-4
            assert abs(sum(lay[n]["usage"]) - 1.0) < 1e-5
    # ReMix's active gates are constant (omega = 1/k): their effective support is exactly k
    assert all(abs(v - 2.0) < 1e-4 for v in dg["remix"]["ess_gates_entropy"].values())
    fm = res["flexmore"]
    assert all(0.0 <= fm["acc"][d][str(r)] <= 1.0 for d in fm["domains"] for r in fm["ranks"])
    assert (out / "bench_mixtures.png").stat().st_size > 0
    assert (out / "bench_mixtures.md").read_text().startswith("**Training step**")
