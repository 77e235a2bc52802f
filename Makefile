# Each target sets up .venv itself on a fresh machine.
PY := .venv/bin/python
# torch's CUDA build brings the CUDA headers that nvcc needs to compile our kernels.
TORCH ?= torch==2.14.1

.PHONY: test bench demo build clean

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

clean:
	rm -rf build .venv *.egg-info catapult_kernels/*.so
