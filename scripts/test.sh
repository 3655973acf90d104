#!/usr/bin/env bash
# Set up .venv and run the test suite. Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m slow          # the long checks
#   bash scripts/test.sh tests/model -x   # one area
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh  # venv + install; offline environment
python -m pytest "$@"
