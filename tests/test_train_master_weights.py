"""catapult-train --master-weights fp32|ecc|stochastic (with --dtype bf16): what the checkpoint
holds, a resume bit for bit, and the combinations refused in one line."""
import json

import pytest
import torch

from catapult_kernels.train.cli import main
from catapult_kernels.train.config import TrainConfig
from trainer_runs import assert_same_checkpoint, records, run_in

TINY = ["--task", "teacher-student", "--loss", "mse", "--n-train", "32", "--n-val", "16", "--input-dim", "4",
        "--width", "64", "--optimizer", "adamw", "--lr", "1e-2", "--weight-decay", "0.1", "--dtype", "bf16",
        "--batch-size", "8", "--log-every", "1", "--sharpness-iters", "5", "--quiet", "--no-plots"]
KEYS = {"fp32": ("master", torch.float32), "ecc": ("master_ecc", torch.int8), "stochastic": ("rounding_counter", torch.int64)}


@pytest.mark.parametrize("mode", ["fp32", "ecc", "stochastic"])
def test_a_run_with_master_weights_keeps_them_and_resumes_bit_for_bit(tmp_path, mode):
    argv = TINY + ["--master-weights", mode]
    whole, theirs = run_in(tmp_path, "whole", argv + ["--steps", "6"])
    assert json.loads((whole / "config.json").read_text())["master_weights"] == mode
    key, dtype = KEYS[mode]
    for i, p in enumerate(theirs["model"].values()):
        state = theirs["optimizer"]["state"][i]
        assert p.dtype == torch.bfloat16 and state[key].dtype == dtype, (i, key)
        assert state[key].shape == (() if mode == "stochastic" else p.shape)
    split, _ = run_in(tmp_path, "split", argv + ["--steps", "3"])
    assert main(["--resume", "--out", str(split), "--steps", "6", "--quiet"]) == 0
    assert records(split) == records(whole)
    assert_same_checkpoint(split, theirs)


def test_master_weights_change_the_run_and_are_kept_on_resume(tmp_path, capsys):
    rn, rn_ckpt = run_in(tmp_path, "rn", TINY + ["--steps", "3"])
    ecc, ecc_ckpt = run_in(tmp_path, "ecc", TINY + ["--steps", "3", "--master-weights", "ecc"])
    assert "master_ecc" not in rn_ckpt["optimizer"]["state"][0]
    assert records(rn)[0] == records(ecc)[0]  # the same start; then the corrections make a difference
    assert any(not torch.equal(rn_ckpt["model"][k], v) for k, v in ecc_ckpt["model"].items())
    assert main(["--resume", "--out", str(ecc), "--steps", "4", "--master-weights", "fp32"]) == 2
    assert "'ecc' -> 'fp32'" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (dict(master_weights="ecc"), "use it with --dtype bf16"),
    (dict(master_weights="ecc", dtype="bf16", impl="torch"), "use --impl catapult"),
    (dict(master_weights="ecc", dtype="bf16", parallel="fsdp"), "use --parallel ddp"),
    (dict(master_weights="kahan", dtype="bf16"), "master_weights 'kahan'"),
])
def test_combinations_without_master_weights_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(task="teacher-student", **options).validate()


def test_lamb_takes_int8_states_and_ecc_master_weights(tmp_path):
    argv = [a if a != "adamw" else "lamb" for a in TINY] + ["--state-dtype", "int8", "--master-weights", "ecc"]
    _, ckpt = run_in(tmp_path, "lamb", argv + ["--steps", "3"])
    state = ckpt["optimizer"]["state"][0]
    assert state["exp_avg"].dtype == torch.int8 and state["master_ecc"].dtype == torch.int8
    assert state["master_ecc"].abs().max() > 0  # corrections were written
