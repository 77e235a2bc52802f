#!/bin/sh
# The peers of bench/state_dtype.py, torchao and bitsandbytes, in runs/peers (git-ignored),
# beside the project's venv: --no-deps keeps the venv's torch; what they need at run time
# (torch, numpy, packaging) is already there. Then: python -m bench.state_dtype --peers runs/peers
set -e
cd "$(dirname "$0")/.."
"${PYTHON:-.venv/bin/python}" -m pip install --quiet --no-deps --upgrade --target runs/peers \
    torchao==0.18.0 bitsandbytes==0.50.2
