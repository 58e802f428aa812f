"""Smoke test of experiments/bench_adapters.py in --quick mode (a registry subset that covers every
code path: full fine-tuning, a plain reparam, frozen factors + a data-aware init + an lr-dependent
init (LoRA-SB), seed-regenerated bases (NOLA), a post-lr prox step (CoDyRA), an optimizer-side
variant with its own trainable count (LoRA-FA), and the PEFT side by side)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["full", "lora", "lora_sb", "nola", "codyra", "lora_fa"]


def test_bench_adapters_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_adapters.py"), "--quick", "--out", str(out),
                           "--no-progress", "--methods", *METHODS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| method | trainable params | best LR |" in proc.stdout and "reproduce:" in proc.stdout
    for f in ("bench_adapters.json", "bench_adapters.md", "pareto.png", "lr_sensitivity.png"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "bench_adapters.json").read_text())
    assert not [k for k, v in res["skipped"].items() if v.startswith("failed")], res["skipped"]
    assert res["device_start"]["load_avg"] is not None and res["reproduce"].startswith("python experiments/")
    rows = res["tasks"]["rot90"]
    assert list(rows) == METHODS
    n_lrs, seeds = res["config"]["n_lrs"], res["config"]["seeds"]
    for name, r in rows.items():
        assert len(r["acc"]) == n_lrs and all(len(a) == seeds for a in r["acc"]), name
        assert all(0.0 <= a <= 1.0 for row in r["acc"] for a in row), name
        assert r["best_acc"] == max(r["acc_mean"]) and r["best_lr"] in r["lrs"], name
        assert r["lr_spread_best_minus_worst"] >= r["lr_spread_best_minus_median"] >= 0, name
        assert r["trainable"] > 0, name
    # trainable counts follow the split: LoRA-SB trains only the r x r cores, LoRA-FA only B
    rank = res["config"]["rank"]
    dims = res["config"]["dims"]
    assert rows["lora_sb"]["trainable"] == 3 * rank * rank
    assert rows["lora_fa"]["trainable"] == rank * sum(dims[1:])
    assert rows["lora"]["trainable"] == rank * sum(a + b for a, b in zip(dims[:-1], dims[1:]))
    assert rows["full"]["trainable"] == sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    st = res["stats"]["rot90"]
    assert set(st["methods"]) == set(METHODS) - {"full"} and math.isfinite(st["across_methods_range"])
    tf = res["transformer"]
    assert set(tf["rows"]) == {"lora", "lora_sb"}, tf["rows"]
    for name, r in tf["rows"].items():
        assert "error" not in r and len(r["finetune_loss"]) == 3 and r["best_lr"] in r["lrs"], (name, r)
    assert tf["rows"]["lora_sb"]["trainable"] < tf["rows"]["lora"]["trainable"] < tf["model"]["params"]
    pf = res["peft"]
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("peft") is None:
        assert not pf["available"]  # the reference extra is not installed: the side-by-side is skipped
        return
    assert pf["available"] and pf["params_roundtrip_max_abs_diff"] == 0.0 and pf["forward_max_abs_diff"] < 1e-4
    assert {r["method"] for r in pf["rows"]} == {"lora", "lora_fa"} and len(pf["rows"]) == 2 * n_lrs
    assert all(0.0 <= r["acc_mean"] <= 1.0 and r["step_ms"] > 0 for r in pf["rows"])
    # same init, same batches, same math: PEFT and lrjax agree to within one test image where training is stable
    n_test = 359
    for r in pf["rows"]:
        if r["lr"] <= 1e-2:
            assert abs(r["acc_mean"] - r["lrjax_acc_mean"]) <= 1.0 / n_test + 1e-6, r
