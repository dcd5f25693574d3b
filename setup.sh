#!/usr/bin/env bash
# Create .venv and install the project with its test tools. Safe to run again.
# The CPU build of torch goes first: `pip install torch==2.13.0` takes a local wheel quickly, while an
# unpinned torch could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[test,notebook]"
echo "setup done: activate with '. .venv/bin/activate'"
