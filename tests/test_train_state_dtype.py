"""catapult-train --state-dtype fp32|bf16|int8 (how catapult's optimizers store their state,
Grokfast's EMA included) and --dtype fp32|bf16 (the params'): what the checkpoint holds, a
resume bit for bit, the option kept on resume, bad values refused in one line."""
import json
import math

import pytest
import torch

from catapult_kernels import int8_blocks
from catapult_kernels.train.cli import main
from catapult_kernels.train.config import TrainConfig
from catapult_kernels.train.models import make_model
from catapult_kernels.train.param_dtype import with_param_dtype
from trainer_runs import assert_same_checkpoint, records, run_in

# the hidden layer's weight (64 x 4) spans two int8 blocks, the output's (2 x 64) a partial one
TINY = ["--task", "teacher-student", "--loss", "mse", "--n-train", "32", "--n-val", "16", "--input-dim", "4",
        "--width", "64", "--optimizer", "adamw", "--lr", "1e-2", "--weight-decay", "0.1", "--grokfast", "ema",
        "--log-every", "1", "--sharpness-iters", "5", "--quiet", "--no-plots"]


def test_int8_states_are_int8_codes_and_float32_scales_in_the_checkpoint(tmp_path):
    out, ckpt = run_in(tmp_path, "int8", TINY + ["--steps", "4", "--state-dtype", "int8"])
    assert json.loads((out / "config.json").read_text())["state_dtype"] == "int8"
    params = list(ckpt["model"].values())
    for i, p in enumerate(params):
        state = ckpt["optimizer"]["state"][i]
        for key in ("exp_avg", "exp_avg_sq", "grokfast_ema"):
            assert state[key].dtype == torch.int8 and state[key].shape == p.shape, key
            scales = state[f"{key}_scales"]
            assert scales.dtype == torch.float32 and scales.shape == (math.ceil(p.numel() / 128),), key
            assert scales.abs().max() > 0, key  # stepped: not the fresh zero blocks
    # the decoded moments are those of a float32 run, to the codes' resolution (bench/int8_maps: sqrt,
    # fourth root), not the same bits: the option reached the optimizer
    _, fp32 = run_in(tmp_path, "fp32", TINY + ["--steps", "4"])
    weight = fp32["optimizer"]["state"][0]
    assert weight["exp_avg"].dtype == torch.float32
    int8 = ckpt["optimizer"]["state"][0]
    decoded = int8_blocks.decode(int8["exp_avg"], int8["exp_avg_scales"], int8_blocks.map_of("exp_avgs"))
    assert not torch.equal(decoded, weight["exp_avg"])
    assert torch.allclose(decoded, weight["exp_avg"], rtol=0.1, atol=0.05 * weight["exp_avg"].abs().max())


def test_a_run_with_int8_states_resumes_bit_for_bit(tmp_path):
    int8 = TINY + ["--state-dtype", "int8", "--batch-size", "8"]
    whole, theirs = run_in(tmp_path, "whole", int8 + ["--steps", "6"])
    split, _ = run_in(tmp_path, "split", int8 + ["--steps", "3"])
    assert main(["--resume", "--out", str(split), "--steps", "6", "--quiet"]) == 0
    assert records(split) == records(whole)
    assert_same_checkpoint(split, theirs)


def test_a_resume_keeps_the_state_and_param_dtypes_the_run_began_with(tmp_path, capsys):
    out, _ = run_in(tmp_path, "r", TINY + ["--steps", "2", "--state-dtype", "int8", "--dtype", "bf16"])
    assert main(["--resume", "--out", str(out), "--steps", "4", "--state-dtype", "fp32"]) == 2
    assert "--state_dtype 'int8' -> 'fp32'" in capsys.readouterr().err.replace("state-dtype", "state_dtype")
    assert main(["--resume", "--out", str(out), "--steps", "4", "--dtype", "fp32"]) == 2
    assert "--dtype 'bf16' -> 'fp32'" in capsys.readouterr().err
    assert main(["--resume", "--out", str(out), "--steps", "4", "--quiet"]) == 0
    # a run from before the options existed computed with float32 params and states in their dtype
    assert (TrainConfig.from_dict({"task": "modular"}).dtype, TrainConfig.from_dict({}).state_dtype) == ("fp32", None)


def test_bf16_params_round_to_nearest_and_the_loss_stays_float32(tmp_path):
    cfg = TrainConfig(task="teacher-student", loss="mse", input_dim=4, width=64)
    full = make_model(cfg, 4, 2)
    model = with_param_dtype(make_model(cfg, 4, 2), "bf16")
    for (name, p), q in zip(model.named_parameters(), full.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.detach().to(torch.bfloat16)), name  # .to: nearest even
    assert model(torch.randn(3, 4)).dtype == torch.float32  # float32 inputs in, float32 outputs out
    out, ckpt = run_in(tmp_path, "bf16", TINY + ["--steps", "3", "--dtype", "bf16"])
    assert all(v.dtype == torch.bfloat16 for v in ckpt["model"].values())
    assert ckpt["optimizer"]["state"][0]["exp_avg"].dtype == torch.bfloat16  # the default: the params' dtype
    assert all(math.isfinite(r["loss"]) for r in records(out))
    _, mixed = run_in(tmp_path, "bf16-fp32-states", TINY + ["--steps", "3", "--dtype", "bf16", "--state-dtype", "fp32"])
    assert mixed["optimizer"]["state"][0]["exp_avg"].dtype == torch.float32


def test_a_sweep_passes_the_state_dtype_to_every_cell(tmp_path):
    out = tmp_path / "s"
    argv = ["sweep", "--widths", "64", "--lrs", "1e-2", "--seeds", "0", "1", "--steps", "2", "--state-dtype", "int8"]
    assert main(argv + [a for a in TINY if a not in ("--width", "64", "--lr", "1e-2")] + ["--out", str(out)]) == 0
    cells = sorted(out.glob("*/config.json"))
    assert len(cells) == 2 and all(json.loads(c.read_text())["state_dtype"] == "int8" for c in cells)


@pytest.mark.parametrize("args, message", [
    (["--state-dtype", "fp16"], "unknown state_dtype 'fp16'; choose one of: fp32, bf16, int8"),
    (["--dtype", "int8"], "unknown dtype 'int8'; choose one of: fp32, bf16"),
    (["--state-dtype", "int8", "--impl", "torch"], "--state-dtype sets how catapult's optimizers store their state"),
    (["--state-dtype", "int8", "--parallel", "fsdp"], "--state-dtype int8 blocks span a whole param"),
    (["--dtype", "bf16", "--amp", "bf16"], "--amp autocasts a float32 model"),
])
def test_bad_values_are_one_clear_line_before_anything_is_written(args, message, capsys, tmp_path):
    assert main(TINY + ["--steps", "2"] + args + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
