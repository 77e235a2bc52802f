"""bench/int8_maps.py runs: a few steps of a tiny MLP into a tmp dir, so that the
measurement cannot rot; and its float32 AdamW is torch.optim.AdamW bit for bit, so the
int8 runs differ from the float32 one by the storage alone. ~10 s on a loaded 2-core
machine, mostly the subprocess's imports (torch, sklearn)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.int8_maps import HYPER, N_TRAIN, StoredAdamW, batch_order, loss_and_backward, make_model
from catapult_kernels.train.tasks import digits

ROOT = Path(__file__).parent.parent


def test_int8_maps_smoke(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.int8_maps", "--steps", "3", "--seeds", "2", "--width", "16",
                             "--snapshots", "1,3", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    [path] = tmp_path.iterdir()
    out = json.loads(path.read_text())
    assert out["benchmark"] == "int8_maps" and path.name.startswith("int8_maps-cpu-")
    moments = [r for r in out["rows"] if r["kind"] == "moments"]
    assert {r["step"] for r in moments} == {1, 3} and len(moments) == 2 * (3 + 3 + 4)
    for r in moments:
        assert r["direction_error"] >= 0 and 0 <= r["v_zero_m_nonzero"] <= 1, r
        if r["map_m"] == "fp32":
            assert r["m_error"] == 0.0
    training = [r for r in out["rows"] if r["kind"] == "training"]
    assert len(training) == 2 * 5
    assert all(r["ratio_to_fp32"] == 1.0 for r in training if r["map_m"] == "fp32")


def test_float32_storage_is_torch_adamw():
    data = digits(N_TRAIN, torch.Generator().manual_seed(0))
    theirs, ours = make_model(0, 16), make_model(0, 16)
    torch_opt = torch.optim.AdamW(theirs.parameters(), **HYPER)
    stored_opt = StoredAdamW(ours.parameters(), "fp32", "fp32")
    for idx in batch_order(0, 5):
        loss_and_backward(theirs, data, idx)
        torch_opt.step()
        loss_and_backward(ours, data, idx)
        stored_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(theirs.parameters(), ours.parameters()))
