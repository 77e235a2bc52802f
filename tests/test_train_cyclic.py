"""--schedule cyclic: a square wave between a peak and a trough in units of 2/lambda0, or of
2/(the sharpness re-measured at each cycle start); values by hand, the re-measured sharpness
used, a resumed run bit-identical, bad options refused in one line."""
import json

import pytest
import torch

from catapult_kernels.train import TrainConfig, run
from catapult_kernels.train.cli import main
from catapult_kernels.train.cyclic import cycle_level, cyclic_factor
from catapult_kernels.train.schedule import lr_factor

CYCLIC = dict(schedule="cyclic", lr="2/lambda0", cycle_peak=1.5, cycle_trough=0.5, cycle_period=5)  # c = 3: a catapult


def small(**kw) -> TrainConfig:
    base = dict(task="teacher-student", loss="mse", n_train=32, n_val=16, input_dim=4, width=32, depth=2,
                parametrization="ntk", bias=False, optimizer="sgd", steps=12, log_every=1, sharpness_iters=8,
                plots=False, **CYCLIC)
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(folder) -> list:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_levels_at_chosen_steps():
    # period 5: the peak for ceil(5/2) = 3 steps, the trough for 2
    assert [cycle_level(t, 3.0, 0.5, 5) for t in range(11)] == [3, 3, 3, .5, .5, 3, 3, 3, .5, .5, 3]
    assert [cycle_level(t, 2.0, 1.0, 4) for t in range(6)] == [2, 2, 1, 1, 2, 2]
    assert [cycle_level(t, 2.0, 1.0, 1) for t in range(3)] == [2, 2, 2]  # period 1: the peak throughout
    cfg = small()
    assert [lr_factor(t, cfg, 100) for t in (0, 2, 3, 4, 5, 9, 10)] == [1.5, 1.5, .5, .5, 1.5, .5, 1.5]


def test_sharpness_unit_divides_by_the_sharpness_at_the_cycle_start():
    measured = {0: 2.0, 5: 0.5, 10: 0.25}
    # the factor multiplies 2/lambda0 = 2/measured[0]: level * lambda0 / s
    assert cyclic_factor(0, 3.0, 0.5, 5, "sharpness", measured) == 3.0
    assert cyclic_factor(4, 3.0, 0.5, 5, "sharpness", measured) == 0.5
    assert cyclic_factor(6, 3.0, 0.5, 5, "sharpness", measured) == 3.0 * 4
    assert cyclic_factor(8, 3.0, 0.5, 5, "sharpness", measured) == 0.5 * 4
    assert cyclic_factor(12, 3.0, 0.5, 5, "sharpness", measured) == 3.0 * 8
    assert cyclic_factor(12, 3.0, 0.5, 5, "lambda0", measured) == 3.0  # lambda0: the measurements unused


@pytest.mark.parametrize("unit", ["lambda0", "sharpness"])
def test_a_run_takes_level_times_two_over_the_unit(tmp_path, unit):
    summary = run(small(cycle_unit=unit, sharpness_every=5), tmp_path / "r", quiet=True)
    records = read_metrics(tmp_path / "r")
    sharpness = {r["step"]: r["sharpness"] for r in records if "sharpness" in r}
    lambda0 = summary["lambda0"]
    assert sharpness[0] == lambda0  # the cycle-0 measurement is lambda0's
    for r in records:
        start = r["step"] - r["step"] % 5
        unit_value = lambda0 if unit == "lambda0" else sharpness[start]
        assert r["lr"] == pytest.approx(cycle_level(r["step"], 1.5, 0.5, 5) * 2 / unit_value, rel=1e-12), r["step"]
    if unit == "sharpness":  # the later cycles' sharpness moved, so their lrs did
        assert sharpness[5] != lambda0 and sharpness[10] != sharpness[5]
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["trackers"]["lr_sharpness"] == ({0: lambda0, 5: sharpness[5], 10: sharpness[10]}
                                                if unit == "sharpness" else {})


