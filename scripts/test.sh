#!/usr/bin/env bash
# Install what the tests need, prepare the real default model, and run the test suite.
# Extra arguments go to pytest, e.g. `-m "not slow"` to skip the real-model and recipe tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate

mol-tune prepare-model
python -m pytest tests -q "$@"
