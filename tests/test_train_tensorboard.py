"""catapult-train --tensorboard: metrics.jsonl's numbers as TensorBoard scalars at their steps
and the figures as images, in <out>/tensorboard, read back with tensorboard's own
EventAccumulator; a resume replaces the events of the steps it logs again; --overwrite
replaces the folder; a missing package is one clear line."""
import builtins
import json

import pytest

from catapult_kernels.train.cli import main

pytest.importorskip("tensorboard")  # a dev requirement: present in CI
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = ["--task", "teacher-student", "--loss", "mse", "--n-train", "32", "--n-val", "16", "--input-dim", "4",
        "--width", "16", "--optimizer", "sgd", "--lr", "0.05", "--log-every", "2", "--sharpness-every", "3",
        "--sharpness-iters", "5", "--quiet", "--tensorboard"]


def _events(out) -> EventAccumulator:
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def _assert_scalars_are_the_metrics(out) -> None:
    """Every number of every record, at its step, as float32 holds it; nothing else."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    want = {}
    for r in records:
        for name, value in r.items():
            if name != "step" and value is not None:
                want.setdefault(name, []).append((r["step"], value))
    events = _events(out)
    assert sorted(events.Tags()["scalars"]) == sorted(want)
    for name, points in want.items():
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in points], name
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), name  # float32 in the events


def test_the_scalars_are_the_metrics_and_the_figures_are_images(tmp_path):
    out = tmp_path / "r"
    assert main(TINY + ["--steps", "6", "--out", str(out)]) == 0
    _assert_scalars_are_the_metrics(out)
    assert {"loss", "val_loss", "sharpness", "lr", "grad_norm", "weight_norm"} <= set(_events(out).Tags()["scalars"])
    [image] = _events(out).Images("figures/curves")
    assert image.step == 6 and image.width > 100 and image.height > 100
    assert json.loads((out / "config.json").read_text())["tensorboard"] is True


def test_a_resume_replaces_the_events_of_the_steps_it_logs_again(tmp_path):
    """Stopped at step 4 with a checkpoint, the run had logged step 4 already: the resumed run
    logs it again, and the events hold each step once, as metrics.jsonl does."""
    out = tmp_path / "r"
    assert main(TINY + ["--steps", "4", "--no-plots", "--out", str(out)]) == 0
    assert main(["--resume", "--steps", "8", "--quiet", "--out", str(out)]) == 0
    _assert_scalars_are_the_metrics(out)
    assert [e.step for e in _events(out).Scalars("loss")] == [0, 2, 3, 4, 6, 8]  # step 4 once


def test_it_can_be_switched_on_for_a_resumed_run_and_overwrite_replaces_the_events(tmp_path):
    out = tmp_path / "r"
    assert main([a for a in TINY if a != "--tensorboard"] + ["--steps", "4", "--no-plots", "--out", str(out)]) == 0
    assert not (out / "tensorboard").exists()
    assert main(["--resume", "--steps", "6", "--tensorboard", "--quiet", "--out", str(out)]) == 0
    assert [e.step for e in _events(out).Scalars("loss")] == [4, 6]  # from where it resumed
    assert main(TINY + ["--steps", "2", "--no-plots", "--overwrite", "--out", str(out)]) == 0
    assert len(list((out / "tensorboard").iterdir())) == 1  # the old run's events went with it
    _assert_scalars_are_the_metrics(out)


def test_a_missing_package_is_one_clear_line(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *a, **kw):
        if name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert main(TINY + ["--steps", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--tensorboard needs the tensorboard package: pip install tensorboard" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
