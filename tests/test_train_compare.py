"""catapult-train compare: runs overlaid in one figure, each labelled by the options in which it
differs from the others; one clear line for what cannot be compared, and no file replaced
unless asked."""
import json

import pytest

from catapult_kernels.train.cli import main
from catapult_kernels.train.config import TrainConfig
from catapult_kernels.train.config_words import config_title, run_labels

TINY = ["--task", "teacher-student", "--loss", "mse", "--n-train", "32", "--n-val", "16", "--input-dim", "4",
        "--width", "16", "--optimizer", "sgd", "--lr", "0.5/lambda0", "--steps", "6", "--log-every", "2",
        "--sharpness-iters", "5", "--quiet", "--no-plots"]


def config(**options) -> dict:
    return TrainConfig(**options).to_dict()


def make_run(folder, records, **options) -> str:
    """A run folder as the trainer leaves it, without training: config.json and metrics.jsonl."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config(**options)))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


def curve(scale: float) -> list[dict]:
    return [{"step": s, "loss": scale / (1 + s), "val_loss": 2 * scale / (1 + s), "val_acc": s / 100}
            for s in range(0, 101, 10)]


def test_labels_are_the_options_that_differ_where_they_apply():
    base = dict(task="modular", optimizer="adam", lr="1e-3", weight_decay=0.0)
    assert run_labels([config(**base), config(**{**base, "grokfast": "ema", "weight_decay": 0.005})]) == \
        ["weight_decay=0, grokfast=none", "weight_decay=0.005, grokfast=ema"]
    # the filter's alpha differs, but only the filtered run has a filter: it is no difference
    assert run_labels([config(grokfast="none", grokfast_alpha=0.5), config(grokfast="ema")]) == \
        ["grokfast=none", "grokfast=ema"]
    # values, not spellings; an option a run lacks (stored before it existed) takes its value then
    assert run_labels([config(lr="1e-2"), config(lr="0.01")]) == ["", ""]
    stored_before = {k: v for k, v in config(parametrization="ntk").items() if k != "ntk_bias_scale"}
    assert run_labels([stored_before, config(parametrization="ntk")]) == ["ntk_bias_scale=1", "ntk_bias_scale=0.1"]
    # how often a run logs is not what it computes
    assert run_labels([config(log_every=1), config(log_every=10, seed=1)]) == ["seed=0", "seed=1"]


def test_title_gives_the_configuration():
    title = config_title(config(task="modular", p=113, depth=3, width=200, bias=False, optimizer="adamw", lr="1e-2",
                                weight_decay=4.0, grokfast="ema", steps=400))
    for words in ("(a + b) mod 113, 40% train", "MLP depth 3, width 200, relu, standard, no bias",
                  "adamw lr 0.01, wd 4, cross-entropy", "full batch, 400 steps, seed 0", "grokfast=ema"):
        assert words in title, title
    assert "grokfast_alpha" not in title and "beta1" not in title  # defaults go unsaid
    assert "width" not in config_title(config(), omit=("width",))
    assert config_title({"hidden": 32}) is None  # a fit() caller's own config: no title from it


def test_compare_writes_the_figure_labelled_and_never_replaces_a_file_unasked(tmp_path, capsys, monkeypatch):
    a = make_run(tmp_path / "a", curve(1.0), grokfast="none")
    b = make_run(tmp_path / "b", curve(3.0), grokfast="ema", weight_decay=0.005)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", a, b]) == 0
    printed = capsys.readouterr().out
    assert "grokfast=none" in printed and "weight_decay=0.005, grokfast=ema" in printed
    figure = tmp_path / "compare.png"  # the default: in the current folder
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    figure.write_bytes(b"the user's own file")
    assert main(["compare", a, b]) == 2
    assert "compare.png exists; pass --overwrite" in capsys.readouterr().err
    assert figure.read_bytes() == b"the user's own file"
    assert main(["compare", a, b, "--overwrite", "--metrics", "train_loss", "val_acc"]) == 0
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", a, b, "--out", str(tmp_path / "c.svg")]) == 0
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")


def test_compare_reads_a_run_still_training_without_its_cut_last_record(tmp_path):
    a = make_run(tmp_path / "a", curve(1.0))
    b = make_run(tmp_path / "b", curve(2.0), seed=1)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 110, "lo')  # a record being written
    assert main(["compare", a, b, "--out", str(tmp_path / "f.png")]) == 0


def test_compare_of_real_runs(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(TINY + ["--out", a]) == 0
    assert main(TINY + ["--out", b, "--momentum", "0.9"]) == 0
    assert main(["compare", a, b, "--out", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_what_cannot_be_compared_is_one_clear_line_and_no_file(tmp_path, capsys):
    a = make_run(tmp_path / "a", curve(1.0))
    b = make_run(tmp_path / "b", curve(2.0), seed=1)
    only_sharpness = make_run(tmp_path / "s", [{"step": 0, "sharpness": 1.0}], seed=2)
    (tmp_path / "empty").mkdir()
    no_records = make_run(tmp_path / "n", [], seed=3)
    broken = make_run(tmp_path / "x", [], seed=4)
    (tmp_path / "x" / "metrics.jsonl").write_text('{"step": 0, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    out = tmp_path / "f.png"
    for args, message in [
        ([a, str(tmp_path / "empty")], "empty is not a run folder: it has no config.json and no metrics.jsonl"),
        ([a, str(tmp_path / "missing")], "missing does not exist"),
        ([a], "compare needs at least two run folders"),
        ([a, a], "is given twice"),
        ([a, no_records], "holds no records yet"),
        ([a, broken], "line 2 is not a metrics record"),
        ([a, only_sharpness], "the runs have no metric in common"),
        ([a, b, "--metrics", "robust_val_acc"], "--metrics robust_val_acc: no run logged it; they logged: loss,"),
        ([a, b, "--out", str(tmp_path / "f.jpg")], "must end in .png, .pdf, .svg"),
        ([a, b, "--out", str(tmp_path)], "is a folder"),
        ([a, b, "--out", str(tmp_path / "no" / "f.png")], "does not exist"),
    ]:
        assert main(["compare", *args] + ([] if "--out" in args else ["--out", str(out)])) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
