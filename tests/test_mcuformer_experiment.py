"""Smoke run of experiments/mcuformer_digits.py --quick (writes to a temp dir, never to results/)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mcuformer_digits_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "mcuformer_digits.py"), "--quick",
                           "--out", str(out), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "| budget (KiB) | arm |" in proc.stdout and "limit: largest subnet" in proc.stdout
    res = json.loads((out / "mcuformer_digits.json").read_text())
    lim = res["limit"]["memory"]
    ok = [r for r in res["searches"] if "error" not in r]
    assert {(r["budget_frac"], r["arm"]) for r in ok} >= {(1.0, "rank"), (1.0, "no_rank")}
    for r in ok:
        assert r["memory"] <= r["budget"] + 1e-9 and 0.0 <= r["val_acc"] <= 1.0
        assert r["distinct_measured"] <= 8 and r["scored"] <= r["distinct_measured"]  # 8 specs in the quick space
        if r["arm"] == "no_rank":
            assert r["best"]["rank_ratio"] == 1.0
    # the loose budget admits the largest plain subnet; a lower rank ratio needs less memory (deployed form)
    assert res["smallest"]["memory"] < lim and res["memory_compiles"] <= 8
    assert (out / "mcuformer_digits.png").stat().st_size > 0 and (out / "mcuformer_digits.md").read_text().startswith("|")
