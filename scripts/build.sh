#!/usr/bin/env bash
# Build the sdist and the wheel into dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q build
python3 -m build --outdir dist .
ls -l dist/
