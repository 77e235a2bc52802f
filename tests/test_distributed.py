"""The optimizers under torch.distributed on CPU (gloo): each test launches one torchrun run
of a script in tests/distributed/ that checks many things against a single process computed
in the same script, and prints one CHECK line per check (from rank 0). A launch costs 4-9 s
here, so the checks are batched into four launches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

SCRIPTS = Path(__file__).parent / "distributed"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def torchrun(script: str, nproc: int, *args: str) -> dict:
    """Run the script on nproc ranks; its checks by name (it asserts them itself)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPTS)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={nproc}", str(SCRIPTS / script), *args],
                            capture_output=True, text=True, timeout=600, env=env, cwd=SCRIPTS)
    checks = {}
    for line in result.stdout.splitlines():
        if line.startswith("CHECK "):
            check = json.loads(line[len("CHECK "):])
            checks[check.pop("name")] = check
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return checks


def test_sharded_optimizers():
    """FSDP2 (uneven and empty shards) and tensor parallel (a replicated bias), every
    optimizer: the numbers of one process, no host sync, the expected all-reduces."""
    checks = torchrun("sharded_optimizers.py", 2)
    for name in ("SGD", "Adam", "AdamW", "Lion", "ADOPT", "Adan", "LAMB", "LARS"):
        for pipeline in ("plain", "clip+grokfast+agc", "skip_nonfinite+clip+grokfast"):
            assert f"fsdp/{name}/{pipeline}" in checks
        assert f"tp/{name}" in checks and f"skipped_step/{name}" in checks
    assert {"clip_grad_norm_/fsdp", "clip_grad_norm_/tp", "refusals",
            "grad_scaler/inf_on_one_rank", "swapped_shard"} <= set(checks)


def test_checkpoints_and_data_parallel(tmp_path):
    """DCP both ways between torch's and catapult's optimizers under FSDP2; DDP with
    no_sync() accumulation into bucket views; ZeRO-1 clipping by the norm of all parts."""
    checks = torchrun("checkpoints_and_data_parallel.py", 2, str(tmp_path))
    for name in ("AdamW", "Adam", "SGD"):
        assert {f"dcp/{name}/torch->catapult", f"dcp/{name}/catapult->torch"} <= set(checks)
    assert "ddp/AdamW/no_sync+bucket_view" in checks
    assert {"zero/AdamW/max_grad_norm", "zero/AdamW/max_grad_norm+skip_nonfinite"} <= set(checks)


def test_four_ranks():
    """HSDP (replicas counted once) and FSDP2 over tensor parallel on 2-D meshes."""
    checks = torchrun("four_ranks.py", 4)
    for name in ("AdamW", "LAMB", "LARS"):
        assert {f"hsdp/{name}", f"fsdp+tp/{name}"} <= set(checks)



def test_muon_across_ranks():
    """Muon on FSDP2 shards and under DDP (ns_group, no_sync accumulation): one process's
    params; each matrix orthogonalized once per step, by one rank, neither rank doing all."""
    checks = torchrun("muon_checks.py", 2)
    assert {"muon/fsdp", "muon/ddp+no_sync"} <= set(checks)
