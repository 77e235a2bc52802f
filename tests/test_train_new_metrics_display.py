"""The label-noise and adversarial metrics where a reader looks: on a run's curves.png
(accuracy panel) and in the sweep's printed table, and nowhere when a run did not measure them."""
import re

from catapult_kernels.train.plots import plot_curves
from catapult_kernels.train.sweep import format_table

TODAYS_HEADS = ["width", "lr", "seed", "lambda0", "lr value", "lr/(2/l0)", "phase", "peak loss", "final loss",
                "sharpness", "2/lr", "val acc", "val loss", "grok step"]


def records(**extra) -> list[dict]:
    return [{"step": s, "loss": 1.0 / (s + 1), "val_loss": 1.0, "train_acc": s / 10, "val_acc": s / 20,
             **{k: v * s / 10 for k, v in extra.items()}} for s in range(11)]


def accuracy_legend(figure) -> list[str]:
    ax, = [ax for ax in figure.axes if ax.get_ylabel() == "accuracy"]
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_accuracy_panel_shows_memorized_noise_clean_train_and_robust_accuracy(tmp_path, saved):
    plot_curves(records(noisy_train_acc=0.5, clean_train_acc=1.0, robust_val_acc=0.3), tmp_path / "f.png", title="t")
    assert accuracy_legend(saved[0]) == ["train", "val", "train, clean labels", "train, noisy labels (memorized)",
                                         "val, adversarial"]


def test_the_accuracy_panel_shows_only_what_the_run_measured(tmp_path, saved):
    plot_curves(records(), tmp_path / "a.png")
    plot_curves(records(robust_val_acc=0.3), tmp_path / "b.png")
    assert accuracy_legend(saved[0]) == ["train", "val"]  # as before the new metrics
    assert accuracy_legend(saved[1]) == ["train", "val", "val, adversarial"]


def row(seed: int, **extra) -> dict:
    return {"width": 8, "lr_spec": "1/lambda0", "seed": seed, "lambda0": 2.0, "lr": 1.0,
            "lr_over_2_over_lambda0": 0.5, "phase": "lazy", "peak_loss": 1.0, "final_loss": 0.1,
            "sharpness_final": 1.5, "two_over_lr": 2.0, "final_val_acc": 0.8, "final_val_loss": 0.5,
            "grok_step": None, "final_noisy_train_acc": None, "final_clean_train_acc": None,
            "final_robust_val_acc": None, **extra}


def heads(table: str) -> list[str]:
    return re.split(r" {2,}", table.splitlines()[0].strip())


def test_the_sweep_table_is_todays_without_the_new_metrics():
    table = format_table([row(0), row(1)])
    assert heads(table) == TODAYS_HEADS
    assert [len(line.split()) for line in table.splitlines()[1:]] == [14, 14]


def test_the_sweep_table_adds_the_columns_some_row_measured():
    table = format_table([row(0, final_noisy_train_acc=0.25, final_clean_train_acc=0.875), row(1)])
    assert heads(table) == TODAYS_HEADS + ["noisy mem", "clean train acc"]  # no adversarial evaluation: no column
    first, second = (line.split() for line in table.splitlines()[1:])
    assert first[-2:] == ["0.25", "0.875"] and second[-2:] == ["-", "-"]  # a row without them: "-"
    table = format_table([row(0, final_noisy_train_acc=0.25, final_clean_train_acc=0.875, final_robust_val_acc=0.5)])
    assert heads(table)[-3:] == ["noisy mem", "clean train acc", "robust acc"]
    assert table.splitlines()[1].split()[-1] == "0.5"
