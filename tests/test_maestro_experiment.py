"""Smoke run of experiments/maestro_digits.py --quick (writes to a temp dir, never to results/)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_maestro_digits_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "maestro_digits.py"), "--quick",
                           "--out", str(out), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "| rank r" in proc.stdout and "limit: dense step" in proc.stdout
    res = json.loads((out / "maestro_digits.json").read_text())
    assert set(res["arms"]) == {"dense (post-hoc SVD)", "maestro+lasso"}
    assert res["ranks"] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    # factorized counts: sum_i min(r, d_i) (in_i + out_i) + biases
    bias = 256 + 256 + 10
    assert res["params_at_rank"][0] == 64 + 256 + 256 + 256 + 256 + 10 + bias
    assert res["params_at_rank"][-1] == 64 * (64 + 256) + 256 * 512 + 10 * 266 + bias
    assert res["dense_params"] == 64 * 256 + 256 * 256 + 256 * 10 + bias
    for a in res["arms"].values():
        assert len(a["acc_mean"]) == 9 and all(0.0 <= v <= 1.0 for v in a["acc_mean"])
    # the dense arm at full rank is the dense model itself (SVD is exact): trained well above chance
    assert res["arms"]["dense (post-hoc SVD)"]["acc_mean"][-1] > 0.5
    sh = res["shrink"]["by_seed"][0]
    assert len(sh["ranks"]) == 3 and all(1 <= r <= d for r, d in zip(sh["ranks"], (64, 256, 10)))
    t = res["timing"]
    assert t["limit: dense step"]["median_ms"] > 0 and t["maestro step"]["median_ms"] > 0
    assert res["step_ratio"] > 0
    assert (out / "maestro_digits.png").stat().st_size > 0 and (out / "maestro_digits.md").read_text().startswith("|")