def test_resume_of_a_sharpness_unit_run_is_bit_identical(tmp_path):
    # no --sharpness-every: the cycle starts are measured for the schedule alone, and the
    # measurements before the split (steps 0 and 5) come back from the checkpoint
    from catapult_kernels.train.experiment import resolve_resume
    cfg = small(cycle_unit="sharpness", steps=14)
    whole = run(cfg, tmp_path / "whole", quiet=True)
    run(small(cycle_unit="sharpness", steps=7), tmp_path / "split", quiet=True)
    resumed = run(resolve_resume(tmp_path / "split", {"steps": 14}), tmp_path / "split", resume=True, quiet=True)
    assert read_metrics(tmp_path / "whole") == read_metrics(tmp_path / "split")
    a, b = (torch.load(tmp_path / f / "checkpoint.pt", weights_only=True) for f in ("whole", "split"))
    assert a["trackers"]["lr_sharpness"] == b["trackers"]["lr_sharpness"] and len(a["trackers"]["lr_sharpness"]) == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    timing = ("steps_per_s", "wall_s")
    assert {k: v for k, v in whole.items() if k not in timing} == {k: v for k, v in resumed.items() if k not in timing}


@pytest.mark.parametrize("change, message", [
    (dict(cycle_peak=None), "--schedule cyclic needs --cycle-peak, --cycle-trough"),
    (dict(cycle_period=0), "--cycle-period must be an integer >= 1, got 0"),
    (dict(cycle_period=2.5), "--cycle-period must be an integer >= 1, got 2.5"),
    (dict(cycle_peak=-1.0), "--cycle-peak must be a finite number > 0, got -1.0"),
    (dict(cycle_trough=0.0), "--cycle-trough must be a finite number > 0, got 0.0"),
    (dict(cycle_peak=float("inf")), "--cycle-peak must be a finite number > 0, got inf"),
    (dict(cycle_peak=0.5, cycle_trough=3.0), "--cycle-peak 0.5 is below --cycle-trough 3.0"),
    (dict(lr="1e-3"), "--schedule cyclic sets the lr to --cycle-peak/--cycle-trough x 2/lambda0: leave --lr out"),
    (dict(lr="3/lambda0"), "not --lr 3/lambda0"),
    (dict(warmup=3), "--warmup does not apply to --schedule cyclic"),
    (dict(cycle_unit="hessian"), "unknown cycle_unit 'hessian'; choose one of: lambda0, sharpness"),
    (dict(schedule="cosine", lr="1e-3"), "--cycle-peak applies to --schedule cyclic, not cosine"),
    (dict(schedule="constant", lr="1e-3", cycle_peak=None, cycle_trough=None, cycle_period=None,
          cycle_unit="sharpness"), "--cycle-unit applies to --schedule cyclic, not constant"),
])
def test_bad_options_are_refused(change, message):
    with pytest.raises(ValueError) as e:
        small(**change).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


CLI = ["--task", "teacher-student", "--loss", "mse", "--n-train", "16", "--n-val", "8", "--input-dim", "4",
       "--width", "16", "--parametrization", "ntk", "--no-bias", "--optimizer", "sgd", "--steps", "6",
       "--sharpness-iters", "5", "--quiet", "--no-plots", "--schedule", "cyclic", "--cycle-peak", "3",
       "--cycle-trough", "0.5", "--cycle-period", "4"]


def test_cli_records_the_lr_as_two_over_lambda0_and_refuses_another(tmp_path, capsys):
    assert main(CLI + ["--cycle-unit", "sharpness", "--out", str(tmp_path / "r")]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["lr"], config["cycle_unit"], config["cycle_period"]) == ("2/lambda0", "sharpness", 4)
    capsys.readouterr()
    assert main(CLI + ["--lr", "0.1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leave --lr out" in err and "not --lr 0.1" in err
    assert not (tmp_path / "bad").exists()  # refused before anything is made
    assert main(CLI + ["--cycle-period", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--cycle-period must be an integer >= 1, got 0" in capsys.readouterr().err


def test_a_cyclic_run_draws_its_cycles(tmp_path):
    run(small(plots=True, sharpness_every=5), tmp_path / "r", quiet=True)
    assert (tmp_path / "r" / "cyclic.png").stat().st_size > 0
