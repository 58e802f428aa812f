"""Smoke run of experiments/dlrmamba_digits.py --quick (writes to a temp dir, never to results/)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dlrmamba_digits_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "dlrmamba_digits.py"), "--quick",
                           "--out", str(out), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "| model |" in proc.stdout and "1.00 (limit)" in proc.stdout
    res = json.loads((out / "dlrmamba_digits.json").read_text())
    r = res["results"]
    assert set(r) == {"teacher", "task", "logit_kd", "state_kd", "teacher_gap"}
    # quick config: d_model 8, d_inner 8, N 4, dt_rank 1, one block, student rank 2 on in/x/out_proj and A_log
    dense = 8 * 16 + 4 * 8 * 9 + 8 * 8 + 4 * 8 * 4
    low = 2 * (8 + 16) + 4 * 2 * (8 + 9) + 2 * (8 + 8) + 4 * 2 * (8 + 4)
    assert r["teacher"]["params"] - r["task"]["params"] == dense - low
    assert r["task"]["params"] == r["logit_kd"]["params"] == r["state_kd"]["params"]
    for arm in ("task", "logit_kd", "state_kd"):
        assert 0.0 <= r[arm]["acc_mean"] <= 1.0 and r[arm]["state_err_mean"] >= 0.0
    t = res["timing"]
    assert all(t[k]["median_ms"] > 0 for k in ("limit: teacher step", "student task step", "student distill step"))
    assert (out / "dlrmamba_digits.png").stat().st_size > 0 and (out / "dlrmamba_digits.md").read_text().startswith("|")
