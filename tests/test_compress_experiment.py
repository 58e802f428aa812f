"""Smoke test of experiments/bench_compress.py in --quick mode."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_compress_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_compress.py"), "--quick", "--out",
                           str(out), "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| c | svd | randomized | whitened | welore | uniform |" in proc.stdout and "reproduce:" in proc.stdout
    res = json.loads((out / "bench_compress.json").read_text())
    assert (out / "bench_compress.png").stat().st_size > 0 and (out / "bench_compress.md").stat().st_size > 0
    for key in ("digits", "lm"):
        methods = {r["method"] for r in res[key]["rows"]}
        assert {"svd", "randomized", "whitened", "welore", "uniform", "svd+ft", "pela", "welore+ft"} <= methods
        for r in res[key]["rows"]:
            assert 0 < r["bytes"] < res[key]["bytes"] and np_finite(r["metric"]), r
    rows = res["digits"]["rows"]  # other structures; DKM with its before value (digits only in quick mode)
    assert {"dsformer", "dsformer+stf", "pq", "lr2vq", "lr2vq+lr", "lr2vq+dkm"} <= {r["method"] for r in rows}
    dk = [r for r in rows if r["method"] == "lr2vq+dkm"][0]
    lr = [r for r in rows if r["method"] == "lr2vq+lr" and r["setting"] == dk["setting"]][0]
    assert dk["bytes"] == lr["bytes"] and dk["before"] == lr["metric"] and np_finite(dk["metric"])
    assert {"dsformer", "dsformer+stf", "lr2vq", "lr2vq+lr"} <= {r["method"] for r in res["lm"]["rows"]}
    assert res["table_markdown"].count("| dsformer | k=8, s=4 |") == 2 and "(before " in res["table_markdown"]
    assert all(v["median_ms"] > 0 for v in res["lm"]["timing"].values())
    assert len(res["lm"]["timing"]) == 6


def np_finite(x):
    return x == x and abs(x) != float("inf")
