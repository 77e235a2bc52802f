"""bench/distributed_step.py runs: a smoke run under torchrun on 2 gloo ranks with the
tiniest models and one rep, so that the benchmark cannot rot. About 10 s here, nearly all
of it torchrun's start and the imports on two ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_distributed_step_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "bench.distributed_step", "--sizes", "2K", "--tensors", "4x64", "--reps", "1",
                             "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    [path] = tmp_path.iterdir()  # rank 0 alone writes
    out = json.loads(path.read_text())
    assert out["world_size"] == 2
    rows = {(r["case"], r["optimizer"]): r for r in out["rows"]}
    optimizers = {"torch AdamW(fused=True) + clip_grad_norm_", "torch AdamW(foreach=True) + clip_grad_norm_",
                  "catapult AdamW(max_grad_norm=1.0)"}
    assert set(rows) == {(case, name) for case in ("MLP 2K", "4x64 elements") for name in optimizers}
    for (case, name), r in rows.items():
        assert r["median_ms"] > 0 and r["vs_catapult"] > 0 and len(r["rep_ms"]) == 1, (case, name)
        assert r["collectives_total"] == sum(r["collectives"].values()) >= 1, (case, name)
        if name.startswith("catapult"):  # the global norm: one all-reduce of the mesh, no host sync
            assert r["collectives"] == {"c10d_functional.all_reduce": 1} and r["host_syncs"] == 0, (case, r)
