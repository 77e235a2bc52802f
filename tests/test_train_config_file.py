"""catapult-train --config FILE: options from a TOML file, under the command line's (defaults
< file < command line), for a run, a sweep's grid and a resume; unknown keys and wrong types
refused in one line naming the key and the file; the resolved config printed as a run begins."""
import csv
import json

import pytest

from catapult_kernels.train.cli import main

GRID_TOML = """\
task = "teacher-student"
loss = "mse"
n-train = 32          # the command line's spelling
n_val = 16            # config.json's
input_dim = 4
optimizer = "sgd"
weight-decay = 0.001
steps = 4
log_every = 2
sharpness_iters = 5
plots = false
"""
TINY_TOML = GRID_TOML + 'lr = 0.05  # a number: the command line\'s text "0.05"\n'  # a sweep takes lrs, not lr


def _config(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def _stored(out) -> dict:
    return json.loads((out / "config.json").read_text())


def test_the_command_line_overrides_the_file_which_overrides_the_defaults(tmp_path):
    config = _config(tmp_path, TINY_TOML + "width = 16\nseed = 3\nmodulus = 11\n")  # --modulus: the config's p
    out = tmp_path / "r"
    assert main(["--config", str(config), "--width", "8", "--weight-decay", "0.01", "--quiet", "--out", str(out)]) == 0
    stored = _stored(out)
    assert (stored["width"], stored["weight_decay"]) == (8, 0.01)  # the command line's
    assert (stored["seed"], stored["n_train"], stored["n_val"], stored["lr"], stored["plots"]) == (3, 32, 16, "0.05", False)
    assert stored["p"] == 11
    assert (stored["depth"], stored["momentum"]) == (2, 0.0)  # defaults
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("toml, message", [
    ("widht = 16\n", "unknown key 'widht' (did you mean 'width'?)"),
    ("world_size = 2\n", "unknown key 'world_size'"),
    ("width = 16.0\n", "'width' must be an integer, got 16.0"),
    ("width = true\n", "'width' must be an integer, got True"),
    ("weight_decay = \"big\"\n", "'weight_decay' must be a number, got 'big'"),
    ("plots = 1\n", "'plots' must be true or false, got 1"),
    ("task = 3\ntask = 4\n", "not valid TOML"),
    ("weight_decay = 0.1\nweight-decay = 0.2\n", "'weight-decay' and 'weight_decay' are the same option"),
    ("[model]\nwidth = 16\n", "'model' must be a string"),
])
def test_a_bad_file_is_one_line_naming_the_key_and_the_file(toml, message, tmp_path, capsys):
    config = _config(tmp_path, toml)
    assert main(["--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"catapult-train: error: --config {config}: " in err and message in err
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()  # one line, nothing written


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "none.toml"), "--out", str(tmp_path / "r")]) == 2
    assert f"--config {tmp_path / 'none.toml'}: cannot read it (No such file or directory)" in capsys.readouterr().err


