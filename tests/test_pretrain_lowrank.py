"""Smoke run of experiments/pretrain_lowrank.py --quick (a subset of the arms, to keep it short): every
arm trains, the step times have their ratio to the dense step, the targets and claims are decided, and the
json/md/png outputs are written."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_lowrank_quick(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # + dense (always); the NOBLE/low-rank/BitNet arms run the same code path as these (the full run has them all)
    arms = "sltrain,hgf"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "pretrain_lowrank.py"), "--quick", "--arms", arms,
                           "--out", str(out), "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"pretrain_lowrank failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    res = json.loads((out / "pretrain_lowrank.json").read_text())
    assert res["skipped"] == {}
    a = res["arms"]
    assert set(a) == {"dense"} | set(arms.split(","))
    assert a["dense"]["ratio_to_dense"] == 1.0
    for k, r in a.items():
        h = r["history"]
        assert r["step_ms"] > 0 and r["ratio_to_dense"] > 0 and r["param_bytes"] > 0 and r["opt_state_bytes"] > 0, k
        assert len(h["step"]) == res["config"]["steps"] and all(math.isfinite(v) for v in h["eval"]), k
        assert h["eval_step"][0] == 0 and h["eval_step"][-1] == res["config"]["steps"], k
        assert h["eval_wall_s"] == sorted(h["eval_wall_s"]), k
    # SLTrain holds no dense copy of the targeted kernels (zero-size placeholders): fewer parameter bytes than
    # dense, and its support is regenerated (not in any pytree)
    assert a["sltrain"]["param_bytes"] < a["dense"]["param_bytes"]
    assert a["sltrain"]["support_bytes_not_in_pytrees"] > 0
    # HGF adds its correction (a, b, g) to the dense model's parameters; its warmup multiplier is frozen
    assert a["hgf"]["trainable_params"] == a["dense"]["trainable_params"] + a["hgf"]["adapter_params"]
    assert isinstance(a["sltrain"]["meets_target"], bool) and a["sltrain"]["target_ratio"] == 1.3
    assert a["sltrain"]["meets_target"] == (a["sltrain"]["ratio_to_dense"] <= 1.3)
    hi = res["hgf_inference"]["hgf"]
    assert 0 < hi["fraction"] == hi["packed_bytes"] / hi["float32_bytes"] and isinstance(hi["meets_target"], bool)
    assert res["claims"] == {}  # each claim needs its comparison arms (pure low-rank, BitNet), not run here
    md = (out / "pretrain_lowrank.md").read_text()
    assert "| arm |" in md and "Reproduce:" in md
    assert (out / "pretrain_lowrank.png").stat().st_size > 0
