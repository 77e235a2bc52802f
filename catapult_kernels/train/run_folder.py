"""A run folder: config.json, metrics.jsonl, summary.json, curves.png and checkpoint.pt.
Files are replaced atomically (written beside, then renamed), and a folder that already
holds a run is refused unless the caller resumes it or asks to overwrite it."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "curves.png", "checkpoint.pt")


def _finite_or_none(x):
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def dumps(record: dict) -> str:
    return json.dumps({k: _finite_or_none(v) for k, v in record.items()}, allow_nan=False)


class RunFolder:
    def __init__(self, path, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        existing = [f for f in RUN_FILES if (self.path / f).exists()]
        if resume:
            if not (self.path / "checkpoint.pt").exists():
                raise ValueError(f"--resume: {self.path} has no checkpoint.pt to resume from")
        elif existing:
            if not overwrite:
                raise ValueError(f"{self.path} already holds a run ({', '.join(existing)}); "
                                 "pass --resume to continue it or --overwrite to replace it")
            for f in existing:  # only the run's own files: anything else in the folder stays
                (self.path / f).unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: dict) -> None:
        self._replace(name, lambda f: f.write(json.dumps(
            {k: _finite_or_none(v) for k, v in obj.items()}, indent=2, allow_nan=False) + "\n"), "w")

    def read_json(self, name: str) -> Optional[dict]:
        f = self.file(name)
        return json.loads(f.read_text()) if f.exists() else None

    def append_metrics(self, record: dict) -> None:
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        f = self.file("metrics.jsonl")
        return [json.loads(line) for line in f.read_text().splitlines() if line] if f.exists() else []

    def truncate_metrics(self, before_step: int) -> None:
        """Drop records of steps a resumed run will log again (they were written after the
        checkpoint it resumes from, and come back bit-identical)."""
        kept = [r for r in self.read_metrics() if r["step"] < before_step]
        self._replace("metrics.jsonl", lambda f: f.write("".join(dumps(r) + "\n" for r in kept)), "w")

    def save_checkpoint(self, state: dict) -> None:
        self._replace("checkpoint.pt", lambda f: torch.save(state, f), "wb")

    def load_checkpoint(self, map_location=None) -> dict:
        return torch.load(self.file("checkpoint.pt"), map_location=map_location, weights_only=False)

    def _replace(self, name: str, write, mode: str) -> None:
        tmp = self.file(name + ".tmp")
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, self.file(name))
