"""Packaging: the version flag, pyproject.toml's metadata, setup.py without torch, the
references in the docs, and the Makefile's incremental build of the extension."""
import glob
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import catapult_kernels
from catapult_kernels.train.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "SCIENCE.md"]


# --- catapult-train --version -------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--version"], ["sweep", "--version"]])
def test_version_flag_prints_the_package_version(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"catapult-train {catapult_kernels.__version__}\n"


# --- pyproject.toml -------------------------------------------------------------------------

def _pyproject() -> dict:
    # setuptools' own reader: it also validates the file as `pip install .` will
    from setuptools.config.pyprojecttoml import read_configuration
    return read_configuration(ROOT / "pyproject.toml")


def test_pyproject_metadata():
    config = _pyproject()
    project = config["project"]
    assert project["name"] == "catapult_kernels"
    assert project["version"] == catapult_kernels.__version__
    assert project["requires-python"] == ">=3.10"
    assert any(d.startswith("torch") for d in project["dependencies"])
    assert project["scripts"] == {"catapult-train": "catapult_kernels.train.cli:main"}
    module, function = project["scripts"]["catapult-train"].split(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_pyproject_leaves_torch_out_of_the_build_requirements():
    # A build-isolated torch would be a second torch, likely not the one the extension runs with
    config = _pyproject()
    assert config["build-system"]["build-backend"] == "setuptools.build_meta"
    assert not [r for r in config["build-system"]["requires"] if r.startswith("torch")]


def test_setup_without_torch_says_in_one_line_to_install_it_first():
    hide_torch = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
                  "runpy.run_path('setup.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", hide_torch], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert "install torch first" in message and "--no-build-isolation" in message


# --- references in the docs -----------------------------------------------------------------

def _prose(md: Path) -> str:
    """The document without its fenced code blocks (commands there name outputs, not files)."""
    return re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)


def _anchors(md: Path) -> set:
    """GitHub's anchors for the headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", _prose(md), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("md", DOCS, ids=lambda p: p.name)
def test_every_markdown_link_resolves_inside_the_repository(md):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(md)):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (md.parent / path).resolve() if path else md
        if not file.is_file() or ROOT not in file.parents:
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(target)
    assert not broken, f"{md.name}: links to nothing in the repository: {broken}"


@pytest.mark.parametrize("md", DOCS, ids=lambda p: p.name)
def test_every_named_markdown_file_is_in_the_repository(md):
    named = set(re.findall(r"[\w./-]*\b\w+\.md\b", _prose(md)))
    missing = [n for n in named if not (ROOT / n).is_file() and not (md.parent / n).is_file()]
    assert not missing, f"{md.name} names files that are not in the repository: {missing}"


def test_every_repository_path_in_the_readme_exists():
    top_level = {p.name for p in ROOT.iterdir() if p.is_dir()} - {".venv", "runs", "build", ".git"}
    paths = [p for p in re.findall(r"`([\w.*/-]+/[\w.*/-]*)`", _prose(ROOT / "README.md"))
             if p.split("/")[0] in top_level]
    assert paths, "the README names no file of the repository"
    missing = [p for p in paths if not glob.glob(str(ROOT / p))]
    assert not missing, f"the README names paths that do not exist: {missing}"


# --- Makefile: the extension is rebuilt only when its inputs changed --------------------------

@pytest.fixture
def checkout(tmp_path):
    """A checkout with the Makefile whose extension was built after all its inputs."""
    shutil.copy(ROOT / "Makefile", tmp_path)
    inputs = ["csrc/ops.cpp", "csrc/cpu/adamw.cpp", "setup.py", "pyproject.toml", "requirements-dev.txt",
              ".venv/.ready"]
    built = [".venv/.extension-built", "catapult_kernels/_C.cpython-311-x86_64-linux-gnu.so"]
    for i, name in enumerate(inputs + built):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
        os.utime(tmp_path / name, (1_000_000 + i, 1_000_000 + i))
    return tmp_path


def _make_dry_run(checkout: Path, target: str) -> str:
    done = subprocess.run(["make", "-n", target], cwd=checkout, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_demo_on_a_built_checkout_does_not_rebuild(checkout):
    commands = _make_dry_run(checkout, "demo")
    assert "pip install" not in commands
    assert "catapult_kernels.train" in commands


@pytest.mark.parametrize("changed", ["csrc/cpu/adamw.cpp", "setup.py", "pyproject.toml", ".venv/.ready"])
def test_make_rebuilds_when_an_input_is_newer_than_the_build(checkout, changed):
    os.utime(checkout / changed, (2_000_000, 2_000_000))
    assert "pip install -q --no-build-isolation --no-deps -e ." in _make_dry_run(checkout, "demo")


def test_make_rebuilds_when_the_built_module_is_gone(checkout):
    for so in (checkout / "catapult_kernels").glob("_C*.so"):
        so.unlink()
    assert "pip install -q --no-build-isolation --no-deps -e ." in _make_dry_run(checkout, "bench")


def test_make_test_on_a_fresh_clone_sets_up_and_builds(checkout):
    shutil.rmtree(checkout / ".venv")
    commands = _make_dry_run(checkout, "test")
    assert "python3 -m venv .venv" in commands
    assert "pip install -q --no-build-isolation --no-deps -e ." in commands
    assert "pytest" in commands


# --- make gpu-check -----------------------------------------------------------------------

def test_gpu_check_without_a_gpu_says_so_in_one_line_and_writes_nothing(tmp_path):
    """Where no GPU is visible, gpu-check stops before building, with one line (here: always)."""
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible: gpu-check would build and run")
    before = set(os.listdir(ROOT / "bench" / "results"))
    done = subprocess.run([str(ROOT / "bench" / "gpu_check.sh")], env={**os.environ, "PY": sys.executable},
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no CUDA GPU is visible" in done.stderr
    assert set(os.listdir(ROOT / "bench" / "results")) == before


def test_make_gpu_check_runs_the_script():
    # --no-print-directory: under `make test` the inner make would also say where it is
    done = subprocess.run(["make", "-n", "--no-print-directory", "gpu-check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout.strip() == "bench/gpu_check.sh"
