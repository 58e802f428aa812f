"""Smoke run of experiments/mtlora_digits.py --quick (writes to a temp dir, never to results/)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mtlora_digits_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "mtlora_digits.py"), "--quick",
                           "--out", str(out), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "| method |" in proc.stdout and "limit: plain forward" in proc.stdout
    res = json.loads((out / "mtlora_digits.json").read_text())
    ms = res["methods"]
    assert set(ms) == {"heads_only", "shared_lora_r8", "mtlora", "full_ft"}
    # trainable counts: heads 3 x (256 x 10 + 10); LoRA r8 on fc1 (64x256), fc2 (256x256); MTLoRA adds 3 task
    # pairs of rank 4 on fc2; full fine-tuning trains every backbone weight
    heads = 3 * (256 * 10 + 10)
    assert ms["heads_only"]["params"] == heads
    assert ms["shared_lora_r8"]["params"] == heads + 8 * (64 + 256) + 8 * (256 + 256)
    assert ms["mtlora"]["params"] == ms["shared_lora_r8"]["params"] + 3 * 4 * (256 + 256)
    assert ms["mtlora"]["unused_params"] == 8 * (256 + 256)
    assert ms["full_ft"]["params"] == heads + 64 * 256 + 256 + 256 * 256 + 256
    for r in ms.values():
        assert 0.0 <= r["mean_task_acc"] <= 1.0 and len(r["test_acc_mean"]) == 3
    # merged inference = the training-time forward
    assert all(d < 1e-3 for d in res["merge_check_max_abs_logit_diff"].values()), res["merge_check_max_abs_logit_diff"]
    t = res["timing"]
    assert t["limit: plain forward"]["median_ms"] > 0 and t["limit: 3-stream forward"]["median_ms"] > 0
    assert all(t[n]["median_ms"] > 0 and t[f"{n} (merged)"]["median_ms"] > 0 for n in ms)
    assert (out / "mtlora_digits.png").stat().st_size > 0 and (out / "mtlora_digits.md").read_text().startswith("|")
