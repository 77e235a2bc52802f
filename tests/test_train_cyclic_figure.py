"""A cyclic run's figure (cyclic.png) is finished as the others are: titled by the run's
configuration (config_words.config_title), plain readable ticks on every axis."""
import json

from catapult_kernels.train import TrainConfig, run
from catapult_kernels.train.config_words import config_title


def test_the_cyclic_figure_is_titled_by_the_configuration_with_plain_ticks(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    saved, real = {}, Figure.savefig

    def keep(self, path, *args, **kwargs):  # the figure inspected before the code under test closes it
        saved[type(path)(path).name] = self
        return real(self, path, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", keep)
    cfg = TrainConfig(task="teacher-student", loss="mse", n_train=32, n_val=16, input_dim=4, width=32, depth=2,
                      parametrization="ntk", bias=False, optimizer="sgd", steps=12, log_every=1, sharpness_every=5,
                      sharpness_iters=8, schedule="cyclic", lr="2/lambda0", cycle_peak=1.5, cycle_trough=0.5,
                      cycle_period=5)
    run(cfg, tmp_path / "r", quiet=True)
    fig = saved["cyclic.png"]
    title = fig._suptitle.get_text().replace("\n", " · ")  # broken between its parts, to fit the figure
    assert title == config_title(json.loads((tmp_path / "r" / "config.json").read_text()))
    assert title.startswith("teacher-student, 32 x 4, 16 val · MLP depth 2, width 32, relu, ntk, no bias"), title
    assert "cycle_peak=1.5" in title and "cycle_period=5" in title
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            texts = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
            assert not any(c in x for x in texts for c in "$\\×"), texts  # plain numbers, no 10^k
