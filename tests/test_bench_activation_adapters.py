"""Smoke test of experiments/bench_activation_adapters.py in --quick mode: every study runs, the
outputs are written and consistent (accuracies in [0, 1], drops = before - after, finite MSE curves,
ratios to LoRA and to the limit)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_activation_adapters_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_activation_adapters.py"), "--quick",
                           "--out", str(out), "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Multi-task merge by averaging" in proc.stdout and "reproduce:" in proc.stdout
    for f in ("bench_activation_adapters.json", "bench_activation_adapters.md", "bench_activation_adapters.png"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "bench_activation_adapters.json").read_text())
    mg = res["merge"]
    assert set(mg["methods"]) == {"lora@0.03", "flylora@0.03"} and mg["tasks"] == ["rot90", "rot180", "rot270"]
    assert mg["best"] == {"lora": "lora@0.03", "flylora": "flylora@0.03"}
    for name, r in mg["methods"].items():
        for t in mg["tasks"]:
            assert all(0.0 <= a <= 1.0 for a in r["before"][t] + r["after"][t]), name
        assert math.isclose(r["drop_mean"], r["before_mean"] - r["after_mean"], abs_tol=1e-9)
    # FlyLoRA trains only B (r x N per adapted kernel); LoRA trains A and B
    assert mg["methods"]["flylora@0.03"]["trainable"] == 32 * (256 + 256)
    assert mg["methods"]["lora@0.03"]["trainable"] == 8 * (64 + 256 + 256 + 256)
    nr = res["nera"]["methods"]
    assert nr["nera_r8"]["trainable"] == 256 * 8 * 8 + 256 * 8 + 256 + 8 * 256 + 1
    for r in nr.values():
        assert len(r["test_mse"]) == len(r["steps"]) and all(math.isfinite(v) and v >= 0 for v in r["test_mse"])
    tm = res["timing"]["methods"]
    assert "limit" in tm and math.isclose(tm["lora_r8"]["ratio_to_lora"], 1.0)
    assert all(r["median_ms"] > 0 and math.isclose(r["ratio_to_limit"], r["median_ms"] / tm["limit"]["median_ms"])
               for r in tm.values())