def test_the_resolved_config_is_printed_unless_quiet(tmp_path, capsys):
    config = _config(tmp_path, TINY_TOML)
    assert main(["--config", str(config), "--width", "8", "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    block = printed[printed.index("config:\n"):printed.index("\n\n") if "\n\n" in printed else None]
    for item in ("task=teacher-student", "width=8", "weight_decay=0.001", "lr=0.05", "steps=4"):
        assert item in block
    assert "beta1" not in block  # None (sgd has no betas): left out
    assert main(["--config", str(config), "--quiet", "--out", str(tmp_path / "q")]) == 0
    assert "config:" not in capsys.readouterr().out


def test_a_resume_takes_the_file_under_its_own_rules(tmp_path, capsys):
    config = _config(tmp_path, TINY_TOML + "width = 16\n")
    out = str(tmp_path / "r")
    assert main(["--config", str(config), "--quiet", "--out", out]) == 0
    longer = _config(tmp_path, TINY_TOML.replace("steps = 4", "steps = 6") + "width = 16\n")
    assert main(["--resume", "--config", str(longer), "--quiet", "--out", out]) == 0  # steps: resumable
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 6
    wider = _config(tmp_path, TINY_TOML.replace("steps = 4", "steps = 8") + "width = 32\n")
    assert main(["--resume", "--config", str(wider), "--quiet", "--out", out]) == 2
    assert "--width 16 -> 32" in capsys.readouterr().err
    assert main(["--resume", "--config", str(wider), "--width", "16", "--quiet", "--out", out]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 8


def test_a_sweep_takes_its_grid_from_the_file(tmp_path, capsys):
    grid = 'widths = [8]\nlrs = [0.05, "1/lambda0"]\nseeds = [0, 1]\n'
    config = _config(tmp_path, GRID_TOML + grid)
    out = tmp_path / "s"
    assert main(["sweep", "--config", str(config), "--seeds", "2", "--out", str(out)]) == 0
    with open(out / "sweep.csv") as f:
        cells = [(r["width"], r["lr_spec"], r["seed"]) for r in csv.DictReader(f)]
    assert cells == [("8", "0.05", "2"), ("8", "1/lambda0", "2")]  # --seeds 2 over the file's [0, 1]
    printed = capsys.readouterr().out
    assert "sweep config:\n  widths=[8]  lrs=['0.05', '1/lambda0']  seeds=[2]" in printed
    assert main(["sweep", "--config", str(_config(tmp_path, GRID_TOML)),
                 "--out", str(tmp_path / "t")]) == 2
    assert "sweep needs --widths, on the command line or in --config" in capsys.readouterr().err
    bad = _config(tmp_path, GRID_TOML + "widths = [8, 0]\nlrs = [0.05]\n")
    assert main(["sweep", "--config", str(bad), "--out", str(tmp_path / "t")]) == 2
    assert "--widths takes integers >= 1, got 0" in capsys.readouterr().err


def test_coord_check_takes_its_widths_from_the_file(tmp_path):
    config = _config(tmp_path, TINY_TOML + "widths = [8, 16]\ncheck_steps = 1\n")
    out = tmp_path / "c"
    assert main(["coord-check", "--config", str(config), "--out", str(out)]) == 0
    results = json.loads((out / "coord_check.json").read_text())["results"]
    assert sorted(int(w) for w in results["standard"]) == [8, 16]


def test_sweep_and_probe_take_jobs_from_the_file_and_a_run_refuses_it(tmp_path, capsys, monkeypatch):
    import importlib
    jobs = []  # what each command would run its cells with: the grid itself is not run here
    for module, grid in (("sweep", "sweep"), ("probe", "probe")):  # the package's own names are its functions
        monkeypatch.setattr(importlib.import_module(f"catapult_kernels.train.{module}"), grid,
                            lambda *a, **kw: jobs.append(kw["jobs"]) or [])
    grid = "widths = [8]\nlrs = [0.05]\njobs = 4\n"
    config = _config(tmp_path, GRID_TOML + grid)
    main(["sweep", "--config", str(config), "--quiet", "--out", str(tmp_path / "s")])
    main(["sweep", "--config", str(config), "--jobs", "2", "--quiet", "--out", str(tmp_path / "t")])
    main(["probe", "--config", str(_config(tmp_path, grid)), "--quiet", "--out", str(tmp_path / "p")])
    assert jobs == [4, 2, 4]  # the file's, under the command line's
    capsys.readouterr()
    assert main(["sweep", "--config", str(_config(tmp_path, GRID_TOML + "widths = [8]\nlrs = [0.05]\njobs = \"4\"\n")),
                 "--out", str(tmp_path / "u")]) == 2
    assert "'jobs' must be an integer, got '4'" in capsys.readouterr().err
    assert main(["--config", str(_config(tmp_path, TINY_TOML + "jobs = 4\n")), "--out", str(tmp_path / "r")]) == 2
    assert "unknown key 'jobs'" in capsys.readouterr().err  # a single run has no --jobs
