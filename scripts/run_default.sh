#!/usr/bin/env bash
# The default run: install, convert SmolLM2-135M-Instruct, prepare the digits and text data, fine-tune with MoL.
# Extra arguments are passed to the recipe as config overrides, e.g. max_steps=20.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate

mol-tune prepare-model
mol-tune prepare-digits
mol-tune prepare-text
tune run mol_tune/recipes/mol_finetune --config mol_tune/configs/smollm2_135m_digits.yaml "$@"
