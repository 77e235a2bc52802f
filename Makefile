# Each target sets up .venv itself on a fresh machine.
PY := .venv/bin/python
# torch's CUDA build brings the CUDA headers that nvcc needs to compile our kernels.
TORCH ?= torch==2.14.1

.PHONY: test bench build clean

.venv/.ready: requirements-dev.txt
	python3 -m venv .venv
	$(PY) -m pip install -q $(TORCH) -r requirements-dev.txt
	touch $@

build: .venv/.ready
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps --use-pep517 -e .

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m bench.optim_step

clean:
	rm -rf build .venv *.egg-info catapult_kernels/*.so
