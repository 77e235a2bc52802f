"""--tensorboard: the run's metrics as TensorBoard events in <run folder>/tensorboard/ (the
`tensorboard` package's format, through torch.utils.tensorboard.SummaryWriter): every
number of each metrics.jsonl record as a scalar of the same name at the record's step, and
at the end the run's figures (its *.png) as images. `tensorboard --logdir <run or sweep
folder>` shows them. A resumed run purges the events of the steps it logs again, as it
truncates metrics.jsonl."""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Iterable, Optional

FOLDER = "tensorboard"


def require_tensorboard() -> None:
    """The package is there, or one clear line saying how to get it (checked before any work)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or catapult_kernels[tensorboard])") from None


class TensorBoardLog:
    """A SummaryWriter on run_folder/tensorboard; purge_step: the first step a resumed run logs."""

    def __init__(self, run_folder, purge_step: Optional[int] = None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(Path(run_folder) / FOLDER), purge_step=purge_step or None)
        self._close = weakref.finalize(self, self.writer.close)  # also on an error's way out: events are queued

    def add_record(self, record: dict) -> None:
        """Every int or float of a metrics record (not booleans, not the step itself) at its step;
        nan and inf as they are (metrics.jsonl writes them as null)."""
        step = record["step"]
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, step)

    def add_figures(self, pngs: Iterable[Path], step: int) -> None:
        """Each figure as an image named figures/<file stem>, at `step`."""
        from matplotlib.image import imread
        for png in sorted(pngs):
            self.writer.add_image(f"figures/{png.stem}", imread(png), step, dataformats="HWC")

    def close(self) -> None:
        self._close()
