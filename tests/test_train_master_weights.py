"""catapult-train --master-weights fp32|ecc|stochastic (with --dtype bf16): what the checkpoint
holds, a resume bit for bit, and the combinations refused in one line."""
import json

import pytest
import torch

from catapult_kernels.train.cli import main
from catapult_kernels.train.config import TrainConfig

TINY = ["--task", "teacher-student", "--loss", "mse", "--n-train", "32", "--n-val", "16", "--input-dim", "4",
        "--width", "64", "--optimizer", "adamw", "--lr", "1e-2", "--weight-decay", "0.1", "--dtype", "bf16",
        "--batch-size", "8", "--log-every", "1", "--sharpness-iters", "5", "--quiet", "--no-plots"]
UNTIMED = ("wall_s", "steps_per_s")
KEYS = {"fp32": ("master", torch.float32), "ecc": ("master_ecc", torch.int8), "stochastic": ("rounding_counter", torch.int64)}


def _run(tmp_path, name: str, argv: list):
    out = tmp_path / name
    assert main(argv + ["--out", str(out)]) == 0
    return out, torch.load(out / "checkpoint.pt", weights_only=True)


def _records(out) -> list:
    return [{k: v for k, v in json.loads(line).items() if k not in UNTIMED}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["fp32", "ecc", "stochastic"])
def test_a_run_with_master_weights_keeps_them_and_resumes_bit_for_bit(tmp_path, mode):
    argv = TINY + ["--master-weights", mode]
    whole, theirs = _run(tmp_path, "whole", argv + ["--steps", "6"])
    assert json.loads((whole / "config.json").read_text())["master_weights"] == mode
    key, dtype = KEYS[mode]
    for i, p in enumerate(theirs["model"].values()):
        state = theirs["optimizer"]["state"][i]
        assert p.dtype == torch.bfloat16 and state[key].dtype == dtype, (i, key)
        assert state[key].shape == (() if mode == "stochastic" else p.shape)
    split, _ = _run(tmp_path, "split", argv + ["--steps", "3"])
    assert main(["--resume", "--out", str(split), "--steps", "6", "--quiet"]) == 0
    assert _records(split) == _records(whole)
    ours = torch.load(split / "checkpoint.pt", weights_only=True)
    for k, v in theirs["model"].items():
        assert torch.equal(ours["model"][k], v), k
    for i, state in theirs["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(ours["optimizer"]["state"][i][k], v), (i, k)


def test_master_weights_change_the_run_and_are_kept_on_resume(tmp_path, capsys):
    rn, rn_ckpt = _run(tmp_path, "rn", TINY + ["--steps", "3"])
    ecc, ecc_ckpt = _run(tmp_path, "ecc", TINY + ["--steps", "3", "--master-weights", "ecc"])
    assert "master_ecc" not in rn_ckpt["optimizer"]["state"][0]
    assert _records(rn)[0] == _records(ecc)[0]  # the same start; then the corrections make a difference
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
    _, ckpt = _run(tmp_path, "lamb", argv + ["--steps", "3"])
    state = ckpt["optimizer"]["state"][0]
    assert state["exp_avg"].dtype == torch.int8 and state["master_ecc"].dtype == torch.int8
    assert state["master_ecc"].abs().max() > 0  # corrections were written
