# Each target sets up .venv itself on a fresh machine.
PY := .venv/bin/python
# torch's CUDA build brings the CUDA headers that nvcc needs to compile our kernels.
TORCH ?= torch==2.14.1

.PHONY: test test-all bench demo build gpu-check clean FORCE

.venv/.ready: requirements-dev.txt
	python3 -m venv .venv
	$(PY) -m pip install -q $(TORCH) -r requirements-dev.txt
	touch $@

# Building the extension takes minutes, so it reruns only when what it is built from changed:
# a file under csrc/, setup.py, pyproject.toml or the venv, or when the built module is gone.
# The stamp keeps the build's start time, so a source edited during a build triggers the next one.
EXTENSION_INPUTS := $(shell find csrc -type f) setup.py pyproject.toml .venv/.ready
EXTENSION_STAMP := .venv/.extension-built
$(EXTENSION_STAMP): $(EXTENSION_INPUTS) $(if $(wildcard catapult_kernels/_C*.so),,FORCE)
	touch $@.started
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	mv $@.started $@

build: $(EXTENSION_STAMP)

test: build
	$(PY) -m pytest -q -m "not slow" tests

# Everything, the multi-process trainer tests too (marked slow; ~3 more minutes on 2 cores).
test-all: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m bench.optim_step

# The trainer's main job, about two minutes on a 2-core CPU: grokking with the Grokfast filter,
# then a small catapult sweep. Writes runs/demo/ (replacing the previous demo's output).
GROKKING := --task modular --p 113 --train-frac 0.4 --depth 3 --width 200 --no-bias --loss ce \
	--optimizer adamw --lr 1e-2 --weight-decay 4 --steps 400 --log-every 10
CATAPULT := --task teacher-student --loss mse --n-train 256 --depth 2 --activation relu \
	--parametrization ntk --no-bias --optimizer sgd --steps 300 --log-every 1 --sharpness-every 50
demo: build
	$(PY) -m catapult_kernels.train $(GROKKING) --grokfast ema --out runs/demo/grokking --overwrite
	$(PY) -m catapult_kernels.train sweep $(CATAPULT) --widths 512 2048 \
		--lrs 1/lambda0 2.5/lambda0 3.5/lambda0 5/lambda0 --out runs/demo/catapult --overwrite

# On a machine with a CUDA GPU (its own python3 and torch; no venv): build for that GPU, run the
# tests on CUDA tensors and the benchmarks at 1M/10M/100M params, write bench/results/.
gpu-check:
	bench/gpu_check.sh

clean:
	rm -rf build .venv *.egg-info catapult_kernels/*.so
