#!/usr/bin/env bash
# Create ./.venv (if missing) and install mol_tune with the pinned, tested versions.
# torch is installed first on its own pin: on a CPU machine `torch==2.13.0` takes the CPU wheel,
# while a wider spec resolved together with torchtune could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate

if ! python -c "import mol_tune, torchtune, pytest" 2>/dev/null || [ pyproject.toml -nt .venv/.mol_tune_installed ] \
        || [ constraints.txt -nt .venv/.mol_tune_installed ]; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet "$(grep -E '^torch==' constraints.txt)"
    python -m pip install --quiet -c constraints.txt -e ".[test]"
    touch .venv/.mol_tune_installed
fi
