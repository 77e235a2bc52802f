"""A catapult-train run in a test's folder and what it wrote, shared by the trainer tests of
state storage and master weights."""
import json

import torch

from catapult_kernels.train.cli import main

UNTIMED = ("wall_s", "steps_per_s")  # the metrics that differ between identical runs


def run_in(tmp_path, name: str, argv: list) -> tuple:
    """(the run's folder, its checkpoint) after catapult-train argv --out tmp_path/name."""
    out = tmp_path / name
    assert main(argv + ["--out", str(out)]) == 0
    return out, torch.load(out / "checkpoint.pt", weights_only=True)


def records(out) -> list:
    """The run's metrics.jsonl records without the timings."""
    return [{k: v for k, v in json.loads(line).items() if k not in UNTIMED}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_checkpoint(out, theirs: dict) -> None:
    """The checkpoint in run folder `out` holds theirs' model and optimizer state, bit for bit
    and dtype for dtype."""
    ours = torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in theirs["model"].items():
        assert torch.equal(ours["model"][k], v), k
    for i, state in theirs["optimizer"]["state"].items():
        for k, v in state.items():
            mine = ours["optimizer"]["state"][i][k]
            assert mine.dtype == v.dtype and torch.equal(mine, v), (i, k)
