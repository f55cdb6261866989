#!/usr/bin/env bash
# Regenerate the screenshots in docs/console/ with the console's own browser test (needs the
# test extra and Chromium: apt-get install chromium, or CONSOLE_CHROMIUM=/path/to/chrome).
set -euo pipefail
cd "$(dirname "$0")/.."
CONSOLE_SCREENSHOTS=docs/console .venv/bin/python -m pytest -q tests/test_console.py -k screenshots
