"""Readable axis ticks at every scale: a handful of plain labels (0.002, 0.5, 300, 1e7: no
10^k, no offset, no x1e-5 in the corner) on linear, log and symlog axes, whether the axis
spans a factor of 1.01 or of 10^15. Imported by plots.py once matplotlib is set up."""
from __future__ import annotations

import math

from matplotlib import ticker

MOST_DECADES_LABELLED = 5  # over more decades, every k-th power of ten: labels of a few characters each


def plain(v: float, tol: float) -> str:
    """The shortest plain spelling of v within tol: fixed-point from 0.0001 to 99999, else 2.5e7."""
    if abs(v) <= tol:
        return "0"
    fixed = 1e-4 <= abs(v) < 1e5
    for digits in range(16):
        text = f"{v:.{digits}f}" if fixed else f"{v:.{digits}e}"
        if abs(float(text) - v) <= tol:
            break
    if fixed:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks from lo to hi (0 < lo < hi) on a log axis: powers of ten (every k-th over many
    decades), or over a few decades the first of 1 / 1, 2, 5 / 1, 3 / ... times them that
    gives 3 to 7 ticks; inside a sliver of a decade, round numbers evenly spaced."""
    decades = math.log10(hi / lo)
    if decades > MOST_DECADES_LABELLED:
        return _decades(lo, hi, (1,), stride=math.ceil(decades / MOST_DECADES_LABELLED))
    for subs in ((1,), (1, 2, 5), (1, 3), (1, 2, 3, 5), (1, 1.5, 2, 3, 4, 5, 6, 8)):
        ticks = _decades(lo, hi, subs, stride=1)
        if 3 <= len(ticks) <= 7:
            return ticks
    return [t for t in ticker.MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= t <= hi]


def _decades(lo: float, hi: float, subs: tuple, stride: int) -> list[float]:
    """m x 10^e for m in subs, every stride-th e, from lo to hi."""
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             if e % stride == 0 for m in subs]
    return [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]


class LogTicks(ticker.Locator):
    """log_ticks on a log axis; on a symlog axis 0 and log_ticks beyond the linear part."""

    def __call__(self):
        return self.tick_values(*self.axis.get_view_interval())

    def tick_values(self, vmin, vmax):
        lo, hi = sorted((vmin, vmax))
        if self.axis is None or self.axis.get_scale() != "symlog":
            return log_ticks(lo, hi) if 0 < lo < hi else []
        linear = self.axis.get_transform().linthresh
        ticks = [-t for t in reversed(log_ticks(linear, -lo))] if lo < -linear else []
        ticks += [0.0] if lo <= 0 <= hi else []
        return ticks + (log_ticks(max(lo, linear), hi) if hi > max(lo, linear) else [])


class PlainNumbers(ticker.Formatter):
    """plain() labels: on a linear axis as precise as the ticks' spacing needs to tell them
    apart (a tick at 1e-17 from float noise is 0); on a log axis, each to its own scale."""
    tol = 0.0

    def set_locs(self, locs):
        super().set_locs(locs)
        gaps = [b - a for a, b in zip(sorted(locs), sorted(locs)[1:]) if b > a]
        self.tol = 1e-3 * min(gaps) if gaps else 0.0

    def __call__(self, x, pos=None):
        relative = self.axis is not None and self.axis.get_scale() in ("log", "symlog")
        return plain(x, 1e-6 * abs(x) if relative or not self.tol else self.tol)


def readable(ax) -> None:
    """Plain labels on both axes of `ax` (once its scales are set); log and symlog axes get
    LogTicks and unlabelled minor ticks. Ticks an axis was given (set_xticks) stay."""
    for axis in (ax.xaxis, ax.yaxis):
        if isinstance(axis.get_major_locator(), ticker.FixedLocator):
            continue
        if axis.get_scale() in ("log", "symlog"):
            axis.set_major_locator(LogTicks())
            axis.set_minor_formatter(ticker.NullFormatter())
        axis.set_major_formatter(PlainNumbers())
