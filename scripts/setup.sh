#!/usr/bin/env bash
# Create .venv (if missing) and install sgdrop-zoo into it, editable, with the test extra.
# Needs only a Python >= 3.11 on PATH (override with PYTHON=/path/to/python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
