"""bench/muon_step.py runs: the tiniest sizes and one rep into a tmp dir, so that the
benchmark cannot rot. A few seconds, mostly the imports."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_muon_step_smoke(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.muon_step", "--gpt2", "1x8", "--mlp", "2x8",
                             "--small", "3x4", "--ns-dims", "4,8", "--ns-batch", "2", "--reps", "1",
                             "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    [path] = tmp_path.iterdir()
    out = json.loads(path.read_text())
    assert out["benchmark"] == "muon_step" and out["torch"] and out["device"] and len(out["loadavg_after"]) == 3
    steps = {(r["case"], r["optimizer"]): r for r in out["rows"] if r["kind"] == "step"}
    cases = ("GPT-2 1 blocks x d=8", "MLP 2 hidden x 8x8", "3 x 4x4")
    assert set(steps) == {(c, o) for c in cases for o in ("torch.optim.Muon", "catapult Muon")}
    assert [steps[(c, "torch.optim.Muon")]["n_matrices"] for c in cases] == [4, 2, 3]
    ns = {(r["dim"], r["variant"]): r for r in out["rows"] if r["kind"] == "newton_schulz"}
    variants = ("torch per-matrix (bfloat16)", "catapult batched (bfloat16)", "batched chain (float32)")
    assert set(ns) == {(d, v) for d in (4, 8) for v in variants}
    assert ns[(4, variants[0])]["batch"] == 2 and ns[(8, variants[0])]["batch"] == 1  # the largest: half
    for r in out["rows"]:
        assert r["median_ms"] > 0 and r["speedup_vs_torch"] > 0 and len(r["rep_ms"]) == 1, r
    for d in (4, 8):
        assert ns[(d, variants[0])]["rel_distance_from_torch_bf16"] == 0.0
        assert 0.0 < ns[(d, variants[2])]["rel_distance_from_torch_bf16"] < 0.1  # float32 vs bfloat16 rounding
