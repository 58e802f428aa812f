"""Smoke run of experiments/bench_multi_adapter.py --quick (writes to a temp dir, never to results/)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_multi_adapter_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_multi_adapter.py"), "--quick",
                           "--out", str(out), "--no-progress", "--repeats", "1", "--warmup", "0",
                           "--mb-steps", "5", "--signatures", "1", "--layers", "1", "--adapters", "3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "| method |" in proc.stdout and "Hot-Swap MarkBoard" in proc.stdout
    res = json.loads((out / "bench_multi_adapter.json").read_text())
    b = res["batch"]
    want = {"bank", "one_adapter", "loop", "loop_split", "masked_packed", "base"}
    assert want <= set(b["train"]) and want <= set(b["infer"])
    assert all(b[k][m]["median_ms"] > 0 for k in ("train", "infer") for m in want)
    assert b["check"]["bank_vs_loop_max_abs"] < 1e-4 and b["check"]["packed_vs_loop_max_abs"] < 1e-4
    assert b["swaps"]["compile_cache_entries_after_3_swaps"] == 1
    if importlib.util.find_spec("peft") is not None:
        assert b["peft"]["available"] and b["peft"]["max_abs_diff_vs_bank"] < 1e-4
    m = res["markboard"]
    assert m["branches"] == 2 * m["bits"] and m["n_signatures"] == 1 and 0.0 <= m["bit_accuracy"] <= 1.0
    assert (out / "bench_multi_adapter.png").stat().st_size > 0
