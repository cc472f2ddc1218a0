#!/usr/bin/env bash
# Set up, lint (ruff, the config of pyproject.toml), then run the test suite (CPU only; the shared data is read from
# ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
