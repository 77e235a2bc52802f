"""bench/state_dtype.py runs: the tiniest case, one rep and one training step of a tiny MLP
(float32 params with int8 states; bfloat16 params with int8 states and "ecc") into a tmp
dir, so that the benchmark cannot rot; a peer missing from --peers is recorded as such.
About 18 s on 2 cores at load 3, mostly the imports of the benchmark and of its two
subprocesses (torch, and torch.optim's first step importing dynamo)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.state_dtype import HYPER, TRAIN_OPTIMIZERS, peer_state_bytes, step_bytes_per_param
from catapult_kernels.optim import AdamW

ROOT = Path(__file__).parent.parent


def test_state_dtype_smoke(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.state_dtype", "--cases", "1x16", "--reps", "1",
                             "--mlp", "2x16", "--batch", "4", "--train-steps", "1", "--threads", "1",
                             "--optimizers", "catapult_int8,bf16_catapult_int8_ecc,bnb_8bit",
                             "--peers", str(tmp_path / "no-peers"),
                             "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    [path] = (tmp_path / "out").iterdir()
    out = json.loads(path.read_text())
    assert out["benchmark"] == "state_dtype" and path.name.startswith("state_dtype-cpu-") and out["threads"] == 1
    assert set(out["loadavg"]) == {"start", "after_step_times", "end"}
    steps = {(r["param_dtype"], r["optimizer"], r["state_dtype"], r["master_weights"]): r
             for r in out["rows"] if r["kind"] == "step"}
    moved = {k: r["bytes_per_param"] for k, r in steps.items()}
    assert moved == {("float32", "torch AdamW(fused=True)", "float32", None): 28,
                     ("float32", "catapult AdamW", "float32", None): 28,
                     ("float32", "catapult AdamW", "bfloat16", None): 20,
                     ("float32", "catapult AdamW", "int8", None): 16.125,
                     ("bfloat16", "torch AdamW(fused=True)", "bfloat16", None): 14,
                     ("bfloat16", "catapult AdamW", "bfloat16", None): 14,
                     ("bfloat16", "catapult AdamW", "int8", None): 10.125,
                     ("bfloat16", "catapult AdamW", "bfloat16", "fp32"): 20,
                     ("bfloat16", "catapult AdamW", "bfloat16", "ecc"): 16,
                     ("bfloat16", "catapult AdamW", "bfloat16", "stochastic"): 14}
    for (_, _, state, master), r in steps.items():
        assert r["n_params"] == 16 * 16 + 16 and r["median_ms"] > 0 and r["roof_gbs"] > 0, r
        assert r["speedup_vs_baseline"] > 0 and r["speedup_vs_float32"] > 0, r
        # int8: a code per element and state, a float32 scale per block: 2 + 1 blocks per state, 2 states
        assert r["state_bytes_per_param"] == pytest.approx(
            {"float32": 8, "bfloat16": 4, "int8": 2 + 4 * 3 * 2 / 272}[state]
            + {None: 0, "fp32": 4, "ecc": 1, "stochastic": 0}[master]), r
    assert steps[("float32", "catapult AdamW", "float32", None)]["speedup_vs_float32"] == 1
    ours, lean, bnb = (r for r in out["rows"] if r["kind"] == "train_step")
    assert ours["optimizer"] == "catapult AdamW, int8 states" and "error" not in ours, ours
    assert (ours["param_dtype"], ours["master_weights"]) == ("float32", None), ours
    assert ours["n_params"] == 2 * (16 * 16 + 16) and ours["params_finite"] and ours["median_step_ms"] > 0
    assert ours["state_bytes_per_param"] == pytest.approx(2 + 4 * 6 * 2 / 544)  # 6 blocks per state
    assert lean["optimizer"] == "catapult AdamW, int8 states" and "error" not in lean, lean
    assert (lean["param_dtype"], lean["master_weights"]) == ("bfloat16", "ecc"), lean
    assert lean["n_params"] == 2 * (16 * 16 + 16) and lean["params_finite"] and lean["median_step_ms"] > 0
    assert lean["state_bytes_per_param"] == pytest.approx(2 + 4 * 6 * 2 / 544 + 1)  # and a correction each
    if importlib.util.find_spec("bitsandbytes") is None:  # the project's environment does not install it
        assert bnb["error"].startswith(f"bitsandbytes is in neither {tmp_path / 'no-peers'} nor"), bnb


def test_step_bytes_per_param():
    assert step_bytes_per_param(torch.float32, None) == 28
    assert step_bytes_per_param(torch.float32, torch.bfloat16) == 20
    assert step_bytes_per_param(torch.float32, torch.int8) == 16.125
    assert step_bytes_per_param(torch.bfloat16, torch.int8) == 10.125
    # bfloat16 params and states: the float32 copy read and written, the param only written
    assert step_bytes_per_param(torch.bfloat16, None, "fp32") == 20
    assert step_bytes_per_param(torch.bfloat16, None, "ecc") == 16  # the param and its correction each way
    assert step_bytes_per_param(torch.bfloat16, None, "stochastic") == 14
    assert step_bytes_per_param(torch.bfloat16, torch.int8, "ecc") == 12.125


@pytest.mark.parametrize("key, state_bytes", [
    ("bf16_torch_fused", 4), ("bf16_catapult", 4), ("bf16_catapult_fp32_master", 8), ("bf16_catapult_ecc", 5),
    ("bf16_catapult_stochastic", 4), ("bf16_catapult_int8_ecc", 2 + 2 * 4 / 128 + 1)])
def test_bfloat16_training_contenders(key, state_bytes):
    """Each bfloat16 contender of the training step takes bfloat16 params and keeps the state
    its name says (the smoke test runs one of them in its subprocess)."""
    spec = TRAIN_OPTIMIZERS[key]
    p = torch.nn.Parameter(torch.ones(4, 128, dtype=spec.param_dtype))
    p.grad = torch.full_like(p, 0.5)
    opt = spec.load()([p], **HYPER)
    opt.step()
    assert spec.param_dtype == torch.bfloat16 and p.dtype == torch.bfloat16
    assert getattr(opt, "master_weights", None) == spec.master_weights
    assert (opt.state_bytes() if isinstance(opt, AdamW) else peer_state_bytes(opt)) == pytest.approx(state_bytes)


def test_peer_state_bytes_counts_a_shared_tensor_once():
    params = [torch.nn.Parameter(torch.zeros(4, 8)) for _ in range(2)]
    for p in params:
        p.grad = torch.ones_like(p)
    ours = AdamW(params, state_dtype=torch.bfloat16)
    ours.step()
    assert peer_state_bytes(ours) == ours.state_bytes() == 4.0
    shared = torch.zeros(16)  # like bitsandbytes' code map, one tensor in every param's state
    for p in params:
        ours.state[p]["qmap"] = shared
    assert peer_state_bytes(ours) == 4.0 + 16 * 4 / 64
